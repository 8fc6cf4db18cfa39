"""Issue 13's workflow, callback by callback (no browser): Try it (labelled, sized, cancellable), the form kept per
browser, estimates before Detect, auto-captioning, the dataset report, continuing a run, field labels and the
effective values of empty fields, the GPU-memory estimate, and results apart from comparisons."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
from caption_helpers import build_tiny_blip
from PIL import Image
from ui_helpers import png_bytes, real_worker_ui, write

from trainer.config import TrainerConfig
from ui import estimates, form
from ui.app import RankwrightUI
from ui.jobs import PROJECT_ROOT, JobError, JobRunner
from ui.views import JobView
from ui.workspace import Workspace, WorkspaceError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # gr.Warning/gr.Info outside a request


def idle_runner(ws: Workspace) -> JobRunner:
    return JobRunner(ws.jobs, command=lambda config, folder: [sys.executable, "-c", "pass"])


@pytest.fixture
def ui(ws) -> RankwrightUI:
    return RankwrightUI(ws, runner=idle_runner(ws), preset_dirs=[PROJECT_ROOT / "presets", ws.presets])


def wait_task(slot, timeout: float = 300.0):
    deadline = time.time() + timeout
    while slot.task is not None and slot.task.running:
        if time.time() > deadline:
            raise AssertionError(f"{slot.task.name} did not end: {slot.task.progress_text()}")
        time.sleep(0.05)
    return slot.task


# ================================================================================================ item 2: try it
def test_try_it_labels_each_pair_defaults_to_the_training_size_and_stops(ui, ws, tiny_pipeline, randomize,
                                                                         tmp_path):
    from methods.apply import create_network, save_network

    pipe = tiny_pipeline("sd1")
    model = tmp_path / "model"
    pipe.save_pretrained(model)
    network = create_network(pipe, "lora", {"rank": 4})
    randomize(network, std=0.5)
    adapter = save_network(network, ws.outputs / "shapes.safetensors",
                           extra_metadata={"modelspec.resolution": "32x32", "modelspec.trigger_phrase": "zq"})
    summary, metadata, previews, size, prompt = ui.adapter_details(str(adapter), "")
    assert "shapes.safetensors" in summary and size == 32 and prompt == "zq"  # not 512 for a 32 px model
    assert ui.adapter_details(str(adapter), "my own prompt")[4] == {"__type__": "update"}  # a typed prompt stays

    for strength in (0.5, 1.5):
        assert ui.try_start(str(model), "auto", "auto", "", str(adapter), "a zq circle", strength, 7, 2, 32)
        task = wait_task(ui.trying)
        assert task.status == "done", task.error
    status, progress, gallery, session = ui.poll_try({})
    assert "Rendered in" in status and 'aria-valuenow="100"' in progress
    labels = [caption for _, caption in gallery]
    assert labels == ["with shapes · strength 1.5 · seed 7 · 32 px", "without (base model) · seed 7 · 32 px",
                      "with shapes · strength 0.5 · seed 7 · 32 px", "without (base model) · seed 7 · 32 px"]
    assert gallery[0][0].tobytes() != gallery[2][0].tobytes()  # another strength, another picture
    assert ui.poll_try(session)[2] == {"__type__": "update"}  # nothing new: nothing re-sent

    ui.try_start(str(model), "auto", "auto", "", str(adapter), "a zq circle", 1.0, 7, 5000, 32)
    while ui.trying.task.done < 2:  # rendering: the bar counts denoising steps
        assert ui.trying.task.running, ui.trying.task.error
        time.sleep(0.05)
    assert "rendering" in ui.trying.task.progress_text() and "/10000 denoising steps" in ui.trying.task.progress_text()
    asked = time.time()
    assert "within a denoising step" in ui.try_stop()
    task = wait_task(ui.trying, 60)
    print(f"Try it stopped {time.time() - asked:.2f} s after Stop")
    assert task.status == "stopped" and len(ui.try_results) == 4
    with pytest.raises(WorkspaceError, match="multiple of 8"):
        ui.try_start(str(model), "auto", "auto", "", str(adapter), "a", 1.0, 7, 2, 30)


# ================================================================================================ item 3: per browser
def test_the_form_a_browser_kept_comes_back_after_a_reload(ui, ws):
    values = form.config_to_values(ui.initial_config())
    values.update({"dataset.dir": "my_unsaved_folder", "train.max_steps": 77, "network.method": "loha",
                   "network.loha.rank": 6, "sample.prompts": "one\ntwo"})
    stored = ui.form_state(*ui.ordered(values), None, ["lora", "oft"], 3, "a red car")
    stored = json.loads(json.dumps(stored))  # as the browser's local storage gives it back
    loaded = ui.on_load(stored)
    got = ui.values(tuple(loaded[:len(ui.keys)]))
    assert got["dataset.dir"] == "my_unsaved_folder" and got["train.max_steps"] == 77
    assert got["network.method"] == "loha" and got["network.loha.rank"] == 6 and got["sample.prompts"] == "one\ntwo"
    methods, steps, drift = loaded[len(ui.keys) + 5:len(ui.keys) + 8]
    assert (methods, steps, drift) == (["lora", "oft"], 3, "a red car")
    assert "does not exist yet" in loaded[len(ui.keys) + 3]  # the gallery follows the kept folder
    # what no field could show is left out (a tampered or outdated store), the rest is kept
    tampered = {"values": {"network.method": "rm -rf", "train.max_steps": "many", "train.sdpa": "yes",
                           "dataset.dir": "x" * 50_000, "no.such": 1, "train.seed": 5},
                "preset": "/etc/passwd", "compare": {"methods": ["nope", "lora"], "steps": "3"}}
    loaded = ui.on_load(tampered)
    got = ui.values(tuple(loaded[:len(ui.keys)]))
    defaults = form.config_to_values(ui.initial_config())
    assert got["train.seed"] == 5 and all(got[key] == defaults[key] for key in
                                          ("network.method", "train.max_steps", "train.sdpa", "dataset.dir"))
    preset = loaded[len(ui.keys) + 4]
    assert preset["value"] == str(PROJECT_ROOT / "presets" / "toy_demo.toml")  # the demo's, not the tampered one
    assert loaded[len(ui.keys) + 5] == ["lora"]
    assert loaded[len(ui.keys) + 6] == {"__type__": "update"}
    assert ui.on_load(None)[:len(ui.keys)] == ui.ordered(defaults)


# ================================================================================================ item 4: the demo
def test_the_demo_is_estimated_as_itself_before_detect_and_shows_its_preset_and_a_hint(ui, ws):
    loaded = ui.on_load({})
    values = ui.values(tuple(loaded[:len(ui.keys)]))
    assert values["model.base"] == str(PROJECT_ROOT / "presets" / "toy" / "model")
    assert loaded[len(ui.keys) + 4]["value"] == str(PROJECT_ROOT / "presets" / "toy_demo.toml")  # the preset shown
    assert loaded[-1]["visible"] is True  # the hint where to press Start
    text = ui.estimate(*loaded[:len(ui.keys)])
    assert "measured on the SD1.x model folder's configs" in text
    before = text.split("trainable")[0]
    ui.detect(values["model.base"], "auto", "auto")
    assert ui.estimate(*loaded[:len(ui.keys)]).split("trainable")[0] == before  # the same count as once loaded
    assert "**9,437,184**" not in before  # not the count of a full-size SD1.5
    values["dataset.dir"] = "elsewhere"
    assert ui.on_load({"values": values})[-1]["visible"] is False


# ================================================================================================ item 5: captions
def test_auto_captioning_writes_captions_with_progress_and_stops(ui, ws):
    build_tiny_blip(ws.models / "tiny-blip", word="cat")
    folder = ws.datasets / "shots"
    for index, size in enumerate([(40, 30), (20, 50), (64, 64), (33, 17)]):
        write(folder / "1_pet" / f"{index}.png", png_bytes("red", size))
    write(folder / "1_pet" / "0.txt", "hand written")
    message = ui.caption_start(str(folder), ".txt", "tiny-blip", "auto", "skip_existing", "", "", "zq", "", 2, 3,
                               0.35, "cpu")
    assert "captioning 3 image(s) with tiny-blip" in message and "1 already captioned" in message
    task = wait_task(ui.captioning)
    assert task.status == "done", task.error
    status, progress, recent, gallery, paths, _, summary, session = ui.poll_captioning({}, str(folder), ".txt")
    assert "3 caption(s) written, 1 skipped, 0 failed" in status and 'aria-valuenow="100"' in progress
    assert "zq, cat cat cat" in recent and len(paths) == 4 and "without a caption" not in summary
    assert (folder / "1_pet" / "0.txt").read_text().strip() == "hand written"
    assert (folder / "1_pet" / "1.txt").read_text().strip() == "zq, cat cat cat"
    assert ui.poll_captioning(session, str(folder), ".txt")[0] == {"__type__": "update"}
    assert ui.caption_start(str(folder), ".txt", "tiny-blip", "auto", "skip_existing", "", "", "", "", 2, 3, 0.35,
                            "cpu").startswith("Nothing to caption")
    ui.caption_start(str(folder), ".txt", "tiny-blip", "auto", "overwrite", "", "", "", "", 1, 3, 0.35, "cpu")
    ui.caption_stop()
    task = wait_task(ui.captioning)
    assert task.status == "stopped" and task.result.stopped and len(task.result.written) < 4
    with pytest.raises(ValueError, match="no captioning is running"):
        ui.caption_stop()


# ================================================================================================ item 6: report
def test_the_dataset_report_shows_buckets_crops_duplicates_and_captions(ui, ws):
    folder = ws.datasets / "mixed"
    sizes = {"wide": (96, 32), "tall": (32, 80), "small": (16, 16), "square": (64, 64)}
    for name, size in sizes.items():
        write(folder / "2_thing" / f"{name}.png", png_bytes("blue", size))
        write(folder / "2_thing" / f"{name}.txt", "a thing, blue, " + ("very " * 80 if name == "tall" else "small"))
    write(folder / "2_thing" / "copy.png", png_bytes("blue", sizes["square"]))
    values = form.config_to_values(TrainerConfig.from_dict({"dataset": {
        "dir": str(folder), "resolution": 32, "min_bucket_side": 16, "max_bucket_side": 64, "bucket_step": 8},
        "output": {"dir": str(ws.outputs)}}))
    assert ui.report_start(*ui.ordered(values)) == ""  # the status line follows the report (poll_report)
    task = wait_task(ui.reporting)
    assert task.status == "done", task.error
    status, progress, summary, sheet, table, session = ui.poll_report({})
    assert "5 image(s)**, 10 sample(s) per epoch" in summary and "buckets on" in summary
    assert "| bucket | aspect | images | samples |" in summary
    for text in ("enlarged", "without a caption file", "identical copy", "longer than 75 tokens",
                 "Tag frequency**: a thing (4), blue (4)"):
        assert text in summary, text
    assert ws.is_served(sheet) and Image.open(sheet).width > 100
    rows = {row[0]: row for row in table["data"]}
    assert rows["small.png"][4] == "×2.00" and "upscaled" in rows["small.png"][8]
    assert rows["copy.png"][7] == "missing" and rows["tall.png"][6] != "0"
    values["dataset.enable_buckets"] = False
    ui.report_start(*ui.ordered(values))
    wait_task(ui.reporting)
    summary = ui.poll_report(session)[2]
    assert "buckets **off** (square crops)" in summary and "cropped to 32×32" in summary
    assert "Aspect-ratio buckets are off: 2 non-square" in ui.crop_warning(ui.confine(form.values_to_config(values)))


# ================================================================================================ item 8: resume
def finished_job(ws: Workspace, job_id: str, name: str, status: str, step: int, total: int) -> Path:
    """A training job on disk as the worker leaves it: its record, config, events and resumable state."""
    out = ws.outputs
    state = out / f"{name}-step{step:06d}-state" if status == "stopped" else out / f"{name}-state"
    write(state / "state.pt", b"state")
    adapter = write(out / (f"{name}-step{step:06d}.safetensors" if status == "stopped" else f"{name}.safetensors"),
                    b"x")
    config = TrainerConfig.from_dict({"dataset": {"dir": str(ws.default_dataset())}, "train": {"max_steps": total},
                                      "output": {"dir": str(out), "name": name}})
    folder = ws.jobs / job_id
    write(folder / "config.toml", config.to_toml())
    events = [{"event": "start", "config": config.to_dict()}, {"event": "ready", "total_steps": total},
              {"event": "step", "step": step, "total": total, "loss": 0.5},
              {"event": "save", "step": step, "path": str(adapter), "state": str(state), "check_ok": True},
              {"event": "done", "step": step, "output": str(adapter), "stopped": status == "stopped",
               "state": str(state)}]
    with (out / "events.jsonl").open("a") as stream:
        offset = stream.tell()
        stream.write("".join(json.dumps(event) + "\n" for event in events))
    write(folder / "job.json", json.dumps({"id": job_id, "folder": str(folder),
                                           "config_path": str(folder / "config.toml"), "output_dir": str(out),
                                           "output_name": name, "events_offset": offset, "started": time.time(),
                                           "kind": "train", "pid": None}))
    write(folder / "exit.json", json.dumps({"ok": True}))
    return state


def test_a_stopped_run_resumes_and_a_finished_one_trains_further(ui, ws):
    ws.default_dataset().mkdir(parents=True)
    stopped_state = finished_job(ws, "20260101-000000-aaaaaa", "half", "stopped", 40, 100)
    done_state = finished_job(ws, "20260101-000001-bbbbbb", "whole", "done", 100, 100)
    runs = dict((job, label) for label, job in ui.resumable_runs())
    assert "stopped at step 40/100" in runs["20260101-000000-aaaaaa"]
    assert "finished, 100 steps" in runs["20260101-000001-bbbbbb"]
    with pytest.raises(JobError, match="Train N more steps"):
        ui.resume("20260101-000001-bbbbbb")
    message = ui.resume("20260101-000000-aaaaaa")
    assert "from step 40 to 100" in message
    record = next(r for r in [ui.runner.current(), *ui.runner.queue()] if r and r.output_name == "half")
    assert json.loads((Path(record.folder) / "resume.json").read_text()) == {"state": str(stopped_state)}
    assert TrainerConfig.load(record.config_path).output.name == "half"  # its final file was never written
    ui.runner.kill()
    message = ui.train_more("20260101-000001-bbbbbb", 50)
    assert "the finished file is kept as `whole-step000100.safetensors`" in message  # the trainer renames it
    record = ui.runner.current()  # nothing else ran: it started at once
    assert record.output_name == "whole" and record.id != "20260101-000001-bbbbbb"
    config = TrainerConfig.load(record.config_path)
    assert config.train.max_steps == 150 and config.train.epochs == 0
    assert json.loads((Path(record.folder) / "resume.json").read_text()) == {"state": str(done_state)}
    for bad in (0, 2.5, None):
        with pytest.raises(JobError, match="steps to add"):
            ui.train_more("20260101-000001-bbbbbb", bad)
    with pytest.raises(JobError, match="choose a training run"):
        ui.resume("../../etc")


# ================================================================================================ items 9-11
def test_previews_are_captioned_with_their_step_and_prompt():
    view = JobView("job")
    view.apply({"event": "preview", "step": 50, "paths": ["s/step000050_0.png", "s/step000050_1.png",
                                                          "s/step000050_grid.png"], "prompts": ["a zq cat", "a dog"]})
    assert view.preview_captions == {"s/step000050_0.png": "step 50 · a zq cat",
                                     "s/step000050_1.png": "step 50 · a dog"}
    view.apply({"event": "prior", "step": 50, "prior_loss": 0.2, "concept_loss": 0.1})
    view.apply({"event": "validation", "step": 50, "loss": 0.3})
    assert view.series == {"prior loss": [(50, 0.2)], "concept loss": [(50, 0.1)], "validation loss": [(50, 0.3)]}


RAW_WORDS = {"dir", "sdpa", "lr", "te", "ema", "dtype", "num", "vae", "snr", "unet", "boft"}


def test_every_field_has_a_human_label_and_empty_fields_say_what_they_mean(ui):
    for field in form.all_fields():
        words = {word.strip("()").lower() for word in field.label.split()}
        raw = {word for word in words if word in RAW_WORDS and word.upper() not in field.label
               and word.capitalize() not in field.label.replace("UNet", "Unet")}
        assert not raw and field.label != field.name, (field.key, field.label)
        assert field.key in form.LABELS or field.name in form.OPTION_LABELS or field.label == form.humanize(field.name)
    assert form.humanize("max_train_lr") == "Maximum train learning rate"
    values = form.config_to_values(TrainerConfig.from_dict({"network": {"method": "lora", "rank": 8},
                                                            "train": {"learning_rate": 2e-4},
                                                            "dataset": {"resolution": 64}}))
    text = ui.effective(*ui.ordered(values))
    for part in ("Alpha (empty = rank) → 8 (the rank: scale 1)", "UNet learning rate (0 = learning rate) → 0.0002",
                 "Preview width (0 = training resolution) → 64 px"):
        assert part in text, part
    values.update({"network.method": "oft", "network.oft.block_size": ""})
    assert "Block size (empty = method default) → 32 (OFT's default)" in ui.effective(*ui.ordered(values))


def test_gpu_memory_estimate_adds_weights_optimizer_and_activations(ui):
    values = form.config_to_values(TrainerConfig.from_dict({"network": {"method": "lora", "rank": 16},
                                                            "train": {"mixed_precision": "fp16"}}))
    values["model.base"] = "runwayml/stable-diffusion-v1-5"
    text = ui.estimate(*ui.ordered(values))
    assert "GPU memory ≈ **" in text and "unverified on a GPU" in text and "at 512 px × batch 1" in text
    base = float(text.split("GPU memory ≈ **")[1].split(" GB")[0])
    assert 3.5 < base < 6.0  # SD1.5 LoRA at 512 px, fp16, batch 1 (fits the 6 GB cards kohya users train on)
    values["train.gradient_checkpointing"] = True
    lower = float(ui.estimate(*ui.ordered(values)).split("GPU memory ≈ **")[1].split(" GB")[0])
    values["train.batch_size"] = 4
    values["train.gradient_checkpointing"] = False
    higher = float(ui.estimate(*ui.ordered(values)).split("GPU memory ≈ **")[1].split(" GB")[0])
    assert lower < base < higher
    # the project's measured H100 run (README, Speed): rank 16, 512 px, batch 4, bf16, latent cache → 7.1 GB
    # allocated by torch (+ the CUDA context); with checkpointing and no latent cache → 5.4 GB
    values.update({"train.mixed_precision": "bf16", "train.batch_size": 4})
    measured = float(ui.estimate(*ui.ordered(values)).split("GPU memory ≈ **")[1].split(" GB")[0])
    assert abs(measured - (7.1 + 0.6)) < 0.15 * 7.7
    values.update({"train.gradient_checkpointing": True, "dataset.latent_cache": "off"})
    measured = float(ui.estimate(*ui.ordered(values)).split("GPU memory ≈ **")[1].split(" GB")[0])
    assert abs(measured - (5.4 + 0.6)) < 0.15 * 6.0
    config = TrainerConfig.from_dict({"train": {"mixed_precision": "no"}})
    counts = {"unet": 1_000_000_000, "text_encoders": 0, "vae": 0}
    memory = estimates.memory_estimate(config, "sd1", counts, 1_000_000, False)
    assert memory.weights == 4e9 and memory.adapter == 16e6  # fp32 weights; AdamW: weight, grad and 2 states


def test_tensorboard_is_linked_or_explained(ui, ws):
    assert f"tensorboard --logdir {ws.outputs}" in ui.tensorboard_text() and "--tensorboard" in ui.tensorboard_text()
    linked = RankwrightUI(ws, runner=idle_runner(ws), tensorboard_url="http://127.0.0.1:6006/")
    assert "[http://127.0.0.1:6006/](http://127.0.0.1:6006/)" in linked.tensorboard_text()
    from app import parse_args

    assert parse_args(["--tensorboard", "6006"]).tensorboard == 6006 and parse_args([]).tensorboard is None
    with pytest.raises(SystemExit):
        parse_args(["--tensorboard", "0"])


def test_results_keep_comparisons_apart_and_name_them_by_method(ui, ws):
    train_out, compare_out = ws.outputs, ws.outputs / "run-compare"
    single = write(train_out / "run.safetensors", b"x")
    per_method = {m: write(compare_out / m / f"run_{m}.safetensors", b"x") for m in ("lora", "oft")}
    grid = Image.new("RGB", (8, 8))
    grid.save(compare_out / "grid.png")
    for job_id, kind, out, events in (
            ("20260101-000000-aaaaaa", "train", train_out,
             [{"event": "save", "step": 2, "path": str(single)}, {"event": "done", "output": str(single)}]),
            ("20260101-000001-bbbbbb", "compare", compare_out,
             [*({"event": "save", "method": m, "step": 2, "path": str(p)} for m, p in per_method.items()),
              {"event": "compare_done", "grid": str(compare_out / "grid.png"), "table": []}])):
        with (out / "events.jsonl").open("a") as stream:
            offset = stream.tell()
            stream.write("".join(json.dumps(e) + "\n" for e in events))
        write(ws.jobs / job_id / "job.json", json.dumps({
            "id": job_id, "folder": str(ws.jobs / job_id), "config_path": str(ws.jobs / job_id / "config.toml"),
            "output_dir": str(out), "output_name": out.name, "events_offset": offset, "started": time.time(),
            "kind": kind}))
        write(ws.jobs / job_id / "exit.json", "{}")
    training, compared, choices = ui.results()
    assert training == [str(single)] and sorted(compared) == sorted(map(str, per_method.values()))
    labels = [label for label, _ in choices["choices"]]
    assert labels[0] == "outputs/run.safetensors"
    assert "comparison run-compare · lora (run_lora.safetensors)" in labels
    assert choices["value"] == str(single)
    assert ui.results(str(per_method["oft"]))[2]["value"] == str(per_method["oft"])


@pytest.mark.slow
def test_real_worker_trains_a_finished_run_further_from_its_state(ws, tiny_pipeline, tmp_path):
    """The real worker (python -m ui.worker → train(config, resume=state)): 2 steps, then 2 more from the state."""
    ui, values = real_worker_ui(ws, tiny_pipeline("sd1"), tmp_path, **{"train.max_steps": 2, "output.name": "grow"})
    ui.start(*ui.ordered(values))

    def finished(record):
        deadline = time.time() + 300
        while not (view := ui.runner.view(record)).finished:
            assert time.time() < deadline, "\n".join(view.log)
            time.sleep(0.5)
        return view

    first = ui.runner.current()
    assert finished(first).status == "done"
    job_id = ui.resumable_runs()[0][1]
    assert job_id == first.id
    first_file = (ws.outputs / "grow.safetensors").read_bytes()
    assert "kept as `grow-step000002.safetensors`" in ui.train_more(job_id, 2)
    second = ui.runner.current()
    view = finished(second)
    ui.runner.kill(second)
    assert view.status == "done", "\n".join(view.log)
    assert view.summary["start_step"] == 2 and view.step == 4 and [s for s, _ in view.losses] == [3, 4]
    assert any("resumed at step 2" in line for line in view.log)
    assert Path(view.output).name == "grow.safetensors"
    assert (ws.outputs / "grow-step000002.safetensors").read_bytes() == first_file  # the first run's file, kept


def test_the_key_of_the_browsers_stored_forms_is_the_workspaces_and_private(ws):
    from ui.app import browser_state_secret

    key = browser_state_secret(ws)
    assert len(key) == 64 and browser_state_secret(ws) == key  # kept across restarts
    path = ws.root / ".browser_state_key"
    assert path.stat().st_mode & 0o777 == 0o600 and not ws.is_served(path)


@pytest.mark.slow
def test_the_operators_tensorboard_starts_on_this_machine_only(ws):
    import httpx
    from ui_helpers import free_port

    from ui.server import start_tensorboard

    port = free_port()
    process, url = start_tensorboard(str(ws.outputs), port)
    try:
        assert url == f"http://127.0.0.1:{port}/" and "127.0.0.1" in process.args
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(url, timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert process.poll() is None and time.time() < deadline, "TensorBoard did not start"
            time.sleep(1)
    finally:
        process.terminate()
        process.wait(30)
