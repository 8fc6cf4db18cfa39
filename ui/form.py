"""Every ``TrainerConfig`` key as a UI field, and the conversion UI values ↔ config ↔ TOML.

The form is generated from the config dataclasses (and each method's option dataclass), so a key added to
``trainer/config.py`` or a new method appears in the UI without touching this file. ``values_to_config`` builds
the config through :meth:`TrainerConfig.from_dict` — the same validation the CLI applies to a TOML file — and
``config_to_values`` is its inverse: for a TOML written by the UI, TOML → values → TOML is byte-identical.

UI values are keyed ``section.key`` (``train.max_steps``); method options ``network.<method>.<option>``
(``network.lokr.factor``), one group per method, of which only the selected method's reach the config. Options
left empty (``None``, e.g. ``alpha``) are not written, as in a hand-written TOML.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
import tomllib
import types
import typing
from typing import Any

from methods.base import ConfigError
from trainer import config as config_module
from trainer.config import TrainerConfig, dump_toml

SECTIONS = ("model", "dataset", "network", "train", "sample", "output", "dit")

# Where each key shows: "main" keys of each tab are visible, the rest sit in an "Advanced" accordion.
MAIN_KEYS = {
    "model.base",
    "dataset.dir",
    "dataset.resolution",
    "network.method", "network.preset",
    "train.max_steps", "train.batch_size", "train.learning_rate", "train.optimizer", "train.scheduler",
    "train.mixed_precision", "train.train_text_encoder", "train.seed",
    "sample.prompts", "sample.every_n_steps",
    "output.name", "output.save_dtype", "output.save_every_n_steps",
}
# Keys with a fixed set of values, and where the values come from.
CHOICES: dict[str, tuple[str, ...]] = {
    "model.arch": config_module.ARCHITECTURES,
    "model.prediction_type": config_module.PREDICTION_TYPES,
    "dataset.crop": config_module.CROPS,
    "dataset.missing_caption": config_module.MISSING_CAPTION,
    "dataset.latent_cache": config_module.LATENT_CACHE,
    "train.optimizer": config_module.OPTIMIZERS,
    "train.scheduler": config_module.SCHEDULERS,
    "train.mixed_precision": config_module.MIXED_PRECISION,
    "sample.sampler": config_module.SAMPLERS,
    "output.save_dtype": config_module.SAVE_DTYPES,
    "train.loss_type": config_module.LOSS_TYPES,
    "train.huber_schedule": config_module.HUBER_SCHEDULES,
    "train.half_precision_update": config_module.HALF_PRECISION_UPDATES,
    "output.file_layout": config_module.FILE_LAYOUTS,
    "train.compile_mode": config_module.COMPILE_MODES,
}
# SD3/Flux options whose empty value means "the family's default" (see trainer.config.DiTSection).
FAMILY_DEFAULT_CHOICES = {"dit.timestep_sampling", "dit.weighting_scheme", "dit.target"}
# A human label for every key (a key without one gets :func:`humanize`'s, which spells out abbreviations).
LABELS = {
    "model.base": "Base model (hub id, diffusers folder, or .safetensors/.ckpt file)",
    "model.arch": "Architecture",
    "model.prediction_type": "Prediction type",
    "model.vae": "Separate VAE (folder or file; empty = the base model's)",
    "model.vae_fp32": "Run the VAE in fp32",
    "model.tokenizer": "Tokenizer folder (for single-file checkpoints)",
    "dataset.dir": "Dataset folder",
    "dataset.resolution": "Training resolution (px)",
    "dataset.caption_extension": "Caption file extension",
    "dataset.missing_caption": "Image without a caption gets",
    "dataset.trigger_word": "Trigger word (put first in every caption)",
    "dataset.reg_dir": "Regularisation images folder",
    "dataset.reg_weight": "Regularisation loss weight",
    "dataset.enable_buckets": "Aspect-ratio buckets (no square crop)",
    "dataset.min_bucket_side": "Smallest bucket side (px)",
    "dataset.max_bucket_side": "Largest bucket side (px)",
    "dataset.bucket_step": "Bucket side step (px)",
    "dataset.crop": "Crop position",
    "dataset.flip": "Random horizontal flip",
    "dataset.shuffle_caption": "Shuffle caption tags",
    "dataset.keep_tokens": "Tags kept in place when shuffling",
    "dataset.caption_dropout": "Caption dropout (probability)",
    "dataset.max_pixels": "Largest image (pixels)",
    "dataset.latent_cache": "Latent cache",
    "dataset.cache_text_encoder_outputs": "Cache text-encoder outputs",
    "dataset.masked_loss": "Masked loss (alpha channel or _mask.png)",
    "dataset.validation_split": "Validation split (fraction held out)",
    "dataset.num_workers": "Data-loader worker processes",
    "network.method": "Method",
    "network.preset": "Target layers",
    "network.text_encoder_preset": "Text-encoder target layers",
    "network.include": "Include layers (regular expressions, one per line)",
    "network.exclude": "Exclude layers (regular expressions, one per line)",
    "network.init_from": "Start from an adapter file (in outputs/)",
    "train.max_steps": "Training steps",
    "train.epochs": "Epochs (0 = use training steps)",
    "train.batch_size": "Batch size",
    "train.gradient_accumulation": "Gradient accumulation steps",
    "train.learning_rate": "Learning rate",
    "train.unet_lr": "UNet learning rate (0 = learning rate)",
    "train.text_encoder_lr": "Text-encoder learning rate (0 = learning rate)",
    "train.text_encoder_2_lr": "Second text-encoder learning rate (SDXL; 0 = text-encoder rate)",
    "train.train_text_encoder": "Train the text encoder too",
    "train.optimizer": "Optimizer",
    "train.weight_decay": "Weight decay",
    "train.optimizer_args": "Optimizer arguments (TOML, one key = value per line)",
    "train.scheduler": "Learning-rate schedule",
    "train.warmup_steps": "Warm-up steps",
    "train.scheduler_cycles": "Restart cycles (cosine with restarts)",
    "train.scheduler_power": "Polynomial power",
    "train.mixed_precision": "Mixed precision",
    "train.gradient_checkpointing": "Gradient checkpointing (less memory, slower)",
    "train.compile": "Compile the training step (torch.compile; minutes to start, faster steps)",
    "train.compile_mode": "Compile mode (auto: per device)",
    "train.max_grad_norm": "Gradient clipping norm (0 = off)",
    "train.seed": "Seed",
    "train.clip_skip": "CLIP skip (1 = last layer)",
    "train.min_snr_gamma": "Min-SNR gamma (0 = off)",
    "train.noise_offset": "Noise offset",
    "train.ema_decay": "EMA of the weights: decay (0 = off)",
    "train.validation_every_n_steps": "Validation loss every N steps (0 = off)",
    "train.prior_every_n_steps": "Prior loss (forgetting) every N steps (0 = off)",
    "train.prior_prompts": "Prior prompts (empty = a few unrelated ones)",
    "train.prior_images": "Prior images generated by the base model",
    "train.prior_max_ratio": "Best checkpoint: highest prior loss ratio tolerated",
    "train.prior_stop_ratio": "Stop when the prior loss ratio passes (0 = off)",
    "train.output_preservation_weight": "Output preservation: weight (0 = off)",
    "train.preservation_class": "Output preservation: word in place of the trigger (empty = removed)",
    "train.embedding_lr": "Trigger vectors (pivotal tuning): learning rate (0 = off)",
    "train.embedding_word": "Trigger vectors: word (empty = the trigger word)",
    "train.sdpa": "Scaled-dot-product attention (PyTorch SDPA)",
    "train.fixed_noise": "Fixed noise per sample (debugging only)",
    "sample.every_n_steps": "Preview every N steps (0 = only at the end)",
    "sample.prompts": "Preview prompts (one per line)",
    "sample.negative_prompt": "Preview negative prompt",
    "sample.sampler": "Preview sampler",
    "sample.steps": "Preview denoising steps",
    "sample.guidance_scale": "Preview guidance scale (CFG)",
    "sample.seed": "Preview seed",
    "sample.width": "Preview width (0 = training resolution)",
    "sample.height": "Preview height (0 = training resolution)",
    "output.dir": "Output folder (in outputs/)",
    "output.name": "Output name",
    "output.save_every_n_steps": "Save every N steps (0 = only at the end)",
    "output.save_every_n_epochs": "Save every N epochs (0 = off)",
    "output.save_dtype": "Saved weights precision",
    "output.save_state": "Save resumable state with each save",
    "output.overwrite": "Overwrite an existing output file",
    "output.tensorboard": "TensorBoard logs",
    "output.title": "Title in the file's metadata (empty = output name)",
    "output.author": "Author in the file's metadata",
    "output.description": "Description in the file's metadata",
    # kohya/sd-scripts options
    "model.config": "Model config folder (for single files of non-standard size)",
    "dataset.caption_prefix": "Text put before every caption",
    "dataset.caption_suffix": "Text put after every caption",
    "dataset.caption_tag_dropout_rate": "Tag dropout (probability per tag)",
    "dataset.caption_dropout_every_n_epochs": "Drop all captions every N epochs (0 = off)",
    "dataset.max_token_length": "Longest caption (tokens: 75, 150 or 225)",
    "dataset.weighted_captions": "Weighted captions ((word:1.2) syntax)",
    "dataset.bucket_no_upscale": "Never upscale into a bucket",
    "dataset.color_aug": "Colour augmentation",
    "dataset.subsets": "Dataset subsets (TOML tables)",
    "network.dim_from_weights": "Take modules, ranks and alphas from the start file",
    "network.down_lr_weight": "Learning-rate weights of the down blocks",
    "network.mid_lr_weight": "Learning-rate weight of the middle block",
    "network.up_lr_weight": "Learning-rate weights of the up blocks",
    "network.block_lr_zero_threshold": "Blocks weighted at or below this get no adapter",
    "network.block_dims": "Rank per block",
    "network.block_alphas": "Alpha per block",
    "network.conv_block_dims": "Conv rank per block",
    "network.conv_block_alphas": "Conv alpha per block",
    "network.scale_weight_norms": "Max-norm regularisation (0 = off)",
    "network.base_weights": "Adapters merged into the base first (files)",
    "network.base_weights_multiplier": "Strengths of those merged adapters",
    "train.fp8_base": "Keep the frozen base in fp8 (CUDA)",
    "train.fp8_base_unet": "Keep only the denoiser in fp8 (CUDA)",
    "train.loss_type": "Loss (L2, L1, Huber, smooth L1)",
    "train.huber_schedule": "Huber schedule over timesteps",
    "train.huber_c": "Huber c",
    "train.huber_scale": "Huber scale",
    "train.debiased_estimation_loss": "Debiased estimation loss weighting",
    "train.scale_v_pred_loss_like_noise_pred": "Scale the v-prediction loss like ε-prediction",
    "train.v_pred_like_loss": "Weight of an added v-prediction-like loss (0 = off)",
    "train.min_timestep": "Smallest timestep trained",
    "train.max_timestep": "Largest timestep trained (exclusive; empty = all)",
    "train.zero_terminal_snr": "Zero terminal SNR (v-prediction)",
    "train.noise_offset_random_strength": "Random noise-offset strength",
    "train.adaptive_noise_scale": "Adaptive noise scale",
    "train.multires_noise_iterations": "Multi-resolution noise iterations (0 = off)",
    "train.multires_noise_discount": "Multi-resolution noise discount",
    "train.ip_noise_gamma": "Input-perturbation noise gamma (0 = off)",
    "train.ip_noise_gamma_random_strength": "Random input-perturbation strength",
    "train.full_fp16": "Adapters in fp16 too (full fp16)",
    "train.full_bf16": "Adapters in bf16 too (full bf16)",
    "train.half_precision_update": "How full fp16/bf16 apply an update",
    "output.save_last_n_steps": "Keep only saves of the last N steps (0 = keep all)",
    "output.save_last_n_epochs": "Keep only saves of the last N epochs (0 = keep all)",
    "output.wandb_project": "Weights & Biases project (empty = off)",
    "output.wandb_run_name": "Weights & Biases run name",
    "output.file_layout": "SD3/Flux file layout",
    "output.comment": "Comment in the file's metadata",
    # SD3/SD3.5 and FLUX.1 (flow matching)
    "dit.timestep_sampling": "Timestep sampling",
    "dit.logit_mean": "Logit-normal mean",
    "dit.logit_std": "Logit-normal spread",
    "dit.mode_scale": "Mode-sampling scale",
    "dit.sigmoid_scale": "Sigmoid sampling scale",
    "dit.shift": "Timestep shift",
    "dit.weighting_scheme": "Loss weighting over timesteps",
    "dit.target": "Training target",
    "dit.guidance_scale": "FLUX.1 dev guidance while training",
    "dit.t5_max_length": "T5 tokens per caption (0 = the model's)",
    "dit.train_t5": "Train T5 too",
}
# Method options, by option name (the same name means the same thing in every method).
OPTION_LABELS = {
    "rank": "Rank (dim)",
    "alpha": "Alpha (empty = rank)",
    "conv_rank": "Conv rank (k×k convs; empty = rank, 0 = none)",
    "conv_alpha": "Conv alpha (empty = alpha)",
    "dora": "DoRA (weight-decomposed)",
    "use_tucker": "Tucker decomposition for convs",
    "dropout": "Dropout",
    "rank_dropout": "Rank dropout",
    "module_dropout": "Module dropout",
    "factor": "Kronecker factor (-1 = balanced)",
    "decompose_both": "Decompose both Kronecker factors",
    "full_matrix": "Full second factor (ignores alpha)",
    "block_size": "Block size (empty = method default)",
    "block_count": "Block count (instead of block size)",
    "constraint": "Norm constraint (COFT; 0 = off)",
    "rescale": "Learn a per-channel gain",
    "include_conv": "Adapt k×k convs too",
    "boft_m": "Butterfly stages (empty = all)",
}
# Words a generated label spells out (for keys added later without an entry above).
ABBREVIATIONS = {"lr": "learning rate", "te": "text encoder", "te1": "text encoder 1", "te2": "text encoder 2",
                 "unet": "UNet", "vae": "VAE", "ema": "EMA", "sdpa": "SDPA attention", "snr": "SNR", "dir": "folder",
                 "num": "number of", "n": "N", "dtype": "precision", "reg": "regularisation", "fp8": "fp8",
                 "fp16": "fp16", "bf16": "bf16", "fp32": "fp32", "cfg": "CFG", "dim": "dim", "max": "maximum",
                 "min": "minimum", "lycoris": "LyCORIS", "kohya": "kohya", "tb": "TensorBoard", "wandb": "W&B",
                 "dit": "DiT", "t5": "T5", "clip": "CLIP", "ss": "ss", "ohem": "OHEM", "huber": "Huber"}
# The Advanced accordion's "Keep the model (forgetting)" group (trainer.prior), apart from their sections.
FORGETTING_KEYS = ("train.output_preservation_weight", "train.preservation_class", "train.embedding_lr",
                   "train.embedding_word", "dataset.reg_dir",
                   "train.prior_every_n_steps", "train.prior_stop_ratio", "train.prior_max_ratio",
                   "train.prior_images", "train.prior_prompts")
INFOS = {
    "train.prior_every_n_steps": "the prior loss ratio: the adapted model's denoising loss on images it should leave "
                                 "alone over the base model's (1.0 = unchanged); also at the start, each save and "
                                 "the end",
    "train.output_preservation_weight": "e.g. 1.0: each training image is also denoised without its trigger word "
                                        "and held to what the base model predicts there, so the concept stays "
                                        "with the trigger; steps take about twice as long",
    "train.preservation_class": "e.g. 'woman' for a person's name; empty: the trigger is just removed",
    "train.embedding_lr": "e.g. 0.05: the trigger word's own token vectors train too, so the word carries the "
                          "concept rather than every prompt; saved beside the adapter as <name>_emb.safetensors, "
                          "a textual inversion the adapter needs",
    "train.embedding_word": "the word whose vectors train; empty: the dataset's trigger word (or its folder word)",
    "train.prior_stop_ratio": "e.g. 1.2: once the ratio passes it, the run saves and stops (0 = never)",
    "train.prior_max_ratio": "the checkpoint pick: the lowest concept validation loss among the saves whose ratio is "
                             "at most this (else the lowest ratio)",
    "train.prior_images": "used without regularisation images: drawn once by the base model, cached in the output "
                          "folder",
    "train.prior_prompts": "one per line; prompts the adapter should not change (empty = six unrelated ones)",
    "dataset.reg_dir": "regularisation (prior-preservation) images, e.g. from the Dataset tab's *Regularisation "
                       "images*; the prior loss ratio is measured on them when set",
    "dataset.dir": "the training images, in the workspace's datasets/ (a name is enough) or a server --data-dir; "
                   "a sub-folder named N_name repeats its images N times per epoch",
    "output.dir": "where the adapter, previews, events.jsonl and resumable state are written: a folder in the "
                  "workspace's outputs/ (a name is enough)",
    "dataset.caption_extension": "caption files beside the images: .txt, .caption or .tags",
    "model.base": "a hub id (downloaded on first use), a diffusers folder, or a single .safetensors/.ckpt file",
    "dataset.subsets": "several image folders instead of the dataset folder, one [[subsets]] table each: "
                       "image_dir = \"…\", num_repeats = 10, is_reg, resolution, class_tokens, trigger_word, "
                       "caption_prefix/suffix, flip, color_aug, … (unset keys take the [dataset] value)",
    "model.config": "single files: a diffusers folder describing a non-standard size; an SD3/Flux transformer file "
                    "needs its base model's folder or hub id here (VAE, text encoders, tokenizers)",
    "output.file_layout": "SD3/Flux files: auto = diffusers layout for LoRA (loads in diffusers and ComfyUI), "
                          "lycoris layout for the other methods (ComfyUI, LyCORIS); kohya = sd-scripts' fused names "
                          "(LoRA only)",
}
# The familiar methods head the method menu; every other registered method follows (labels: each method's class).
FAMILIAR_METHODS = ("lora", "loha", "lokr", "oft", "boft")
PRESET_LABELS = {"attention": "attention (q/k/v/out)", "attention_mlp": "attention + MLP (kohya default)",
                 "full": "all linear + conv (LoCon style)"}
_NUMBER_KINDS = ("int", "float", "optional_int", "optional_float")


@dataclasses.dataclass(frozen=True)
class Field:
    key: str  # "train.max_steps" or "network.<method>.<option>"
    section: str
    name: str
    kind: str  # int, float, optional_int, optional_float, bool, str, text, choice, lines, table
    default: Any
    label: str
    info: str = ""
    choices: tuple[Any, ...] = ()
    main: bool = False
    method: str = ""  # for method options: the method they belong to

    def to_ui(self, value: Any) -> Any:
        if self.kind.startswith("optional"):  # a text box: Gradio's number box cannot be left empty
            return "" if value is None else str(value)
        if self.kind == "lines":
            return "\n".join(str(v) for v in value or [])
        if self.kind == "table" and isinstance(self.default, list):  # a list of tables: [[name]] blocks
            items = [dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for v in value or []]
            text = dump_toml({"t": {self.name: items}}) if items else ""
            return "\n".join(line.replace("[[t.", "[[") for line in text.splitlines()[1:]).strip()
        if self.kind == "table":
            return "\n".join(line for line in dump_toml({"t": value or {}}).splitlines()[1:] if line.strip())
        return value

    def from_ui(self, value: Any) -> Any:
        """The config value of a UI value; raises ConfigError naming the key for anything unusable."""
        if self.kind in _NUMBER_KINDS:
            if value is None or (isinstance(value, str) and not value.strip()):
                if self.kind.startswith("optional"):
                    return None
                raise ConfigError(f"{self.key}: give a number")
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise ConfigError(f"{self.key}: {value!r} is not a number") from None
            if self.kind.endswith("int"):
                if not number.is_integer():
                    raise ConfigError(f"{self.key} must be a whole number, got {value!r}")
                return int(number)
            return number
        if self.kind == "bool":
            return bool(value)
        if self.kind == "lines":
            return [line.strip() for line in str(value or "").splitlines() if line.strip()]
        if self.kind == "table":
            try:
                table = tomllib.loads(str(value or ""))
            except tomllib.TOMLDecodeError as error:
                raise ConfigError(f"{self.key}: not valid TOML key = value lines ({error})") from None
            if isinstance(self.default, list):
                unknown = sorted(set(table) - {self.name})
                if unknown:
                    raise ConfigError(f"{self.key}: write each entry as a [[{self.name}]] table of keys, not "
                                      f"{', '.join(unknown)}")
                return table.get(self.name, [])
            return table
        if self.kind == "str":
            return str(value or "").strip()
        if value is None:
            return self.default
        return value


# ----- the field list ----------------------------------------------------------------------------------------
def _comments(cls: type) -> dict[str, str]:
    """``name: type = default  # comment`` → {name: comment}, read from the dataclass source."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    found = {}
    for line in source.splitlines():
        match = re.match(r"\s+(\w+)\s*:[^#]*#\s*(.+)$", line)
        if match:
            found[match.group(1)] = match.group(2).strip()
    return found


