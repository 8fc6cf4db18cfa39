"""The web UI's callbacks without a browser: uploads, captions, config ↔ form, estimates, the job runner."""

from __future__ import annotations

import json
import os
import stat
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import gradio as gr
import pytest
import torch
from PIL import Image
from ui_helpers import png_bytes, real_worker_ui, write

from methods.base import ConfigError
from trainer.config import TrainerConfig
from ui import form, pipelines, workspace
from ui.app import RankwrightUI, loss_frame, progress_html
from ui.jobs import JobBusy, JobError, JobRunner
from ui.workspace import WorkspaceError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # gr.Warning/gr.Info outside a request


@pytest.fixture
def ui(ws) -> RankwrightUI:
    return RankwrightUI(ws, preset_dirs=[ws.presets])


def tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


# ================================================================================================ uploads
@pytest.mark.parametrize(("name", "expected"), [
    ("../../etc/passwd.png", "passwd.png"),
    ("..\\..\\windows\\evil.PNG", "evil.png"),
    ("/abs/path/cat.jpg", "cat.jpg"),
    (".hidden.png", "hidden.png"),
    ("a b?<>|:*.png", "a b.png"),
    ("a?b.png", "a_b.png"),
    ("CON.png", "_CON.png"),
    ("", "file"),
    ("..", "file"),
    ("x" * 300 + ".png", "x" * 96 + ".png"),
    ("café\x00.png", "café.png"),
])
def test_sanitize_name(name, expected):
    assert workspace.sanitize_name(name) == expected


def test_uploads_never_overwrite_and_captions_follow_their_image(tmp_path):
    src = tmp_path / "src"
    first = write(src / "a" / "cat.png", png_bytes("red"))
    write(src / "a" / "cat.txt", "a red cat")
    second = write(src / "b" / "cat.png", png_bytes("blue"))
    write(src / "b" / "cat.txt", "a blue cat")
    jpg = tmp_path / "src" / "c" / "cat.jpg"
    jpg.parent.mkdir(parents=True)
    Image.new("RGB", (30, 30), "green").save(jpg)
    target = tmp_path / "data" / "1_cat"

    report = workspace.add_uploads([first, src / "a" / "cat.txt"], target)
    assert [p.name for p in report.added] == ["cat.png"] and not report.rejected
    report = workspace.add_uploads([second, src / "b" / "cat.txt"], target)
    assert [p.name for p in report.added] == ["cat-1.png"]
    assert report.renamed == [("cat.png", "cat-1.png")]
    report = workspace.add_uploads([jpg], target)  # same stem, other extension: would share cat.txt
    assert [p.name for p in report.added] == ["cat-2.jpg"]

    assert tree(target) == ["cat-1.png", "cat-1.txt", "cat-2.jpg", "cat.png", "cat.txt"]
    assert (target / "cat.png").read_bytes() == first.read_bytes()  # the first upload is untouched
    assert (target / "cat.txt").read_text().strip() == "a red cat"
    assert (target / "cat-1.txt").read_text().strip() == "a blue cat"
    assert not [p for p in target.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_names_with_folders_stay_inside_the_target(tmp_path):
    target = tmp_path / "data" / "1_x"
    target.mkdir(parents=True)
    report, stems = workspace.UploadReport(), {}
    upload = write(tmp_path / "upload" / "x.png", png_bytes())
    for name in ("../../evil.png", "/etc/evil2.png", ".."):
        workspace.store_image(workspace._Incoming(name, upload), target, report, stems)
    assert sorted(p.name for p in report.added) == ["evil.png", "evil2.png"]
    assert report.rejected == [("..", report.rejected[0][1])]
    assert tree(tmp_path) == ["data/1_x/evil.png", "data/1_x/evil2.png", "upload/x.png"]


def make_zip(path: Path, members: dict[str, bytes], symlink: str | None = None) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, "/etc/passwd")
    return path


def test_zip_members_cannot_escape(tmp_path):
    archive = make_zip(tmp_path / "upload.zip", {
        "../../escaped.png": png_bytes("red"),
        "/absolute.png": png_bytes("green"),
        "sub/../../../up.png": png_bytes("blue"),
        "set/img.png": png_bytes("white"),
        "set/img.txt": b"a white square",
        "__MACOSX/set/._img.png": b"resource fork",
        "set/.DS_Store": b"junk",
        "notes.md": b"# not an image",
    })
    target = tmp_path / "ws" / "data" / "1_x"
    report = workspace.add_uploads([archive], target)
    assert sorted(p.name for p in report.added) == ["absolute.png", "escaped.png", "img.png", "up.png"]
    assert [name for name, _ in report.rejected] == ["notes.md"]
    assert tree(tmp_path) == ["upload.zip", *(f"ws/data/1_x/{n}" for n in
                                             ["absolute.png", "escaped.png", "img.png", "img.txt", "up.png"])]
    assert (target / "img.txt").read_text().strip() == "a white square"


def test_zip_bombs_and_symlinks_are_refused(tmp_path, monkeypatch):
    target = tmp_path / "data" / "1_x"
    bomb = make_zip(tmp_path / "bomb.zip", {"zeros.png": b"\0" * (20 * 2**20)})
    report = workspace.add_uploads([bomb], target)
    assert not report.added and "zip bomb" in report.rejected[0][1]

    link = make_zip(tmp_path / "link.zip", {"ok.png": png_bytes()}, symlink="passwd.png")
    report = workspace.add_uploads([link], target)  # the link is skipped, the image beside it kept
    assert [p.name for p in report.added] == ["ok.png"] and report.rejected[0][0] == "passwd.png"
    assert "symbolic link" in report.rejected[0][1] and not (target / "passwd.png").exists()
    (target / "ok.png").unlink()

    monkeypatch.setattr(workspace, "MAX_ZIP_MEMBERS", 3)
    many = make_zip(tmp_path / "many.zip", {f"{i}.png": png_bytes() for i in range(5)})
    report = workspace.add_uploads([many], target)
    assert not report.added and "too many files" in report.rejected[0][1]

    monkeypatch.setattr(workspace, "MAX_ZIP_TOTAL_BYTES", 1000)
    big = make_zip(tmp_path / "big.zip", {"a.png": png_bytes(size=(300, 300)) + b"\0" * 2000})
    report = workspace.add_uploads([big], target)
    assert not report.added and "unpacks to" in report.rejected[0][1]

    broken = write(tmp_path / "broken.zip", b"PK\x03\x04 this is not a zip")
    report = workspace.add_uploads([broken], target)
    assert "not a readable zip" in report.rejected[0][1]
    assert not target.exists() or not any(target.iterdir())


