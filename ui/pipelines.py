"""The UI's base-model cache (Detect, Try it), the trainable-parameter / file-size estimate and, for SD3/SD3.5 and
FLUX.1, a GPU-memory estimate.

The estimate builds the adapter network exactly as training does (:meth:`AdapterNetwork.create` with the config's
method, options and targets) on models that live on the meta device: real-size models of the architecture (SD3 and
Flux: the family's first released variant), or, once a model is detected, meta copies built from its own configs —
so it costs no memory and matches the model.

:func:`vram_estimate` (SD3/Flux) adds what a run keeps on the GPU: every frozen weight at its dtype (fp8 for the
transformer and the text encoders with ``train.fp8_base``; the text encoders stay resident, the VAE in fp32 when
``model.vae_fp32``), the adapters with their gradients and optimizer state, counted from the parameters; and the
transformer's activations for one batch by the per-layer rule of Korthikanti et al. 2022 (with flash attention a
block keeps about 34·h bytes per token at 16 bit; with gradient checkpointing only each block's input, 2·h bytes
per token, plus one block recomputed), plus 1 GB of CUDA context and workspace. It is an estimate from counts, not
a measurement.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from pathlib import Path
from typing import Any

import torch

ARCH_LABELS = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL", "sd3": "SD3/SD3.5", "flux": "FLUX.1"}
DTYPE_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}
# Optimizer state bytes per trainable parameter (fp32 moments; 8-bit Adam: two bytes; Adafactor: factored).
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw8bit": 2, "prodigy": 16, "adafactor": 4, "lion": 4, "sgd": 0}
CUDA_OVERHEAD = 1.0e9


def describe(info: Any) -> str:
    """``SD2.x v-prediction (diffusers folder)``, ``FLUX.1 dev (flow matching, hub)`` from a
    :class:`trainer.models.ModelInfo`."""
    source = {"folder": "diffusers folder", "single_file": "single-file checkpoint", "hub": "hub"}.get(
        info.source_kind, info.source_kind)
    if getattr(info, "variant_title", ""):
        return f"{info.variant_title} (flow matching, {source})"
    label = ARCH_LABELS.get(info.arch, info.arch)
    prediction = "v-prediction" if info.prediction_type == "v_prediction" else "epsilon"
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
    vram: VramEstimate | None = None  # SD3/Flux

    def text(self) -> str:
        from methods.arch import part_label

        modules = ", ".join(f"{part_label(k)} {v}" for k, v in self.modules.items()) or "none"
        text = (f"**{self.parameters:,}** trainable parameters · file ≈ **{format_bytes(self.file_bytes)}** · "
                f"modules: {modules} · {self.basis}")
        return text + (f"  \n{self.vram.text()}" if self.vram is not None else "")


@dataclasses.dataclass
class VramEstimate:
    """GPU memory of an SD3/Flux run, by what holds it (bytes); see the module docstring for the basis."""

    weights: float
    training_state: float  # adapters, their gradients and optimizer state
    activations: float
    settings: str  # what it was computed for

    @property
    def total(self) -> float:
        return self.weights + self.training_state + self.activations + CUDA_OVERHEAD

    def text(self) -> str:
        return (f"GPU memory ≈ **{self.total / 1e9:.1f} GB** (frozen weights {self.weights / 1e9:.1f}, adapters + "
                f"optimizer {self.training_state / 1e9:.2f}, activations {self.activations / 1e9:.1f}, CUDA 1.0; "
                f"{self.settings}; counted from parameters, activations by rule of thumb, not measured)")


def format_bytes(size: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


def default_variant(arch: str) -> str | None:
    """The released SD3/Flux model a family's estimate is made for before a model is detected (None: SD/SDXL)."""
    from methods.arch import get_architecture

    variants = get_architecture(arch).named_variants
    return variants[0][0] if variants else None


@functools.lru_cache(maxsize=3)
def _real_size_parts(arch: str) -> tuple:
    """(denoiser, [text encoders], VAE or None) of the real-size model on the meta device."""
    variant = default_variant(arch)
    if variant is not None:
        from diffusers import AutoencoderKL

        from trainer import dit_architectures

        with torch.device("meta"):
            vae = AutoencoderKL(**dit_architectures.VARIANTS[variant].vae)
        return (dit_architectures.build_transformer(variant, meta=True),
                dit_architectures.build_text_encoders(variant, meta=True), vae)
    from trainer.architectures import build_text_encoders, build_unet

    return build_unet(arch, meta=True), build_text_encoders(arch, meta=True), None


_LIKE: dict[int, tuple] = {}


