"""OFT / BOFT checked against LyCORIS 4.1.3 (the reference for the ``oft_blocks`` layout) and PEFT where comparable.

Every parity case fills our blocks (and rescale) with random values, copies them into LyCORIS's
``DiagOFTModule`` / ``ButterflyOFTModule`` on a copy of the same base layer, and compares ΔW and the forward in fp32.
"""

from __future__ import annotations

import copy

import pytest
import torch
from lycoris.functional.general import factorization as lycoris_factorization
from lycoris.functional.general import power2factorization as lycoris_power2factorization
from lycoris.modules.boft import ButterflyOFTModule
from lycoris.modules.diag_oft import DiagOFTModule
from torch import nn
from torch.overrides import TorchFunctionMode

import methods.oft as oft_module
from methods.base import ConfigError
from methods.boft import BOFTConfig, BOFTModule, boft_delta_weight
from methods.oft import OFTConfig, OFTModule, cayley, factorization, oft_delta_weight, power2factorization
from methods.registry import get_method, method_for_file_module

OUT, IN = 80, 24  # 80 = 5·16: exercises LyCORIS's swap (OFT) and a non-power-of-two block size (BOFT b = 10)

BASES = {
    "linear": lambda: nn.Linear(IN, OUT),
    "conv1x1": lambda: nn.Conv2d(IN, OUT, 1),
    "conv3x3": lambda: nn.Conv2d(IN, OUT, 3, padding=1),
}

OFT_VARIANTS = {
    "size4": {"block_size": 4},  # (20, 4, 4)
    "count10": {"block_count": 10},  # factor 8 → (10, 8, 8)
    "size20_swapped": {"block_size": 20},  # LyCORIS keeps b ≤ n: (20, 4, 4)
    "size4_coft": {"block_size": 4, "constraint": 0.01},  # clamps (‖Q‖ ≈ 11 > 0.8)
    "size4_coft_loose": {"block_size": 4, "constraint": 1.0},  # bound 80, never reached
    "count10_coft": {"block_count": 10, "constraint": 0.02},
    "size4_rescale": {"block_size": 4, "rescale": True},
    "size4_coft_rescale": {"block_size": 4, "constraint": 0.01, "rescale": True},
}
BOFT_VARIANTS = {
    "default": {},  # block factor 16 → b = 10, n = 8, m = 4
    "size20": {"block_size": 20},  # b = 20, n = 4, m = 3
    "count4": {"block_count": 4},  # factor 20 → same as size20
    "m2": {"boft_m": 2},
    "m1": {"boft_m": 1},
    "coft": {"constraint": 0.01},
    "rescale": {"rescale": True},
    "m2_coft_rescale": {"boft_m": 2, "constraint": 0.01, "rescale": True},
}
CASES = [("oft", name) for name in OFT_VARIANTS] + [("boft", name) for name in BOFT_VARIANTS]
CASE_IDS = [f"{method}-{name}" for method, name in CASES]



def make_input(base: nn.Module) -> torch.Tensor:
    return torch.randn(2, 5, IN) if isinstance(base, nn.Linear) else torch.randn(2, IN, 6, 6)


def options_for(method: str, variant: str) -> dict:
    return (OFT_VARIANTS if method == "oft" else BOFT_VARIANTS)[variant]


def make_ours(method: str, variant: str, base: nn.Module, fill: bool = True, std: float = 0.5):
    options = options_for(method, variant)
    module = OFTModule("m", base, OFTConfig(**options)) if method == "oft" else BOFTModule("m", base,
                                                                                         BOFTConfig(**options))
    if fill:
        with torch.no_grad():
            module.oft_blocks.normal_(0.0, std)
            if module.rescaled:
                module.rescale.uniform_(0.5, 1.5)
    return module


def make_lycoris(method: str, ours, base: nn.Module):
    """The LyCORIS module built the way its kohya/wrapper code builds it, holding our blocks."""
    cls = DiagOFTModule if method == "oft" else ButterflyOFTModule
    lyco = cls("m", base, 1.0, lora_dim=ours.config.block_factor(OUT), constraint=ours.constraint,
               rescaled=ours.rescaled)
    with torch.no_grad():
        if lyco.oft_blocks.shape != ours.oft_blocks.shape:
            # Only BOFT with boft_m below the maximum: LyCORIS's module always allocates log2(n)+1 stages, but its
            # functional code reads m from the tensor, so the stage count is the only thing that differs.
            assert method == "boft" and lyco.oft_blocks.shape[1:] == ours.oft_blocks.shape[1:]
            lyco.oft_blocks = nn.Parameter(ours.oft_blocks.detach().clone())
        else:
            lyco.oft_blocks.copy_(ours.oft_blocks)
        if ours.rescaled:
            lyco.rescale.copy_(ours.rescale)
    return lyco