def test_corrupt_uploads_are_reported_and_left_out(ui, ws, tmp_path):
    good = write(tmp_path / "good.png", png_bytes())
    truncated = write(tmp_path / "truncated.png", png_bytes(size=(200, 200))[:-60])
    garbage = write(tmp_path / "garbage.jpg", b"\xff\xd8\xff this is not really a jpeg")
    empty = write(tmp_path / "empty.png", b"")
    program = write(tmp_path / "setup.exe", b"MZ")
    orphan = write(tmp_path / "orphan.txt", "a caption without an image")
    result = ui.upload([str(p) for p in (good, truncated, garbage, empty, program, orphan)],
                       str(ws.default_dataset()), "thing", 3)
    cleared, report, gallery, paths, _, summary = result
    assert cleared is None
    assert "1 image(s) added" in report
    for name in ("truncated.png", "garbage.jpg", "empty.png", "setup.exe", "orphan.txt"):
        assert f"left out {name}:" in report
    assert "truncated" in report and "not an image file" in report and "empty file" in report
    folder = ws.default_dataset() / "3_thing"
    assert tree(folder) == ["good.png"]
    assert [Path(p).name for p in paths] == ["good.png"] and len(gallery) == 1
    assert "1 usable image(s)" in summary and "`3_thing`: 1 image(s) × 3 repeat(s)" in summary


def test_dataset_view_lists_files_the_trainer_would_skip(ui, ws):
    folder = ws.datasets / "disk_dataset"
    write(folder / "5_dog" / "a.png", png_bytes())
    write(folder / "5_dog" / "a.txt", "a dog")
    write(folder / "5_dog" / "broken.png", b"not a png")
    write(folder / "root.png", png_bytes("blue"))
    gallery, paths, concepts, summary = ui.dataset_view(str(folder))
    assert sorted(Path(p).name for p in paths) == ["a.png", "root.png"]
    assert concepts["choices"] == [("dog", "dog")] or concepts["choices"] == ["dog"]
    assert "Left out (1)" in summary and "broken.png" in summary and "not an image file" in summary
    assert any(label == "a dog" for _, label in gallery)
    _, _, _, missing = ui.dataset_view("nowhere")
    assert "does not exist" in missing


def test_gallery_shows_cached_thumbnails_and_checks_each_file_once(ui, ws, monkeypatch):
    folder = ws.datasets / "big"
    write(folder / "1_x" / "large.png", png_bytes(size=(1200, 900)))
    write(folder / "1_x" / "latin1.png", png_bytes())
    write(folder / "1_x" / "latin1.txt", "caf\xe9".encode("latin-1"))
    calls = []
    real = workspace.image_problem
    monkeypatch.setattr(workspace, "image_problem", lambda *a: calls.append(a[0].name) or real(*a))
    gallery, paths, _, summary = ui.dataset_view(str(folder))
    assert "latin1.png`: caption file latin1.txt is not UTF-8" in summary  # the trainer would skip it
    assert [Path(p).name for p in paths] == ["large.png"]
    thumb = Path(gallery[0][0])
    assert thumb.is_relative_to(ws.thumbnails) and max(Image.open(thumb).size) == 256
    assert ui.dataset_view(str(folder))[0] == gallery and sorted(calls) == ["large.png", "latin1.png"]
    write(folder / "1_x" / "latin1.txt", "café")  # fixed: checked again, now usable
    _, paths, _, summary = ui.dataset_view(str(folder))
    assert len(paths) == 2 and "Left out" not in summary and calls.count("latin1.png") == 2


def test_the_gallery_follows_the_trainers_folder_rules(ws):
    """The UI lists what trainer.dataset would train on (its own rules: N_name repeats, image extensions, loss
    masks, hidden files, the caption's first line), not a copy of them."""
    from trainer.config import DatasetSection
    from trainer.dataset import scan_dataset

    folder = ws.datasets / "rules"
    write(folder / "3_dog" / "a.PNG", png_bytes())
    write(folder / "3_dog" / "a.txt", "first line\n\nsecond line")
    write(folder / "3_dog" / "a_mask.png", png_bytes("white"))
    write(folder / "3_dog" / ".hidden.png", png_bytes())
    write(folder / "3_dog" / "notes.md", "not an image")
    write(folder / "cat" / "b.webp", png_bytes("blue"))
    write(folder / "root.jpg", png_bytes("green"))
    scan = scan_dataset(DatasetSection(dir=str(folder)))
    images = workspace.list_images(folder)
    assert {i.path: i.caption for i in images} == {item.path: item.caption for item in scan.items}
    assert {i.path.name for i in images} == {"a.PNG", "b.webp", "root.jpg"}
    concepts = {c.folder: c.repeats for c in workspace.list_concepts(folder)}
    assert concepts == {name: info["n_repeats"] for name, info in scan.dataset_dirs.items() if name != "rules"}


# ================================================================================================ captions
@pytest.fixture
def dataset(ws) -> Path:
    folder = ws.default_dataset()
    for name, caption in (("a", "a photo of a dog"), ("b", "dog on grass"), ("c", None)):
        write(folder / "1_dog" / f"{name}.png", png_bytes())
        if caption is not None:
            write(folder / "1_dog" / f"{name}.txt", caption)
    return folder


def test_caption_edit(ui, dataset):
    image = dataset / "1_dog" / "c.png"
    status, *_ = ui.save_caption(str(dataset), str(image), "a sleeping dog\nsecond line")
    assert "Caption saved" in status
    assert (dataset / "1_dog" / "c.txt").read_text() == "a sleeping dog second line\n"
    assert workspace.read_caption(image) == "a sleeping dog second line"
    for outside in ("/etc/passwd", str(dataset / ".." / "other.png"), str(dataset / "1_dog" / "a.txt"), ""):
        with pytest.raises(WorkspaceError):
            ui.save_caption(str(dataset), outside, "x")
    # through the guard (as wired in the app) the mistake becomes a message, not an exception
    result = ui.guard(ui.save_caption, 5, 0)(str(dataset), "/etc/passwd", "x")
    assert result[0].startswith("⚠️") and "not an image of the dataset" in result[0]


