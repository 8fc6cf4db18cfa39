"""SD3/SD3.5 and FLUX.1 end to end on tiny pipelines (tests/dit_pipelines.py): every method trains, its file is read
by the consumers and by us, merged weights agree with theirs; the objective, the options, previews, fp8 and the
module counts of the networks training builds on real-size models (meta device).

Consumers' formulas: LoRA files (diffusers layout) go through diffusers' own ``load_lora_weights`` + ``fuse_lora``;
every method's file in the lycoris layout (the one ComfyUI reads, mapping ``lycoris_<path>`` onto its native
weights) through LyCORIS's ``create_lycoris_from_weights`` + ``merge_to``, LyCORIS being the reference ComfyUI's
patch math follows. Both must give the weights our ``bake_adapters`` gives, and ``apply_adapter`` the same output.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from dit_pipelines import tiny_pipeline_factory
from train_helpers import make_config, of_kind, run, write_images

from methods.apply import apply_adapter, load_network, save_network
from methods.base import ConfigError
from methods.files import load_adapter_file
from methods.network import AdapterNetwork, model_parts
from methods.registry import available_methods, get_method
from methods.tools import bake_adapters, inspect_adapter
from trainer.conditioning import Conditioning
from trainer.config import TrainerConfig
from trainer.dit_architectures import VARIANTS
from trainer.dit_conditioning import predict

BASES = {"sd3": "sd3.5-medium", "flux": "flux-dev"}  # the variants with every structural feature of the family
METHODS = tuple(available_methods())
# Every method at its example options, and DoRA (an option of LoRA, LoHa and LoKr) on LoRA.
TRAINED = {**{method: (method, get_method(method).example_options) for method in METHODS},
           "dora": ("lora", {**get_method("lora").example_options, "dora": True})}
SIZE = 32  # pixels: 16×16 latents with the tiny two-block VAE


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """The tiny pipelines saved as diffusers folders, a factory for fresh copies, and a small data folder."""
    root = tmp_path_factory.mktemp("dit-bases")
    make = tiny_pipeline_factory(root / "tokenizers")
    folders = {}
    for family, name in BASES.items():
        folders[family] = root / name
        make(name).save_pretrained(folders[family])
    write_images(root / "data", 2, size=(SIZE, SIZE), caption="a photo of zq")
    return {"folders": folders, "make": make, "data": root / "data"}


def dit_config(bases, family: str, out: Path, **sections) -> TrainerConfig:
    """Two steps at 32 px on every kind of layer (preset full: modulation, embedders, SD3's patch conv) and every
    text encoder (T5 included, 16 tokens)."""
    defaults = {"dataset": {"resolution": SIZE}, "network": {"preset": "full"},
                "dit": {"t5_max_length": 16, "train_t5": True}, "output": {"save_state": False}}
    for section, values in sections.items():
        defaults[section] = {**defaults.get(section, {}), **values}
    return make_config(bases["folders"][family], bases["data"], out, **defaults)


def transformer_output(pipe, family: str, seed: int = 0) -> torch.Tensor:
    config = pipe.transformer.config
    generator = torch.Generator().manual_seed(seed)
    width = config.joint_attention_dim
    pooled = config.pooled_projection_dim
    latents = torch.randn(1, 16, 8, 8, generator=generator)
    conditioning = Conditioning(torch.randn(1, 6, width, generator=generator),
                                torch.randn(1, pooled, generator=generator))
    with torch.no_grad():
        return predict(pipe.transformer, family, latents, torch.tensor([0.6]), conditioning, guidance=1.0)


def text_encoder_parts(pipe) -> dict[str, torch.nn.Module]:
    return {name: getattr(pipe, name) for name in ("text_encoder", "text_encoder_2", "text_encoder_3")
            if getattr(pipe, name, None) is not None}


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def assert_weights_close(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor],
                         before: dict[str, torch.Tensor], what: str) -> int:
    """Same weights everywhere; returns how many differ from ``before`` (the adapted ones)."""
    changed = 0
    for key, value in ours.items():
        torch.testing.assert_close(value, theirs[key], rtol=1e-4, atol=1e-6, msg=lambda m, k=key: f"{what} {k}: {m}")
        changed += not torch.equal(value, before[key])
    return changed


# ==================================================================================================== every method
@pytest.mark.parametrize("label", [label if label == "lora" else pytest.param(label, marks=pytest.mark.slow)
                                   for label in TRAINED])  # ~1.5 s each: LoRA in the quick suite
@pytest.mark.parametrize("family", sorted(BASES))
def test_every_method_trains_and_its_file_loads_where_consumers_read_it(bases, family, label, tmp_path):
    from lycoris import create_lycoris_from_weights

    method, options = TRAINED[label]
    config = dit_config(bases, family, tmp_path / "out", network={"method": method, **options})
    result, events = run(config)
    assert len(result.losses) == 2 and all(math.isfinite(loss) for loss in result.losses)
    (save,) = of_kind(events, "save")
    assert save["check_ok"], save
    tensors, metadata = load_adapter_file(result.output_file)
    variant = VARIANTS[BASES[family]]
    assert metadata["modelspec.architecture"] == f"{variant.modelspec_architecture}/lora"
    assert metadata["ss_base_model_version"] == variant.base_model_version
    plain_lora = label == "lora"  # DoRA's dora_scale has no diffusers form: the lycoris layout
    names = {key.partition(".")[0] for key in tensors}
    if plain_lora:  # the diffusers layout: PEFT keys, alpha folded into the factors
        assert "transformer" in names and not any(key.endswith(".alpha") for key in tensors
                                                  if key.startswith("transformer."))
    else:
        assert any(name.startswith("lycoris_transformer_blocks_") for name in names)
        assert not any(key.startswith("transformer.") for key in tensors)
    assert any(name.startswith("lora_te3_") for name in names)  # T5, asked for

    # ours: apply (hooks) and bake (merged weights) on fresh pipelines
    make = bases["make"]
    applied, baked = make(BASES[family]), make(BASES[family])
    before_transformer = weights(applied.transformer)
    base_output = transformer_output(applied, family)
    handle = apply_adapter(applied, result.output_file)
    hooked = transformer_output(applied, family)
    assert (hooked - base_output).abs().max() > 1e-6
    bake_adapters(baked, [(result.output_file, 1.0)])
    torch.testing.assert_close(transformer_output(baked, family), hooked, rtol=1e-4, atol=1e-5)
    handle.remove()
    torch.testing.assert_close(transformer_output(applied, family), base_output)

    # theirs: LyCORIS on the lycoris layout, for every method (transformer; its CLIP names lack transformers 5's
    # missing text_model level, as on SD). Its forward path, which consumers follow: its merge path squares the
    # LoHa/LoKr scale (format spec §2.9).
    theirs = make(BASES[family])
    network, _ = load_network(theirs, result.output_file)
    lycoris_file = {key: value for key, value in network.export_state_dict(layout="lycoris").items()
                    if key.startswith("lycoris_")}
    lyco, _ = create_lycoris_from_weights(1.0, "", theirs.transformer, weights_sd=lycoris_file)
    assert len(lyco.loras) == network.counts()["lycoris"]
    lyco.apply_to()
    layers = dict(baked.transformer.named_modules())
    generator = torch.Generator().manual_seed(3)
    for module in lyco.loras:
        layer = layers[network.naming.lookup(module.lora_name)[1]]
        x = (torch.randn(2, layer.in_features, generator=generator) if isinstance(layer, torch.nn.Linear)
             else torch.randn(1, layer.in_channels, 6, 6, generator=generator))
        with torch.no_grad():
            expected, got = module(x), layer(x)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5, msg=lambda m, n=module.lora_name: f"{n}: {m}")
    torch.testing.assert_close(transformer_output(theirs, family), hooked, rtol=1e-4, atol=1e-5)
    changed = sum(not torch.equal(value, before_transformer[key]) for key, value in weights(baked.transformer).items())
    assert changed == network.counts()["lycoris"]  # every adapter learned (none sits where no gradient reaches)

    if plain_lora:  # diffusers' loader on the file itself: transformer and CLIP encoders (no T5 loader)
        consumer = make(BASES[family])
        before_encoders = {name: weights(model) for name, model in text_encoder_parts(consumer).items()}
        consumer.load_lora_weights(str(result.output_file))
        clip = [name for name in text_encoder_parts(consumer) if name != ("text_encoder_3" if family == "sd3"
                                                                         else "text_encoder_2")]
        consumer.fuse_lora(components=["transformer", *clip])
        consumer.unload_lora_weights()
        assert_weights_close(weights(baked.transformer), weights(consumer.transformer), before_transformer,
                             "diffusers transformer")
        for name in clip:
            adapted = assert_weights_close(weights(getattr(baked, name)), weights(getattr(consumer, name)),
                                           before_encoders[name], f"diffusers {name}")
            assert adapted > 0


# ==================================================================================================== file layouts
@pytest.mark.parametrize("family", sorted(BASES))
def test_file_layouts_round_trip_and_refuse_what_they_cannot_hold(bases, family, tmp_path, randomize):
    pipe = bases["make"](BASES[family])
    cases = {"lora": ("auto", "diffusers", "kohya", "lycoris"), "loha": ("auto", "lycoris"),
             "lora+dora": ("auto", "lycoris")}
    for label, layouts in cases.items():
        method, dora = label.partition("+")[0], label.endswith("dora")
        options = {"rank": 2, "dora": True} if dora else {"rank": 2}
        network = AdapterNetwork.create(*_parts(pipe, family), method, options)
        randomize(network)
        expected = network.merged_deltas()
        for layout in layouts:
            path = save_network(network, tmp_path / f"{label}-{layout}.safetensors", dtype="fp32", layout=layout)
            keys = set(load_adapter_file(path)[0])
            report = inspect_adapter(path)
            written = {"auto": "diffusers" if label == "lora" else "lycoris"}.get(layout, layout)
            assert report["layout"] == written and report["architecture"] == family, (label, layout)
            if written == "kohya":  # q/k/v (and Flux's MLP input) fused into one native layer each
                assert any(key.startswith(("lora_unet_double_blocks_", "lora_unet_joint_blocks_")) for key in keys)
                assert report["modules"] < len(network)
            else:
                assert report["modules"] == len(network)
            loaded, _ = load_network(pipe, path, require_all=True)
            assert loaded.method == method
            for name, delta in loaded.merged_deltas().items():
                torch.testing.assert_close(delta, expected[name], rtol=1e-5, atol=1e-6)
        for layout in {"diffusers", "kohya"} - set(layouts):  # no exact form: refused, naming the fix
            with pytest.raises(ConfigError, match="lycoris"):
                network.export_state_dict(layout=layout)


def _parts(pipe, family):
    from methods.network import pipeline_parts

    return pipeline_parts(pipe)[0], family


# ==================================================================================================== objective
def test_flow_matching_objective_draws_by_key_and_weighs_per_sample():
    from trainer.flow_matching import FlowMatchingConfig, loss_weights
    from trainer.objective import FlowMatchingObjective

    latents = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    keys = [("train", 1, 0, 0, 0), ("train", 1, 0, 0, 1)]
    velocity = FlowMatchingObjective(FlowMatchingConfig(timestep_sampling="flux_shift", target="velocity"))
    first, again = velocity.noised(latents, keys), velocity.noised(latents, keys)
    assert torch.equal(first.model_input, again.model_input) and torch.equal(first.timesteps, again.timesteps)
    swapped = velocity.noised(latents.flip(0), keys[::-1])  # a sample's draw follows its key, not its position
    assert torch.equal(swapped.timesteps, first.timesteps.flip(0))
    sigma = first.timesteps.view(-1, 1, 1, 1)
    noise = (first.model_input - (1 - sigma) * latents) / sigma
    torch.testing.assert_close(first.target, noise - latents, rtol=1e-4, atol=1e-4)
    perfect = velocity.loss(first.target, first, None, torch.ones(2))
    assert float(perfect) == 0.0
    # x0 target = the velocity loss weighted by σ², and sigma_sqrt weights cancel it (SD3 paper)
    prediction = torch.randn_like(latents)
    x0 = FlowMatchingObjective(FlowMatchingConfig(target="x0", weighting_scheme="sigma_sqrt"))
    noised = x0.noised(latents, keys)
    sigmas = noised.timesteps
    v_target = (noised.model_input - latents) / sigmas.view(-1, 1, 1, 1)
    expected = (((prediction - v_target) ** 2).mean(dim=(1, 2, 3)) * sigmas ** 2 * loss_weights(sigmas, "sigma_sqrt"))
    torch.testing.assert_close(x0.loss(prediction, noised, None, torch.ones(2)), expected.mean(), rtol=1e-4, atol=1e-6)
    weighted = x0.loss(prediction, noised, None, torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(weighted, expected[0] / 2, rtol=1e-4, atol=1e-6)


# ==================================================================================================== options
def test_dit_options_are_checked_and_refused_where_they_do_nothing(bases, tmp_path, models_sd1):
    from trainer.backbone import load_models

    cpu = torch.device("cpu")
    for sections, message in (
        ({"train": {"min_snr_gamma": 5.0}}, "train.min_snr_gamma"),
        ({"train": {"noise_offset": 0.1}}, "train.noise_offset"),
        ({"train": {"sdpa": False}}, "train.sdpa"),
        ({"train": {"loss_type": "huber"}}, "train.loss_type"),  # sd-scripts' options of the SD/SDXL objective
        ({"train": {"zero_terminal_snr": True}}, "train.zero_terminal_snr"),
        ({"dataset": {"max_token_length": 150}}, "dataset.max_token_length"),
        ({"sample": {"prompts": ["zq"], "sampler": "euler_a"}}, "sample.sampler"),
        ({"sample": {"prompts": ["zq"], "sampler": "euler", "negative_prompt": "blur"}}, "negative"),
        ({"train": {"fp8_base": True}}, "fp8_base = false"),
        ({"dataset": {"min_bucket_side": 10}}, "multiples of 4"),  # the tiny VAE halves; 2×2 patches
    ):
        config = dit_config(bases, "flux", tmp_path / "out", **sections)
        with pytest.raises(ConfigError, match=message):
            load_models(config, cpu)
    from trainer.models import ModelLoadError

    with pytest.raises(ModelLoadError, match="flow matching and has no prediction type"):
        load_models(dit_config(bases, "sd3", tmp_path / "out", model={"prediction_type": "v_prediction"}), cpu)
    with pytest.raises(ConfigError, match="dit.train_t5"):
        dit_config(bases, "flux", tmp_path / "out", train={"train_text_encoder": False})
    with pytest.raises(ConfigError, match="dit.timestep_sampling"):
        dit_config(bases, "flux", tmp_path / "out", dit={"timestep_sampling": "karras"})
    with pytest.raises(ConfigError, match="output.file_layout"):
        dit_config(bases, "flux", tmp_path / "out", output={"file_layout": "a1111"})
    sd1 = make_config(models_sd1, bases["data"], tmp_path / "sd", dit={"shift": 2.0},
                      output={"file_layout": "diffusers"})
    with pytest.raises(ConfigError, match="dit.shift, output.file_layout apply to SD3"):
        load_models(sd1, cpu)
    models = load_models(dit_config(bases, "sd3", tmp_path / "ok", dit={"t5_max_length": 0, "shift": 2.0}), cpu)
    assert (models.family, models.variant, models.t5_max_length, models.guidance) == ("sd3", "sd3.5-medium", 256, None)
    assert models.objective.config.shift == 2.0 and models.objective.config.target == "x0"
    assert models.text_cache_id("base") == "base|t5=256"
    flux = load_models(dit_config(bases, "flux", tmp_path / "ok2", dit={"guidance_scale": 2.5}), cpu)
    assert (flux.t5_max_length, flux.guidance, flux.objective.config.timestep_sampling) == (16, 2.5, "flux_shift")
    assert flux.metadata()["ss_guidance_scale"] == 2.5


@pytest.fixture(scope="module")
def models_sd1(tmp_path_factory, tokenizer_dir):
    from trainer.architectures import build_tiny_pipeline

    folder = tmp_path_factory.mktemp("sd1") / "sd1"
    build_tiny_pipeline("sd1", tokenizer_dir).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("family", sorted(BASES))
def test_trainer_defaults_train_clip_only_cache_text_and_resume_exactly(bases, family, tmp_path):
    """The defaults (attention_mlp, CLIP adapters on, T5 off): the first run's losses come back exactly when the
    run is resumed from its step-1 state; the frozen-encoder run (with gradient checkpointing on the transformer)
    caches text embeddings per T5 length."""
    common = {"dataset": {"resolution": SIZE}, "dit": {"t5_max_length": 16}, "train": {"max_steps": 3}}
    straight = make_config(bases["folders"][family], bases["data"], tmp_path / "straight", **common,
                           output={"save_every_n_steps": 1})
    reference, events = run(straight)
    (ready,) = of_kind(events, "ready")
    assert set(ready["modules"]) == {"lycoris", "lora_te1"} | ({"lora_te2"} if family == "sd3" else set())
    assert not ready["text_embeddings_cached"]
    assert of_kind(events, "warning")  # the cache cannot be used while CLIP is trained: said once
    resumed_config = straight.with_overrides([f"output.dir='{tmp_path / 'resumed'}'", "output.save_every_n_steps=0"])
    resumed, _ = run(resumed_config, resume=tmp_path / "straight" / "adapter-step000001-state")
    assert max(abs(a - b) for a, b in zip(resumed.losses, reference.losses)) <= 1e-6
    frozen = make_config(bases["folders"][family], bases["data"], tmp_path / "frozen",
                         **{**common, "train": {"max_steps": 2, "train_text_encoder": False,
                                                "gradient_checkpointing": True}})
    result, events = run(frozen)
    (ready,) = of_kind(events, "ready")
    assert ready["text_embeddings_cached"] and set(ready["modules"]) == {"lycoris"}
    assert not of_kind(events, "warning") and all(math.isfinite(loss) for loss in result.losses)


def test_init_from_reads_a_dit_file_and_refuses_another_scale(bases, tmp_path, randomize):
    """network.init_from with an SD3/Flux file: the diffusers layout (alpha folded, read back with alpha = rank)
    starts a network of alpha = rank from the file's ΔW; another alpha is refused rather than rescaling ΔW."""
    from methods.apply import create_network

    pipe = bases["make"](BASES["flux"])
    network = create_network(pipe, "lora", {"rank": 4}, TrainerConfig().target_config())
    randomize(network)
    path = save_network(network, tmp_path / "start.safetensors", dtype="fp32")
    network.detach()
    same = dit_config(bases, "flux", tmp_path / "same", network={"preset": "attention_mlp", "rank": 4,
                                                                 "init_from": str(path)},
                      dit={"train_t5": False}, train={"max_steps": 1, "learning_rate": 1e-12})
    result, _ = run(same)
    assert math.isfinite(result.losses[0])
    other = same.with_overrides([f"output.dir='{tmp_path / 'other'}'", "network.alpha=2.0"])
    with pytest.raises(ConfigError, match="another scale"):
        run(other)


# ==================================================================================================== previews
@pytest.mark.parametrize("family", sorted(BASES))
def test_previews_use_the_pipelines_flow_sampler(bases, family):
    from trainer.sampling import render_previews

    pipe = bases["make"](BASES[family])
    options = {"sampler": "euler", "steps": 2, "width": SIZE, "height": SIZE, "max_sequence_length": 16,
               "guidance_scale": 3.0}
    first = render_previews(pipe, ["a photo of zq", "zq"], **options)
    again = render_previews(pipe, ["a photo of zq"], **options)
    assert [image.size for image in first] == [(SIZE, SIZE)] * 2
    assert list(first[0].getdata()) == list(again[0].getdata())
    with pytest.raises(ValueError, match="flow-matching Euler"):
        render_previews(pipe, ["zq"], **{**options, "sampler": "euler_a"})


def test_decode_adds_the_vae_shift(bases):
    """SD3/Flux VAEs normalise latents as (x − shift)·scale: decoding must undo the shift as well."""
    from trainer.flow_matching import normalize_latents
    from trainer.sampling import decode_latents

    pipe = bases["make"](BASES["flux"])
    raw = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = pipe.image_processor.postprocess(pipe.vae.decode(raw).sample, output_type="pil")[0]
    got = decode_latents(pipe, normalize_latents(raw, pipe.vae.config))[0]
    assert list(got.getdata()) == list(expected.getdata())


# ==================================================================================================== fp8
@pytest.mark.parametrize("family", sorted(BASES))
def test_fp8_base_keeps_every_method_trainable(bases, family):
    """The mechanism of train.fp8_base on the CPU (the option itself is refused there): float8 storage, outputs of
    the upcast weights, every method's adapters fp32 and learning, the weights still fp8 after each call."""
    from methods.apply import create_network
    from trainer.backbone import FP8, cast_weights_to_fp8

    pipe = bases["make"](BASES[family])
    transformer = pipe.transformer
    layers = (torch.nn.Linear, torch.nn.Conv2d)
    rounded = {name: layer.weight.detach().to(FP8).float() for name, layer in transformer.named_modules()
               if isinstance(layer, layers)}
    assert cast_weights_to_fp8(transformer, torch.float32) == len(rounded)
    reference = bases["make"](BASES[family])
    with torch.no_grad():
        for name, layer in reference.transformer.named_modules():
            if name in rounded:
                layer.weight.copy_(rounded[name])
    torch.testing.assert_close(transformer_output(pipe, family), transformer_output(reference, family))
    config = pipe.transformer.config
    for method in METHODS:
        network = create_network(pipe, method, get_method(method).example_options)
        assert all(p.dtype == torch.float32 for p in network.parameters())
        network.train()
        latents = torch.randn(1, 16, 8, 8)
        conditioning = Conditioning(torch.randn(1, 6, config.joint_attention_dim),
                                    torch.randn(1, config.pooled_projection_dim))
        loss = predict(transformer, family, latents, torch.tensor([0.5]), conditioning, guidance=1.0).square().mean()
        loss.backward()
        grads = [p.grad for p in network.parameters() if p.requires_grad]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), method
        assert all(layer.weight.dtype == FP8 for layer in transformer.modules() if isinstance(layer, layers))
        network.detach()


