"""SD3/Flux module names in the three file layouts (methods/dit_naming.py), checked against the consumers' code.

- Native (kohya) names: a full original-layout checkpoint built from a diffusers transformer with our names, fused
  slice order and swapped halves goes through diffusers' own single-file converters
  (``convert_sd3_transformer_checkpoint_to_diffusers`` on tiny SD3/SD3.5 with values,
  ``convert_flux_transformer_checkpoint_to_diffusers`` on the real-size Flux on the meta device: it hard-codes
  Flux's widths) and must come back as the same state dict.
- Fused kohya LoRAs: ours go through diffusers' ``_convert_kohya_flux_lora_to_diffusers`` at Flux's real widths
  and must give the per-module ΔW we started from; ours split sd-scripts-style (shared down) files exactly.
- diffusers layout: ``load_lora_weights`` of the tiny SD3 and Flux pipelines, fused, must equal W + ΔW on the
  transformer and the CLIP encoders (T5 keys, which it has no loader for, are left alone).
"""

from __future__ import annotations

import pytest
import torch
from dit_pipelines import (
    FLUX_VARIANTS,
    SD3_VARIANTS,
    VARIANT_NAMES,
    native_checkpoint,
    real_text_encoders,
    real_transformer,
    tiny_pipeline_factory,
)

from methods.dit_naming import (
    DiTNaming,
    LoRAFactors,
    TransformerNaming,
    export_lora,
    fuse_lora,
    import_lora,
    split_lora,
    to_kohya,
)
from methods.dit_targets import dit_text_encoder_targets, transformer_targets
from trainer.dit_architectures import build_transformer


@pytest.fixture(scope="module")
def make_pipeline(tmp_path_factory):
    return tiny_pipeline_factory(tmp_path_factory.mktemp("dit-tokenizers"))


# ----- native names against diffusers' checkpoint converters ------------------------------------------------------
@pytest.mark.parametrize("name", SD3_VARIANTS)
def test_sd3_native_names_round_trip_through_diffusers_converter(name):
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    torch.manual_seed(0)
    transformer = build_transformer(name, tiny=True)
    for parameter in transformer.parameters():  # distinct values everywhere, so any mix-up shows
        parameter.data.normal_()
    native = native_checkpoint(transformer)
    converted = convert_sd3_transformer_checkpoint_to_diffusers(dict(native))
    original = transformer.state_dict()
    assert set(converted) == set(original)
    for key, tensor in original.items():
        assert torch.equal(converted[key], tensor), key


