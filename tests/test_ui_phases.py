"""Issue 13, item 1: every phase of a job has its own name, count and ETA, and a stop ends it within seconds.

A stop is requested while a run is loading, caching latents or rendering previews, and while a comparison renders
its grid; the run (or the comparison) must end within a bound that is many times one denoising step on a loaded
machine — the figures are printed (``-s``). The job views fold the same events: the progress names the phase,
counts it and gives an ETA, and never says "training" while it renders.
"""

from __future__ import annotations

import time

import pytest
from train_helpers import build_model, make_config, write_images

from trainer.compare import compare
from trainer.events import PhaseProgress, StopSignal
from trainer.loop import train
from ui.views import CompareView, JobView

STOP_BOUND_S = 20.0  # generous: one denoising step or one cached batch, then a save, on two busy cores


@pytest.fixture(scope="module")
def model(tmp_path_factory, tokenizer_dir):
    return build_model(tmp_path_factory.mktemp("phases-model"), "sd1", tokenizer_dir)["folder"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("phases-data")
    write_images(root / "1_zq", 2)
    return root


class StopAt:
    """An event listener that asks for a stop at the first event matching ``when`` and times the rest."""

    def __init__(self, when, stop: StopSignal | None = None):
        self.when, self.stop = when, stop or StopSignal()
        self.events: list[dict] = []
        self.asked: float | None = None

    def __call__(self, event: dict) -> None:
        self.events.append(event)
        if self.asked is None and self.when(event):
            self.asked = time.time()
            self.stop.request("test stop")

    def latency(self, final_kind: str) -> float:
        end = next(event["time"] for event in reversed(self.events) if event["event"] == final_kind)
        return end - self.asked

    def kinds(self) -> list[str]:
        return [event["event"] for event in self.events]


def run_stopped(model, data, out, when, **sections) -> tuple[StopAt, object]:
    listener = StopAt(when)
    config = make_config(model, data, out, **sections)
    result = train(config, on_event=listener, stop=listener.stop)
    return listener, result


def phase(name: str, started: bool = False):
    return lambda event: event["event"] == "phase" and event["phase"] == name and (event["done"] or not started)


def test_a_stop_while_loading_or_caching_ends_the_run_before_its_first_step(model, data, tmp_path):
    for name in ("loading", "caching"):
        listener, result = run_stopped(model, data, tmp_path / name, phase(name), train={"max_steps": 50},
                                       dataset={"latent_cache": "memory"})
        assert result.stopped_early and result.steps == 0 and "step" not in listener.kinds(), name
        latency = listener.latency("done")
        print(f"stop while {name}: run ended {latency:.2f} s later")
        assert latency < STOP_BOUND_S


def test_a_stop_while_previews_render_ends_within_a_denoising_step(model, data, tmp_path):
    listener, result = run_stopped(model, data, tmp_path / "previews", phase("previews"),
                                   train={"max_steps": 50},
                                   sample={"every_n_steps": 1, "steps": 500, "prompts": ["a photo of zq"]})
    assert result.stopped_early and result.steps == 1 and result.output_file.is_file()
    assert "preview" not in listener.kinds()  # the half-rendered preview is dropped, with a warning
    assert any("previews of step 1 skipped" in event.get("message", "") for event in listener.events)
    latency = listener.latency("done")
    print(f"stop while rendering previews (500 denoising steps asked): run ended {latency:.2f} s later")
    assert latency < STOP_BOUND_S

    view = JobView("job")
    for event in listener.events:
        view.apply(event)
        if event["event"] == "phase" and event["phase"] == "previews":
            assert view.status == "previews" and "rendering previews" in view.status_text()
            assert "training" not in view.status_text() and "/500 denoising steps" in view.progress_text()
    assert view.finished and view.status == "stopped"


def test_phase_counts_carry_an_eta():
    emitted: list = []
    stop = StopSignal()
    counter = PhaseProgress(emitted.append, "rendering", 4, "images", interval=0.0, should_stop=stop.requested,
                            stopped=RuntimeError)
    time.sleep(0.2)
    counter.advance()
    counter.advance()
    assert [(e.done, e.total) for e in emitted] == [(0, 4), (1, 4), (2, 4)] and emitted[-1].eta_seconds > 0
    assert emitted[0].text() == "rendering the comparison: 4 images" and emitted[1].text() is None
    stop.request()
    with pytest.raises(RuntimeError):
        counter.advance()
    view = JobView("job")
    view.apply({"event": "phase", **emitted[-1].fields()})
    assert view.status == "rendering" and view.progress_text().startswith("rendering the comparison · 2/4 images ·")
    assert "ETA" in view.progress_text() and view.fraction == 0.5


def test_a_stop_while_a_comparison_renders_ends_it_within_seconds(model, data, tmp_path):
    """Rendering is the long phase of a comparison (many images per method): Stop ends it within a step, and the
    report is written without a grid. A stop during training still renders the finished methods; a second stop
    ends that rendering too."""
    config = make_config(model, data, tmp_path / "out", train={"max_steps": 1},
                         sample={"steps": 400, "prompts": ["a photo of zq"]})
    listener = StopAt(phase("rendering", started=True))
    report = compare(config, ["lora", "loha"], tmp_path / "cmp", on_event=listener, stop=listener.stop,
                     drift_prompts=["a red car"])
    assert report.stopped and report.grid is None and report.json_path.is_file()
    assert [run.status for run in report.runs] == ["done", "done"]
    latency = listener.latency("compare_done")
    print(f"stop while a comparison renders (400 denoising steps per image): ended {latency:.2f} s later")
    assert latency < STOP_BOUND_S

    view = CompareView("job")
    seen_rendering = False
    for event in listener.events:
        view.apply(event)
        if event["event"] == "phase" and event["phase"] == "rendering" and event["done"]:
            seen_rendering = True
            assert "rendering the comparison" in view.status_text() and "training" not in view.status_text()
            assert "denoising steps" in view.progress_text() and "ETA" in view.progress_text()
    assert seen_rendering and view.finished and view.status == "stopped"

    second = StopSignal()
    stops = {"asked": 0}

    def stop_twice(event: dict) -> None:
        if event["event"] == "step" and event.get("method") == "loha" and not stops["asked"]:
            stops["asked"] = 1
            second.request("stop during training")
        elif phase("rendering", started=True)(event) and stops["asked"] == 1:
            stops["asked"] = 2
            second.request("a second stop, during rendering")

    report = compare(config.with_overrides(["train.max_steps=2"]), ["lora", "loha"], tmp_path / "cmp2",
                     on_event=stop_twice, stop=second, drift_prompts=["a red car"])
    assert stops["asked"] == 2 and report.stopped and report.grid is None
    assert [run.status for run in report.runs] == ["done", "stopped"]