def test_trigger_word_and_find_replace(ui, dataset):
    status, caption, *_ = ui.add_trigger(str(dataset), " zqdog ", ".txt", str(dataset / "1_dog" / "b.png"))
    assert "to 3 caption(s)" in status and caption == "zqdog, dog on grass"  # the caption box follows
    captions = {p.stem: workspace.read_caption(p) for p in sorted((dataset / "1_dog").glob("*.png"))}
    assert captions == {"a": "zqdog, a photo of a dog", "b": "zqdog, dog on grass", "c": "zqdog"}
    status, *_ = ui.add_trigger(str(dataset), "zqdog")
    assert "to 0 caption(s)" in status  # idempotent
    status, *_ = ui.find_replace(str(dataset), "dog", "puppy")
    assert "in 3 caption(s)" in status
    assert workspace.read_caption(dataset / "1_dog" / "b.png") == "zqpuppy, puppy on grass"
    with pytest.raises(WorkspaceError):
        ui.find_replace(str(dataset), "", "x")


def test_set_repeats_renames_the_concept_folder(ui, dataset, tmp_path):
    status, gallery, paths, concepts, summary = ui.set_repeats(str(dataset), "dog", 7)
    assert "`1_dog` → `7_dog`" in status
    assert (dataset / "7_dog" / "a.png").is_file() and not (dataset / "1_dog").exists()
    assert "× 7 repeat(s)" in summary and len(paths) == 3
    from trainer.config import DatasetSection
    from trainer.dataset import scan_dataset

    assert scan_dataset(DatasetSection(dir=str(dataset))).num_train_images == 21
    with pytest.raises(WorkspaceError):
        ui.set_repeats(str(dataset), "cat", 2)
    with pytest.raises(WorkspaceError):
        ui.set_repeats(str(dataset), "dog", 0)
    # uploads for "dog" go into the existing 7_dog folder, whatever the repeats box says
    extra = write(tmp_path / "d.png", png_bytes())
    ui.upload([str(extra)], str(dataset), "dog", 2)
    assert (dataset / "7_dog" / "d.png").is_file() and not (dataset / "2_dog").exists()


# ================================================================================================ config ↔ form
METHOD_OPTIONS = {
    "lora": {"rank": 8, "alpha": 4.0, "dora": True, "conv_rank": 4},
    "loha": {"rank": 4, "use_tucker": True, "rank_dropout": 0.1},
    "lokr": {"rank": 4, "factor": 8, "decompose_both": True},
    "oft": {"block_size": 8, "constraint": 0.001, "rescale": True},
    "boft": {"block_size": 4, "boft_m": 2},
}


@pytest.mark.parametrize("method", sorted(METHOD_OPTIONS))
def test_config_form_round_trip(method, tmp_path):
    data = {
        "model": {"base": str(tmp_path / "model"), "arch": "sd1", "vae_fp32": False},
        "dataset": {"dir": str(tmp_path / "data"), "resolution": 64, "trigger_word": "zq", "flip": True,
                    "caption_dropout": 0.05},
        "network": {"method": method, "preset": "full", "text_encoder_preset": "none",
                    "exclude": ["time_emb", "conv_out"], **METHOD_OPTIONS[method]},
        "train": {"max_steps": 7, "learning_rate": 3e-4, "optimizer": "lion", "optimizer_args": {"betas": [0.9, 0.99]},
                  "scheduler": "cosine", "warmup_steps": 2, "min_snr_gamma": 5.0},
        "sample": {"every_n_steps": 3, "prompts": ["zq a dog", "zq, a cat"], "negative_prompt": "blurry"},
        "output": {"dir": str(tmp_path / "out"), "name": "roundtrip", "save_dtype": "bf16", "author": "me"},
    }
    config = TrainerConfig.from_dict(data)
    values = form.config_to_values(config)
    assert set(values) == {f.key for f in form.all_fields()}
    again = form.values_to_config(values)
    # every value the user wrote survives; the method's other options appear with their defaults
    assert again.method_config() == config.method_config()
    for section in ("model", "dataset", "train", "sample", "output"):
        assert getattr(again, section) == getattr(config, section)
    # a TOML written by the UI reads back to the same form and the same bytes, also through the CLI's loader
    text = again.to_toml()
    path = tmp_path / "ui.toml"
    path.write_text(text)
    loaded = TrainerConfig.load(path)
    assert loaded == again
    assert form.values_to_config(form.config_to_values(loaded)).to_toml() == text
    assert form.toml_to_values(text) == form.config_to_values(again)


def test_form_values_as_gradio_sends_them(ui):
    """Numbers arrive as floats, optional numbers as None, lists as text; other methods' options are ignored."""
    values = form.config_to_values(ui.default_config())
    values.update({"train.max_steps": 12.0, "network.method": "lokr", "network.lokr.factor": 4.0,
                   "network.lokr.alpha": "", "network.lokr.conv_rank": "0", "network.lora.rank": 999,
                   "sample.prompts": "one\n\n two \n",
                   "network.include": "", "train.optimizer_args": "betas = [0.9, 0.95]\neps = 1e-8"})
    config = form.values_to_config(values)
    assert config.train.max_steps == 12 and isinstance(config.train.max_steps, int)
    assert config.network.method == "lokr" and config.network.options["factor"] == 4
    # optional numbers are text boxes: empty = not set (None), "0" = 0 (conv_rank 0: no k×k conv adapters)
    assert "alpha" not in config.network.options and config.network.options["conv_rank"] == 0
    assert config.network.options["rank"] == 16
    assert config.sample.prompts == ["one", "two"] and config.network.include == []
    assert config.train.optimizer_args == {"betas": [0.9, 0.95], "eps": 1e-8}


@pytest.mark.parametrize(("key", "value", "message"), [
    ("train.max_steps", 2.5, "whole number"),
    ("train.max_steps", None, "give a number"),
    ("network.method", "nonsense", "unknown adapter method"),
    ("train.optimizer", "adamw9000", "train.optimizer"),
    ("dataset.resolution", 100, "multiple of 8"),
    ("train.optimizer_args", "betas = [", "not valid TOML"),
    ("network.lora.rank", "many", "not a number"),
    ("network.exclude", "([unclosed", "regular expression"),
])
def test_bad_values_give_clear_messages(ui, key, value, message):
    values = form.config_to_values(ui.default_config())
    values[key] = value
    with pytest.raises(ConfigError, match=message):
        form.values_to_config(values)
    outputs = ui.guard(ui.start, 2, 0)(*ui.ordered(values))  # as wired: a message, no job, no crash
    assert outputs[0].startswith("⚠️") and message.split()[0] in outputs[0]
    assert ui.runner.current() is None


def test_every_config_key_and_method_option_is_in_the_form():
    keys = {f.key for f in form.all_fields()}
    for section, table in TrainerConfig().to_dict().items():
        for name in table:
            if section == "network" and name not in ("method", "preset", "text_encoder_preset", "include",
                                                     "exclude", "init_from"):
                continue
            assert f"{section}.{name}" in keys
    from methods.registry import available_methods

    assert {"lora", "loha", "lokr", "oft", "boft"} <= set(form.method_fields()) == set(available_methods())
    assert all(form.method_description(m) for m in available_methods())