def build(kind: str, method: str, variant: str, seed: int = 0, std: float = 0.5):
    torch.manual_seed(seed)
    base = BASES[kind]()
    ours = make_ours(method, variant, base, std=std)
    lyco = make_lycoris(method, ours, copy.deepcopy(base))
    return base, ours, lyco


def lycoris_forward(lyco, x: torch.Tensor) -> torch.Tensor:
    lyco.apply_to()
    return lyco.org_module[0](x)


def assert_rel(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5) -> None:
    """Max abs error ≤ tol · max |expected|."""
    err = (actual.detach() - expected.detach()).abs().max().item()
    scale = expected.detach().abs().max().item()
    assert err <= tol * max(scale, 1e-12), f"max error {err:.3e} vs scale {scale:.3e}"


# ----- factorisation ------------------------------------------------------------------------------------------
def test_factorizations_match_lycoris():
    for dim in range(1, 400):
        for factor in [-1, 0, *range(1, 70)]:
            assert factorization(dim, factor) == lycoris_factorization(dim, factor), (dim, factor)
            assert power2factorization(dim, factor) == lycoris_power2factorization(dim, factor), (dim, factor)


@pytest.mark.parametrize("out", [320, 640, 1280, 768, 3072])
@pytest.mark.parametrize("block", [-1, 4, 8, 16, 32, 64])
def test_factorizations_match_lycoris_on_sd_widths(out, block):
    assert factorization(out, block) == lycoris_factorization(out, block)
    assert power2factorization(out, block) == lycoris_power2factorization(out, block)


def test_block_shapes():
    assert OFTConfig(block_size=4).block_shape(OUT) == (20, 4, 4)
    assert OFTConfig(block_count=10).block_shape(OUT) == (10, 8, 8)
    assert OFTConfig(block_size=20).block_shape(OUT) == (20, 4, 4)  # LyCORIS: b ≤ n_blocks
    assert OFTConfig().block_shape(OUT) == (10, 8, 8)
    assert BOFTConfig().block_shape(OUT) == (4, 8, 10, 10)
    assert BOFTConfig().block_shape(320) == (6, 32, 10, 10)  # spec §2.5 example (factor 16)
    assert BOFTConfig(boft_m=99).block_shape(OUT) == (4, 8, 10, 10)  # clamped like lycoris weight_gen
    assert BOFTConfig(block_size=20, boft_m=2).block_shape(OUT) == (2, 4, 20, 20)


# ----- parity with LyCORIS ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(BASES))
@pytest.mark.parametrize(("method", "variant"), CASES, ids=CASE_IDS)
def test_delta_weight_matches_lycoris(kind, method, variant):
    base, ours, lyco = build(kind, method, variant)
    assert tuple(lyco.oft_blocks.shape) == tuple(ours.oft_blocks.shape)
    expected, _ = lyco.get_diff_weight(1.0)
    assert_rel(ours.delta_weight(), expected)
    assert_rel(base.weight + ours.delta_weight(), lyco.make_weight(1.0))
    pure = (oft_delta_weight if method == "oft" else boft_delta_weight)(
        base.weight, ours.oft_blocks, ours.threshold, ours.rescale if ours.rescaled else None)
    assert torch.equal(pure, ours.delta_weight())


@pytest.mark.parametrize("kind", list(BASES))
@pytest.mark.parametrize(("method", "variant"), CASES, ids=CASE_IDS)
def test_small_rotations_match_lycoris_through_the_series(kind, method, variant, monkeypatch):
    """Blocks as training leaves them (‖Q‖ ≪ 1) take the CPU series, not the LU; ΔW and the forward still equal
    LyCORIS's within 1e-5 of the *change* they make (not of W, which would hide an error in a small ΔW)."""
    series_results = []
    series = oft_module._doubled_shift_by_series
    monkeypatch.setattr(oft_module, "_doubled_shift_by_series",
                        lambda doubled: series_results.append(series(doubled)) or series_results[-1])
    base, ours, lyco = build(kind, method, variant, std=0.02)
    expected, _ = lyco.get_diff_weight(1.0)
    assert_rel(ours.delta_weight(), expected)
    assert series_results and all(result is not None for result in series_results)
    x = make_input(base)
    with torch.no_grad():
        reference = lycoris_forward(lyco, x)
        assert_rel(ours(x) - base(x), reference - base(x))


