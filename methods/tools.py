"""Operations on adapter files for any registered method: read and check, inspect, bake into a pipeline, ΔW per
module, and convert to a plain LoRA. The CLI (``trainer/cli.py``) and the UI call these; they print nothing.

Errors a user can cause (a file that is not an adapter, holds NaN, fits another base model, a bad rank) raise
:class:`~methods.files.AdapterFileError` or :class:`~methods.base.ConfigError` naming the file and the fix.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import dit_naming, dora
from .arch import ARCHITECTURES, UNET_PREFIX, file_architecture, part_counts
from .base import AdapterModule, ConfigError
from .embeddings import METADATA_FILE, copy_embedding_file, embeddings_for_adapter
from .files import SAVE_DTYPES, AdapterFileError, build_metadata, kohya_hashes, load_adapter_file, save_adapter_file
from .network import ModelPart, group_by_module, name_lookup, pipeline_parts, read_file_tensors
from .registry import available_methods, file_module_class

# Keys of single-file base checkpoints (ldm/sgm): such a file is a model, not an adapter.
CHECKPOINT_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.")
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


@dataclasses.dataclass
class AdapterFile:
    """An adapter file as read: its tensors, metadata, and the tensors grouped by module (name → suffix → tensor)."""

    path: Path
    tensors: dict[str, torch.Tensor]  # under our module names (an SD3/Flux diffusers-layout file's renamed)
    metadata: dict[str, str]
    modules: dict[str, dict[str, torch.Tensor]]
    stored: dict[str, torch.Tensor] | None = None  # the tensors under the file's own keys, where they differ

    def method_classes(self) -> dict[str, type[AdapterModule] | None]:
        """Module → the method that stores it (None for modules of no known method)."""
        classes: dict[str, type[AdapterModule] | None] = {}
        for name, tensors in self.modules.items():
            try:
                classes[name] = file_module_class(tensors)
            except ValueError:
                classes[name] = None
        return classes


def read_adapter(path: str | os.PathLike) -> AdapterFile:
    """Read and check an adapter file: readable, finite, not a base checkpoint, at least one module of a known
    method. SD3/Flux files in the diffusers layout (PEFT keys) are read under our module names."""
    path = Path(path)
    tensors, metadata = load_adapter_file(path)
    if any(key.startswith(CHECKPOINT_PREFIXES) for key in tensors):
        raise AdapterFileError(f"{path}: this is a base model checkpoint, not an adapter file")
    renamed = dit_naming.peft_to_file_names(tensors)
    file = AdapterFile(path, renamed, metadata, group_by_module(renamed), tensors if renamed.keys() != tensors.keys()
                       else None)
    if not any(file.method_classes().values()):
        first = ", ".join(sorted(file.modules)[:3])
        raise AdapterFileError(f"{path}: not an adapter file (no tensors of {', '.join(available_methods())}; "
                               f"first modules: {first})")
    return file


def histogram(values: list[str]) -> dict[str, int]:
    """Value → count, the most frequent first."""
    counts: dict[str, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ----- inspect ------------------------------------------------------------------------------------------------------
def inspect_adapter(path: str | os.PathLike) -> dict[str, Any]:
    """What a file holds, as a JSON-serialisable dict: methods, DoRA, modules per part, ranks, alphas, dtypes,
    architecture, hashes (file, AutoV2, kohya's addnet hashes against the stored one) and metadata."""
    file = read_adapter(path)
    classes = file.method_classes()
    known = {name: cls for name, cls in classes.items() if cls is not None}
    arch, arch_source = file_architecture(file.tensors, file.metadata)
    stored = file.stored or file.tensors
    model_hash, legacy_hash = kohya_hashes(stored, file.metadata)
    sha256 = file_sha256(file.path)
    stored_hash = file.metadata.get("sshs_model_hash")
    return {
        "file": str(file.path),
        "size_bytes": file.path.stat().st_size,
        "methods": histogram([cls.method for cls in known.values()]),
        "dora_modules": sum(dora.FILE_KEY in file.modules[name] for name in known),
        "network_module": file.metadata.get("ss_network_module"),
        "modules": len(known),
        "modules_per_part": part_counts(known),
        "unknown_modules": sorted(name for name, cls in classes.items() if cls is None),
        "ranks": histogram([cls.file_rank(file.modules[name]) for name, cls in known.items()]),
        "alphas": histogram([f"{float(file.modules[name]['alpha'].item()):g}" if "alpha" in file.modules[name]
                             else "none" for name in known]),
        "dtypes": histogram([str(t.dtype).removeprefix("torch.") for t in file.tensors.values()]),
        "tensors": len(stored),
        "parameters": int(sum(t.numel() for t in stored.values())),
        "architecture": arch,
        "architecture_from": arch_source,
        "layout": dit_naming.file_layout(stored) if arch and ARCHITECTURES[arch].denoiser_prefix != UNET_PREFIX
        else "kohya",
        "hashes": {
            "sha256": sha256,
            "autov2": sha256[:10],
            "sshs_model_hash": model_hash,
            "sshs_legacy_hash": legacy_hash,
            "stored_sshs_model_hash": stored_hash,
            "stored_hash_matches": stored_hash in (None, model_hash),
        },
        "metadata": dict(sorted(file.metadata.items())),
    }


# ----- bake (merge into a pipeline for good) ----------------------------------------------------------------------
@dataclasses.dataclass
class MergeReport:
    adapter: str
    strength: float
    method: str
    modules: int
    per_part: dict[str, int]
    ignored: int
    trigger_vectors: str | None = None  # the word whose vectors (pivotal tuning) were written into the token tables


def bake_adapters(pipe: Any, adapters: list[tuple[Path, float]], arch: str | None = None) -> list[MergeReport]:
    """Add ``strength·ΔW`` of each adapter file into the pipeline's weights for good, in order.

    Each module merges as :meth:`AdapterModule.merge` does, without keeping undo copies; DoRA/OFT/BOFT/GLoRA deltas
    of a later file see the weights already changed by the earlier ones, as when applied in sequence. Every file
    is read and checked before any weight changes.
    """
    from .apply import network_from_tensors

    files = [(read_adapter(path), float(strength)) for path, strength in adapters]
    reports = []
    for file, strength in files:
        try:
            network, unmatched = network_from_tensors(pipe, file.path, file.tensors, file.metadata, arch)
        except AdapterFileError:
            raise
        except ValueError as error:  # a module whose tensors do not fit its layer: another base model
            message = " ".join(str(error).split())
            raise AdapterFileError(f"{file.path}: does not fit this {arch or 'base'} model ({message})") from error
        network.merge(strength, keep_original=False)
        embeddings = embeddings_for_adapter(pipe, network.arch, file.path, file.metadata)
        if embeddings is not None:  # the trigger's vectors are part of the adapter, at any strength
            embeddings.bake()
        reports.append(MergeReport(str(file.path), strength, network.method, len(network),
                                   part_counts(network.adapters), len(unmatched),
                                   embeddings.word if embeddings is not None else None))
        del network
    return reports


# ----- ΔW per module ----------------------------------------------------------------------------------------------
# Real-size model parts of an architecture, or of a named variant of one (sd3.5-large), on the meta device, for files
# converted without their base model.
Templates = Callable[[str], list[ModelPart]]


def module_deltas(file: AdapterFile, pipe: Any = None, arch: str | None = None,
                  templates: Templates | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """ΔW (what merging at strength 1 adds, shaped like the base weight) of every module of a file, and each
    module's method (``lora+dora`` for DoRA modules).

    With ``pipe`` the real layers are used (required where ΔW depends on the base weight: OFT/BOFT/GLoRA/DoRA).
    Without it, a module whose tensors tell its layer's shape (plain LoRA) gets a zero stand-in layer of that
    shape; the others one shaped like the layer of that name in ``templates(arch)``, the file's real-size
    architecture (built on the meta device, so nothing is allocated but one layer at a time).
    """
    modules = file.modules
    if pipe is not None:  # the pipeline's own spellings first (SD3/Flux: kohya's fused native layers split)
        parts, _ = pipeline_parts(pipe, arch)
        tensors, foreign = read_file_tensors(parts, file.tensors)
        modules = group_by_module(tensors)
        lookup = name_lookup(parts)
        missing = list(dict.fromkeys([key.partition(".")[0] for key in foreign]
                                     + [name for name in modules if name not in lookup]))
    classes: dict[str, type[AdapterModule]] = {}
    for name, tensors in modules.items():
        try:
            classes[name] = file_module_class(tensors)
        except ValueError as error:
            raise AdapterFileError(f"{file.path}: module {name} cannot be read ({error})") from error
    if pipe is not None:
        if missing:
            raise AdapterFileError(f"{file.path}: {len(missing)} module(s) match no layer of the base model (first: "
                                   f"{missing[0]}); is the adapter for another base model?")
    else:
        needs_base = [name for name, cls in classes.items() if cls.needs_base_for(modules[name])]
        if needs_base:
            example = needs_base[0]
            kind = classes[example].label if classes[example].delta_uses_base else "DoRA"
            raise AdapterFileError(f"{file.path}: its {kind} modules' ΔW depends on the base weights; give the base "
                                   f"model (--base MODEL) ({len(needs_base)} such module(s), e.g. {example})")
        lookup = {}
        if any(cls.layer_from_tensors(modules[name]) is None for name, cls in classes.items()):
            lookup = _template_lookup(file, classes, arch, templates)

    deltas: dict[str, torch.Tensor] = {}
    methods: dict[str, str] = {}
    for name, tensors in modules.items():
        cls = classes[name]
        if pipe is not None:
            base = lookup[name][1]
        else:
            shape = cls.layer_from_tensors(tensors)
            base = _stand_in(shape if shape is not None else lookup[name][1])
        try:
            adapter = cls.from_tensors(name, base, tensors)
        except (ValueError, KeyError, RuntimeError) as error:
            raise AdapterFileError(f"{file.path}: module {name} cannot be read "
                                   f"({' '.join(str(error).split())})") from error
        with torch.no_grad():
            deltas[name] = adapter.merged_delta().detach().float().cpu()
        methods[name] = cls.method + ("+dora" if adapter.use_dora else "")
    return deltas, methods


def _stand_in(module: nn.Module) -> nn.Module:
    """A zero-weight CPU layer shaped like ``module`` (which may live on the meta device), for methods whose ΔW
    depends only on the base weight's shape."""
    with torch.device("meta"):
        if isinstance(module, nn.Conv2d):
            layer = nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                              module.padding, module.dilation, module.groups, bias=False)
        else:
            layer = nn.Linear(module.in_features, module.out_features, bias=False)
    layer = layer.to_empty(device="cpu")
    with torch.no_grad():
        layer.weight.zero_()
    return layer


def _template_lookup(file: AdapterFile, classes: dict[str, type[AdapterModule]], arch: str | None,
                     templates: Templates | None) -> dict[str, tuple[str, nn.Module]]:
    """The name lookup of the first real-size architecture whose layers every module fits."""
    hinted, _ = file_architecture(file.tensors, file.metadata)
    families = [arch] if arch else list(dict.fromkeys([a for a in (hinted, *ARCHITECTURES) if a]))
    # A family of several released sizes (SD3 medium / 3.5 large, …) is tried variant by variant.
    candidates = [name for family in families
                  for name in ([n for n, _ in ARCHITECTURES[family].named_variants] if family in ARCHITECTURES
                               else []) or [family]]
    if templates is None:
        raise AdapterFileError(f"{file.path}: the shapes of its modules' layers are unknown without the base model; "
                               "give the base model (--base MODEL)")
    for candidate in candidates:
        lookup = name_lookup(templates(candidate))
        fits = True
        for name, tensors in file.modules.items():
            if classes[name].layer_from_tensors(tensors) is not None:
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
    raise AdapterFileError(f"{file.path}: its modules do not fit the real-size {' / '.join(candidates)} layout, so "
                           "their shapes are unknown; give the base model (--base MODEL)")


# ----- convert to LoRA --------------------------------------------------------------------------------------------
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


@dataclasses.dataclass
class ConvertReport:
    modules: int
    dropped: list[str]
    relative_error: float  # ‖ΔW − ΔW_r‖/‖ΔW‖ over all modules
    worst_module: str
    worst_error: float
    methods: dict[str, int]
    errors: dict[str, float]
    base_dependent: list[str]  # labels of the source's kinds of module whose ΔW depends on the base (OFT, DoRA, …)


def convert_to_lora(path: str | os.PathLike, out: str | os.PathLike, rank: int, conv_rank: int | None = None, *,
                    pipe: Any = None, arch: str | None = None, dtype: str | None = None, overwrite: bool = False,
                    templates: Templates | None = None) -> ConvertReport:
    """Write ``out`` as a plain LoRA (kohya ``networks.lora``) approximating every module of ``path`` by a
    truncated SVD of its ΔW (k×k convs at ``conv_rank``; 0 leaves them out). ``pipe``/``templates``: as
    :func:`module_deltas`."""
    from .lora import lora_tensors

    out = Path(out)
    if out.suffix != ".safetensors":
        raise ConfigError(f"{out}: the converted LoRA must be a .safetensors file")
    if rank < 1:
        raise ConfigError(f"--rank must be at least 1, got {rank}")
    if conv_rank is not None and conv_rank < 0:
        raise ConfigError(f"--conv-rank must be 0 (drop k×k convs) or more, got {conv_rank}")
    conv_rank = rank if conv_rank is None else conv_rank
    file = read_adapter(path)
    deltas, methods = module_deltas(file, pipe, arch, templates)
    classes = file.method_classes()
    base_dependent = sorted({cls.label if cls.delta_uses_base else "DoRA" for name, cls in classes.items()
                             if cls.needs_base_for(file.modules[name])})

    state: dict[str, torch.Tensor] = {}
    errors: dict[str, float] = {}
    dropped: list[str] = []
    residual_sum = total_sum = 0.0
    has_kxk = False
    for name, delta in deltas.items():
        kxk = delta.dim() == 4 and tuple(delta.shape[2:]) != (1, 1)
        has_kxk |= kxk
        module_rank = conv_rank if kxk else rank
        if module_rank == 0:
            total = float(delta.double().pow(2).sum())
            residual_sum, total_sum = residual_sum + total, total_sum + total
            errors[name] = 1.0 if total else 0.0
            dropped.append(name)
            continue
        down, up, residual, total = truncated_lora(delta, module_rank)
        residual_sum += residual
        total_sum += total
        errors[name] = math.sqrt(residual / total) if total else 0.0
        state.update({f"{name}.{suffix}": tensor for suffix, tensor in lora_tensors(down, up).items()})
    if not state:
        raise ConfigError(f"{file.path}: nothing left to write (every module is a k×k conv and --conv-rank is 0)")

    metadata = file.metadata
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
    arch_found = arch or file_architecture(file.tensors, metadata)[0]
    if metadata:
        new_metadata = {k: v for k, v in metadata.items()
                        if not k.startswith(("sshs_", "modelspec.hash")) and k != "ss_network_args"}
    elif arch_found:
        new_metadata = build_metadata(method="lora", arch=arch_found, options={}, title=out.stem, rank=rank,
                                      alpha=rank)
    else:
        new_metadata = {}
    new_metadata.update(fresh)
    worst = max(errors, key=errors.get)
    overall = math.sqrt(residual_sum / total_sum) if total_sum else 0.0
    method_counts = histogram(list(methods.values()))
    new_metadata["rankwright.converted_from"] = json.dumps({
        "file": file.path.name, "methods": method_counts, "sshs_model_hash": metadata.get("sshs_model_hash"),
        "rank": rank, "conv_rank": conv_rank, "relative_error": overall})
    source_dtype = next(iter(file.tensors.values())).dtype
    save_dtype = dtype or DTYPE_NAMES.get(source_dtype, "fp16")
    if save_dtype not in SAVE_DTYPES:
        raise ConfigError(f"dtype {save_dtype!r} is not one of {', '.join(DTYPE_NAMES.values())}")
    embedding = copy_embedding_file(file.path, metadata, out, overwrite=overwrite)
    if embedding is not None:
        new_metadata[METADATA_FILE] = embedding.name
    save_adapter_file(out, state, new_metadata, save_dtype, overwrite=overwrite)
    return ConvertReport(len(deltas) - len(dropped), dropped, overall, worst, errors[worst], method_counts, errors,
                         base_dependent)