def _kind(hint: Any, key: str) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(inner) == 1 and inner[0] in (int, float):
            return "optional_" + inner[0].__name__
        return "str"
    if origin is list:
        (item,) = typing.get_args(hint) or (str,)
        return "table" if dataclasses.is_dataclass(item) else "lines"  # a list of typed tables (dataset.subsets)
    if origin is dict:
        return "table"
    if key in CHOICES:
        return "choice"
    if hint is bool:
        return "bool"
    if hint is int:
        return "int"
    if hint is float:
        return "float"
    if key in ("sample.negative_prompt", "output.description"):
        return "text"
    return "str"


def _label(key: str, name: str, option: bool = False) -> str:
    return (OPTION_LABELS.get(name) if option else None) or LABELS.get(key) or humanize(name)


def humanize(name: str) -> str:
    """``max_grad_norm`` → "Maximum grad norm", ``unet_lr`` → "UNet learning rate": a label for a key without one."""
    words = [ABBREVIATIONS.get(word.lower(), word) for word in name.split("_") if word]
    text = " ".join(words)
    return text[:1].upper() + text[1:] if text else name


def _info(comment: str, default: Any) -> str:
    shown = "empty" if default in ("", None, [], {}) else repr(default) if isinstance(default, str) else default
    return f"{comment} (default {shown})" if comment else f"default {shown}"


