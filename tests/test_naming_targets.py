"""Module naming (format spec §1) and target presets (§1.5) on real-size SD1.5 / SD2 / SDXL models.

The models are built on the meta device from trainer/architectures.py, so every count and name below is that of
the real checkpoints while costing no memory. SDXL names are checked against diffusers' own sgm→diffusers mapping
(``_maybe_map_sgm_blocks_to_diffusers``) for every Linear/Conv2d of the UNet.
"""

from __future__ import annotations

import re

import pytest
from torch import nn

from methods import ConfigError
from methods.naming import UNetNaming, flat, text_encoder_accepted_names, text_encoder_file_name
from methods.network import AdapterNetwork, model_parts
from methods.targets import TargetConfig

# Expected adapter counts per preset.
# SD1/SD2 UNet: 16 Transformer2DModels × (proj_in, proj_out, attn1 q/k/v/out, attn2 q/k/v/out, ff.net.0.proj,
#   ff.net.2) = 192; attention only: 16 × 8 = 128. "full" adds 22 resnets × (conv1, conv2, time_emb_proj) + 14
#   conv_shortcuts + 3 downsamplers + 3 upsamplers = 86 → 278.
# SDXL UNet: 70 transformer blocks × 10 + 11 Transformer2DModels × (proj_in, proj_out) = 722; attention 70 × 8 = 560;
#   "full" adds 17 resnets × 3 + 11 conv_shortcuts + 2 downsamplers + 2 upsamplers = 66 → 788.
# CLIP: 6 Linear per layer (q/k/v/out_proj, fc1, fc2), 4 in attention: CLIP-L 12 layers, OpenCLIP-H 23, bigG 32.
COUNTS = {
    ("sd1", "attention"): {"lora_unet": 128, "lora_te": 48},
    ("sd1", "attention_mlp"): {"lora_unet": 192, "lora_te": 72},
    ("sd1", "full"): {"lora_unet": 278, "lora_te": 72},
    ("sd2", "attention"): {"lora_unet": 128, "lora_te": 92},
    ("sd2", "attention_mlp"): {"lora_unet": 192, "lora_te": 138},
    ("sd2", "full"): {"lora_unet": 278, "lora_te": 138},
    ("sdxl", "attention"): {"lora_unet": 560, "lora_te1": 48, "lora_te2": 128},
    ("sdxl", "attention_mlp"): {"lora_unet": 722, "lora_te1": 72, "lora_te2": 192},
    ("sdxl", "full"): {"lora_unet": 788, "lora_te1": 72, "lora_te2": 192},
}

DIFFUSERS_BLOCK_TOKENS = ("down_blocks", "up_blocks", "mid_block")
SGM_BLOCK_TOKENS = ("input_blocks", "output_blocks", "middle_block")


def make_network(real_models, arch: str, preset: str = "attention_mlp", options: dict | None = None,
                 **target_options) -> AdapterNetwork:
    unet, encoders = real_models(arch)
    targets = TargetConfig(preset=preset, **target_options)
    return AdapterNetwork.create(model_parts(unet, encoders, arch), arch, "lora", options or {"rank": 4}, targets)


def module_paths(model: nn.Module) -> dict[int, str]:
    return {id(module): path for path, module in model.named_modules()}


# ----- counts ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("arch", "preset"), sorted(COUNTS), ids=[f"{a}-{p}" for a, p in sorted(COUNTS)])
def test_preset_counts(real_models, arch, preset):
    network = make_network(real_models, arch, preset)
    assert network.counts() == COUNTS[(arch, preset)]


def test_preset_aliases_and_text_encoder_preset(real_models):
    assert make_network(real_models, "sd1", "kohya").counts() == COUNTS[("sd1", "attention_mlp")]
    assert make_network(real_models, "sd1", "locon").counts() == COUNTS[("sd1", "full")]
    no_te = make_network(real_models, "sdxl", "attention_mlp", text_encoder_preset="none")
    assert no_te.counts() == {"lora_unet": 722}
    mixed = make_network(real_models, "sd1", "full", text_encoder_preset="attention")
    assert mixed.counts() == {"lora_unet": 278, "lora_te": 48}


