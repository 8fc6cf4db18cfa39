"""The apply API on tiny diffusers pipelines, against diffusers itself and the LyCORIS library (spec §2.9, §5, §7).

(a) LoRA/LoCon files load in diffusers (``load_lora_weights`` + ``fuse_lora``) and give exactly our merged weights on
    every UNet and text-encoder layer, for SD1, SD2 (v-prediction) and SDXL (sgm names); every adapted layer changes.
(b) Tucker LoCon exported portable (mid folded into down) loads in diffusers identically.
(c) ``apply_adapter`` for every registered method: acts, strength 0 is exact, remove() is exact, files stack, hooks
    equal merged weights, wrong base model is refused.
(d) LyCORIS interop both ways, for every registered method: LyCORIS files read by us equal LyCORIS's own forward
    path; our files read by ``lycoris.kohya.create_network_from_weights`` give our UNet output.

Set ``RANKWRIGHT_REPORT_DIFFS=1`` and run with ``-s`` to print the largest difference measured per check.
"""

from __future__ import annotations

import os
from collections import defaultdict

import pytest
import torch
from torch import nn

from methods import available_methods
from methods.apply import apply_adapter, create_network, load_network, save_network
from methods.files import AdapterFileError
from methods.targets import TargetConfig

KNOWN_METHODS = ("lora", "loha", "lokr", "oft", "boft")
METHOD_OPTIONS = {
    "lora": {"rank": 4, "alpha": 2.0, "conv_rank": 2, "conv_alpha": 1.0},
    "loha": {"rank": 4, "alpha": 2.0},
    "lokr": {"rank": 2, "alpha": 1.0},  # rank 2 < max(b, d)/2 on the tiny widths: w2 factorised, alpha used
    "oft": {"block_size": 4},
    "boft": {"block_size": 4},
}
# LyCORIS algo name and create_network arguments (dim, alpha, extra kwargs) giving the same layouts.
LYCORIS_ALGOS = {
    "lora": ("lora", 4, 2.0, {"conv_dim": 2, "conv_alpha": 1.0}),
    "lora-dora": ("lora", 4, 2.0, {"dora_wd": True}),
    "lora-tucker": ("lora", 4, 2.0, {"conv_dim": 2, "conv_alpha": 1.0, "use_tucker": True}),
    "loha": ("loha", 4, 2.0, {}),
    "lokr": ("lokr", 2, 1.0, {}),
    "lokr-full": ("lokr", 4, 2.0, {}),  # full-matrix mode on the tiny widths: alpha ignored
    "oft": ("diag-oft", 4, 0.0, {}),
    "boft": ("boft", 4, 0.0, {}),
}
LYCORIS_PRESET = {
    "enable_conv": True,
    "unet_target_module": ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"],
    "unet_target_name": [],  # LyCORIS's default conv_in/time_embedding names abort on diffusers UNets (spec §7)
    "text_encoder_target_module": ["CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"],
    "text_encoder_target_name": [],
}

DIFFS: dict[str, float] = defaultdict(float)


def _registered() -> list[str]:
    try:
        return available_methods()
    except Exception:  # a method file mid-edit must not hide the other tests
        return []


METHODS = sorted(set(KNOWN_METHODS) | set(_registered()))


def _lycoris_variants() -> dict[str, tuple]:
    """LYCORIS_ALGOS, plus every other registered method LyCORIS knows, at its example options."""
    from methods import get_method

    variants = dict(LYCORIS_ALGOS)
    for method in _registered():
        cls = get_method(method)
        if cls.lycoris_algo and not any(v.split("-")[0] == method for v in variants):
            options = cls.example_options
            variants[method] = (cls.lycoris_algo, options.get("rank", options.get("block_size")),
                                options.get("alpha", 0.0), {})
    return variants


def require(method: str) -> None:
    if method not in _registered():
        pytest.skip(f"method {method!r} is not registered (yet)")




