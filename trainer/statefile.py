"""Training state as safetensors + JSON: the optimizer, scheduler, EMA, gradient scaler and RNG states of a run,
written and read without pickle, so a resume folder from anywhere can never run code.

:func:`encode` splits a tree of plain values into JSON and a flat dict of tensors; :func:`decode` puts it back.
The tree may hold None, bools, ints, floats (NaN and infinities included), strings, lists, tuples, dicts (string
or integer keys), torch tensors and numpy arrays — what ``state_dict()`` of torch optimizers, LR schedulers,
``GradScaler``, diffusers' ``EMAModel`` and the RNG getters return. Anything else is refused when saving
(:class:`StateFormatError` names where it sits), and a file with anything but these forms is refused when loading.
Floats round-trip exactly (JSON keeps Python's shortest repr); tensors keep dtype and bits.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = "rankwright-state-v1"
TAG = "$"  # JSON objects with a "$" key are tagged values; plain dicts never have that key (encode escapes it)


class StateFormatError(ValueError):
    """A state that this format cannot hold (when saving) or a file that is not in it (when loading)."""


def encode(tree: Any, path: str = "state") -> tuple[Any, dict[str, torch.Tensor]]:
    """(JSON-able tree, tensors by name). Tensor names are the dotted paths where the tensors sat."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any, where: str) -> Any:
        if value is None or isinstance(value, bool | str):
            return value
        if isinstance(value, int | float):
            return value
        if isinstance(value, torch.Tensor):
            tensors[where] = value.detach().to("cpu").contiguous().clone()  # clone: no storage shared between keys
            return {TAG: "tensor", "key": where}
        if isinstance(value, np.ndarray):
            tensors[where] = torch.from_numpy(np.ascontiguousarray(value).astype(np.int64 if value.dtype.kind in "iu"
                                                                                  else value.dtype, copy=True))
            return {TAG: "ndarray", "key": where, "dtype": value.dtype.str}
        if isinstance(value, np.generic):
            return walk(value.item(), where)
        if isinstance(value, tuple):
            return {TAG: "tuple", "items": [walk(item, f"{where}.{i}") for i, item in enumerate(value)]}
        if isinstance(value, list):
            return [walk(item, f"{where}.{i}") for i, item in enumerate(value)]
        if isinstance(value, dict):
            if all(isinstance(key, str) for key in value) and TAG not in value:
                return {key: walk(item, f"{where}.{key}") for key, item in value.items()}
            if all(isinstance(key, str | int) and not isinstance(key, bool) for key in value):
                return {TAG: "dict", "items": [[key, walk(item, f"{where}.{key}")] for key, item in value.items()]}
        raise StateFormatError(f"{where}: a {type(value).__name__} cannot be stored in resumable state (only "
                               "numbers, strings, lists, dicts and tensors can); this optimizer or option is not "
                               "resumable")

    return walk(tree, path), tensors


def decode(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of :func:`encode`; refuses any form it does not write."""

    def walk(value: Any) -> Any:
        if value is None or isinstance(value, bool | int | float | str):
            return value
        if isinstance(value, list):
            return [walk(item) for item in value]
        if not isinstance(value, dict):
            raise StateFormatError(f"unexpected {type(value).__name__} in the state file")
        kind = value.get(TAG)
        if kind is None:
            return {key: walk(item) for key, item in value.items()}
        if kind == "tensor":
            return _tensor(tensors, value.get("key"))
        if kind == "ndarray":
            array = _tensor(tensors, value.get("key")).numpy()
            try:
                return array.astype(np.dtype(str(value.get("dtype"))))
            except TypeError as error:
                raise StateFormatError(f"unknown array dtype {value.get('dtype')!r} in the state file") from error
        if kind == "tuple" and isinstance(value.get("items"), list):
            return tuple(walk(item) for item in value["items"])
        if kind == "dict" and isinstance(value.get("items"), list):
            pairs = value["items"]
            if not all(isinstance(p, list) and len(p) == 2 and isinstance(p[0], str | int) for p in pairs):
                raise StateFormatError("a malformed dict in the state file")
            return {key: walk(item) for key, item in pairs}
        raise StateFormatError(f"unknown value form {kind!r} in the state file (written by another program?)")

    return walk(tree)


def _tensor(tensors: dict[str, torch.Tensor], key: Any) -> torch.Tensor:
    if not isinstance(key, str) or key not in tensors:
        raise StateFormatError(f"the state file refers to a tensor {key!r} that its tensor file lacks")
    return tensors[key]


def write_state(folder: Path, name: str, tree: Any) -> list[Path]:
    """``<name>.json`` and ``<name>.safetensors`` in ``folder`` (which the caller moves into place atomically)."""
    from safetensors.torch import save_file

    encoded, tensors = encode(tree)
    tensor_path, json_path = folder / f"{name}.safetensors", folder / f"{name}.json"
    save_file(tensors, str(tensor_path), metadata={"format": FORMAT})
    text = json.dumps({"format": FORMAT, "state": encoded}, allow_nan=True)
    with open(json_path, "w", encoding="utf-8") as stream:
        stream.write(text)
        stream.flush()
        os.fsync(stream.fileno())
    return [json_path, tensor_path]


def read_state(folder: Path, name: str) -> Any:
    """What :func:`write_state` wrote; raises :class:`StateFormatError` for anything else."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    json_path, tensor_path = folder / f"{name}.json", folder / f"{name}.safetensors"
    try:
        document = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise StateFormatError(f"{json_path}: not readable JSON ({error})") from error
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise StateFormatError(f"{json_path}: not a {FORMAT} file")
    try:
        tensors = load_file(str(tensor_path))
    except (OSError, SafetensorError) as error:
        raise StateFormatError(f"{tensor_path}: not a readable .safetensors file ({error})") from error
    return decode(document.get("state"), tensors)


def state_bytes(tree: Any) -> int:
    """About how many bytes :func:`write_state` writes for ``tree`` (its tensors; the JSON is small)."""
    _, tensors = encode(tree)
    return sum(t.numel() * t.element_size() for t in tensors.values())


__all__ = ["FORMAT", "StateFormatError", "decode", "encode", "read_state", "state_bytes", "write_state"]
