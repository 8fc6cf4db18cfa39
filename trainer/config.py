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

from .compiling import COMPILE_MODES

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
LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("snr", "exponential", "constant")
HALF_PRECISION_UPDATES = ("stochastic_rounding", "fp32_master", "plain")


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
class SubsetSection:
    """One folder of images in a run of several (sd-scripts' ``[[datasets.subsets]]``): written as
    ``[[dataset.subsets]]`` tables. Unset (None) settings take the [dataset] value."""

    image_dir: str = ""  # the images, directly inside this folder (sub-folders are not read)
    num_repeats: int = 1
    is_reg: bool = False  # regularisation images (weighted by dataset.reg_weight)
    resolution: int | None = None  # its own bucket resolution
    caption_extension: str | None = None
    class_tokens: str | None = None  # the caption of images without a caption file
    trigger_word: str | None = None
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    shuffle_caption: bool | None = None
    keep_tokens: int | None = None
    caption_dropout: float | None = None
    caption_tag_dropout_rate: float | None = None
    caption_dropout_every_n_epochs: int | None = None
    flip: bool | None = None
    color_aug: bool | None = None


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
    # sd-scripts' caption and data options
    caption_prefix: str = ""  # added before every caption (with a space), before shuffling
    caption_suffix: str = ""  # added after every caption (with a space)
    caption_tag_dropout_rate: float = 0.0  # each tag after keep_tokens is dropped with this probability
    caption_dropout_every_n_epochs: int = 0  # every Nth epoch trains without captions
    max_token_length: int = 75  # 150 or 225: longer captions, encoded in 77-token chunks as sd-scripts does
    weighted_captions: bool = False  # read (word:1.2), (word), [word] attention weights in captions
    bucket_no_upscale: bool = False  # buckets never larger than the image (small images are not enlarged)
    color_aug: bool = False  # a weak random hue shift or gamma (latents then cannot be cached)
    subsets: list[SubsetSection] = dataclasses.field(default_factory=list)  # several folders; replaces dir/reg_dir