@functools.cache
def config_fields() -> tuple[Field, ...]:
    """One field per TrainerConfig key, in section order (``network.options`` excluded: see method_fields)."""
    from methods.targets import PRESETS

    fields = []
    defaults = TrainerConfig()
    for section_field in dataclasses.fields(TrainerConfig):
        section = section_field.name
        section_class = type(getattr(defaults, section))
        hints = typing.get_type_hints(section_class)
        comments = _comments(section_class)
        for field in dataclasses.fields(section_class):
            if section == "network" and field.name == "options":
                continue
            key = f"{section}.{field.name}"
            default = getattr(getattr(defaults, section), field.name)
            kind, choices = _kind(hints[field.name], key), CHOICES.get(key, ())
            if key == "network.method":
                kind, choices = "choice", tuple((method_label(m), m) for m in ordered_methods())
            elif key == "network.preset":
                kind, choices = "choice", tuple((PRESET_LABELS.get(p, p), p) for p in PRESETS)
            elif key == "network.text_encoder_preset":
                kind = "choice"
                choices = (("same as the UNet", ""), ("none (UNet only)", "none"),
                           *((PRESET_LABELS.get(p, p), p) for p in PRESETS))
            elif key in FAMILY_DEFAULT_CHOICES:
                kind = "choice"
                choices = (("family default", ""), *((value, value) for value in dit_choices()[key]))
            info = INFOS.get(key) or _info(comments.get(field.name, ""), default)
            fields.append(Field(key, section, field.name, kind, default, _label(key, field.name), info,
                                tuple(choices), key in MAIN_KEYS))
    return tuple(fields)