@pytest.mark.parametrize("size", [4, 10, 32])
@pytest.mark.parametrize("std", [0.0, 1e-4, 1e-2, 0.05, 0.5])
def test_cayley_shift_series_and_solve_agree_with_float64(size, std):
    """``R − I`` to fp32 rounding whichever path runs: the series for small Q, the LU beyond (std 0.5 always;
    0.05 for 32-wide blocks), and without the cancellation of forming ``R`` first."""
    torch.manual_seed(size)
    blocks = torch.randn(64, size, size) * std
    q = (blocks - blocks.mT).double()
    eye = torch.eye(size, dtype=torch.float64)
    expected = 2 * torch.linalg.solve(eye - q, q)
    shift = oft_module.cayley_shift(blocks)
    assert shift.dtype == torch.float32
    scale = expected.abs().max().item()
    assert (shift.double() - expected).abs().max().item() <= 2e-6 * max(scale, 1e-30)
    took_series = oft_module._doubled_shift_by_series(2 * q.float()) is not None
    assert took_series == (std < 0.05 or (std == 0.05 and size < 32))


@pytest.mark.parametrize("std", [1e-3, 0.3])  # the series, the LU
@pytest.mark.parametrize("constrained", [False, True])
def test_cayley_shift_gradient(std, constrained):
    """The hand-written backward (``dS = 2X·dQ·X``, and the COFT factor's own gradient) against finite differences."""
    torch.manual_seed(0)
    blocks = (torch.randn(3, 6, 6, dtype=torch.float64) * std).requires_grad_()
    scale = torch.tensor(0.7, dtype=torch.float64, requires_grad=True) if constrained else None
    inputs = (blocks, scale) if constrained else (blocks,)
    assert torch.autograd.gradcheck(lambda b, *s: oft_module._CayleyShift.apply(b, s[0] if s else None), inputs)


def test_cayley_shift_stays_fp32_under_autocast(monkeypatch):
    """Autocast must not lower the series' products to bfloat16 (they would never reach fp32 rounding)."""
    series_results = []
    series = oft_module._doubled_shift_by_series
    monkeypatch.setattr(oft_module, "_doubled_shift_by_series",
                        lambda doubled: series_results.append(series(doubled)) or series_results[-1])
    torch.manual_seed(0)
    blocks = (torch.randn(16, 8, 8) * 0.02).requires_grad_()
    expected = oft_module.cayley_shift(blocks)
    (expected_grad,) = torch.autograd.grad(expected.square().sum(), blocks)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        shift = oft_module.cayley_shift(blocks)
        (grad,) = torch.autograd.grad(shift.square().sum(), blocks)
    assert shift.dtype == torch.float32 and all(result is not None for result in series_results)
    torch.testing.assert_close(shift, expected, rtol=0, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-6, atol=1e-9)


def test_cayley_shift_of_non_finite_blocks_does_not_hang():
    blocks = torch.full((2, 4, 4), float("nan"))
    assert torch.isnan(oft_module.cayley_shift(blocks)).all()
    assert oft_module._doubled_shift_by_series(blocks) is None


@pytest.mark.parametrize("side", ["output", "weight"])
@pytest.mark.parametrize("kind", list(BASES))
@pytest.mark.parametrize(("method", "variant"), CASES, ids=CASE_IDS)
def test_forward_matches_lycoris(kind, method, variant, side, monkeypatch):
    """Both places the rotation can run (the output, or the weight's rows then ΔW·x) give LyCORIS's forward."""
    monkeypatch.setattr(oft_module, "ROTATION_SIDE", side)
    base, ours, lyco = build(kind, method, variant)
    x = make_input(base)
    expected = lycoris_forward(lyco, x)
    assert_rel(ours(x), expected)
    ours.attach()
    assert_rel(base(x), expected)  # the hook path


@pytest.mark.parametrize("kind", list(BASES))
@pytest.mark.parametrize(("method", "variant"), CASES, ids=CASE_IDS)
def test_forward_matches_lycoris_bypass_without_bias(kind, method, variant):
    """LyCORIS's bypass mode (the output rotation ours mirrors) rotates the bias along with ``W·x``, which disagrees
    with its own merged weight whenever the base has a bias; ours removes the bias first, so compare bias-free."""
    base, ours, lyco = build(kind, method, variant)
    base.bias = None
    lyco.org_module[0].bias = None
    lyco.bypass_mode = True
    x = make_input(base)
    assert_rel(ours(x), lycoris_forward(lyco, x))