def test_conv_rank_zero_drops_kxk_convs_only(real_models):
    """kohya's split: k×k convs follow conv_rank; 1×1 convs and Linear layers (time_emb_proj) follow rank."""
    network = make_network(real_models, "sd1", "full", {"rank": 4, "conv_rank": 0})
    # 278 minus the 3×3 convs: 22 × (conv1, conv2) + 3 downsamplers + 3 upsamplers = 50.
    assert network.counts() == {"lora_unet": 228, "lora_te": 72}
    kinds = {type(a.base).__name__ + str(tuple(getattr(a.base, "kernel_size", ()))) for a in network}
    assert kinds == {"Linear()", "Conv2d(1, 1)"}
    assert "lora_unet_down_blocks_0_resnets_0_time_emb_proj" in network.adapters
    assert "lora_unet_down_blocks_1_resnets_0_conv_shortcut" in network.adapters
    assert "lora_unet_down_blocks_0_attentions_0_proj_in" in network.adapters  # 1×1 conv in SD1


def test_full_preset_ranks_follow_kohya_split(real_models):
    network = make_network(real_models, "sd1", "full", {"rank": 8, "conv_rank": 4})
    assert network.adapters["lora_unet_down_blocks_0_resnets_0_conv1"].rank == 4
    assert network.adapters["lora_unet_down_blocks_1_resnets_0_conv_shortcut"].rank == 8
    assert network.adapters["lora_unet_down_blocks_0_resnets_0_time_emb_proj"].rank == 8


# ----- worked examples of spec §1.3 (SD1.5), SD2, §1.4 (SDXL) ------------------------------------------------------
# (file name, diffusers path, layer type, weight shape)
SD15_EXAMPLES = [
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
     "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", nn.Linear, (320, 320)),
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",
     "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", nn.Linear, (320, 768)),
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0",
     "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0", nn.Linear, (320, 320)),
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj",
     "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj", nn.Linear, (2560, 320)),
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2",
     "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2", nn.Linear, (320, 1280)),
    ("lora_unet_down_blocks_0_attentions_0_proj_in", "down_blocks.0.attentions.0.proj_in", nn.Conv2d,
     (320, 320, 1, 1)),
    ("lora_unet_down_blocks_0_resnets_0_conv1", "down_blocks.0.resnets.0.conv1", nn.Conv2d, (320, 320, 3, 3)),
    ("lora_unet_down_blocks_0_resnets_0_time_emb_proj", "down_blocks.0.resnets.0.time_emb_proj", nn.Linear,
     (320, 1280)),
    ("lora_unet_down_blocks_1_resnets_0_conv_shortcut", "down_blocks.1.resnets.0.conv_shortcut", nn.Conv2d,
     (640, 320, 1, 1)),
    ("lora_unet_down_blocks_0_downsamplers_0_conv", "down_blocks.0.downsamplers.0.conv", nn.Conv2d,
     (320, 320, 3, 3)),
    ("lora_unet_up_blocks_0_upsamplers_0_conv", "up_blocks.0.upsamplers.0.conv", nn.Conv2d, (1280, 1280, 3, 3)),
    ("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q",
     "mid_block.attentions.0.transformer_blocks.0.attn1.to_q", nn.Linear, (1280, 1280)),
    ("lora_unet_mid_block_resnets_0_conv1", "mid_block.resnets.0.conv1", nn.Conv2d, (1280, 1280, 3, 3)),
    ("lora_unet_mid_block_resnets_1_conv2", "mid_block.resnets.1.conv2", nn.Conv2d, (1280, 1280, 3, 3)),
    ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", "encoder.layers.0.self_attn.q_proj", nn.Linear,
     (768, 768)),
    ("lora_te_text_model_encoder_layers_0_mlp_fc1", "encoder.layers.0.mlp.fc1", nn.Linear, (3072, 768)),
]

