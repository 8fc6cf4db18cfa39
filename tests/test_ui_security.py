"""The web UI attacked as a server (issue 11): whoever reaches its port may be hostile.

Each test plays one attack: a run or a job record on disk that would make the server send a file outside the
workspace (checked with real HTTP requests to a launched app), a caption editor pointed outside the workspace or
through links, a zip bomb, repeated wrong logins, and a server on 0.0.0.0 that says where it really listens.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
import zipfile
import zlib
from pathlib import Path

import httpx
import pytest
from ui_helpers import free_port, png_bytes, write

from trainer.config import TrainerConfig
from ui import form, workspace
from ui.app import RankwrightUI
from ui.jobs import JobError, JobRunner
from ui.server import LoginThrottle, describe_address, launch
from ui.workspace import Workspace, WorkspaceError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # gr.Warning/gr.Info outside a request
ROOT = Path(__file__).resolve().parents[1]
SYSTEM_FILE = Path("/etc/hostname") if Path("/etc/hostname").is_file() else Path("/etc/passwd")


@pytest.fixture
def secret(tmp_path) -> Path:
    """A folder outside the workspace with a file nobody may download."""
    return write(tmp_path / "secret" / "key.txt", "the server's secret").parent


def idle_runner(ws: Workspace) -> JobRunner:
    """A job runner whose worker does nothing (nothing is ever written into the folders a test names)."""
    return JobRunner(ws.jobs, command=lambda config, folder: [sys.executable, "-c", "pass"])


@contextlib.contextmanager
def served(ws: Workspace, **options):
    """The app serving ``ws`` on a free port, as ``python app.py`` launches it; yields (base URL, its UI)."""
    ui = RankwrightUI(ws, runner=idle_runner(ws), preset_dirs=[])
    port = free_port()
    demo, ui = launch(ws, port=port, ui=ui, **options)
    try:
        yield f"http://127.0.0.1:{port}", ui
    finally:
        demo.close()


def fetch(url: str, path: str | Path) -> int:
    return httpx.get(f"{url}/gradio_api/file={path}", timeout=30).status_code


def form_args(ui: RankwrightUI, **values) -> list:
    data = form.config_to_values(TrainerConfig.from_dict({"dataset": {"dir": str(ui.ws.default_dataset())},
                                                          "output": {"dir": str(ui.ws.outputs)},
                                                          "train": {"max_steps": 3}}))
    data.update(values)
    return ui.ordered(data)


# ================================================================================================ item 1
def test_a_run_cannot_make_the_server_send_files_outside_the_workspace(ws, secret):
    ws.default_dataset().mkdir(parents=True)
    with served(ws) as (url, ui):
        write(ws.outputs / "made_here.txt", "a file a run wrote")
        assert fetch(url, ws.outputs / "made_here.txt") == 200  # what runs write is served
        messages = []
        for folder in ("/etc", "/", str(secret), str(ws.outputs / ".." / ".." / "secret")):
            for start in (ui.guard(ui.start, 2, 0), lambda *a: ui.guard(ui.compare, 2, 0)(["lora"], 1, "", *a)):
                messages.append(start(*form_args(ui, **{"output.dir": folder}))[0])
                ui.runner.kill()
            ui.poll({}), ui.poll_compare({}), ui.refresh_results()
        assert fetch(url, SYSTEM_FILE) == 403 and fetch(url, secret / "key.txt") == 403
        for message in messages:
            assert message.startswith("⚠️ output.dir") and str(ws.outputs) in message and "my_run" in message
        assert ui.runner.history() == []
        assert fetch(url, ws.root / "last_config.toml") == 403  # the workspace outside outputs/ is not served
        message, _ = ui.start(*form_args(ui, **{"output.dir": "my_run"}))  # a name: a folder in outputs/
        assert ui.runner.current().output_dir == str(ws.outputs / "my_run")
        assert sorted(ui.allowed_paths) == sorted(str(p) for p in ws.served)


def test_job_records_on_disk_do_not_reopen_foreign_folders(ws, secret):
    """A job record naming a folder outside the workspace (an older version's, or edited by hand) is ignored
    after a restart: nothing of that folder is read, listed or served."""
    adapter = write(secret / "private.safetensors", b"weights")
    preview = write(secret / "step000001_0.png", png_bytes())
    write(secret / "events.jsonl", "".join(json.dumps(event) + "\n" for event in (
        {"event": "start", "config": {}}, {"event": "preview", "step": 1, "paths": [str(preview)]},
        {"event": "save", "step": 1, "path": str(adapter), "size_bytes": 7, "check_ok": True},
        {"event": "done", "step": 1, "output": str(adapter)})))
    for job_id, kind, folder in (("20240101-000000-aaaaaa", "train", secret),
                                 ("20240101-000001-bbbbbb", "compare", Path("/etc"))):
        write(ws.jobs / job_id / "job.json", json.dumps({
            "id": job_id, "folder": str(ws.jobs / job_id), "config_path": str(ws.jobs / job_id / "config.toml"),
            "output_dir": str(folder), "output_name": "private", "started": 1.0, "kind": kind}))
    write(ws.jobs / "current.json", json.dumps({"id": "20240101-000000-aaaaaa"}))
    with served(ws) as (url, ui):
        shown = ui.poll({})
        ui.poll_compare({})
        for path in (adapter, preview, SYSTEM_FILE):
            assert fetch(url, path) == 403
        status, _, _, previews, _, files, compared, choices, runs, _ = shown
        assert status == "No training job yet." and files is None and choices["choices"] == []
        assert compared is None and runs["choices"] == [] and ui.resumable_runs() == []
        with pytest.raises(JobError, match="choose a training run"):  # nor continued from its "state"
            ui.train_more("20240101-000000-aaaaaa", 10)
        assert ui.poll_compare({})[0] == "No comparison yet."
        assert ui.saved_files() == [] and ui.results()[0] is None
        with pytest.raises(WorkspaceError):
            ui.adapter_info(str(adapter))
        assert ui.guard(ui.stop, 1, 0)().startswith("⚠️ No training job is running")
        assert not (secret / "STOP").exists()
    # a queued job whose record was edited to write elsewhere is dropped from the queue, never started
    queued_id = "20240101-000002-cccccc"
    write(ws.jobs / queued_id / "job.json", json.dumps({
        "id": queued_id, "folder": str(ws.jobs / queued_id), "config_path": str(ws.jobs / queued_id / "config.toml"),
        "output_dir": str(secret), "output_name": "private", "started": 0, "kind": "train"}))
    write(ws.jobs / "queue.json", json.dumps({"ids": [queued_id]}))
    ui = RankwrightUI(ws, runner=idle_runner(ws), preset_dirs=[])
    assert ui.poll_queue({})[0] == "No job is waiting." and ui.runner.dispatch() is None
    assert ui.runner.queue() == [] and ui.runner.record(queued_id).pid is None


def test_links_out_of_the_workspace_are_not_served(ws, secret):
    (ws.outputs / "escape").symlink_to(secret, target_is_directory=True)
    (ws.outputs / "hostname").symlink_to(SYSTEM_FILE)
    ws.default_dataset().mkdir(parents=True)
    with served(ws) as (url, ui):
        assert fetch(url, ws.outputs / "escape" / "key.txt") == 403
        assert fetch(url, ws.outputs / "hostname") == 403
        messages = [ui.guard(ui.start, 2, 0)(*form_args(ui, **{"output.dir": folder}))[0]
                    for folder in (str(ws.outputs / "escape"), "escape")]
        assert fetch(url, secret / "key.txt") == 403
        assert messages[0].startswith(f"⚠️ output.dir {ws.outputs / 'escape'}:") and ui.runner.history() == []
        assert messages[1].startswith("⚠️ output.dir escape:")


# ================================================================================================ item 3
@pytest.fixture
def foreign(tmp_path) -> Path:
    """A folder outside the workspace holding an image and a config file beside it."""
    folder = tmp_path / "x"
    write(folder / "app.png", png_bytes())
    write(folder / "app.conf", "password = hunter2\n")
    write(folder / "app.txt", "a caption outside")
    return folder


def test_the_caption_editor_stays_out_of_folders_outside_the_workspace(ws, foreign):
    ui = RankwrightUI(ws, runner=idle_runner(ws), preset_dirs=[])
    image = str(foreign / "app.png")
    upload = write(foreign.parent / "upload" / "new.png", png_bytes("blue"))
    for folder in (str(foreign), str(ws.datasets / ".." / ".." / "x"), "../../x", str(ws.jobs)):
        attacks = [(ui.dataset_view, folder, ".conf"), (ui.dataset_view, folder),
                   (ui.save_caption, folder, image, "pwned", ".conf"), (ui.save_caption, folder, image, "pwned"),
                   (ui.delete_image, folder, image, ".conf"), (ui.add_trigger, folder, "pwned"),
                   (ui.find_replace, folder, "a", "pwned"), (ui.set_repeats, folder, "x", 3),
                   (ui.upload, [str(upload)], folder, "c", 1)]
        for function, *args in attacks:
            with pytest.raises(WorkspaceError, match="--data-dir"):
                function(*args)
    message, _ = ui.guard(ui.start, 2, 0)(*form_args(ui, **{"dataset.dir": str(foreign)}))
    assert message.startswith("⚠️") and "--data-dir" in message
    inside = ws.default_dataset()
    write(inside / "1_dog" / "a.png", png_bytes())
    for function, *args in ((ui.add_trigger, str(inside), "zq", ".txt", image),  # the "selected" image is sent too
                            (ui.find_replace, str(inside), "zq", "zz", ".txt", image)):
        assert "a caption outside" not in json.dumps(function(*args)[:2])
    assert sorted(p.name for p in foreign.iterdir()) == ["app.conf", "app.png", "app.txt"]
    assert (foreign / "app.conf").read_text() == "password = hunter2\n"
    assert (foreign / "app.txt").read_text() == "a caption outside"


def test_caption_extensions_come_from_a_fixed_list(ws):
    ui = RankwrightUI(ws, runner=idle_runner(ws), preset_dirs=[])
    dataset = ws.default_dataset()
    image = write(dataset / "1_dog" / "a.png", png_bytes())
    write(dataset / "1_dog" / "a.conf", "not a caption")
    for extension in (".conf", "conf", ".png", ".txt/../../x", ".py", "tags"):
        for function, *args in ((ui.save_caption, str(dataset), str(image), "pwned", extension),
                                (ui.dataset_view, str(dataset), extension),
                                (ui.add_trigger, str(dataset), "pwned", extension),
                                (ui.delete_image, str(dataset), str(image), extension)):
            with pytest.raises(WorkspaceError, match=r"\.txt, \.caption, \.tags"):
                function(*args)
        message, _ = ui.guard(ui.start, 2, 0)(*form_args(ui, **{"dataset.caption_extension": extension}))
        assert message.startswith("⚠️ caption extension")
    assert (dataset / "1_dog" / "a.conf").read_text() == "not a caption" and image.is_file()
    for extension in (".txt", ".caption", ".tags", " .TXT "):
        ui.save_caption(str(dataset), str(image), f"a dog {extension}", extension)
    assert sorted(p.name for p in (dataset / "1_dog").iterdir()) == ["a.caption", "a.conf", "a.png", "a.tags",
                                                                    "a.txt"]


def test_links_inside_a_dataset_never_lead_out(ws, foreign):
    ui = RankwrightUI(ws, runner=idle_runner(ws), preset_dirs=[])
    dataset = ws.default_dataset()
    good = write(dataset / "1_dog" / "good.png", png_bytes("green"))
    (dataset / "1_dog" / "linked.png").symlink_to(foreign / "app.png")
    write(dataset / "1_dog" / "b.png", png_bytes("blue"))
    (dataset / "1_dog" / "b.txt").symlink_to(foreign / "app.conf")  # a caption that is a link to a secret
    (dataset / "2_cat").symlink_to(foreign, target_is_directory=True)  # a concept folder that leads out
    (ws.datasets / "linked_dataset").symlink_to(foreign, target_is_directory=True)

    gallery, paths, _, summary = ui.dataset_view(str(dataset))
    assert sorted(Path(p).name for p in paths) == ["b.png", "good.png"]
    assert "hunter2" not in json.dumps([gallery, summary])  # the secret behind the caption link is not read
    assert "`linked.png`: a link to a file outside this dataset folder" in summary
    assert "`app.png`: a link to a file outside this dataset folder" in summary  # the image in 2_cat
    for image in (dataset / "1_dog" / "linked.png", dataset / "2_cat" / "app.png", dataset / "1_dog" / ".." / ".."
                  / ".." / ".." / "x" / "app.png"):
        with pytest.raises(WorkspaceError, match="not an image of the dataset"):
            ui.save_caption(str(dataset), str(image), "pwned")
        with pytest.raises(WorkspaceError, match="not an image of the dataset"):
            ui.delete_image(str(dataset), str(image))
    with pytest.raises(WorkspaceError, match="does not write through links"):
        ui.save_caption(str(dataset), str(dataset / "1_dog" / "b.png"), "pwned")
    ui.add_trigger(str(dataset), "zq")
    ui.find_replace(str(dataset), "password", "pwned")
    assert (foreign / "app.conf").read_text() == "password = hunter2\n"
    assert (foreign / "app.txt").read_text() == "a caption outside" and (foreign / "app.png").is_file()
    assert workspace.read_caption(good) == "zq"
    with pytest.raises(WorkspaceError, match="--data-dir"):
        ui.dataset_view(str(ws.datasets / "linked_dataset"))
    ui.delete_image(str(dataset), str(dataset / "1_dog" / "b.png"))  # removes the caption link, not the secret
    assert not (dataset / "1_dog" / "b.txt").is_symlink() and (foreign / "app.conf").is_file()


def test_the_operator_can_allow_folders_outside_the_workspace(tmp_path, foreign):
    from app import parse_args

    assert parse_args(["--data-dir", str(foreign), "--data-dir", str(tmp_path)]).data_dir == [str(foreign),
                                                                                           str(tmp_path)]
    with pytest.raises(SystemExit):
        parse_args(["--data-dir", str(tmp_path / "missing")])
    ws = Workspace(tmp_path / "ws", data_dirs=[foreign])
    ui = RankwrightUI(ws, runner=idle_runner(ws), preset_dirs=[])
    _, paths, _, summary = ui.dataset_view(str(foreign))
    assert [Path(p).name for p in paths] == ["app.png"] and "1 usable image(s)" in summary
    ui.save_caption(str(foreign), str(foreign / "app.png"), "edited")
    assert (foreign / "app.txt").read_text() == "edited\n"
    message, _ = ui.start(*form_args(ui, **{"dataset.dir": str(foreign)}))
    assert TrainerConfig.load(ui.runner.current().config_path).dataset.dir == str(foreign)
    assert str(foreign) not in ui.allowed_paths  # opened and trained on, never served


def test_presets_and_adapters_are_read_only_from_the_workspace(ws, tmp_path):
    """The preset and adapter dropdowns send paths back: only the listed ones are read."""
    ui = RankwrightUI(ws, runner=idle_runner(ws), preset_dirs=[ws.presets])
    other = write(tmp_path / "other_app" / "settings.toml", '[model]\nbase = "db-password-hunter2"\n')
    with pytest.raises(WorkspaceError, match="not one of the presets"):
        ui.load_preset(str(other), *form_args(ui))
    adapter = write(tmp_path / "private.safetensors", b"weights")
    for function, *args in ((ui.adapter_info, str(adapter)), (ui.adapter_details, str(adapter)),
                            (ui.try_it, "model", "auto", "auto", "", str(adapter), "a cat", 1.0, 1, 1, 32),
                            (ui.try_start, "model", "auto", "auto", "", str(adapter), "a cat", 1.0, 1, 1, 32)):
        with pytest.raises(WorkspaceError, match="not a file in"):
            function(*args)
    assert ui.trying.task is None  # nothing was rendered


def test_captioning_models_come_from_the_workspace_or_the_hub(ws, tmp_path, monkeypatch):
    """The auto-captioner loads a folder inside the workspace (a name is taken in models/) or a hub id — never a
    folder elsewhere on the server, also not one a hub-id-like name would find relative to the server's folder."""
    outside = tmp_path / "elsewhere" / "captioner"
    write(outside / "config.json", '{"model_type": "blip"}')
    inside = write(ws.models / "tiny" / "config.json", '{"model_type": "blip"}').parent
    assert ws.captioner("tiny") == str(inside) and ws.captioner(str(inside)) == str(inside)
    assert ws.captioner("Salesforce/blip-image-captioning-base") == "Salesforce/blip-image-captioning-base"
    monkeypatch.chdir(tmp_path)  # "elsewhere/captioner" now names a folder relative to the server's folder
    for name in (str(outside), "elsewhere/captioner", "../../elsewhere/captioner", str(ws.models / ".." / ".."),
                 "/etc", ""):
        with pytest.raises(WorkspaceError):
            ws.captioner(name)
    ui = RankwrightUI(ws, runner=idle_runner(ws), preset_dirs=[])
    ws.default_dataset().mkdir(parents=True)
    write(ws.default_dataset() / "a.png", png_bytes())
    message = ui.guard(ui.caption_start, 1, 0)(str(ws.default_dataset()), ".txt", str(outside), "auto",
                                               "skip_existing", "", "", "", "", 1, 5, 0.35, "cpu")
    assert message.startswith("⚠️") and "models" in message and ui.captioning.task is None
    message = ui.guard(ui.caption_start, 1, 0)("/etc", ".txt", "tiny", "auto", "skip_existing", "", "", "", "",
                                               1, 5, 0.35, "cpu")
    assert message.startswith("⚠️") and ui.captioning.task is None


# ================================================================================================ item 4
def deflate_zip(path: Path, members: dict[str, bytes]) -> Path:
    """A zip of deflated members, each compressed once (zipfile would deflate 1,900 MiB of zeros for seconds)."""
    local, central = bytearray(), bytearray()
    packed_by_data: dict[bytes, bytes] = {}
    for name, data in members.items():
        if data not in packed_by_data:
            compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
            packed_by_data[data] = compressor.compress(data) + compressor.flush()
        packed, crc, raw = packed_by_data[data], zlib.crc32(data), name.encode()
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 8, 0, 0x21, crc, len(packed), len(data),
                               len(raw), 0, 0, 0, 0, 0, len(local)) + raw
        local += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 8, 0, 0x21, crc, len(packed), len(data), len(raw),
                             0) + raw + packed
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members), len(central), len(local), 0)
    path.write_bytes(bytes(local + central + end))
    return path