@pytest.mark.parametrize("kind", list(BASES))
@pytest.mark.parametrize("variant", ["size4", "count10_coft"])
def test_oft_strength_is_linear_like_lycoris(kind, variant):
    """Without rescale LyCORIS OFT blends linearly too (``W + s(RᵀW − W)``), so it matches at any s."""
    base, ours, lyco = build(kind, "oft", variant)
    x = make_input(base)
    ours.multiplier = lyco.multiplier = 0.4
    assert_rel(ours(x), lycoris_forward(lyco, x))
    assert_rel(0.4 * ours.delta_weight(), lyco.get_diff_weight(0.4)[0])


@pytest.mark.parametrize("kind", list(BASES))
@pytest.mark.parametrize(("method", "variant"), [("oft", "size4_rescale"), ("boft", "default"), ("boft", "rescale")])
def test_strength_blends_the_whole_delta(kind, method, variant):
    """Deviation, by design: strength is ``W + s·ΔW`` everywhere (A1111). LyCORIS applies s per BOFT stage and
    leaves OFT's rescale unscaled, so at s ∉ {0, 1} it gives a different layer; at s = 1 they agree (tests above)."""
    base, ours, lyco = build(kind, method, variant)
    x = make_input(base)
    s = 0.4
    ours.multiplier = s
    delta_at_one, _ = lyco.get_diff_weight(1.0)
    blended = nn.functional.linear(x, base.weight + s * delta_at_one, base.bias) if kind == "linear" else \
        nn.functional.conv2d(x, base.weight + s * delta_at_one, base.bias, padding=base.padding)
    assert_rel(ours(x), blended)
    lyco.multiplier = s
    assert not torch.allclose(ours(x), lycoris_forward(lyco, x), rtol=1e-4, atol=1e-4)


# ----- rotation and identities ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("method", "variant"), CASES, ids=CASE_IDS)
def test_rotation_is_orthogonal(method, variant):
    _, ours, _ = build("linear", method, variant)
    r = ours.rotation()
    eye = torch.eye(r.shape[-1]).expand_as(r)
    torch.testing.assert_close(r.transpose(-1, -2) @ r, eye, rtol=0, atol=1e-5)
    assert r.dtype == torch.float32


def test_constraint_clamps_the_skew_norm():
    _, ours, _ = build("linear", "oft", "size4_coft")
    q = ours.oft_blocks - ours.oft_blocks.transpose(-1, -2)
    assert q.norm() > ours.threshold  # the variant really clamps
    scaled = q * ours.threshold / (q.norm() + 1e-8)
    eye = torch.eye(4)
    torch.testing.assert_close(ours.rotation(), (eye + scaled) @ torch.linalg.inv(eye - scaled), rtol=0, atol=1e-6)
    loose = build("linear", "oft", "size4_coft_loose")[1]
    torch.testing.assert_close(loose.rotation(), cayley(loose.oft_blocks), rtol=0, atol=0)


@pytest.mark.parametrize("kind", list(BASES))
@pytest.mark.parametrize(("method", "variant"), [("oft", "size4_rescale"), ("boft", "rescale")])
def test_zero_init_is_identity(kind, method, variant):
    torch.manual_seed(0)
    base = BASES[kind]()
    ours = make_ours(method, variant, base, fill=False)
    x = make_input(base)
    assert torch.count_nonzero(ours.delta_weight()) == 0
    assert torch.equal(ours(x), base.forward(x))


@pytest.mark.parametrize("kind", list(BASES))
@pytest.mark.parametrize(("method", "variant"), CASES, ids=CASE_IDS)
def test_strength_zero_is_base_exactly(kind, method, variant):
    base, ours, _ = build(kind, method, variant)
    x = make_input(base)
    frozen = base.forward(x)
    assert torch.equal(ours.transform_output(x, frozen, 0.0), frozen)
    ours.multiplier = 0.0
    assert torch.equal(ours(x), frozen)
    ours.attach()
    assert torch.equal(base(x), frozen)


@pytest.mark.parametrize("kind", list(BASES))
@pytest.mark.parametrize(("method", "variant"), CASES, ids=CASE_IDS)
def test_merge_unmerge_restores_exactly(kind, method, variant):
    base, ours, _ = build(kind, method, variant)
    x = make_input(base)
    original = base.weight.detach().clone()
    ours.multiplier = 0.7
    ours.attach()
    live = base(x)
    ours.merge()
    assert ours.merged
    assert_rel(base(x), live)  # the hook stands aside while merged
    ours.unmerge()
    assert torch.equal(base.weight, original)
    assert torch.equal(base(x), live)