@pytest.mark.parametrize("name", FLUX_VARIANTS)
def test_flux_native_names_round_trip_through_diffusers_converter(name):
    """Real size on the meta device: names and shapes (the converter splits linear1 at 3072/12288)."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    transformer = real_transformer(name)
    native = native_checkpoint(transformer)
    converted = convert_flux_transformer_checkpoint_to_diffusers(dict(native))
    original = transformer.state_dict()
    assert set(converted) == set(original)
    assert all(converted[key].shape == tensor.shape for key, tensor in original.items())


def test_flux_fused_slice_order_and_swap_match_comfyui_offsets():
    """ComfyUI's flux_to_diffusers: to_q/to_k/to_v at rows 0/h/2h of qkv and linear1, proj_mlp at 3h (4h rows);
    norm_out.linear through swap_scale_shift."""
    naming = TransformerNaming(real_transformer("flux-dev"))
    hidden = 3072
    linear1 = naming.groups["lora_unet_single_blocks_0_linear1"]
    assert linear1.members == tuple(f"single_transformer_blocks.0.{p}" for p in
                                    ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"))
    assert [linear1.rows(i) for i in range(4)] == [slice(0, hidden), slice(hidden, 2 * hidden),
                                                  slice(2 * hidden, 3 * hidden), slice(3 * hidden, 7 * hidden)]
    txt = naming.groups["lora_unet_double_blocks_3_txt_attn_qkv"]
    assert txt.members == tuple(f"transformer_blocks.3.attn.{p}" for p in ("add_q_proj", "add_k_proj", "add_v_proj"))
    assert naming.native["norm_out.linear"].swap_halves
    assert not naming.native["transformer_blocks.0.norm1.linear"].swap_halves


# ----- the names themselves ---------------------------------------------------------------------------------------
def test_kohya_names_are_those_of_sd_scripts():
    flux = TransformerNaming(real_transformer("flux-dev")).native_layers()
    for stream in ("img", "txt"):
        for layer in ("attn_qkv", "attn_proj", "mlp_0", "mlp_2", "mod_lin"):
            assert f"lora_unet_double_blocks_0_{stream}_{layer}" in flux
    for layer in ("linear1", "linear2", "modulation_lin"):
        assert f"lora_unet_single_blocks_37_{layer}" in flux
    assert {"lora_unet_img_in", "lora_unet_txt_in", "lora_unet_guidance_in_in_layer", "lora_unet_time_in_out_layer",
            "lora_unet_vector_in_in_layer", "lora_unet_final_layer_linear",
            "lora_unet_final_layer_adaLN_modulation_1"} <= set(flux)
    assert len(flux) == 19 * 10 + 38 * 3 + 10
    sd35 = TransformerNaming(real_transformer("sd3.5-medium")).native_layers()
    for stream in ("x_block", "context_block"):
        for layer in ("attn_qkv", "attn_proj", "mlp_fc1", "mlp_fc2", "adaLN_modulation_1"):
            assert f"lora_unet_joint_blocks_0_{stream}_{layer}" in sd35
    assert {"lora_unet_joint_blocks_12_x_block_attn2_qkv", "lora_unet_joint_blocks_12_x_block_attn2_proj"} <= set(sd35)
    assert "lora_unet_joint_blocks_13_x_block_attn2_qkv" not in sd35
    # the last context block is pre-only: qkv and modulation, no output projection or MLP
    assert "lora_unet_joint_blocks_23_context_block_attn_qkv" in sd35
    assert "lora_unet_joint_blocks_23_context_block_attn_proj" not in sd35
    assert "lora_unet_joint_blocks_23_context_block_mlp_fc1" not in sd35
    assert {"lora_unet_x_embedder_proj", "lora_unet_context_embedder", "lora_unet_t_embedder_mlp_0",
            "lora_unet_y_embedder_mlp_2", "lora_unet_final_layer_linear"} <= set(sd35)


@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_every_layer_has_one_name_per_spelling_and_back(name):
    transformer = real_transformer(name)
    naming = TransformerNaming(transformer)
    assert set(naming.native) == set(naming.modules)  # every Linear/Conv2d lives in the original model
    for path in naming.modules:
        assert naming.path_of(naming.file_name(path)) == path
        assert naming.path_of(f"lora_transformer_{path.replace('.', '_')}") == path
        assert naming.path_of(naming.peft_name(path)) == path
        native = naming.native[path]
        if native.slice_index is None and not native.swap_halves:
            assert naming.path_of(native.kohya_name) == path
        else:  # a fused or swapped layer's name needs tensors changed: never a plain rename
            assert naming.path_of(native.kohya_name) is None
    assert naming.file_name("transformer_blocks.0.attn.to_q") == "lycoris_transformer_blocks_0_attn_to_q"
    assert naming.path_of("transformer.no_such_module") is None


def test_text_encoder_names_of_both_families():
    clip_l, clip_g, t5 = real_text_encoders("sd3-medium")
    naming = DiTNaming(real_transformer("sd3-medium"), [clip_l, clip_g, t5])
    assert [part.prefix for part in naming.parts] == ["lycoris", "lora_te1", "lora_te2", "lora_te3"]
    te1, te2, te3 = naming.parts[1:]
    q = "text_model.encoder.layers.0.self_attn.q_proj"
    assert te1.file_name(q) == "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    assert te2.peft_name(q) == "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj"
    t5_q = "encoder.block.0.layer.0.SelfAttention.q"
    assert te3.file_name(t5_q) == "lora_te3_encoder_block_0_layer_0_SelfAttention_q"
    assert te3.peft_name(t5_q) == te3.file_name(t5_q)  # no diffusers loader: the kohya name in every layout
    assert naming.lookup("lora_te_text_model_encoder_layers_0_self_attn_q_proj") == (te1, q)
    flux_clip, flux_t5 = real_text_encoders("flux-dev")
    flux = DiTNaming(real_transformer("flux-dev"), [flux_clip, flux_t5])
    assert [part.prefix for part in flux.parts] == ["lycoris", "lora_te1", "lora_te3"]
    # transformers 5's CLIPTextModel has no text_model level; the file keeps it
    assert flux.parts[1].file_name("encoder.layers.0.mlp.fc1") == "lora_te1_text_model_encoder_layers_0_mlp_fc1"
    assert flux.lookup("lora_te1_encoder_layers_0_mlp_fc1")[1] == "encoder.layers.0.mlp.fc1"


# ----- LoRA on fused and swapped layers ---------------------------------------------------------------------------
def random_lora(out_features: int, in_features: int, rank: int, alpha: float, seed: int) -> LoRAFactors:
    generator = torch.Generator().manual_seed(seed)
    return LoRAFactors(torch.randn(rank, in_features, generator=generator),
                       torch.randn(out_features, rank, generator=generator), alpha)


@pytest.mark.parametrize("alphas", [(4.0, 4.0, 4.0), (4.0, 2.0, 1.0)], ids=["same-scale", "own-scales"])
def test_fuse_and_split_are_exact(alphas):
    rows = [6, 6, 10]
    parts = [random_lora(r, 8, 4, alpha, seed) for seed, (r, alpha) in enumerate(zip(rows, alphas))]
    parts[1] = None  # to_k without adapter
    fused = fuse_lora(parts, rows)
    expected = torch.cat([p.delta() if p is not None else torch.zeros(r, 8) for p, r in zip(parts, rows)])
    torch.testing.assert_close(fused.delta(), expected)
    assert fused.rank == 12  # a zero block of the common rank keeps the form diffusers detects as block-diagonal
    if alphas[0] == alphas[2]:
        assert fused.alpha == pytest.approx(parts[0].scale * 12)
    back = split_lora(fused, rows)
    assert back[1] is None
    for original, restored in zip(parts, back):
        if original is not None:
            assert restored.rank == 4
            torch.testing.assert_close(restored.delta(), original.delta())


def test_split_reads_shared_down_files():
    """sd-scripts without split_qkv: one down for q|k|v, ups stacked; every slice keeps the down."""
    rows = [6, 6, 6]
    fused = random_lora(18, 8, 4, 2.0, 0)
    parts = split_lora(fused, rows)
    assert all(part.rank == 4 for part in parts)
    torch.testing.assert_close(torch.cat([part.delta() for part in parts]), fused.delta())


def test_kohya_flux_lora_loads_in_diffusers_with_our_delta():
    """At Flux's real widths (diffusers' converter hard-codes 3072/12288), a handful of modules."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    naming = TransformerNaming(real_transformer("flux-dev"))
    chosen = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_v",
              "transformer_blocks.0.attn.add_k_proj", "transformer_blocks.0.norm1.linear",
              "single_transformer_blocks.5.attn.to_q", "single_transformer_blocks.5.proj_mlp",
              "single_transformer_blocks.5.proj_out", "norm_out.linear", "proj_out",
              "time_text_embed.guidance_embedder.linear_1"]
    loras = {}
    for seed, path in enumerate(chosen):
        out_features, in_features = naming.modules[path].weight.shape
        loras[path] = random_lora(out_features, in_features, 2, 1.0, seed)
    state = {}
    for name, lora in to_kohya(naming, loras).items():
        state.update({f"{name}.lora_down.weight": lora.down, f"{name}.lora_up.weight": lora.up,
                      f"{name}.alpha": torch.tensor(lora.alpha)})
    converted = _convert_kohya_flux_lora_to_diffusers(dict(state))
    probe = torch.Generator().manual_seed(99)
    seen = set()
    for key in converted:  # ΔW compared on random inputs: the real-size matrices are too large to form
        if key.endswith("lora_A.weight"):
            path = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
            down, up = converted[key], converted[key.replace("lora_A", "lora_B")]
            x = torch.randn(down.shape[1], 3, generator=probe)
            if path in loras:
                lora = loras[path]
                torch.testing.assert_close(up @ (down @ x), lora.scale * (lora.up @ (lora.down @ x)),
                                           rtol=1e-4, atol=1e-4)
                assert down.shape[0] == 2, path  # split back to rank 2: recognised as block-diagonal
                seen.add(path)
            else:  # the zero blocks of uncovered slices
                assert not (up @ (down @ x)).any(), path
    assert seen == set(loras)