# The sgm-style equivalents of spec §1.3 (A1111's convert_diffusers_name_to_compvis index arithmetic).
SD15_SGM = {
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": "input_blocks.1.1.transformer_blocks.0.attn1.to_q",
    "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj":
        "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj",
    "down_blocks.0.attentions.0.proj_in": "input_blocks.1.1.proj_in",
    "down_blocks.0.resnets.0.conv1": "input_blocks.1.0.in_layers.2",
    "down_blocks.0.resnets.0.time_emb_proj": "input_blocks.1.0.emb_layers.1",
    "down_blocks.1.resnets.0.conv_shortcut": "input_blocks.4.0.skip_connection",
    "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
    "up_blocks.0.upsamplers.0.conv": "output_blocks.2.1.conv",  # SD1 up_blocks.0 has no attention
    "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
    "mid_block.attentions.0.transformer_blocks.0.attn1.to_q": "middle_block.1.transformer_blocks.0.attn1.to_q",
    "mid_block.resnets.0.conv1": "middle_block.0.in_layers.2",
    "mid_block.resnets.1.conv2": "middle_block.2.out_layers.3",
    "up_blocks.3.resnets.2.conv2": "output_blocks.11.0.out_layers.3",
}

SD2_EXAMPLES = [
    ("lora_unet_down_blocks_0_attentions_0_proj_in", "down_blocks.0.attentions.0.proj_in", nn.Linear, (320, 320)),
    ("lora_unet_up_blocks_3_attentions_2_proj_out", "up_blocks.3.attentions.2.proj_out", nn.Linear, (320, 320)),
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",
     "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", nn.Linear, (320, 1024)),
    ("lora_unet_down_blocks_0_resnets_0_conv1", "down_blocks.0.resnets.0.conv1", nn.Conv2d, (320, 320, 3, 3)),
    ("lora_unet_up_blocks_2_upsamplers_0_conv", "up_blocks.2.upsamplers.0.conv", nn.Conv2d, (640, 640, 3, 3)),
    ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", "encoder.layers.0.self_attn.q_proj", nn.Linear,
     (1024, 1024)),
    ("lora_te_text_model_encoder_layers_22_mlp_fc1", "encoder.layers.22.mlp.fc1", nn.Linear, (4096, 1024)),
]

