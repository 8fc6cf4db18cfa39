"""Command line: ``python -m trainer <command>`` (also installed as ``rankwright``).

Commands:

- ``merge``: bake one or more adapter files (any method) into a copy of a base model; write a diffusers folder
  or, for ``--out X.safetensors``, a single ldm/sgm checkpoint;
- ``convert``: turn any adapter file into a plain LoRA file by truncated SVD of each module's ΔW;
- ``inspect``: method, modules per part, ranks, alphas, dtype, architecture, hashes and metadata of a file;
- ``train``: train an adapter from a TOML config (``--set section.key=value`` overrides, ``--resume STATE_DIR``);
  under ``torchrun --nproc_per_node N -m trainer train ...`` or ``accelerate launch -m trainer train ...`` it
  trains data-parallel, and only the main process writes files. Exit 0 also when stopped (SIGINT/SIGTERM/STOP
  file) with a save; 1 when training failed (NaN loss); 2 for configuration mistakes;
- ``compare``: train several methods (``--methods lora,loha,...``) from one config on the same data, steps and
  seed, and write a report (preview grid, loss curves, parameters, file size, s/step, prior drift, concept score
  on the toy model) into a new folder; ``--override METHOD:section.key=value`` changes one method's config only.

Each command is a :class:`Command` in ``COMMANDS`` (``@command(...)`` registers one); a new command (``train``)
adds an ``add_arguments`` function and a handler the same way. Handlers return an exit code; mistakes a user can
make raise :class:`CLIError` (or the loaders' own error classes) and end as one ``error: ...`` line with exit 2.
"""

from __future__ import annotations

import os

# Before diffusers/transformers are imported: their info/warning chatter is not for CLI users.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

EXIT_USER_ERROR = 2
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
PART_PREFIXES = ("lora_unet", "lora_te1", "lora_te2", "lora_te")


class CLIError(Exception):
    """A mistake the user can fix; printed as one line, exit code 2."""


@dataclasses.dataclass
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {}


