"""The training configuration: typed sections loaded from TOML, overridable by ``--set section.key=value``.

The TOML written next to every output (``to_toml``) reproduces the run. Unknown keys and bad values raise
:class:`methods.ConfigError` naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import typing
from pathlib import Path
from typing import Any

from methods.base import ConfigError, coerce_value
from methods.dit_naming import FILE_LAYOUTS, T5_PREFIX

OPTIMIZERS = ("adamw", "adamw8bit", "prodigy", "adafactor", "lion", "sgd")
SCHEDULERS = ("constant", "linear", "cosine", "cosine_with_restarts", "polynomial")
MIXED_PRECISION = ("no", "fp16", "bf16")
PREDICTION_TYPES = ("auto", "epsilon", "v_prediction")
ARCHITECTURES = ("auto", "sd1", "sd2", "sdxl", "sd3", "flux")
SAMPLERS = ("euler_a", "dpmpp_2m", "ddim", "euler")
SAVE_DTYPES = ("fp16", "bf16", "fp32")
CROPS = ("center", "random")
MISSING_CAPTION = ("empty", "class_word")
LATENT_CACHE = ("memory", "disk", "off")


@dataclasses.dataclass
class ModelSection:
    base: str = "runwayml/stable-diffusion-v1-5"  # hub id, diffusers folder, or .safetensors/.ckpt file
    arch: str = "auto"
    prediction_type: str = "auto"
    vae: str = ""  # optional separate VAE (folder or file)
    vae_fp32: bool = True  # run the VAE in fp32 (the SDXL VAE gives NaN/black images in fp16)
    tokenizer: str = ""  # folder with vocab.json/merges.txt, for single-file checkpoints (they carry none)
    # Single files: a diffusers folder describing a non-standard size; for an SD3/Flux transformer file, the base
    # model's folder or hub id, which gives its VAE, text encoders and tokenizers.
    config: str = ""


@dataclasses.dataclass
class DatasetSection:
    dir: str = "data"
    resolution: int = 512
    caption_extension: str = ".txt"
    missing_caption: str = "empty"  # "empty" or "class_word" (the folder name without its repeat count)
    trigger_word: str = ""  # prepended to every caption
    reg_dir: str = ""  # regularisation (prior-preservation) images
    reg_weight: float = 1.0
    enable_buckets: bool = True
    min_bucket_side: int = 256
    max_bucket_side: int = 1024
    bucket_step: int = 64
    crop: str = "center"
    flip: bool = False
    shuffle_caption: bool = False
    keep_tokens: int = 0  # leading comma-separated tags kept in place when shuffling
    caption_dropout: float = 0.0
    max_pixels: int = 40_000_000  # larger images are skipped (decompression-bomb guard)
    latent_cache: str = "memory"  # memory, disk or off
    cache_text_encoder_outputs: bool = True  # only when the text encoders are not trained
    masked_loss: bool = False  # weight the loss by the alpha channel or a <name>_mask.png image
    validation_split: float = 0.0  # fraction of images held out for a validation loss
    num_workers: int = 0


@dataclasses.dataclass
class NetworkSection:
    method: str = "lora"
    preset: str = "attention_mlp"  # attention, attention_mlp, full
    text_encoder_preset: str = ""  # "" → same as preset; "none" → no text-encoder adapters
    include: list[str] = dataclasses.field(default_factory=list)
    exclude: list[str] = dataclasses.field(default_factory=list)
    # Method options (rank, alpha, factor, block_size, dora, …) are written directly in [network] and land here.
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    init_from: str = ""  # start from an existing adapter file


@dataclasses.dataclass
class TrainSection:
    max_steps: int = 1000
    epochs: int = 0  # > 0: train this many epochs instead of max_steps
    batch_size: int = 1
    gradient_accumulation: int = 1
    learning_rate: float = 1e-4
    unet_lr: float = 0.0  # 0 → learning_rate
    text_encoder_lr: float = 0.0  # 0 → learning_rate; also text_encoder_2_lr for SDXL
    text_encoder_2_lr: float = 0.0
    train_text_encoder: bool = True
    optimizer: str = "adamw"
    weight_decay: float = 0.01
    optimizer_args: dict[str, Any] = dataclasses.field(default_factory=dict)
    scheduler: str = "constant"
    warmup_steps: int = 0
    scheduler_cycles: int = 1  # cosine_with_restarts
    scheduler_power: float = 1.0  # polynomial
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    max_grad_norm: float = 1.0
    seed: int = 42
    clip_skip: int = 1
    min_snr_gamma: float = 0.0
    noise_offset: float = 0.0
    ema_decay: float = 0.0  # > 0: keep an EMA of the adapter weights and save it
    validation_every_n_steps: int = 0
    sdpa: bool = True
    fp8_base: bool = False  # keep the frozen denoiser's Linear weights in float8 (CUDA only; kohya's fp8_base)
    # Debug: every step uses the same noise and timestep per sample (seeded by train.seed and the sample), so on a
    # fixed batch the loss measures pure fitting and must fall; never for real training.
    fixed_noise: bool = False


@dataclasses.dataclass
class DiTSection:
    """Options of the diffusion-transformer bases (SD3/SD3.5, FLUX.1), sd-scripts' names in brackets; "" and 0 take
    the family's default (:func:`trainer.flow_matching.default_config`, the variant's T5 length)."""

    # logit_normal, mode, uniform, sigmoid, shift, flux_shift (SD3 logit_normal, Flux flux_shift)
    timestep_sampling: str = ""
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    sigmoid_scale: float = 1.0
    shift: float = 0.0  # σ shift (discrete_flow_shift / training_shift); 0 → SD3 3.0, Flux 1.0
    weighting_scheme: str = ""  # none, sigma_sqrt, cosmap (default none)
    target: str = ""  # velocity (model_prediction_type raw) or x0 (SD3's preconditioning); SD3 x0, Flux velocity
    guidance_scale: float = 1.0  # FLUX.1 dev's embedded guidance while training (sd-scripts' recommended 1.0)
    t5_max_length: int = 0  # T5 tokens (t5xxl_max_token_length); 0 → SD3 256, FLUX.1 dev 512, schnell 256
    train_t5: bool = False  # adapters on T5-XXL too (train_t5xxl); needs train.train_text_encoder

    def choices(self) -> list[tuple[str, str, tuple[str, ...]]]:
        from .flow_matching import LOSS_WEIGHTING, TARGETS, TIMESTEP_SAMPLING

        return [("dit.timestep_sampling", self.timestep_sampling, ("", *TIMESTEP_SAMPLING)),
                ("dit.weighting_scheme", self.weighting_scheme, ("", *LOSS_WEIGHTING)),
                ("dit.target", self.target, ("", *TARGETS))]


@dataclasses.dataclass
class SampleSection:
    every_n_steps: int = 0
    prompts: list[str] = dataclasses.field(default_factory=list)
    negative_prompt: str = ""
    sampler: str = "euler_a"
    steps: int = 20
    guidance_scale: float = 7.0
    seed: int = 1234
    width: int = 0  # 0 → dataset resolution
    height: int = 0


@dataclasses.dataclass
class OutputSection:
    dir: str = "output"
    name: str = "my_adapter"
    save_every_n_steps: int = 0
    save_every_n_epochs: int = 0
    save_dtype: str = "fp16"
    save_state: bool = True  # resumable state next to each save
    overwrite: bool = False
    tensorboard: bool = True
    file_layout: str = "auto"  # SD3/Flux files: auto (diffusers for LoRA, else lycoris), diffusers, kohya, lycoris
    title: str = ""
    author: str = ""
    description: str = ""
    comment: str = ""  # free text kept in the file as kohya's ss_training_comment


@dataclasses.dataclass
class TrainerConfig:
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    dataset: DatasetSection = dataclasses.field(default_factory=DatasetSection)
    network: NetworkSection = dataclasses.field(default_factory=NetworkSection)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    sample: SampleSection = dataclasses.field(default_factory=SampleSection)
    output: OutputSection = dataclasses.field(default_factory=OutputSection)
    dit: DiTSection = dataclasses.field(default_factory=DiTSection)

    # ----- loading ----------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainerConfig:
        sections = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(sections))
        if unknown:
            raise ConfigError(f"unknown section(s) [{', '.join(unknown)}]; allowed: {', '.join(sections)}")
        values = {}
        for name, field in sections.items():
            section_values = data.get(name, {})
            if name == "network" and isinstance(section_values, dict):
                section_values = _split_method_options(section_values)
            values[name] = _build_section(name, field.default_factory, section_values)
        config = cls(**values)
        config.validate()
        return config

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] | None = None) -> TrainerConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"{path}: not valid TOML ({error})") from error
        for override in overrides or []:
            apply_override(data, override)
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        """Plain data in the shape users write: method options flat in ``network``."""
        data = dataclasses.asdict(self)
        data["network"].update(data["network"].pop("options"))
        return data

    def to_toml(self) -> str:
        return dump_toml(self.to_dict())

    def with_overrides(self, overrides: list[str]) -> TrainerConfig:
        data = self.to_dict()
        for override in overrides:
            apply_override(data, override)
        return TrainerConfig.from_dict(data)

    # ----- validation -------------------------------------------------------------------------------------
    def validate(self) -> None:
        choices = [
            ("model.arch", self.model.arch, ARCHITECTURES),
            ("model.prediction_type", self.model.prediction_type, PREDICTION_TYPES),
            ("dataset.crop", self.dataset.crop, CROPS),
            ("dataset.missing_caption", self.dataset.missing_caption, MISSING_CAPTION),
            ("dataset.latent_cache", self.dataset.latent_cache, LATENT_CACHE),
            ("train.optimizer", self.train.optimizer.lower(), OPTIMIZERS),
            ("train.scheduler", self.train.scheduler, SCHEDULERS),
            ("train.mixed_precision", self.train.mixed_precision, MIXED_PRECISION),
            ("sample.sampler", self.sample.sampler, SAMPLERS),
            ("output.save_dtype", self.output.save_dtype, SAVE_DTYPES),
            ("output.file_layout", self.output.file_layout, FILE_LAYOUTS),
            *self.dit.choices(),
        ]
        for key, value, allowed in choices:
            if value not in allowed:
                raise ConfigError(f"{key} = {value!r} is not allowed; choose one of: {', '.join(allowed)}")
        positive = [("dataset.resolution", self.dataset.resolution), ("train.batch_size", self.train.batch_size),
                    ("train.gradient_accumulation", self.train.gradient_accumulation),
                    ("dataset.bucket_step", self.dataset.bucket_step), ("train.clip_skip", self.train.clip_skip)]
        for key, value in positive:
            if value < 1:
                raise ConfigError(f"{key} must be ≥ 1, got {value}")
        if self.train.max_steps < 1 and self.train.epochs < 1:
            raise ConfigError("set train.max_steps or train.epochs to a positive number")
        if self.dataset.resolution % 8:
            raise ConfigError(f"dataset.resolution must be a multiple of 8, got {self.dataset.resolution}")
        if self.dataset.enable_buckets:
            data = self.dataset
            if data.resolution < data.bucket_step:
                raise ConfigError(f"dataset.resolution {data.resolution} is smaller than dataset.bucket_step "
                                  f"{data.bucket_step}: no bucket fits; lower dataset.bucket_step or set "
                                  "dataset.enable_buckets = false")
            if data.min_bucket_side > data.max_bucket_side:
                raise ConfigError(f"dataset.min_bucket_side {data.min_bucket_side} is larger than "
                                  f"dataset.max_bucket_side {data.max_bucket_side}")
        for key, value in (("dataset.caption_dropout", self.dataset.caption_dropout),
                           ("dataset.validation_split", self.dataset.validation_split),
                           ("train.ema_decay", self.train.ema_decay)):
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{key} must be in [0, 1), got {value}")
        if self.train.learning_rate <= 0:
            raise ConfigError(f"train.learning_rate must be > 0, got {self.train.learning_rate}")
        if not self.output.name or any(c in self.output.name for c in "/\\"):
            raise ConfigError(f"output.name must be a plain file name, got {self.output.name!r}")
        self.method_config()  # validates network.options against the chosen method
        self.target_config().validate()
        self._validate_dit()

    def _validate_dit(self) -> None:
        from .flow_matching import FlowMatchingConfig, FlowMatchingError

        dit = self.dit
        try:  # the numbers, checked as the objective will use them ("" choices stand for valid defaults)
            FlowMatchingConfig(logit_mean=dit.logit_mean, logit_std=dit.logit_std, mode_scale=dit.mode_scale,
                               sigmoid_scale=dit.sigmoid_scale, shift=dit.shift or 1.0).validate()
        except FlowMatchingError as error:
            raise ConfigError(f"dit.{error}") from error
        if dit.shift < 0 or dit.t5_max_length < 0 or dit.guidance_scale < 0:
            raise ConfigError("dit.shift, dit.t5_max_length and dit.guidance_scale must be ≥ 0 (0: the default)")
        if dit.train_t5 and not self.train.train_text_encoder:
            raise ConfigError("dit.train_t5 = true needs train.train_text_encoder = true (T5 adapters are text-encoder "
                              "adapters)")

    def method_config(self):
        from methods.registry import get_method

        method = get_method(self.network.method)
        return method.config_class.from_dict(self.network.options, where="network")

    def target_config(self):
        from methods.targets import TargetConfig

        te_preset = self.network.text_encoder_preset or None
        if not self.train.train_text_encoder:
            te_preset = "none"
        exclude = list(self.network.exclude)
        if not self.dit.train_t5:  # T5-XXL (SD3/Flux) only on request: 4.7 B parameters, no text-embedding cache
            exclude.append(f"^{T5_PREFIX}_")
        return TargetConfig(preset=self.network.preset, text_encoder_preset=te_preset,
                            include=list(self.network.include), exclude=exclude)


def _split_method_options(values: dict[str, Any]) -> dict[str, Any]:
    section_keys = {f.name for f in dataclasses.fields(NetworkSection)}
    options = dict(values.get("options", {}))
    options.update({k: v for k, v in values.items() if k not in section_keys})
    return {**{k: v for k, v in values.items() if k in section_keys}, "options": options}


def _build_section(name: str, section_class: type, values: Any) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"[{name}] must be a table of keys, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(section_class)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"[{name}]: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(fields)}")
    hints = typing.get_type_hints(section_class)
    converted = {key: coerce_value(f"{name}.{key}", hints[key], value) for key, value in values.items()}
    return section_class(**converted)


def apply_override(data: dict[str, Any], override: str) -> None:
    """``section.key=value`` (value parsed as TOML, falling back to a plain string)."""
    if "=" not in override:
        raise ConfigError(f"--set {override!r}: expected section.key=value")
    dotted, raw = override.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) < 2:
        raise ConfigError(f"--set {override!r}: the key needs its section, e.g. train.max_steps=30")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    target = data
    for part in parts[:-1]:
        target = target.setdefault(part, {})
        if not isinstance(target, dict):
            raise ConfigError(f"--set {override!r}: {part} is not a table")
    target[parts[-1]] = value


def dump_toml(data: dict[str, Any]) -> str:
    """TOML for our two-level config: one ``[section]`` per table, nested tables as ``[section.sub]``."""
    lines: list[str] = []

    def emit(prefix: str, table: dict[str, Any]) -> None:
        scalars = {k: v for k, v in table.items() if not isinstance(v, dict)}
        tables = {k: v for k, v in table.items() if isinstance(v, dict)}
        lines.append(f"[{prefix}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in scalars.items() if value is not None)
        lines.append("")
        for key, sub in tables.items():
            emit(f"{prefix}.{key}", sub)

    for section, table in data.items():
        emit(section, table)
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} to TOML")
