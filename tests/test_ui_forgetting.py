"""Issue 14 in the web UI, callback by callback (no browser): the prior loss ratio beside the loss, a run's
checkpoints.json as a table whose pick becomes Try it's adapter and the download (never a file outside the run
folder), the Dataset tab's regularisation images (progress, Stop, cached, offered as dataset.reg_dir), and the
forgetting options' group in the form."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from test_ui_workflow import idle_runner, wait_task
from ui_helpers import real_worker_ui, write

from ui import form
from ui.app import RankwrightUI
from ui.training_tab import prior_ratio_text
from ui.views import JobView
from ui.workspace import Workspace, WorkspaceError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # gr.Warning/gr.Info outside a request


@pytest.fixture
def ui(ws) -> RankwrightUI:
    return RankwrightUI(ws, runner=idle_runner(ws), preset_dirs=[])


# ================================================================================================ the ratio
def test_the_prior_ratio_is_shown_apart_from_the_losses():
    view = JobView("job")
    assert prior_ratio_text(view) == ""
    for step, ratio in ((0, 1.0), (10, 1.08), (20, 1.05)):
        view.apply({"event": "prior", "step": step, "ratio": ratio, "prior_loss": 0.1 * ratio, "base_loss": 0.1})
    view.apply({"event": "prior", "step": 30, "ratio": float("inf")})  # an unusable value is left out
    assert view.prior_ratios == [(0, 1.0), (10, 1.08), (20, 1.05)]
    text = prior_ratio_text(view, stop_ratio=1.2)
    assert "Prior loss ratio 1.0500** at step 20" in text and "1.0 = unchanged" in text
    assert "highest 1.0800 at step 10" in text and "1.0000 → 1.0800 → 1.0500" in text and "above 1.2" in text
    assert "prior loss" in view.series and "prior loss ratio" not in view.series  # the plot keeps loss scales


# ================================================================================================ checkpoints
def fake_run(ws: Workspace, name: str = "run") -> Path:
    """A run folder with three saves in its checkpoints.json: step 20 is the pick (lowest concept loss within
    the tolerance), step 30 bleeds too much."""
    folder = ws.outputs / name
    records = []
    for step, validation, ratio in ((10, 0.30, 1.01), (20, 0.20, 1.06), (30, 0.10, 1.50)):
        path = write(folder / f"{name}-step{step:06d}.safetensors", f"adapter {step}")
        records.append({"step": step, "path": str(path), "validation_loss": validation, "prior_ratio": ratio,
                        "drift": 0.25 if step == 20 else None})
    write(folder / "checkpoints.json", json.dumps({"max_prior_ratio": 1.1, "checkpoints": records}))
    return folder


def test_the_checkpoints_table_marks_the_pick_and_using_one_makes_it_the_adapter(ui, ws):
    folder = fake_run(ws)
    table, choice = ui.checkpoints_of(str(folder))
    rows = [line for line in table.splitlines() if line.startswith("| 20 ")]
    assert rows == ["| 20 | `run-step000020.safetensors` | 0.20000 | 1.0600 | 0.250 | ★ best |"]
    assert "| 30 | `run-step000030.safetensors` | 0.10000 | 1.5000 | – |  |" in table
    assert "**Best: step 20** — the lowest concept validation loss (0.20000) with a prior loss ratio within 1.1" \
        in table
    assert choice["value"] == "run-step000020.safetensors" and len(choice["choices"]) == 3
    assert choice["choices"][1] == ("step 20 · run-step000020.safetensors ★ best", "run-step000020.safetensors")
    assert ui.checkpoints_of("run", "run-step000030.safetensors")[1]["value"] == "run-step000030.safetensors"

    _, _, adapter, file, message = ui.use_checkpoint(str(folder), "run-step000030.safetensors")
    chosen = str(folder / "run-step000030.safetensors")
    assert adapter["value"] == chosen and chosen in [value for _, value in adapter["choices"]] and file == [chosen]
    assert "Try it" in message and "step 30" in message
    assert ui.use_checkpoint("run", "10")[3] == [str(folder / "run-step000010.safetensors")]  # by step, by name
    # the Results tab: the selected adapter's run, its own file selected
    table, choice, run, name = ui.adapter_checkpoints(chosen)
    assert run == str(folder) and name == "" and choice["value"] == "run-step000030.safetensors" and "★ best" in table
    assert ui.checkpoints_of(str(ws.outputs))[0].startswith("No checkpoints listed yet")
    # runs sharing a folder share its checkpoints.json: a run's table lists its own files
    data = json.loads((folder / "checkpoints.json").read_text())
    data["checkpoints"].append({"step": 5, "path": str(write(folder / "another.safetensors", "x"))})
    write(folder / "checkpoints.json", json.dumps(data))
    assert "another" in ui.checkpoints_of("run")[0] and "another" not in ui.checkpoints_of("run", None, "run")[0]
    with pytest.raises(WorkspaceError, match="no checkpoint"):
        ui.use_checkpoint("run", "another.safetensors", "run")


def test_a_checkpoint_outside_the_run_folder_is_refused(ui, ws, tmp_path):
    folder = fake_run(ws)
    outside = write(tmp_path / "secret.safetensors", "not yours")
    other = write(ws.outputs / "other" / "other.safetensors", "another run's")
    for choice in ("../other/other.safetensors", str(other), str(outside), "/etc/passwd", "..", "", "40",
                   "checkpoints.json", "run-step000020.safetensors/../../other/other.safetensors"):
        with pytest.raises(WorkspaceError):
            ui.use_checkpoint(str(folder), choice)
    for run in (str(tmp_path), "../..", "/etc", ""):  # the run folder itself lies in outputs/
        with pytest.raises(WorkspaceError):
            ui.use_checkpoint(run, "run-step000020.safetensors")
    # a checkpoints.json edited to point elsewhere, and a link out of the folder: never listed, never served
    os.symlink(outside, folder / "link.safetensors")
    data = json.loads((folder / "checkpoints.json").read_text())
    data["checkpoints"] += [{"step": 40, "path": str(outside)}, {"step": 50, "path": str(other)},
                            {"step": 60, "path": str(folder / "link.safetensors")}]
    write(folder / "checkpoints.json", json.dumps(data))
    table, choice = ui.checkpoints_of(str(folder))
    assert [name for _, name in choice["choices"]] == [f"run-step0000{s}0.safetensors" for s in (1, 2, 3)]
    assert "secret" not in table and "other" not in table and "link" not in table
    for choice in ("40", "50", "60", "secret.safetensors", "link.safetensors", "other.safetensors"):
        with pytest.raises(WorkspaceError):
            ui.use_checkpoint(str(folder), choice)


# ================================================================================================ a real run
def test_a_run_with_the_prior_ratio_shows_it_and_its_checkpoints(ws, tiny_pipeline, tmp_path):
    ui, values = real_worker_ui(ws, tiny_pipeline("sd1"), tmp_path, **{
        "train.max_steps": 4, "output.save_every_n_steps": 2, "output.name": "keep", "train.prior_every_n_steps": 2,
        "train.prior_images": 2, "sample.steps": 2, "sample.every_n_steps": 0})
    assert ui.poll_checkpoints({})[0] == ""
    ui.start(*ui.ordered(values))
    record = ui.runner.current()
    deadline = time.time() + 300
    while not (view := ui.runner.view(record)).finished:
        assert time.time() < deadline, "\n".join(view.log)
        time.sleep(0.3)
    assert view.status == "done", view.error
    ratio, table, choice, run, name, session = ui.poll_checkpoints({})
    assert [step for step, _ in view.prior_ratios] == [0, 2, 4] and "1.0 = unchanged" in ratio
    assert (run, name) == (record.output_dir, "keep") and "★ best" in table
    assert "| 2 | `keep-step000002.safetensors`" in table
    assert {value for _, value in choice["choices"]} == {"keep-step000002.safetensors", "keep.safetensors"}
    assert ui.poll_checkpoints(session, choice["value"])[0] == {"__type__": "update"}  # nothing new
    _, _, adapter, files, _ = ui.use_checkpoint(run, "keep-step000002.safetensors", name)
    assert [adapter["value"]] == files == [str(ws.outputs / "keep-step000002.safetensors")]
    assert len(adapter["choices"]) == 2  # both saves are the run's results
    assert ui.adapter_checkpoints(files[0])[2:] == (run, "keep")  # the Results tab finds the run of the file


# ================================================================================================ regularisation
def test_regularisation_images_with_progress_stop_cache_and_reg_dir(ws, tiny_pipeline, tmp_path):
    ui, values = real_worker_ui(ws, tiny_pipeline("sd1"), tmp_path, **{"sample.steps": 2,
                                                                        "dataset.trigger_word": "zq"})
    with pytest.raises(WorkspaceError, match="generate regularisation images first"):
        ui.regularise_use()
    with pytest.raises(WorkspaceError, match="whole number"):
        ui.regularise_start(2.5, *ui.ordered(values))
    assert "Started" in ui.regularise_start(3, *ui.ordered(values))
    task = wait_task(ui.regularising)
    assert task.status == "done", task.error
    status, progress, use, session = ui.poll_regularising({})
    folder = ws.datasets / "regularisation" / task.result.folder.name
    assert task.result.folder == folder and len(list(folder.glob("*.png"))) == 3
    assert "**3 of 3 image(s)**" in status and "(0 reused" in status and 'aria-valuenow="100"' in progress
    assert use["visible"] is True and ui.poll_regularising(session)[0] == {"__type__": "update"}
    reg_dir, message = ui.regularise_use()
    assert reg_dir == str(folder) and "3 image(s)" in message
    config = ui.confine(ui.config_from(ui.ordered({**values, "dataset.reg_dir": reg_dir})))
    assert config.dataset.reg_dir == str(folder)  # a folder the form accepts as dataset.reg_dir

    ui.regularise_start(3, *ui.ordered(values))  # the same settings: nothing drawn again
    assert wait_task(ui.regularising).status == "done"
    assert "(3 reused" in ui.poll_regularising({})[0]

    slow = {**values, "sample.steps": 40}
    ui.regularise_start(200, *ui.ordered(slow))
    while ui.regularising.task.done < 1:  # drawing: the bar counts images
        assert ui.regularising.task.running, ui.regularising.task.error
        time.sleep(0.02)
    assert "/200 images" in ui.regularising.task.progress_text()
    assert "kept" in ui.regularise_stop()
    task = wait_task(ui.regularising, 60)
    assert task.status == "stopped" and task.result.stopped and 1 <= len(task.result.paths) < 200
    status, _, use, _ = ui.poll_regularising({})
    assert "Start again to draw the rest" in status and use["visible"] is True


# ================================================================================================ the form
def test_the_forgetting_options_have_labels_and_help():
    fields = {field.key: field for field in form.config_fields()}
    for key in form.FORGETTING_KEYS:
        assert fields[key].label and fields[key].info and not fields[key].main, key
    assert "1.0 = unchanged" in fields["train.prior_every_n_steps"].info