# ==================================================================================================== module counts
# What training builds with the default [network] (attention_mlp, CLIP adapters on, T5 off) and with T5 and the
# full preset, on the real-size models (meta device): transformer counts by hand in tests/test_dit_targets.py.
NETWORK_COUNTS = {
    "sd3-medium": ({"lycoris": 284, "lora_te1": 72, "lora_te2": 192},
                   {"lycoris": 340, "lora_te1": 72, "lora_te2": 192, "lora_te3": 168}),
    "sd3.5-medium": ({"lycoris": 336, "lora_te1": 72, "lora_te2": 192},
                     {"lycoris": 392, "lora_te1": 72, "lora_te2": 192, "lora_te3": 168}),
    "sd3.5-large": ({"lycoris": 452, "lora_te1": 72, "lora_te2": 192},
                    {"lycoris": 536, "lora_te1": 72, "lora_te2": 192, "lora_te3": 168}),
    "flux-dev": ({"lycoris": 418, "lora_te1": 72}, {"lycoris": 504, "lora_te1": 72, "lora_te3": 168}),
    "flux-schnell": ({"lycoris": 418, "lora_te1": 72}, {"lycoris": 502, "lora_te1": 72, "lora_te3": 168}),
}


@pytest.mark.parametrize("name", sorted(NETWORK_COUNTS))
def test_training_networks_on_real_size_models(name):
    from dit_pipelines import real_text_encoders, real_transformer

    parts = model_parts(real_transformer(name), list(real_text_encoders(name)), VARIANTS[name].family)
    default, full = TrainerConfig(), TrainerConfig.from_dict({"network": {"preset": "full"}, "dit": {"train_t5": True}})
    counts = []
    for config in (default, full):
        network = AdapterNetwork.create(parts, VARIANTS[name].family, "lora", {"rank": 4}, config.target_config())
        counts.append(network.counts())
        assert network.variant == name
    assert tuple(counts) == NETWORK_COUNTS[name]
    assert dataclasses.asdict(default.dit)["train_t5"] is False


