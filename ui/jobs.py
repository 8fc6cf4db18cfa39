"""One training job at a time, in a worker process, with all of its state on disk.

``JobRunner.start(config)`` writes ``jobs/<id>/config.toml`` (the exact TOML the CLI reads) and starts
``python -m ui.worker`` on it, which calls :func:`trainer.loop.train`. The job's record (``job.json``: pid, output
folder, where its events start in ``events.jsonl``) and ``jobs/current.json`` live in the workspace, so a reloaded
page — or a restarted server — finds the running job again. :class:`JobView` folds the job's events (read
incrementally with :func:`trainer.events.read_events`) into what the UI shows: progress, losses, previews, saves,
a log and the final status.

Stop writes the ``STOP`` file into the output folder; the trainer sees it at the next step, saves and ends. A
second start while a job runs raises :class:`JobBusy` with a message for the user.

``JobRunner.start_compare(config, methods, out_dir)`` runs a method comparison (:func:`trainer.compare.compare`)
as such a job: the job folder also holds ``compare.json`` (methods, report folder, per-method overrides), which
tells the worker what to run, and :class:`CompareView` folds its events. Training and comparing share the one-job
limit.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import math
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trainer.events import describe, format_seconds, read_events

JOB_FILE = "job.json"
EXIT_FILE = "exit.json"
LOG_FILE = "worker.log"
CONFIG_FILE = "config.toml"
CURRENT_FILE = "current.json"
COMPARE_FILE = "compare.json"  # in a job folder: the job is a method comparison (methods, folder, overrides)
STOP_FILE = "STOP"
PROJECT_ROOT = Path(__file__).resolve().parents[1]
LOG_LINES = 400


class JobError(RuntimeError):
    """Something the user asked of the job runner that cannot be done; the message says why."""


class JobBusy(JobError):
    """A job is already running."""


@dataclasses.dataclass
class JobRecord:
    id: str
    folder: str
    config_path: str
    output_dir: str
    output_name: str
    events_offset: int = 0  # where this job's events start in output_dir/events.jsonl (runs may share a folder)
    pid: int | None = None
    started: float = 0.0
    stop_requested: bool = False
    max_steps: int = 0
    kind: str = "train"  # train or compare

    @property
    def label(self) -> str:
        return "method comparison" if self.kind == "compare" else "training job"

    @property
    def events_path(self) -> Path:
        return Path(self.output_dir) / "events.jsonl"

    @property
    def stop_path(self) -> Path:
        return Path(self.output_dir) / STOP_FILE

    def save(self) -> None:
        from methods.files import atomic_write_bytes

        atomic_write_bytes(Path(self.folder) / JOB_FILE, json.dumps(dataclasses.asdict(self), indent=1).encode())

    @classmethod
    def load(cls, folder: Path) -> JobRecord | None:
        try:
            data = json.loads((folder / JOB_FILE).read_text(encoding="utf-8"))
            known = {f.name for f in dataclasses.fields(cls)}
            return cls(**{k: v for k, v in data.items() if k in known})
        except (OSError, ValueError, TypeError):
            return None

    def exit_info(self) -> dict[str, Any] | None:
        try:
            return json.loads((Path(self.folder) / EXIT_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None


# ----- what a job shows --------------------------------------------------------------------------------------
@dataclasses.dataclass
class JobView:
    """A job's events folded into UI state. ``version`` changes whenever anything shown changes."""

    job_id: str
    offset: int = 0
    status: str = "starting"  # starting, loading, training, stopping, done, stopped, error
    finished: bool = False
    step: int = 0
    total: int = 0
    its: float | None = None
    eta: float | None = None
    losses: list[tuple[int, float]] = dataclasses.field(default_factory=list)
    validation: list[tuple[int, float]] = dataclasses.field(default_factory=list)
    previews: list[str] = dataclasses.field(default_factory=list)
    saves: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    log: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=LOG_LINES))
    error: str = ""
    output: str = ""
    summary: dict[str, Any] = dataclasses.field(default_factory=dict)
    version: int = 0

    # ----- events
    def apply(self, event: dict[str, Any]) -> None:
        """Fold one event into the state shown; its log line is :func:`trainer.events.describe`'s (as the CLI's)."""
        kind = event.get("event", "")
        if kind == "start":
            self.status = "loading"
            self.total = int(event.get("config", {}).get("train", {}).get("max_steps", 0) or 0)
        elif kind == "ready":
            self.status = "training"
            self.summary = {k: v for k, v in event.items() if k not in ("event", "time")}
            self.total = int(event.get("total_steps") or self.total)
        elif kind == "step":
            if self.status in ("starting", "loading"):
                self.status = "training"
            self.step = int(event.get("step", self.step))
            self.total = int(event.get("total") or self.total)
            self.its = event.get("its")
            self.eta = event.get("eta_seconds")
            loss = event.get("loss")
            if isinstance(loss, int | float):
                self.losses.append((self.step, float(loss)))
        elif kind == "validation":
            self.validation.append((int(event.get("step", 0)), float(event.get("loss", 0.0))))
        elif kind == "preview":
            paths = event.get("paths", [])
            self.previews.extend([p for p in paths if "_grid" not in Path(p).stem] or paths)
        elif kind == "save":
            self.saves.append({k: v for k, v in event.items() if k != "event"})
        elif kind == "stopping":
            self.status = "stopping"
        elif kind == "done":
            self.finished = True
            self.status = "stopped" if event.get("stopped") else "done"
            self.output = event.get("output") or ""
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

    def _log(self, event: dict[str, Any]) -> None:
        line = describe(event)
        if line:
            stamp = time.strftime("%H:%M:%S", time.localtime(event.get("time", time.time())))
            self.log.append(f"[{stamp}] {line}")

    def fail(self, message: str) -> None:
        self.finished = True
        self.status = "error"
        self.error = message
        self.log.append(f"[{time.strftime('%H:%M:%S')}] error: {message}")
        self.version += 1

    # ----- text
    @property
    def fraction(self) -> float:
        if self.status == "done":
            return 1.0
        return min(1.0, self.step / self.total) if self.total else 0.0

    def progress_text(self) -> str:
        parts = [f"step {self.step}/{self.total or '?'}"]
        if self.its:
            parts.append(f"{self.its:.2f} it/s")
        if not self.finished and self.eta is not None:
            parts.append(f"ETA {format_seconds(self.eta)}")
        return " · ".join(parts)

    def status_text(self) -> str:
        labels = {"starting": "starting the worker", "loading": "loading the model and data",
                  "training": "training", "stopping": "stopping (saving)",
                  "stop requested": "stop requested: the run saves and ends after the current step", "done": "finished",
                  "stopped": "stopped early (saved)", "error": "failed"}
        text = labels.get(self.status, self.status)
        return f"{text}: {self.error}" if self.status == "error" and self.error else text


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

    def apply(self, event: dict[str, Any]) -> None:
        kind = event.get("event", "")
        method = event.get("method")
        if kind.startswith("compare_"):
            self._apply_compare(kind, event)
        elif method and kind in ("done", "error"):  # one run ended, not the comparison
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
            self.status = "loading"
        elif kind == "compare_method_start":
            self.method, self.step, self.losses, self.its, self.eta = event.get("method", ""), 0, [], None, None
            self.status = "loading"
        elif kind == "compare_method_done":
            self.finished_runs += 1
            self.rows.append(event.get("row", {}))
        elif kind == "compare_render":
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
        if not self.methods:
            return 0.0
        current = min(1.0, self.step / self.total) if self.total and self.finished_runs < len(self.methods) else 0.0
        return min(1.0, (self.finished_runs + current) / len(self.methods))

    def progress_text(self) -> str:
        count = len(self.methods) or "?"
        if self.status == "rendering" or self.finished:
            return f"{self.finished_runs}/{count} methods trained"
        run = f"{self.method} ({min(self.finished_runs + 1, len(self.methods) or 1)}/{count})"
        return f"{run} · {super().progress_text()}" if self.method else f"{self.finished_runs}/{count} methods"

    def status_text(self) -> str:
        if self.status == "rendering":
            return "rendering previews and scoring the adapters"
        if self.status == "training" and self.method:
            return f"training {self.method}"
        return super().status_text()