SDXL_EXAMPLES = [
    ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
     "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", nn.Linear, (640, 640)),
    ("lora_unet_input_blocks_4_1_proj_in", "down_blocks.1.attentions.0.proj_in", nn.Linear, (640, 640)),
    ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k",
     "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", nn.Linear, (640, 2048)),
    ("lora_unet_input_blocks_1_0_in_layers_2", "down_blocks.0.resnets.0.conv1", nn.Conv2d, (320, 320, 3, 3)),
    ("lora_unet_input_blocks_1_0_emb_layers_1", "down_blocks.0.resnets.0.time_emb_proj", nn.Linear, (320, 1280)),
    ("lora_unet_input_blocks_1_0_out_layers_3", "down_blocks.0.resnets.0.conv2", nn.Conv2d, (320, 320, 3, 3)),
    ("lora_unet_input_blocks_4_0_skip_connection", "down_blocks.1.resnets.0.conv_shortcut", nn.Conv2d,
     (640, 320, 1, 1)),
    ("lora_unet_input_blocks_3_0_op", "down_blocks.0.downsamplers.0.conv", nn.Conv2d, (320, 320, 3, 3)),
    ("lora_unet_input_blocks_6_0_op", "down_blocks.1.downsamplers.0.conv", nn.Conv2d, (640, 640, 3, 3)),
    ("lora_unet_input_blocks_8_1_transformer_blocks_9_ff_net_2",
     "down_blocks.2.attentions.1.transformer_blocks.9.ff.net.2", nn.Linear, (1280, 5120)),
    ("lora_unet_output_blocks_2_2_conv", "up_blocks.0.upsamplers.0.conv", nn.Conv2d, (1280, 1280, 3, 3)),
    ("lora_unet_output_blocks_5_2_conv", "up_blocks.1.upsamplers.0.conv", nn.Conv2d, (640, 640, 3, 3)),
    ("lora_unet_output_blocks_0_1_transformer_blocks_0_attn1_to_q",
     "up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", nn.Linear, (1280, 1280)),
    ("lora_unet_output_blocks_0_0_skip_connection", "up_blocks.0.resnets.0.conv_shortcut", nn.Conv2d,
     (1280, 2560, 1, 1)),
    ("lora_unet_output_blocks_8_0_out_layers_3", "up_blocks.2.resnets.2.conv2", nn.Conv2d, (320, 320, 3, 3)),
    ("lora_unet_middle_block_1_transformer_blocks_0_attn1_to_q",
     "mid_block.attentions.0.transformer_blocks.0.attn1.to_q", nn.Linear, (1280, 1280)),
    ("lora_unet_middle_block_1_proj_out", "mid_block.attentions.0.proj_out", nn.Linear, (1280, 1280)),
    ("lora_unet_middle_block_0_in_layers_2", "mid_block.resnets.0.conv1", nn.Conv2d, (1280, 1280, 3, 3)),
    ("lora_unet_middle_block_2_emb_layers_1", "mid_block.resnets.1.time_emb_proj", nn.Linear, (1280, 1280)),
    ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "encoder.layers.0.self_attn.q_proj", nn.Linear,
     (768, 768)),
    ("lora_te2_text_model_encoder_layers_31_mlp_fc1", "text_model.encoder.layers.31.mlp.fc1", nn.Linear,
     (5120, 1280)),
    ("lora_te2_text_model_encoder_layers_0_self_attn_out_proj", "text_model.encoder.layers.0.self_attn.out_proj",
     nn.Linear, (1280, 1280)),
]


def _check_examples(real_models, arch, examples):
    network = make_network(real_models, arch, "full")
    unet, encoders = real_models(arch)
    models = {"lora_unet": unet}
    if len(encoders) == 1:
        models["lora_te"] = encoders[0]
    else:
        models.update(lora_te1=encoders[0], lora_te2=encoders[1])
    for name, path, layer_type, shape in examples:
        assert name in network.adapters, f"{arch}: {name} not produced"
        adapter = network.adapters[name]
        prefix = next(p for p in ("lora_unet", "lora_te1", "lora_te2", "lora_te") if name.startswith(p + "_"))
        expected = models[prefix].get_submodule(path)
        assert adapter.base is expected, f"{name} wraps the wrong layer"
        assert isinstance(adapter.base, layer_type)
        assert tuple(adapter.base.weight.shape) == shape, f"{name}: {tuple(adapter.base.weight.shape)}"
    return network


def test_sd15_example_names(real_models):
    _check_examples(real_models, "sd1", SD15_EXAMPLES)
    down = make_network(real_models, "sd1", "full").adapters["lora_unet_down_blocks_0_downsamplers_0_conv"].base
    assert tuple(down.stride) == (2, 2)


def test_sd15_sgm_equivalents(real_models):
    unet, _ = real_models("sd1")
    naming = UNetNaming(unet, sgm_style=False)
    for path, sgm in SD15_SGM.items():
        assert naming.sgm_path(path) == sgm
        # SD1 files are written diffusers-style, but both spellings are read.
        assert naming.file_name(path) == flat("lora_unet", path)
        assert naming.accepted_names(path) == [flat("lora_unet", path), flat("lora_unet", sgm)]


def test_sd2_example_names(real_models):
    _check_examples(real_models, "sd2", SD2_EXAMPLES)


def test_sdxl_example_names(real_models):
    _check_examples(real_models, "sdxl", SDXL_EXAMPLES)


