"""SD3 / SD3.5 (MMDiT) and FLUX.1 bases as data: real-size configs, the variant each one is, and tiny pipelines.

Real sizes are the ``config.json`` files of the diffusers repositories (transformer, text encoders, VAE, scheduler)
and serve detection, single-file loading offline and module counts on the ``meta`` device; tiny sizes keep every
structural feature (joint blocks, SD3.5's dual attention and QK norm, Flux's single blocks and guidance embedder,
the pre-only last context block) with a few channels, for tests.

Which variant a transformer is follows its config, with the rules sd-scripts (``sd3_utils.analyze_state_dict_state``)
and diffusers (``infer_diffusers_model_type``) apply to checkpoints:

- Flux: ``guidance_embeds`` → FLUX.1 dev, otherwise schnell;
- SD3: ``dual_attention_layers`` (``x_block.attn2``) → SD3.5 medium; else ``qk_norm`` → SD3.5 large (38 layers);
  else SD3 medium. ``pos_embed_max_size`` 384 (3.5 medium) vs 192 tells the same apart in a checkpoint.

A transformer whose config differs from the real one in size (the tiny test models) is still classified by these
features; :attr:`Detection.exact` says whether every size matches.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from methods.dit_naming import dit_family, dit_variant

from .architectures import CLIP_L, OPENCLIP_BIGG, TINY_WORDS, _clip_config, _maybe_meta, write_tiny_tokenizer

FAMILIES = ("sd3", "flux")

# ----- real sizes -------------------------------------------------------------------------------------------------
_SD3_COMMON = {"sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "attention_head_dim": 64,
               "joint_attention_dim": 4096, "pooled_projection_dim": 2048}
SD3_MEDIUM = {**_SD3_COMMON, "num_layers": 24, "num_attention_heads": 24, "caption_projection_dim": 1536,
              "pos_embed_max_size": 192, "dual_attention_layers": (), "qk_norm": None}
SD35_MEDIUM = {**_SD3_COMMON, "num_layers": 24, "num_attention_heads": 24, "caption_projection_dim": 1536,
               "pos_embed_max_size": 384, "dual_attention_layers": tuple(range(13)), "qk_norm": "rms_norm"}
SD35_LARGE = {**_SD3_COMMON, "num_layers": 38, "num_attention_heads": 38, "caption_projection_dim": 2432,
              "pos_embed_max_size": 192, "dual_attention_layers": (), "qk_norm": "rms_norm"}
FLUX_DEV = {"patch_size": 1, "in_channels": 64, "out_channels": None, "num_layers": 19, "num_single_layers": 38,
            "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
            "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": (16, 56, 56)}
FLUX_SCHNELL = {**FLUX_DEV, "guidance_embeds": False}

# google/t5-v1_1-xxl, the encoder both families use (text_encoder_3 of SD3, text_encoder_2 of Flux).
T5_XXL = {"d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24, "vocab_size": 32128,
          "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32,
          "relative_attention_max_distance": 128, "layer_norm_epsilon": 1e-6, "is_encoder_decoder": False}
_VAE_16 = {"in_channels": 3, "out_channels": 3, "latent_channels": 16, "layers_per_block": 2, "sample_size": 1024,
           "block_out_channels": [128, 256, 512, 512], "norm_num_groups": 32,
           "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
           "use_quant_conv": False, "use_post_quant_conv": False}
SD3_VAE = {**_VAE_16, "scaling_factor": 1.5305, "shift_factor": 0.0609}
FLUX_VAE = {**_VAE_16, "scaling_factor": 0.3611, "shift_factor": 0.1159}
SD3_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0}
FLUX_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True,
                  "base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.15}


@dataclasses.dataclass(frozen=True)
class DiTVariant:
    """One released base: its configs and the names files and metadata give it."""

    name: str  # our id: sd3-medium, sd3.5-medium, sd3.5-large, flux-dev, flux-schnell
    family: str  # sd3 | flux
    title: str
    hub_id: str
    transformer: dict[str, Any]
    t5_max_length: int  # T5 tokens in training and previews (sd-scripts: 256 SD3 / schnell, 512 dev)
    guidance_scale: float | None  # Flux dev's embedded guidance; None where the transformer has no guidance input
    sample_steps: int  # preview defaults of the model card
    sample_cfg: float  # classifier-free guidance of previews (1.0: none, the distilled Flux models)
    resolution: int = 1024

    @property
    def ids(self):
        """The ids files and metadata give it (:mod:`methods.arch`: ss_base_model_version, modelspec.architecture
        without "/lora", as sd-scripts writes them)."""
        from methods.arch import get_architecture

        return get_architecture(self.family).variant(name=self.name)

    @property
    def modelspec_architecture(self) -> str:
        return self.ids.modelspec_id

    @property
    def base_model_version(self) -> str:
        return self.ids.kohya_version

    @property
    def vae(self) -> dict[str, Any]:
        return SD3_VAE if self.family == "sd3" else FLUX_VAE

    @property
    def scheduler(self) -> dict[str, Any]:
        return SD3_SCHEDULER if self.family == "sd3" else FLUX_SCHEDULER


VARIANTS: dict[str, DiTVariant] = {v.name: v for v in (
    DiTVariant("sd3-medium", "sd3", "Stable Diffusion 3 Medium", "stabilityai/stable-diffusion-3-medium-diffusers",
               SD3_MEDIUM, 256, None, 28, 7.0),
    DiTVariant("sd3.5-medium", "sd3", "Stable Diffusion 3.5 Medium", "stabilityai/stable-diffusion-3.5-medium",
               SD35_MEDIUM, 256, None, 40, 4.5),
    DiTVariant("sd3.5-large", "sd3", "Stable Diffusion 3.5 Large", "stabilityai/stable-diffusion-3.5-large",
               SD35_LARGE, 256, None, 28, 3.5),
    DiTVariant("flux-dev", "flux", "FLUX.1 dev", "black-forest-labs/FLUX.1-dev", FLUX_DEV, 512, 3.5, 28, 1.0),
    DiTVariant("flux-schnell", "flux", "FLUX.1 schnell", "black-forest-labs/FLUX.1-schnell", FLUX_SCHNELL, 256,
               None, 4, 1.0),
)}

# ----- tiny sizes (the recipe of dit-formats.md) --------------------------------------------------------------------
_TINY_SD3 = {"sample_size": 32, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 2,
             "attention_head_dim": 8, "num_attention_heads": 4, "caption_projection_dim": 32,
             "joint_attention_dim": 64, "pooled_projection_dim": 64, "pos_embed_max_size": 32,
             "dual_attention_layers": (), "qk_norm": None}
_TINY_FLUX = {"patch_size": 1, "in_channels": 64, "out_channels": None, "num_layers": 1, "num_single_layers": 1,
              "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 64,
              "pooled_projection_dim": 32, "guidance_embeds": True, "axes_dims_rope": (4, 4, 8)}
TINY_TRANSFORMER = {
    "sd3-medium": _TINY_SD3,
    "sd3.5-medium": {**_TINY_SD3, "dual_attention_layers": (0,), "qk_norm": "rms_norm"},
    "sd3.5-large": {**_TINY_SD3, "qk_norm": "rms_norm"},
    "flux-dev": _TINY_FLUX,
    "flux-schnell": {**_TINY_FLUX, "guidance_embeds": False},
}
TINY_CLIP = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2,
             "projection_dim": 32, "max_position_embeddings": 77, "hidden_act": "gelu"}
TINY_T5 = {"d_model": 64, "d_kv": 16, "d_ff": 64, "num_layers": 2, "num_heads": 4,
           "relative_attention_num_buckets": 8, "feed_forward_proj": "gated-gelu", "is_encoder_decoder": False}
TINY_VAE_16 = {**_VAE_16, "block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4,
               "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
               "sample_size": 32}
T5_SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in T5's SentencePiece vocabulary


# ----- detection ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Detection:
    variant: DiTVariant
    exact: bool  # every size of the config equals the released model's

    @property
    def description(self) -> str:
        return self.variant.title if self.exact else f"a {self.variant.title}-like transformer of non-standard size"


def transformer_of(model_or_pipe: Any) -> Any:
    transformer = getattr(model_or_pipe, "transformer", None)
    return model_or_pipe if transformer is None else transformer


def family_of(model_or_pipe: Any) -> str | None:
    """sd3 or flux (None for anything else), from the transformer's config."""
    return dit_family(transformer_of(model_or_pipe))