# ----- diffusers layout in diffusers' loader ----------------------------------------------------------------------
def pipeline_loras(pipe, naming: DiTNaming, preset: str = "attention_mlp", rank: int = 2) -> dict[str, LoRAFactors]:
    loras = {}
    seed = 0
    for part in naming.parts:
        found = (transformer_targets(part.model, preset) if part.is_transformer
                 else dit_text_encoder_targets(part.model, preset))
        for path, module in found.items():
            out_features, in_features = module.weight.shape[0], module.weight[0].numel()
            lora = random_lora(out_features, in_features, rank, alpha=1.0, seed=seed)
            if module.weight.dim() == 4:
                lora.down = lora.down.reshape(rank, *module.weight.shape[1:])
                lora.up = lora.up[:, :, None, None]
            loras[part.file_name(path)] = LoRAFactors(lora.down * 0.1, lora.up * 0.1, 1.0)
            seed += 1
    return loras


@pytest.mark.parametrize("name", ["sd3.5-medium", "flux-dev"])
def test_diffusers_layout_loads_in_load_lora_weights(make_pipeline, name):
    pipe = make_pipeline(name)
    naming = DiTNaming.of_pipeline(pipe)
    loras = pipeline_loras(pipe, naming, preset="full")  # modulation, embedders and SD3's patch conv too
    before = {part.prefix: {k: v.clone() for k, v in part.model.state_dict().items()} for part in naming.parts}
    state = export_lora(naming, loras, "diffusers")
    assert not any(key.endswith(".alpha") for key in state)
    assert any(key.startswith("transformer.transformer_blocks.0.attn.to_q.") for key in state)
    pipe.load_lora_weights(state)
    pipe.fuse_lora(components=["transformer", "text_encoder"] + (["text_encoder_2"] if name.startswith("sd3") else []))
    pipe.unload_lora_weights()
    checked = 0
    for part in naming.parts:
        after = part.model.state_dict()
        for path, module in part.model.named_modules():
            if not isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
                continue
            lora = loras.get(part.file_name(path))
            expected = before[part.prefix][f"{path}.weight"]
            if lora is not None and part.prefix != "lora_te3":  # diffusers has no T5 loader
                expected = expected + lora.delta().reshape(expected.shape)
                checked += 1
            torch.testing.assert_close(after[f"{path}.weight"], expected, rtol=1e-4, atol=1e-5)
    assert checked == sum(1 for key in loras if not key.startswith("lora_te3"))