# ==================================================================================================== UI
def test_ui_detects_estimates_and_offers_the_dit_options(bases):
    from methods.apply import create_network
    from trainer.models import load_pipeline
    from ui import form, pipelines

    pipe, info = load_pipeline(bases["folders"]["flux"])
    assert pipelines.describe(info) == "a FLUX.1 dev-like transformer of non-standard size (flow matching, " \
                                       "diffusers folder)"
    config = TrainerConfig.from_dict({"network": {"method": "loha", "rank": 2}})
    estimate = pipelines.estimate(config, pipe=pipe)
    network = create_network(pipe, "loha", {"rank": 2}, config.target_config())
    assert (estimate.parameters, estimate.modules) == (network.trainable_parameter_count(), network.counts())
    frozen = sum(p.numel() for model in (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2, pipe.vae)
                 for p in model.parameters())
    assert estimate.vram.weights == frozen * 4  # fp32 everything (mixed_precision "no")
    assert "transformer " in estimate.text() and "GPU memory" in estimate.text()
    halved = pipelines.estimate(config.with_overrides(["train.mixed_precision='bf16'"]), pipe=pipe)
    assert halved.vram.weights == frozen * 4 - (frozen - sum(p.numel() for p in pipe.vae.parameters())) * 2
    checkpointed = pipelines.estimate(config.with_overrides(["train.gradient_checkpointing=true"]), pipe=pipe)
    assert checkpointed.vram.activations < estimate.vram.activations
    values = form.config_to_values(TrainerConfig())
    assert values["dit.timestep_sampling"] == "" and values["output.file_layout"] == "auto"
    fields = {field.key: field for field in form.config_fields()}
    assert ("family default", "") in fields["dit.target"].choices and "flux_shift" in dict(
        fields["dit.timestep_sampling"].choices).values()
    values.update({"dit.timestep_sampling": "sigmoid", "dit.t5_max_length": 128, "output.file_layout": "kohya"})
    config = form.values_to_config(values)
    assert (config.dit.timestep_sampling, config.dit.t5_max_length, config.output.file_layout) == ("sigmoid", 128,
                                                                                                  "kohya")