def detect(model_or_pipe: Any) -> Detection | None:
    """The variant of an SD3/SD3.5/Flux transformer or pipeline; None for anything else (a UNet, say)."""
    family = family_of(model_or_pipe)
    if family is None:
        return None
    transformer = transformer_of(model_or_pipe)
    config = dict(transformer.config)
    variant = VARIANTS[dit_variant(transformer)]
    return Detection(variant, _matches(config, variant.transformer))


def _matches(config: dict[str, Any], reference: dict[str, Any]) -> bool:
    def normal(value: Any) -> Any:
        return tuple(value) if isinstance(value, list | tuple) else value

    return all(normal(config.get(key)) == normal(value) for key, value in reference.items()
               if not (value is None and key == "out_channels"))


def detect_checkpoint(keys: dict[str, tuple[int, ...]]) -> DiTVariant | None:
    """The variant of an original-layout (sgm/BFL) single-file transformer from its key → shape map.

    Prefixes ``model.diffusion_model.`` are accepted. Rules of diffusers' ``infer_diffusers_model_type`` and
    sd-scripts' ``analyze_state_dict_state``.
    """
    shapes = {key.removeprefix("model.diffusion_model."): tuple(shape) for key, shape in keys.items()}
    if "double_blocks.0.img_attn.qkv.weight" in shapes:
        return VARIANTS["flux-dev" if "guidance_in.in_layer.weight" in shapes else "flux-schnell"]
    if "joint_blocks.0.context_block.attn.qkv.weight" in shapes:
        if any(".x_block.attn2." in key for key in shapes):
            return VARIANTS["sd3.5-medium"]
        if any(".attn.ln_k." in key for key in shapes):
            return VARIANTS["sd3.5-large"]
        return VARIANTS["sd3-medium"]
    return None


