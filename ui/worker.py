"""The training worker the UI starts: ``python -m ui.worker --config CONFIG.toml --job-dir JOB``.

It loads the TOML exactly as the CLI does and calls :func:`trainer.loop.train` (resuming from the state folder in
``resume.json`` when the job folder holds one) — or, when it holds ``compare.json``, :func:`trainer.compare.compare`;
everything the run does is in the output folder's ``events.jsonl``. At the end it writes ``JOB/exit.json`` (``ok``,
``message``), so the UI can tell a finished job from a crashed one even when the trainer never got to write an event.

When the file system refuses the run's last save (full disk, read-only folder), :func:`save_error_handler` asks the
UI through the job folder: it writes ``save_failed.json`` (the path, the reason, the megabytes needed and free) and
waits — the trained weights stay in this process's memory — for ``save_retry.json``: ``retry`` (the same path again)
or ``rescue`` (the trainer's rescue folders). No answer within ``$RANKWRIGHT_SAVE_ANSWER_SECONDS`` (30 minutes)
means the rescue folders too; the ``save_failed`` event names where the file went. The answer never carries a path.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

SAVE_ANSWER_SECONDS = 30 * 60  # how long a refused last save waits for the UI's answer (then: the rescue folders)
SAVE_ANSWER_TIMEOUT_ENV = "RANKWRIGHT_SAVE_ANSWER_SECONDS"
log = logging.getLogger("rankwright.worker")


def write_exit(job_dir: Path, **info) -> None:
    from methods.files import atomic_write_bytes

    atomic_write_bytes(job_dir / "exit.json", json.dumps({"time": time.time(), **info}, default=str).encode())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ui.worker", description=__doc__)
    parser.add_argument("--config", required=True, help="the run's TOML (as python -m trainer train reads it)")
    parser.add_argument("--job-dir", required=True, help="the job's folder in the workspace")
    args = parser.parse_args(argv)
    job_dir = Path(args.job_dir)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        from trainer.config import TrainerConfig
        from ui.jobs import COMPARE_FILE, RESUME_FILE

        config = TrainerConfig.load(args.config)
        spec_path = job_dir / COMPARE_FILE
        if spec_path.is_file():
            exit_info = run_comparison(config, json.loads(spec_path.read_text(encoding="utf-8")))
        else:
            from trainer.loop import train

            resume_path = job_dir / RESUME_FILE
            resume = json.loads(resume_path.read_text(encoding="utf-8"))["state"] if resume_path.is_file() else None
            result = train(config, resume=resume, on_save_error=save_error_handler(job_dir, answer_timeout()))
            exit_info = {"output": str(result.output_file) if result.output_file else None, "steps": result.steps,
                         "stopped": result.stopped_early}
    except BaseException as error:  # noqa: BLE001 - everything ends in exit.json, also KeyboardInterrupt
        traceback.print_exc()
        message = " ".join(str(error).split()) or type(error).__name__
        write_exit(job_dir, ok=False, message=message, kind=type(error).__name__)
        return 1
    write_exit(job_dir, ok=True, **exit_info)
    return 0


def answer_timeout() -> float:
    text = os.environ.get(SAVE_ANSWER_TIMEOUT_ENV, "")
    try:
        return max(0.0, float(text)) if text else SAVE_ANSWER_SECONDS
    except ValueError:
        log.warning("ignoring %s=%r (not a number of seconds)", SAVE_ANSWER_TIMEOUT_ENV, text)
        return SAVE_ANSWER_SECONDS


def save_error_handler(job_dir: Path, timeout: float = SAVE_ANSWER_SECONDS,
                       interval: float = 0.5) -> Callable[..., Path | None]:
    """``train(on_save_error=…)`` for a UI job: each refused last save is a question in ``JOB/save_failed.json``
    (with its own id), answered by ``JOB/save_retry.json`` (``{"id": …, "action": "retry" | "rescue"}``); an answer
    to another question is ignored. Returns the failed path (retry) or None (rescue, no answer within ``timeout``
    seconds, or a job folder that cannot take the question — e.g. on the same full disk)."""
    from methods.files import atomic_write_bytes
    from ui.jobs import SAVE_ANSWER_FILE, SAVE_QUESTION_FILE

    question_path, answer_path = job_dir / SAVE_QUESTION_FILE, job_dir / SAVE_ANSWER_FILE

    def ask(failure) -> Path | None:
        import secrets

        from trainer.checkpoint import rescue_paths

        asked = time.time()
        question = {"id": secrets.token_hex(8), "path": str(failure.path), "reason": failure.reason,
                    "errno": failure.error.errno, "step": failure.step, "needed_mb": _megabytes(failure.needed_bytes),
                    "free_mb": _megabytes(failure.free_bytes), "asked": asked, "deadline": asked + timeout,
                    "rescue_folders": [str(path.parent) for path in rescue_paths(failure.path)]}
        try:
            answer_path.unlink(missing_ok=True)
            atomic_write_bytes(question_path, json.dumps(question, indent=1).encode())
        except OSError as error:
            log.warning("cannot ask the UI where to save (%s): writing to the rescue folder", error)
            return None
        log.warning("could not write %s (%s): waiting up to %.0f s for the UI's answer", failure.path,
                    failure.reason, timeout)
        try:
            while True:
                action = _answer(answer_path, question["id"])
                if action is not None:
                    log.info("the UI answered %r", action)
                    return failure.path if action == "retry" else None
                if time.time() >= asked + timeout:
                    log.warning("no answer from the UI within %.0f s: writing to the rescue folder", timeout)
                    return None
                time.sleep(interval)
        finally:
            for path in (question_path, answer_path):
                with contextlib.suppress(OSError):
                    path.unlink(missing_ok=True)

    return ask


def _answer(path: Path, question_id: str) -> str | None:
    """The action of the answer to question ``question_id`` in ``path``, None while there is none."""
    try:
        answer = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(answer, dict) or answer.get("id") != question_id:
        return None
    action = answer.get("action")
    return action if action in ("retry", "rescue") else None


def _megabytes(size: int | None) -> float | None:
    return round(size / 1e6, 1) if isinstance(size, int | float) else None


def run_comparison(config, spec: dict) -> dict:
    """A method comparison as ``compare.json`` describes it; its events go to the report folder's events.jsonl."""
    from trainer.compare import compare

    report = compare(config, spec["methods"], spec["out_dir"], overrides=spec.get("overrides"),
                     drift_prompts=spec.get("drift_prompts"))
    return {"output": str(report.markdown_path), "stopped": report.stopped}


if __name__ == "__main__":
    sys.exit(main())