def peak_memory(function) -> tuple[object, int]:
    tracemalloc.start()
    try:
        result = function()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_zip_bomb_is_refused_in_little_memory(tmp_path):
    """The issue's bomb: 1,900 members of 1 MiB of zeros in a 2 MB zip (it used to take 2 GiB of memory)."""
    zeros = b"\0" * 2**20
    bomb = deflate_zip(tmp_path / "bomb.zip", {f"{i:04d}.png": zeros for i in range(1900)})
    assert bomb.stat().st_size < 2.5e6
    target = tmp_path / "ws" / "1_x"
    started = time.perf_counter()
    report, peak = peak_memory(lambda: workspace.add_uploads([bomb], target))
    print(f"zip bomb: peak {peak / 2**20:.1f} MiB traced, {time.perf_counter() - started:.2f} s")
    assert peak < 16 * 2**20
    assert not report.added and report.rejected[0][0] == "bomb.zip" and "zip bomb" in report.rejected[0][1]
    assert [p.name for p in target.iterdir()] == []


def test_every_member_has_a_ratio_guard_and_what_was_unpacked_is_kept(tmp_path):
    members = {"set/a.png": png_bytes("red"), "set/a.txt": b"a red square"}
    zeros = b"\0" * 2**20  # exactly 1 MiB: passed the ratio guard before
    members |= {f"set/zeros{i:02d}.png": zeros for i in range(30)}
    members |= {"set/b.png": png_bytes("blue")}
    archive = deflate_zip(tmp_path / "mixed.zip", members)
    target = tmp_path / "ws" / "1_x"
    report = workspace.add_uploads([archive], target)
    assert sorted(p.name for p in report.added) == ["a.png", "b.png"]
    assert (target / "a.txt").read_text() == "a red square\n"
    assert len(report.rejected) == 30 and all("zip bomb" in reason for _, reason in report.rejected)
    summary = report.summary()
    assert "left out set/zeros00.png: unpacks to 1,048,576 bytes from 1,0" in summary
    assert sum(line.startswith("left out ") for line in summary.splitlines()) == workspace.MAX_LISTED
    assert "… and 10 more file(s) left out" in summary
    assert sorted(p.name for p in target.iterdir()) == ["a.png", "a.txt", "b.png"]  # no staging left behind