def dit_choices() -> dict[str, tuple[str, ...]]:
    """The allowed values of the SD3/Flux choice keys (without the empty "family default")."""
    return {key: tuple(v for v in allowed if v) for key, _, allowed in TrainerConfig().dit.choices()}


@functools.cache
def method_fields() -> dict[str, tuple[Field, ...]]:
    """Each registered method's options, from its config dataclass."""
    from methods.registry import get_method

    result = {}
    for method in ordered_methods():
        config_class = get_method(method).config_class
        hints = typing.get_type_hints(config_class)
        comments = {}
        for klass in reversed(config_class.__mro__):
            if dataclasses.is_dataclass(klass):
                comments.update(_comments(klass))
        fields = []
        for field in dataclasses.fields(config_class):
            default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
            key = f"network.{method}.{field.name}"
            fields.append(Field(key, "network", field.name, _kind(hints[field.name], key), default,
                                _label(key, field.name, option=True), _info(comments.get(field.name, ""), default),
                                main=field.name in ("rank", "alpha", "factor", "block_size", "dora"), method=method))
        result[method] = tuple(fields)
    return result


def ordered_methods() -> list[str]:
    """Registered methods, the familiar ones first."""
    from methods.registry import available_methods

    methods = available_methods()
    return [m for m in FAMILIAR_METHODS if m in methods] + [m for m in methods if m not in FAMILIAR_METHODS]


