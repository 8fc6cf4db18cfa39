"""Target presets on real-size SD3/SD3.5/Flux transformers and their text encoders (meta device).

Counts by hand from the architectures:

- Flux (19 double blocks, 38 single blocks): attention 19 × 8 (to_q/k/v, to_out.0, add_q/k/v_proj, to_add_out)
  + 38 × 3 (to_q/k/v) = 266; attention_mlp adds 19 × 4 (ff, ff_context: 2 each) + 38 × 2 (proj_mlp, proj_out)
  = 418; full adds 19 × 2 + 38 × 1 modulation layers and the 10 embedder/final layers (dev: x_embedder,
  context_embedder, timestep ×2, guidance ×2, pooled text ×2, norm_out.linear, proj_out) = 504; schnell has no
  guidance embedder: 502.
- SD3 (n joint blocks, the last one's context stream pre-only: no to_add_out, no ff_context, and its add_q_proj
  gets no gradient, so it is left out): attention 8(n − 1) + 6, attention_mlp + 4(n − 1) + 2, full + 2n modulation
  + 8 embedder/final (pos_embed.proj, context embedder, timestep ×2, pooled text ×2, norm_out.linear, proj_out).
  SD3 Medium n = 24: 190 / 284 / 340; SD3.5 Large n = 38: 302 / 452 / 536; SD3.5 Medium adds attn2 (4 layers) in 13
  blocks: 242 / 336 / 392.
- T5-XXL (24 blocks): attention 24 × 4 (q/k/v/o) = 96, attention_mlp 24 × 7 (+ wi_0, wi_1, wo) = 168.
  CLIP-L 12 layers 48 / 72, CLIP-G 32 layers 128 / 192 (as SDXL's).
"""

from __future__ import annotations

import pytest
from dit_pipelines import VARIANT_NAMES, real_text_encoders, real_transformer

from methods.dit_targets import dit_text_encoder_targets, is_t5, transformer_targets

PRESETS = ("attention", "attention_mlp", "full")
COUNTS = {
    "sd3-medium": (190, 284, 340),
    "sd3.5-medium": (242, 336, 392),
    "sd3.5-large": (302, 452, 536),
    "flux-dev": (266, 418, 504),
    "flux-schnell": (266, 418, 502),
}
TEXT_ENCODER_COUNTS = {"sd3-medium": [(48, 72), (128, 192), (96, 168)], "flux-dev": [(48, 72), (96, 168)]}


@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_transformer_preset_counts(name):
    transformer = real_transformer(name)
    assert tuple(len(transformer_targets(transformer, preset)) for preset in PRESETS) == COUNTS[name]


def test_flux_dev_attention_by_hand():
    transformer = real_transformer("flux-dev")
    chosen = transformer_targets(transformer, "attention")
    assert sum(path.startswith("transformer_blocks.") for path in chosen) == 19 * 8
    assert sum(path.startswith("single_transformer_blocks.") for path in chosen) == 38 * 3
    assert {path.split(".", 2)[2] for path in chosen if path.startswith("single_transformer_blocks.")} == {
        "attn.to_q", "attn.to_k", "attn.to_v"}


@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_presets_nest_and_keep_their_kinds(name):
    transformer = real_transformer(name)
    attention, attention_mlp, full = (set(transformer_targets(transformer, preset)) for preset in PRESETS)
    assert attention < attention_mlp < full
    assert not any(".norm" in path for path in attention_mlp)  # modulation only in full
    assert all(path.startswith(("transformer_blocks.", "single_transformer_blocks.")) for path in attention_mlp)
    outside = {path for path in full if not path.startswith(("transformer_blocks.", "single_transformer_blocks."))}
    assert {"proj_out", "norm_out.linear", "context_embedder"} <= outside
    assert transformer_targets(transformer, "attn") == transformer_targets(transformer, "attention")  # aliases


def test_sd3_last_block_is_pre_only_and_sd35_medium_has_attn2():
    last = {path for path in transformer_targets(real_transformer("sd3-medium"), "attention_mlp")
            if path.startswith("transformer_blocks.23.")}
    assert "transformer_blocks.23.attn.add_k_proj" in last and "transformer_blocks.22.attn.add_q_proj" in \
        transformer_targets(real_transformer("sd3-medium"), "attention")
    assert not any("to_add_out" in path or "ff_context" in path or "add_q_proj" in path for path in last)
    attn2 = {path for path in transformer_targets(real_transformer("sd3.5-medium"), "attention") if ".attn2." in path}
    assert len(attn2) == 13 * 4 and "transformer_blocks.12.attn2.to_out.0" in attn2


@pytest.mark.parametrize("name", sorted(TEXT_ENCODER_COUNTS))
def test_text_encoder_counts(name):
    encoders = real_text_encoders(name)
    counts = [(len(dit_text_encoder_targets(e, "attention")), len(dit_text_encoder_targets(e, "full")))
              for e in encoders]
    assert counts == TEXT_ENCODER_COUNTS[name]
    assert [is_t5(e) for e in encoders] == [False] * (len(encoders) - 1) + [True]
    t5 = dit_text_encoder_targets(encoders[-1], "attention_mlp")
    assert "encoder.block.0.layer.1.DenseReluDense.wi_0" in t5
    assert not any("relative_attention_bias" in path for path in t5)