def command(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None]):
    """Register ``run(args) -> exit code`` as subcommand ``name``."""

    def register(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = Command(name, help, add_arguments, run)
        return run

    return register


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer",
                                     description="Rankwright: Stable Diffusion adapter tools (LoRA, LoHa, LoKr, OFT, "
                                                 "BOFT, DoRA) writing Civitai-style .safetensors files.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for entry in COMMANDS.values():
        sub = subparsers.add_parser(entry.name, help=entry.help, description=entry.help)
        entry.add_arguments(sub)
        sub.set_defaults(handler=entry.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .install_check import check_installation

    check_installation()  # again: another distribution may have replaced trainer/__init__.py, not this file
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_libraries()
    from methods.base import ConfigError
    from methods.files import AdapterFileError

    from .models import ModelLoadError

    try:
        return int(args.handler(args) or 0)
    except (CLIError, ModelLoadError, AdapterFileError, ConfigError, FileExistsError, FileNotFoundError) as error:
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


def _quiet_libraries() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")


def _quiet_model_libraries() -> None:
    """Silence diffusers/transformers progress bars (imported only by the commands that load models)."""
    try:
        import diffusers.utils.logging as diffusers_logging

        diffusers_logging.set_verbosity_error()
        diffusers_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - diffusers is a dependency
        pass
    try:
        import transformers.utils.logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def _say(text: str = "") -> None:
    print(text, flush=True)


# ----- shared helpers ------------------------------------------------------------------------------------------------
def part_counts(names: Any) -> dict[str, int]:
    """Modules per file part (lora_unet / lora_te / lora_te1 / lora_te2), in that order."""
    counts: dict[str, int] = {}
    for name in names:
        prefix = next((p for p in PART_PREFIXES if name.startswith(p + "_")), name.split("_", 2)[0])
        counts[prefix] = counts.get(prefix, 0) + 1
    order = {p: i for i, p in enumerate(("lora_unet", "lora_te", "lora_te1", "lora_te2"))}
    return dict(sorted(counts.items(), key=lambda item: order.get(item[0], 99)))


def format_counts(counts: dict[str, int]) -> str:
    labels = {"lora_unet": "unet", "lora_te": "te", "lora_te1": "te1", "lora_te2": "te2"}
    return ", ".join(f"{labels.get(k, k)} {v}" for k, v in counts.items()) or "none"


def _require_file(path: str, what: str) -> Path:
    file = Path(path).expanduser()
    if not file.exists():
        raise CLIError(f"{path}: no such file ({what})")
    if not file.is_file():
        raise CLIError(f"{path}: is a folder, expected a file ({what})")
    return file


def _check_output(out: Path, overwrite: bool, inputs: list[Path]) -> None:
    resolved = out.resolve()
    for source in inputs:
        if source.exists() and source.resolve() == resolved:
            raise CLIError(f"{out}: the output would replace an input file; choose another --out")
    if out.exists() and not overwrite:
        kind = "folder" if out.is_dir() else "file"
        raise CLIError(f"{out} already exists ({kind}); choose another --out or pass --overwrite")


def _read_adapter(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, dict[str, torch.Tensor]]]:
    from methods.files import load_adapter_file
    from methods.network import group_by_module

    tensors, metadata = load_adapter_file(path)
    grouped = group_by_module(tensors)
    if any(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner."))
           for k in tensors):
        raise CLIError(f"{path}: this is a base model checkpoint, not an adapter file")
    return tensors, metadata, grouped


def module_methods(path: Path, grouped: dict[str, dict[str, torch.Tensor]]) -> dict[str, str]:
    """File module → method name; raises when the file holds no adapter module at all."""
    from methods.registry import method_for_file_module

    methods: dict[str, str] = {}
    for name, tensors in grouped.items():
        try:
            methods[name] = method_for_file_module(set(tensors)).method
        except ValueError:
            methods[name] = "unknown"
    if not any(m != "unknown" for m in methods.values()):
        first = ", ".join(sorted(grouped)[:3])
        raise CLIError(f"{path}: not an adapter file (no LoRA/LoHa/LoKr/OFT/BOFT tensors; first modules: {first})")
    return methods


def adapter_architecture(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str | None, str]:
    """(sd1 | sd2 | sdxl | None, where it was read) of an adapter file, from metadata first, then from its keys."""
    version = metadata.get("ss_base_model_version", "")
    if version:
        if version.startswith("sdxl"):
            return "sdxl", f"metadata ss_base_model_version={version}"
        if version.startswith("sd_v2"):
            return "sd2", f"metadata ss_base_model_version={version}"
        if version.startswith("sd_v1"):
            return "sd1", f"metadata ss_base_model_version={version}"
    spec = metadata.get("modelspec.architecture", "")
    for marker, arch in (("stable-diffusion-xl", "sdxl"), ("stable-diffusion-v2", "sd2"),
                         ("stable-diffusion-v1", "sd1")):
        if spec.startswith(marker):
            return arch, f"metadata modelspec.architecture={spec}"
    names = {key.partition(".")[0] for key in tensors}
    if any(n.startswith(("lora_te1_", "lora_te2_")) for n in names) or any(
            n.startswith(("lora_unet_input_blocks", "lora_unet_output_blocks", "lora_unet_middle_block"))
            for n in names):
        return "sdxl", "key names (lora_te1/lora_te2 or sgm-style UNet names)"
    for key, tensor in tensors.items():
        if "attn2_to_k." in key and key.endswith("lora_down.weight"):
            width = int(tensor.shape[1])
            arch = {768: "sd1", 1024: "sd2", 2048: "sdxl"}.get(width)
            if arch:
                return arch, f"cross-attention width {width}"
    return None, "unknown"


def module_rank(tensors: dict[str, torch.Tensor]) -> str:
    """The rank (or block layout) of one file module, as consumers read it from the tensor shapes."""
    if "lora_down.weight" in tensors:
        return str(tensors["lora_down.weight"].shape[0])
    if "hada_w1_b" in tensors:
        return str(tensors["hada_w1_b"].shape[0])
    if any(k.startswith("lokr_") for k in tensors):
        if "lokr_w2_b" in tensors:
            return str(tensors["lokr_w2_b"].shape[0])
        if "lokr_w1_b" in tensors:
            return str(tensors["lokr_w1_b"].shape[0])
        return "full"
    if "oft_blocks" in tensors:
        blocks = tensors["oft_blocks"]
        if blocks.dim() == 4:
            return f"{blocks.shape[0]}x{blocks.shape[1]} blocks of {blocks.shape[2]}"
        return f"{blocks.shape[0]} blocks of {blocks.shape[1]}"
    return "?"


def _histogram(values: list[str]) -> dict[str, int]:
    result: dict[str, int] = {}
    for value in values:
        result[value] = result.get(value, 0) + 1
    return dict(sorted(result.items(), key=lambda item: (-item[1], item[0])))


def _format_histogram(histogram: dict[str, int]) -> str:
    if len(histogram) == 1:
        return next(iter(histogram))
    return ", ".join(f"{value} ({count})" for value, count in histogram.items())


def _short(value: str, limit: int = 160) -> str:
    text = " ".join(value.split())
    return text if len(text) <= limit else f"{text[:limit]}… ({len(value)} chars)"


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ----- inspect ----------------------------------------------------------------------------------------------------
def _inspect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="adapter .safetensors file")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--full", action="store_true", help="do not shorten long metadata values")