@pytest.mark.parametrize("layout", ["lycoris", "diffusers", "kohya"])
@pytest.mark.parametrize("name", ["sd3.5-medium", "flux-dev"])
def test_every_layout_reads_back_to_the_same_delta(make_pipeline, name, layout):
    pipe = make_pipeline(name)
    naming = DiTNaming.of_pipeline(pipe)
    loras = pipeline_loras(pipe, naming, preset="full")
    state = export_lora(naming, loras, layout)
    if layout == "kohya":
        assert "lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight" not in state
        fused = "lora_unet_double_blocks_0_img_attn_qkv" if name == "flux-dev" else \
            "lora_unet_joint_blocks_0_x_block_attn_qkv"
        assert state[f"{fused}.lora_up.weight"].shape[1] == 3 * 2
    back, unmatched = import_lora(naming, state)
    assert unmatched == []
    assert {key.split(".")[0] for key in back} == set(loras)
    for name_, lora in loras.items():
        restored = LoRAFactors(back[f"{name_}.lora_down.weight"], back[f"{name_}.lora_up.weight"],
                               float(back[f"{name_}.alpha"]))
        torch.testing.assert_close(restored.delta(), lora.delta(), rtol=1e-5, atol=1e-7)


def test_import_renames_other_methods_and_reports_strangers(make_pipeline):
    pipe = make_pipeline("flux-dev")
    naming = DiTNaming.of_pipeline(pipe)
    loha = {"lora_transformer_single_transformer_blocks_0_proj_mlp.hada_w1_a": torch.ones(2, 2),
            "lora_unet_double_blocks_0_img_mlp_0.hada_w1_b": torch.ones(2, 2),
            "lora_unet_double_blocks_0_img_attn_qkv.hada_w1_a": torch.ones(2, 2),  # LoHa on a fused layer
            "transformer.transformer_blocks.0.nope.lora_A.weight": torch.ones(2, 2),
            "lora_unet_input_blocks_1_0_emb_layers_1.alpha": torch.tensor(1.0)}
    back, unmatched = import_lora(naming, loha)
    assert set(back) == {"lycoris_single_transformer_blocks_0_proj_mlp.hada_w1_a",
                         "lycoris_transformer_blocks_0_ff_net_0_proj.hada_w1_b"}
    assert sorted(unmatched) == sorted(["lora_unet_double_blocks_0_img_attn_qkv.hada_w1_a",
                                        "transformer.transformer_blocks.0.nope.lora_A.weight",
                                        "lora_unet_input_blocks_1_0_emb_layers_1.alpha"])
    with pytest.raises(ValueError, match="layout"):
        export_lora(naming, {}, "a1111")


