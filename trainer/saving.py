"""Saving a run: the adapter file with the run's metadata, its self-check, the resumable state beside it — and
what happens when the file system refuses (full disk, read-only folder): the trained weights stay in memory, the
event says which path failed and how much space it needed, and the run's last save goes elsewhere."""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from methods.apply import save_network
from methods.blocks import block_network_args
from methods.embeddings import METADATA_FILE, METADATA_WORD, embedding_path, save_embedding_file

from . import events as ev
from .checkpoint import (
    SaveFailure,
    adapter_file_bytes,
    base_model_hashes,
    check_failure_text,
    clean_leftovers,
    free_bytes,
    is_disk_error,
    rescue_paths,
    resume_state_tree,
    save_resume_state,
    state_dir,
    unique_path,
    verify_file,
    write_text_atomic,
)
from .events import EventLog, TrainingError, log
from .statefile import StateFormatError, state_bytes


@dataclasses.dataclass
class SaveRecord:
    files: list[Path] = dataclasses.field(default_factory=list)
    last_good: Path | None = None
    last_state: Path | None = None
    step: int = -1  # the step of the last save (every process agrees on it)
    periodic: list[tuple[str, int, Path]] = dataclasses.field(default_factory=list)  # (why, step, file) of this run


class Saver:
    """Writes the saves of one run (main process only). ``metadata`` (the run's kohya/ModelSpec keys) is set when
    training starts; each save adds its step, epoch, finish time and the base model's hashes."""

    def __init__(self, config: Any, output_file: Path, events: EventLog, accelerator: Any,
                 on_save_error: Callable[[SaveFailure], str | Path | None] | None = None):
        self.config, self.output_file, self.events, self.accelerator = config, output_file, events, accelerator
        self.on_save_error = on_save_error
        self.record = SaveRecord()
        self.metadata: dict[str, Any] = {}
        self.base_hashes: dict[str, str] | None = None

    def save(self, state: Any, models: Any, final: bool, last: bool = False, why: str = "") -> Path | None:
        """Write the adapter (and resumable state), then reload the file and compare it with the live weights.

        A save the file system refuses (full, read-only) is reported with the space it needed. An intermediate
        one is skipped; the run's ``last`` one (final, or at a stop) goes where ``on_save_error`` says, else to the
        rescue folders — the trained weights stay in memory meanwhile, and the run ends with an error only when
        nothing could be written. ``why`` ("step"/"epoch") marks a periodic save, which
        output.save_last_n_steps/epochs may delete later (:meth:`prune`).
        """
        last, step, path = last or final, state.progress.step, None
        target = self.output_file if final else unique_path(
            self.output_file.parent / f"{self.config.output.name}-step{step:06d}.safetensors")
        rescue = iter(rescue_paths(self.output_file))
        failures: list[SaveFailure] = []
        while path is None and target is not None:
            try:
                self._write(state, models, target, final, overwrite=final and self.config.output.overwrite)
                path = target
            except OSError as error:
                if not is_disk_error(error):
                    raise
                needed = adapter_file_bytes(state.network, self.config.output.save_dtype)
                failures.append(SaveFailure(target, error, needed, free_bytes(target.parent), last, step))
                target = self._where_next(failures, rescue)
        if path is not None and why:
            self.record.periodic.append((why, step, path))
            self.prune(step)
        return path

    def prune(self, step: int) -> None:
        """sd-scripts' save_last_n_steps (step saves older than N steps go) and save_last_n_epochs (only the last N
        epoch saves stay), each with its state folder. Only files this run wrote are ever deleted."""
        output = self.config.output
        doomed = []
        if output.save_last_n_steps:
            doomed += [r for r in self.record.periodic if r[0] == "step" and r[1] < step - output.save_last_n_steps]
        if output.save_last_n_epochs:
            doomed += [r for r in self.record.periodic if r[0] == "epoch"][:-output.save_last_n_epochs]
        for record in doomed:
            path = record[2]
            path.unlink(missing_ok=True)
            embedding_path(path).unlink(missing_ok=True)
            if state_dir(path).is_dir():
                shutil.rmtree(state_dir(path))
            self.record.periodic.remove(record)
            self.record.files.remove(path)
            log.info("deleted %s (output.save_last_n_steps/epochs)", path.name)

    def _where_next(self, failures: list[SaveFailure], rescue: Any) -> Path | None:
        """After a refused save: the path to try next (the run's last save only: ``on_save_error``'s answer, else
        the next rescue folder), or None to skip an intermediate save. Raises when a last save has nowhere left."""
        failure = failures[-1]
        target = None
        if failure.final:
            retry = self.on_save_error(failure) if self.on_save_error else None
            target = Path(retry) if retry else next(rescue, None)
            target = unique_path(target) if target is not None and target != failure.path else target
        self.events.emit(ev.SaveFailed(step=failure.step, path=str(failure.path), final=failure.final,
                                       error=failure.reason, needed_bytes=failure.needed_bytes,
                                       free_bytes=failure.free_bytes, next_path=str(target) if target else None))
        if failure.final and target is None:
            tried = "; ".join(f"{f.path} ({f.reason})" for f in failures)
            raise TrainingError(f"the trained adapter could not be written anywhere: {tried}. It needs about "
                                f"{failure.needed_bytes / 1e6:.1f} MB; free some space (or set RANKWRIGHT_RESCUE_DIR "
                                "to a writable folder) and resume from the last saved state") from failure.error
        return target

    def _write(self, state: Any, models: Any, path: Path, final: bool, overwrite: bool) -> None:
        started = time.time()
        config = self.config
        if self.base_hashes is None:  # once, at the first save: hashing a multi-GB base takes a while
            self.base_hashes = base_model_hashes(config.model.base)
        metadata = {**self.metadata, **models.metadata(), **self.base_hashes, "ss_steps": state.progress.step,
                    "ss_epoch": state.progress.epoch, "ss_training_finished_at": time.time()}
        embeddings = state.network.embeddings
        with ema_weights(state):
            if embeddings is not None:  # first: the adapter's metadata never names a file that is not there
                title = f"{config.output.title or config.output.name} ({embeddings.word})"
                embedding = save_embedding_file(embeddings, embedding_path(path), title=title,
                                                dtype=config.output.save_dtype, overwrite=overwrite)
                metadata.update({METADATA_WORD: embeddings.word, METADATA_FILE: embedding.name})
            try:
                save_network(state.network, path, title=config.output.title or config.output.name,
                             dtype=config.output.save_dtype, prediction_type=models.prediction_type,
                             extra_metadata=metadata, overwrite=overwrite, layout=config.output.file_layout,
                             extra_network_args=block_network_args(config.network))
            except OSError:
                if embeddings is not None and not path.exists():
                    embedding_path(path).unlink(missing_ok=True)
                raise
            check = verify_file(path, state.network, models.pipe, models.arch, config.output.save_dtype)
        if not check["check_ok"]:
            self.events.emit(ev.RunWarning(message=check_failure_text(path, check)))
        folder = None
        if config.output.save_state:
            tree = resume_state_tree(state, self.accelerator.scaler, config, self.accelerator.num_processes,
                                     state.started_at)
            try:
                save_resume_state(state_dir(path), state.network, tree)
                folder = self.record.last_state = state_dir(path)
            except StateFormatError as error:  # e.g. an optimizer keeping objects in its state: not resumable
                self.events.emit(ev.RunWarning(message=f"no resumable state for {path.name}: {error}"))
            except OSError as error:
                if not is_disk_error(error):
                    raise
                self.events.emit(ev.RunWarning(message=f"the resumable state of {path.name} could not be written "
                                               f"({error.strerror or error}; it needs about "
                                               f"{state_bytes(tree) / 1e6:.1f} MB): the adapter is saved, but this "
                                               "step cannot be resumed from"))
        self.record.files.append(path)
        self.record.last_good = path
        self.events.emit(ev.Save(step=state.progress.step, path=str(path), final=final,
                                 state=str(folder) if folder else None, size_bytes=path.stat().st_size,
                                 seconds=round(time.time() - started, 3), ema=state.ema is not None, **check))


@contextlib.contextmanager
def ema_weights(state: Any):
    """The EMA weights swapped in (for saves and previews), the live ones back afterwards."""
    if state.ema is None:
        yield
        return
    parameters = list(state.network.parameters())
    state.ema.store(parameters)
    state.ema.copy_to(parameters)
    try:
        yield
    finally:
        state.ema.restore(parameters)


def prepare_output_folder(config: Any, stop_file: Path) -> list[Path]:
    """Before a run (main process): the output folder exists, an old STOP file is gone, the run's TOML is written
    (next to an earlier one, not over it, unless output.overwrite); returns the temporary files a killed save left
    there, now removed."""
    from methods.base import ConfigError

    output_dir = Path(config.output.dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        stop_file.unlink(missing_ok=True)
        removed = clean_leftovers(output_dir)
        toml_path = output_dir / f"{config.output.name}.toml"
        if toml_path.exists() and not config.output.overwrite:
            toml_path = unique_path(toml_path)
        write_text_atomic(toml_path, config.to_toml())
    except OSError as error:
        raise ConfigError(f"output.dir = {str(output_dir)!r} cannot be written ({error.strerror or error}); "
                          "choose a writable folder with free space") from error
    return removed
