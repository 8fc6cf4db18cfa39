"""Work the server does itself, in a thread, with a progress count, an ETA and a Stop: auto-captioning, the dataset
report and *Try it* renders.

A :class:`TaskSlot` holds at most one running :class:`Task` of its kind for the whole server (like the job queue,
it belongs to the workspace, not to one browser tab): a reloaded page finds the task and its result again. The
task's function gets the task itself, reports through :meth:`Task.progress` and checks :attr:`Task.stop` (a
:class:`trainer.events.StopSignal`) or ends with :class:`trainer.sampling.RenderStopped` / a stopped result.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from trainer.events import StopSignal, format_seconds

log = logging.getLogger("rankwright.ui")


@dataclasses.dataclass
class Task:
    name: str  # what it does, for the status line ("captioning 6 images with tiny-blip")
    stop: StopSignal = dataclasses.field(default_factory=StopSignal)
    status: str = "running"  # running, done, stopped, error
    phase: str = ""  # "loading the captioner", "captioning", …
    done: int = 0
    total: int = 0
    unit: str = ""
    eta: float | None = None
    result: Any = None
    error: str = ""
    recent: list[Any] = dataclasses.field(default_factory=list)  # what the last steps produced (captions, …)
    started: float = dataclasses.field(default_factory=time.time)
    phase_started: float = dataclasses.field(default_factory=time.time)
    finished_at: float = 0.0
    version: int = 0
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    @property
    def running(self) -> bool:
        return self.status == "running"

    def progress(self, phase: str | None = None, done: int | None = None, total: int | None = None,
                 eta: float | None = None, unit: str | None = None) -> None:
        """Set what the progress bar shows; the ETA is computed from the rate when not given."""
        with self.lock:
            if phase is not None and phase != self.phase:
                self.phase, self.phase_started = phase, time.time()
            if total is not None:
                self.total = int(total)
            if unit is not None:
                self.unit = unit
            if done is not None:
                self.done = int(done)
                elapsed = time.time() - self.phase_started
                if eta is None and self.done and elapsed > 0 and self.total:
                    eta = (self.total - self.done) * elapsed / self.done
            self.eta = eta
            self.version += 1

    @property
    def fraction(self) -> float:
        if self.status == "done":
            return 1.0
        return min(1.0, self.done / self.total) if self.total else 0.0

    def progress_text(self) -> str:
        if not self.running:
            took = format_seconds((self.finished_at or time.time()) - self.started)
            return {"done": f"done in {took}", "stopped": f"stopped after {took}",
                    "error": "failed"}.get(self.status, self.status)
        parts = [self.phase or "working"]
        if self.total:
            parts.append(f"{self.done}/{self.total} {self.unit}".rstrip())
        if self.eta is not None and self.total:
            parts.append(f"ETA {format_seconds(self.eta)}")
        return " · ".join(parts)

    def status_text(self) -> str:
        if self.status == "error":
            return f"⚠️ {self.name} failed: {self.error}"
        if self.running and self.stop.requested():
            return f"{self.name}: stop requested, ending within a step…"
        return f"{self.name}: {self.progress_text()}"


class TaskSlot:
    """One task of a kind at a time (a second start while one runs is refused with the running one's status)."""

    def __init__(self, kind: str):
        self.kind = kind
        self.task: Task | None = None
        self._lock = threading.Lock()

    def start(self, name: str, function: Callable[[Task], Any], on_done: Callable[[Task], None] | None = None,
              refusal: type[Exception] = ValueError) -> Task:
        """Run ``function(task)`` in a daemon thread; its return value becomes ``task.result``."""
        with self._lock:
            if self.task is not None and self.task.running:
                raise refusal(f"{self.task.name} is still running ({self.task.progress_text()}); stop it or wait")
            task = self.task = Task(name)

        def run() -> None:
            try:
                task.result = function(task)
                status = "stopped" if task.stop.requested() else "done"
            except Exception as error:  # a user's mistake or a bug: the task says so, the server goes on
                from trainer.sampling import RenderStopped

                if isinstance(error, RenderStopped):
                    status = "stopped"
                else:
                    if not isinstance(error, ValueError | OSError):
                        log.exception("%s failed", task.name)
                    task.error = " ".join(str(error).split()) or type(error).__name__
                    status = "error"
            with task.lock:
                task.status, task.finished_at = status, time.time()
                task.version += 1
            if on_done is not None:
                try:
                    on_done(task)
                except Exception:
                    log.exception("after %s", task.name)

        threading.Thread(target=run, name=f"rankwright-{self.kind}", daemon=True).start()
        return task

    def stop(self) -> Task:
        task = self.task
        if task is None or not task.running:
            raise ValueError(f"no {self.kind} is running")
        task.stop.request(f"{self.kind} stopped from the web UI")
        with task.lock:
            task.version += 1
        return task


def unseen(task: Task | None, session: dict) -> bool:
    """Whether ``task`` changed since this browser's ``session`` last showed it (it counts as shown from now)."""
    if task is None or session.get("version") == (id(task), task.version):
        return False
    session["version"] = (id(task), task.version)
    return True
