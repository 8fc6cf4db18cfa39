"""Jobs run one at a time, in a worker process, from a queue; all of their state is on disk.

``JobRunner.submit(config)`` writes ``jobs/<id>/config.toml`` (the exact TOML the CLI reads) and ``job.json`` and
puts the job at the end of the queue (``jobs/queue.json``, written atomically). :meth:`JobRunner.dispatch` — called
by a background thread of the server (:meth:`JobRunner.start_dispatcher`) and after every submit — starts the first
queued job in ``python -m ui.worker`` once no job runs; the worker calls :func:`trainer.loop.train`. The queue can be
reordered and queued jobs removed; since it lives in the workspace, a reloaded page or a restarted server finds it
(and the running job, through ``jobs/current.json`` and the worker's pid) as it was. :class:`ui.views.JobView`
folds the job's events (read incrementally with :func:`trainer.events.read_events`) into what the UI shows.

Stop writes the ``STOP`` file into the output folder; the trainer checks it every step (and every denoising step of
previews, every cached batch): it saves and ends within seconds. ``JobRunner.start(config)`` starts a job at once
and raises :class:`JobBusy` while another runs (what the queue calls when it is the job's turn).

A comparison (:meth:`JobRunner.submit_compare`, :func:`trainer.compare.compare`) is such a job: its folder also
holds ``compare.json`` (methods, report folder, per-method overrides), which tells the worker what to run. A job
that continues a run from its saved state holds ``resume.json`` (the state folder; ``train(config, resume=...)``).

When the file system refuses a run's last save, the worker waits with the weights in memory and asks through the job
folder (``save_failed.json``, see :func:`ui.worker.save_error_handler`); :meth:`JobRunner.save_question` reads the
question and :meth:`JobRunner.answer_save` writes the answer — retry the same path, or the rescue folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trainer.events import read_events

from .views import LOG_LINES, VIEWS, CompareView, JobView  # noqa: F401  (re-exported: tests and scripts use them)

JOB_FILE = "job.json"
EXIT_FILE = "exit.json"
LOG_FILE = "worker.log"
CONFIG_FILE = "config.toml"
CURRENT_FILE = "current.json"
QUEUE_FILE = "queue.json"
COMPARE_FILE = "compare.json"  # in a job folder: the job is a method comparison (methods, folder, overrides)
RESUME_FILE = "resume.json"  # in a job folder: the run continues from {"state": folder}
SAVE_QUESTION_FILE = "save_failed.json"  # in a job folder: the worker's last save was refused, it waits for…
SAVE_ANSWER_FILE = "save_retry.json"  # …the UI's answer: {"id": the question's, "action": "retry" | "rescue"}
SAVE_ACTIONS = ("retry", "rescue")
STOP_FILE = "STOP"
PROJECT_ROOT = Path(__file__).resolve().parents[1]
DISPATCH_INTERVAL = 1.0  # seconds between the dispatcher's looks at the queue


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
    started: float = 0.0  # 0 while queued
    stop_requested: bool = False
    max_steps: int = 0
    kind: str = "train"  # train or compare
    queued: float = 0.0  # when it was submitted
    description: str = ""  # what the queue shows: method, steps, resume …

    @property
    def label(self) -> str:
        return "method comparison" if self.kind == "compare" else "training job"

    @property
    def is_queued(self) -> bool:
        return not self.started

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


# ----- the runner --------------------------------------------------------------------------------------------
WorkerCommand = Callable[[Path, Path], list[str]]


def worker_command(config_path: Path, job_folder: Path) -> list[str]:
    return [sys.executable, "-m", "ui.worker", "--config", str(config_path), "--job-dir", str(job_folder)]


def _write_json(path: Path, data: Any) -> None:
    from methods.files import atomic_write_bytes

    atomic_write_bytes(path, json.dumps(data, indent=1).encode())


class JobRunner:
    def __init__(self, jobs_dir: str | os.PathLike, command: WorkerCommand = worker_command):
        self.jobs_dir = Path(jobs_dir)
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.command = command
        self._processes: dict[str, subprocess.Popen] = {}
        self._views: dict[str, JobView] = {}
        self._lock = threading.RLock()
        self._dispatcher: threading.Thread | None = None
        self._closing = threading.Event()
        # Which queued jobs may run (the UI accepts only its workspace's outputs): a record edited on disk to write
        # elsewhere is dropped from the queue, never started.
        self.accept: Callable[[JobRecord], bool] = lambda record: True

    # ----- records
    def current(self) -> JobRecord | None:
        try:
            job_id = json.loads((self.jobs_dir / CURRENT_FILE).read_text(encoding="utf-8"))["id"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return self.record(job_id)

    def record(self, job_id: str) -> JobRecord | None:
        if not isinstance(job_id, str) or not job_id or "/" in job_id or "\\" in job_id or job_id.startswith("."):
            return None
        return JobRecord.load(self.jobs_dir / job_id)

    def history(self) -> list[JobRecord]:
        """Every job that ran (or runs) in the workspace, newest first; queued ones are :meth:`queue`'s."""
        records = [JobRecord.load(folder) for folder in self.jobs_dir.iterdir() if folder.is_dir()]
        return sorted((r for r in records if r is not None and not r.is_queued), key=lambda r: r.started,
                      reverse=True)

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

    def busy(self) -> JobRecord | None:
        """The job that keeps the next one waiting: running and not yet finished (a job that wrote its last event
        is over, even while its process is still exiting)."""
        current = self.current()
        if current is not None and self.is_running(current) and not self.view(current).finished:
            return current
        return None

    # ----- the queue
    def queue(self) -> list[JobRecord]:
        """The queued jobs, next first (ids whose folder went missing are left out)."""
        return [record for record in map(self.record, self._queue_ids()) if record is not None and record.is_queued]

    def _queue_ids(self) -> list[str]:
        try:
            ids = json.loads((self.jobs_dir / QUEUE_FILE).read_text(encoding="utf-8"))["ids"]
        except (OSError, ValueError, KeyError, TypeError):
            return []
        return [job_id for job_id in ids if isinstance(job_id, str)] if isinstance(ids, list) else []

    def _write_queue(self, ids: list[str]) -> None:
        _write_json(self.jobs_dir / QUEUE_FILE, {"ids": ids})

    def position(self, job_id: str) -> int | None:
        """1 for the job that starts next, None when ``job_id`` is not queued."""
        ids = [record.id for record in self.queue()]
        return ids.index(job_id) + 1 if job_id in ids else None

    def move(self, job_id: str, offset: int) -> int:
        """Move a queued job ``offset`` places (negative: earlier); returns its new position."""
        with self._lock, _file_lock(self.jobs_dir / ".lock"):
            ids = [record.id for record in self.queue()]
            if job_id not in ids:
                raise JobError("that job is not in the queue any more (it started or was removed)")
            index = ids.index(job_id)
            target = max(0, min(len(ids) - 1, index + int(offset)))
            ids.insert(target, ids.pop(index))
            self._write_queue(ids)
            return target + 1

    def remove(self, job_id: str) -> JobRecord:
        """Take a queued job out of the queue (its folder, which holds only its settings, is deleted)."""
        with self._lock, _file_lock(self.jobs_dir / ".lock"):
            queued = {record.id: record for record in self.queue()}
            record = queued.get(job_id)
            if record is None:
                raise JobError("that job is not in the queue any more (it started or was removed)")
            self._write_queue([i for i in queued if i != job_id])
            shutil.rmtree(record.folder, ignore_errors=True)
            return record

    def submit(self, config: Any, resume: str | os.PathLike | None = None, description: str = "") -> JobRecord:
        """Queue training ``config`` (a validated TrainerConfig), continuing from the state folder ``resume`` if
        given; it starts at once when no job runs. Refused when its output file exists or another queued or running
        job writes the same file."""
        from trainer.checkpoint import state_dir

        output_dir = Path(config.output.dir).expanduser().resolve()
        output_file = output_dir / f"{config.output.name}.safetensors"
        # Resuming a finished run from its final state extends it: the trainer keeps the final file (renamed).
        extending = resume is not None and Path(resume).resolve() == state_dir(output_file).resolve()
        with self._lock, _file_lock(self.jobs_dir / ".lock"):
            if output_file.exists() and not config.output.overwrite and not extending:
                raise JobError(f"{output_file} already exists: change the output name or tick "
                               "output.overwrite (Advanced).")
            self._refuse_same_output(output_dir, config.output.name)
            extra = {RESUME_FILE: {"state": str(resume)}} if resume else {}
            record = self._prepare(config, output_dir, config.output.name, int(config.train.max_steps), extra=extra,
                                   description=description)
            self._write_queue([*self._queue_ids(), record.id])
        self.dispatch()
        return self.record(record.id) or record

    def submit_compare(self, config: Any, methods: list[str], out_dir: str | os.PathLike,
                       overrides: dict[str, dict[str, Any]] | None = None,
                       drift_prompts: list[str] | None = None) -> JobRecord:
        """Queue a method comparison (trainer.compare) of ``config`` into the new folder ``out_dir``."""
        with self._lock, _file_lock(self.jobs_dir / ".lock"):
            output_dir = self._compare_folder(out_dir)
            record = self._prepare(config, output_dir, output_dir.name, int(config.train.max_steps) * len(methods),
                                   kind="compare", extra={COMPARE_FILE: self._compare_spec(
                                       methods, output_dir, overrides, drift_prompts)},
                                   description=", ".join(methods))
            self._write_queue([*self._queue_ids(), record.id])
        self.dispatch()
        return self.record(record.id) or record

    def _refuse_same_output(self, output_dir: Path, name: str) -> None:
        for other in [*self.queue(), *filter(None, [self.busy()])]:
            if other.kind == "train" and Path(other.output_dir) == output_dir and other.output_name == name:
                raise JobError(f"job {other.id} ({'queued' if other.is_queued else 'running'}) already writes "
                               f"{output_dir / name}.safetensors: change the output name")

    def dispatch(self) -> JobRecord | None:
        """Start the first queued job if none runs; returns the job started (None: nothing to start now)."""
        with self._lock, _file_lock(self.jobs_dir / ".lock"):
            if self.busy() is not None:
                return None
            for record in self.queue():
                self._write_queue([i for i in self._queue_ids() if i != record.id])
                if not self.accept(record):
                    import logging

                    logging.getLogger("rankwright.ui").warning("queued job %s dropped: not accepted (%s)", record.id,
                                                               record.output_dir)
                    continue
                try:
                    return self._run(record)
                except OSError as error:  # the worker could not even start: the job's view says so
                    _write_json(Path(record.folder) / EXIT_FILE, {"ok": False,
                                                                  "message": f"cannot start the worker ({error})"})
                    record.started = time.time()
                    record.save()
            return None

    def start_dispatcher(self, interval: float = DISPATCH_INTERVAL) -> None:
        """Look at the queue every ``interval`` seconds in a daemon thread (the server's; idempotent)."""
        if self._dispatcher is not None and self._dispatcher.is_alive():
            return

        def loop() -> None:
            while not self._closing.wait(interval):
                try:
                    self.dispatch()
                except Exception:  # keep dispatching: one bad record must not stop the queue
                    import logging

                    logging.getLogger("rankwright.ui").exception("queue dispatch failed")

        self._closing.clear()
        self._dispatcher = threading.Thread(target=loop, name="rankwright-queue", daemon=True)
        self._dispatcher.start()

    def stop_dispatcher(self) -> None:
        self._closing.set()

    # ----- control
    def start(self, config: Any) -> JobRecord:
        """Start training ``config`` (a validated TrainerConfig) in a worker now; JobBusy if a job is running."""
        with self._lock, _file_lock(self.jobs_dir / ".lock"):
            self._refuse_if_busy()
            output_dir = Path(config.output.dir).expanduser().resolve()
            output_file = output_dir / f"{config.output.name}.safetensors"
            if output_file.exists() and not config.output.overwrite:
                raise JobError(f"{output_file} already exists: change the output name or tick "
                               "output.overwrite (Advanced).")
            return self._run(self._prepare(config, output_dir, config.output.name, int(config.train.max_steps)))

    def start_compare(self, config: Any, methods: list[str], out_dir: str | os.PathLike,
                      overrides: dict[str, dict[str, Any]] | None = None,
                      drift_prompts: list[str] | None = None) -> JobRecord:
        """Start a method comparison (trainer.compare) of ``config`` into the new folder ``out_dir`` now."""
        with self._lock, _file_lock(self.jobs_dir / ".lock"):
            self._refuse_if_busy()
            output_dir = self._compare_folder(out_dir)
            spec = self._compare_spec(methods, output_dir, overrides, drift_prompts)
            return self._run(self._prepare(config, output_dir, output_dir.name,
                                           int(config.train.max_steps) * len(methods), kind="compare",
                                           extra={COMPARE_FILE: spec}, description=", ".join(methods)))

    @staticmethod
    def _compare_folder(out_dir: str | os.PathLike) -> Path:
        output_dir = Path(out_dir).expanduser().resolve()
        if output_dir.exists() and any(output_dir.iterdir()):
            raise JobError(f"{output_dir} already exists and is not empty: a comparison never replaces an earlier "
                           "one.")
        return output_dir

    @staticmethod
    def _compare_spec(methods: list[str], output_dir: Path, overrides: dict[str, dict[str, Any]] | None,
                      drift_prompts: list[str] | None) -> dict[str, Any]:
        return {"methods": list(methods), "out_dir": str(output_dir), "overrides": overrides or {},
                "drift_prompts": list(drift_prompts or []) or None}

    def _refuse_if_busy(self) -> None:
        current = self.busy()
        if current is not None:
            view = self.view(current)
            raise JobBusy(f"A {current.label} is already running ({current.output_name}, {view.status_text()}, "
                          f"{view.progress_text()}). Only one job runs at a time: stop it or wait until it ends.")

    def _prepare(self, config: Any, output_dir: Path, output_name: str, max_steps: int, kind: str = "train",
                 extra: dict[str, Any] | None = None, description: str = "") -> JobRecord:
        """Write the job folder (config, job.json, and ``extra`` files such as the comparison's spec) and create
        the output folder (so a later comparison picks another one)."""
        output_dir.mkdir(parents=True, exist_ok=True)
        job_id = time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)
        folder = self.jobs_dir / job_id
        folder.mkdir(parents=True)
        config_path = folder / CONFIG_FILE
        config_path.write_text(config.to_toml(), encoding="utf-8")
        for name, data in (extra or {}).items():
            _write_json(folder / name, data)
        record = JobRecord(job_id, str(folder), str(config_path), str(output_dir), output_name, max_steps=max_steps,
                           kind=kind, queued=time.time(),
                           description=description or f"{config.network.method}, {max_steps} steps")
        record.save()
        return record

    def _run(self, record: JobRecord) -> JobRecord:
        """Start the worker on a prepared job folder and make it the current job."""
        events = record.events_path
        record.events_offset = events.stat().st_size if events.exists() else 0
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT), *filter(None, [env.get("PYTHONPATH")])])
        env.setdefault("PYTHONUNBUFFERED", "1")
        folder = Path(record.folder)
        with (folder / LOG_FILE).open("wb") as log:
            process = subprocess.Popen(self.command(Path(record.config_path), folder), stdout=log,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=os.getcwd(), env=env)
        self._processes[record.id] = process
        record.pid, record.started = process.pid, time.time()
        record.save()
        _write_json(self.jobs_dir / CURRENT_FILE, {"id": record.id})
        return record

    def stop(self) -> JobRecord:
        """Ask the running job to stop: it saves its adapter within seconds (whatever phase it is in) and ends."""
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

    # ----- a refused save
    def save_question(self, record: JobRecord) -> dict[str, Any] | None:
        """The question of a running job whose last save the file system refused (path, reason, MB needed and
        free, the answer's deadline), None when it waits for nothing."""
        path = Path(record.folder) / SAVE_QUESTION_FILE
        if not path.is_file() or not self.is_running(record):
            return None
        try:
            question = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(question, dict) or not isinstance(question.get("id"), str) \
                or not isinstance(question.get("path"), str):
            return None
        return question

    def answer_save(self, record: JobRecord, action: str) -> dict[str, Any]:
        """Answer the job's refused save: ``retry`` (the same path: space was freed) or ``rescue`` (the trainer's
        rescue folders). Returns the question answered. The answer names no path: the worker knows its own."""
        if action not in SAVE_ACTIONS:
            raise JobError(f"unknown answer {action!r}: retry or rescue")
        with self._lock:
            question = self.save_question(record)
            if question is None:
                raise JobError("no save is waiting for an answer (the job saved, ended, or already got one)")
            _write_json(Path(record.folder) / SAVE_ANSWER_FILE, {"id": question["id"], "action": action})
            return question

    # ----- reading
    def view(self, record: JobRecord) -> JobView:
        """The job's state, updated with the events written since the last call."""
        with self._lock:
            record = self.record(record.id) or record  # stop_requested may have been set by another call
            view = self._views.get(record.id)
            if view is None or (view.status == "queued" and not record.is_queued):
                view = self._views[record.id] = VIEWS.get(record.kind, JobView)(record.id, offset=record.events_offset)
            if record.is_queued:
                view.status = "queued"
                return view
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
                if view.finished:  # what follows in a shared events.jsonl belongs to the next job
                    break
            if not view.finished and running and record.stop_requested and view.status != "stopping":
                if not record.stop_path.exists():  # the trainer clears STOP when it starts: ask again
                    with contextlib.suppress(OSError):
                        record.stop_path.write_text("stop requested from the web UI\n", encoding="utf-8")
                if view.status != "stop requested":
                    view.status = "stop requested"
                    view.version += 1
            if not view.finished and not running:
                view.fail(self._failure(record))
            if not view.finished:
                view.wait_for_answer(self.save_question(record) if running else None)
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
