"""Reading and writing Civitai-style ``.safetensors`` adapter files (format spec §0, §3, §6).

Writes are atomic (temporary file in the same folder, then rename) and never replace an existing file unless
asked. Metadata values are strings; ``sshs_model_hash``/``sshs_legacy_hash`` follow kohya's algorithm and
``modelspec.hash_sha256`` the ModelSpec definition.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import secrets
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as serialize

SAVE_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
               "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}

# Our option names → the network_args spelling kohya/LyCORIS use in ss_network_args (spec §3.4).
NETWORK_ARG_NAMES = {"conv_rank": "conv_dim", "dora": "dora_wd"}


class AdapterFileError(ValueError):
    """A file that cannot be read as an adapter; the message names the file and what to do."""


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in SAVE_DTYPES:
        raise ValueError(f"save dtype {name!r} is not one of {', '.join(sorted(set(SAVE_DTYPES)))}")
    return SAVE_DTYPES[name]


def kohya_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) exactly as kohya's ``precalculate_safetensors_hashes``."""
    ss_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    data = serialize(tensors, ss_only)
    header_length = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + header_length:]).hexdigest()
    legacy_hash = hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    return model_hash, legacy_hash


def build_metadata(
    *,
    method: str,
    arch: str,
    options: dict[str, Any],
    title: str,
    output_name: str | None = None,
    rank: int | None = None,
    alpha: float | None = None,
    prediction_type: str = "epsilon",
    resolution: int | tuple[int, int] | None = None,
    variant: str | None = None,
    extra: dict[str, Any] | None = None,
    extra_network_args: dict[str, Any] | None = None,
) -> dict[str, str]:
    """The §3.4 block of kohya ``ss_*`` and ``modelspec.*`` keys (values stringified as kohya does).

    ``arch`` names a :mod:`methods.arch` entry; its v-prediction ids (SD2-768-v) are picked by ``prediction_type``,
    the ids of a released SD3/Flux model by ``variant`` (``sd3.5-large``, ``flux-dev``; default: the family's first).
    ``output_name`` is the file stem (A1111 uses ``ss_output_name`` as the alias); it defaults to ``title``.
    ``extra`` adds or overrides keys (training details: ``ss_steps``, ``ss_tag_frequency`` as a dict, …; dicts/lists
    become JSON).
    """
    from .arch import get_architecture
    from .base import ConfigError
    from .registry import get_method

    spec = get_architecture(arch)
    ids = spec.variant(prediction_type, variant)
    size = resolution or ids.resolution
    width, height = (size, size) if isinstance(size, int) else size
    network_args = {"algo": method}
    for key, value in options.items():
        if key in ("rank", "alpha") or value is None:
            continue
        network_args[NETWORK_ARG_NAMES.get(key, key)] = value
    if options.get("dora"):
        network_args.update(dora_wd=True, wd_on_output=True)
    network_args.update(extra_network_args or {})  # network options outside the method's (kohya's per-block ones)
    now = time.time()
    try:
        kohya_native = get_method(method).kohya_native and not options.get("dora")
    except ConfigError:  # a network read from a file of several methods ("lora+loha")
        kohya_native = False
    metadata: dict[str, Any] = {
        "ss_network_module": "networks.lora" if kohya_native else "lycoris.kohya",
        "ss_network_dim": rank if rank is not None else options.get("rank", "None"),
        "ss_network_alpha": float(alpha) if alpha is not None else "None",
        "ss_network_args": json.dumps({k: str(v) for k, v in network_args.items()}),
        "ss_base_model_version": ids.kohya_version,
        "ss_v2": spec.kohya_v2,
        "ss_v_parameterization": prediction_type == "v_prediction",
        "ss_output_name": output_name if output_name is not None else title,
        "ss_resolution": str((width, height)),
        "ss_training_started_at": now,
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": f"{ids.modelspec_id}/lora",
        "modelspec.implementation": spec.implementation,
        "modelspec.title": title,
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.date": datetime.datetime.fromtimestamp(int(now)).isoformat(),
        "modelspec.prediction_type": ("v" if prediction_type == "v_prediction" else "epsilon")
        if spec.writes_prediction_type else None,
        "modelspec.implementation_version": "rankwright/0.1.0",
    }
    metadata.update(extra or {})
    return stringify_metadata(metadata)