def inspect_adapter(path: str | os.PathLike) -> dict[str, Any]:
    """Everything ``inspect`` reports, as a JSON-serialisable dict."""
    from methods.files import kohya_hashes

    file = _require_file(os.fspath(path), "adapter file")
    tensors, metadata, grouped = _read_adapter(file)
    methods = module_methods(file, grouped)
    arch, arch_source = adapter_architecture(tensors, metadata)
    ranks = _histogram([module_rank(t) for name, t in grouped.items() if methods[name] != "unknown"])
    alphas = _histogram([f"{float(t['alpha'].item()):g}" if "alpha" in t else "none"
                         for name, t in grouped.items() if methods[name] != "unknown"])
    model_hash, legacy_hash = kohya_hashes(tensors, metadata)
    sha256 = _file_sha256(file)
    adapter_names = [n for n, m in methods.items() if m != "unknown"]
    return {
        "file": str(file),
        "size_bytes": file.stat().st_size,
        "methods": _histogram([m for m in methods.values() if m != "unknown"]),
        "dora_modules": sum("dora_scale" in t for t in grouped.values()),
        "network_module": metadata.get("ss_network_module"),
        "modules": len(adapter_names),
        "modules_per_part": part_counts(adapter_names),
        "unknown_modules": sorted(n for n, m in methods.items() if m == "unknown"),
        "ranks": ranks,
        "alphas": alphas,
        "dtypes": _histogram([str(t.dtype).removeprefix("torch.") for t in tensors.values()]),
        "tensors": len(tensors),
        "parameters": int(sum(t.numel() for t in tensors.values())),
        "architecture": arch,
        "architecture_from": arch_source,
        "hashes": {
            "sha256": sha256,
            "autov2": sha256[:10],
            "sshs_model_hash": model_hash,
            "sshs_legacy_hash": legacy_hash,
            "stored_sshs_model_hash": metadata.get("sshs_model_hash"),
            "stored_hash_matches": metadata.get("sshs_model_hash") in (None, model_hash),
        },
        "metadata": dict(sorted(metadata.items())),
    }


@command("inspect", "show what an adapter file holds: methods, modules, ranks, metadata, hashes", _inspect_arguments)
def run_inspect(args: argparse.Namespace) -> int:
    report = inspect_adapter(args.file)
    if args.json:
        _say(json.dumps(report, indent=2, ensure_ascii=False))
        return 0
    hashes = report["hashes"]
    stored = hashes["stored_sshs_model_hash"]
    hash_note = "" if stored is None else (" (matches the stored value)" if hashes["stored_hash_matches"]
                                           else f" (stored value {stored} differs: the file was edited)")
    method_text = _format_histogram(report["methods"])
    if report["dora_modules"]:
        method_text += f" + DoRA ({report['dora_modules']} modules)"
    lines = [
        f"file:          {report['file']} ({report['size_bytes'] / 1e6:.2f} MB)",
        f"method:        {method_text}" + (f"  [{report['network_module']}]" if report["network_module"] else ""),
        f"architecture:  {report['architecture'] or 'unknown'} ({report['architecture_from']})",
        f"modules:       {report['modules']} ({format_counts(report['modules_per_part'])})",
        f"rank:          {_format_histogram(report['ranks'])}",
        f"alpha:         {_format_histogram(report['alphas'])}",
        f"dtype:         {_format_histogram(report['dtypes'])}",
        f"parameters:    {report['parameters']:,} in {report['tensors']} tensors",
        f"sha256:        {hashes['sha256']} (AutoV2 {hashes['autov2']})",
        f"addnet hash:   {hashes['sshs_model_hash']}{hash_note}; legacy {hashes['sshs_legacy_hash']}",
    ]
    if report["unknown_modules"]:
        lines.append(f"unreadable:    {len(report['unknown_modules'])} module(s) of no known method, "
                     f"e.g. {report['unknown_modules'][0]}")
    metadata = report["metadata"]
    lines.append(f"metadata:      {len(metadata)} key(s)" + (":" if metadata else ""))
    width = max((len(k) for k in metadata), default=0)
    for key, value in metadata.items():
        lines.append(f"  {key:<{width}}  {value if args.full else _short(value)}")
    _say("\n".join(lines))
    return 0