def test_zip_members_are_streamed_not_held_in_memory(tmp_path):
    """Members that compress not at all go to disk in 1 MiB chunks, one at a time: memory holds at most one
    member (the trainer's decode check reads one image), never the archive's 64 MiB."""
    archive = tmp_path / "photos.zip"
    noise = os.urandom(16 * 2**20)
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as handle:
        for i in range(4):
            handle.writestr(f"noise{i}.png", noise[i:] + noise[:i])
        handle.writestr("good.png", png_bytes())
    del noise
    report, peak = peak_memory(lambda: workspace.add_uploads([archive], tmp_path / "ws" / "1_x"))
    print(f"4 × 16 MiB members: peak {peak / 2**20:.1f} MiB traced")
    assert peak < 20 * 2**20
    assert [p.name for p in report.added] == ["good.png"] and len(report.rejected) == 4


def test_an_upload_larger_than_a_zip_may_unpack_to_is_refused_over_http(ws, monkeypatch):
    monkeypatch.setattr(workspace, "MAX_ZIP_TOTAL_BYTES", 1000)
    with served(ws) as (url, _):
        def upload(size: int) -> int:
            files = {"files": ("big.zip", b"x" * size, "application/zip")}
            return httpx.post(f"{url}/gradio_api/upload", files=files, timeout=30).status_code

        assert upload(900) == 200 and upload(5000) == 413