VIEWS: dict[str, type[JobView]] = {"train": JobView, "compare": CompareView}


# ----- the runner --------------------------------------------------------------------------------------------
WorkerCommand = Callable[[Path, Path], list[str]]


def worker_command(config_path: Path, job_folder: Path) -> list[str]:
    return [sys.executable, "-m", "ui.worker", "--config", str(config_path), "--job-dir", str(job_folder)]


class JobRunner:
    def __init__(self, jobs_dir: str | os.PathLike, command: WorkerCommand = worker_command):
        self.jobs_dir = Path(jobs_dir)
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.command = command
        self._processes: dict[str, subprocess.Popen] = {}
        self._views: dict[str, JobView] = {}
        self._lock = threading.RLock()

    # ----- records
    def current(self) -> JobRecord | None:
        try:
            job_id = json.loads((self.jobs_dir / CURRENT_FILE).read_text(encoding="utf-8"))["id"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return self.record(job_id)

    def record(self, job_id: str) -> JobRecord | None:
        if not job_id or "/" in job_id or job_id.startswith("."):
            return None
        return JobRecord.load(self.jobs_dir / job_id)

    def history(self) -> list[JobRecord]:
        """Every job in the workspace, newest first."""
        records = [JobRecord.load(folder) for folder in self.jobs_dir.iterdir() if folder.is_dir()]
        return sorted((r for r in records if r is not None), key=lambda r: r.started, reverse=True)

    def is_running(self, record: JobRecord) -> bool:
        process = self._processes.get(record.id)
        if process is not None:
            return process.poll() is None
        if record.exit_info() is not None or not record.pid:
            return False
        return _pid_alive(record.pid, record.folder)

    def running(self) -> JobRecord | None:
        record = self.current()
        return record if record is not None and self.is_running(record) else None

    # ----- control
    def start(self, config: Any) -> JobRecord:
        """Start training ``config`` (a validated TrainerConfig) in a worker; JobBusy if a job is running."""
        with self._lock, _file_lock(self.jobs_dir / ".lock"):
            self._refuse_if_busy()
            output_dir = Path(config.output.dir).expanduser().resolve()
            output_file = output_dir / f"{config.output.name}.safetensors"
            if output_file.exists() and not config.output.overwrite:
                raise JobError(f"{output_file} already exists: change the output name or tick "
                               "output.overwrite (Advanced).")
            return self._launch(config, output_dir, config.output.name, int(config.train.max_steps))

    def start_compare(self, config: Any, methods: list[str], out_dir: str | os.PathLike,
                      overrides: dict[str, dict[str, Any]] | None = None,
                      drift_prompts: list[str] | None = None) -> JobRecord:
        """Start a method comparison (trainer.compare) of ``config`` into the new folder ``out_dir``."""
        with self._lock, _file_lock(self.jobs_dir / ".lock"):
            self._refuse_if_busy()
            output_dir = Path(out_dir).expanduser().resolve()
            if output_dir.exists() and any(output_dir.iterdir()):
                raise JobError(f"{output_dir} already exists and is not empty: a comparison never replaces an "
                               "earlier one.")
            spec = {"methods": list(methods), "out_dir": str(output_dir), "overrides": overrides or {},
                    "drift_prompts": list(drift_prompts or []) or None}
            return self._launch(config, output_dir, output_dir.name, int(config.train.max_steps) * len(methods),
                                kind="compare", spec=spec)

    def _refuse_if_busy(self) -> None:
        current = self.current()
        # A job that wrote its last event ("done"/"error") is over, even while its process is still exiting.
        if current is not None and self.is_running(current) and not (view := self.view(current)).finished:
            raise JobBusy(f"A {current.label} is already running ({current.output_name}, {view.status_text()}, "
                          f"{view.progress_text()}). Only one job runs at a time: stop it or wait until it ends.")

    def _launch(self, config: Any, output_dir: Path, output_name: str, max_steps: int, kind: str = "train",
                spec: dict[str, Any] | None = None) -> JobRecord:
        """Write the job folder (config, and the comparison's spec) and start the worker on it."""
        output_dir.mkdir(parents=True, exist_ok=True)
        job_id = time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)
        folder = self.jobs_dir / job_id
        folder.mkdir(parents=True)
        config_path = folder / CONFIG_FILE
        config_path.write_text(config.to_toml(), encoding="utf-8")
        if spec is not None:
            (folder / COMPARE_FILE).write_text(json.dumps(spec, indent=1), encoding="utf-8")
        events = output_dir / "events.jsonl"
        record = JobRecord(job_id, str(folder), str(config_path), str(output_dir), output_name,
                           events.stat().st_size if events.exists() else 0, None, time.time(),
                           max_steps=max_steps, kind=kind)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT), *filter(None, [env.get("PYTHONPATH")])])
        env.setdefault("PYTHONUNBUFFERED", "1")
        with (folder / LOG_FILE).open("wb") as log:
            process = subprocess.Popen(self.command(config_path, folder), stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, cwd=os.getcwd(), env=env)
        self._processes[job_id] = process
        record.pid = process.pid
        record.save()
        from methods.files import atomic_write_bytes

        atomic_write_bytes(self.jobs_dir / CURRENT_FILE, json.dumps({"id": job_id}).encode())
        return record

    def stop(self) -> JobRecord:
        """Ask the running job to stop: it saves its adapter at the next step and ends."""
        with self._lock:
            record = self.current()
            if record is None or not self.is_running(record):
                raise JobError("No training job is running.")
            record.stop_path.write_text("stop requested from the web UI\n", encoding="utf-8")
            record.stop_requested = True
            record.save()
            return record

    def kill(self, record: JobRecord | None = None, timeout: float = 10.0) -> None:
        """End the worker at once (no save). For shutdown and tests; users use stop()."""
        record = record or self.current()
        if record is None:
            return
        process = self._processes.get(record.id)
        if process is not None:
            if process.poll() is None:
                process.kill()
                process.wait(timeout)
        elif record.pid and self.is_running(record):
            with contextlib.suppress(ProcessLookupError):
                os.kill(record.pid, 9)

    # ----- reading
    def view(self, record: JobRecord) -> JobView:
        """The job's state, updated with the events written since the last call."""
        with self._lock:
            record = self.record(record.id) or record  # stop_requested may have been set by another call
            view = self._views.get(record.id)
            if view is None:
                view = self._views[record.id] = VIEWS.get(record.kind, JobView)(record.id, offset=record.events_offset)
            if view.finished:
                return view
            running = self.is_running(record)  # before reading: events written before the exit are all there
            try:
                events, view.offset = read_events(record.events_path, view.offset)
            except (OSError, ValueError) as error:
                events = []
                view.log.append(f"cannot read {record.events_path}: {error}")
            for event in events:
                view.apply(event)
            if not view.finished and running and record.stop_requested and view.status != "stopping":
                if not record.stop_path.exists():  # the trainer clears STOP when it starts: ask again
                    with contextlib.suppress(OSError):
                        record.stop_path.write_text("stop requested from the web UI\n", encoding="utf-8")
                if view.status != "stop requested":
                    view.status = "stop requested"
                    view.version += 1
            if not view.finished and not running:
                view.fail(self._failure(record))
            return view

    def _failure(self, record: JobRecord) -> str:
        info = record.exit_info()
        if info and info.get("message"):
            return str(info["message"])
        process = self._processes.get(record.id)
        code = process.returncode if process is not None else None
        tail = log_tail(Path(record.folder) / LOG_FILE, 6)
        return ("the training process ended unexpectedly" + (f" (exit code {code})" if code is not None else "")
                + (f"; last output: {tail}" if tail else ""))

    def log_path(self, record: JobRecord) -> Path:
        return Path(record.folder) / LOG_FILE


def log_tail(path: Path, lines: int = 20) -> str:
    try:
        with path.open("rb") as stream:
            stream.seek(0, os.SEEK_END)
            size = stream.tell()
            stream.seek(max(0, size - 8192))
            text = stream.read().decode("utf-8", "replace")
    except OSError:
        return ""
    text = text.replace("\r", "\n")
    return " | ".join([line.strip() for line in text.splitlines() if line.strip()][-lines:])


def _pid_alive(pid: int, marker: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    proc = Path("/proc") / str(pid)
    if proc.is_dir():
        try:
            if (proc / "stat").read_text().split(") ", 1)[1].startswith("Z"):
                return False  # a zombie: finished, not yet reaped
            return marker in (proc / "cmdline").read_bytes().decode("utf-8", "replace")
        except (OSError, IndexError):
            return False
    return True


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive lock across processes (two servers on one workspace) where fcntl exists."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
