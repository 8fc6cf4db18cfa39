"""Events: typed dataclasses, the keys events.jsonl keeps, and the one text both the CLI and the web UI show."""

from __future__ import annotations

import dataclasses
import json

import pytest

from trainer import events as ev
from trainer.cli import print_training_event
from ui.jobs import CompareView, JobView

# The keys the web UI, `compare` and users' scripts read from events.jsonl (unchanged by the typed events).
LOGGED_KEYS = {
    "start": {"config", "processes", "resume"},
    "ready": {"seconds", "method", "modules", "trainable_parameters", "parameter_groups", "train_text_encoder",
              "images", "samples_per_epoch", "batches_per_epoch", "steps_per_epoch", "total_steps",
              "global_batch_size", "latents_cached", "text_embeddings_cached", "buckets", "skipped_images", "device",
              "processes", "start_step", "preserved_words", "trigger_vectors"},
    "step": {"step", "total", "loss", "lr", "epoch", "grad_norm", "its", "eta_seconds"},
    "save": {"step", "path", "final", "state", "size_bytes", "seconds", "ema", "check_modules", "check_missing",
             "check_unmatched", "check_max_difference", "check_max_relative_difference", "check_tolerance",
             "check_ok"},
    "done": {"step", "output", "stopped", "reason", "state", "peak_mb", "seconds_to_ready", "seconds_to_first_step",
             "best_checkpoint"},
    "prior": {"step", "ratio", "prior_loss", "base_loss", "concept_loss", "images", "source"},
    "best_checkpoint": {"step", "path", "validation_loss", "prior_ratio", "why"},
    "error": {"message", "kind", "last_good_save"},
}

RUN = [
    ev.Start(config={"network": {"method": "lora"}, "model": {"base": "tiny"}, "output": {"dir": "out", "name": "a"}}),
    ev.SkippedImage(path="data/1_zq/bad.png", reason="empty file (0 bytes)"),
    ev.Model(arch="sd1", prediction_type="epsilon", source="folder", base="tiny"),
    ev.Ready(seconds=1.5, method="lora", modules={"lora_unet": 10, "lora_te": 4}, trainable_parameters=12345,
             images=4, total_steps=3, device="cpu"),
    ev.RunWarning(message="latent cache off: random crop"),
    ev.Step(step=1, total=3, loss=0.12345, lr=1e-4, its=2.0, eta_seconds=1.0),
    ev.Memory(step=1, peak_mb=300.0),
    ev.Validation(step=1, loss=0.2),
    ev.PriorLoss(step=1, ratio=1.02, prior_loss=0.3, base_loss=0.29, concept_loss=0.2, images=8,
                 source="base-model images"),
    ev.Preview(step=1, paths=["s/000001_0.png", "s/000001_grid.png"], prompts=["a"]),
    ev.Save(step=3, path="out/a.safetensors", final=True, size_bytes=123456, check_ok=True,
            check_max_difference=0.0),
    ev.Stopping(step=3, reason="signal SIGTERM"),
    ev.BestCheckpoint(step=3, path="out/a.safetensors", prior_ratio=1.02, why="the latest save"),
    ev.Done(step=3, output="out/a.safetensors", peak_mb=300.0),
]


def logged(events: list[ev.Event], tmp_path) -> list[dict]:
    received: list[dict] = []
    log = ev.EventLog(tmp_path, [received.append])
    for event in events:
        log.emit(event)
    written = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert written == json.loads(json.dumps(received, default=str))  # the log holds what callbacks got
    return written


def test_events_jsonl_keeps_its_keys(tmp_path):
    for kind, keys in LOGGED_KEYS.items():
        fields = {field.name for field in dataclasses.fields(ev.EVENT_TYPES[kind])}
        assert fields == keys, kind
    (record,) = logged([ev.Step(step=2, total=5, loss=0.5)], tmp_path)
    assert record["event"] == "step" and record["step"] == 2 and isinstance(record["time"], float)


def test_the_command_line_prints_the_lines_the_ui_logs(tmp_path, capsys):
    records = logged(RUN, tmp_path)
    for record in records:
        print_training_event(record)
    printed = capsys.readouterr().out.splitlines()
    view = JobView("job")
    for record in records:
        view.apply(record)
    shown = [line.split("] ", 1)[1] for line in view.log]  # without the time stamp
    assert printed == [ev.describe(r) for r in records if ev.EVENT_TYPES[r["event"]].ON_CLI]
    assert set(printed) <= set(shown)
    assert "step 1/3  loss 0.1235  lr 1.00e-04  2.0000 it/s  ETA 0:01" in shown  # steps: UI only (CLI: tqdm)
    assert "saved out/a.safetensors at step 3 (0.1 MB, self-check ok, max difference 0.0e+00)" in printed
    assert "skipped image data/1_zq/bad.png: empty file (0 bytes)" in printed
    assert "done after 3 steps: out/a.safetensors; peak memory 300 MB" in printed
    assert len(shown) == len(records) - 1 and view.summary["peak_mb"] == 300.0  # memory: the summary only
    assert view.status == "done" and view.previews == ["s/000001_0.png"]


def test_describe_reads_old_and_foreign_logs():
    for kind in ev.EVENT_TYPES:  # a log line of an older version with no fields at all
        text = ev.describe({"event": kind, "time": 0.0})
        assert text is None or isinstance(text, str)
    assert ev.describe({"event": "save", "path": "a", "size_bytes": "big"}).startswith("saved a")
    assert ev.describe({"event": "something_new", "x": 1}) == 'something_new: {"x": 1}'
    assert ev.describe({"event": "something_new", "x": 1}, cli=True) is None
    assert ev.describe({"event": "step", "loss": "nan?"}) == "step 0/0  loss ?  lr ?  ? it/s  ETA ?"


@pytest.mark.parametrize("method", ["lora", None])
def test_a_comparisons_runs_are_prefixed_with_their_method(method):
    event = {"event": "done", "step": 4, "output": "x.safetensors", **({"method": method} if method else {})}
    text = ev.describe(event)
    assert text.startswith("[lora] done after 4 steps") if method else text.startswith("done after 4 steps")
    view = CompareView("job")
    view.apply({"event": "compare_start", "methods": ["lora"], "base": "b", "folder": "f"})
    view.apply({"event": "compare_method_start", "method": "lora", "index": 0, "count": 1,
                "dropped_options": ["rank"]})
    view.apply(event)
    assert "[1/1] lora (options not accepted, left out: rank)" in view.log[1]
    assert not view.finished if method else view.finished  # a run's "done" does not end the comparison