@pytest.mark.parametrize("arch", ["sd1", "sd2"])
def test_sd1_sd2_unet_names_are_diffusers_paths(real_models, arch):
    network = make_network(real_models, arch, "full")
    unet, encoders = real_models(arch)
    paths = module_paths(unet)
    te_paths = module_paths(encoders[0])
    for name, adapter in network.adapters.items():
        if name.startswith("lora_unet_"):
            assert name == flat("lora_unet", paths[id(adapter.base)])
            assert not any(token in name for token in SGM_BLOCK_TOKENS), name
        else:
            # transformers 5's CLIPTextModel has no text_model level; the file name still carries it.
            assert te_paths[id(adapter.base)].startswith("encoder.layers.")
            assert name.startswith("lora_te_text_model_encoder_layers_"), name


def test_sdxl_names_are_sgm_only(real_models):
    network = make_network(real_models, "sdxl", "full")
    for name in network.adapters:
        if name.startswith("lora_unet_"):
            assert not any(token in name for token in DIFFUSERS_BLOCK_TOKENS), f"mixed styles: {name}"
        else:
            assert re.match(r"lora_te[12]_text_model_encoder_layers_\d+_(self_attn|mlp)_", name), name


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("preset", ["attention", "attention_mlp", "full"])
def test_names_never_contain_dots(real_models, arch, preset):
    network = make_network(real_models, arch, preset)
    for name in network.adapters:
        assert "." not in name
        assert re.fullmatch(r"lora_(unet|te|te1|te2)_[A-Za-z0-9_]+", name), name


def test_exported_keys_split_on_first_dot(tiny_pipeline):
    from methods.apply import create_network

    pipe = tiny_pipeline("sdxl")
    network = create_network(pipe, "lora", {"rank": 2}, TargetConfig(preset="full"))
    state = network.export_state_dict()
    names = {key.partition(".")[0] for key in state}
    assert names == set(network.adapters)
    suffixes = {key.partition(".")[2] for key in state}
    assert suffixes == {"lora_down.weight", "lora_up.weight", "alpha"}


# ----- SDXL: our sgm names map back through diffusers' own conversion ----------------------------------------------
# diffusers renumbers the block structure (_maybe_map_sgm_blocks_to_diffusers); the block words, the resnet and
# downsampler internals and the top-level layers are renamed afterwards by _convert_unet_lora_key (spelled out here
# from spec §1.3's suffix table; the real diffusers load of an SDXL file is checked in test_apply.py).
_SGM_INNER_TO_DIFFUSERS = [
    (r"_in_layers_2$", "_conv1"),
    (r"_out_layers_3$", "_conv2"),
    (r"_emb_layers_1$", "_time_emb_proj"),
    (r"_skip_connection$", "_conv_shortcut"),
    (r"_downsamplers_0_op$", "_downsamplers_0_conv"),
    (r"^lora_unet_input_blocks_0_0$", "lora_unet_conv_in"),
    (r"^lora_unet_out_2$", "lora_unet_conv_out"),
    (r"^lora_unet_time_embed_0$", "lora_unet_time_embedding_linear_1"),
    (r"^lora_unet_time_embed_2$", "lora_unet_time_embedding_linear_2"),
    (r"^lora_unet_label_emb_0_0$", "lora_unet_add_embedding_linear_1"),
    (r"^lora_unet_label_emb_0_2$", "lora_unet_add_embedding_linear_2"),
    # _maybe_map_sgm_blocks_to_diffusers renumbers blocks but keeps the sgm block words.
    (r"^lora_unet_input_blocks_", "lora_unet_down_blocks_"),
    (r"^lora_unet_middle_block_", "lora_unet_mid_block_"),
    (r"^lora_unet_output_blocks_", "lora_unet_up_blocks_"),
]


def _diffusers_name(mapped: str) -> str:
    for pattern, replacement in _SGM_INNER_TO_DIFFUSERS:
        mapped = re.sub(pattern, replacement, mapped)
    return mapped


