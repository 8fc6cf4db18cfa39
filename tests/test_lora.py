"""LoRA / LoCon / DoRA (methods/lora.py) against the LyCORIS 4.1.3 and PEFT oracles, plus the file layout (spec §2.1,
§2.6), merge/unmerge, dropout and config checks.

Every comparison is fp32 on CPU with random non-zero parameters copied into the oracle, and is judged by the
relative error ``max|ours − oracle| / max|oracle|``. Set ``RANKWRIGHT_REPORT_DIFFS=1`` and run with ``-s`` to print
the largest error measured per check.
"""

from __future__ import annotations

import copy
import os
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from methods import ConfigError, get_method
from methods.lora import LoRAConfig, LoRAModule

lycoris_locon = pytest.importorskip("lycoris.modules.locon")
peft = pytest.importorskip("peft")
LoConModule = lycoris_locon.LoConModule

RANK, ALPHA = 4, 2.0  # scale 0.5: checks that alpha/r is applied exactly once
TOL = 1e-5
KINDS = ("linear", "conv1x1", "conv3x3")
# Tucker only exists for k×k convs; DoRA+Tucker is a LyCORIS combination too.
CASES = [(kind, variant) for kind in KINDS for variant in ("plain", "dora")] + [
    ("conv3x3", "tucker"),
    ("conv3x3", "tucker_dora"),
]
CASE_IDS = [f"{kind}-{variant}" for kind, variant in CASES]

DIFFS: dict[str, float] = defaultdict(float)


@pytest.fixture(scope="module", autouse=True)
def _report_diffs():
    yield
    if os.environ.get("RANKWRIGHT_REPORT_DIFFS"):
        print("\nlargest relative differences measured:")
        for what, value in sorted(DIFFS.items()):
            print(f"  {what:<40} {value:.2e}")


def assert_close(ours: torch.Tensor, oracle: torch.Tensor, what: str, tol: float = TOL) -> None:
    assert ours.shape == oracle.shape, f"{what}: shape {tuple(ours.shape)} vs {tuple(oracle.shape)}"
    ours, oracle = ours.detach().float(), oracle.detach().float()
    err = ((ours - oracle).abs().max() / oracle.abs().max().clamp_min(1e-30)).item()
    DIFFS[what] = max(DIFFS[what], err)
    assert err < tol, f"{what}: relative error {err:.3e} ≥ {tol:.0e}"


# ----- builders ---------------------------------------------------------------------------------------------------
def make_base(kind: str, seed: int = 0, **conv_options) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "linear":
        return nn.Linear(12, 10, bias=True)
    if kind == "conv1x1":
        return nn.Conv2d(6, 8, 1, bias=True, **conv_options)
    return nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=True, **conv_options)