def test_presets_and_toml_keep_the_folders_they_do_not_set(ui, ws, tmp_path):
    values = form.config_to_values(ui.default_config())
    values["model.base"] = str(tmp_path / "my_model")
    args = ui.ordered(values)
    preset = write(ws.presets / "fast.toml", '[train]\nmax_steps = 5\n[network]\nmethod = "oft"\nblock_size = 8\n'
                   '[dataset]\ndir = "data/elsewhere"\n')
    assert (("workspace: fast.toml", str(preset))) in ui.preset_choices()
    *loaded, message = ui.load_preset(str(preset), *args)
    got = ui.values(tuple(loaded))
    assert "fast.toml" in message
    assert got["train.max_steps"] == 5 and got["network.method"] == "oft" and got["network.oft.block_size"] == "8"
    assert got["model.base"] == str(tmp_path / "my_model")
    assert got["dataset.dir"] == str(ws.default_dataset()) and got["output.dir"] == str(ws.outputs)

    text, command, choices, status = ui.save_preset("my preset!", *loaded)
    saved = ws.presets / "my preset.toml"
    assert saved.read_text().strip() == text.strip() and str(saved) in command
    assert command.startswith("python -m trainer train --config ")
    assert TrainerConfig.load(saved).to_toml() == text
    assert ui.values(tuple(ui.apply_toml(text, *args)[:-1])) == got

    demo = tmp_path / "demo_data"
    demo.mkdir()
    bundled = write(ws.presets / "demo.toml", f'[dataset]\ndir = "{demo}"\n[output]\ndir = "elsewhere"\n')
    got_demo = ui.values(tuple(ui.load_preset(str(bundled), *args)[:-1]))
    assert got_demo["dataset.dir"] == str(demo) and got_demo["output.dir"] == str(ws.outputs)  # its own dataset

    applied = ui.values(tuple(ui.apply_toml('[dataset]\ndir = "data/elsewhere"', *args)[:-1]))
    assert applied["dataset.dir"] == "data/elsewhere" and applied["model.base"] == str(tmp_path / "my_model")
    assert applied["train.max_steps"] == TrainerConfig().train.max_steps  # the TOML is the whole config

    toml_text, cli, status = ui.show_toml(*loaded)
    assert toml_text == text and Path(cli.split("--config ")[1].strip("'")).read_text().strip() == text.strip()
    with pytest.raises(ConfigError):
        ui.apply_toml("[train]\nmax_steps = 'many'", *args)
    with pytest.raises(ConfigError):
        ui.apply_toml("not toml at all [", *args)


# ================================================================================================ estimates
def test_parameter_count_and_file_size_match_a_real_save(tiny_pipeline, tmp_path):
    from methods.apply import create_network, save_network

    pipe = tiny_pipeline("sd1")
    for method, options in (("lora", {"rank": 4}), ("loha", {"rank": 2}), ("lokr", {"rank": 4, "factor": 4}),
                            ("oft", {"block_size": 8}), ("boft", {"block_size": 4})):
        config = TrainerConfig.from_dict({"network": {"method": method, **options, "preset": "full"}})
        estimate = pipelines.estimate(config, pipe=pipe)
        network = create_network(pipe, method, options, config.target_config())
        path = save_network(network, tmp_path / f"{method}.safetensors", dtype="fp16")
        network.detach()
        assert estimate.parameters == network.trainable_parameter_count()
        assert estimate.modules == network.counts()
        assert abs(estimate.file_bytes - path.stat().st_size) / path.stat().st_size < 0.25, method
        assert "detected SD1.x" in estimate.text()


def test_estimate_for_real_size_models_on_the_meta_device(ui):
    values = form.config_to_values(ui.default_config())
    values.update({"network.method": "lora", "network.lora.rank": 16, "network.preset": "attention_mlp"})
    text = ui.estimate(*ui.ordered(values))
    assert "**9,437,184** trainable parameters" in text  # kohya's SD1.5 rank-16 LoRA: 18.9 MB of fp16 weights
    assert 18.9 <= float(text.split("file ≈ **")[1].split(" MB")[0]) <= 19.2
    values["output.save_dtype"] = "fp32"
    assert 37.7 <= float(ui.estimate(*ui.ordered(values)).split("file ≈ **")[1].split(" MB")[0]) <= 38.0
    values["train.train_text_encoder"] = False
    assert "te " not in ui.estimate(*ui.ordered(values)).split("modules:")[1].split("·")[0]
    values["network.lora.rank"] = -3
    assert ui.estimate(*ui.ordered(values)).startswith("⚠️")


def test_method_change_shows_its_options_and_description(ui):
    updates = ui.method_changed("lokr")
    assert [u["visible"] for u in updates[:-1]] == [m == "lokr" for m in ui.methods]
    assert "Kronecker" in updates[-1]