@pytest.mark.parametrize("size", ["real", "tiny"])
def test_sdxl_sgm_names_map_back_through_diffusers(real_models, size):
    from diffusers.loaders.lora_conversion_utils import _maybe_map_sgm_blocks_to_diffusers

    from trainer.architectures import build_unet

    unet = real_models("sdxl")[0] if size == "real" else build_unet("sdxl", tiny=True, meta=True)
    naming = UNetNaming(unet, sgm_style=True)
    layers = {path: m for path, m in unet.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)}
    assert len(layers) == (794 if size == "real" else len(layers))
    # The value carries the diffusers path through diffusers' renaming; one call for the whole UNet also proves
    # the names are not mixed (diffusers silently drops sgm keys when a file mixes both styles).
    state = {naming.file_name(path) + ".lora_down.weight": path for path in layers}
    assert len(state) == len(layers)
    mapped = _maybe_map_sgm_blocks_to_diffusers(dict(state), unet.config)
    assert len(mapped) == len(layers)
    by_flat_name = {flat("lora_unet", path): path for path in layers}
    for key, path in mapped.items():
        name = _diffusers_name(key.partition(".")[0])
        assert by_flat_name.get(name) == path, f"{naming.file_name(path)} → {key.partition('.')[0]} is not {path}"


def test_sdxl_network_names_map_back_to_their_layers(real_models):
    """The adapters of a full SDXL network: name → diffusers → the very layer the adapter wraps."""
    from diffusers.loaders.lora_conversion_utils import _maybe_map_sgm_blocks_to_diffusers

    network = make_network(real_models, "sdxl", "full")
    unet = real_models("sdxl")[0]
    state = {f"{name}.alpha": name for name in network.adapters if name.startswith("lora_unet_")}
    mapped = _maybe_map_sgm_blocks_to_diffusers(dict(state), unet.config)
    assert len(mapped) == 788
    layers = {flat("lora_unet", path): module for path, module in unet.named_modules()}
    for key, name in mapped.items():
        layer = layers.get(_diffusers_name(key.partition(".")[0]))
        assert layer is network.adapters[name].base, f"{name} → {key}"


def test_text_encoder_names_both_transformers_layouts():
    # transformers 5 CLIPTextModel: no text_model level; CLIPTextModelWithProjection: text_model + text_projection.
    assert (text_encoder_file_name("lora_te", "encoder.layers.3.mlp.fc2")
            == "lora_te_text_model_encoder_layers_3_mlp_fc2")
    assert (text_encoder_file_name("lora_te2", "text_model.encoder.layers.3.mlp.fc2")
            == "lora_te2_text_model_encoder_layers_3_mlp_fc2")
    # text_projection is a sibling of text_model, not a child.
    assert text_encoder_file_name("lora_te2", "text_projection") == "lora_te2_text_projection"
    accepted = text_encoder_accepted_names(("lora_te1", "lora_te"), "encoder.layers.0.self_attn.q_proj")
    assert accepted == [
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "lora_te1_encoder_layers_0_self_attn_q_proj",
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj", "lora_te_encoder_layers_0_self_attn_q_proj",
    ]


def test_text_encoder_targets_only_attention_and_mlp(real_models):
    network = make_network(real_models, "sdxl", "full")
    for name in network.adapters:
        if name.startswith("lora_te"):
            assert re.search(r"_(self_attn_(q|k|v|out)_proj|mlp_fc[12])$", name), name
    assert not any("embeddings" in n or "text_projection" in n or "final_layer_norm" in n for n in network.adapters)


def test_text_encoder_prefix_follows_position(real_models):
    unet, (clip_l, bigg) = real_models("sdxl")
    assert [p.prefix for p in model_parts(unet, [clip_l, bigg], "sdxl")] == ["lora_unet", "lora_te1", "lora_te2"]
    # CLIP-L absent (e.g. a pipeline loaded without it): bigG stays lora_te2, as in every SDXL file.
    assert [p.prefix for p in model_parts(None, [None, bigg], "sdxl")] == ["lora_te2"]
    sd1_unet, (sd1_te,) = real_models("sd1")
    assert [p.prefix for p in model_parts(sd1_unet, [sd1_te, None], "sd1")] == ["lora_unet", "lora_te"]
    network = AdapterNetwork.create(model_parts(None, [None, bigg], "sdxl"), "sdxl", "lora", {"rank": 2})
    assert network.counts() == {"lora_te2": 192}


