"""What a run tells the world: typed events, their one-line text, a JSON-lines log, TensorBoard, stop requests.

Every event is a small dataclass (:class:`Step`, :class:`Save`, …). :meth:`EventLog.emit` writes it to
``events.jsonl`` as ``{"event": KIND, "time": …, **fields}`` and passes the same dict to ``on_event`` callbacks.
:func:`describe` turns such a dict — live or read back from an old log — into the one line of text that both the
command line (``trainer.cli``) and the web UI's job log (``ui.jobs``) show, so the two never disagree.

A stop can be requested from another thread (:meth:`StopSignal.request`) or another process (the ``STOP`` file).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

log = logging.getLogger("rankwright")

EventCallback = Callable[[dict[str, Any]], None]


class TrainingError(RuntimeError):
    """The run could not continue (NaN loss, unusable data, nowhere to save); the message says what was kept."""


class StopRequested(Exception):
    """A stop asked for before training began (while scanning, loading or caching): the run ends, nothing saved."""


class StopSignal:
    """Set by SIGINT/SIGTERM, the UI's Stop button (through a file) or code; checked once per step (and per
    denoising step while previews render: see :meth:`requested_since`)."""

    def __init__(self, stop_file: Path | None = None):
        self._event = threading.Event()
        self.reason = ""
        self.stop_file = stop_file
        self.requests = 0  # how many times a stop was asked for in this process

    def request(self, reason: str = "stop requested") -> None:
        self.reason = self.reason or reason
        self.requests += 1
        self._event.set()

    def requested_since(self, mark: tuple[int, float]) -> bool:
        """Whether a stop was asked for after :meth:`mark` was taken: a new request in this process, or a stop file
        written since. A phase that runs after an earlier stop (a comparison renders the methods that finished)
        ends on a second Stop."""
        requests, started = mark
        if self.requests > requests:
            return True
        try:
            return self.stop_file is not None and self.stop_file.stat().st_mtime > started
        except OSError:
            return False

    def mark(self) -> tuple[int, float]:
        self.requested()
        return self.requests, time.time()

    def requested(self) -> bool:
        if not self._event.is_set() and self.stop_file is not None and self.stop_file.exists():
            self.request(f"stop file {self.stop_file.name} found")
        return self._event.is_set()


# ----- the events ------------------------------------------------------------------------------------------------
# Every field has a default: describe() also reads logs written by older versions, which may lack a field.
@dataclasses.dataclass
class Event:
    KIND: ClassVar[str] = ""
    ON_CLI: ClassVar[bool] = True  # printed by `python -m trainer train` (which shows steps as a progress bar)

    def text(self) -> str | None:
        """The line shown for this event (None: nothing to show)."""
        return None

    def fields(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Start(Event):
    KIND = "start"
    ON_CLI = False
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    processes: int = 1
    resume: str | None = None

    def text(self) -> str:
        config = self.config
        output = config.get("output", {})
        return (f"started: {config.get('network', {}).get('method', '?')} on {config.get('model', {}).get('base', '?')}"
                f", output {output.get('dir', '?')}/{output.get('name', '?')}")


@dataclasses.dataclass
class SkippedImage(Event):
    KIND = "skipped_image"
    path: str = ""
    reason: str = ""

    def text(self) -> str:
        return f"skipped image {self.path}: {self.reason}"


@dataclasses.dataclass
class RunWarning(Event):
    KIND = "warning"
    message: str = ""

    def text(self) -> str:
        return f"warning: {self.message}"


@dataclasses.dataclass
class Model(Event):
    KIND = "model"
    ON_CLI = False
    arch: str = ""
    prediction_type: str = ""
    source: str = ""
    base: str = ""
    variant: str = ""  # SD3/Flux: sd3.5-large, flux-dev, …

    def text(self) -> str:
        variant = f" {self.variant}" if self.variant else ""
        return f"model: {self.arch}{variant} ({self.prediction_type}) from {self.source}"


@dataclasses.dataclass
class Ready(Event):
    """The model is loaded, latents are cached, the optimizer is built: training starts."""

    KIND = "ready"
    seconds: float = 0.0
    method: str = ""
    modules: dict[str, int] = dataclasses.field(default_factory=dict)
    trainable_parameters: int = 0
    parameter_groups: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    train_text_encoder: bool = False
    images: int = 0
    samples_per_epoch: int = 0
    batches_per_epoch: int = 0
    steps_per_epoch: int = 0
    total_steps: int = 0
    global_batch_size: int = 0
    latents_cached: bool = False
    text_embeddings_cached: bool = False
    buckets: dict[Any, Any] = dataclasses.field(default_factory=dict)
    skipped_images: int = 0
    device: str = ""
    processes: int = 1
    start_step: int = 0
    preserved_words: list[str] = dataclasses.field(default_factory=list)  # train.output_preservation_weight's trigger
    trigger_vectors: str = ""  # the word whose token vectors train too (train.embedding_lr), "" when none

    def text(self) -> str:
        modules = ", ".join(f"{part.removeprefix('lora_')} {count}" for part, count in self.modules.items())
        preserved = (f"; outputs without {', '.join(repr(w) for w in self.preserved_words)} held to the base model"
                     if self.preserved_words else "")
        if self.trigger_vectors:
            preserved += f"; the token vectors of {self.trigger_vectors!r} trained too"
        return (f"ready in {self.seconds} s: training {self.method} ({self.trainable_parameters:,} parameters in "
                f"{modules or 'no'} modules) on {self.images} image(s) with repeats for {self.total_steps} steps on "
                f"{self.processes} × {self.device}{preserved}")


@dataclasses.dataclass
class Resumed(Event):
    KIND = "resumed"
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    path: str = ""
    kept: str | None = None  # extending a finished run in its own folder: where its final file now is

    def text(self) -> str:
        kept = f"; the finished run's file is kept as {self.kept}" if self.kept else ""
        return f"resumed at step {self.step} from {self.path}{kept}"


@dataclasses.dataclass
class Step(Event):
    KIND = "step"
    ON_CLI = False
    step: int = 0
    total: int = 0
    loss: float | None = None
    lr: float | None = None
    epoch: int = 0
    grad_norm: float | None = None
    its: float | None = None
    eta_seconds: float | None = None

    def text(self) -> str:
        return (f"step {self.step}/{self.total}  loss {_number(self.loss)}  lr {_number(self.lr, 'e')}  "
                f"{_number(self.its)} it/s  ETA {format_seconds(self.eta_seconds)}")


@dataclasses.dataclass
class Memory(Event):
    KIND = "memory"
    ON_CLI = False
    step: int = 0
    peak_mb: float = 0.0


@dataclasses.dataclass
class Compiled(Event):
    """train.compile: a training step compiled new graphs (the first step, or a new bucket shape)."""

    KIND = "compiled"
    step: int = 0
    shape: list[int] = dataclasses.field(default_factory=list)  # the batch's latents (or pixels)
    graphs: int = 0  # new graphs (a graph break splits a model call into several)
    graph_breaks: int = 0
    seconds: float = 0.0  # the step, compiling included
    total_graphs: int = 0  # compiled by this run so far
    limit: int = 0  # recompiles allowed per code object (beyond it Dynamo runs that call eagerly)
    mode: str = ""

    def text(self) -> str:
        shape = "×".join(str(size) for size in self.shape) or "?"
        breaks = f", {self.graph_breaks} graph break(s)" if self.graph_breaks else ""
        return (f"compiled {self.graphs} graph(s) for batch shape {shape} at step {self.step} in {self.seconds} s "
                f"(mode {self.mode}{breaks}; {self.total_graphs} in this run, limit {self.limit})")


@dataclasses.dataclass
class Validation(Event):
    KIND = "validation"
    ON_CLI = False
    step: int = 0
    loss: float | None = None

    def text(self) -> str:
        return f"validation loss {_number(self.loss)} at step {self.step}"


@dataclasses.dataclass
class PriorLoss(Event):
    """The prior loss ratio (trainer.prior): the adapted model's denoising loss on the prior set over the base
    model's on the same noise; 1.0 = unchanged."""

    KIND = "prior"
    step: int = 0
    ratio: float | None = None
    prior_loss: float | None = None  # the adapted model's (the UI plots it beside the training loss)
    base_loss: float | None = None
    concept_loss: float | None = None  # the validation loss of the same step, when one was measured
    images: int = 0
    source: str = ""  # "regularisation images" or "base-model images"

    def text(self) -> str:
        return f"prior loss ratio {_number(self.ratio)} at step {self.step} ({self.images} {self.source})"