# ----- merge ------------------------------------------------------------------------------------------------------
def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", choices=("sd1", "sd2", "sdxl"), help="check the base model's architecture")
    parser.add_argument("--prediction-type", choices=("epsilon", "v_prediction"),
                        help="override the base model's prediction type")
    parser.add_argument("--config", help="diffusers folder whose configs describe a single-file base of "
                                         "non-standard size")
    parser.add_argument("--tokenizer", help="tokenizer folder for a single-file base (single files carry none)")


def _merge_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, help="base model: diffusers folder, .safetensors/.ckpt, or hub id")
    parser.add_argument("--adapter", action="append", required=True, metavar="FILE",
                        help="adapter file to bake in (repeat for several; merged in the order given)")
    parser.add_argument("--strength", action="append", type=float, metavar="S",
                        help="strength (default 1); once for all adapters or once per --adapter")
    parser.add_argument("--out", required=True, help="output diffusers folder, or a .safetensors single file")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp16", help="dtype of the written weights")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    _model_arguments(parser)


@dataclasses.dataclass
class MergeReport:
    adapter: str
    strength: float
    method: str
    modules: int
    per_part: dict[str, int]
    ignored: int


def bake_adapters(pipe: Any, adapters: list[tuple[Path, float]], arch: str | None = None) -> list[MergeReport]:
    """Add ``strength·ΔW`` of each adapter file into the pipeline's weights, in order (no undo copies are kept).

    The arithmetic is :meth:`AdapterModule.merge`'s (``W ← (W + s·merged_delta).to(W.dtype)``); DoRA/OFT/BOFT
    deltas of a later file see the weights already changed by the earlier ones, as when applied in sequence.
    """
    from methods.apply import load_network
    from methods.files import AdapterFileError

    reports = []
    for path, strength in adapters:
        try:
            network, _ = load_network(pipe, path, arch)
        except AdapterFileError:
            raise
        except ValueError as error:  # a module whose tensors do not fit its layer: another base model
            message = " ".join(str(error).split())
            raise CLIError(f"{path}: does not fit this {arch or 'base'} model ({message})") from error
        file_modules = {key.partition(".")[0] for key in _tensor_keys(path)}
        with torch.no_grad():
            for adapter in network:
                weight = adapter.base.weight
                delta = adapter.merged_delta().float()
                weight.copy_((weight.float() + strength * delta).to(weight.dtype))
        reports.append(MergeReport(str(path), strength, network.method, len(network), part_counts(network.adapters),
                                   len(file_modules) - len(network)))
        del network
    return reports


def _tensor_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return list(handle.keys())


@command("merge", "bake adapters (any method) into a copy of a base model", _merge_arguments)
def run_merge(args: argparse.Namespace) -> int:
    from .models import load_pipeline, save_pipeline_folder, save_single_file

    out = Path(args.out).expanduser()
    single_file = out.suffix == ".safetensors"
    if out.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        raise CLIError(f"{out}: write merged models as .safetensors (or a folder); pickled {out.suffix} is not written")
    adapters = [_require_file(a, "adapter file") for a in args.adapter]
    strengths = args.strength or [1.0]
    if len(strengths) == 1:
        strengths = strengths * len(adapters)
    if len(strengths) != len(adapters):
        raise CLIError(f"give --strength once, or once per --adapter ({len(adapters)}), not {len(strengths)} times")
    base_path = Path(args.base).expanduser()
    _check_output(out, args.overwrite, [base_path, *adapters])
    for adapter in adapters:
        _read_adapter(adapter)  # fails fast on files that are not adapters, before the base model loads

    _quiet_model_libraries()
    pipe, info = load_pipeline(args.base, arch=args.arch, prediction_type=args.prediction_type,
                               dtype=torch.float32, config=args.config, tokenizer=args.tokenizer)
    _say(f"base: {args.base} ({info.arch}, {info.prediction_type}, {info.source_kind.replace('_', ' ')})")
    for note in info.notes:
        _say(f"note: {note}")
    reports = bake_adapters(pipe, list(zip(adapters, strengths)), info.arch)
    for report in reports:
        ignored = f"; {report.ignored} module(s) matched no layer and were skipped" if report.ignored else ""
        _say(f"merged {report.adapter} at strength {report.strength:g}: {report.method}, {report.modules} modules "
             f"({format_counts(report.per_part)}){ignored}")
    dtype = DTYPES[args.dtype]
    if single_file:
        merged_from = ", ".join([Path(args.base).name] + [Path(r.adapter).name for r in reports])
        extra = {"modelspec.merged_from": merged_from,
                 "rankwright.merged_adapters": json.dumps([dataclasses.asdict(r) for r in reports])}
        save_single_file(pipe, out, dtype=dtype, metadata=extra, overwrite=args.overwrite)
        _say(f"wrote {out} (single-file {info.arch} checkpoint, {args.dtype})")
    else:
        pipe.to(dtype=dtype)
        save_pipeline_folder(pipe, out, overwrite=args.overwrite)
        _say(f"wrote {out} (diffusers folder, {args.dtype})")
        if getattr(pipe, "tokenizer", None) is None:
            _say("note: the base had no tokenizer, so the folder has none; pass --tokenizer to include one")
    return 0


