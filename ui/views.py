"""What a job shows: its events (``events.jsonl``) folded into the state the UI renders.

:class:`JobView` follows a training run: its phase (loading, caching, training, previews, saving — each with its
own name, count and ETA from :class:`trainer.events.Phase` events), steps and losses, the validation and prior
losses, previews with their prompt and step, saves, a log and the final status. :class:`CompareView` follows a
method comparison (one run per method, then rendering and scoring). Nothing here reads files other than what the
job runner hands it; every line of the log is :func:`trainer.events.describe`'s, as on the command line.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import time
from pathlib import Path
from typing import Any

from trainer.events import PHASE_LABELS, Phase, describe, format_seconds

LOG_LINES = 400
# Series a run's events may carry besides the training loss, by event kind and field (plotted when present).
EXTRA_SERIES = {"validation": (("loss", "validation loss"),),
                "prior": (("prior_loss", "prior loss"), ("concept_loss", "concept loss"))}
STATUS_LABELS = {"queued": "queued", "starting": "starting the worker", "stopping": "stopping (saving)",
                 "stop requested": "stop requested", "done": "finished", "stopped": "stopped early (saved)",
                 "error": "failed", **PHASE_LABELS}


@dataclasses.dataclass
class PhaseState(Phase):
    """The phase a job is in and how far it got: the last :class:`trainer.events.Phase` event."""

    @property
    def name(self) -> str:
        return self.phase

    def progress_text(self) -> str:
        parts = [PHASE_LABELS.get(self.phase, self.phase) + (f" ({self.detail})" if self.detail else "")]
        if self.total:
            parts.append(f"{self.done}/{self.total} {self.unit}".rstrip())
        if self.eta_seconds is not None and self.total:
            parts.append(f"ETA {format_seconds(self.eta_seconds)}")
        return " · ".join(parts)

    @property
    def fraction(self) -> float:
        return min(1.0, self.done / self.total) if self.total else 0.0


@dataclasses.dataclass
class JobView:
    """A job's events folded into UI state. ``version`` changes whenever anything shown changes."""

    job_id: str
    offset: int = 0
    status: str = "starting"  # queued, starting, a phase (loading … saving), stopping, done, stopped, error
    finished: bool = False
    step: int = 0
    total: int = 0
    its: float | None = None
    eta: float | None = None
    phase: PhaseState = dataclasses.field(default_factory=PhaseState)
    losses: list[tuple[int, float]] = dataclasses.field(default_factory=list)
    series: dict[str, list[tuple[int, float]]] = dataclasses.field(default_factory=dict)  # validation, prior, …
    # The prior loss ratio by step (trainer.prior): apart from the losses, on its own scale (1.0 = unchanged).
    prior_ratios: list[tuple[int, float]] = dataclasses.field(default_factory=list)
    previews: list[str] = dataclasses.field(default_factory=list)
    preview_captions: dict[str, str] = dataclasses.field(default_factory=dict)  # path → "step N · prompt"
    saves: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    log: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=LOG_LINES))
    error: str = ""
    output: str = ""
    state: str = ""  # the resumable state folder of the last save (output.save_state), "" without one
    summary: dict[str, Any] = dataclasses.field(default_factory=dict)
    save_question: dict[str, Any] | None = None  # the worker's question while its last save is refused (ui.worker)
    version: int = 0

    @property
    def validation(self) -> list[tuple[int, float]]:
        return self.series.get("validation loss", [])

    # ----- events
    def apply(self, event: dict[str, Any]) -> None:
        """Fold one event into the state shown; its log line is :func:`trainer.events.describe`'s (as the CLI's)."""
        kind = event.get("event", "")
        if kind == "start":
            self._enter("loading")
            self.total = int(event.get("config", {}).get("train", {}).get("max_steps", 0) or 0)
        elif kind == "phase":
            self.phase = PhaseState(**{field.name: event[field.name] for field in dataclasses.fields(Phase)
                                       if field.name in event})
            if self.status not in ("stopping", "stop requested"):
                self.status = self.phase.name
        elif kind == "ready":
            self._enter("training")
            self.summary = {k: v for k, v in event.items() if k not in ("event", "time")}
            self.total = int(event.get("total_steps") or self.total)
            self.step = int(event.get("start_step") or self.step)
        elif kind == "step":
            self._enter("training")
            self.step = int(event.get("step", self.step))
            self.total = int(event.get("total") or self.total)
            self.its = event.get("its")
            self.eta = event.get("eta_seconds")
            loss = event.get("loss")
            if isinstance(loss, int | float):
                self.losses.append((self.step, float(loss)))
        elif kind in EXTRA_SERIES:
            ratio = event.get("ratio")
            if kind == "prior" and isinstance(ratio, int | float) and math.isfinite(ratio):
                self.prior_ratios.append((int(event.get("step", 0)), float(ratio)))
            for field, name in EXTRA_SERIES[kind]:
                value = event.get(field)
                if isinstance(value, int | float) and math.isfinite(value):
                    self.series.setdefault(name, []).append((int(event.get("step", 0)), float(value)))
        elif kind == "preview":
            paths = event.get("paths", [])
            prompts = list(event.get("prompts") or [])
            images = [p for p in paths if "_grid" not in Path(p).stem] or paths
            for index, path in enumerate(images):
                prompt = prompts[index] if index < len(prompts) else ""
                self.preview_captions[path] = f"step {event.get('step', '?')}" + (f" · {prompt}" if prompt else "")
            self.previews.extend(images)
        elif kind == "save":
            self.saves.append({k: v for k, v in event.items() if k != "event"})
            if event.get("state"):
                self.state = str(event["state"])
        elif kind == "stopping":
            self.status = "stopping"
        elif kind == "done":
            self.finished = True
            self.status = "stopped" if event.get("stopped") else "done"
            self.output = event.get("output") or ""
            self.state = str(event.get("state") or self.state)
        elif kind == "error":
            self.finished = True
            self.status = "error"
            self.error = str(event.get("message", "unknown error"))
        elif kind == "skipped_image":
            self.skipped.append((str(event.get("path")), str(event.get("reason"))))
        elif kind == "memory":
            self.summary["peak_mb"] = event.get("peak_mb")
        self._log(event)
        self.version += 1

    def _enter(self, phase: str) -> None:
        if self.phase.name != phase:
            self.phase = PhaseState(phase)
        if self.status not in ("stopping", "stop requested"):
            self.status = phase

    def _log(self, event: dict[str, Any]) -> None:
        line = describe(event)
        if line:
            stamp = time.strftime("%H:%M:%S", time.localtime(event.get("time", time.time())))
            self.log.append(f"[{stamp}] {line}")

    def wait_for_answer(self, question: dict[str, Any] | None) -> None:
        """The worker's question about a refused save (None: it waits for nothing), from the job folder."""
        if question == self.save_question:
            return
        if question is not None:
            self.log.append(f"[{time.strftime('%H:%M:%S')}] could not write {question.get('path')} "
                            f"({question.get('reason')}): the trained weights are kept in memory, waiting for "
                            "your answer")
        self.save_question = question
        self.version += 1

    def fail(self, message: str) -> None:
        self.finished = True
        self.status = "error"
        self.error = message
        self.log.append(f"[{time.strftime('%H:%M:%S')}] error: {message}")
        self.version += 1

    # ----- text
    @property
    def in_phase(self) -> bool:
        """In a phase other than training steps (the progress bar counts its units)."""
        return not self.finished and self.phase.name not in ("", "training")

    @property
    def fraction(self) -> float:
        if self.status == "done":
            return 1.0
        if self.in_phase and self.phase.total:
            return self.phase.fraction
        return min(1.0, self.step / self.total) if self.total else 0.0

    def step_text(self) -> str:
        parts = [f"step {self.step}/{self.total or '?'}"]
        if self.its:
            parts.append(f"{self.its:.2f} it/s")
        if not self.finished and self.eta is not None:
            parts.append(f"ETA {format_seconds(self.eta)}")
        return " · ".join(parts)

    def progress_text(self) -> str:
        if self.in_phase:
            return f"{self.phase.progress_text()} · step {self.step}/{self.total or '?'}"
        return self.step_text()

    def status_text(self) -> str:
        if self.status == "error" and self.error:
            return f"failed: {self.error}"
        if self.save_question is not None:
            return "the save failed: waiting for your answer (Retry save, or Save to the rescue folder)"
        if self.status == "stop requested":
            where = PHASE_LABELS.get(self.phase.name, "")
            return f"stop requested{f' while {where}' if where else ''}: it saves and ends within seconds"
        return STATUS_LABELS.get(self.status, self.status)