@pytest.mark.parametrize("kind", list(BASES))
@pytest.mark.parametrize(("method", "variant"), [("oft", "size4_coft_rescale"), ("boft", "m2_coft_rescale")])
def test_output_rotation_never_builds_the_weight(kind, method, variant, monkeypatch):
    """Rotating the frozen output: no tensor shaped like W (or its flattened/transposed forms) appears."""
    monkeypatch.setattr(oft_module, "ROTATION_SIDE", "output")
    base, ours, _ = build(kind, method, variant)
    x = make_input(base)
    frozen = base.forward(x)
    monkeypatch.setattr(ours, "delta_weight", lambda: pytest.fail("forward built ΔW"))
    weight_shapes = {tuple(base.weight.shape), (OUT, base.weight[0].numel()), (base.weight[0].numel(), OUT)}

    class ShapeRecorder(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.shapes = set()

        def __torch_function__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            for item in result if isinstance(result, (tuple, list)) else (result,):
                if isinstance(item, torch.Tensor):
                    self.shapes.add(tuple(item.shape))
            return result

    with ShapeRecorder() as recorder:
        out = ours.transform_output(x, frozen, 1.0)
    assert not recorder.shapes & weight_shapes
    assert out.shape == frozen.shape


@pytest.mark.parametrize("side", ["output", "weight"])
@pytest.mark.parametrize("kind", list(BASES))
@pytest.mark.parametrize(("method", "variant"), [("oft", "size4_rescale"), ("boft", "m2_coft_rescale")])
def test_gradients_reach_blocks_and_rescale(kind, method, variant, side, monkeypatch):
    monkeypatch.setattr(oft_module, "ROTATION_SIDE", side)
    torch.manual_seed(0)
    base = BASES[kind]()
    base.requires_grad_(False)
    ours = make_ours(method, variant, base, fill=False)  # B = 0: training starts at the identity
    x = make_input(base)
    out = ours(x)
    (out * torch.randn_like(out)).sum().backward()
    assert ours.oft_blocks.grad is not None and ours.oft_blocks.grad.abs().sum() > 0
    assert ours.rescale.grad is not None and ours.rescale.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", list(BASES))
@pytest.mark.parametrize(("method", "variant"), [("oft", "size4_rescale"), ("boft", "m2_coft_rescale")])
def test_both_rotation_sides_train_alike(kind, method, variant, monkeypatch):
    """Output and weight side give the same gradients, so switching by position count changes no training."""
    grads = []
    for side in ("output", "weight"):
        monkeypatch.setattr(oft_module, "ROTATION_SIDE", side)
        base, ours, _ = build(kind, method, variant)
        torch.manual_seed(1)
        x = make_input(base).requires_grad_(True)
        out = ours(x)
        (out * torch.randn_like(out)).sum().backward()
        grads.append([ours.oft_blocks.grad, ours.rescale.grad, x.grad])
    for output_side, weight_side in zip(*grads):
        assert_rel(weight_side, output_side)


def test_rotation_side_follows_the_cost_model():
    """Fewer positions than input features rotate the output; many more rotate the weight (BOFT's stages sooner)."""
    oft = OFTModule("m", nn.Linear(320, 320), OFTConfig(block_size=32))  # b = 10, one stage
    boft = BOFTModule("m", nn.Linear(320, 320), BOFTConfig(block_size=32))  # b = 20, n = 16, m = 5 stages
    assert boft.oft_blocks.shape[0] == 5 and oft.block_size == 10
    for module in (oft, boft):
        assert not module.rotates_weight(256) and module.rotates_weight(4096) and module.rotates_weight(16384)
    assert boft.rotates_weight(360) and not oft.rotates_weight(360)
    wide = BOFTModule("m", nn.Linear(5120, 1280), BOFTConfig(block_size=32))
    assert not wide.rotates_weight(4096)  # 5120 input features: the output side stays cheaper


@pytest.mark.parametrize(("method", "variant"), [("oft", "size4"), ("boft", "default")])
def test_small_rotation_survives_bfloat16(method, variant):
    """``R − I`` is formed in fp32 before the cast, so a near-identity rotation is not rounded to I in bf16: the
    bf16 delta is within 2 % of the fp32 one (casting R itself to bf16 would be ~35 % off for OFT here)."""
    torch.manual_seed(0)
    base = nn.Linear(IN, OUT).to(torch.bfloat16)
    ours = make_ours(method, variant, base, fill=False)
    with torch.no_grad():
        ours.oft_blocks.normal_(0.0, 1e-3)
    channels = base.forward(torch.randn(4, IN, dtype=torch.bfloat16)) - base.bias
    rotation = ours.rotation()
    half = ours.channel_delta(channels, rotation)
    exact = ours.channel_delta(channels.float(), rotation)
    assert half.dtype == torch.bfloat16 and exact.abs().max() > 0
    assert_rel(half.float(), exact, 0.02)
    frozen = base.forward(torch.randn(4, IN, dtype=torch.bfloat16))
    assert ours.transform_output(None, frozen, 1.0).dtype == torch.bfloat16


# ----- file layout ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(BASES))
@pytest.mark.parametrize("portable", [True, False])
@pytest.mark.parametrize(("method", "variant"), CASES, ids=CASE_IDS)
def test_export_round_trip(kind, method, variant, portable):
    base, ours, _ = build(kind, method, variant)
    tensors = ours.export_tensors(portable=portable)
    assert tensors["alpha"].dim() == 0
    assert ("rescale" in tensors) == ours.rescaled
    assert set(tensors) <= {"oft_blocks", "alpha", "rescale"}
    assert tensors["oft_blocks"].dim() == (3 if method == "oft" else 4)
    loaded = OFTModule.from_tensors("m", base, tensors)  # OFT claims the suffix and routes 4-D blocks to BOFT
    assert type(loaded) is type(ours)
    assert loaded.oft_blocks.shape == ours.oft_blocks.shape
    if portable:
        assert tensors["alpha"].item() == 0.0 and loaded.constraint == 0.0
    else:
        assert tensors["alpha"].item() == pytest.approx(ours.constraint)
    if ours.constraint == 0:
        assert torch.equal(loaded.delta_weight(), ours.delta_weight())
    else:  # baked blocks, or the constraint read back from an fp32 alpha: equal to rounding
        assert_rel(loaded.delta_weight(), ours.delta_weight(), 1e-6)


@pytest.mark.parametrize(("method", "variant"), [(m, v) for m, v in CASES if "coft" in v], ids=lambda v: str(v))
def test_baked_constraint_equals_live_constraint(method, variant):
    base, ours, _ = build("conv3x3", method, variant)
    tensors = ours.export_tensors()
    assert tensors["alpha"].item() == 0.0
    baked = tensors["oft_blocks"]
    q = baked - baked.transpose(-1, -2)
    assert q.norm() <= ours.threshold * (1 + 1e-6)
    unconstrained = cayley(baked)
    torch.testing.assert_close(unconstrained, ours.rotation(), rtol=0, atol=1e-6)
    loaded = OFTModule.from_tensors("m", base, tensors)
    assert_rel(loaded.delta_weight(), ours.delta_weight(), 1e-6)


@pytest.mark.parametrize("kind", list(BASES))
@pytest.mark.parametrize("portable", [True, False])
@pytest.mark.parametrize(("method", "variant"), CASES, ids=CASE_IDS)
def test_exported_tensors_load_into_lycoris(kind, method, variant, portable):
    base, ours, _ = build(kind, method, variant)
    tensors = ours.export_tensors(portable=portable)
    cls = DiagOFTModule if method == "oft" else ButterflyOFTModule
    args = ("m", copy.deepcopy(base), tensors["oft_blocks"], tensors.get("rescale"), tensors["alpha"])
    x = make_input(base)
    with torch.no_grad():
        if method == "boft" and "boft_m" in options_for(method, variant):
            # LyCORIS's loader allocates log2(n)+1 stages and cannot take fewer (our boft_m option documents this):
            # copy_ raises, or with one stage silently broadcasts it to every stage (a different layer).
            try:
                lyco = cls.make_module_from_state_dict(*args)
            except RuntimeError:
                return
            assert lyco.oft_blocks.shape[0] != ours.boft_m == 1
            return
        lyco = cls.make_module_from_state_dict(*args)
    assert lyco.constraint == pytest.approx(float(tensors["alpha"]) * OUT)
    assert_rel(ours(x), lycoris_forward(lyco, x))


@pytest.mark.parametrize("kind", list(BASES))
@pytest.mark.parametrize(("method", "variant"), CASES, ids=CASE_IDS)
def test_lycoris_state_dict_loads_into_ours(kind, method, variant):
    base, ours, lyco = build(kind, method, variant, seed=1)
    state = {key: value.detach() for key, value in lyco.state_dict().items()}
    assert set(state) == {"oft_blocks", "alpha"} | ({"rescale"} if ours.rescaled else set())
    assert method_for_file_module(set(state)) is OFTModule
    loaded = OFTModule.from_tensors("m", copy.deepcopy(base), state)
    assert type(loaded) is type(ours)
    assert loaded.constraint == pytest.approx(ours.constraint)  # LyCORIS's alpha is the COFT constraint
    assert_rel(loaded.delta_weight(), lyco.get_diff_weight(1.0)[0])
    x = make_input(base)
    assert_rel(loaded(x), lycoris_forward(lyco, x))


def test_from_tensors_rejects_bad_shapes():
    base = nn.Linear(IN, OUT)
    with pytest.raises(ValueError):
        OFTModule.from_tensors("m", base, {"oft_blocks": torch.zeros(3, 4, 4), "alpha": torch.tensor(0.0)})
    with pytest.raises(ValueError):
        OFTModule.from_tensors("m", base, {"oft_blocks": torch.zeros(80), "alpha": torch.tensor(0.0)})
    with pytest.raises(ValueError):  # 5 stages > log2(8) + 1
        OFTModule.from_tensors("m", base, {"oft_blocks": torch.zeros(5, 8, 10, 10), "alpha": torch.tensor(0.0)})
    with pytest.raises(ValueError):  # n not a power of two
        OFTModule.from_tensors("m", base, {"oft_blocks": torch.zeros(1, 10, 8, 8), "alpha": torch.tensor(0.0)})
    # A b > n layout LyCORIS's own constructor would not produce is still read as written (A1111/ComfyUI do).
    loaded = OFTModule.from_tensors("m", base, {"oft_blocks": torch.zeros(4, 20, 20)})
    assert loaded.oft_blocks.shape == (4, 20, 20) and loaded.constraint == 0.0


# ----- config and registry ----------------------------------------------------------------------------------
def test_config_validation():
    with pytest.raises(ConfigError, match="block_size or block_count"):
        OFTConfig.from_dict({"block_size": 4, "block_count": 4})
    with pytest.raises(ConfigError):
        OFTConfig.from_dict({"constraint": -1.0})
    with pytest.raises(ConfigError):
        OFTConfig.from_dict({"rank": 4})
    with pytest.raises(ConfigError):
        BOFTConfig.from_dict({"boft_m": 0})
    with pytest.raises(ConfigError):
        BOFTConfig.from_dict({"block_size": 1})
    assert BOFTConfig.from_dict({"block_count": 4, "boft_m": 2, "constraint": 0.1, "rescale": True}).boft_m == 2
    with pytest.raises(ConfigError):
        BOFTModule("m", nn.Linear(IN, 7), BOFTConfig())


def test_wants():
    linear, conv1, conv3 = nn.Linear(IN, OUT), nn.Conv2d(IN, OUT, 1), nn.Conv2d(IN, OUT, 3)
    for config in (OFTConfig(), BOFTConfig()):
        assert config.wants(linear) and config.wants(conv1) and config.wants(conv3)
        assert not config.wants(nn.Conv2d(8, 8, 3, groups=2))
    for config in (OFTConfig(include_conv=False), BOFTConfig(include_conv=False)):
        assert config.wants(linear) and config.wants(conv1) and not config.wants(conv3)
    assert OFTConfig().wants(nn.Linear(IN, 7))
    assert not BOFTConfig().wants(nn.Linear(IN, 7))  # odd width: no butterfly (LyCORIS raises)


def test_registry():
    assert get_method("oft") is OFTModule and get_method("diag-oft") is OFTModule
    assert get_method("boft") is BOFTModule
    assert OFTModule.delta_uses_base and BOFTModule.delta_uses_base
    assert OFTModule.description and BOFTModule.description
    assert method_for_file_module({"oft_blocks", "alpha", "rescale"}) is OFTModule
    assert not BOFTModule.claims({"oft_blocks"})


# ----- PEFT ---------------------------------------------------------------------------------------------------
def test_peft_oft_is_our_rotation_on_the_transposed_layer():
    """PEFT's OFT rotates the *input* of a Linear with ``R_p = (I − Q)(I + Q)⁻¹`` built from the upper triangle of Q
    (spec §5.3.3), so its adapted weight is ``W·blockdiag(R_p)ᵀ = W·blockdiag(R(Q))`` with our ``R(Q) = (I+Q)(I−Q)⁻¹``.
    Ours is ``blockdiag(R(Q))ᵀ·W`` on the rows: the same map on the transposed layer. Comparable only with
    ``use_cayley_neumann=False`` (the exact inverse), no COFT (PEFT's ``coft`` is a per-block projection with
    ``eps``, not ``alpha·out``), Linear only (PEFT's conv OFT rotates unfolded input patches)."""
    from peft import OFTConfig as PeftOFTConfig
    from peft import inject_adapter_in_model

    torch.manual_seed(0)
    ours = make_ours("oft", "size4", nn.Linear(IN, OUT, bias=False))

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(OUT, IN, bias=False)

    holder = Holder()
    with torch.no_grad():
        holder.proj.weight.copy_(ours.base.weight.T)
    config = PeftOFTConfig(r=0, oft_block_size=4, target_modules=["proj"], use_cayley_neumann=False)
    layer = inject_adapter_in_model(config, holder).proj
    q = ours.oft_blocks.detach() - ours.oft_blocks.detach().transpose(-1, -2)
    rows, cols = torch.triu_indices(4, 4, 1)
    with torch.no_grad():
        layer.oft_R["default"].weight.copy_(q[:, rows, cols])
    peft_rotation = layer.oft_R["default"].get_weight()  # blockdiag(R_p)
    ours_rotation = torch.block_diag(*ours.rotation())
    torch.testing.assert_close(peft_rotation.T, ours_rotation, rtol=0, atol=1e-5)
    x = torch.randn(3, OUT)
    adapted = ours.base.weight + ours.delta_weight()  # W' (OUT, IN)
    assert_rel(layer(x), x @ adapted)


@pytest.mark.parametrize("method", ["oft", "boft"])
def test_inference_rotation_cache_follows_parameter_changes(method):
    """Without autograd the rotation is cached; an in-place update (optimizer step, load) must invalidate it."""
    module_class = get_method(method)
    base = nn.Linear(32, 32)
    adapter = module_class("x", base, module_class.config_class.from_dict({"block_size": 8}))
    adapter.attach()
    x = torch.randn(3, 32)
    with torch.no_grad():
        nn.init.normal_(adapter.oft_blocks, std=0.05)
        first = base(x)
        assert torch.equal(first, base(x))
        adapter.oft_blocks.add_(0.05 * torch.randn_like(adapter.oft_blocks))  # a constant would cancel in B − Bᵀ
        changed = base(x)
    assert not torch.allclose(first, changed)
    assert torch.allclose(changed, base(x), atol=1e-6)  # autograd path recomputes: same answer


# ----- one Cayley solve per model call ---------------------------------------------------------------------
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize(("method", "options"), [("oft", {"block_size": 8}), ("boft", {"block_size": 8}),
                                                 ("oft", {"block_size": 8, "constraint": 0.01})])
def test_shared_cayley_solve_trains_like_one_solve_per_layer(method, options, checkpointing):
    """The network solves every layer's rotations at once per UNet call; gradients equal per-layer solves, with
    gradient checkpointing (whose recomputation runs after the call) too, and nothing outlives the call."""
    from methods.network import AdapterNetwork, model_parts
    from methods.targets import TargetConfig
    from trainer.architectures import build_unet

    torch.manual_seed(0)
    unet = build_unet("sd1", tiny=True).requires_grad_(False)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    network = AdapterNetwork.create(model_parts(unet, [], "sd1"), "sd1", method, options,
                                    TargetConfig(preset="attention_mlp"))
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.normal_(0.0, 0.05)
    latents = torch.randn(2, 4, 8, 8)
    hidden = torch.randn(2, 77, unet.config.cross_attention_dim)
    timesteps = torch.tensor([10, 500])

    def gradients(shared: bool) -> tuple[list[int], list[torch.Tensor]]:
        network.zero_grad(set_to_none=True)
        if shared:
            network.attach()
        else:
            for adapter in network:
                adapter.attach()
        calls = []
        first_layer = next(iter(network)).base  # observes the adapters while the UNet call is under way
        probe = first_layer.register_forward_pre_hook(
            lambda m, a: calls.append(sum(x._shared_shift is not None for x in network)))
        unet(latents, timesteps, encoder_hidden_states=hidden).sample.square().mean().backward()
        probe.remove()
        network.detach()
        return calls, [p.grad.clone() for p in network.parameters()]

    (shared_calls, shared), (_, separate) = gradients(True), gradients(False)
    expected_shared = 0 if options.get("constraint") else len(network)
    assert shared_calls[0] == expected_shared
    for a, b in zip(shared, separate):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in shared)
    with torch.no_grad():
        for adapter in network:
            adapter.oft_blocks.add_(0.01)  # an optimizer step: the shared slices are stale from here on
    assert all(adapter.rotation_shift() is not (adapter._shared_shift or (None,))[0] for adapter in network)