def all_fields() -> tuple[Field, ...]:
    return config_fields() + tuple(f for fields in method_fields().values() for f in fields)


def method_label(method: str) -> str:
    from methods.registry import get_method

    return get_method(method).label or method


def method_description(method: str) -> str:
    from methods.registry import get_method

    return str(getattr(get_method(method), "description", "") or "")


def canonical_method(name: str) -> str:
    from methods.registry import get_method

    return get_method(name).method


# ----- conversions -------------------------------------------------------------------------------------------
def config_to_values(config: TrainerConfig) -> dict[str, Any]:
    """UI values (by field key) showing ``config``; other methods' options show their defaults."""
    values: dict[str, Any] = {}
    for field in config_fields():
        value = getattr(getattr(config, field.section), field.name)
        if field.key == "network.method":
            value = canonical_method(value)
        values[field.key] = field.to_ui(value)
    method = values["network.method"]
    for name, fields in method_fields().items():
        for field in fields:
            value = config.network.options.get(field.name, field.default) if name == method else field.default
            values[field.key] = field.to_ui(value)
    return values


def values_to_data(values: dict[str, Any]) -> dict[str, Any]:
    """The TOML-shaped dict of UI values (unchecked); only the selected method's options, None ones left out."""
    data: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
    for field in config_fields():
        if field.key in values:
            data[field.section][field.name] = field.from_ui(values[field.key])
    method = data["network"].get("method", "lora")
    try:
        method = canonical_method(method)
    except ConfigError:
        return data  # from_dict names the unknown method
    options = {}
    for field in method_fields().get(method, ()):
        if field.key in values:
            value = field.from_ui(values[field.key])
            if value is not None:
                options[field.name] = value
    data["network"]["options"] = options
    return data