def test_the_browser_keeps_no_run_history(ws):
    """Gradio's run history would keep every call's inputs (the form, which the UI encrypts in its BrowserState) in
    the browser's localStorage in plain text, and rewrite that whole log on each call (a page reloaded after some
    use froze for a minute): it is off, and its page is not served."""
    with served(ws) as (url, _):
        assert httpx.get(f"{url}/config", timeout=30).json()["run_history"] is False
        assert httpx.get(f"{url}/gradio_api/runs", timeout=30).status_code == 404


def test_zip_members_with_other_compression_methods_are_skipped(tmp_path):
    archive = tmp_path / "bz.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("ok.png", png_bytes())
        handle.writestr(zipfile.ZipInfo("packed.png"), png_bytes("blue"), compress_type=zipfile.ZIP_BZIP2)
    report = workspace.add_uploads([archive], tmp_path / "ws" / "1_x")
    assert [p.name for p in report.added] == ["ok.png"]
    assert report.rejected == [("packed.png", report.rejected[0][1])] and "deflate" in report.rejected[0][1]


# ================================================================================================ item 5
@pytest.mark.slow
def test_wrong_logins_slow_down_per_client_over_http(ws):
    throttle = LoginThrottle(base=0.4, max_delay=1.6)
    with served(ws, auth=("admin", "right"), throttle=throttle) as (url, _):
        def login(password: str, client: str | None = None) -> tuple[int, float]:
            headers = {"X-Forwarded-For": client} if client else {}
            started = time.perf_counter()
            response = httpx.post(f"{url}/login", data={"username": "admin", "password": password}, headers=headers,
                                  timeout=60)
            return response.status_code, time.perf_counter() - started

        assert login("right")[0] == 200  # warm: the first request of a fresh server is slow
        timings = [login("wrong") for _ in range(5)]
        print("wrong logins:", ", ".join(f"{seconds:.2f} s" for _, seconds in timings))
        assert [status for status, _ in timings] == [400] * 5
        for (_, seconds), expected in zip(timings, (0.0, 0.4, 0.8, 1.6, 1.6)):  # doubling, then capped
            assert expected - 0.05 <= seconds < expected + 1.0
        status, seconds = login("wrong", client="10.0.0.7")  # another address does not wait behind this one
        assert status == 400 and seconds < 1.0 and throttle.clients["10.0.0.7"].failures == 1
        assert throttle.clients["127.0.0.1"].failures == 5
        waiting = throttle.delay("127.0.0.1")
        status, seconds = login("right")  # the right password still works, after the wait, and clears the count
        assert status == 200 and seconds >= waiting - 0.05 and throttle.delay("127.0.0.1") == 0

        # guesses in parallel from one address wait in line: 0 + 0.4 + 0.8 + 1.6 s at least
        results: list[tuple[int, float]] = []
        threads = [threading.Thread(target=lambda: results.append(login("wrong", client="10.0.0.9")))
                   for _ in range(4)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert [status for status, _ in results] == [400] * 4
        assert time.perf_counter() - started >= 2.75
        assert httpx.get(f"{url}/gradio_api/file={ws.outputs}/x", timeout=30).status_code in (401, 403)


def test_the_login_back_off_schedule_and_its_memory_bound():
    now = [1000.0]
    throttle = LoginThrottle(max_clients=100, clock=lambda: now[0])
    delays = []
    for _ in range(9):
        throttle.failed("1.2.3.4")
        delays.append(throttle.delay("1.2.3.4"))
    assert delays == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
    now[0] += 10
    assert throttle.delay("1.2.3.4") == 20
    now[0] += 2000  # long without a wrong login: forgotten
    throttle.client("1.2.3.4")
    assert throttle.delay("1.2.3.4") == 0
    for i in range(10_000):
        throttle.failed(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}")
    assert len(throttle.clients) == 100 and throttle.delay("10.0.39.15") == 0.5  # the newest are kept


# ================================================================================================ item 11
def test_the_address_shown_is_the_one_listened_on():
    message, warning = describe_address("0.0.0.0", 7000, auth=False)
    assert "all network interfaces (0.0.0.0, port 7000)" in message and "http://127.0.0.1:7000 on this machine" \
        in message and "from other machines" in message
    assert warning.startswith("warning: the UI listens beyond this machine (0.0.0.0:7000) without --auth")
    assert describe_address("0.0.0.0", 7000, auth=True)[1] is None
    assert describe_address("127.0.0.1", 7000, auth=False) == ("Rankwright web UI: http://127.0.0.1:7000", None)
    assert describe_address("localhost", 7000, auth=False)[1] is None
    message, warning = describe_address("::", 7000, auth=False)
    assert "http://[::1]:7000" in message and warning
    message, warning = describe_address("192.168.1.5", 7000, auth=False)
    assert message == "Rankwright web UI: http://192.168.1.5:7000" and "192.168.1.5:7000" in warning


@pytest.mark.slow
def test_app_on_all_interfaces_prints_where_it_listens_and_warns(tmp_path):
    port = free_port()
    server = subprocess.Popen([sys.executable, "app.py", "--host", "0.0.0.0", "--port", str(port), "--workspace",
                               str(tmp_path / "ws")], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    output: list[str] = []
    threading.Thread(target=lambda: output.extend(server.stdout), daemon=True).start()
    try:
        deadline = time.time() + 180
        while not any("warning:" in line for line in output):
            assert server.poll() is None and time.time() < deadline, "".join(output)
            time.sleep(0.2)
        text = "".join(output)
        assert f"listening on all network interfaces (0.0.0.0, port {port}): http://127.0.0.1:{port}" in text
        assert "without --auth" in text
        assert httpx.get(f"http://127.0.0.1:{port}/", timeout=30).status_code == 200
    finally:
        server.terminate()
        server.wait(30)