@dataclasses.dataclass
class CompareView(JobView):
    """A method comparison's events (trainer.compare): one training run per method, then rendering, then the report.

    The runs' own events carry their ``method``; a run's "done" or "error" ends that run, not the comparison.
    ``losses`` and ``step`` are the current run's, as for a training job; ``method_losses`` keeps every run's.
    """

    methods: list[str] = dataclasses.field(default_factory=list)
    method: str = ""  # the method training now
    finished_runs: int = 0
    method_losses: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    rows: list[dict[str, str]] = dataclasses.field(default_factory=list)  # the report table (partial until done)
    report: dict[str, Any] = dataclasses.field(default_factory=dict)  # compare_done: report, markdown, grid, …
    runs: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # method → its output and folder

    def apply(self, event: dict[str, Any]) -> None:
        kind = event.get("event", "")
        method = event.get("method")
        if kind.startswith("compare_"):
            self._apply_compare(kind, event)
        elif method and kind in ("done", "error"):  # one run ended, not the comparison
            if kind == "done" and event.get("output"):
                self.runs.setdefault(method, {})["output"] = event["output"]
            self._log(event)
        else:
            if kind == "step" and method:
                self.method_losses.setdefault(method, []).append(float(event.get("loss", math.nan)))
            super().apply(event)
            return
        self.version += 1

    def _apply_compare(self, kind: str, event: dict[str, Any]) -> None:
        if kind == "compare_start":
            self.methods = list(event.get("methods", []))
            self._enter("loading")
        elif kind == "compare_method_start":
            self.method, self.step, self.losses, self.its, self.eta = event.get("method", ""), 0, [], None, None
            self.runs.setdefault(self.method, {})["folder"] = event.get("folder", "")
            self._enter("loading")
        elif kind == "compare_method_done":
            self.finished_runs += 1
            self.rows.append(event.get("row", {}))
        elif kind == "compare_render":
            self.phase.detail = f"{event.get('row', '')}, row {int(event.get('index', 0)) + 1}/{event.get('total')}"
            if self.status not in ("stopping", "stop requested"):
                self.status = "rendering"
        elif kind == "compare_done":
            self.finished = True
            self.status = "stopped" if event.get("stopped") else "done"
            self.report = {k: v for k, v in event.items() if k not in ("event", "time", "table")}
            self.rows = list(event.get("table", self.rows))
            self.output = str(event.get("markdown", ""))
        self._log(event)

    @property
    def fraction(self) -> float:
        if self.status == "done":
            return 1.0
        if self.in_phase and self.phase.name in ("rendering", "scoring") and self.phase.total:
            return self.phase.fraction
        if not self.methods:
            return 0.0
        current = min(1.0, self.step / self.total) if self.total and self.finished_runs < len(self.methods) else 0.0
        return min(1.0, (self.finished_runs + current) / len(self.methods))

    def progress_text(self) -> str:
        count = len(self.methods) or "?"
        trained = f"{self.finished_runs}/{count} methods trained"
        if self.finished:
            return trained
        if self.phase.name in ("rendering", "scoring") or self.finished_runs >= (len(self.methods) or math.inf):
            return f"{self.phase.progress_text()} · {trained}" if self.phase.name else trained
        if not self.method:
            return trained
        run = f"{self.method} ({min(self.finished_runs + 1, len(self.methods) or 1)}/{count})"
        return f"{run} · {self.phase.progress_text() if self.in_phase else self.step_text()}"

    def status_text(self) -> str:
        if self.status == "stop requested" and self.phase.name in ("rendering", "scoring"):
            return "stop requested: the rendering ends within a denoising step"
        if self.status == "stop requested":
            return ("stop requested: the current method saves and ends; the methods that finished are still "
                    "rendered (press Stop again to skip that)")
        if self.status == "training" and self.method:
            return f"training {self.method}"
        if self.method and self.status in ("loading", "caching", "saving") and self.finished_runs < len(self.methods):
            return f"{STATUS_LABELS[self.status]} ({self.method})"
        return super().status_text()


VIEWS: dict[str, type[JobView]] = {"train": JobView, "compare": CompareView}
