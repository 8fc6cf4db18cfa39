"""Training-step overhead of our adapters against the frozen base, PEFT and LyCORIS, on an SD1-style UNet.

For every method (``methods.available_methods()``, plus ``dora`` = LoRA with ``dora = true``) and every
implementation (ours, PEFT, LyCORIS) this runs one *training step* — forward, MSE loss, backward; base weights
frozen, adapter parameters trainable, no optimizer — on the same UNet (same seed, same inputs, same thread count)
and divides its time by the time of the *frozen-base step*: the same forward + backward with no adapter and every
base weight frozen, where the input latents require grad so that backward runs through the same layers. The input
latents require grad in every configuration (adapters too), so the only difference between a row and the base is
the adapters. The text conditioning is a constant, as with a frozen text encoder.

Each configuration's process holds two copies of the UNet, bare and adapted, and times them in alternating rounds
(ABBA); ×base is the median over rounds of adapted/base, so a change in machine load between rounds cancels. A
bare-vs-bare run (A/A) gives the noise floor. ``--clock cpu`` times process CPU time instead of wall time (CPU only):
use it, with ``--threads 1``, when other jobs share the cores.

Targets are kohya's default (``attention_mlp``: every Linear/Conv2d inside a ``Transformer2DModel``), filtered by
our config's ``wants`` (BOFT skips widths it cannot factor); PEFT and LyCORIS get the exact same list of layers
(PEFT by full module path, LyCORIS by anchored ``target_name`` patterns, since its default preset aborts on
diffusers UNets). Rank 16 (``--rank``) / alpha 8 for LoRA, DoRA, LoHa and LoKr; block size 32 (each library's own
reading of it) for OFT and BOFT. Adapter tensors that start at zero (LoRA's up, OFT's blocks) are filled with
N(0, 0.01) (``--trained-std``) so that a step is timed with values from the middle of training, not the first step.
Each configuration runs in a fresh subprocess; peak memory is the peak above the resident size of the loaded frozen
UNet with its inputs (CPU: ``getrusage`` max RSS, after resetting the high-water mark; CUDA:
``torch.cuda.max_memory_allocated``).

    python bench/adapter_overhead.py --size both --latent 16 --repeats 5 --json out.json
    python bench/adapter_overhead.py --size sd15 --threads 1 --clock cpu --repeats 7   # on a shared machine
    python bench/adapter_overhead.py --size sd15 --device cuda --dtype bf16 --latent 64 --batch 4 --in-process \
        --skip peft:boft      # PEFT's BOFT compiles a CUDA extension on first use: time it on its own
    RANKWRIGHT_ROTATION_SIDE=output python bench/adapter_overhead.py --methods oft,boft   # force one OFT/BOFT path
    python bench/adapter_overhead.py --size tiny --methods lora,oft --profile ours:oft

Exit status 0 even when targets fail; the table says which cells pass.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import json
import math
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

LIBRARIES = ("ours", "peft", "lycoris")
SIZES = {"tiny": True, "sd15": False}  # size → build_unet(..., tiny=...)
RANK, ALPHA = 16, 8.0
OFT_BLOCK = 32
TARGETS = {"lora": 1.03, "dora": None, "loha": 1.08, "lokr": 1.08, "oft": 1.12, "boft": 1.12}
RESULT_MARK = "@@RESULT@@"
MIN_REPEATS = 3


# ----- what each method means in each library ---------------------------------------------------------------------
def ours_method(method: str) -> str:
    return "lora" if method == "dora" else method


def ours_options(method: str, rank: int = RANK) -> dict[str, Any]:
    """Our network options for a benchmark method name: the method's example options at the benchmark's rank/alpha
    (low-rank methods) or block size (OFT-style methods)."""
    from methods import get_method

    options = dict(get_method(ours_method(method)).example_options)
    if "rank" in options:
        options.update(rank=rank, alpha=ALPHA)
    if "block_size" in options:
        options["block_size"] = OFT_BLOCK
    if method == "dora":
        options["dora"] = True
    return options


def target_paths(unet, method: str) -> list[str]:
    """The diffusers paths of the layers our network wraps for ``method`` (kohya's attention_mlp preset)."""
    from methods import get_method, targets
    from methods.base import WRAPPABLE, ConfigError

    chosen = targets.unet_targets(unet, "attention_mlp")
    try:
        config = get_method(ours_method(method)).config_class.from_dict(ours_options(method))
    except ConfigError:
        return [p for p, m in chosen.items() if isinstance(m, WRAPPABLE)]
    return [path for path, module in chosen.items() if config.wants(module)]


def _in_features(module) -> int:
    return module.weight[0].numel()  # in·kh·kw: what PEFT's OFT/BOFT rotate


def peft_config(method: str, modules: dict[str, Any], rank: int = RANK):
    """A PEFT config for the same layers; returns (config, note)."""
    import peft

    paths = list(modules)
    if method in ("lora", "dora"):
        return peft.LoraConfig(r=rank, lora_alpha=ALPHA, target_modules=paths, use_dora=method == "dora"), ""
    if method == "loha":
        return peft.LoHaConfig(r=rank, alpha=ALPHA, target_modules=paths), ""
    if method == "lokr":
        return peft.LoKrConfig(r=rank, alpha=ALPHA, target_modules=paths), ""
    if method == "oft":
        note = f"PEFT OFT rotates the input, block {OFT_BLOCK} (Cayley–Neumann, PEFT default)"
        return peft.OFTConfig(r=0, oft_block_size=OFT_BLOCK, target_modules=paths), note
    if method == "boft":
        # PEFT wants one block size dividing every layer's input width; it drops to 1 butterfly factor when its
        # CUDA extension (fbd_cuda) cannot be built, which is always the case on CPU.
        widths = [_in_features(m) for m in modules.values()]
        common = math.gcd(*widths)
        size = max(b for b in range(2, OFT_BLOCK + 1, 2) if common % b == 0)
        # Up to 2 butterfly factors where every width allows it (PEFT: width divisible by size·2^(f−1)).
        factor = 2 if all(w % (2 * size) == 0 and (w // size) % 2 == 0 for w in widths) else 1
        return (peft.BOFTConfig(boft_block_size=size, boft_n_butterfly_factor=factor, target_modules=paths),
                f"PEFT BOFT block {size} on the input, {factor} butterfly factor(s) requested")
    raise KeyError(f"no PEFT equivalent for {method}")


def attach_lycoris(unet, method: str, paths: list[str], rank: int = RANK):
    """A LycorisNetwork on exactly ``paths`` (anchored ``target_name`` patterns, no module-class targets)."""
    import logging

    from lycoris.wrapper import LycorisNetwork

    from methods import get_method

    logging.getLogger("LyCORIS").setLevel(logging.WARNING)
    method_class = get_method(ours_method(method))
    if not method_class.lycoris_algo:
        raise KeyError(f"no LyCORIS equivalent for {method}")
    LycorisNetwork.apply_preset({
        "enable_conv": True, "target_module": [], "module_algo_map": {}, "name_algo_map": {}, "exclude_name": [],
        "use_fnmatch": False, "target_name": [re.escape(p) + "$" for p in paths],
    })
    dim, alpha = (OFT_BLOCK, 0) if "block_size" in method_class.example_options else (rank, ALPHA)
    network = LycorisNetwork(
        unet, multiplier=1.0, lora_dim=dim, conv_lora_dim=dim, alpha=alpha, conv_alpha=alpha,
        network_module=method_class.lycoris_algo, weight_decompose=method == "dora", factor=-1, constraint=0,
        rescaled=False, warn_on_unmatched=False,
    )
    if len(network.loras) != len(paths):
        raise RuntimeError(f"LyCORIS wrapped {len(network.loras)} layers, expected {len(paths)}")
    network.apply_to()
    return network


# ----- one configuration -------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Spec:
    """One measured configuration; ``impl`` is ``base`` or a library name."""

    size: str = "tiny"
    impl: str = "base"
    method: str = "none"
    latent: int = 16
    batch: int = 1
    repeats: int = 5
    warmup: int = 2
    device: str = "cpu"
    dtype: str = "fp32"
    threads: int = 2
    seed: int = 0
    clock: str = "wall"  # wall (perf_counter) or cpu (process_time: this process's CPU time, robust to other load)
    max_seconds: float = 600.0  # stop timing rounds after this long (but not before MIN_REPEATS rounds)
    trained_std: float = 0.01  # adapter tensors that start at zero get N(0, std): timed as mid-training
    rank: int = RANK  # LoRA, DoRA, LoHa and LoKr
    compile: bool = False  # both copies' forward through torch.compile (train.compile's settings; warm-up compiles)


DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (Linux ≥ 4.0) so model construction does not mask the step peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    # After a reset VmHWM is the fresh mark; ru_maxrss may still hold the pre-exec mark.
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return peak


def _attach(spec: Spec, unet, device) -> tuple[list, dict[str, Any], list[str]]:
    """Put ``spec.impl``'s adapters on ``unet``; returns the extra modules holding parameters, facts, target paths."""
    if spec.impl == "base":
        return [], {}, []
    extra: list = []
    info: dict[str, Any] = {}
    paths = target_paths(unet, spec.method)
    modules = dict(unet.named_modules())
    if spec.impl == "ours":
        from methods.network import AdapterNetwork, model_parts
        from methods.targets import TargetConfig

        network = AdapterNetwork.create(model_parts(unet, [], "sd1"), "sd1", ours_method(spec.method),
                                        ours_options(spec.method, spec.rank), TargetConfig(preset="attention_mlp"))
        network.attach().to(device).train()
        extra.append(network)
        info["adapted"] = len(network)
        oft_blocks = [a.oft_blocks.shape for a in network if hasattr(a, "oft_blocks")]
        if oft_blocks:
            info["block_sizes"] = sorted({s[-1] for s in oft_blocks})
            info["stages"] = sorted({s[0] for s in oft_blocks if len(s) == 4})
    elif spec.impl == "peft":
        from peft import inject_adapter_in_model

        config, note = peft_config(spec.method, {p: modules[p] for p in paths}, spec.rank)
        inject_adapter_in_model(config, unet)
        unet.to(device).train()
        info["note"] = note
        info["adapted"] = sum(1 for m in unet.modules() if hasattr(m, "base_layer") and hasattr(m, "merge"))
        boft = [m for m in unet.modules() if hasattr(m, "boft_R")]
        if boft:
            shapes = {tuple(r.shape) for m in boft for r in m.boft_R.values()}
            info["stages"] = sorted({s[0] for s in shapes})
            info["block_sizes"] = sorted({s[-1] for s in shapes})
    elif spec.impl == "lycoris":
        network = attach_lycoris(unet, spec.method, paths, spec.rank)
        network.to(device).train()
        extra.append(network)
        info["adapted"] = len(network.loras)
        info["bypass_mode"] = bool(getattr(network.loras[0], "bypass_mode", False)) if network.loras else None
    else:
        raise ValueError(f"unknown implementation {spec.impl!r}")
    return extra, info, paths


def step_inputs(spec: Spec, unet, device) -> dict[str, Any]:
    """Latents (requiring grad, so the frozen step runs backward through the same layers), constant text
    conditioning, a target and timestep 500, from the spec's seed."""
    import torch

    gen = torch.Generator().manual_seed(spec.seed + 1)
    channels, ctx = unet.config.in_channels, unet.config.cross_attention_dim
    latents = torch.randn(spec.batch, channels, spec.latent, spec.latent, generator=gen).to(device)
    latents.requires_grad_(True)
    hidden = torch.randn(spec.batch, 77, ctx, generator=gen).to(device)
    target = torch.randn(spec.batch, unet.config.out_channels, spec.latent, spec.latent, generator=gen).to(device)
    timesteps = torch.full((spec.batch,), 500, dtype=torch.long, device=device)
    return {"latents": latents, "hidden": hidden, "target": target, "timesteps": timesteps}


def make_trainable(spec: Spec, modules: list, base_ids: set[int], device) -> list:
    """Every parameter of ``modules`` that is not a base weight trains; returns them, zero-started ones filled."""
    import torch

    params = {id(p): p for m in modules for p in m.parameters()}
    trainable = []
    for p in params.values():
        p.requires_grad_(id(p) not in base_ids)
        if id(p) not in base_ids:
            trainable.append(p)
    # Every library starts some tensors at zero (LoRA's up, OFT's blocks); a step there can cost less than one in
    # the middle of training (our CPU Cayley series converges at once for Q = 0), so those are filled first.
    fill = torch.Generator(device).manual_seed(spec.seed + 2)
    with torch.no_grad():
        for p in trainable:
            if spec.trained_std and not p.any():
                p.normal_(0.0, spec.trained_std, generator=fill)
    return trainable


def training_step(model, trainable: list, inputs: dict[str, Any], dtype) -> None:
    """Forward, MSE loss and backward of ``model`` (``trainable`` and the latents' gradients cleared first)."""
    import torch
    import torch.nn.functional as F

    latents = inputs["latents"]
    for p in trainable:
        p.grad = None
    latents.grad = None
    with torch.autocast(latents.device.type, dtype=dtype, enabled=dtype != torch.float32):
        out = model(latents, inputs["timesteps"], encoder_hidden_states=inputs["hidden"]).sample
    loss = F.mse_loss(out.float(), inputs["target"])
    loss.backward()
    if latents.device.type == "cuda":
        torch.cuda.synchronize()


def measure(spec: Spec | dict, profile: bool = False) -> dict[str, Any]:
    """One configuration, in the calling process.

    Two copies of the same UNet: the frozen base and the adapted one. First the adapted copy's memory peak (warm-up
    steps right after attaching, before the base copy ever runs, so the peak is not hidden by memory the allocator
    already holds), then the base copy's warm-up, then ``repeats`` timed rounds alternating base and adapted steps
    (ABBA order), so that both see the same machine load. ``ratio`` is the median of the per-round adapted/base
    ratios. For ``impl == "base"`` the second copy is also bare: its ratio is the noise floor (A/A).
    """
    import copy

    import torch

    from trainer.architectures import build_unet

    spec = Spec(**spec) if isinstance(spec, dict) else spec
    torch.set_num_threads(spec.threads)
    device = torch.device(spec.device)
    dtype = getattr(torch, DTYPES[spec.dtype])
    cuda = device.type == "cuda"
    clock = time.perf_counter if cuda or spec.clock == "wall" else time.process_time

    torch.manual_seed(spec.seed)
    # On a GPU the random initialisation runs there: an 860M-parameter UNet initialises in a second, not a minute.
    with torch.device(device if cuda else "cpu"):
        template = build_unet("sd1", tiny=SIZES[spec.size])
    if cuda and dtype != torch.float32:
        template = template.to(dtype)  # frozen base in half precision (kohya); adapters fp32, autocast the rest
    template.requires_grad_(False)
    # Both copies are made the same way (a deep copy), so neither gains from the other's memory layout.
    base, unet = (copy.deepcopy(template).to(device).train() for _ in range(2))
    del template
    base_ids = {id(p) for p in unet.parameters()}

    inputs = step_inputs(spec, unet, device)

    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        mem_base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        hwm_reset = True
    else:
        mem_base = _rss_bytes()
        hwm_reset = _reset_peak_rss()

    start = time.perf_counter()
    extra, info, paths = _attach(spec, unet, device)
    setup_s = time.perf_counter() - start

    trainable = make_trainable(spec, [unet, *extra], base_ids, device)

    def step(model) -> None:
        training_step(model, trainable, inputs, dtype)

    def timed(model) -> float:
        t0 = clock()
        step(model)
        return (clock() - t0) * 1000.0

    compiling = contextlib.nullcontext  # a factory: each warm-up below enters its own
    if spec.compile:
        from trainer.compiling import compile_settings, recompile_limit, resolve_mode

        mode = resolve_mode("auto", device, shapes=1)
        for model in (base, unet):
            model.forward = torch.compile(model.forward, mode=mode, dynamic=False)
        compiling = functools.partial(compile_settings, recompile_limit(shapes=1, models=2))
        info["compile_mode"] = mode
    with compiling():
        compile_started = time.perf_counter()
        for _ in range(max(1, spec.warmup)):
            step(unet)
        info["first_steps_s"] = time.perf_counter() - compile_started
        with_grad = sum(1 for p in trainable if p.grad is not None)
    if cuda:
        peak = torch.cuda.max_memory_allocated() - mem_base
    else:
        peak = _peak_rss_bytes() - mem_base

    with compiling():
        for _ in range(max(1, spec.warmup)):
            step(base)
    base_times, times = [], []
    started = time.perf_counter()
    for i in range(spec.repeats):
        if i >= MIN_REPEATS and time.perf_counter() - started > spec.max_seconds:
            break  # a very slow configuration (PEFT BOFT on CPU): fewer pairs rather than an hour
        if i % 2:
            times.append(timed(unet))
            base_times.append(timed(base))
        else:
            base_times.append(timed(base))
            times.append(timed(unet))

    # The arithmetic floor: matmul/conv/bmm FLOPs of one adapted step over the frozen step's (elementwise work,
    # copies and launches are what the time ratio adds on top).
    from torch.utils.flop_counter import FlopCounterMode

    flops = []
    for model in (unet, base):
        # Counted on the eager step: a dispatch mode around a compiled call would only make it recompile.
        with torch.compiler.set_stance("force_eager"), FlopCounterMode(display=False) as counter:
            step(model)
        flops.append(counter.get_total_flops())

    profile_table = None
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with torch_profile(activities=activities) as prof:
            step(unet)
        sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        profile_table = prof.key_averages().table(sort_by=sort, row_limit=30)

    step_ms, base_ms = statistics.median(times), statistics.median(base_times)
    pair_ratios = [t / b for t, b in zip(times, base_times)]
    return {
        **dataclasses.asdict(spec),
        "step_ms": step_ms,
        "base_ms": base_ms,
        # Median of the per-round ratios: each round times both copies back to back, so a change in machine load
        # between rounds cancels; the ratio of the two medians is kept for reference.
        "ratio": statistics.median(pair_ratios),
        "ratio_of_medians": step_ms / base_ms,
        "flop_ratio": flops[0] / flops[1] if flops[1] else None,
        "pair_ratios": pair_ratios,
        "rounds": len(times),
        "times_ms": times,
        "base_times_ms": base_times,
        "peak_mb": peak / 2**20,
        "peak_reset": hwm_reset,
        "setup_s": setup_s,
        "targets": len(paths),
        "trainable_params": sum(p.numel() for p in trainable),
        "trainable_tensors": len(trainable),
        "tensors_with_grad": with_grad,
        "profile": profile_table,
        **info,
    }


def run_isolated(spec: Spec, timeout: float | None = None) -> dict[str, Any]:
    """:func:`measure` in a fresh interpreter, so memory peaks and caches do not leak between configurations."""
    env = dict(os.environ)
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[key] = str(spec.threads)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(dataclasses.asdict(spec))]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=str(ROOT))
    except subprocess.TimeoutExpired:
        return {**dataclasses.asdict(spec), "error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {**dataclasses.asdict(spec), "error": f"exit {proc.returncode}: {' | '.join(tail)}"}


def _safe_measure(spec: Spec) -> dict[str, Any]:
    try:
        return measure(spec)
    except Exception as error:  # noqa: BLE001 — one failing library must not hide the others
        return {**dataclasses.asdict(spec), "error": f"{type(error).__name__}: {error}"}
    finally:
        gc.collect()
        if spec.device == "cuda":
            import torch

            torch.cuda.empty_cache()


# ----- the benchmark -----------------------------------------------------------------------------------------------
def default_methods() -> list[str]:
    from methods import available_methods

    found = available_methods()
    return found + (["dora"] if "lora" in found else [])


def run_benchmark(size: str = "tiny", methods: list[str] | None = None, libraries: tuple[str, ...] = LIBRARIES,
                  latent: int = 16, batch: int = 1, repeats: int = 5, warmup: int = 2, device: str = "cpu",
                  dtype: str = "fp32", threads: int | None = None, seed: int = 0, clock: str = "wall",
                  max_seconds: float = 600.0, trained_std: float = 0.01, rank: int = RANK, isolate: bool = True,
                  timeout: float | None = None, compile: bool = False,
                  skip: set[str] = frozenset(), log=None) -> dict[str, Any]:
    """The base (A/A: noise floor and base memory), then every (method, library); returns rows for the table.

    Each row's ``<library>_x`` is that configuration's adapted/base ratio measured in its own process against its
    own copy of the frozen UNet; "no slower than PEFT/LyCORIS" compares those ratios.
    """
    methods = list(methods or default_methods())
    threads = threads or max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    common = {"size": size, "latent": latent, "batch": batch, "repeats": repeats, "warmup": warmup,
              "device": device, "dtype": dtype, "threads": threads, "seed": seed, "clock": clock,
              "max_seconds": max_seconds, "trained_std": trained_std, "rank": rank, "compile": compile}
    runner = (lambda s: run_isolated(s, timeout)) if isolate else _safe_measure

    def run(spec: Spec) -> dict[str, Any]:
        result = runner(spec)
        if log:
            what = f"{spec.impl}:{spec.method}" if spec.impl != "base" else "base (A/A)"
            shown = result.get("error") or (f"{result['step_ms']:.1f} ms vs base {result['base_ms']:.1f} ms = "
                                            f"{result['ratio']:.3f}×, peak {result['peak_mb']:.0f} MB")
            log(f"[{size}] {what:<16} {shown}")
        return result

    base = run(Spec(impl="base", **common))
    if "error" in base:
        raise RuntimeError(f"the frozen-base step failed: {base['error']}")
    rows = []
    for method in methods:
        row: dict[str, Any] = {"method": method, "target": TARGETS.get(method)}
        for library in libraries:
            if f"{library}:{method}" in skip:
                row[library] = {"skipped": True}
                continue
            result = run(Spec(impl=library, method=method, **common))
            row[library] = result
            if "error" not in result:
                row[f"{library}_ms"] = result["step_ms"]
                row[f"{library}_x"] = result["ratio"]
                row[f"{library}_peak_mb"] = result["peak_mb"]
                if result.get("flop_ratio") is not None:
                    row[f"{library}_flops_x"] = result["flop_ratio"]
        ours = row.get("ours_x")
        row["pass_target"] = None if ours is None or row["target"] is None else ours <= row["target"]
        for library in ("peft", "lycoris"):
            other = row.get(f"{library}_x")
            row[f"pass_vs_{library}"] = None if ours is None or other is None else ours <= other
        rows.append(row)
    # Every configuration times the bare copy too: the headline base is the median of those medians.
    base_medians = [base["base_ms"]] + [row[lib]["base_ms"] for row in rows for lib in libraries
                                        if "base_ms" in row[lib]]
    return {"size": size, "settings": common, "base_ms": statistics.median(base_medians),
            "base_peak_mb": base["peak_mb"],
            "noise_floor": base["ratio"], "base_run": base, "rows": rows}


# ----- report ------------------------------------------------------------------------------------------------------
def _verdict(ok: bool | None) -> str:
    return "" if ok is None else (" pass" if ok else " **FAIL**")


def _cell(row: dict[str, Any], key: str, fmt: str, verdict: bool | None = None) -> str:
    if key not in row:
        library = key.split("_")[0]
        return "error" if isinstance(row.get(library), dict) and "error" in row[library] else "—"
    unit = "×" if key.endswith("_x") else ""
    return format(row[key], fmt) + unit + _verdict(verdict)


def markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [
        f"### {report['size']} UNet (SD1 layout), latent {s['latent']}×{s['latent']}, batch {s['batch']}, "
        f"{s['device']} {s['dtype']}, {s['threads']} threads, {s['repeats']} rounds after {s['warmup']} warm-up, "
        f"rank {s.get('rank', RANK)}",
        "",
        f"Frozen base step (forward + backward, all base weights frozen, input latents require grad so backward runs "
        f"through the same layers): **{report['base_ms']:.1f} ms** ({s['clock']} clock; median over all "
        f"configurations' bare copies), peak "
        f"+{report['base_peak_mb']:.0f} MB; A/A noise floor (bare copy vs bare copy): {report['noise_floor']:.3f}×. "
        f"Adapter tensors that start at zero filled with N(0, {s.get('trained_std', 0)}) (mid-training values).",
        "",
        "| method | ours step ms | ours ×base | ours FLOPs ×base | PEFT ×base | LyCORIS ×base "
        "| ours peak MB | PEFT peak MB | LyCORIS peak MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["rows"]:
        target = row["target"]
        name = row["method"] + (f" (≤{target:.2f}×)" if target else "")
        lines.append(" | ".join([
            f"| {name}",
            _cell(row, "ours_ms", ".1f"),
            _cell(row, "ours_x", ".3f", row["pass_target"]),
            _cell(row, "ours_flops_x", ".3f"),
            _cell(row, "peft_x", ".3f", row["pass_vs_peft"]),
            _cell(row, "lycoris_x", ".3f", row["pass_vs_lycoris"]),
            _cell(row, "ours_peak_mb", ".0f"),
            _cell(row, "peft_peak_mb", ".0f"),
            _cell(row, "lycoris_peak_mb", ".0f") + " |",
        ]))
    lines += ["", "pass/FAIL: *ours ×base* against the method's target; *PEFT*/*LyCORIS* columns: ours no slower than "
              "that library. Each ×base is the median over rounds of adapted/base, both copies timed back to back in "
              "the same process; no noise margin. FLOPs ×base: matmul/conv FLOPs of the adapted step over the "
              "frozen step's (torch.utils.flop_counter), the floor the time ratio cannot go below. "
              "Peak MB: peak of the first steps above the frozen UNet's resident size (CPU: RSS high-water mark)."]
    notes = []
    for row in report["rows"]:
        for library in LIBRARIES:
            r = row.get(library)
            if not isinstance(r, dict) or r.get("skipped"):
                continue
            if "error" in r:
                notes.append(f"- {row['method']} / {library}: {r['error']}")
                continue
            extra = []
            if r.get("targets") and r.get("adapted") is not None and r["adapted"] != r["targets"]:
                extra.append(f"wrapped {r['adapted']} of {r['targets']} layers")
            if r.get("tensors_with_grad") != r.get("trainable_tensors"):
                extra.append(f"only {r['tensors_with_grad']}/{r['trainable_tensors']} trainable tensors got a grad")
            for key in ("block_sizes", "stages"):
                if r.get(key):
                    extra.append(f"{key.replace('_', ' ')} {r[key]}")
            if r.get("bypass_mode") is not None:
                extra.append("bypass mode" if r["bypass_mode"] else "weight-rebuild mode (LyCORIS default)")
            if r.get("note"):
                extra.append(r["note"])
            if extra:
                notes.append(f"- {row['method']} / {library} ({r['targets']} targets, "
                             f"{r['trainable_params']:,} params): {'; '.join(extra)}")
    if notes:
        lines += ["", *notes]
    return "\n".join(lines)


def profile_one(size: str, what: str, **settings) -> str:
    """``torch.profiler`` table of one step of ``impl:method`` (or ``base``), in this process."""
    impl, _, method = what.partition(":")
    spec = Spec(size=size, impl=impl, method=method or "none", **settings)
    return measure(spec, profile=True)["profile"]


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--size", choices=("tiny", "sd15", "both"), default="tiny")
    parser.add_argument("--latent", type=int, default=16, help="latent height/width (default 16)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per configuration (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--methods", help="comma-separated; default: every registered method plus dora")
    parser.add_argument("--libraries", default=",".join(LIBRARIES), help="subset of ours,peft,lycoris")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32",
                        help="fp16/bf16: half-precision frozen base (CUDA) and autocast")
    parser.add_argument("--threads", type=int, help="torch threads (default: all available cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: process CPU time (CPU device only), robust when other jobs share the cores")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per configuration subprocess")
    parser.add_argument("--max-seconds", type=float, default=600,
                        help=f"stop a configuration's timed rounds after this long (at least {MIN_REPEATS} rounds)")
    parser.add_argument("--in-process", action="store_true",
                        help="measure every configuration in this process (CUDA: saves each subprocess's start-up; "
                             "peaks stay per configuration since the allocator's peak is reset)")
    parser.add_argument("--skip", metavar="IMPL:METHOD", action="append", default=[],
                        help="leave out one configuration (e.g. peft:boft, whose CUDA extension compiles on first use)")
    parser.add_argument("--rank", type=int, default=RANK,
                        help=f"rank of LoRA, DoRA, LoHa and LoKr in every library (default {RANK}; LoHa's ΔW has "
                             "rank up to its square)")
    parser.add_argument("--trained-std", type=float, default=0.01,
                        help="adapter tensors that start at zero are filled with N(0, std) before timing (0: as "
                             "initialised)")
    parser.add_argument("--compile", action="store_true",
                        help="time compiled steps (torch.compile of both UNet copies, as train.compile; the warm-up "
                             "steps compile, so use --warmup 2 or more)")
    parser.add_argument("--json", help="write every measurement here")
    parser.add_argument("--profile", metavar="IMPL:METHOD", action="append",
                        help="also print a torch.profiler table of one step (e.g. ours:oft, peft:lora, base)")
    args = parser.parse_args(argv)

    if args.worker:
        try:
            result = measure(Spec(**json.loads(args.worker)))
        except Exception as error:  # noqa: BLE001 — reported to the parent as a row error
            import traceback

            traceback.print_exc()
            result = {**json.loads(args.worker), "error": f"{type(error).__name__}: {error}"}
        print(RESULT_MARK + json.dumps(result), flush=True)
        return 0

    methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
    libraries = tuple(lib.strip() for lib in args.libraries.split(",") if lib.strip())
    sizes = ["tiny", "sd15"] if args.size == "both" else [args.size]
    reports = []
    for size in sizes:
        report = run_benchmark(size, methods, libraries, latent=args.latent, batch=args.batch, repeats=args.repeats,
                               warmup=args.warmup, device=args.device, dtype=args.dtype, threads=args.threads,
                               seed=args.seed, clock=args.clock, max_seconds=args.max_seconds,
                               trained_std=args.trained_std, rank=args.rank,
                               timeout=args.timeout, isolate=not args.in_process, compile=args.compile,
                               skip=set(args.skip), log=_log)
        reports.append(report)
        print(markdown(report) + "\n", flush=True)
        for what in args.profile or []:
            settings = {k: v for k, v in report["settings"].items() if k != "size"}
            print(f"#### profile {size} {what}\n```\n{profile_one(size, what, **settings)}\n```\n", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(reports, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