def make_input(kind: str, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (3, 5, 12) if kind == "linear" else (2, 6, 9, 9)
    return torch.randn(shape, generator=g)


def randomize(module: LoRAModule, seed: int = 2) -> LoRAModule:
    """Non-zero up (the init is zero), and a magnitude that differs from ‖W‖ so DoRA really rescales."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        params = [module.lora_down, module.lora_up] + ([module.lora_mid] if module.tucker else [])
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        if module.use_dora:
            module.dora_scale.mul_(0.7 + 0.6 * torch.rand(module.dora_scale.shape, generator=g))
    return module


def make_ours(kind: str, variant: str = "plain", base: nn.Module | None = None, **options) -> LoRAModule:
    base = make_base(kind) if base is None else base
    config = LoRAConfig.from_dict(
        {"rank": RANK, "alpha": ALPHA, "use_tucker": "tucker" in variant, "dora": "dora" in variant, **options}
    )
    module = randomize(LoRAModule(f"lora_unet_{kind}", base, config))
    assert module.tucker == ("tucker" in variant) and module.use_dora == ("dora" in variant)
    return module.eval()


def make_lycoris(module: LoRAModule, multiplier: float = 1.0) -> tuple[LoConModule, nn.Module]:
    """A LyCORIS LoCon on a copy of our base, holding exactly our tensors."""
    base = copy.deepcopy(module.base)
    lyc = LoConModule(
        module.name, base, multiplier=multiplier, lora_dim=module.rank, alpha=module.alpha,
        use_tucker=module.tucker, weight_decompose=module.use_dora, wd_on_out=True,
    )
    assert lyc.tucker == module.tucker
    with torch.no_grad():
        lyc.lora_down.weight.copy_(module.lora_down)
        lyc.lora_up.weight.copy_(module.lora_up)
        if module.tucker:
            lyc.lora_mid.weight.copy_(module.lora_mid)
        if module.use_dora:
            lyc.dora_scale.copy_(module.dora_scale)
    return lyc.eval(), base


def lycoris_merged_delta(lyc: LoConModule, base: nn.Module) -> torch.Tensor:
    return lyc.get_merged_weight(1.0)[0] - base.weight


def weight_out(base: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if isinstance(base, nn.Conv2d):
        return F.conv2d(x, weight, base.bias, base.stride, base.padding, base.dilation, base.groups)
    return F.linear(x, weight, base.bias)


def hook_output(module: LoRAModule, x: torch.Tensor) -> torch.Tensor:
    module.attach()
    try:
        return module.base(x)
    finally:
        module.detach_hook()


# ----- 1. LyCORIS ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("kind", "variant"), CASES, ids=CASE_IDS)
def test_delta_and_forward_match_lycoris(kind, variant):
    ours = make_ours(kind, variant)
    lyc, lyc_base = make_lycoris(ours)
    x = make_input(kind)

    with torch.no_grad():
        # ΔW: the raw update, and what merging adds (DoRA: m·V/‖V‖ − W).
        assert_close(ours.delta_weight(), lyc.get_diff_weight(1.0)[0], f"ΔW {variant}")
        assert_close(ours.merged_delta(), lycoris_merged_delta(lyc, lyc_base), f"merged ΔW {variant}")

        lyc.apply_to()
        expected = lyc_base(x)
        assert_close(ours(x), expected, f"module(x) {variant}")
        assert_close(hook_output(ours, x), expected, f"hook {variant}")
        # The standalone forward and the hook are the same function.
        assert torch.equal(ours(x), hook_output(ours, x))


@pytest.mark.parametrize(("kind", "variant"), [c for c in CASES if "dora" not in c[1]],
                         ids=[i for i in CASE_IDS if "dora" not in i])
@pytest.mark.parametrize("strength", [0.5, -1.0])
def test_multiplier_matches_lycoris(kind, variant, strength):
    ours = make_ours(kind, variant)
    ours.multiplier = strength
    lyc, lyc_base = make_lycoris(ours, multiplier=strength)
    x = make_input(kind)
    with torch.no_grad():
        lyc.apply_to()
        expected = lyc_base(x)
        assert_close(ours(x), expected, f"module(x) {variant} s={strength}")
        assert_close(hook_output(ours, x), expected, f"hook {variant} s={strength}")
        assert_close(ours.merged_delta() * strength, lyc.get_merged_weight(strength)[0] - lyc_base.weight,
                     f"merged ΔW {variant} s={strength}")


@pytest.mark.parametrize("kind", KINDS)
def test_dora_multiplier_semantics_differ_from_lycoris(kind):
    """Documented difference. At s = 1 both give m·V/‖V‖ (V = W+ΔW). At other s:

    - ours (all consumers' "linear in s" convention, §2.0): W + s·(W' − W), so s = 0 is exactly W;
    - LyCORIS 4.1.3 (``functional.general._weight_decompose``): V · (s·(m/‖V‖ − 1) + 1), so s = 0 gives W + ΔW.
    """
    s = 0.5
    ours = make_ours(kind, "dora")
    ours.multiplier = s
    lyc, lyc_base = make_lycoris(ours, multiplier=s)
    x = make_input(kind)
    with torch.no_grad():
        weight = ours.base.weight
        v = weight + ours.delta_weight()
        ratio = ours.dora_scale / v.reshape(v.shape[0], -1).norm(dim=1).view_as(ours.dora_scale)
        ours_weight = weight + s * (v * ratio - weight)
        lycoris_weight = v * (s * (ratio - 1) + 1)

        assert_close(ours(x), weight_out(ours.base, x, ours_weight), "DoRA s=0.5 ours = W+s(W'-W)")
        lyc.apply_to()
        lyc_out = lyc_base(x)
        assert_close(lyc_out, weight_out(ours.base, x, lycoris_weight), "DoRA s=0.5 LyCORIS = V(s(m/|V|-1)+1)")
        # ...and the two conventions really are different at s ≠ 1.
        assert (ours(x) - lyc_out).abs().max() > 1e-2 * lyc_out.abs().max()

        ours.multiplier = 0.0
        assert torch.equal(ours(x), ours.base.forward(x))


# ----- 2. PEFT ---------------------------------------------------------------------------------------------------
class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = make_base("linear")
        self.conv1x1 = make_base("conv1x1")
        self.conv3x3 = make_base("conv3x3")


def make_peft(ours: LoRAModule, kind: str) -> nn.Module:
    """A PEFT LoRA layer (``inject_adapter_in_model``) around a copy of our base, holding our tensors.

    Tucker has no PEFT layout: it is compared through the portable (folded) export, which must give the same ΔW.
    """
    net = _Net()
    setattr(net, kind, copy.deepcopy(ours.base))
    config = peft.LoraConfig(r=ours.rank, lora_alpha=ours.alpha, target_modules=list(KINDS), use_dora=ours.use_dora)
    net = peft.inject_adapter_in_model(config, net)
    layer = getattr(net, kind)
    assert layer.scaling["default"] == pytest.approx(ours.scale)
    tensors = ours.export_tensors()
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(tensors["lora_down.weight"].reshape(layer.lora_A["default"].weight.shape))
        layer.lora_B["default"].weight.copy_(tensors["lora_up.weight"].reshape(layer.lora_B["default"].weight.shape))
        if ours.use_dora:
            magnitude = layer.lora_magnitude_vector["default"].weight
            magnitude.copy_(ours.dora_scale.reshape(magnitude.shape))
    return layer.eval()


@pytest.mark.parametrize(("kind", "variant"), CASES, ids=CASE_IDS)
def test_forward_and_gradients_match_peft(kind, variant):
    ours = make_ours(kind, variant)
    layer = make_peft(ours, kind)
    x = make_input(kind)
    with torch.no_grad():
        expected = layer(x)
        assert_close(ours(x), expected, f"PEFT module(x) {variant}")
        assert_close(hook_output(ours, x), expected, f"PEFT hook {variant}")
    if ours.tucker:
        return  # the folded layout has other parameters: no gradient to compare one to one

    # Same loss through our training path (the hook) and through PEFT.
    grad_out = torch.randn(expected.shape, generator=torch.Generator().manual_seed(5))
    ours.base.requires_grad_(False)
    ours.attach()
    try:
        (ours.base(x) * grad_out).sum().backward()
    finally:
        ours.detach_hook()
    (layer(x) * grad_out).sum().backward()

    pairs = [(ours.lora_down, layer.lora_A["default"].weight), (ours.lora_up, layer.lora_B["default"].weight)]
    if ours.use_dora:
        pairs.append((ours.dora_scale, layer.lora_magnitude_vector["default"].weight))
    for name, (mine, theirs) in zip(("lora_down", "lora_up", "dora_scale"), pairs):
        assert mine.grad is not None and theirs.grad is not None, name
        assert mine.grad.abs().max() > 0, name
        assert_close(mine.grad.reshape(theirs.grad.shape), theirs.grad, f"PEFT grad {name} {variant}")
    assert ours.base.weight.grad is None


# ----- 3. file layout --------------------------------------------------------------------------------------------
EXPECTED_SHAPES = {  # spec §2.1 table, for in=12/6, out=10/8, r=4
    ("linear", False): {"lora_down.weight": (4, 12), "lora_up.weight": (10, 4)},
    ("conv1x1", False): {"lora_down.weight": (4, 6, 1, 1), "lora_up.weight": (8, 4, 1, 1)},
    ("conv3x3", False): {"lora_down.weight": (4, 6, 3, 3), "lora_up.weight": (8, 4, 1, 1)},
    ("conv3x3", True): {"lora_down.weight": (4, 6, 1, 1), "lora_mid.weight": (4, 4, 3, 3),
                        "lora_up.weight": (8, 4, 1, 1)},
}


@pytest.mark.parametrize(("kind", "variant"), CASES, ids=CASE_IDS)
def test_export_shapes_and_round_trip(kind, variant):
    ours = make_ours(kind, variant)
    dora_shape = {"linear": (10, 1)}.get(kind, (8, 1, 1, 1))

    for portable in (True, False):
        tensors = ours.export_tensors(portable=portable)
        keep_mid = ours.tucker and not portable
        expected = dict(EXPECTED_SHAPES[(kind, keep_mid)], alpha=())
        if ours.use_dora:
            expected["dora_scale"] = dora_shape
        assert {k: tuple(v.shape) for k, v in tensors.items()} == expected
        assert tensors["alpha"].dim() == 0 and tensors["alpha"].item() == ALPHA
        assert all(v.dtype == torch.float32 for v in tensors.values())

        loaded = LoRAModule.from_tensors(ours.name, make_base(kind), tensors).eval()
        assert loaded.tucker == keep_mid and loaded.use_dora == ours.use_dora
        assert loaded.rank == RANK and loaded.alpha == ALPHA
        with torch.no_grad():
            if keep_mid or not ours.tucker:  # same layout: the identical computation
                assert torch.equal(loaded.delta_weight(), ours.delta_weight())
                assert torch.equal(loaded.merged_delta(), ours.merged_delta())
            # folded Tucker: the same ΔW up to rounding
            assert_close(loaded.delta_weight(), ours.delta_weight(), f"round trip ΔW portable={portable}")
            assert_close(loaded(make_input(kind)), ours(make_input(kind)), f"round trip out portable={portable}")


@pytest.mark.parametrize("alpha", [None, 0, 0.0, 4.0, 1.5])
@pytest.mark.parametrize("kind", KINDS)
def test_export_alpha_is_effective_alpha(kind, alpha):
    module = LoRAModule("m", make_base(kind), LoRAConfig(rank=RANK, alpha=alpha))
    effective = float(alpha) if alpha else float(RANK)
    exported = module.export_tensors()["alpha"]
    assert exported.dim() == 0 and exported.item() == effective
    assert module.scale == effective / RANK


@pytest.mark.parametrize(("kind", "variant"), CASES, ids=CASE_IDS)
def test_lycoris_files_load_to_same_delta(kind, variant):
    """Tensors as LyCORIS writes them (``state_dict()``, incl. ``lora_mid`` and ``dora_scale``) load via from_tensors,
    and our non-portable export loads into LyCORIS (``make_module_from_state_dict``)."""
    ours = make_ours(kind, variant)
    lyc, lyc_base = make_lycoris(ours)
    lyc_tensors = {k: v.detach().clone() for k, v in lyc.state_dict().items()}
    assert ("lora_mid.weight" in lyc_tensors) == ours.tucker

    loaded = LoRAModule.from_tensors(ours.name, copy.deepcopy(ours.base), lyc_tensors)
    with torch.no_grad():
        assert_close(loaded.delta_weight(), lyc.get_diff_weight(1.0)[0], f"LyCORIS file ΔW {variant}")
        assert_close(loaded.merged_delta(), lycoris_merged_delta(lyc, lyc_base), f"LyCORIS file merged {variant}")

    ours_tensors = ours.export_tensors(portable=False)
    with torch.no_grad():  # LyCORIS's loader copy_s into a Parameter; its own loader runs under no_grad
        back = LoConModule.make_module_from_state_dict(
            ours.name, copy.deepcopy(ours.base), *(ours_tensors.get(k) for k in LoConModule.weight_list)
        )
        assert_close(ours.merged_delta(), lycoris_merged_delta(back, back.org_module[0]), f"ours → LyCORIS {variant}")


@pytest.mark.parametrize("kind", KINDS)
def test_input_axis_dora_scale_is_rejected(kind):
    base = make_base(kind)
    lyc = LoConModule("m", copy.deepcopy(base), lora_dim=RANK, alpha=ALPHA, weight_decompose=True, wd_on_out=False)
    tensors = {k: v.detach() for k, v in lyc.state_dict().items()}
    assert tensors["dora_scale"].shape[:2] == (1, base.weight.shape[1])
    with pytest.raises(ValueError, match="input-axis files"):
        LoRAModule.from_tensors("m", base, tensors)
    tensors["dora_scale"] = torch.ones(3)  # neither axis
    with pytest.raises(ValueError, match="dora_scale"):
        LoRAModule.from_tensors("m", base, tensors)


# ----- 4. merge, strength, dropout -------------------------------------------------------------------------------
@pytest.mark.parametrize(("kind", "variant"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_merge_matches_hook_and_unmerge_is_exact(kind, variant, strength):
    ours = make_ours(kind, variant)
    x = make_input(kind)
    original = ours.base.weight.detach().clone()
    with torch.no_grad():
        ours.multiplier = strength
        hooked = hook_output(ours, x)
        ours.merge()  # strength None → the multiplier
        merged = ours.base(x)
        assert_close(merged, hooked, f"merge vs hook {variant} s={strength}")
        # Merged: the hook and module(x) must not add the update a second time.
        ours.attach()
        assert torch.equal(ours.base(x), merged)
        ours.detach_hook()
        assert torch.equal(ours(x), merged)
        with pytest.raises(RuntimeError):
            ours.merge()
        ours.unmerge()
        assert torch.equal(ours.base.weight, original)
        assert not ours.merged
        assert torch.equal(hook_output(ours, x), hooked)


@pytest.mark.parametrize(("kind", "variant"), CASES, ids=CASE_IDS)
def test_multiplier_zero_is_exactly_base(kind, variant):
    ours = make_ours(kind, variant)
    x = make_input(kind)
    with torch.no_grad():
        clean = ours.base(x)
        ours.multiplier = 0.0
        assert torch.equal(hook_output(ours, x), clean)
        assert torch.equal(ours(x), clean)
        ours.multiplier = 1.0
        assert not torch.allclose(ours(x), clean)


@pytest.mark.parametrize("kernel", [1, 3])
@pytest.mark.parametrize("padding_mode", ["reflect", "circular", "replicate"])
def test_non_zero_padding_mode(kernel, padding_mode):
    """The bypass must pad like the base (reflect/circular/replicate), i.e. agree with the merged weight."""
    for variant in ("plain", "tucker", "dora") if kernel == 3 else ("plain", "dora"):
        torch.manual_seed(0)
        base = nn.Conv2d(6, 8, kernel, stride=2, padding=2, padding_mode=padding_mode)
        ours = make_ours("conv3x3", variant, base=base)
        x = make_input("conv3x3")
        with torch.no_grad():
            hooked = hook_output(ours, x)
            ours.merge()
            assert_close(hooked, ours.base(x), f"padding_mode={padding_mode} {variant}")
            ours.unmerge()


def _outputs(module: LoRAModule, x: torch.Tensor, n: int = 8) -> list[torch.Tensor]:
    with torch.no_grad():
        return [module(x) for _ in range(n)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("option", ["dropout", "rank_dropout", "module_dropout"])
def test_dropouts_train_only(kind, option):
    torch.manual_seed(0)
    x = make_input(kind)
    reference = make_ours(kind)
    ours = make_ours(kind, **{option: 0.5})
    with torch.no_grad():
        expected = reference(x)
        clean = ours.base(x)

    ours.eval()
    for out in _outputs(ours, x):
        assert torch.equal(out, expected)
    assert torch.equal(hook_output(ours, x), expected)

    ours.train()
    outs = _outputs(ours, x, 16)
    assert any(not torch.allclose(out, expected) for out in outs)
    if option == "module_dropout":
        # Whole adapter skipped (exact base output) or fully applied, never anything in between.
        assert any(torch.equal(out, clean) for out in outs)
        assert all(torch.equal(out, clean) or torch.allclose(out, expected, rtol=0, atol=1e-6) for out in outs)
        ours.attach()
        try:
            with torch.no_grad():
                hooked = [ours.base(x) for _ in range(16)]
        finally:
            ours.detach_hook()
        assert any(torch.equal(out, clean) for out in hooked) and any(not torch.equal(out, clean) for out in hooked)
    else:
        assert all(not torch.equal(out, clean) for out in outs)
        ours.attach()
        try:
            with torch.no_grad():
                assert not torch.allclose(ours.base(x), expected)
        finally:
            ours.detach_hook()


def test_rank_dropout_drops_whole_rank_channels_per_sample():
    """Each sample's update is ``scale·Σ_m keep_m·up[:, m]·(down·x)_m / (1−p)`` for one 0/1 mask over the ranks
    (kohya's rank dropout), shared by every token / pixel of that sample."""
    p = 0.5
    for kind in KINDS:
        ours = make_ours(kind, rank_dropout=p).train()
        x = make_input(kind)
        with torch.no_grad():
            clean = ours.base.forward(x)
            per_rank = []  # the update of each rank channel alone
            for m in range(RANK):
                weight = (ours.lora_up[:, m:m + 1].flatten(1) @ ours.lora_down[m:m + 1].flatten(1)) * ours.scale
                per_rank.append(weight_out(ours.base, x, weight.reshape(ours.weight_shape)) - weight_out(
                    ours.base, x, torch.zeros(ours.weight_shape)))
            per_rank = torch.stack(per_rank)  # (rank, batch, ...)
            masks = [torch.tensor([(i >> m) & 1 for m in range(RANK)], dtype=torch.float32) for i in range(2**RANK)]
            seen = set()
            for _ in range(4):
                delta = ours(x) - clean
                for b in range(x.shape[0]):
                    fits = [i for i, mask in enumerate(masks) if torch.allclose(
                        delta[b], torch.einsum("m,m...->...", mask / (1 - p), per_rank[:, b]), atol=1e-5)]
                    assert fits, f"{kind}: sample {b} is not a rank-channel subset of the update"
                    seen.add(fits[0])
            assert len(seen) > 1, f"{kind}: the mask never changed"


# ----- 5. config and registry ------------------------------------------------------------------------------------
def test_unknown_option_names_key_and_allowed():
    with pytest.raises(ConfigError) as err:
        LoRAConfig.from_dict({"rank": 8, "rnak": 4, "use_tuker": True})
    message = str(err.value)
    assert "rnak" in message and "use_tuker" in message
    for key in ("rank", "alpha", "conv_rank", "conv_alpha", "use_tucker", "dora", "dropout", "rank_dropout",
                "module_dropout"):
        assert key in message.split("allowed:")[1]


@pytest.mark.parametrize("key", ["dropout", "rank_dropout", "module_dropout"])
@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5, float("nan"), "abc", None])
def test_bad_dropout_values_raise(key, value):
    with pytest.raises(ConfigError, match=key):
        LoRAConfig.from_dict({key: value})


def test_config_accepts_good_values():
    config = LoRAConfig.from_dict({"rank": 8, "alpha": 4, "dropout": 0.1, "rank_dropout": 0.0, "module_dropout": 0.5,
                                   "use_tucker": True, "dora": True, "conv_rank": 4})
    assert config.rank_and_alpha_for(make_base("conv3x3")) == (4, 4.0)
    assert config.rank_and_alpha_for(make_base("linear")) == (8, 4.0)
    for bad in ({"rank": 0}, {"rank": "x"}, {"conv_rank": -1}):
        with pytest.raises(ConfigError):
            LoRAConfig.from_dict(bad)


def test_registry_names():
    assert get_method("lora") is LoRAModule
    assert get_method("LoCon") is LoRAModule
    assert get_method("LORA") is LoRAModule
    with pytest.raises(ConfigError) as err:
        get_method("nonesuch")
    assert "nonesuch" in str(err.value) and "lora" in str(err.value).split("available:")[1]