@dataclasses.dataclass
class BestCheckpoint(Event):
    """The checkpoint pick (trainer.prior.best_checkpoint) over the run's saves, written to checkpoints.json."""

    KIND = "best_checkpoint"
    step: int = 0
    path: str = ""
    validation_loss: float | None = None
    prior_ratio: float | None = None
    why: str = ""

    def text(self) -> str:
        return f"best checkpoint: step {self.step}, {self.path} ({self.why})"


@dataclasses.dataclass
class Preview(Event):
    KIND = "preview"
    ON_CLI = False
    step: int = 0
    paths: list[str] = dataclasses.field(default_factory=list)
    prompts: list[str] = dataclasses.field(default_factory=list)

    def text(self) -> str:
        images = [p for p in self.paths if "_grid" not in Path(p).stem] or self.paths
        return f"preview at step {self.step}: {len(images)} image(s)"


@dataclasses.dataclass
class Save(Event):
    """An adapter file was written, reloaded into fresh adapters and compared with the live weights."""

    KIND = "save"
    step: int = 0
    path: str = ""
    final: bool = False
    state: str | None = None
    size_bytes: int | None = None
    seconds: float = 0.0
    ema: bool = False
    check_modules: int = 0
    check_missing: int = 0
    check_unmatched: int = 0
    check_max_difference: float | None = None
    check_max_relative_difference: float | None = None
    check_tolerance: float | None = None
    check_ok: bool = False

    def text(self) -> str:
        check = "self-check ok" if self.check_ok else "SELF-CHECK FAILED"
        size = f"{self.size_bytes / 1e6:.1f} MB, " if isinstance(self.size_bytes, int | float) else ""
        return (f"saved {self.path} at step {self.step} ({size}{check}, max difference "
                f"{_number(self.check_max_difference, '.1e')})")