@pytest.fixture(scope="module", autouse=True)
def _report_diffs():
    yield
    if os.environ.get("RANKWRIGHT_REPORT_DIFFS"):
        print("\nlargest differences measured (abs for weights/outputs, rel for per-module LyCORIS checks):")
        for what, value in sorted(DIFFS.items()):
            print(f"  {what:<50} {value:.2e}")


def record(what: str, value: float) -> float:
    DIFFS[what] = max(DIFFS[what], value)
    return value


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def components(pipe) -> dict[str, nn.Module]:
    parts = {"unet": pipe.unet, "te": pipe.text_encoder}
    if getattr(pipe, "text_encoder_2", None) is not None:
        parts["te2"] = pipe.text_encoder_2
    return parts


def weights(pipe) -> dict[str, torch.Tensor]:
    """Every parameter of the UNet and text encoder(s); PEFT's ``.base_layer`` stripped, its LoRA tensors left out."""
    result = {}
    for part, model in components(pipe).items():
        for key, value in model.state_dict().items():
            if ".lora_" in key:
                continue
            result[f"{part}.{key.replace('.base_layer', '')}"] = value.detach().clone()
    return result


def weight_keys_of(pipe, network) -> set[str]:
    """The state-dict keys of the base weights the network adapts."""
    owners = {}
    for part, model in components(pipe).items():
        for path, module in model.named_modules():
            owners[id(module)] = f"{part}.{path.replace('.base_layer', '')}.weight"  # PEFT wraps the layer
    return {owners[id(adapter.base)] for adapter in network}


def method_network(pipe, method: str, seed: int, randomize, preset: str = "full"):
    from methods import get_method

    options = METHOD_OPTIONS.get(method, get_method(method).example_options)
    network = create_network(pipe, method, dict(options), TargetConfig(preset=preset))
    randomize(network, seed=seed)
    network.detach()  # create_network attaches hooks; the tests apply files instead
    return network


# ----- (a) diffusers: load_lora_weights + fuse_lora == our merge ---------------------------------------------------
@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_diffusers_fuse_equals_our_merge(tiny_pipeline, randomize, tmp_path, arch):
    pipe = tiny_pipeline(arch)
    if arch == "sd2":
        assert pipe.scheduler.config.prediction_type == "v_prediction"
    network = method_network(pipe, "lora", seed=1, randomize=randomize)
    path = save_network(network, tmp_path / f"{arch}.safetensors", dtype="fp32",
                        prediction_type=pipe.scheduler.config.prediction_type)
    # Our file reads back completely (SDXL: sgm names), and the pipeline's architecture is detected.
    loaded, _ = load_network(pipe, path, require_all=True)
    assert set(loaded.adapters) == set(network.adapters)

    base = weights(pipe)
    network.merge(1.0)
    ours = weights(pipe)
    network.unmerge()
    assert all(torch.equal(base[k], v) for k, v in weights(pipe).items()), "unmerge is not exact"

    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=1.0)
    theirs = weights(pipe)
    assert set(theirs) == set(ours)
    worst = max(max_diff(ours[key], theirs[key]) for key in ours)
    record(f"(a) diffusers fuse vs our merge [{arch}]", worst)
    assert worst <= 1e-5

    # Every adapted layer is changed by diffusers (A1111/ComfyUI would skip misses silently), and nothing else.
    adapted = weight_keys_of(pipe, network)
    changed = {key for key in base if not torch.equal(base[key], theirs[key])}
    assert changed == adapted
    assert len(adapted) == len(network) == sum(network.counts().values())
    if arch == "sdxl":
        assert set(network.counts()) == {"lora_unet", "lora_te1", "lora_te2"}