# ----- include / exclude ----------------------------------------------------------------------------------------
def test_include_by_path_and_by_file_name(real_models):
    base = make_network(real_models, "sd1", "attention_mlp")
    network = make_network(real_models, "sd1", "attention_mlp", include=[r"time_emb_proj$", r"^lora_unet_conv_in$"])
    added = set(network.adapters) - set(base.adapters)
    assert "lora_unet_conv_in" in added
    assert sum(name.endswith("_time_emb_proj") for name in added) == 22
    assert len(added) == 23
    assert set(base.adapters) <= set(network.adapters)
    # Model order is kept: conv_in comes first.
    assert next(iter(network.adapters)) == "lora_unet_conv_in"


def test_include_with_sgm_file_name_on_sdxl(real_models):
    network = make_network(real_models, "sdxl", "attention", include=[r"^lora_unet_input_blocks_3_0_op$"])
    assert "lora_unet_input_blocks_3_0_op" in network.adapters
    assert network.counts()["lora_unet"] == 561


def test_exclude_by_path_and_by_file_name(real_models):
    network = make_network(real_models, "sd1", "attention_mlp", exclude=[r"\.attn2\.", r"^lora_te_"])
    # 16 transformers × 4 cross-attention projections removed; the whole text encoder removed by file name.
    assert network.counts() == {"lora_unet": 192 - 64}
    assert not any("attn2" in name for name in network.adapters)


def test_exclude_wins_over_include(real_models):
    network = make_network(real_models, "sd1", "attention", include=[r"resnets"], exclude=[r"conv_shortcut"])
    names = set(network.adapters)
    assert "lora_unet_down_blocks_0_resnets_0_conv1" in names
    assert not any(name.endswith("conv_shortcut") for name in names)


def test_text_encoder_preset_none_plus_include(real_models):
    network = make_network(real_models, "sd1", "attention", text_encoder_preset="none",
                           include=[r"encoder\.layers\.11\.mlp\.fc2"])
    assert network.counts() == {"lora_unet": 128, "lora_te": 1}
    assert "lora_te_text_model_encoder_layers_11_mlp_fc2" in network.adapters


# ----- configuration errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("options", "key"), [
    ({"preset": "everything"}, "network.preset"),
    ({"preset": "none"}, "network.preset"),
    ({"preset": ["attention"]}, "network.preset"),
    ({"text_encoder_preset": "bogus"}, "network.text_encoder_preset"),
    ({"include": ["(unclosed"]}, "network.include"),
    ({"exclude": ["[a-"]}, "network.exclude"),
    ({"include": "attn2"}, "network.include"),
    ({"exclude": [3]}, "network.exclude"),
])
def test_invalid_target_config_names_the_key(real_models, options, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        make_network(real_models, "sd1", **options)


def test_invalid_method_and_option(real_models):
    unet, encoders = real_models("sd1")
    parts = model_parts(unet, encoders, "sd1")
    with pytest.raises(ConfigError, match="unknown adapter method"):
        AdapterNetwork.create(parts, "sd1", "no-such-method", {})
    with pytest.raises(ConfigError, match="rnak"):
        AdapterNetwork.create(parts, "sd1", "lora", {"rnak": 4})
    with pytest.raises(ConfigError, match="network.rank"):
        AdapterNetwork.create(parts, "sd1", "lora", {"rank": 0})
    with pytest.raises(ConfigError, match="architecture"):
        model_parts(unet, encoders, "sd9")
    with pytest.raises(ConfigError, match="not the transformer of a sd3 model"):
        model_parts(unet, encoders, "sd3")
