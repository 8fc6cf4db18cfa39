"""The training worker the UI starts: ``python -m ui.worker --config CONFIG.toml --job-dir JOB``.

It loads the TOML exactly as the CLI does and calls :func:`trainer.loop.train` (resuming from the state folder in
``resume.json`` when the job folder holds one) — or, when it holds ``compare.json``, :func:`trainer.compare.compare`;
everything the run does is in the output folder's ``events.jsonl``. At the end it writes ``JOB/exit.json`` (``ok``,
``message``), so the UI can tell a finished job from a crashed one even when the trainer never got to write an event.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


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
            result = train(config, resume=resume)
            exit_info = {"output": str(result.output_file) if result.output_file else None, "steps": result.steps,
                         "stopped": result.stopped_early}
    except BaseException as error:  # noqa: BLE001 - everything ends in exit.json, also KeyboardInterrupt
        traceback.print_exc()
        message = " ".join(str(error).split()) or type(error).__name__
        write_exit(job_dir, ok=False, message=message, kind=type(error).__name__)
        return 1
    write_exit(job_dir, ok=True, **exit_info)
    return 0


def run_comparison(config, spec: dict) -> dict:
    """A method comparison as ``compare.json`` describes it; its events go to the report folder's events.jsonl."""
    from trainer.compare import compare

    report = compare(config, spec["methods"], spec["out_dir"], overrides=spec.get("overrides"),
                     drift_prompts=spec.get("drift_prompts"))
    return {"output": str(report.markdown_path), "stopped": report.stopped}


if __name__ == "__main__":
    sys.exit(main())