# ================================================================================================ job runner
FAKE_WORKER = textwrap.dedent('''
    """Stands in for ui.worker: writes trainer-like events; honours the STOP file; exits as told by the config."""
    import json, sys, time, tomllib
    from pathlib import Path

    config = tomllib.loads(Path(sys.argv[1]).read_text())
    out = Path(config["output"]["dir"]); name = config["output"]["name"]
    total = config["train"]["max_steps"]
    delay = float(config["output"]["description"] or 0.05)
    events = out / "events.jsonl"
    def emit(kind, **fields):
        with events.open("a") as stream:
            stream.write(json.dumps({"event": kind, "time": time.time(), **fields}) + "\\n")
    if config["output"]["title"] == "crash":
        print("Traceback: something broke badly", flush=True); sys.exit(3)
    spec_path = Path(sys.argv[2]) / "compare.json"
    if spec_path.exists():  # a method comparison: one short run per method, then a report, as trainer.compare
        spec = json.loads(spec_path.read_text()); out = Path(spec["out_dir"]); events = out / "events.jsonl"
        methods = spec["methods"]; rows = [{"method": "base model", "prior drift": "0 (reference)"}]
        emit("compare_start", methods=methods, folder=str(out), base="tiny", steps=total)
        for index, method in enumerate(methods):
            emit("compare_method_start", method=method, index=index, count=len(methods), dropped_options=[],
                 overrides={})
            stopped = False
            for step in range(1, total + 1):
                time.sleep(delay)
                emit("step", method=method, step=step, total=total, loss=1.0 / step, lr=1e-4, its=10.0,
                     eta_seconds=0.0)
                stopped = (out / "STOP").exists()
                if stopped:
                    emit("stopping", method=method, step=step, reason="stop file STOP found")
                    break
            emit("done", method=method, step=step, output="x", stopped=stopped)
            rows.append({"method": method, "prior drift": "—" if stopped else f"{0.1 * (index + 1):.3f}"})
            emit("compare_method_done", method=method, status="stopped" if stopped else "done", index=index,
                 count=len(methods), row=rows[-1], message="")
            if stopped:
                break
        emit("compare_render", row="base", index=0, total=len(rows))
        from PIL import Image
        grid = out / "grid.png"; Image.new("RGB", (40, 16 * len(rows))).save(grid)
        (out / "report.md").write_text("# Method comparison\\n"); (out / "report.json").write_text("{}")
        emit("compare_done", report=str(out / "report.json"), markdown=str(out / "report.md"), grid=str(grid),
             loss_plot=None, stopped=stopped, table=rows)
        sys.exit(0)
    (out / "STOP").unlink(missing_ok=True)  # the trainer clears a stale STOP when it starts
    emit("start", config=config)
    time.sleep(delay)
    emit("ready", seconds=0.1, method="lora", modules={"lora_unet": 2}, trainable_parameters=10, images=3,
         total_steps=total, device="cpu")
    for step in range(1, total + 1):
        time.sleep(delay)
        emit("step", step=step, total=total, loss=1.0 / step, lr=1e-4, its=10.0, eta_seconds=(total - step) * 0.1)
        if (out / "STOP").exists():
            emit("stopping", step=step, reason="stop file STOP found")
            path = out / f"{name}-step{step:06d}.safetensors"; path.write_bytes(b"x")
            emit("save", step=step, path=str(path), final=False, size_bytes=1, check_ok=True)
            emit("done", step=step, output=str(path), stopped=True)
            sys.exit(0)
    path = out / f"{name}.safetensors"; path.write_bytes(b"x")
    emit("save", step=total, path=str(path), final=True, size_bytes=1, check_ok=True)
    emit("done", step=total, output=str(path), stopped=False)
''')


@pytest.fixture
def fake_runner(ws, tmp_path):
    script = write(tmp_path / "fake_worker.py", FAKE_WORKER)
    runners = []

    def make() -> JobRunner:
        runner = JobRunner(ws.jobs, command=lambda config, folder: [sys.executable, str(script), str(config),
                                                                    str(folder)])
        runners.append(runner)
        return runner

    yield make
    for runner in runners:
        runner.kill()


def fake_config(ws, steps=5, delay=0.05, name="fake", title="", **sections) -> TrainerConfig:
    return TrainerConfig.from_dict({"dataset": {"dir": str(ws.default_dataset())},
                                    "train": {"max_steps": steps},
                                    "output": {"dir": str(ws.outputs), "name": name, "description": str(delay),
                                               "title": title}, **sections})