@dataclasses.dataclass
class SaveFailed(Event):
    """The file system refused a save (disk full, read-only, no permission); the trained weights are still in
    memory. A final save then goes to ``next_path``; an intermediate one is skipped and training goes on."""

    KIND = "save_failed"
    step: int = 0
    path: str = ""
    final: bool = False
    error: str = ""
    needed_bytes: int | None = None
    free_bytes: int | None = None
    next_path: str | None = None

    def text(self) -> str:
        space = f"needs {_megabytes(self.needed_bytes)}"
        if isinstance(self.free_bytes, int | float):
            space += f", {_megabytes(self.free_bytes)} free"
        then = ("trying the same path again" if self.next_path == self.path
                else f"writing it to {self.next_path} instead" if self.next_path
                else "training goes on; the next save tries again" if not self.final else "nowhere left to try")
        return f"could not write {self.path} at step {self.step} ({self.error}; {space}): {then}"


@dataclasses.dataclass
class Stopping(Event):
    KIND = "stopping"
    step: int = 0
    reason: str = ""
    saving: bool = True  # False: stopped before any training step, nothing to save

    def text(self) -> str:
        return f"stopping at step {self.step} ({self.reason}); {'saving' if self.saving else 'nothing to save'}"


@dataclasses.dataclass
class Done(Event):
    KIND = "done"
    step: int = 0
    output: str | None = None
    stopped: bool = False
    reason: str = ""
    state: str | None = None
    peak_mb: float | None = None
    seconds_to_ready: float = 0.0
    seconds_to_first_step: float = 0.0
    best_checkpoint: str | None = None  # trainer.prior.best_checkpoint's pick among the saves (checkpoints.json)

    def text(self) -> str:
        peak = f"; peak memory {self.peak_mb:.0f} MB" if isinstance(self.peak_mb, int | float) else ""
        ended = "stopped" if self.stopped else "done"
        return f"{ended} after {self.step} steps: {self.output or 'nothing saved'}{peak}"


@dataclasses.dataclass
class RunError(Event):
    KIND = "error"
    ON_CLI = False  # the command line prints the exception itself
    message: str = "unknown error"
    kind: str = ""
    last_good_save: str | None = None

    def text(self) -> str:
        return f"error: {self.message}" + (f" (last good save: {self.last_good_save})" if self.last_good_save else "")


PHASE_LABELS = {"loading": "loading the model", "caching": "caching latents", "training": "training",
                "previews": "rendering previews", "rendering": "rendering the comparison", "scoring": "scoring",
                "saving": "saving", "prior": "drawing the prior images"}


@dataclasses.dataclass
class Phase(Event):
    """Progress of a phase that is not a training step (:data:`PHASE_LABELS`): ``done`` of ``total`` units
    (images, denoising steps), with an ETA once one unit is done. Sent when the phase starts and then at most
    about once a second (:class:`PhaseProgress`)."""

    KIND = "phase"
    ON_CLI = False
    phase: str = ""
    done: int = 0
    total: int = 0
    unit: str = ""
    eta_seconds: float | None = None
    detail: str = ""

    def text(self) -> str | None:
        if self.done:
            return None  # the log shows where a phase starts; its progress is the progress bar's
        detail = f" ({self.detail})" if self.detail else ""
        count = f": {self.total} {self.unit}" if self.total else ""
        return f"{PHASE_LABELS.get(self.phase, self.phase)}{detail}{count}"