# ----- (b) Tucker LoCon: portable export folds lora_mid and loads in diffusers --------------------------------------
def test_tucker_locon_portable_loads_in_diffusers(tiny_pipeline, randomize, tmp_path):
    pipe = tiny_pipeline("sd1")
    options = {"rank": 4, "alpha": 2.0, "conv_rank": 3, "conv_alpha": 1.5, "use_tucker": True}
    network = create_network(pipe, "lora", options, TargetConfig(preset="full"))
    randomize(network, seed=2)
    network.detach()
    tucker = [a for a in network if getattr(a, "tucker", False)]
    assert len(tucker) == _count_kxk_convs(pipe) - 2 > 0  # every 3×3 conv but conv_in/conv_out (not in "full")
    portable = save_network(network, tmp_path / "portable.safetensors", dtype="fp32")
    native = save_network(network, tmp_path / "native.safetensors", dtype="fp32", portable=False)

    from safetensors.torch import load_file

    assert not any(".lora_mid." in key for key in load_file(str(portable)))
    assert sum(".lora_mid." in key for key in load_file(str(native))) == len(tucker)

    base = weights(pipe)
    network.merge(1.0)
    ours = weights(pipe)
    network.unmerge()
    pipe.load_lora_weights(str(portable))
    pipe.fuse_lora(lora_scale=1.0)
    theirs = weights(pipe)
    worst = max(max_diff(ours[key], theirs[key]) for key in ours)
    record("(b) diffusers fuse vs our Tucker merge [sd1]", worst)
    assert worst <= 1e-5
    changed = {key for key in base if not torch.equal(base[key], theirs[key])}
    assert changed == weight_keys_of(pipe, network)

    # The native (lora_mid) layout reads back identically in our loader; diffusers cannot read it (spec §5.2).
    ours_native, _ = load_network(tiny_pipeline("sd1"), native)
    ours_portable, _ = load_network(tiny_pipeline("sd1"), portable)
    assert sum(getattr(a, "tucker", False) for a in ours_native) == len(tucker)
    portable_deltas = ours_portable.merged_deltas()
    for name, delta in ours_native.merged_deltas().items():
        assert max_diff(delta, portable_deltas[name]) <= 1e-6
    with pytest.raises(ValueError):
        tiny_pipeline("sd1").load_lora_weights(str(native))


def _count_kxk_convs(pipe) -> int:
    return sum(isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1) for _, m in pipe.unet.named_modules())


# ----- (c) apply_adapter for every method ---------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_apply_adapter(tiny_pipeline, randomize, run_unet, tmp_path, method):
    require(method)
    pipe = tiny_pipeline("sd1")
    base = run_unet(pipe)
    first = method_network(pipe, method, seed=1, randomize=randomize)
    second = method_network(pipe, method, seed=2, randomize=randomize)
    path_a = save_network(first, tmp_path / "a.safetensors", dtype="fp32")
    path_b = save_network(second, tmp_path / "b.safetensors", dtype="fp32")

    # Acts, with every module of the file applied.
    handle = apply_adapter(pipe, path_a, strength=1.0)
    assert len(handle.network) == len(first)
    out_a = run_unet(pipe)
    assert max_diff(out_a, base) > 1e-3

    # Strength 0 is exactly the base model.
    handle.set_strength(0.0)
    assert torch.equal(run_unet(pipe), base)

    # remove() restores exactly.
    handle.set_strength(0.6)
    hooked = run_unet(pipe)
    handle.remove()
    assert torch.equal(run_unet(pipe), base)

    # Hooks at strength s equal merged weights at strength s.
    merged_network, _ = load_network(pipe, path_a)
    merged_network.merge(0.6)
    merged = run_unet(pipe)
    merged_network.unmerge()
    worst = record(f"(c) hook vs merge, strength 0.6 [{method}]", max_diff(hooked, merged))
    assert worst <= 1e-4

    # Two files stack; removing the first leaves the second working.
    with apply_adapter(pipe, path_b) as only_b:
        assert len(only_b.network) == len(second)
        out_b = run_unet(pipe)
    handle_a = apply_adapter(pipe, path_a)
    handle_b = apply_adapter(pipe, path_b)
    both = run_unet(pipe)
    assert max_diff(both, out_a) > 1e-4 and max_diff(both, out_b) > 1e-4
    handle_a.remove()
    worst = record(f"(c) stacked, first removed vs second alone [{method}]", max_diff(run_unet(pipe), out_b))
    assert worst <= 1e-6
    handle_b.remove()
    assert torch.equal(run_unet(pipe), base)
    # Nothing left behind: no hooks on any layer or on the models, every weight the model's own Parameter.
    for module in [*pipe.unet.modules(), *pipe.text_encoder.modules()]:
        assert not module._forward_hooks and not module._forward_pre_hooks
        assert all(isinstance(p, torch.nn.Parameter) for p in module._parameters.values() if p is not None)


