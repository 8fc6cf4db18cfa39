"""Training throughput of the whole engine (``trainer.loop.train``): steps/s, time to first step, peak memory.

Each configuration is a real run — dataset scan, latent caching, adapters, optimizer, events, final save with its
self-check — in a fresh subprocess (so peak memory is that run's own), with and without the latent cache and
gradient checkpointing. Models are built from ``trainer.architectures`` with random weights; nothing is downloaded
and nothing large is written: the pipeline is handed to the trainer in memory instead of a model folder.

Models:

- ``tiny``: the tiny SD1 test pipeline (UNet channels 32/64; its VAE halves each side, so 64 px → 32×32 latents);
- ``sd15-unet``: the real-size SD1.5 UNet (860M parameters) with the tiny VAE and a one-layer 768-wide text
  encoder: on the CPU, 64 px images give 32×32 latents (a 256 px SD1.5 step's UNet work);
- ``sd15``: real-size SD1.5 throughout (UNet, VAE, CLIP-L 12 layers): for GPUs, e.g.
  ``--model sd15 --device cuda --mixed-precision fp16 --resolution 512``.

    python bench/train_throughput.py                                    # CPU table: tiny and sd15-unet
    python bench/train_throughput.py --model sd15 --device cuda --mixed-precision bf16 --resolution 512 \\
        --batch-size 4 --steps 30

Steps/s counts optimizer steps after the first (the first includes one-time work); "first step" is the time
from ``train()`` to the end of the first step, model construction excluded (it is reported separately). Peak
memory: CPU — the process's peak resident size; CUDA — ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULT_MARK = "@@RESULT@@"
MODELS = ("tiny", "sd15-unet", "sd15")
DEFAULT_RESOLUTION = {"tiny": 64, "sd15-unet": 64, "sd15": 512}
VARIANTS = {  # name → (latent cache, gradient checkpointing)
    "cache": ("memory", False),
    "cache+gc": ("memory", True),
    "no-cache": ("off", False),
    "no-cache+gc": ("off", True),
}


# ----- one configuration (in its own process) ----------------------------------------------------------------------
def build_pipeline(model: str, tokenizer_dir: Path):
    """A StableDiffusionPipeline of the given benchmark model, random weights."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel, CLIPTokenizer

    from trainer.architectures import (
        CLIP_L,
        SD_VAE,
        TINY_VAE,
        _clip_config,
        build_tiny_pipeline,
        build_unet,
    )

    torch.manual_seed(0)
    if model == "tiny":
        return build_tiny_pipeline("sd1", tokenizer_dir)
    tokenizer = CLIPTokenizer(str(tokenizer_dir / "vocab.json"), str(tokenizer_dir / "merges.txt"),
                              model_max_length=77)
    unet = build_unet("sd1")
    if model == "sd15":
        vae = AutoencoderKL(**SD_VAE)
        encoder_spec = CLIP_L
    else:  # the UNet at full size; encoders small (their cost is not what this measures)
        vae = AutoencoderKL(**TINY_VAE)
        encoder_spec = {**CLIP_L, "num_hidden_layers": 1}
    encoder = CLIPTextModel(_clip_config(encoder_spec, len(tokenizer))).eval()
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading", steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def write_dataset(folder: Path, count: int, resolution: int) -> None:
    import numpy as np
    from PIL import Image

    concept = folder / "1_bench"
    concept.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((resolution, resolution), Image.Resampling.BILINEAR).save(
            concept / f"{index:03d}.png")
        (concept / f"{index:03d}.txt").write_text("a photo of zq")


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    import trainer.models
    from trainer.architectures import write_tiny_tokenizer
    from trainer.config import TrainerConfig
    from trainer.loop import train
    from trainer.models import ModelInfo

    work = Path(tempfile.mkdtemp(prefix="rankwright-bench-"))
    tokenizer_dir = write_tiny_tokenizer(work / "tokenizer")
    started = time.time()
    pipe = build_pipeline(spec["model"], tokenizer_dir)
    build_seconds = time.time() - started

    def provide(source, arch=None, prediction_type=None, dtype=torch.float32, **kwargs):
        return pipe, ModelInfo("sd1", "epsilon", "memory", str(source))

    trainer.models.load_pipeline = provide  # the loop imports it at call time
    resolution = spec["resolution"]
    steps = spec["steps"]
    images = max(4, spec["batch_size"] * 2)
    write_dataset(work / "data", images, resolution)
    cache, checkpointing = VARIANTS[spec["variant"]]
    config = TrainerConfig.from_dict({
        "model": {"base": f"bench-{spec['model']}"},
        "dataset": {"dir": str(work / "data"), "resolution": resolution, "min_bucket_side": min(256, resolution),
                    "max_bucket_side": max(1024, resolution), "bucket_step": min(64, resolution),
                    "latent_cache": cache},
        "network": {"method": spec["method"], **({"rank": spec["rank"]} if spec["method"] != "oft" else {})},
        "train": {"max_steps": steps, "batch_size": spec["batch_size"], "learning_rate": 1e-4,
                  "mixed_precision": spec["mixed_precision"], "gradient_checkpointing": checkpointing,
                  "train_text_encoder": spec["train_text_encoder"], "compile": spec.get("compile", False)},
        "output": {"dir": str(work / "out"), "name": "bench", "tensorboard": False, "save_state": False},
    })
    stamps: list[float] = []
    done: dict[str, Any] = {}

    def on_event(event: dict[str, Any]) -> None:
        if event["event"] == "step":
            stamps.append(time.time())
        elif event["event"] in ("done", "ready"):
            done[event["event"]] = event

    if spec["device"] == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.time()
    train(config, on_event=on_event)
    intervals = [b - a for a, b in zip(stamps, stamps[1:])]
    return {
        **spec,
        "build_s": round(build_seconds, 2),
        "ready_s": round(done["ready"]["seconds"], 2),
        "first_step_s": round(stamps[0] - started, 2),
        "steps_per_s": round(len(intervals) / sum(intervals), 4) if intervals else None,
        "s_per_step": round(sum(intervals) / len(intervals), 4) if intervals else None,
        "peak_mb": done["done"]["peak_mb"],
        "trainable": done["ready"]["trainable_parameters"],
        "device_name": torch.cuda.get_device_name() if spec["device"] == "cuda" else "cpu",
    }


