"""Operations per training step: what an adapter adds to the frozen step, counted rather than timed.

On a GPU a step of small layers waits on kernel launches, not arithmetic, so the number of operations a method adds
per layer is what its overhead follows there; counting them needs no GPU and gives the same figure on any machine.
For each method and implementation (ours, PEFT, LyCORIS) this runs one training step — forward, MSE loss, backward;
base frozen, adapters trainable — of :mod:`adapter_overhead`'s UNet, setup and inputs (its helpers, the same
layers for every library), and reports the count over the frozen step's (the same step with no adapter, latents
requiring grad):

- **eager**: aten operations dispatched in the step (a ``TorchDispatchMode`` counting every call that reaches the
  kernels: forward, loss and backward; views included, since each is a dispatch too);
- **compiled**: kernel calls per step of the ``torch.compile``-d model (Inductor, ``dynamic=False``), read from the
  generated code of its forward and backward graphs: the fused kernels Inductor generated plus the library calls
  it left to aten (``extern_kernels.mm``, convolutions, …). That is what a compiled step launches (on the CPU as
  C++ functions; on CUDA as Triton kernels, or one CUDA-graph replay under ``reduce-overhead``).

    python bench/op_count.py --size tiny
    python bench/op_count.py --size sd15 --methods lora,loha,lokr,oft,boft --no-compiled --json ops.json
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import adapter_overhead as overhead  # noqa: E402 — the UNet, layers, libraries and step of the timing bench

LIBRARIES = overhead.LIBRARIES
METHODS = ("lora", "loha", "lokr", "oft", "boft")
# Calls in Inductor's generated wrapper code: generated C++/Triton kernels, and calls left to aten libraries.
KERNEL_CALL = re.compile(r"^\s+(?:\w+ = )?(cpp_fused_\w+|triton_\w+\.run|extern_kernels\.\w+|aten\.\w+(?:\.\w+)?|"
                         r"torch\.ops\.aten\.\w+(?:\.\w+)?)\(", re.MULTILINE)


def count_dispatched(step) -> tuple[int, collections.Counter]:
    """aten operations dispatched while ``step()`` runs (forward and backward), and the count per operation."""
    from torch.utils._python_dispatch import TorchDispatchMode

    counts: collections.Counter = collections.Counter()

    class Counting(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            counts[str(func.overloadpacket.__name__)] += 1
            return func(*args, **(kwargs or {}))

    with Counting():
        step()
    return sum(counts.values()), counts


def count_compiled_kernels(step) -> tuple[int, collections.Counter]:
    """Kernel calls per step of the graphs ``step()`` compiles (forward and backward): the calls in the wrapper code
    Inductor generated while it ran."""
    from torch._dynamo.utils import counters
    from torch._inductor.utils import run_and_get_code

    breaks = sum(counters["graph_break"].values())
    _, sources = run_and_get_code(step)
    counts: collections.Counter = collections.Counter()
    # Code between graphs (after a break) runs eagerly and is not in any generated wrapper: not counted here.
    counts["graph breaks (not a call)"] = sum(counters["graph_break"].values()) - breaks
    for source in sources:
        for name in KERNEL_CALL.findall(_call_function(source)):
            counts["generated" if name.startswith(("cpp_fused_", "triton_")) else name] += 1
    breaks = counts.pop("graph breaks (not a call)")
    counts["graph_breaks"] = breaks  # reported beside the count; kept out of the sum below
    return sum(count for name, count in counts.items() if name != "graph_breaks"), counts


def _call_function(source: str) -> str:
    """The body of the wrapper's ``call`` (kernels' definitions and benchmark harness left out)."""
    start = source.find("def call(")
    if start < 0:
        return ""
    end = source.find("\ndef ", start + 1)
    return source[start:end if end > 0 else None]


def one_configuration(spec: overhead.Spec, template, compiled: bool) -> dict[str, Any]:
    """Eager and (optionally) compiled counts for one implementation and method on a copy of ``template``."""
    import torch

    torch.manual_seed(spec.seed)
    device = torch.device(spec.device)
    unet = copy.deepcopy(template).to(device).train()
    base_ids = {id(p) for p in unet.parameters()}
    extra, info, _ = overhead._attach(spec, unet, device)
    trainable = overhead.make_trainable(spec, [unet, *extra], base_ids, device)
    inputs = overhead.step_inputs(spec, unet, device)
    dtype = getattr(torch, overhead.DTYPES[spec.dtype])

    def step() -> None:
        overhead.training_step(unet, trainable, inputs, dtype)

    step()  # warm-up: lazily built state (OFT's caches, PEFT's adapters) is not counted
    row: dict[str, Any] = {"adapted": info.get("adapted", 0), "trainable_tensors": len(trainable)}
    row["eager"], per_op = count_dispatched(step)
    row["eager_top"] = dict(per_op.most_common(8))
    if compiled:
        try:
            import torch._inductor.config as inductor_config

            # As train.compile (trainer.compiling): channels-last layouts inside the graph off.
            with inductor_config.patch(layout_optimization=False):
                unet.forward = torch.compile(unet.forward, dynamic=False)
                row["compiled"], per_kernel = count_compiled_kernels(step)
            row["graph_breaks"] = per_kernel.pop("graph_breaks")
            row["compiled_top"] = dict(per_kernel.most_common(8))
        except Exception as error:  # noqa: BLE001 — one library failing to compile must not hide the others
            row["compiled_error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
    return row


def run_counts(size: str = "tiny", methods: list[str] | None = None, libraries: tuple[str, ...] = LIBRARIES,
               compiled: bool = True, latent: int = 8, batch: int = 1, skip: frozenset[str] = frozenset(),
               log=None) -> dict[str, Any]:
    """Counts for the frozen step and every (method, library); ratios over the frozen step's counts."""
    import torch

    from trainer.architectures import build_unet

    log = log or (lambda message: None)
    torch.manual_seed(0)
    template = build_unet("sd1", tiny=overhead.SIZES[size])
    template.requires_grad_(False)
    settings = {"size": size, "latent": latent, "batch": batch, "threads": torch.get_num_threads()}
    log(f"frozen step ({size})")
    base = one_configuration(overhead.Spec(**settings), template, compiled)
    rows = []
    for method in methods or list(METHODS):
        row: dict[str, Any] = {"method": method}
        for library in libraries:
            if f"{library}:{method}" in skip:
                continue
            log(f"{library} {method}")
            try:
                counts = one_configuration(overhead.Spec(impl=library, method=method, **settings), template, compiled)
            except Exception as error:  # noqa: BLE001 — PEFT/LyCORIS lacking a method
                counts = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
            for kind in ("eager", "compiled"):
                if kind in counts and base.get(kind):
                    counts[f"{kind}_x"] = counts[kind] / base[kind]
            row[library] = counts
        rows.append(row)
    return {"settings": {**settings, "compiled": compiled, "torch": torch.__version__}, "base": base, "rows": rows}


