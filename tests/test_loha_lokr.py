"""LoHa and LoKr against LyCORIS 4.1.3 (forward path, spec §2.9) and PEFT, plus file layout, round trips and merging."""

from __future__ import annotations

import pytest
import torch
from lycoris.functional.general import factorization as lycoris_factorization
from lycoris.functional.lokr import weight_gen as lycoris_lokr_weight_gen
from lycoris.modules.loha import LohaModule
from lycoris.modules.lokr import LokrModule
from peft import LoHaConfig as PeftLoHaConfig
from peft import LoKrConfig as PeftLoKrConfig
from peft import get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from torch import nn

import methods.base as base_module
from methods.base import ConfigError, apply_weight
from methods.loha import LoHaConfig, LoHaModule
from methods.lokr import KronLayout, LoKrConfig, LoKrModule, factorization, lokr_delta

IN, OUT = 32, 48  # LoKr factors: out 48 = 6·8 (a, b), in 32 = 4·8 (c, d)
KINDS = ("linear", "conv1x1", "conv3x3")

# name → (our config options, LyCORIS module options)
LOHA_VARIANTS = {
    "plain": ({"rank": 4, "alpha": 3.0}, {}),
    "tucker": ({"rank": 4, "alpha": 3.0, "use_tucker": True}, {"use_tucker": True}),
}
LOKR_VARIANTS = {
    "w2_lowrank": ({"rank": 2, "alpha": 3.0}, {}),
    "w2_full_auto": ({"rank": 4, "alpha": 3.0}, {}),  # 4 ≥ max(b, d)/2 → full W2, alpha ignored
    "full_matrix": ({"rank": 2, "alpha": 3.0, "full_matrix": True}, {"full_matrix": True}),
    "decompose_both": ({"rank": 2, "alpha": 3.0, "decompose_both": True}, {"decompose_both": True}),
    "tucker": ({"rank": 2, "alpha": 3.0, "use_tucker": True}, {"use_tucker": True}),
    "factor4": ({"rank": 2, "alpha": 3.0, "factor": 4}, {"factor": 4}),
}
METHODS = {
    "loha": (LoHaModule, LoHaConfig, LohaModule, LOHA_VARIANTS),
    "lokr": (LoKrModule, LoKrConfig, LokrModule, LOKR_VARIANTS),
}
CASES = [(method, variant, kind) for method, spec in METHODS.items() for variant in spec[3] for kind in KINDS]
CASE_IDS = [f"{m}-{v}-{k}" for m, v, k in CASES]


# ----- helpers ----------------------------------------------------------------------------------------------


def make_base(kind: str) -> nn.Module:
    torch.manual_seed(0)
    base = {
        "linear": lambda: nn.Linear(IN, OUT),
        "conv1x1": lambda: nn.Conv2d(IN, OUT, 1),
        "conv3x3": lambda: nn.Conv2d(IN, OUT, 3, stride=2, padding=1),
    }[kind]()
    return base.requires_grad_(False)