# ----- building -----------------------------------------------------------------------------------------------------
def build_transformer(name: str, tiny: bool = False, meta: bool = False):
    """The transformer of a variant, real size (use ``meta=True``: 2–12 billion parameters) or tiny."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    variant = VARIANTS[name]
    config = dict((TINY_TRANSFORMER if tiny else {k: v.transformer for k, v in VARIANTS.items()})[name])
    model_class = SD3Transformer2DModel if variant.family == "sd3" else FluxTransformer2DModel
    with _maybe_meta(meta):
        return model_class(**config)


def t5_config(spec: dict[str, Any], vocab_size: int | None = None):
    from transformers import T5Config

    values = dict(spec)
    if vocab_size is not None:
        values["vocab_size"] = vocab_size
    return T5Config(pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, **values)


def build_text_encoders(name: str, tiny: bool = False, meta: bool = False, clip_vocab: int | None = None,
                        t5_vocab: int | None = None) -> list[torch.nn.Module]:
    """The pipeline's text encoders in its order: SD3 [CLIP-L, CLIP-G, T5] (both CLIPs with projection), Flux
    [CLIP-L, T5]."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

    family = VARIANTS[name].family
    clip_specs = [TINY_CLIP] * (2 if family == "sd3" else 1) if tiny else (
        [CLIP_L, OPENCLIP_BIGG] if family == "sd3" else [CLIP_L])
    clip_class = CLIPTextModelWithProjection if family == "sd3" else CLIPTextModel
    with _maybe_meta(meta):
        encoders: list[torch.nn.Module] = [clip_class(_clip_config(spec, clip_vocab)).eval() for spec in clip_specs]
        encoders.append(T5EncoderModel(t5_config(TINY_T5 if tiny else T5_XXL, t5_vocab)).eval())
    return encoders


def write_tiny_t5_tokenizer(folder: Path, words: list[str] = TINY_WORDS):
    """A word-level T5-style tokenizer (ids: <pad> 0, </s> 1, <unk> 2, then the words; "</s>" appended).

    Saved and declared as ``PreTrainedTokenizerFast``: transformers 5's ``T5TokenizerFast`` expects a Unigram
    vocabulary and refuses to reload a word-level one.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(T5_SPECIAL_TOKENS)}
    for word in words:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                                        unk_token="<unk>", model_max_length=512)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(folder))
    return tokenizer


def build_tiny_pipeline(name: str, tokenizer_dir: Path, seed: int = 0):
    """A complete SD3 or Flux pipeline with tiny random weights, offline (``tokenizer_dir`` gets the tokenizer
    files on first use)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline
    from transformers import CLIPTokenizer, PreTrainedTokenizerFast

    variant = VARIANTS[name]
    clip_dir, t5_dir = tokenizer_dir / "clip", tokenizer_dir / "t5"
    if not (clip_dir / "vocab.json").is_file():
        write_tiny_tokenizer(clip_dir)
    if not (t5_dir / "tokenizer.json").is_file():
        write_tiny_t5_tokenizer(t5_dir)
    clip_tokenizer = CLIPTokenizer(str(clip_dir / "vocab.json"), str(clip_dir / "merges.txt"), model_max_length=77)
    t5_tokenizer = PreTrainedTokenizerFast.from_pretrained(str(t5_dir))
    torch.manual_seed(seed)
    encoders = build_text_encoders(name, tiny=True, clip_vocab=len(clip_tokenizer), t5_vocab=len(t5_tokenizer))
    transformer = build_transformer(name, tiny=True)
    vae = AutoencoderKL(**{**TINY_VAE_16, "scaling_factor": variant.vae["scaling_factor"],
                           "shift_factor": variant.vae["shift_factor"]})
    scheduler = FlowMatchEulerDiscreteScheduler(**variant.scheduler)
    if variant.family == "sd3":
        return StableDiffusion3Pipeline(
            transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=encoders[0], tokenizer=clip_tokenizer,
            text_encoder_2=encoders[1], tokenizer_2=clip_tokenizer, text_encoder_3=encoders[2],
            tokenizer_3=t5_tokenizer)
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=encoders[0], tokenizer=clip_tokenizer,
                        text_encoder_2=encoders[1], tokenizer_2=t5_tokenizer, transformer=transformer)


def write_transformer_config(folder: Path, name: str, config: dict[str, Any] | None = None) -> Path:
    """A config folder for ``<Transformer>.from_single_file(path, config=folder, subfolder="transformer")``, so an
    original-layout checkpoint loads without the hub: the variant's real config, or ``config`` for other sizes."""
    variant = VARIANTS[name]
    values = dict(config if config is not None else variant.transformer)
    values["_class_name"] = "SD3Transformer2DModel" if variant.family == "sd3" else "FluxTransformer2DModel"
    target = folder / "transformer"
    target.mkdir(parents=True, exist_ok=True)
    serialisable = {key: list(value) if isinstance(value, tuple) else value for key, value in values.items()}
    (target / "config.json").write_text(json.dumps(serialisable, indent=1))
    return folder


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