# ----- convert ----------------------------------------------------------------------------------------------------
def _convert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="adapter file of any method")
    parser.add_argument("--to", choices=("lora",), default="lora", help="target format (plain LoRA)")
    parser.add_argument("--rank", type=int, required=True, help="rank for Linear and 1×1 conv modules")
    parser.add_argument("--conv-rank", type=int, help="rank for k×k conv modules (default: --rank; 0 drops them)")
    parser.add_argument("--out", required=True, help="output .safetensors file")
    parser.add_argument("--base", help="base model; required for OFT/BOFT/DoRA files, whose ΔW depends on it")
    parser.add_argument("--dtype", choices=tuple(DTYPES), help="dtype of the written file (default: the input's)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    _model_arguments(parser)


@dataclasses.dataclass
class ConvertReport:
    modules: int
    dropped: list[str]
    relative_error: float
    worst_module: str
    worst_error: float
    methods: dict[str, int]
    errors: dict[str, float]


def _stand_in(module: torch.nn.Module) -> torch.nn.Module:
    """A zero-weight CPU layer shaped like ``module`` (which may live on the meta device): ΔW of LoRA/LoHa/LoKr
    does not depend on the base weight, only on its shape."""
    with torch.device("meta"):
        if isinstance(module, torch.nn.Conv2d):
            layer = torch.nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                                    module.padding, module.dilation, module.groups, bias=False)
        else:
            layer = torch.nn.Linear(module.in_features, module.out_features, bias=False)
    layer = layer.to_empty(device="cpu")
    with torch.no_grad():
        layer.weight.zero_()
    return layer