@dataclasses.dataclass
class NetworkSection:
    method: str = "lora"
    preset: str = "attention_mlp"  # attention, attention_mlp, full
    text_encoder_preset: str = ""  # "" → same as preset; "none" → no text-encoder adapters
    include: list[str] = dataclasses.field(default_factory=list)
    exclude: list[str] = dataclasses.field(default_factory=list)
    # Method options (rank, alpha, factor, block_size, dora, …) are written directly in [network] and land here.
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    init_from: str = ""  # start from an existing adapter file (kohya's network_weights)
    dim_from_weights: bool = False  # take modules, ranks and alphas from the init_from file
    # kohya's per-block options for the UNet (networks.lora syntax: comma-separated numbers, or for the lr weights a
    # preset cosine/sine/linear/reverse_linear/zeros with an optional +offset); see methods.blocks
    down_lr_weight: str = ""  # learning-rate factors of the down (SDXL: input) blocks, shallow → deep
    mid_lr_weight: str = ""  # of the mid block(s)
    up_lr_weight: str = ""  # of the up (SDXL: output) blocks, deep → shallow
    block_lr_zero_threshold: float = 0.0  # factors at or below it become 0 (the block gets no adapter)
    block_dims: str = ""  # rank per block: 25 numbers (SD1/SD2), 23 (SDXL)
    block_alphas: str = ""  # alpha per block (default: alpha)
    conv_block_dims: str = ""  # rank per block for k×k convs
    conv_block_alphas: str = ""
    scale_weight_norms: float = 0.0  # > 0: after each step cap every module's ‖ΔW‖ at this (max-norm regularisation)
    base_weights: list[str] = dataclasses.field(default_factory=list)  # adapter files merged into the base first
    base_weights_multiplier: list[float] = dataclasses.field(default_factory=list)  # their strengths (default 1)


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
    # Forgetting (trainer.prior): every N steps the adapted model's denoising loss on images of the base model
    # (prior_prompts, or the dataset's regularisation images), divided by the base model's on the same noise
    prior_every_n_steps: int = 0  # 0: off
    prior_prompts: list[str] = dataclasses.field(default_factory=list)  # [] → a handful of unrelated prompts
    prior_images: int = 8  # base-model images generated from prior_prompts (unused with regularisation images)
    prior_max_ratio: float = 1.1  # the checkpoint pick's tolerance: best concept loss among ratios ≤ this
    prior_stop_ratio: float = 0.0  # > 0: stop (with a save) once the prior loss ratio passes this
    # Differential output preservation (trainer.preservation): each training latent is also denoised with the trigger
    # word replaced by preservation_class ("" removes it) and pulled toward the base model's prediction there, so the
    # concept stays with its trigger; 0: off. About doubles a step's cost.
    output_preservation_weight: float = 0.0
    preservation_class: str = ""
    # Pivotal tuning (methods.embeddings): the trigger word's own token vectors train next to the adapter at this
    # rate (0: off) and are saved beside it as <name>_emb.safetensors (a textual inversion the adapter needs)
    embedding_lr: float = 0.0
    embedding_word: str = ""  # "" → the run's trigger word (dataset.trigger_word, or the folder word)
    sdpa: bool = True
    fp8_base: bool = False  # keep the frozen denoiser's Linear weights in float8 (CUDA only; kohya's fp8_base)
    # Debug: every step uses the same noise and timestep per sample (seeded by train.seed and the sample), so on a
    # fixed batch the loss measures pure fitting and must fall; never for real training.
    fixed_noise: bool = False
    # kohya's loss options (sd-scripts names; trainer.objective): the element-wise loss, timestep range and weights
    loss_type: str = "l2"  # l2, l1, huber or smooth_l1
    huber_schedule: str = "snr"  # huber/smooth_l1 threshold over timesteps: snr, exponential or constant
    huber_c: float = 0.1  # the huber/smooth_l1 threshold (its value at t = 0 for the exponential schedule)
    huber_scale: float = 1.0  # multiplies the exponential/constant threshold
    debiased_estimation_loss: bool = False  # weight the loss by 1/√SNR (ε) or 1/(SNR+1) (v)
    scale_v_pred_loss_like_noise_pred: bool = False  # v-prediction only: weight by SNR/(SNR+1)
    v_pred_like_loss: float = 0.0  # ε-prediction only: add this much of a v-prediction-like loss
    min_timestep: int = 0  # timesteps are drawn from [min_timestep, max_timestep)
    max_timestep: int | None = None  # None → the scheduler's num_train_timesteps
    # kohya's noise options
    zero_terminal_snr: bool = False  # rescale the noise schedule to ᾱ_T = 0 (Lin et al. 2023), previews too
    noise_offset_random_strength: bool = False  # each sample's noise offset scaled by U(0, 1)
    adaptive_noise_scale: float = 0.0  # adds this × |mean of the latent channel| to the noise offset
    multires_noise_iterations: int = 0  # pyramid (multi-resolution) noise levels; 6-10 typical
    multires_noise_discount: float = 0.3  # weight of each coarser level
    ip_noise_gamma: float = 0.0  # input perturbation: the model input gets γ·extra noise, the target does not
    ip_noise_gamma_random_strength: bool = False  # each sample's γ scaled by U(0, 1)
    # kohya's memory options
    full_fp16: bool = False  # adapter weights and gradients in fp16 (needs mixed_precision = "fp16")
    full_bf16: bool = False  # adapter weights and gradients in bf16 (needs mixed_precision = "bf16")
    # how full_fp16/bf16 apply an update: stochastic_rounding, fp32_master (an fp32 copy is stepped) or plain
    half_precision_update: str = "stochastic_rounding"
    fp8_base_unet: bool = False  # fp8_base for the denoiser only: the text encoders stay in the mixed precision
    # torch.compile of the adapted denoiser (and the text encoders when trained); see trainer.compiling
    compile: bool = False
    compile_mode: str = "auto"  # auto, default, reduce-overhead, max-autotune, max-autotune-no-cudagraphs


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
    save_last_n_steps: int = 0  # > 0: delete step saves (and their state) older than this many steps
    save_last_n_epochs: int = 0  # > 0: keep only the last N epoch saves (and their state)
    save_dtype: str = "fp16"
    save_state: bool = True  # resumable state next to each save
    overwrite: bool = False
    tensorboard: bool = True
    wandb_project: str = ""  # log to Weights & Biases under this project (needs the wandb package)
    wandb_run_name: str = ""  # "" → output.name
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
        self._validate_prior()
        if self.train.learning_rate <= 0:
            raise ConfigError(f"train.learning_rate must be > 0, got {self.train.learning_rate}")
        if not self.output.name or any(c in self.output.name for c in "/\\"):
            raise ConfigError(f"output.name must be a plain file name, got {self.output.name!r}")
        self.method_config()  # validates network.options against the chosen method
        self.target_config().validate()
        self._validate_kohya_options()
        self._validate_dit()

    def _validate_prior(self) -> None:
        train = self.train
        if train.prior_every_n_steps < 0:
            raise ConfigError(f"train.prior_every_n_steps must be ≥ 0 (0: off), got {train.prior_every_n_steps}")
        if train.prior_images < 1:
            raise ConfigError(f"train.prior_images must be ≥ 1, got {train.prior_images}")
        if train.prior_max_ratio <= 0:
            raise ConfigError(f"train.prior_max_ratio must be > 0 (1.0: the base model's loss), got "
                              f"{train.prior_max_ratio}")
        if train.prior_stop_ratio and not train.prior_stop_ratio > 1.0:
            raise ConfigError(f"train.prior_stop_ratio must be above 1.0 (the ratio of an untrained adapter) or 0 "
                              f"(off), got {train.prior_stop_ratio}")
        if not train.embedding_lr >= 0:
            raise ConfigError(f"train.embedding_lr must be ≥ 0 (0: off), got {train.embedding_lr}")
        if not train.output_preservation_weight >= 0:
            raise ConfigError(f"train.output_preservation_weight must be ≥ 0 (0: off; 1.0: as much as the concept's "
                              f"loss), got {train.output_preservation_weight}")
        if train.prior_stop_ratio and not train.prior_every_n_steps:
            raise ConfigError("train.prior_stop_ratio needs train.prior_every_n_steps > 0 (the ratio it watches)")
        if any(not prompt.strip() for prompt in train.prior_prompts):
            raise ConfigError("train.prior_prompts has an empty prompt; remove it or write one")

    def _validate_kohya_options(self) -> None:
        """The sd-scripts options (loss, noise, memory, per-block network, saving): values and combinations that
        cannot work, refused as sd-scripts refuses them."""
        train, network, output = self.train, self.network, self.output
        for key, value, allowed in (("train.loss_type", train.loss_type, LOSS_TYPES),
                                    ("train.huber_schedule", train.huber_schedule, HUBER_SCHEDULES),
                                    ("train.half_precision_update", train.half_precision_update,
                                     HALF_PRECISION_UPDATES),
                                    ("train.compile_mode", train.compile_mode, COMPILE_MODES)):
            if value not in allowed:
                raise ConfigError(f"{key} = {value!r} is not allowed; choose one of: {', '.join(allowed)}")
        if train.huber_c <= 0:
            raise ConfigError(f"train.huber_c must be > 0, got {train.huber_c}")
        if train.huber_schedule == "exponential" and train.loss_type in ("huber", "smooth_l1") and train.huber_c >= 1:
            raise ConfigError(f"train.huber_c must be < 1 for the exponential schedule (it decays from 1 to huber_c), "
                              f"got {train.huber_c}")
        non_negative = [("train.min_timestep", train.min_timestep), ("train.v_pred_like_loss", train.v_pred_like_loss),
                        ("train.ip_noise_gamma", train.ip_noise_gamma),
                        ("train.multires_noise_iterations", train.multires_noise_iterations),
                        ("train.multires_noise_discount", train.multires_noise_discount),
                        ("network.scale_weight_norms", network.scale_weight_norms),
                        ("network.block_lr_zero_threshold", network.block_lr_zero_threshold),
                        ("output.save_last_n_steps", output.save_last_n_steps),
                        ("output.save_last_n_epochs", output.save_last_n_epochs)]
        for key, value in non_negative:
            if value < 0:
                raise ConfigError(f"{key} must be ≥ 0, got {value}")
        if train.max_timestep is not None and not train.min_timestep <= train.max_timestep:
            raise ConfigError(f"train.max_timestep {train.max_timestep} is below train.min_timestep "
                              f"{train.min_timestep}")
        needs = [("train.adaptive_noise_scale", bool(train.adaptive_noise_scale), "train.noise_offset",
                  bool(train.noise_offset)),
                 ("train.noise_offset_random_strength", train.noise_offset_random_strength, "train.noise_offset",
                  bool(train.noise_offset)),
                 ("train.ip_noise_gamma_random_strength", train.ip_noise_gamma_random_strength,
                  "train.ip_noise_gamma", bool(train.ip_noise_gamma)),
                 ("network.dim_from_weights", network.dim_from_weights, "network.init_from",
                  bool(network.init_from)),
                 ("output.save_last_n_steps", bool(output.save_last_n_steps), "output.save_every_n_steps",
                  bool(output.save_every_n_steps)),
                 ("output.save_last_n_epochs", bool(output.save_last_n_epochs), "output.save_every_n_epochs",
                  bool(output.save_every_n_epochs))]
        for key, on, needed, present in needs:
            if on and not present:
                raise ConfigError(f"{key} needs {needed} to be set")
        for flag, precision in (("full_fp16", "fp16"), ("full_bf16", "bf16")):
            if getattr(train, flag) and train.mixed_precision != precision:
                raise ConfigError(f"train.{flag} needs train.mixed_precision = {precision!r} (got "
                                  f"{train.mixed_precision!r})")
        if len(network.base_weights_multiplier) > len(network.base_weights):
            raise ConfigError(f"network.base_weights_multiplier has {len(network.base_weights_multiplier)} value(s) "
                              f"for {len(network.base_weights)} file(s) in network.base_weights")
        self._validate_dataset_options()
        if network.dim_from_weights and (network.block_dims or network.conv_block_dims):
            raise ConfigError("network.dim_from_weights takes every module's rank from the file; leave "
                              "network.block_dims / conv_block_dims empty")
        from methods.base import LowRankConfig
        from methods.blocks import check_block_options
        from methods.registry import get_method

        check_block_options(network)
        if (network.block_dims or network.conv_block_dims) and not isinstance(self.method_config(), LowRankConfig):
            raise ConfigError(f"network.block_dims / conv_block_dims set ranks, and {network.method} has none; use "
                              "them with lora, loha, lokr or glora")
        if network.scale_weight_norms and not get_method(network.method).can_scale_delta():
            raise ConfigError(f"network.scale_weight_norms caps ‖ΔW‖ by scaling it, and {network.method} has no such "
                              "scale (it rotates the weight); set network.scale_weight_norms = 0")

    def _validate_dataset_options(self) -> None:
        data = self.dataset
        if data.max_token_length not in (75, 150, 225):
            raise ConfigError(f"dataset.max_token_length = {data.max_token_length} is not allowed; choose 75, 150 "
                              "or 225 (tokens per caption, as sd-scripts)")
        if data.caption_dropout_every_n_epochs < 0:
            raise ConfigError(f"dataset.caption_dropout_every_n_epochs must be ≥ 0, got "
                              f"{data.caption_dropout_every_n_epochs}")
        if not 0.0 <= data.caption_tag_dropout_rate < 1.0:
            raise ConfigError(f"dataset.caption_tag_dropout_rate must be in [0, 1), got "
                              f"{data.caption_tag_dropout_rate}")
        if data.bucket_no_upscale and not data.enable_buckets:
            raise ConfigError("dataset.bucket_no_upscale picks each image's own bucket; it needs "
                              "dataset.enable_buckets = true")
        if not data.subsets:
            return
        if data.reg_dir:
            raise ConfigError("dataset.reg_dir is not read when dataset.subsets are given; add the regularisation "
                              "folder as a subset with is_reg = true")
        for index, subset in enumerate(data.subsets):
            where = f"dataset.subsets[{index}]"
            if not subset.image_dir.strip():
                raise ConfigError(f"{where}.image_dir is empty; give the folder of its images")
            if subset.num_repeats < 1:
                raise ConfigError(f"{where}.num_repeats must be ≥ 1, got {subset.num_repeats}")
            if subset.resolution is not None and (subset.resolution < 8 or subset.resolution % 8):
                raise ConfigError(f"{where}.resolution must be a positive multiple of 8, got {subset.resolution}")
            for key in ("caption_dropout", "caption_tag_dropout_rate"):
                value = getattr(subset, key)
                if value is not None and not 0.0 <= value < 1.0:
                    raise ConfigError(f"{where}.{key} must be in [0, 1), got {value}")
            for key in ("keep_tokens", "caption_dropout_every_n_epochs"):
                value = getattr(subset, key)
                if value is not None and value < 0:
                    raise ConfigError(f"{where}.{key} must be ≥ 0, got {value}")
        if all(subset.is_reg for subset in data.subsets):
            raise ConfigError("every dataset.subsets entry is is_reg = true; add a subset of training images")

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
    """TOML for our two-level config: one ``[section]`` per table, nested tables as ``[section.sub]``, lists of tables
    as ``[[section.key]]``."""
    lines: list[str] = []

    def is_table_list(value: Any) -> bool:
        return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)

    def emit(prefix: str, table: dict[str, Any], array: bool = False) -> None:
        scalars = {k: v for k, v in table.items() if not isinstance(v, dict) and not is_table_list(v)}
        tables = {k: v for k, v in table.items() if isinstance(v, dict)}
        lines.append(f"[[{prefix}]]" if array else f"[{prefix}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in scalars.items() if value is not None)
        lines.append("")
        for key, sub in tables.items():
            emit(f"{prefix}.{key}", sub)
        for key, items in table.items():
            if is_table_list(items):  # [[section.key]] array of tables (dataset.subsets)
                for item in items:
                    emit(f"{prefix}.{key}", item, array=True)

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