def stringify_metadata(metadata: dict[str, Any]) -> dict[str, str]:
    """safetensors metadata is str → str: strings stay, dicts/lists become JSON, the rest ``str()`` as kohya does."""
    return {str(k): v if isinstance(v, str) else json.dumps(v) if isinstance(v, dict | list) else str(v)
            for k, v in metadata.items() if v is not None}


def save_adapter_file(
    path: str | os.PathLike,
    state_dict: dict[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
    dtype: str | torch.dtype = "fp16",
    overwrite: bool = False,
) -> Path:
    """Write tensors (all cast to one dtype) with string metadata and kohya/ModelSpec hashes, atomically."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: adapter files must end in .safetensors")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; choose another name or pass overwrite=True to replace it")
    target_dtype = resolve_dtype(dtype)
    tensors = {key: tensor.detach().to("cpu", target_dtype).contiguous() for key, tensor in state_dict.items()}
    metadata = stringify_metadata(metadata or {})
    model_hash, legacy_hash = kohya_hashes(tensors, metadata)
    metadata["sshs_model_hash"] = model_hash
    metadata["sshs_legacy_hash"] = legacy_hash
    metadata["modelspec.hash_sha256"] = "0x" + model_hash  # same bytes: the data region after the header
    data = serialize(tensors, metadata)
    atomic_write_bytes(path, data, overwrite=overwrite)
    return path


def atomic_write_bytes(path: Path, data: bytes, overwrite: bool = True) -> None:
    """Write ``data`` to a temporary file next to ``path``, then move it into place in one step.

    With ``overwrite=False`` the final step is a hard link, which fails if ``path`` appeared meanwhile (no
    check-then-replace race); file systems without hard links fall back to an existence check and a rename.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = _create_temporary(path)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        if overwrite:
            os.replace(temporary, path)
            return
        try:
            os.link(temporary, path)
        except FileExistsError:
            raise FileExistsError(f"{path} already exists; choose another name or pass overwrite=True") from None
        except OSError:  # no hard links here (FAT, some network shares)
            if path.exists():
                raise FileExistsError(f"{path} already exists; choose another name or pass overwrite=True") from None
            os.replace(temporary, path)
            return
        os.unlink(temporary)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str, overwrite: bool = True) -> None:
    """:func:`atomic_write_bytes` for UTF-8 text, written exactly as given (the caller decides the final newline)."""
    atomic_write_bytes(Path(path), text.encode("utf-8"), overwrite=overwrite)


def _create_temporary(path: Path) -> tuple[int, str]:
    """A new hidden file next to ``path``, created with mode 0666 minus the umask like any other new file.

    (``tempfile.mkstemp`` would create it 0600, and the rename keeps that: the adapter would be unreadable to the
    other users or containers that run the UI reading the folder.)
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        temporary = str(path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(temporary, flags, 0o666), temporary
        except FileExistsError:
            continue
    raise FileExistsError(f"{path.parent}: could not create a temporary file")


def load_adapter_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors (as stored) and metadata of an adapter file, with one clear error for anything unreadable."""
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(f"{path}: no such file; give the path of a .safetensors adapter")
    try:
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            for key in handle.keys():
                tensors[key] = handle.get_tensor(key)
    except (SafetensorError, OSError, ValueError) as error:
        raise AdapterFileError(f"{path}: not a readable .safetensors file ({error})") from error
    if not tensors:
        raise AdapterFileError(f"{path}: the file holds no tensors")
    check_finite(path, tensors)
    return tensors, metadata


def check_finite(path: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse a file holding NaN or infinite values (a run that diverged): merged or applied, they would turn every
    image they touch into noise or black. The error names the first such module and how many there are."""
    damaged = [key for key, tensor in tensors.items()
               if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    if not damaged:
        return
    key = damaged[0]
    module, _, suffix = key.partition(".")
    nans, infinite = int(torch.isnan(tensors[key]).sum()), int(torch.isinf(tensors[key]).sum())
    modules = {name.partition(".")[0] for name in damaged}
    others = f" (and {len(modules) - 1} more module(s))" if len(modules) > 1 else ""
    raise AdapterFileError(
        f"{path}: module {module} holds non-finite values ({nans} NaN, {infinite} infinite in {suffix or key})"
        f"{others}; the file is damaged (did its training diverge?) and is not used: take an earlier save or retrain")