def _meta_copy(pipe: Any) -> tuple:
    """Meta-device models with the shapes of ``pipe``'s denoiser and text encoders (cached per pipeline), and its
    VAE (its parameters are only counted)."""
    cached = _LIKE.get(id(pipe))
    if cached is not None and cached[0] is pipe:
        return cached[1]
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    with torch.device("meta"):
        copy = type(denoiser).from_config(denoiser.config)
        encoders = [type(te)(te.config) if te is not None else None for te in (getattr(pipe, n, None) for n in names)]
    while encoders and encoders[-1] is None:
        encoders.pop()
    _LIKE.clear()
    _LIKE[id(pipe)] = (pipe, (copy, encoders, pipe.vae))
    return copy, encoders, pipe.vae


def estimate(config: Any, arch: str | None = None, pipe: Any = None) -> Estimate:
    """Trainable parameters and file size of ``config``'s network (SD3/Flux: and GPU memory); raises ConfigError
    for a bad option."""
    from methods.network import AdapterNetwork, model_parts

    if pipe is not None:
        from methods.network import detect_architecture

        arch = detect_architecture(pipe)
        denoiser, encoders, vae = _meta_copy(pipe)
        basis = f"measured on the detected {ARCH_LABELS[arch]} model"
    else:
        arch = arch if arch in ARCH_LABELS else "sd1"
        denoiser, encoders, vae = _real_size_parts(arch)
        variant = default_variant(arch)
        label = _variant_title(variant) if variant else f"standard {ARCH_LABELS[arch]}"
        basis = f"for a {label} model (Detect the base model to measure it)"
    parts = model_parts(denoiser, list(encoders), arch)
    network = AdapterNetwork.create(parts, arch, config.network.method, config.network.options,
                                    config.target_config())
    parameters = network.trainable_parameter_count()
    # The safetensors header: per tensor its key, dtype, shape and offsets (~60 bytes besides the key); each
    # module also stores its alpha. Plus about 6 kB of kohya/ModelSpec metadata.
    tensors_per_module = len(network.state_dict()) / max(1, len(network)) + 1
    header = sum((len(name) + 80) * tensors_per_module for name in network.adapters) + 6_000
    size = int(parameters * DTYPE_BYTES.get(config.output.save_dtype, 2) + header)
    vram = None
    if network.variant is not None:
        vram = vram_estimate(config, denoiser, [e for e in encoders if e is not None], vae, parameters,
                             network.variant)
    return Estimate(parameters, network.counts(), size, arch, basis, vram)


def _variant_title(name: str) -> str:
    from trainer.dit_architectures import VARIANTS

    return VARIANTS[name].title


def _parameters(model: Any) -> int:
    return sum(p.numel() for p in model.parameters()) if model is not None else 0


def vram_estimate(config: Any, transformer: Any, text_encoders: list[Any], vae: Any, trainable: int,
                  variant: str) -> VramEstimate:
    """GPU memory of training ``config`` on an SD3/Flux ``transformer`` (meta copies will do); see the module
    docstring for what is counted and how."""
    from trainer.dit_architectures import VARIANTS

    train, model_config = config.train, transformer.config
    compute = {"fp16": 2, "bf16": 2}.get(train.mixed_precision, 4)
    stored = 1 if train.fp8_base else compute  # fp8_base: the transformer and the text encoders
    vae_bytes = 4 if config.model.vae_fp32 else compute
    weights = ((_parameters(transformer) + sum(_parameters(e) for e in text_encoders)) * stored
               + _parameters(vae) * vae_bytes)
    state = trainable * (4 + 4 + OPTIMIZER_STATE_BYTES.get(train.optimizer.lower(), 8))
    hidden = model_config.num_attention_heads * model_config.attention_head_dim
    flux = "num_single_layers" in model_config
    patch = 2 if flux else model_config.patch_size  # Flux packs 2×2 latent patches into one token
    image_tokens = (config.dataset.resolution // 8 // patch) ** 2
    t5_tokens = config.dit.t5_max_length or VARIANTS[variant].t5_max_length
    text_tokens = t5_tokens + (0 if flux else 77)  # SD3: CLIP's 77 tokens before T5's
    blocks = model_config.num_layers + model_config.get("num_single_layers", 0)
    tokens = (image_tokens + text_tokens) * train.batch_size
    per_block = 34 * hidden * tokens * compute / 2  # Korthikanti et al. 2022, flash attention
    if train.gradient_checkpointing:
        activations = blocks * hidden * tokens * compute + per_block
    else:
        activations = blocks * per_block
    precision = {"no": "fp32"}.get(train.mixed_precision, train.mixed_precision)
    settings = (f"{config.dataset.resolution}² px, batch {train.batch_size}, {precision} weights"
                f"{', fp8 transformer and text encoders' if train.fp8_base else ''}, gradient checkpointing "
                f"{'on' if train.gradient_checkpointing else 'off'}, T5 {t5_tokens} tokens")
    return VramEstimate(float(weights), float(state), float(activations), settings)


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