class PhaseProgress:
    """Counts a phase's units and emits :class:`Phase` events: at the start, then at most every ``interval``
    seconds and at the end. ``advance()`` raises ``stopped`` (an exception) once ``should_stop()`` is true."""

    def __init__(self, emit: Callable[[Event], Any], phase: str, total: int, unit: str = "", detail: str = "",
                 should_stop: Callable[[], bool] | None = None, stopped: type[BaseException] | None = None,
                 interval: float = 1.0):
        self.emit, self.phase, self.total, self.unit, self.detail = emit, phase, max(0, int(total)), unit, detail
        self.should_stop, self.stopped, self.interval = should_stop, stopped, interval
        self.done = 0
        self.started = self.last = time.time()
        emit(Phase(phase=phase, done=0, total=self.total, unit=unit, detail=detail))

    def advance(self, count: int = 1) -> None:
        if self.should_stop is not None and self.should_stop():
            raise (self.stopped or KeyboardInterrupt)(f"stop requested while {PHASE_LABELS.get(self.phase)}")
        self.done += count
        self.total = max(self.total, self.done)  # an estimated total grows rather than overflows
        now = time.time()
        if now - self.last >= self.interval or self.done == self.total:
            self.last = now
            rate = self.done / (now - self.started) if now > self.started else 0.0
            eta = (self.total - self.done) / rate if rate else None
            self.emit(Phase(phase=self.phase, done=self.done, total=self.total, unit=self.unit,
                            eta_seconds=round(eta, 1) if eta is not None else None, detail=self.detail))


def phase_progress(emit: Callable[[Event], Any], phase: str, unit: str = "images") -> Callable[[int, int], None]:
    """A ``progress(done, total)`` callback emitting ``phase`` events (a count and an ETA)."""
    counter = PhaseProgress(emit, phase, 0, unit)

    def progress(done: int, total: int) -> None:
        counter.total = total
        counter.advance(done - counter.done)

    return progress


# A method comparison (trainer.compare) emits these around the runs' own events, which carry a "method" field.
@dataclasses.dataclass
class CompareStart(Event):
    KIND = "compare_start"
    folder: str = ""
    methods: list[str] = dataclasses.field(default_factory=list)
    steps: int = 0
    base: str = ""

    def text(self) -> str:
        return f"comparing {', '.join(self.methods)} on {self.base} → {self.folder}"


@dataclasses.dataclass
class CompareMethodStart(Event):
    KIND = "compare_method_start"
    method: str = ""
    index: int = 0
    count: int = 0
    dropped_options: list[str] = dataclasses.field(default_factory=list)

    def text(self) -> str:
        dropped = ""
        if self.dropped_options:
            dropped = f" (options not accepted, left out: {', '.join(self.dropped_options)})"
        return f"[{self.index + 1}/{self.count}] {self.method}{dropped}"


@dataclasses.dataclass
class CompareMethodDone(Event):
    KIND = "compare_method_done"
    method: str = ""
    status: str = ""
    message: str = ""
    row: dict[str, Any] = dataclasses.field(default_factory=dict)

    def text(self) -> str | None:
        if self.status not in ("failed", "skipped"):
            return None  # its own "done" event said it
        return f"{self.method}: {self.status}" + (f": {self.message}" if self.message else "")


@dataclasses.dataclass
class CompareRender(Event):
    KIND = "compare_render"
    row: str = ""
    index: int = 0
    total: int = 0

    def text(self) -> str:
        return f"rendering previews and prior drift: {self.row} ({self.index + 1}/{self.total})"


@dataclasses.dataclass
class CompareDone(Event):
    KIND = "compare_done"
    ON_CLI = False  # the command prints the report's table instead
    markdown: str = ""
    stopped: bool = False

    def text(self) -> str:
        return f"report written: {self.markdown}"


EVENT_TYPES: dict[str, type[Event]] = {cls.KIND: cls for cls in (
    Start, SkippedImage, RunWarning, Model, Ready, Resumed, Step, Memory, Compiled, Validation, PriorLoss,
    BestCheckpoint, Preview, Save, SaveFailed, Stopping, Done, RunError, Phase, CompareStart, CompareMethodStart,
    CompareMethodDone, CompareRender, CompareDone)}


def parse_event(event: dict[str, Any]) -> Event | None:
    """The typed event of a dict (unknown keys ignored, missing ones at their defaults), None for an unknown kind."""
    cls = EVENT_TYPES.get(event.get("event", ""))
    if cls is None:
        return None
    names = {field.name for field in dataclasses.fields(cls)}
    return cls(**{key: value for key, value in event.items() if key in names})