# ----- driver -------------------------------------------------------------------------------------------------------
def run_in_subprocess(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error"}
    if spec["device"] == "cpu":
        env["ACCELERATE_USE_CPU"] = "1"
        env["CUDA_VISIBLE_DEVICES"] = ""
    if spec["threads"]:
        env["OMP_NUM_THREADS"] = str(spec["threads"])
    command = [sys.executable, str(Path(__file__).resolve()), "--one", json.dumps(spec)]
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timed out after {timeout:.0f} s"}
    for line in completed.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    tail = (completed.stderr or completed.stdout).strip().splitlines()[-3:]
    return {**spec, "error": " | ".join(tail)}


def table(rows: list[dict[str, Any]]) -> str:
    header = ("model", "res", "batch", "variant", "steps/s", "s/step", "first step s", "ready s", "peak MB", "device")
    lines = [" | ".join(header), " | ".join("---" for _ in header)]
    for row in rows:
        if "error" in row:
            lines.append(f"{row['model']} | {row['resolution']} | {row['batch_size']} | {row['variant']} | "
                         f"error: {row['error']}")
            continue
        precision = "" if row["mixed_precision"] == "no" else f" {row['mixed_precision']}"
        lines.append(" | ".join(str(v) for v in (
            row["model"], row["resolution"], row["batch_size"],
            row["variant"] + (" compiled" if row.get("compile") else ""), row["steps_per_s"],
            row["s_per_step"], row["first_step_s"], row["ready_s"], round(row["peak_mb"]),
            f"{row['device_name']}{precision} ({row['threads'] or 'default'} threads)")))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", choices=MODELS,
                        help="model(s) to run (repeatable; default: tiny and sd15-unet)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated subset of {', '.join(VARIANTS)}")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no")
    parser.add_argument("--resolution", type=int, help="image side in pixels (default: 64 tiny/sd15-unet, 512 sd15)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, help="optimizer steps per run (default: 6 CPU, 20 CUDA)")
    parser.add_argument("--method", default="lora")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--train-text-encoder", action="store_true", help="also train text-encoder adapters")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--compile", default="off", choices=("off", "on", "both"),
                        help="train.compile: off, on, or both (each variant eager and compiled; the first step "
                             "includes compiling, steps/s does not)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per configuration")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(RESULT_MARK + json.dumps(run_one(json.loads(args.one))), flush=True)
        return 0
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device is visible")
    models = args.model or ["tiny", "sd15-unet"]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    compiled = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    rows = []
    for model in models:
        for variant in variants:
            for compile_step in compiled:
                spec = {"model": model, "variant": variant, "device": args.device,
                        "mixed_precision": args.mixed_precision,
                        "resolution": args.resolution or DEFAULT_RESOLUTION[model], "batch_size": args.batch_size,
                        "steps": args.steps or (20 if args.device == "cuda" else 6), "method": args.method,
                        "rank": args.rank, "train_text_encoder": args.train_text_encoder, "threads": args.threads,
                        "compile": compile_step}
                row = run_in_subprocess(spec, args.timeout)
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