def _lora_stand_in(tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
    down, up, mid = tensors["lora_down.weight"], tensors["lora_up.weight"], tensors.get("lora_mid.weight")
    if down.dim() == 4:
        kernel = tuple(mid.shape[2:]) if mid is not None else tuple(down.shape[2:])
        module = torch.nn.Conv2d(down.shape[1], up.shape[0], kernel, bias=False, device="meta")
    else:
        module = torch.nn.Linear(down.shape[1], up.shape[0], bias=False, device="meta")
    return _stand_in(module)


def _template_lookup(arch: str) -> dict[str, tuple[str, torch.nn.Module]]:
    from methods.network import model_parts, name_lookup

    from .architectures import build_text_encoders, build_unet

    unet = build_unet(arch, meta=True)
    encoders = build_text_encoders(arch, meta=True)
    return name_lookup(model_parts(unet, encoders, arch))


def module_deltas(path: Path, grouped: dict[str, dict[str, torch.Tensor]], metadata: dict[str, str],
                  pipe: Any = None, arch: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """ΔW (at strength 1, shaped like the base weight) of every module of a file, and each module's method.

    With ``pipe`` the real layers are used (required for OFT/BOFT/DoRA). Without it, plain LoRA modules get a
    stand-in layer from their own tensor shapes and LoHa/LoKr modules one from the real-size model of the file's
    architecture (built on the meta device, so nothing is allocated but one layer at a time).
    """
    from methods.network import name_lookup, pipeline_parts
    from methods.registry import method_for_file_module

    classes = {}
    for name, tensors in grouped.items():
        try:
            classes[name] = method_for_file_module(set(tensors))
        except ValueError as error:
            raise CLIError(f"{path}: module {name} cannot be read ({error})") from error
    if pipe is not None:
        parts, _ = pipeline_parts(pipe, arch)
        lookup = name_lookup(parts)
        missing = [name for name in grouped if name not in lookup]
        if missing:
            raise CLIError(f"{path}: {len(missing)} module(s) match no layer of the base model (first: {missing[0]}); "
                           "is the adapter for another base model?")
    else:
        needs_base = [name for name, cls in classes.items() if cls.multiplicative or "dora_scale" in grouped[name]]
        if needs_base:
            kind = "OFT/BOFT" if classes[needs_base[0]].multiplicative else "DoRA"
            raise CLIError(f"{path}: its {kind} modules' ΔW depends on the base weights; pass --base MODEL "
                           f"({len(needs_base)} such module(s), e.g. {needs_base[0]})")
        lookup = {}
        if any(cls.method != "lora" for cls in classes.values()):
            lookup = _find_template(path, grouped, classes, metadata, arch)

    deltas: dict[str, torch.Tensor] = {}
    methods: dict[str, str] = {}
    for name, tensors in grouped.items():
        cls = classes[name]
        if pipe is not None:
            base = lookup[name][1]
        elif cls.method == "lora":
            base = _lora_stand_in(tensors)
        else:
            base = _stand_in(lookup[name][1])
        try:
            adapter = cls.from_tensors(name, base, tensors)
        except (ValueError, KeyError, RuntimeError) as error:
            raise CLIError(f"{path}: module {name} cannot be read ({' '.join(str(error).split())})") from error
        with torch.no_grad():
            deltas[name] = adapter.merged_delta().detach().float().cpu()
        methods[name] = cls.method + ("+dora" if "dora_scale" in tensors else "")
    return deltas, methods


def _find_template(path: Path, grouped: dict[str, dict[str, torch.Tensor]], classes: dict[str, Any],
                   metadata: dict[str, str], arch: str | None) -> dict[str, tuple[str, torch.nn.Module]]:
    hinted, _ = adapter_architecture({f"{n}.{s}": t for n, ts in grouped.items() for s, t in ts.items()}, metadata)
    candidates = [arch] if arch else list(dict.fromkeys([a for a in (hinted, "sd1", "sd2", "sdxl") if a]))
    for candidate in candidates:
        lookup = _template_lookup(candidate)
        fits = True
        for name, tensors in grouped.items():
            if classes[name].method == "lora":
                continue
            target = lookup.get(name)
            if target is None:
                fits = False
                break
            try:
                classes[name].from_tensors(name, target[1], tensors)  # meta base: checks shapes, allocates nothing
            except (ValueError, KeyError, RuntimeError):
                fits = False
                break
        if fits:
            return lookup
    raise CLIError(f"{path}: its modules do not fit the real-size {' / '.join(candidates)} layout, so their "
                   "shapes are unknown; pass --base MODEL")


def truncated_lora(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Best rank-``rank`` factors of ΔW flattened to (out, in·kh·kw): down, up, residual ‖ΔW−up·down‖², ‖ΔW‖².

    The top singular subspace comes from ``eigh`` of the Gram matrix of the smaller side, in float64 — the same
    subspace as a truncated SVD, at a fraction of its cost for the wide (out ≪ in·k·k) matrices of SD layers.
    The residual is measured directly on the factors that are written.
    """
    matrix = delta.reshape(delta.shape[0], -1).double()
    out_dim, in_dim = matrix.shape
    k = min(rank, out_dim, in_dim)
    if out_dim <= in_dim:
        _, vectors = torch.linalg.eigh(matrix @ matrix.T)
        basis = vectors[:, -k:].flip(1)  # top-k left singular vectors (out, k)
        up, down = basis, basis.T @ matrix
        norms = down.norm(dim=1)  # σ_i
    else:
        _, vectors = torch.linalg.eigh(matrix.T @ matrix)
        basis = vectors[:, -k:].flip(1)  # top-k right singular vectors (in, k)
        up, down = matrix @ basis, basis.T
        norms = up.norm(dim=0)
    # Balance the factors (σ split evenly as √σ·√σ) so neither overflows fp16; skip null directions.
    tiny = norms.max().clamp_min(1e-300) * 1e-12
    balance = torch.where(norms > tiny, norms.sqrt(), torch.ones_like(norms))
    if out_dim <= in_dim:
        up, down = up * balance, down / balance[:, None]
    else:
        up, down = up / balance, down * balance[:, None]
    residual = float((matrix - up @ down).pow(2).sum())
    total = float(matrix.pow(2).sum())
    if delta.dim() == 4:
        down = down.reshape(k, *delta.shape[1:])
        up = up.reshape(delta.shape[0], k, 1, 1)
    return down.float(), up.float(), residual, total


def convert_to_lora(path: str | os.PathLike, out: str | os.PathLike, rank: int, conv_rank: int | None = None, *,
                    pipe: Any = None, arch: str | None = None, dtype: str | None = None,
                    overwrite: bool = False) -> ConvertReport:
    """Write ``out`` as a plain LoRA (kohya ``networks.lora``) approximating every module of ``path``."""
    from methods.files import build_metadata, save_adapter_file

    file = _require_file(os.fspath(path), "adapter file")
    out = Path(out)
    if out.suffix != ".safetensors":
        raise CLIError(f"{out}: the converted LoRA must be a .safetensors file")
    if rank < 1:
        raise CLIError(f"--rank must be at least 1, got {rank}")
    if conv_rank is not None and conv_rank < 0:
        raise CLIError(f"--conv-rank must be 0 (drop k×k convs) or more, got {conv_rank}")
    conv_rank = rank if conv_rank is None else conv_rank
    _check_output(out, overwrite, [file])
    tensors, metadata, grouped = _read_adapter(file)
    module_methods(file, grouped)
    deltas, methods = module_deltas(file, grouped, metadata, pipe, arch)

    state: dict[str, torch.Tensor] = {}
    errors: dict[str, float] = {}
    dropped: list[str] = []
    residual_sum = total_sum = 0.0
    has_kxk = False
    for name, delta in deltas.items():
        kxk = delta.dim() == 4 and tuple(delta.shape[2:]) != (1, 1)
        has_kxk |= kxk
        module_rank_ = conv_rank if kxk else rank
        if module_rank_ == 0:
            total = float(delta.double().pow(2).sum())
            residual_sum, total_sum = residual_sum + total, total_sum + total
            errors[name] = 1.0 if total else 0.0
            dropped.append(name)
            continue
        down, up, residual, total = truncated_lora(delta, module_rank_)
        residual_sum += residual
        total_sum += total
        errors[name] = math.sqrt(residual / total) if total else 0.0
        state[f"{name}.lora_down.weight"] = down
        state[f"{name}.lora_up.weight"] = up
        state[f"{name}.alpha"] = torch.tensor(float(down.shape[0]))  # alpha = rank: scale 1, ΔW as written
    if not state:
        raise CLIError(f"{file}: nothing left to write (every module is a k×k conv and --conv-rank is 0)")

    arch_found, _ = adapter_architecture(tensors, metadata)
    arch_found = arch or arch_found
    network_args = {"algo": "lora"}
    if has_kxk and conv_rank:
        network_args.update(conv_dim=str(conv_rank), conv_alpha=str(conv_rank))
    fresh = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(float(rank)),
        "ss_network_args": json.dumps(network_args),
        "ss_output_name": out.stem,
        "modelspec.title": out.stem,
    }
    if metadata:
        new_metadata = {k: v for k, v in metadata.items()
                        if not k.startswith(("sshs_", "modelspec.hash")) and k != "ss_network_args"}
    elif arch_found:
        prediction = "v_prediction" if metadata.get("ss_v_parameterization") == "True" else "epsilon"
        new_metadata = build_metadata(method="lora", arch=arch_found, options={}, title=out.stem, rank=rank,
                                      alpha=rank, prediction_type=prediction)
    else:
        new_metadata = {}
    new_metadata.update(fresh)
    worst = max(errors, key=errors.get)
    overall = math.sqrt(residual_sum / total_sum) if total_sum else 0.0
    method_counts = _histogram(list(methods.values()))
    new_metadata["rankwright.converted_from"] = json.dumps({
        "file": file.name, "methods": method_counts, "sshs_model_hash": metadata.get("sshs_model_hash"),
        "rank": rank, "conv_rank": conv_rank, "relative_error": overall})
    source_dtype = next(iter(tensors.values())).dtype
    save_dtype = dtype or DTYPE_NAMES.get(source_dtype, "fp16")
    save_adapter_file(out, state, new_metadata, save_dtype, overwrite=overwrite)
    return ConvertReport(len(deltas) - len(dropped), dropped, overall, worst, errors[worst], method_counts, errors)


@command("convert", "turn any adapter file into a plain LoRA file (truncated SVD of each module's ΔW)",
         _convert_arguments)
def run_convert(args: argparse.Namespace) -> int:
    from .models import load_pipeline

    file = _require_file(args.file, "adapter file")
    out = Path(args.out).expanduser()
    _check_output(out, args.overwrite, [file])
    pipe, arch = None, args.arch
    if args.base:
        _quiet_model_libraries()
        pipe, info = load_pipeline(args.base, arch=args.arch, prediction_type=args.prediction_type,
                                   dtype=torch.float32, config=args.config, tokenizer=args.tokenizer)
        arch = info.arch
        _say(f"base: {args.base} ({info.arch}, {info.source_kind.replace('_', ' ')})")
    report = convert_to_lora(file, out, args.rank, args.conv_rank, pipe=pipe, arch=arch, dtype=args.dtype,
                             overwrite=args.overwrite)
    conv = args.rank if args.conv_rank is None else args.conv_rank
    _say(f"converted {report.modules} modules ({_format_histogram(report.methods)}) to LoRA rank {args.rank}, "
         f"conv rank {conv}")
    if report.dropped:
        _say(f"dropped {len(report.dropped)} k×k conv module(s) (--conv-rank 0)")
    _say(f"relative error ‖ΔW−ΔW_r‖/‖ΔW‖: overall {report.relative_error:.3e}, worst {report.worst_error:.3e} "
         f"({report.worst_module})")
    if any(m.startswith(("oft", "boft")) or m.endswith("+dora") for m in report.methods):
        _say("note: OFT/BOFT/DoRA are not linear in strength; the LoRA matches them at strength 1 only")
    _say(f"wrote {out}")
    return 0


# ----- train ------------------------------------------------------------------------------------------------------
def print_training_event(event: dict[str, Any]) -> None:
    """The lines ``train`` and ``compare`` print for a run's events (only the main process gets events); the text
    is :func:`trainer.events.describe`'s, the same the web UI logs."""
    from .events import describe

    line = describe(event, cli=True)
    if line:
        _say(line)


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="the run's TOML file (see trainer/config.py for every key)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", dest="overrides",
                        help="override one key (value in TOML syntax, e.g. train.max_steps=500); repeatable")
    parser.add_argument("--resume", metavar="STATE_DIR",
                        help="continue from a *-state folder written next to a save (output.save_state)")


@command("train", "train an adapter as a TOML config says (multi-GPU/CPU: torchrun or accelerate launch -m "
                  "trainer train ...)", _train_arguments)
def run_train(args: argparse.Namespace) -> int:
    from .config import TrainerConfig
    from .loop import TrainingError, train

    _quiet_model_libraries()
    config = TrainerConfig.load(_require_file(args.config, "config file"), args.overrides)
    try:
        train(config, on_event=print_training_event, resume=args.resume)
    except TrainingError as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    return 0


# ----- compare ----------------------------------------------------------------------------------------------------
def _compare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="the base run's TOML (data, steps, seed, optimizer, ...)")
    parser.add_argument("--methods", default="lora,loha,lokr,oft,boft",
                        help="comma-separated methods to train (default: lora,loha,lokr,oft,boft)")
    parser.add_argument("--out", help="the report folder, which must be new (default: "
                                      "<output.dir>/<output.name>-compare, numbered when taken)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", dest="overrides",
                        help="override one key of the base config for every method (as train --set); repeatable")
    parser.add_argument("--override", action="append", default=[], metavar="METHOD:SECTION.KEY=VALUE",
                        dest="method_overrides",
                        help="override one key for one method only, e.g. oft:train.learning_rate=3e-3; repeatable")
    parser.add_argument("--drift-prompts", nargs="+", metavar="PROMPT",
                        help="prompts unrelated to the training data for the prior-drift score (default: a "
                             "generic list, or the toy model's own)")


@command("compare", "train several methods on the same data, steps and seed; write a report with previews, loss "
                    "curves, sizes, speed, prior drift (and the toy model's concept score)", _compare_arguments)
def run_compare(args: argparse.Namespace) -> int:
    from .compare import compare, parse_method_override, resolve_methods
    from .config import TrainerConfig

    _quiet_model_libraries()
    config = TrainerConfig.load(_require_file(args.config, "config file"), args.overrides)
    methods = resolve_methods(args.methods.split(","))
    per_method: dict[str, dict[str, Any]] = {}
    for text in args.method_overrides:
        method, key, value = parse_method_override(text)
        per_method.setdefault(method, {})[key] = value

    result = compare(config, methods, Path(args.out).expanduser() if args.out else None, overrides=per_method,
                     on_event=print_training_event, drift_prompts=args.drift_prompts)
    _say()
    _say(format_table(result.table()))
    _say()
    _say(f"report: {result.markdown_path}" + (" (stopped early)" if result.stopped else ""))
    return 1 if any(run.status == "failed" for run in result.runs) else 0


def format_table(rows: list[dict[str, str]]) -> str:
    """Rows of equal keys as aligned plain-text columns under a header."""
    columns = list(rows[0])
    widths = [max(len(column), *(len(row[column]) for row in rows)) for column in columns]
    lines = ["  ".join(column.ljust(width) for column, width in zip(columns, widths))]
    lines += ["  ".join(row[column].ljust(width) for column, width in zip(columns, widths)) for row in rows]
    return "\n".join(line.rstrip() for line in lines)