# ==================================================================================================== loading
def test_single_file_transformer_loads_with_its_base_components(bases, tmp_path):
    """An original-layout SD3.5 transformer file (ComfyUI's prefix) + model.config = the base's folder: the
    pipeline has the file's transformer and the folder's other components; without model.config a clear refusal."""
    from dit_pipelines import native_checkpoint
    from safetensors.torch import save_file

    from trainer.models import ModelLoadError, load_pipeline

    source = bases["make"](BASES["sd3"])
    with torch.no_grad():
        for parameter in source.transformer.parameters():
            parameter.add_(0.01)  # not the folder's transformer
    path = tmp_path / "sd3.5_medium.safetensors"
    save_file({f"model.diffusion_model.{key}": value.contiguous()
               for key, value in native_checkpoint(source.transformer).items()}, path)
    with pytest.raises(ModelLoadError, match="model.config"):
        load_pipeline(path)
    pipe, info = load_pipeline(path, config=bases["folders"]["sd3"])
    assert (info.arch, info.variant, info.source_kind) == ("sd3", "sd3.5-medium", "single_file")
    loaded = pipe.transformer.state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in source.transformer.state_dict().items())
    assert torch.equal(pipe.vae.decoder.conv_out.weight, source.vae.decoder.conv_out.weight)


