"""What a run tells the world: a JSON-lines event log, TensorBoard scalars, callbacks, and stop requests.

The web UI reads ``events.jsonl``; the Python API passes every event to ``on_event``. A stop can be requested
from another thread (:meth:`StopSignal.request`) or another process (by creating the ``STOP`` file).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("rankwright")

EventCallback = Callable[[dict[str, Any]], None]


class StopSignal:
    """Set by SIGINT/SIGTERM, the UI's Stop button (through a file) or code; checked once per step."""

    def __init__(self, stop_file: Path | None = None):
        self._event = threading.Event()
        self.reason = ""
        self.stop_file = stop_file

    def request(self, reason: str = "stop requested") -> None:
        self.reason = self.reason or reason
        self._event.set()

    def requested(self) -> bool:
        if not self._event.is_set() and self.stop_file is not None and self.stop_file.exists():
            self.request(f"stop file {self.stop_file.name} found")
        return self._event.is_set()


class EventLog:
    """Appends events to ``events.jsonl`` and forwards them to callbacks and TensorBoard (main process only)."""

    def __init__(self, folder: Path | None, callbacks: list[EventCallback] | None = None,
                 tensorboard: bool = False, enabled: bool = True):
        self.enabled = enabled
        self.callbacks = list(callbacks or [])
        self.path = folder / "events.jsonl" if folder is not None and enabled else None
        self._writer = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        if tensorboard and enabled and folder is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(folder / "tensorboard"))
            except ImportError:  # tensorboard is optional
                log.warning("TensorBoard logging is on but tensorboard is not installed (pip install tensorboard)")

    def emit(self, kind: str, /, **fields: Any) -> dict[str, Any]:
        event = {"event": kind, "time": time.time(), **fields}
        if not self.enabled:
            return event
        if self.path is not None:
            with self.path.open("a", encoding="utf-8") as stream:
                stream.write(json.dumps(event, default=str) + "\n")
        for callback in self.callbacks:
            try:
                callback(event)
            except Exception:  # a listener must never stop training
                log.exception("event callback failed for %s", kind)
        return event

    @property
    def has_tensorboard(self) -> bool:
        return self._writer is not None and self.enabled

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self._writer is not None and self.enabled:
            for name, value in values.items():
                self._writer.add_scalar(name, value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None


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