def test_apply_adapter_on_sdxl(tiny_pipeline, randomize, run_unet, tmp_path):
    pipe = tiny_pipeline("sdxl")
    base = run_unet(pipe)
    network = method_network(pipe, "lora", seed=3, randomize=randomize)
    path = save_network(network, tmp_path / "xl.safetensors", dtype="fp16")
    with apply_adapter(pipe, path, strength=0.8) as handle:
        assert set(handle.network.adapters) == set(network.adapters)
        assert max_diff(run_unet(pipe), base) > 1e-3
    assert torch.equal(run_unet(pipe), base)


def test_sdxl_file_on_sd1_pipeline_is_refused(tiny_pipeline, randomize, tmp_path):
    sdxl = tiny_pipeline("sdxl")
    network = method_network(sdxl, "lora", seed=4, randomize=randomize)
    path = save_network(network, tmp_path / "xl.safetensors")
    sd1 = tiny_pipeline("sd1")
    with pytest.raises(AdapterFileError) as info:
        apply_adapter(sd1, path)
    message = str(info.value)
    assert str(path) in message and "sdxl" in message and "sd1" in message
    # Without metadata the names give it away: sgm names partly match SD1's, but the shapes do not.
    from safetensors.torch import save_file

    bare = tmp_path / "xl_bare.safetensors"
    save_file(network.export_state_dict(), str(bare))
    with pytest.raises(AdapterFileError, match="another base model"):
        apply_adapter(sd1, bare)
    # And nothing was left attached.
    assert all(not m._forward_hooks for m in sd1.unet.modules())


def test_sd2_file_on_sd1_pipeline_is_refused(tiny_pipeline, randomize, tmp_path):
    network = method_network(tiny_pipeline("sd2"), "lora", seed=5, randomize=randomize)
    path = save_network(network, tmp_path / "v2.safetensors", prediction_type="v_prediction")
    with pytest.raises(AdapterFileError, match="sd_v2_v"):
        apply_adapter(tiny_pipeline("sd1"), path)


# ----- (d) LyCORIS interop ------------------------------------------------------------------------------------------
@pytest.fixture
def lycoris_kohya():
    return pytest.importorskip("lycoris.kohya")


@pytest.fixture
def lycoris_preset(monkeypatch, lycoris_kohya):
    """Register an explicit-target preset; restore LycorisNetworkKohya's class-level targets afterwards."""
    network_class = lycoris_kohya.LycorisNetworkKohya
    for attribute in ("ENABLE_CONV", "UNET_TARGET_REPLACE_MODULE", "UNET_TARGET_REPLACE_NAME",
                      "TEXT_ENCODER_TARGET_REPLACE_MODULE", "TEXT_ENCODER_TARGET_REPLACE_NAME", "MODULE_ALGO_MAP",
                      "NAME_ALGO_MAP", "USE_FNMATCH", "TARGET_EXCLUDE_NAME"):
        monkeypatch.setattr(network_class, attribute, getattr(network_class, attribute))
    monkeypatch.setitem(lycoris_kohya.PRESET, "rankwright-test", LYCORIS_PRESET)
    # create_network_from_weights builds its network with the class-level targets: set them too.
    network_class.apply_preset(LYCORIS_PRESET)
    return "rankwright-test"


def _method_of(variant: str) -> str:
    return variant.split("-")[0]