# ==================================================================================================== compare
@pytest.mark.slow
def test_compare_trains_and_renders_on_flux(bases, tmp_path):
    from trainer.compare import compare

    config = dit_config(bases, "flux", tmp_path / "out", network={"preset": "attention", "rank": 2},
                        dit={"train_t5": False}, sample={"prompts": ["a photo of zq"], "sampler": "euler", "steps": 2,
                                                         "guidance_scale": 3.5})
    report = compare(config, ["lora", "loha"], tmp_path / "report", drift_prompts=["a red car"])
    assert [run.status for run in report.runs] == ["done", "done"]
    assert report.grid.is_file() and all(run.prior_drift is not None for run in report.runs)


# ==================================================================================================== tools
@pytest.mark.parametrize("family", sorted(BASES))
def test_cli_inspects_merges_and_converts_dit_files(bases, family, tmp_path, randomize, capsys):
    """Any method's file on these bases through the CLI: inspect names the base, merge bakes it into a diffusers
    folder that reloads with W + ΔW, convert (with the base: LoKr's ΔW needs no base, DoRA's does) keeps ΔW at full
    rank; a single-file merge output is refused."""
    from methods.apply import create_network
    from trainer.cli import EXIT_USER_ERROR, main
    from trainer.models import load_pipeline

    pipe = bases["make"](BASES[family])
    network = create_network(pipe, "lokr", {"rank": 4, "factor": 4, "dora": True})
    randomize(network)
    expected = network.merged_deltas()
    path = save_network(network, tmp_path / "lokr.safetensors", dtype="fp32")
    network.detach()
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"architecture:  {family} (metadata" in out and "lycoris layout" in out  # DoRA: the lycoris layout
    folder = bases["folders"][family]
    assert main(["merge", "--base", str(folder), "--adapter", str(path), "--out", str(tmp_path / "merged")]) == 0
    merged, info = load_pipeline(tmp_path / "merged")
    assert info.arch == family
    fresh, after = weights(bases["make"](BASES[family]).transformer), merged.transformer.state_dict()
    for name, delta in expected.items():
        if name.startswith("lycoris_"):
            key = network.naming.lookup(name)[1] + ".weight"
            torch.testing.assert_close(after[key], fresh[key] + delta, rtol=1e-3, atol=1e-3)  # an fp16 folder
    assert main(["merge", "--base", str(folder), "--adapter", str(path), "--out",
                 str(tmp_path / "merged.safetensors")]) == EXIT_USER_ERROR
    assert "diffusers folders" in capsys.readouterr().err
    out = tmp_path / "lora.safetensors"
    assert main(["convert", str(path), "--rank", "64", "--base", str(folder), "--out", str(out)]) == 0
    converted, _ = load_network(pipe, out, require_all=True)
    assert converted.method == "lora"
    for name, delta in converted.merged_deltas().items():
        torch.testing.assert_close(delta, expected[name], rtol=1e-4, atol=1e-5)
