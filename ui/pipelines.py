"""The UI's base-model cache (Detect, Try it) and the trainable-parameter / file-size estimate.

The estimate builds the adapter network exactly as training does (:meth:`AdapterNetwork.create` with the config's
method, options and targets) on models that live on the meta device: real-size models of the architecture, or,
once a model is detected, meta copies built from its own configs — so it costs no memory and matches the model.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from pathlib import Path
from typing import Any

import torch

ARCH_LABELS = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}
DTYPE_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}


def describe(info: Any) -> str:
    """``SD2.x v-prediction (diffusers folder)`` from a :class:`trainer.models.ModelInfo`."""
    label = ARCH_LABELS.get(info.arch, info.arch)
    prediction = "v-prediction" if info.prediction_type == "v_prediction" else "epsilon"
    source = {"folder": "diffusers folder", "single_file": "single-file checkpoint", "hub": "hub"}.get(
        info.source_kind, info.source_kind)
    return f"{label} {prediction} ({source})"


class PipelineCache:
    """One loaded base pipeline at a time, keyed by (source, arch, prediction type); thread-safe."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.key: tuple[str, str, str] | None = None
        self.pipe: Any = None
        self.info: Any = None

    @staticmethod
    def _key(base: str, arch: str = "auto", prediction_type: str = "auto", tokenizer: str = "") -> tuple:
        base = base.strip()
        path = Path(base).expanduser()
        return (str(path.resolve()) if path.exists() else base, arch or "auto", prediction_type or "auto",
                tokenizer or "")

    def load(self, base: str, arch: str = "auto", prediction_type: str = "auto", tokenizer: str = "") -> tuple:
        """(pipeline, ModelInfo), loading it unless it is the cached one. Raises ModelLoadError."""
        from trainer.models import ModelLoadError, load_pipeline

        if not base or not base.strip():
            raise ModelLoadError("give a base model: a hub id, a diffusers folder or a .safetensors/.ckpt file")
        key = self._key(base, arch, prediction_type, tokenizer)
        with self.lock:
            if key == self.key:
                return self.pipe, self.info
            self.pipe = self.info = self.key = None  # free the old one before loading the next
            kwargs: dict[str, Any] = {}
            if tokenizer:
                kwargs["tokenizer"] = tokenizer
            pipe, info = load_pipeline(base.strip(), arch=None if arch in ("", "auto") else arch,
                                       prediction_type=None if prediction_type in ("", "auto") else prediction_type,
                                       **kwargs)
            if hasattr(pipe, "set_progress_bar_config"):
                pipe.set_progress_bar_config(disable=True)
            self.pipe, self.info, self.key = pipe, info, key
            return pipe, info

    def loaded(self, base: str, arch: str = "auto", prediction_type: str = "auto", tokenizer: str = "") -> Any:
        """The cached ModelInfo if ``base`` is the loaded model, else None."""
        with self.lock:
            return self.info if self.key == self._key(base, arch, prediction_type, tokenizer) else None

    def clear(self) -> None:
        with self.lock:
            self.pipe = self.info = self.key = None


# ----- estimate ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Estimate:
    parameters: int
    modules: dict[str, int]
    file_bytes: int
    arch: str
    basis: str  # what the count was measured on

    def text(self) -> str:
        modules = ", ".join(f"{k.removeprefix('lora_')} {v}" for k, v in self.modules.items()) or "none"
        return (f"**{self.parameters:,}** trainable parameters · file ≈ **{format_bytes(self.file_bytes)}** · "
                f"modules: {modules} · {self.basis}")


def format_bytes(size: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


@functools.lru_cache(maxsize=3)
def _real_size_parts(arch: str) -> tuple:
    from trainer.architectures import build_text_encoders, build_unet

    unet = build_unet(arch, meta=True)
    encoders = build_text_encoders(arch, meta=True)
    return unet, encoders


_LIKE: dict[int, tuple] = {}


def _meta_copy(pipe: Any) -> tuple:
    """Meta-device models with the shapes of ``pipe``'s UNet and text encoders (cached per pipeline)."""
    cached = _LIKE.get(id(pipe))
    if cached is not None and cached[0] is pipe:
        return cached[1]
    with torch.device("meta"):
        unet = type(pipe.unet).from_config(pipe.unet.config)
        encoders = [type(te)(te.config) for te in (getattr(pipe, "text_encoder", None),
                                                    getattr(pipe, "text_encoder_2", None)) if te is not None]
    _LIKE.clear()
    _LIKE[id(pipe)] = (pipe, (unet, encoders))
    return unet, encoders


def estimate(config: Any, arch: str | None = None, pipe: Any = None) -> Estimate:
    """Trainable parameters and file size of ``config``'s network; raises ConfigError for a bad option."""
    from methods.network import AdapterNetwork, model_parts

    if pipe is not None:
        from methods.network import detect_architecture

        arch = detect_architecture(pipe)
        unet, encoders = _meta_copy(pipe)
        basis = f"measured on the detected {ARCH_LABELS[arch]} model"
    else:
        arch = arch if arch in ARCH_LABELS else "sd1"
        unet, encoders = _real_size_parts(arch)
        basis = f"for a standard {ARCH_LABELS[arch]} model (Detect the base model to measure it)"
    parts = model_parts(unet, list(encoders), arch)
    network = AdapterNetwork.create(parts, arch, config.network.method, config.network.options,
                                    config.target_config())
    parameters = network.trainable_parameter_count()
    # The safetensors header: per tensor its key, dtype, shape and offsets (~60 bytes besides the key); each
    # module also stores its alpha. Plus about 6 kB of kohya/ModelSpec metadata.
    tensors_per_module = len(network.state_dict()) / max(1, len(network)) + 1
    header = sum((len(name) + 80) * tensors_per_module for name in network.adapters) + 6_000
    size = int(parameters * DTYPE_BYTES.get(config.output.save_dtype, 2) + header)
    return Estimate(parameters, network.counts(), size, arch, basis)


def warm_up(arch: str = "sd1") -> None:
    """Build the real-size meta models once (a few seconds), so the first estimate is quick."""
    try:
        _real_size_parts(arch)
    except Exception:  # only a speed-up
        pass


def try_adapter(cache: PipelineCache, base: str, adapter: str, prompt: str, strength: float, seed: int,
                steps: int = 20, size: int = 512, guidance_scale: float = 7.0, sampler: str = "euler_a",
                arch: str = "auto", prediction_type: str = "auto", tokenizer: str = "") -> tuple:
    """(image with the adapter, image without) for the same prompt and seed."""
    from trainer.sampling import compare_with_without

    with cache.lock:
        pipe, _ = cache.load(base, arch, prediction_type, tokenizer)
        return compare_with_without(pipe, prompt, adapter, strength=float(strength), seed=int(seed),
                                    steps=int(steps), width=int(size), height=int(size),
                                    guidance_scale=float(guidance_scale), sampler=sampler)
