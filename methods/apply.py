"""Public API on diffusers pipelines: create a trainable network, save it, load or apply any adapter file."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from .arch import architecture_from_metadata
from .embeddings import embeddings_for_adapter
from .files import AdapterFileError, build_metadata, load_adapter_file, save_adapter_file
from .network import AdapterNetwork, pipeline_parts
from .targets import TargetConfig

log = logging.getLogger(__name__)


def create_network(pipe: Any, method: str = "lora", options: dict[str, Any] | None = None,
                   targets: TargetConfig | None = None, arch: str | None = None) -> AdapterNetwork:
    """Adapters of ``method`` on the pipeline's denoiser (UNet or SD3/Flux transformer) and text encoder(s),
    attached and ready to train."""
    parts, arch = pipeline_parts(pipe, arch)
    return AdapterNetwork.create(parts, arch, method, options, targets).attach()


def save_network(network: AdapterNetwork, path: str | os.PathLike, *, title: str | None = None,
                 dtype: str | torch.dtype = "fp16", prediction_type: str = "epsilon",
                 extra_metadata: dict[str, Any] | None = None, portable: bool = True,
                 overwrite: bool = False, layout: str = "auto",
                 extra_network_args: dict[str, Any] | None = None) -> Path:
    """Write the network as a Civitai-style file with kohya and ModelSpec metadata (SD3/Flux: in ``layout``, see
    :meth:`AdapterNetwork.export_state_dict`)."""
    path = Path(path)
    options = network.config.to_dict() if network.config is not None else {}
    state = network.export_state_dict(portable=portable, layout=layout)
    metadata = build_metadata(method=network.method, arch=network.arch, options=options, title=title or path.stem,
                              output_name=path.stem, rank=options.get("rank"),
                              alpha=options.get("alpha") or options.get("rank"),
                              prediction_type=prediction_type, variant=network.variant, extra=extra_metadata,
                              extra_network_args=extra_network_args)
    return save_adapter_file(path, state, metadata, dtype, overwrite)


def load_network(pipe: Any, path: str | os.PathLike, arch: str | None = None,
                 require_all: bool = False) -> tuple[AdapterNetwork, dict[str, str]]:
    """Rebuild the adapters of a file on a pipeline (not attached). Raises when the file fits no layer."""
    tensors, metadata = load_adapter_file(path)
    network, _ = network_from_tensors(pipe, path, tensors, metadata, arch, require_all)
    return network, metadata


def network_from_tensors(pipe: Any, path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                         metadata: dict[str, str], arch: str | None = None,
                         require_all: bool = False) -> tuple[AdapterNetwork, list[str]]:
    """:func:`load_network` for a file already read: the network and the file modules that matched no layer."""
    parts, arch = pipeline_parts(pipe, arch)
    _check_architecture(path, metadata, arch)
    try:
        network, unmatched = AdapterNetwork.from_state_dict(parts, arch, tensors, source=str(path))
    except ValueError as error:  # an unsupported layout, or tensors that do not fit the layer of the same name
        raise AdapterFileError(f"{error} [pipeline: {arch}]") from error
    if not len(network):
        raise AdapterFileError(
            f"{path}: none of its {len(unmatched)} modules matches a layer of this {arch} model "
            f"(first: {unmatched[:3]}); is it an adapter for another base model?")
    if unmatched:
        message = f"{path}: {len(unmatched)} module(s) match no layer and are ignored: {unmatched[:5]}"
        if require_all:
            raise AdapterFileError(message)
        log.warning(message)
    return network, unmatched


def _check_architecture(path: Any, metadata: dict[str, str], arch: str) -> None:
    found = architecture_from_metadata(metadata)
    if found is not None and found[0] != arch:
        recorded = found[1].removeprefix("metadata ")
        raise AdapterFileError(
            f"{path}: this adapter was trained for {recorded} ({found[0]}), but the pipeline is {arch}; "
            "load it on a matching base model")


class AppliedAdapter:
    """An adapter file applied to a pipeline through forward hooks; stack several, remove any of them."""

    def __init__(self, network: AdapterNetwork, path: Path, metadata: dict[str, str], strength: float):
        self.network = network
        self.path = path
        self.metadata = metadata
        self.set_strength(strength)
        network.attach()

    @property
    def strength(self) -> float:
        return self._strength

    def set_strength(self, strength: float) -> None:
        self._strength = float(strength)
        self.network.set_multiplier(self._strength)

    def remove(self) -> None:
        self.network.detach()

    def __enter__(self) -> AppliedAdapter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def apply_adapter(pipe: Any, path: str | os.PathLike, strength: float = 1.0, arch: str | None = None) -> AppliedAdapter:
    """Apply an adapter file of any registered method (DoRA included) to a diffusers pipeline.

    The weights stay untouched; ``handle.remove()`` undoes it; several files can be applied at once. An adapter
    trained with trigger vectors (pivotal tuning) brings its embedding file along (:mod:`methods.embeddings`).
    """
    network, metadata = load_network(pipe, path, arch)
    network.embeddings = embeddings_for_adapter(pipe, network.arch, path, metadata)
    device = _device_of(pipe)
    network.to(device)
    network.eval()
    return AppliedAdapter(network, Path(path), metadata, strength)


def _device_of(pipe: Any) -> torch.device:
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    if denoiser is not None:
        return next(denoiser.parameters()).device
    return torch.device("cpu")