def markdown(report: dict[str, Any]) -> str:
    base = report["base"]
    libraries = [lib for lib in LIBRARIES if any(lib in row for row in report["rows"])]
    kinds = ["eager"] + (["compiled"] if report["settings"]["compiled"] else [])
    header = ["method"] + [f"{lib} {kind}" for kind in kinds for lib in libraries]
    lines = [f"frozen step: {base['eager']} aten ops eager"
             + (f", {base.get('compiled', '?')} kernel calls compiled" if "compiled" in kinds else ""),
             "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in report["rows"]:
        cells = [row["method"]]
        for kind in kinds:
            for lib in libraries:
                counts = row.get(lib, {})
                ratio = counts.get(f"{kind}_x")
                breaks = f", {counts['graph_breaks']} breaks¹" if kind == "compiled" and counts.get("graph_breaks") \
                    else ""
                cells.append(f"{ratio:.2f}× ({counts[kind]}{breaks})" if ratio is not None else "—")
        lines.append("| " + " | ".join(cells) + " |")
    if any(counts.get("graph_breaks") for row in report["rows"] for counts in row.values() if isinstance(counts, dict)):
        lines += ["", "¹ the model's graph breaks there: the code between its graphs runs eagerly and is not counted"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=tuple(overhead.SIZES), default="tiny",
                        help="tiny UNet, or the real-size SD1.5 UNet with random weights")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods")
    parser.add_argument("--libraries", default=",".join(LIBRARIES), help="comma-separated: ours, peft, lycoris")
    parser.add_argument("--no-compiled", action="store_true", help="eager counts only (compiling takes minutes)")
    parser.add_argument("--latent", type=int, default=8, help="latent side (counts do not depend on it)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip", metavar="IMPL:METHOD", action="append", default=[],
                        help="leave out one configuration (LyCORIS's BOFT holds about 19 GB on the SD1.5 UNet)")
    parser.add_argument("--json", help="write the full report here")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    libraries = tuple(lib for lib in args.libraries.split(",") if lib)
    unknown = sorted(set(libraries) - set(LIBRARIES))
    if unknown:
        parser.error(f"unknown libraries {unknown}; choose from {', '.join(LIBRARIES)}")
    report = run_counts(args.size, [m for m in args.methods.split(",") if m], libraries, not args.no_compiled,
                        args.latent, args.batch, frozenset(args.skip),
                        log=lambda message: print(f"... {message}", file=sys.stderr))
    print(markdown(report))
    if args.json:
        from methods.files import write_text_atomic

        write_text_atomic(Path(args.json), json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