def describe(event: dict[str, Any], *, cli: bool = False) -> str | None:
    """The one line shown for an event dict, or None. ``cli``: only what the command line prints.

    Events of one run inside a method comparison carry its ``method`` and are prefixed with it.
    """
    typed = parse_event(event)
    if typed is None:
        if cli:
            return None
        fields = {key: value for key, value in event.items() if key not in ("event", "time")}
        return f"{event.get('event', '?')}: " + json.dumps(fields, default=str)[:300]
    if cli and not typed.ON_CLI:
        return None
    try:
        text = typed.text()
    except (TypeError, ValueError, AttributeError):  # a hand-edited or foreign log: show it raw, never crash
        text = f"{typed.KIND}: {json.dumps(typed.fields(), default=str)[:300]}"
    method = event.get("method")
    if text and method and not typed.KIND.startswith("compare_"):
        text = f"[{method}] {text}"
    return text


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(float(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


def _megabytes(size: Any) -> str:
    return f"{size / 1e6:.1f} MB" if isinstance(size, int | float) else "? MB"


def _number(value: Any, style: str = ".4f") -> str:
    if not isinstance(value, int | float):
        return "?"
    return format(value, ".2e" if style == "e" else style)


# ----- where events go -----------------------------------------------------------------------------------------
class EventLog:
    """Appends events to ``events.jsonl`` and forwards them to callbacks and TensorBoard (main process only)."""

    def __init__(self, folder: Path | None, callbacks: list[EventCallback] | None = None,
                 tensorboard: bool = False, enabled: bool = True):
        self.enabled = enabled
        self.callbacks = list(callbacks or [])
        self.path = folder / "events.jsonl" if folder is not None and enabled else None
        self._writer = None
        self._wandb = None  # a wandb run (add_wandb)
        self._log_failed = False
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        if tensorboard and enabled and folder is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(folder / "tensorboard"))
            except ImportError:  # tensorboard is optional
                log.warning("TensorBoard logging is on but tensorboard is not installed (pip install tensorboard)")

    def emit(self, event: Event | str, /, **fields: Any) -> dict[str, Any]:
        """Log a typed event (or, for callers that pass their own kinds through, a kind and its fields)."""
        if isinstance(event, Event):
            event, fields = event.KIND, event.fields()
        record = {"event": event, "time": time.time(), **fields}
        if not self.enabled:
            return record
        if self.path is not None:
            try:
                with self.path.open("a", encoding="utf-8") as stream:
                    stream.write(json.dumps(record, default=str) + "\n")
            except OSError as error:  # a full disk must not end the run over its log; callbacks still get it
                if not self._log_failed:
                    log.warning("cannot append to %s (%s); events go to the callbacks only until it works again",
                                self.path, error.strerror or error)
                self._log_failed = True
            else:
                self._log_failed = False
        for callback in self.callbacks:
            try:
                callback(record)
            except Exception:  # a listener must never stop training
                log.exception("event callback failed for %s", event)
        return record

    @property
    def has_tensorboard(self) -> bool:
        """Whether scalars go anywhere (TensorBoard, or Weights & Biases once :meth:`add_wandb` was called)."""
        return (self._writer is not None or self._wandb is not None) and self.enabled

    def add_wandb(self, project: str, run_name: str, config: dict[str, Any], folder: Path) -> None:
        """Send scalars to Weights & Biases too (``output.wandb_project``); the package is imported only here."""
        if not self.enabled:
            return
        try:
            import wandb
        except ImportError:
            from methods.base import ConfigError

            raise ConfigError(f"output.wandb_project = {project!r} needs the wandb package (pip install wandb, then "
                              "wandb login); or leave output.wandb_project empty") from None
        self._wandb = wandb.init(project=project, name=run_name, config=config, dir=str(folder))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self._writer is not None and self.enabled:
            for name, value in values.items():
                self._writer.add_scalar(name, value, step)
        if self._wandb is not None and self.enabled:
            self._wandb.log(dict(values), step=step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def read_events(path: Path, start: int = 0) -> tuple[list[dict[str, Any]], int]:
    """Events appended since byte offset ``start`` (complete lines only) and the new offset."""
    if not path.exists():
        return [], start
    with path.open("rb") as stream:
        stream.seek(start)
        data = stream.read()
    end = data.rfind(b"\n") + 1
    events = [json.loads(line) for line in data[:end].splitlines() if line.strip()]
    return events, start + end