def test_peft_alphas_are_read():
    naming = DiTNaming(real_transformer("flux-dev"), [None, None])
    down, up = torch.ones(2, 3072), torch.ones(3072, 2)
    state = {"transformer.proj_out.lora_A.weight": down, "transformer.proj_out.lora_B.weight": up[:64],
             "transformer.proj_out.alpha": torch.tensor(8.0),
             "transformer.x_embedder.lora_A.weight": down[:, :64], "transformer.x_embedder.lora_B.weight": up}
    back, unmatched = import_lora(naming, state)
    assert unmatched == []
    assert float(back["lycoris_proj_out.alpha"]) == 8.0 and float(back["lycoris_x_embedder.alpha"]) == 2.0



@pytest.mark.parametrize("name", ["sd3.5-medium", "flux-dev"])
def test_lycoris_names_its_modules_as_we_do_and_reads_our_files(make_pipeline, name, monkeypatch):
    """LyCORIS (the library) on a diffusers transformer uses the prefix ``lycoris`` and the flattened path: it
    wraps exactly the modules our names stand for, and merges a lycoris-layout LoRA file of ours to W + ΔW."""
    from lycoris import LycorisNetwork, create_lycoris, create_lycoris_from_weights

    pipe = make_pipeline(name)
    transformer = pipe.transformer
    naming = DiTNaming(transformer, [])
    blocks = ["JointTransformerBlock"] if name.startswith("sd3") else ["FluxTransformerBlock",
                                                                       "FluxSingleTransformerBlock"]
    monkeypatch.setattr(LycorisNetwork, "TARGET_REPLACE_MODULE", blocks)  # class state: restored after the test
    wrapped = create_lycoris(transformer, 1.0, linear_dim=2, linear_alpha=1, algo="lora")
    theirs = {lora.lora_name for lora in wrapped.loras}
    ours = {naming.transformer.file_name(path) for path in transformer_targets(transformer, "full")
            if path.startswith(("transformer_blocks.", "single_transformer_blocks."))}
    # but for the text query of SD3's pre-only last block, which no gradient reaches (methods/dit_targets.py)
    dead = {"lycoris_transformer_blocks_1_attn_add_q_proj"} if name.startswith("sd3") else set()
    assert theirs == ours | dead
    loras = pipeline_loras(pipe, naming, preset="full")
    before = {k: v.clone() for k, v in transformer.state_dict().items()}
    network, _ = create_lycoris_from_weights(1.0, "", transformer, weights_sd=export_lora(naming, loras, "lycoris"))
    assert len(network.loras) == len(loras)
    network.merge_to(1.0)
    for file_name, lora in loras.items():
        path = naming.transformer.path_of(file_name)
        expected = before[f"{path}.weight"] + lora.delta().reshape(before[f"{path}.weight"].shape)
        torch.testing.assert_close(transformer.state_dict()[f"{path}.weight"], expected, rtol=1e-4, atol=1e-5)
