"""Model configurations of SD1.x, SD2.x and SDXL, real size and tiny, built without any download.

Real sizes serve single-file loading offline (diffusers otherwise fetches configs from the hub) and tests that
count modules on the ``meta`` device; tiny sizes (same classes, a few channels) serve tests and benchmarks.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch

SD_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "sample_size": 512,
    "block_out_channels": [128, 256, 512, 512], "norm_num_groups": 32, "scaling_factor": 0.18215,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
}
SDXL_VAE = {**SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025}

_SD_BLOCKS = {
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
    "in_channels": 4, "out_channels": 4,
}
UNET = {
    "sd1": {**_SD_BLOCKS, "sample_size": 64, "cross_attention_dim": 768, "attention_head_dim": 8},
    "sd2": {**_SD_BLOCKS, "sample_size": 96, "cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20],
            "use_linear_projection": True, "upcast_attention": True},
    "sdxl": {
        "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "block_out_channels": [320, 640, 1280], "transformer_layers_per_block": [1, 2, 10],
        "attention_head_dim": [5, 10, 20], "cross_attention_dim": 2048, "use_linear_projection": True,
        "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,
    },
}
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
          "max_position_embeddings": 77, "hidden_act": "quick_gelu", "vocab_size": 49408, "projection_dim": 768}
OPENCLIP_H = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23, "num_attention_heads": 16,
              "max_position_embeddings": 77, "hidden_act": "gelu", "vocab_size": 49408, "projection_dim": 1024}
OPENCLIP_BIGG = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
                 "max_position_embeddings": 77, "hidden_act": "gelu", "vocab_size": 49408, "projection_dim": 1280}
TEXT_ENCODERS = {"sd1": [CLIP_L], "sd2": [OPENCLIP_H], "sdxl": [CLIP_L, OPENCLIP_BIGG]}

# Tiny variants keep every structural feature (block types, linear vs conv projection, SDXL add-embeddings,
# transformer depth > 1) so naming, targeting and loading follow the real code paths.
_TINY_UNET_COMMON = {"block_out_channels": [32, 64], "layers_per_block": 1, "norm_num_groups": 8,
                     "sample_size": 8, "in_channels": 4, "out_channels": 4}
TINY_UNET = {
    "sd1": {**_TINY_UNET_COMMON, "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "cross_attention_dim": 32,
            "attention_head_dim": 8},
    "sd2": {**_TINY_UNET_COMMON, "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "cross_attention_dim": 32,
            "attention_head_dim": [4, 8], "use_linear_projection": True},
    "sdxl": {**_TINY_UNET_COMMON, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "cross_attention_dim": 64,
             "transformer_layers_per_block": [1, 2], "attention_head_dim": [4, 8], "use_linear_projection": True,
             "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
             "projection_class_embeddings_input_dim": 8 * 6 + 32},
}
TINY_VAE = {**SD_VAE, "block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4,
            "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
            "sample_size": 32}
_TINY_CLIP = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "max_position_embeddings": 77, "hidden_act": "quick_gelu"}
TINY_TEXT_ENCODERS = {"sd1": [_TINY_CLIP], "sd2": [{**_TINY_CLIP, "hidden_act": "gelu"}],
                      "sdxl": [_TINY_CLIP, {**_TINY_CLIP, "projection_dim": 32, "hidden_act": "gelu"}]}

TINY_WORDS = ["a", "photo", "of", "red", "green", "blue", "circle", "square", "triangle", "on", "white", "black",
              "background", "small", "large", "person", "style", "painting", "zq", "sks", "portrait", ","]


def write_tiny_tokenizer(folder: Path, words: list[str] = TINY_WORDS) -> Path:
    """A CLIP BPE tokenizer over a small word list (whole words only), as vocab.json + merges.txt."""
    folder.mkdir(parents=True, exist_ok=True)
    special = ["<|startoftext|>", "<|endoftext|>"]
    letters = sorted({c for w in words for c in w})
    vocab: dict[str, int] = {}
    for token in letters + [c + "</w>" for c in letters]:
        vocab.setdefault(token, len(vocab))
    merges: list[str] = []
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append(f"{pieces[0]} {pieces[1]}")
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            vocab.setdefault(pieces[0], len(vocab))
    for token in special:
        vocab.setdefault(token, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    unique_merges = list(dict.fromkeys(merges))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(unique_merges) + "\n")
    return folder


def _clip_config(spec: dict[str, Any], vocab_size: int | None):
    from transformers import CLIPTextConfig

    values = dict(spec)
    if vocab_size is not None:
        values["vocab_size"] = vocab_size
    values.setdefault("projection_dim", values["hidden_size"])
    return CLIPTextConfig(bos_token_id=values["vocab_size"] - 2, eos_token_id=values["vocab_size"] - 1,
                          pad_token_id=values["vocab_size"] - 1, **values)


@contextlib.contextmanager
def _maybe_meta(meta: bool):
    if meta:
        with torch.device("meta"):
            yield
    else:
        yield


def build_unet(arch: str, tiny: bool = False, meta: bool = False):
    from diffusers import UNet2DConditionModel

    with _maybe_meta(meta):
        return UNet2DConditionModel(**(TINY_UNET if tiny else UNET)[arch])


def build_text_encoders(arch: str, tiny: bool = False, meta: bool = False, vocab_size: int | None = None):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    specs = (TINY_TEXT_ENCODERS if tiny else TEXT_ENCODERS)[arch]
    encoders = []
    with _maybe_meta(meta):
        for index, spec in enumerate(specs):
            config = _clip_config(spec, vocab_size)
            model_class = CLIPTextModelWithProjection if arch == "sdxl" and index == 1 else CLIPTextModel
            encoders.append(model_class(config).eval())
    return encoders


def build_tiny_pipeline(arch: str, tokenizer_dir: Path, seed: int = 0, prediction_type: str | None = None):
    """A complete diffusers pipeline of the given architecture with tiny random weights."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    torch.manual_seed(seed)
    tokenizer = CLIPTokenizer(str(tokenizer_dir / "vocab.json"), str(tokenizer_dir / "merges.txt"),
                              model_max_length=77)
    encoders = build_text_encoders(arch, tiny=True, vocab_size=len(tokenizer))
    unet = build_unet(arch, tiny=True)
    vae = AutoencoderKL(**TINY_VAE)
    if prediction_type is None:
        prediction_type = "v_prediction" if arch == "sd2" else "epsilon"
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       prediction_type=prediction_type, timestep_spacing="leading", steps_offset=1)
    if arch == "sdxl":
        return StableDiffusionXLPipeline(vae=vae, text_encoder=encoders[0], text_encoder_2=encoders[1],
                                         tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler)
    return StableDiffusionPipeline(vae=vae, text_encoder=encoders[0], tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