def make_input(kind: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    shape = (2, 5, IN) if kind == "linear" else (2, IN, 9, 9)
    return torch.randn(shape, generator=generator)


@torch.no_grad()
def randomise(module: nn.Module, seed: int = 2) -> None:
    """Non-zero values everywhere; DoRA magnitudes moved away from ‖W‖ so the rescale matters."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in module.named_parameters():
        if name == "dora_scale":
            param.mul_(0.5 + torch.rand(param.shape, generator=generator))
        else:
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    err = (actual.detach() - expected.detach()).abs().max().item()
    ref = expected.detach().abs().max().item()
    assert ref > 0, "reference is all zeros: the comparison would prove nothing"
    assert err <= rel * ref, f"max abs error {err:.3g} > {rel:g} × {ref:.3g}"


def ours_for(method: str, variant: str, kind: str, dora: bool = False):
    cls, config_cls, _, variants = METHODS[method]
    options = variants[variant][0]
    module = cls("m", make_base(kind), config_cls(dora=dora, **options))
    randomise(module)
    return module


def lycoris_for(method: str, variant: str, base: nn.Module, dora: bool = False, **extra):
    _, _, lyco_cls, variants = METHODS[method]
    options, lyco_options = variants[variant]
    return lyco_cls("m", base, 1.0, lora_dim=options["rank"], alpha=options["alpha"], weight_decompose=dora,
                    wd_on_out=True, **lyco_options, **extra)


def lycoris_delta(lyco) -> torch.Tensor:
    """ΔW as LyCORIS's forward uses it (scaled once; its get_diff_weight scales twice, spec §2.9)."""
    return lyco.get_weight(lyco.shape) * lyco.scalar


@torch.no_grad()
def paired(method: str, variant: str, kind: str, dora: bool = False, **extra):
    """Our module with random values, and a LyCORIS module (applied to its own base copy) holding the same ones."""
    ours = ours_for(method, variant, kind, dora)
    lyco_base = make_base(kind)
    lyco = lycoris_for(method, variant, lyco_base, dora, **extra)
    lyco_params = dict(lyco.named_parameters())
    our_params = dict(ours.named_parameters())
    assert set(our_params) == set(lyco_params), "same tensors as LyCORIS"
    for name, param in our_params.items():
        assert lyco_params[name].shape == param.shape, name
        lyco_params[name].copy_(param)
    lyco.apply_to()
    return ours, lyco, lyco_base


def layout_keys(tensors: dict[str, torch.Tensor]) -> set[str]:
    return set(tensors) - {"alpha", "dora_scale"}


# ----- factorization --------------------------------------------------------------------------------------------
def test_factorization_matches_lycoris():
    for dimension in range(1, 1300):
        for factor in (-1, 0, 1, 2, 3, 4, 5, 8, 16, 64, 5000):
            assert factorization(dimension, factor) == lycoris_factorization(dimension, factor), (dimension, factor)
    assert factorization(1280) == (32, 40) and factorization(127) == (1, 127) and factorization(128, 4) == (4, 32)


# ----- parity with LyCORIS ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,variant,kind", CASES, ids=CASE_IDS)
def test_matches_lycoris_forward(method, variant, kind):
    ours, lyco, lyco_base = paired(method, variant, kind)
    x = make_input(kind)
    with torch.no_grad():
        assert_close(ours.delta_weight(), lycoris_delta(lyco))
        assert_close(ours(x), lyco_base(x))
        ours.multiplier = lyco.multiplier = 0.5
        assert_close(ours(x), lyco_base(x))
    # LyCORIS's bypass path too (its LoKr Linear bypass is the grouped Kronecker chain).
    ours2, _, bypass_base = paired(method, variant, kind, bypass_mode=True)
    with torch.no_grad():
        assert_close(ours2(x), bypass_base(x))


@pytest.mark.parametrize("method,variant,kind", CASES, ids=CASE_IDS)
def test_matches_lycoris_dora(method, variant, kind):
    ours, lyco, lyco_base = paired(method, variant, kind, dora=True)
    x = make_input(kind)
    assert tuple(ours.dora_scale.shape) == ((OUT, 1) if kind == "linear" else (OUT, 1, 1, 1))
    with torch.no_grad():
        assert_close(ours(x), lyco_base(x))
        merged = lyco.get_merged_weight(shape=lyco.shape)[0]  # DoRA merge: W' = m·(W+ΔW)/‖W+ΔW‖ (ΔW scaled twice, §2.9)
        expected_delta = merged - ours.base.weight
        if ours.scale == 1.0:
            assert_close(ours.merged_delta(), expected_delta)


def test_lycoris_merge_scales_twice_and_we_scale_once():
    """Documents spec §2.9: LyCORIS 4.1.3's get_diff_weight applies alpha/r twice; our ΔW matches its forward."""
    ours, lyco, _ = paired("loha", "plain", "linear")
    with torch.no_grad():
        assert_close(lyco.get_diff_weight()[0], ours.delta_weight() * ours.scale)
        assert_close(ours.delta_weight(), lycoris_delta(lyco))


# ----- parity with PEFT ---------------------------------------------------------------------------------------------
PEFT_CASES = [case for case in CASES if case[1] != "full_matrix"]  # PEFT has no full_matrix switch


@pytest.mark.parametrize("method,variant,kind", PEFT_CASES, ids=[f"{m}-{v}-{k}" for m, v, k in PEFT_CASES])
def test_matches_peft(method, variant, kind):
    ours = ours_for(method, variant, kind)
    options = METHODS[method][3][variant][0]
    tucker = options.get("use_tucker", False)
    if method == "loha":
        config = PeftLoHaConfig(r=options["rank"], alpha=options["alpha"], target_modules=["0"],
                                use_effective_conv2d=tucker)
    else:
        # PEFT's LoKr always scales alpha/r, even with both sides full: give it alpha = r there (spec §2.3).
        alpha = options["alpha"] if ours.layout.scale_rank else options["rank"]
        config = PeftLoKrConfig(r=options["rank"], alpha=alpha, target_modules=["0"], use_effective_conv2d=tucker,
                                decompose_both=options.get("decompose_both", False),
                                decompose_factor=options.get("factor", -1))
    model = inject_adapter_in_model(config, nn.Sequential(make_base(kind)))
    ours_tensors = {k: v for k, v in ours.export_tensors(portable=False).items() if k != "alpha"}
    peft_shapes = {k.removeprefix("0."): tuple(v.shape) for k, v in get_peft_model_state_dict(model).items()}
    assert peft_shapes == {k: tuple(v.shape) for k, v in ours_tensors.items()}, "same layout as PEFT"
    result = set_peft_model_state_dict(model, {f"0.{k}": v for k, v in ours_tensors.items()})
    assert not result.unexpected_keys
    x = make_input(kind)
    with torch.no_grad():
        assert_close(ours.delta_weight(), model[0].get_delta_weight("default"))
        assert_close(ours(x), model(x))


# ----- file layout (spec §2.2 / §2.3 tables) ---------------------------------------------------------------------
# (a, b, c, d) = (6, 8, 4, 8) for the default factor; k = kh·kw.
def expected_shapes(method: str, variant: str, kind: str) -> dict[str, tuple[int, ...]]:
    kernel = {"linear": (), "conv1x1": (1, 1), "conv3x3": (3, 3)}[kind]
    k = 9 if kind == "conv3x3" else 1
    if method == "loha":
        r = 4
        if variant == "tucker" and kind == "conv3x3":
            pair = {"a": (r, OUT), "b": (r, IN)}
            shapes = {"hada_t1": (r, r, 3, 3), "hada_t2": (r, r, 3, 3)}
        else:
            pair = {"a": (OUT, r), "b": (r, IN * k)}
            shapes = {}
        for i in (1, 2):
            shapes[f"hada_w{i}_a"], shapes[f"hada_w{i}_b"] = pair["a"], pair["b"]
        return shapes
    a, b, c, d = (4, 12, 4, 8) if variant == "factor4" else (6, 8, 4, 8)
    if variant == "w2_full_auto":
        return {"lokr_w1": (a, c), "lokr_w2": (b, d, *kernel)}
    if variant == "full_matrix":
        return {"lokr_w1": (a, c), "lokr_w2": (b, d, *kernel)}
    r = 2
    shapes = {"lokr_w1": (a, c), "lokr_w2_a": (b, r), "lokr_w2_b": (r, d * k)}
    if variant == "decompose_both":
        del shapes["lokr_w1"]
        shapes.update(lokr_w1_a=(a, r), lokr_w1_b=(r, c))
    if variant == "tucker" and kind == "conv3x3":
        shapes.update(lokr_t2=(r, r, 3, 3), lokr_w2_a=(r, b), lokr_w2_b=(r, d))
    return shapes


@pytest.mark.parametrize("method,variant,kind", CASES, ids=CASE_IDS)
def test_file_shapes_match_spec(method, variant, kind):
    ours = ours_for(method, variant, kind, dora=True)
    tensors = ours.export_tensors(portable=False)
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    expected = expected_shapes(method, variant, kind)
    expected["alpha"] = ()
    expected["dora_scale"] = (OUT, 1) if kind == "linear" else (OUT, 1, 1, 1)
    assert shapes == expected
    assert tensors["alpha"].dim() == 0 and all(v.dtype == torch.float32 for v in tensors.values())
    assert ours.claims(set(tensors)) and not (LoHaModule if method == "lokr" else LoKrModule).claims(set(tensors))
    if method == "lokr":
        assert tensors.get("lokr_w2_b", torch.zeros(1, 1)).dim() == 2, "never a 3/4-D lokr_w2_b"
        full_full = variant in ("w2_full_auto", "full_matrix")
        assert ours.scale == (1.0 if full_full else 3.0 / 2)
        assert tensors["alpha"].item() == (ours.rank if full_full else 3.0)


@pytest.mark.parametrize("variant", ["decompose_both", "tucker", "w2_lowrank"])
def test_lokr_portable_layout(variant):
    """Portable export: lokr_w1_a/b multiplied out, lokr_t2 folded into a 2-D lokr_w2_b; same ΔW."""
    ours = ours_for("lokr", variant, "conv3x3")
    tensors = ours.export_tensors(portable=True)
    assert layout_keys(tensors) == {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}
    assert tuple(tensors["lokr_w2_a"].shape) == (8, 2) and tuple(tensors["lokr_w2_b"].shape) == (2, 8 * 9)
    assert tensors["alpha"].item() == 3.0
    again = LoKrModule.from_tensors("m", make_base("conv3x3"), tensors)
    with torch.no_grad():
        assert_close(again.delta_weight(), ours.delta_weight())


def test_lokr_portable_full_w2_bakes_scale():
    """A file with lokr_w1_a/b and a full lokr_w2 (alpha/r applies) exports as w1/w2 full with the scale baked in."""
    base = make_base("linear")
    layout = KronLayout(6, 8, 4, 8, w1_rank=2, w2_rank=0)
    ours = LoKrModule("m", base, LoKrConfig(rank=2, alpha=3.0), layout=layout)
    randomise(ours)
    assert ours.scale == 1.5
    tensors = ours.export_tensors(portable=True)
    assert layout_keys(tensors) == {"lokr_w1", "lokr_w2"}
    again = LoKrModule.from_tensors("m", make_base("linear"), tensors)
    assert again.scale == 1.0
    with torch.no_grad():
        assert_close(again.delta_weight(), ours.delta_weight())


# ----- round trips ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dora", [False, True], ids=["plain", "dora"])
@pytest.mark.parametrize("method,variant,kind", CASES, ids=CASE_IDS)
def test_export_import_round_trip(method, variant, kind, dora):
    ours = ours_for(method, variant, kind, dora)
    tensors = ours.export_tensors(portable=False)
    again = METHODS[method][0].from_tensors("m", make_base(kind), tensors)
    assert again.use_dora == dora
    assert again.tucker == ours.tucker and again.scale == ours.scale
    with torch.no_grad():
        assert torch.equal(again.delta_weight(), ours.delta_weight())
        x = make_input(kind)
        assert torch.equal(again(x), ours(x))
    assert {k: v.shape for k, v in again.export_tensors(portable=False).items()} == {
        k: v.shape for k, v in tensors.items()}
    assert all(torch.equal(v, tensors[k]) for k, v in again.export_tensors(portable=False).items())


@pytest.mark.parametrize("dora", [False, True], ids=["plain", "dora"])
@pytest.mark.parametrize("method,variant,kind", CASES, ids=CASE_IDS)
def test_our_file_loads_in_lycoris(method, variant, kind, dora):
    """Our exported tensors in a LyCORIS module (load_state_dict; make_module_from_state_dict where it can read them)
    give our forward."""
    ours = ours_for(method, variant, kind, dora)
    x = make_input(kind)
    with torch.no_grad():
        expected = ours(x)
        lyco_base = make_base(kind)
        lyco = lycoris_for(method, variant, lyco_base, dora)
        lyco.load_state_dict(ours.export_tensors(portable=False))
        lyco.apply_to()
        assert_close(lyco_base(x), expected)

        # LyCORIS's own file loader, on the portable layout (it cannot read lokr_w1_a/b or lokr_t2, spec §7).
        tensors = ours.export_tensors(portable=True)
        lyco_cls = METHODS[method][2]
        loader_base = make_base(kind)
        loaded = lyco_cls.make_module_from_state_dict("m", loader_base, *[tensors.get(k) for k in lyco_cls.weight_list])
        loaded.apply_to()
        assert_close(loader_base(x), expected)


@pytest.mark.parametrize("dora", [False, True], ids=["plain", "dora"])
@pytest.mark.parametrize("method,variant,kind", CASES, ids=CASE_IDS)
def test_lycoris_file_loads_in_ours(method, variant, kind, dora):
    """A LyCORIS-made module's state dict (including the layouts LyCORIS itself cannot reload) gives the same ΔW."""
    lyco_base = make_base(kind)
    lyco = lycoris_for(method, variant, lyco_base, dora)
    randomise(lyco, seed=5)
    lyco.apply_to()
    state = {k: v.detach().clone() for k, v in lyco.state_dict().items()}
    ours = METHODS[method][0].from_tensors("m", make_base(kind), state)
    assert ours.use_dora == dora
    x = make_input(kind)
    with torch.no_grad():
        assert_close(ours.delta_weight(), lycoris_delta(lyco))
        assert_close(ours(x), lyco_base(x))


def test_lokr_reads_4d_w2_b_from_lycoris_weight_gen():
    """lycoris.functional.lokr.weight_gen writes a 4-D lokr_w2_b (r, d, kh, kw) for convs; we read it."""
    base = make_base("conv3x3")
    w1, w1a, w1b, w2, w2a, w2b, t2 = lycoris_lokr_weight_gen(base.weight, 2, tucker=False)
    assert w1 is not None and w2a is not None and tuple(w2b.shape) == (2, 8, 3, 3)
    generator = torch.Generator().manual_seed(3)
    w1, w2a, w2b = (torch.randn(t.shape, generator=generator) for t in (w1, w2a, w2b))
    tensors = {"lokr_w1": w1, "lokr_w2_a": w2a, "lokr_w2_b": w2b, "alpha": torch.tensor(3.0)}
    ours = LoKrModule.from_tensors("m", base, tensors)
    assert tuple(ours.lokr_w2_b.shape) == (2, 72)
    expected = torch.kron(w1[:, :, None, None], (w2a @ w2b.flatten(1)).view(8, 8, 3, 3)) * 1.5
    with torch.no_grad():
        assert_close(ours.delta_weight(), expected)
        assert tuple(ours.export_tensors()["lokr_w2_b"].shape) == (2, 72)


def test_from_tensors_rejects_mismatched_shapes():
    ours = ours_for("lokr", "w2_lowrank", "linear")
    with pytest.raises(ValueError, match="do not make"):
        LoKrModule.from_tensors("m", nn.Linear(IN, OUT + 2), ours.export_tensors())
    with pytest.raises(ValueError, match="lacks"):
        LoKrModule.from_tensors("m", make_base("linear"), {"lokr_w1": torch.zeros(6, 4), "alpha": torch.tensor(1.0)})
    loha = ours_for("loha", "plain", "linear")
    with pytest.raises(ValueError, match="does not fit"):
        LoHaModule.from_tensors("m", nn.Linear(IN + 1, OUT), loha.export_tensors())
    with pytest.raises(ValueError, match="lacks"):
        LoHaModule.from_tensors("m", make_base("linear"), {"hada_w1_a": torch.zeros(OUT, 4)})


# ----- merge, strength, init, training ---------------------------------------------------------------------------
@pytest.mark.parametrize("dora", [False, True], ids=["plain", "dora"])
@pytest.mark.parametrize("method,variant,kind", CASES, ids=CASE_IDS)
def test_merge_unmerge_and_zero_strength(method, variant, kind, dora):
    ours = ours_for(method, variant, kind, dora)
    base = ours.base
    x = make_input(kind)
    original = base.weight.detach().clone()
    with torch.no_grad():
        plain = base.forward(x)
        adapted = ours(x)
        ours.multiplier = 0.0
        assert torch.equal(ours(x), plain)
        ours.attach()
        assert torch.equal(base(x), plain)
        ours.multiplier = 1.0
        assert_close(base(x), adapted)  # the hook path gives the same as forward()
        ours.merge()
        assert_close(base(x), adapted)  # hook is a no-op while merged; the merged weight carries the adapter
        ours.unmerge()
        assert torch.equal(base.weight, original)
        ours.detach_hook()
        assert torch.equal(base(x), plain)


@pytest.mark.parametrize("method,variant,kind", CASES, ids=CASE_IDS)
def test_default_init_starts_at_zero(method, variant, kind):
    cls, config_cls, _, variants = METHODS[method]
    module = cls("m", make_base(kind), config_cls(**variants[variant][0]))
    with torch.no_grad():
        assert torch.count_nonzero(module.delta_weight()) == 0
        x = make_input(kind)
        assert torch.equal(module(x), module.base.forward(x))
    zero_init = [name for name, p in module.named_parameters() if not torch.count_nonzero(p)]
    assert len(zero_init) == 1, zero_init  # exactly one zero factor, as LyCORIS: hada_w2_a, lokr_w2 or lokr_w2_b
    # ... and it gets a gradient on the first step, so training can leave ΔW = 0.
    module.train()
    module(make_input(kind)).square().sum().backward()
    grad = dict(module.named_parameters())[zero_init[0]].grad
    assert grad is not None and torch.count_nonzero(grad)


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_dropouts_only_in_training(method):
    cls, config_cls, _, variants = METHODS[method]
    options = dict(variants["w2_lowrank" if method == "lokr" else "plain"][0], rank_dropout=0.5, dropout=0.1)
    module = cls("m", make_base("linear"), config_cls(**options))
    randomise(module)
    reference = cls("m", make_base("linear"), config_cls(**variants["w2_lowrank" if method == "lokr" else "plain"][0]))
    randomise(reference)
    x = make_input("linear")
    with torch.no_grad():
        module.eval()
        assert torch.equal(module(x), reference(x))
        module.train()
        torch.manual_seed(7)
        diff = module.bypass(x)
    # rank_dropout zeroes whole output channels of ΔW·x (one mask per step)
    dropped = (diff == 0).all(dim=0).all(dim=0)
    assert 0 < int(dropped.sum()) < OUT


def test_config_validation():
    with pytest.raises(ConfigError, match="factor"):
        LoKrConfig.from_dict({"factor": 0})
    with pytest.raises(ConfigError, match="dora"):
        LoHaConfig.from_dict({"dora": True, "rank_dropout": 0.1})
    with pytest.raises(ConfigError, match="unknown"):
        LoHaConfig.from_dict({"decompose_both": True})
    with pytest.raises(ConfigError, match="rank_dropout"):
        LoKrConfig.from_dict({"rank_dropout": 1.0})
    assert LoKrConfig.from_dict({"factor": 8, "decompose_both": True}).factor == 8


def test_lokr_bypass_equals_built_delta_in_half_precision_base():
    """The Kronecker bypass (Linear, 1×1 conv) on a bf16 base: fp32 parameters, bf16 activations."""
    for kind in ("linear", "conv1x1"):
        ours = ours_for("lokr", "decompose_both", kind)
        ours.base.to(torch.bfloat16)
        x = make_input(kind).to(torch.bfloat16)
        with torch.no_grad():
            out = ours.bypass(x)
            reference = apply_weight(ours.base, x.float(), ours.delta_weight())
        assert out.dtype == torch.bfloat16 and ours.lokr_w1_a.dtype == torch.float32
        assert_close(out.float(), reference, rel=2e-2)


def test_registry_finds_both_methods():
    from methods.registry import get_method, method_for_file_module

    assert get_method("loha") is LoHaModule and get_method("LoKr") is LoKrModule
    for method, variant in (("loha", "tucker"), ("lokr", "decompose_both"), ("lokr", "tucker")):
        tensors = ours_for(method, variant, "conv3x3", dora=True).export_tensors(portable=False)
        assert method_for_file_module(set(tensors)) is METHODS[method][0]
    assert LoHaModule.description and LoKrModule.description


def test_lokr_delta_scale_applies_once():
    w1, w2 = torch.randn(6, 4), torch.randn(8, 8)
    assert_close(lokr_delta(torch.Size((OUT, IN)), 2.5, w1=w1, w2=w2), torch.kron(w1, w2) * 2.5)


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_loha_rank_squared_product_equals_the_built_delta(strength, monkeypatch):
    """Wide layer, few positions: the output path is the rank-r² product, added to the frozen output in one addmm."""
    import methods.loha as loha_module

    torch.manual_seed(0)
    base = nn.Linear(64, 48).requires_grad_(False)
    module = LoHaModule("m", base, LoHaConfig(rank=2, alpha=1))
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.normal_(0.0, 0.3)
    module.multiplier = strength
    x = torch.randn(3, 64)
    fused = []
    monkeypatch.setattr(loha_module, "add_low_rank",
                        lambda *args: fused.append(1) or base_module.add_low_rank(*args))
    module.attach()
    out = base(x)
    module.detach_hook()
    assert fused and not module.rebuilds_weight(x)
    expected = torch.nn.functional.linear(x, base.weight + strength * module.delta_weight(), base.bias)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