def values_to_config(values: dict[str, Any]) -> TrainerConfig:
    """A validated config from UI values; raises ConfigError with the key and what is allowed."""
    return TrainerConfig.from_dict(values_to_data(values))


def toml_to_values(text: str) -> dict[str, Any]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"not valid TOML ({error})") from None
    return config_to_values(TrainerConfig.from_dict(data))


def cli_command(config_path: str) -> str:
    return f"python -m trainer train --config {_shell_quote(str(config_path))}"


def _shell_quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


# ----- effective values of empty fields ------------------------------------------------------------------------
def effective_values(values: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, what it means) for every field left empty or 0 whose value then comes from another field, for the
    selected method: "Alpha (empty = rank)" → "16 (the rank)". Unusable values are skipped (the form's own
    validation names them)."""
    from methods.registry import get_method

    def number(key: str) -> float | None:
        try:
            return _field(key).from_ui(values.get(key))
        except (ConfigError, KeyError):
            return None

    def shown(value: Any) -> str:
        return f"{value:g}" if isinstance(value, float) else str(value)

    found: list[tuple[str, str]] = []
    learning_rate = number("train.learning_rate")
    for key, fallback, why in (("train.unet_lr", learning_rate, "the learning rate"),
                               ("train.text_encoder_lr", learning_rate, "the learning rate")):
        if values.get(key) in (0, 0.0, "", None) and fallback is not None:
            found.append((_field(key).label, f"{shown(fallback)} ({why})"))
    resolution = number("dataset.resolution")
    for key in ("sample.width", "sample.height"):
        if values.get(key) in (0, "", None) and resolution:
            found.append((_field(key).label, f"{resolution} px (the training resolution)"))
    if not str(values.get("output.title") or "").strip():
        found.append((_field("output.title").label, f"“{values.get('output.name', '')}” (the output name)"))
    if not values.get("network.text_encoder_preset"):
        found.append((_field("network.text_encoder_preset").label,
                      f"{values.get('network.preset')} (the UNet's target layers)"))
    try:
        method = canonical_method(str(values.get("network.method") or "lora"))
        method_class = get_method(method)
    except ConfigError:
        return found
    options = {field.name: field for field in method_fields().get(method, ())}

    def option(name: str) -> Any:
        field = options.get(name)
        if field is None:
            return None
        try:
            return field.from_ui(values.get(field.key))
        except ConfigError:
            return "?"

    rank, alpha = option("rank"), option("alpha")
    if "alpha" in options and not alpha and rank not in (None, "?"):
        found.append((options["alpha"].label, f"{shown(rank)} (the rank: scale 1)"))
    if "conv_rank" in options and option("conv_rank") is None and rank not in (None, "?"):
        found.append((options["conv_rank"].label, f"{shown(rank)} (the rank)"))
    if "conv_alpha" in options and option("conv_alpha") is None:
        conv = option("conv_rank")
        found.append((options["conv_alpha"].label, f"{shown(alpha) if alpha else shown(conv or rank)} "
                                                   f"({'the alpha' if alpha else 'the conv rank: scale 1'})"))
    default_block = getattr(method_class.config_class, "default_block_size", None)
    if "block_size" in options and option("block_size") is None and option("block_count") is None and default_block:
        found.append((options["block_size"].label, f"{default_block} ({method_class.label or method}'s default)"))
    if "boft_m" in options and option("boft_m") is None:
        found.append((options["boft_m"].label, "log2(blocks) + 1 per layer (the most LyCORIS loads)"))
    return found


@functools.cache
def _field(key: str) -> Field:
    return next(field for field in all_fields() if field.key == key)