def _probe_input(layer: nn.Module, generator: torch.Generator) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return torch.randn(3, layer.in_features, generator=generator)
    return torch.randn(1, layer.in_channels, 6, 6, generator=generator)


@pytest.mark.parametrize("variant", sorted(_lycoris_variants()))
def test_lycoris_files_read_by_us(tiny_pipeline, run_unet, tmp_path, lycoris_kohya, lycoris_preset, variant):
    require(_method_of(variant))
    algo, dim, alpha, extra = _lycoris_variants()[variant]
    theirs_pipe, ours_pipe = tiny_pipeline("sd1"), tiny_pipeline("sd1")
    base = run_unet(ours_pipe)
    lyco = lycoris_kohya.create_network(1.0, dim, alpha, theirs_pipe.vae, theirs_pipe.text_encoder,
                                        theirs_pipe.unet, algo=algo, preset=lycoris_preset, **extra)
    lyco.apply_to(theirs_pipe.text_encoder, theirs_pipe.unet, apply_text_encoder=True, apply_unet=True)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, parameter in lyco.named_parameters():
            if name.endswith(("dora_scale", "rescale")):
                continue
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    path = tmp_path / f"lycoris-{variant}.safetensors"
    lyco.save_weights(str(path), torch.float32, {})

    network, _ = load_network(ours_pipe, path, require_all=True)
    assert len(network) == len(lyco.loras) > 0
    assert network.method == _method_of(variant)
    network.merge(1.0)

    # Per module: LyCORIS's forward path (scales once, spec §2.9) vs our merged layer.
    worst = 0.0
    for module in lyco.loras:
        name = module.lora_name.replace("lora_te_encoder_", "lora_te_text_model_encoder_")
        ours_layer = network.adapters[name].base
        x = _probe_input(ours_layer, generator)
        with torch.no_grad():
            expected, got = module(x), ours_layer(x)
        worst = max(worst, max_diff(expected, got) / expected.abs().max().item())
    record(f"(d) LyCORIS forward vs our merge, per module rel [{variant}]", worst)
    assert worst <= 1e-5
    theirs_out, ours_out = run_unet(theirs_pipe), run_unet(ours_pipe)
    assert max_diff(ours_out, base) > 1e-3
    record(f"(d) LyCORIS vs ours, UNet output [{variant}]", max_diff(theirs_out, ours_out))
    assert max_diff(theirs_out, ours_out) <= 1e-4


@pytest.mark.parametrize("method", METHODS)
def test_our_files_read_by_lycoris(tiny_pipeline, randomize, run_unet, tmp_path, lycoris_kohya, lycoris_preset,
                                   method):
    require(method)
    ours_pipe, theirs_pipe = tiny_pipeline("sd1"), tiny_pipeline("sd1")
    base = run_unet(ours_pipe)
    network = method_network(ours_pipe, method, seed=11, randomize=randomize)
    path = save_network(network, tmp_path / f"ours-{method}.safetensors", dtype="fp32")
    handle = apply_adapter(ours_pipe, path)
    ours_out = run_unet(ours_pipe)
    assert max_diff(ours_out, base) > 1e-3

    lyco, _ = lycoris_kohya.create_network_from_weights(1.0, str(path), theirs_pipe.vae, theirs_pipe.text_encoder,
                                                        theirs_pipe.unet)
    # Every UNet module of the file was matched (transformers 5's CLIPTextModel has no text_model level, so
    # LyCORIS does not match our lora_te_text_model_* names on it; the UNet output does not depend on them).
    assert len(lyco.unet_loras) == network.counts()["lora_unet"]
    lyco.apply_to(theirs_pipe.text_encoder, theirs_pipe.unet, apply_text_encoder=True, apply_unet=True)
    theirs_out = run_unet(theirs_pipe)
    record(f"(d) our file in LyCORIS vs apply_adapter, UNet [{method}]", max_diff(theirs_out, ours_out))
    assert max_diff(theirs_out, ours_out) <= 1e-4
    handle.remove()