def wait_for(predicate, timeout=60.0, interval=0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("timed out")


def test_job_runs_to_the_end(fake_runner, ws):
    runner = fake_runner()
    record = runner.start(fake_config(ws, steps=4))
    view = wait_for(lambda: (v := runner.view(record)).finished and v)
    assert view.status == "done" and view.step == 4 and view.total == 4 and view.fraction == 1.0
    assert view.losses == [(1, 1.0), (2, 0.5), (3, 1 / 3), (4, 0.25)]
    assert [Path(s["path"]).name for s in view.saves] == ["fake.safetensors"]
    assert "done after 4 steps" in "\n".join(view.log)
    wait_for(lambda: not runner.is_running(record))  # the process ends right after its last event
    assert Path(record.config_path).read_text() == fake_config(ws, steps=4).to_toml()


def test_second_start_is_refused_while_a_job_runs(fake_runner, ws):
    runner = fake_runner()
    record = runner.start(fake_config(ws, steps=400, delay=0.05))
    with pytest.raises(JobBusy, match="already running"):
        runner.start(fake_config(ws, name="other"))
    with pytest.raises(JobBusy):  # also for another runner on the same workspace (another server, a restart)
        fake_runner().start(fake_config(ws, name="other"))
    runner.kill(record)
    wait_for(lambda: not runner.is_running(record))
    second = runner.start(fake_config(ws, name="other", steps=1))
    assert second.id != record.id and runner.current().id == second.id


def test_start_while_a_job_runs_queues_it(ws, fake_runner):
    """Start during a run queues the job (issue 13, item 7): positions, reorder, remove, one at a time, and the
    queue lives in the workspace (a new runner — a restarted server — sees it and carries on)."""
    ui = RankwrightUI(ws, runner=fake_runner(), preset_dirs=[])
    ws.default_dataset().mkdir(parents=True)
    values = form.config_to_values(fake_config(ws, steps=400, delay=0.05))
    start = ui.guard(ui.start, 2, 0)
    assert start(*ui.ordered(values))[0].startswith("Started job")
    first = ui.runner.current()
    assert start(*ui.ordered(values))[0].startswith("⚠️ job")  # the same output file as the running job
    for name in ("second", "third"):
        values["output.name"] = name
        message, _ = start(*ui.ordered(values))
        assert message.startswith("Queued job") and f"{name}.safetensors" in message
    assert "at position 2" in message and ui.runner.current().id == first.id
    assert start(*ui.ordered(values))[0].startswith("⚠️ job")  # "third" is already queued
    queued = ui.runner.queue()
    assert [r.output_name for r in queued] == ["second", "third"] and len(ui.runner.history()) == 1
    assert json.loads((ws.jobs / "queue.json").read_text())["ids"] == [r.id for r in queued]
    table, choices, _ = ui.poll_queue({})
    assert f"| 1 | `{queued[0].id}` | training job | second |" in table and f"| 2 | `{queued[1].id}` |" in table
    assert [value for _, value in choices["choices"]] == [r.id for r in queued]
    assert "position 1" in ui.queue_move(queued[1].id, -1)
    assert [r.output_name for r in fake_runner().queue()] == ["third", "second"]  # as another server sees it
    assert "Removed" in ui.queue_remove(queued[0].id) and not Path(queued[0].folder).exists()
    assert ui.guard(ui.queue_remove, 1, 0)(queued[0].id).startswith("⚠️ that job is not in the queue")
    assert ui.runner.dispatch() is None  # one at a time: "first" still runs
    restarted = fake_runner()  # a new server on the same workspace takes over the queue
    ui.stop()
    wait_for(lambda: restarted.dispatch() or restarted.current().id != first.id, timeout=60)
    assert restarted.current().output_name == "third" and restarted.queue() == []
    assert wait_for(lambda: (v := ui.runner.view(first)).finished and v).status == "stopped"
    restarted.kill()


def test_stop_writes_the_stop_file_and_the_run_ends_with_a_save(fake_runner, ws):
    runner = fake_runner()
    with pytest.raises(JobError, match="No training job"):
        runner.stop()
    record = runner.start(fake_config(ws, steps=400, delay=0.05))
    wait_for(lambda: runner.view(record).step >= 2)
    runner.stop()
    assert record.stop_path.read_text().startswith("stop requested")
    view = wait_for(lambda: (v := runner.view(record)).finished and v)
    assert view.status == "stopped" and 2 <= view.step < 400
    assert Path(view.output).name.startswith("fake-step") and Path(view.output).is_file()
    assert "stopping at step" in "\n".join(view.log)


def test_stop_before_the_trainer_starts_is_repeated(fake_runner, ws):
    """The trainer deletes a stale STOP file when it starts; a stop requested earlier must still land."""
    runner = fake_runner()
    record = runner.start(fake_config(ws, steps=400, delay=0.3))
    runner.stop()  # the worker has not started yet: it will delete this STOP file
    view = wait_for(lambda: (v := runner.view(record)).finished and v)
    assert view.status == "stopped" and view.step < 400


def test_reattach_from_disk(fake_runner, ws):
    """A reloaded page or a restarted server finds the running job and its whole history in the workspace."""
    first = fake_runner()
    record = first.start(fake_config(ws, steps=400, delay=0.05))
    wait_for(lambda: first.view(record).step >= 3)
    second = fake_runner()  # nothing shared with the first runner but the workspace folder
    again = second.current()
    assert again is not None and again.id == record.id and again.pid == record.pid
    assert second.is_running(again)
    view = wait_for(lambda: (v := second.view(again)).step >= 3 and v)
    assert view.losses[:3] == [(1, 1.0), (2, 0.5), (3, 1 / 3)] and view.status == "training"
    second.stop()
    assert wait_for(lambda: (v := first.view(record)).finished and v).status == "stopped"
    assert wait_for(lambda: (v := second.view(again)).finished and v).status == "stopped"


def test_events_of_earlier_runs_in_the_same_folder_are_not_shown(fake_runner, ws):
    runner = fake_runner()
    first = runner.start(fake_config(ws, steps=3))
    wait_for(lambda: runner.view(first).finished)
    second = runner.start(fake_config(ws, steps=2, name="again"))
    view = wait_for(lambda: (v := runner.view(second)).finished and v)
    assert second.events_offset > 0 and view.losses == [(1, 1.0), (2, 0.5)]
    assert [Path(s["path"]).name for s in view.saves] == ["again.safetensors"]


def test_existing_output_is_refused_before_starting(fake_runner, ws):
    runner = fake_runner()
    write(ws.outputs / "taken.safetensors", b"x")
    with pytest.raises(JobError, match="already exists"):
        runner.start(fake_config(ws, name="taken"))
    assert runner.current() is None


def test_a_crashed_worker_is_reported(fake_runner, ws):
    runner = fake_runner()
    record = runner.start(fake_config(ws, title="crash"))
    view = wait_for(lambda: (v := runner.view(record)).finished and v)
    assert view.status == "error"
    assert "ended unexpectedly (exit code 3)" in view.error and "something broke badly" in view.error


def test_poll_renders_the_current_job(ws, fake_runner):
    ui = RankwrightUI(ws, runner=fake_runner(), preset_dirs=[])
    status, progress, plot, previews, log_text, files, compared, choices, runs, session = ui.poll({})
    assert status == "No training job yet." and files is None and compared is None and runs["choices"] == []
    assert ui.poll(session)[0] == {"__type__": "update"}  # nothing changed: nothing re-sent
    record = ui.runner.start(fake_config(ws, steps=3))
    wait_for(lambda: ui.runner.view(record).finished)
    status, progress, plot, previews, log_text, files, compared, choices, runs, session = ui.poll(session)
    assert "finished" in status and record.id in status
    assert "step 3/3" in progress and 'aria-valuenow="100"' in progress
    # a native plot: the raw and the smoothed loss per step (issue 13, item 9)
    assert plot.colors_in_legend == ["loss (raw)", "loss (smoothed)"]
    frame = loss_frame(ui.runner.view(record))
    assert list(frame.columns) == ["step", "loss", "series"]
    assert frame[frame.series == "loss (raw)"].loss.tolist() == [1.0, 0.5, 1 / 3]
    assert frame[frame.series == "loss (smoothed)"].loss.iloc[0] == 1.0  # debiased: no pull towards 0
    log_lines = log_text.splitlines()
    assert "done after 3 steps" in log_lines[0] and "started" in log_lines[-1]  # the newest line first
    assert [Path(f).name for f in files] == ["fake.safetensors"] and choices["value"] == files[0]
    assert choices["choices"] == [("outputs/fake.safetensors", files[0])] and compared is None
    assert all(value == {"__type__": "update"} for value in ui.poll(session)[:9])
    # the user's choice of adapter stays when new files appear (issue 13, item 2)
    other = ui.runner.start(fake_config(ws, steps=1, name="newer"))
    wait_for(lambda: ui.runner.view(other).finished)
    choices = ui.poll({}, files[0])[7]
    assert choices["value"] == files[0] and len(choices["choices"]) == 2
    log_plot = ui.replot(0.0, True)
    assert log_plot.colors_in_legend == ["loss"] and log_plot.y_title == "log10(loss)"
    assert loss_frame(ui.runner.view(other), 0.0, True).loss.tolist() == [0.0]  # one step: log10(1.0)
    assert "width:50.0%" in progress_html(0.5, "x")


# ================================================================================================ compare
def test_compare_runs_as_a_job_and_the_tab_shows_the_report(ws, fake_runner):
    ui = RankwrightUI(ws, runner=fake_runner(), preset_dirs=[])
    ws.default_dataset().mkdir(parents=True)
    status, progress, table, grid, plot, files, session = ui.poll_compare({})
    assert status == "No comparison yet." and table is grid is files is None
    values = form.config_to_values(fake_config(ws, steps=400, delay=0.01))
    values.update({"network.lora.rank": 8, "network.lokr.factor": 4, "network.oft.block_size": "4"})
    message, session = ui.compare(["lora", "lokr", "oft"], 3, "a red car\n\n a tree ", *ui.ordered(values))
    record = ui.runner.current()
    assert message.startswith(f"Started comparison `{record.id}`: lora, lokr, oft, 3 steps each")
    assert record.kind == "compare" and Path(record.output_dir) == ws.outputs / "fake-compare"
    spec = json.loads((Path(record.folder) / "compare.json").read_text())
    assert spec["methods"] == ["lora", "lokr", "oft"] and spec["drift_prompts"] == ["a red car", "a tree"]
    options = {method: spec["overrides"][method]["network.options"] for method in spec["methods"]}
    assert options["lora"]["rank"] == 8 and options["lokr"]["factor"] == 4 and options["oft"]["block_size"] == 4
    assert "rank" not in options["oft"]  # each method's own form group, as Start would train it
    assert TrainerConfig.load(record.config_path).train.max_steps == 3

    view = wait_for(lambda: (v := ui.runner.view(record)).finished and v)
    assert view.status == "done" and view.fraction == 1.0 and view.progress_text() == "3/3 methods trained"
    status, progress, table, grid, plot, files, session = ui.poll_compare(session)
    assert "finished" in status and record.id in status and "lora, lokr, oft" in status
    assert table["headers"] == ["method", "prior drift"]
    assert [row[0] for row in table["data"]] == ["base model", "lora", "lokr", "oft"]
    assert Path(grid).is_file() and plot.size == (720, 320)
    assert sorted(Path(f).name for f in files) == ["grid.png", "report.json", "report.md"]
    assert all(value == {"__type__": "update"} for value in ui.poll_compare(session)[:6])  # nothing new
    # the Training tab shows the comparison as the current job, its runs' files among the results
    assert "finished" in ui.poll({})[0]
    again = ui.compare(["lora"], None, "", *ui.ordered(values))[0]
    assert "fake-compare-1" in again  # a new folder: an earlier report is never replaced


def test_one_job_at_a_time_whether_training_or_comparing(ws, fake_runner):
    ui = RankwrightUI(ws, runner=fake_runner(), preset_dirs=[])
    ws.default_dataset().mkdir(parents=True)
    values = form.config_to_values(fake_config(ws, steps=400, delay=0.05))
    compare, start = ui.guard(ui.compare, 2, 0), ui.guard(ui.start, 2, 0)
    assert compare(["lora", "oft"], None, "", *ui.ordered(values))[0].startswith("Started comparison")
    assert start(*ui.ordered(values))[0].startswith("Queued job")  # training and comparing share the queue
    message = compare(["lora"], None, "", *ui.ordered(values))[0]
    assert message.startswith("Queued comparison") and "position 2" in message and "fake-compare-1" in message
    ui.stop()
    view = wait_for(lambda: (v := ui.runner.view(ui.runner.current())).finished and v)
    assert view.status == "stopped" and view.rows[-1]["method"] == "lora" and len(view.rows) == 2
    started = wait_for(lambda: ui.runner.dispatch())
    assert started.kind == "train" and [r.kind for r in ui.runner.queue()] == ["compare"]
    assert ui.runner.dispatch() is None  # the comparison waits for the training job
    assert compare(["nope"], None, "", *ui.ordered(values))[0].startswith("⚠️ unknown adapter method 'nope'")
    assert compare(["lora"], 2.5, "", *ui.ordered(values))[0].startswith("⚠️ steps per method must be a whole")
    assert len(ui.runner.history()) == 2 and len(ui.runner.queue()) == 1


def real_job_outcome(ui: RankwrightUI):
    """The view of the current (real worker) job once it finished successfully; the worker never outlives it."""
    record = ui.runner.current()
    try:
        view = wait_for(lambda: (v := ui.runner.view(record)).finished and v, timeout=300, interval=0.5)
    finally:
        ui.runner.kill(record)
    assert view.status == "done", "\n".join(view.log)
    return view


@pytest.mark.slow
def test_real_worker_compares_two_methods(ws, tiny_pipeline, tmp_path):
    """The real worker process (python -m ui.worker → trainer.compare.compare) on a tiny model, 2 steps each."""
    ui, values = real_worker_ui(ws, tiny_pipeline("sd1"), tmp_path, **{
        "network.oft.block_size": "4", "sample.steps": 2, "sample.prompts": "a red shape", "output.name": "real"})
    ui.compare(["lora", "oft"], 2, "a blue sky", *ui.ordered(values))
    view = real_job_outcome(ui)
    report = json.loads(Path(view.report["report"]).read_text())
    assert [(run["method"], run["status"], run["steps"]) for run in report["methods"]] == [("lora", "done", 2),
                                                                                         ("oft", "done", 2)]
    assert Image.open(view.report["grid"]).size[1] > 3 * 16 and len(view.rows) == 3


# ================================================================================================ results
def test_results_metadata_of_a_saved_adapter(ui, tiny_pipeline, tmp_path):
    from methods.apply import create_network, save_network

    pipe = tiny_pipeline("sd1")
    network = create_network(pipe, "loha", {"rank": 2})
    path = save_network(network, ui.ws.outputs / "adapter.safetensors", extra_metadata={"ss_steps": 12})
    summary, metadata = ui.adapter_info(str(path))
    assert "adapter.safetensors" in summary and "12 steps" in summary and "method **loha** · rank 2" in summary
    assert metadata["ss_steps"] == "12" and "ss_network_module" in metadata
    with pytest.raises(WorkspaceError):
        ui.adapter_info(str(write(ui.ws.outputs / "junk.safetensors", b"junk")))
    assert ui.adapter_info(None)[0] == "No adapter selected."


def test_results_refuse_an_adapter_holding_nan(ui, tiny_pipeline, ws):
    from methods.apply import create_network, save_network

    network = create_network(tiny_pipeline("sd1"), "lora", {"rank": 2})
    name = next(iter(network.adapters))
    with torch.no_grad():
        network.adapters[name].lora_up[0, 0] = float("nan")
    path = save_network(network, ws.outputs / "run" / "nan.safetensors")
    with pytest.raises(WorkspaceError, match=f"module {name} holds non-finite values"):
        ui.adapter_info(str(path))


def test_try_it_renders_with_and_without_the_adapter(ui, tiny_pipeline, randomize, tmp_path):
    from methods.apply import create_network, save_network

    pipe = tiny_pipeline("sd1")
    model = tmp_path / "model"
    pipe.save_pretrained(model)
    network = create_network(pipe, "lora", {"rank": 4})
    randomize(network, std=0.5)
    adapter = save_network(network, ui.ws.outputs / "a.safetensors")
    with_image, without_image, status = ui.try_it(str(model), "auto", "auto", "", str(adapter), "a red circle", 1.0,
                                                  7, 2, 32)
    assert with_image.size == without_image.size == (32, 32) and "seed 7" in status
    assert with_image.tobytes() != without_image.tobytes()
    again, _, _ = ui.try_it(str(model), "auto", "auto", "", str(adapter), "a red circle", 0.0, 7, 2, 32)
    assert again.tobytes() == without_image.tobytes()  # strength 0 = the base model, the same seed
    assert "Detected **SD1.x epsilon (diffusers folder)**" in ui.detect(str(model), "auto", "auto")
    for bad in (str(tmp_path / "missing.safetensors"), None):
        outputs = ui.guard(ui.try_it, 3, 2)(str(model), "auto", "auto", "", bad, "a", 1.0, 1, 1, 32)
        assert outputs[2].startswith("⚠️")
    assert ui.guard(ui.detect, 1, 0)(str(tmp_path / "nope"), "auto", "auto").startswith("⚠️")


# ================================================================================================ app
def test_app_arguments():
    from app import parse_args

    args = parse_args([])
    assert (args.host, args.port, args.auth, args.workspace) == ("127.0.0.1", 7860, None, "workspace")
    args = parse_args(["--host", "0.0.0.0", "--port", "9000", "--auth", "me:se:cret", "--workspace", "/tmp/w"])
    assert args.auth == ("me", "se:cret") and args.port == 9000
    for bad in (["--auth", "nopassword"], ["--auth", ":x"], ["--port", "0"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_the_app_builds_and_remembers_the_last_settings(ws, fake_runner):
    from ui.app import build_app

    ui = RankwrightUI(ws, runner=fake_runner(), preset_dirs=[])
    ws.default_dataset().mkdir(parents=True)
    demo, _ = build_app(ws, ui)
    assert demo is ui.demo
    values = form.config_to_values(fake_config(ws, steps=3, name="remembered"))
    ui.start(*ui.ordered(values))
    loaded = ui.on_load()
    assert ui.values(tuple(loaded[:len(ui.keys)]))["output.name"] == "remembered"
    assert json.loads((ws.jobs / "current.json").read_text())["id"] == ui.runner.current().id


def test_the_page_polls_once_per_tick_and_a_failing_poll_skips_only_its_outputs(ws, fake_runner, monkeypatch):
    """Every poll of the page (jobs, queue, checkpoints, captioning, report, try-it, compare) is one event per
    tick: each event costs the browser a pass over its outputs, and nine of them a second kept a core busy."""
    from ui.app import build_app

    ui = RankwrightUI(ws, runner=fake_runner(), preset_dirs=[])
    ws.default_dataset().mkdir(parents=True)

    def broken(session):
        raise RuntimeError("queue file unreadable")

    monkeypatch.setattr(ui, "poll_queue", broken)
    demo, _ = build_app(ws, ui)
    (tick,) = [f for f in demo.fns.values() if any(event == "tick" for _, event in f.targets)]
    sent = tick.fn(*(component.value for component in tick.inputs))
    assert len(sent) == len(tick.outputs)
    queue_table = next(i for i, c in enumerate(tick.outputs) if c.elem_id == "queue-table")
    assert sent[queue_table] == gr.skip() and sent[queue_table + 1] == gr.skip()
    assert any(value != gr.skip() for value in sent)  # the other polls still sent their first values


@pytest.mark.slow
def test_real_worker_trains_and_the_file_reloads(ws, tiny_pipeline, tmp_path):
    """The real worker process (python -m ui.worker → trainer.loop.train) on a tiny model, 2 steps."""
    from methods.apply import apply_adapter

    pipe = tiny_pipeline("sd1")
    pipe.save_pretrained(tmp_path / "model")
    ui = RankwrightUI(ws, preset_dirs=[])
    folder = ws.default_dataset()
    ui.upload([str(write(tmp_path / f"{c}.png", png_bytes(c, (64, 64)))) for c in ("red", "green")],
              str(folder), "shape", 1)
    values = form.config_to_values(ui.default_config())
    values.update({"model.base": str(tmp_path / "model"), "dataset.resolution": 32, "dataset.min_bucket_side": 32,
                   "dataset.max_bucket_side": 64, "dataset.bucket_step": 8, "train.max_steps": 2,
                   "output.tensorboard": False, "network.method": "lokr", "network.lokr.rank": 2,
                   "network.lokr.factor": 4, "output.name": "real"})
    message, _ = ui.start(*ui.ordered(values))
    view = real_job_outcome(ui)
    assert view.step == 2 and len(view.losses) == 2 and view.saves[-1]["check_ok"]
    handle = apply_adapter(pipe, view.output, 1.0)
    assert len(handle.network) == view.summary["modules"]["lora_unet"] + view.summary["modules"]["lora_te"]
    handle.remove()
    assert os.path.basename(view.output) == "real.safetensors"


def test_a_first_start_opens_the_toy_demo(ws):
    """No remembered settings: the embedded toy model and a workspace copy of its demo dataset are preselected."""
    from ui.jobs import PROJECT_ROOT

    ui = RankwrightUI(ws, preset_dirs=[])
    config = ui.initial_config()
    assert config.model.base == str(PROJECT_ROOT / "presets" / "toy" / "model")
    assert config.dataset.dir == str(ws.datasets / "toy_demo") and config.output.dir == str(ws.outputs)
    assert config.dataset.resolution == 64 and config.sample.prompts
    copied = sorted(p.relative_to(ws.datasets / "toy_demo") for p in (ws.datasets / "toy_demo").rglob("*.png"))
    original = sorted(p.relative_to(PROJECT_ROOT / "presets" / "toy" / "data")
                      for p in (PROJECT_ROOT / "presets" / "toy" / "data").rglob("*.png"))
    assert copied == original and len(copied) == 12
    values = ui.on_load()
    assert "12 usable image(s)" in values[len(ui.keys) + 3]
    # the user's edits to the copy survive: it is never copied again
    caption = next((ws.datasets / "toy_demo").rglob("*.txt"))
    caption.write_text("edited")
    ui.initial_config()
    assert caption.read_text() == "edited"


def test_previews_show_the_newest_step_first():
    from ui.app import newest_first

    shown = newest_first(["/o/s/step000050_0.png", "/o/s/step000050_1.png", "/o/s/step000100_0.png",
                          "/o/s/step000100_1.png", "/o/s/final_0.png"])
    assert shown == ["/o/s/final_0.png", "/o/s/step000100_0.png", "/o/s/step000100_1.png",
                     "/o/s/step000050_0.png", "/o/s/step000050_1.png"]
