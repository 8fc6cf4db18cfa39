"""The rebuild path: an adapter lends its layer ``W + s·ΔW`` for one call instead of adding ``ΔW·x`` afterwards.

It must give the output-path result, train the same parameters, leave the layer's own Parameter in place outside
the call (also when the call raises), stack with other adapters on the same layer, and survive recomputation under
gradient checkpointing.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from methods.loha import LoHaConfig, LoHaModule
from methods.lokr import LoKrConfig, LoKrModule
from methods.lora import LoRAConfig, LoRAModule
from methods.oft import OFTConfig, OFTModule


def conv_loha(base: nn.Module | None = None) -> LoHaModule:
    """A LoHa on a 3×3 conv: ΔW is built for any product there, so every call rebuilds."""
    torch.manual_seed(0)
    base = base if base is not None else nn.Conv2d(6, 8, 3, padding=1).requires_grad_(False)
    module = LoHaModule("loha", base, LoHaConfig(rank=2, alpha=2))
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.normal_(0.0, 0.3)
    return module


def conv_input() -> torch.Tensor:
    return torch.randn(2, 6, 5, 5)


def linear_module(cls, config) -> nn.Module:
    torch.manual_seed(0)
    module = cls("m", nn.Linear(12, 10).requires_grad_(False), config)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3)
    return module


CASES = {
    "loha-conv3x3": lambda: (conv_loha(), conv_input()),
    # the other path here is LoHa's rank-r² product fused into one addmm with the frozen output
    "loha-linear": lambda: (linear_module(LoHaModule, LoHaConfig(rank=2, alpha=2)), torch.randn(2, 40, 12)),
    "lora-dora": lambda: (linear_module(LoRAModule, LoRAConfig(rank=3, alpha=2, dora=True)), torch.randn(2, 40, 12)),
    "loha-dora": lambda: (linear_module(LoHaModule, LoHaConfig(rank=3, alpha=2, dora=True)), torch.randn(2, 40, 12)),
    "lokr-dora": lambda: (linear_module(LoKrModule, LoKrConfig(rank=3, alpha=2, dora=True)), torch.randn(2, 40, 12)),
    "oft": lambda: (linear_module(OFTModule, OFTConfig(block_size=5)), torch.randn(2, 40, 12)),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_rebuild_matches_the_output_path_and_trains_the_same_parameters(case, strength, monkeypatch):
    module, x = CASES[case]()
    module.multiplier = strength
    assert module.rebuilds_weight(x)  # many positions per input feature: the default for these
    results = []
    for rebuild in (True, False):
        monkeypatch.setattr(type(module), "rebuilds_weight", lambda self, x, r=rebuild: r)
        module.zero_grad(set_to_none=True)
        module.attach()
        out = module.base(x)
        module.detach_hook()
        out.square().sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in module.parameters()]))
    (lent, lent_grads), (added, added_grads) = results
    torch.testing.assert_close(lent, added, rtol=1e-5, atol=1e-5)
    assert len(lent_grads) == len(added_grads)
    for a, b in zip(lent_grads, added_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert module.base.weight.grad is None


def test_the_layer_keeps_its_own_parameter_outside_the_call():
    module = conv_loha()
    base = module.base
    own = base.weight
    module.attach()
    x = conv_input()
    seen = []
    hook = base.register_forward_pre_hook(lambda m, args: seen.append(m._parameters["weight"]))  # runs after ours
    adapted = base(x)
    hook.remove()
    assert base.weight is own and isinstance(base.weight, nn.Parameter)
    assert seen and seen[0] is not own  # the call itself ran with the lent weight
    assert list(base.state_dict()) == ["weight", "bias"] and base.state_dict()["weight"] is not None
    frozen = base.forward(x)  # calling forward directly skips the hooks: the frozen layer
    torch.testing.assert_close(frozen, nn.functional.conv2d(x, own, base.bias, padding=1))
    assert not torch.allclose(adapted, frozen)


def test_a_failing_call_still_returns_the_parameter():
    module = conv_loha()
    base = module.base
    own = base.weight
    module.attach()
    with pytest.raises(RuntimeError):
        base(torch.randn(2, 5, 5, 5))  # wrong channel count
    assert base.weight is own


def test_stacked_adapters_add_up_whatever_path_each_takes():
    torch.manual_seed(1)
    base = nn.Conv2d(6, 8, 3, padding=1).requires_grad_(False)
    first = conv_loha(base)
    second = conv_loha(base)
    with torch.no_grad():
        second.hada_w1_a.mul_(-0.5)
    lora = LoRAModule("lora", base, LoRAConfig(rank=2, alpha=2, conv_rank=2, conv_alpha=2))
    with torch.no_grad():
        lora.lora_up.normal_(0.0, 0.3)
    x = conv_input()
    expected = nn.functional.conv2d(x, base.weight + first.delta_weight() + second.delta_weight()
                                    + lora.delta_weight(), base.bias, padding=1)
    for module in (first, lora, second):
        module.attach()
    assert first.rebuilds_weight(x) and second.rebuilds_weight(x) and not lora.rebuilds_weight(x)
    torch.testing.assert_close(base(x), expected, rtol=1e-5, atol=1e-5)
    assert isinstance(base.weight, nn.Parameter)
    second.detach_hook()
    expected_two = nn.functional.conv2d(x, base.weight + first.delta_weight() + lora.delta_weight(), base.bias,
                                        padding=1)
    torch.testing.assert_close(base(x), expected_two, rtol=1e-5, atol=1e-5)


def test_gradient_checkpointing_recomputes_the_lent_weight():
    module = conv_loha()
    module.attach()
    x = conv_input().requires_grad_(True)
    plain = module.base(x)
    plain.square().sum().backward()
    expected = [p.grad.clone() for p in module.parameters()]
    module.zero_grad(set_to_none=True)
    checkpointed = checkpoint(module.base, x, use_reentrant=False)
    checkpointed.square().sum().backward()
    for parameter, grad in zip(module.parameters(), expected):
        torch.testing.assert_close(parameter.grad, grad)
    assert isinstance(module.base.weight, nn.Parameter)


def test_which_methods_rebuild():
    """LoHa on k×k convs and wide-enough positions, LoKr on k×k convs, OFT with many positions, DoRA with more
    positions than input features; never plain LoRA, never with dropouts on ΔW·x (no weight expresses them)."""
    conv = nn.Conv2d(6, 8, 3, padding=1)
    x = conv_input()
    assert LoHaModule("a", conv, LoHaConfig(rank=2)).rebuilds_weight(x)
    few = torch.randn(1, 6, 3, 3)  # 9 positions, 54 input features
    assert not LoHaModule("a", conv, LoHaConfig(rank=2, dora=True)).rebuilds_weight(few)
    assert LoHaModule("a", conv, LoHaConfig(rank=2, dora=True)).rebuilds_weight(torch.randn(4, 6, 8, 8))
    dropped = LoHaModule("a", conv, LoHaConfig(rank=2, rank_dropout=0.1))
    assert not dropped.train().rebuilds_weight(x) and dropped.eval().rebuilds_weight(x)
    assert LoKrModule("a", conv, LoKrConfig(rank=2)).rebuilds_weight(x)
    linear = nn.Linear(320, 320)
    assert not LoKrModule("a", linear, LoKrConfig(rank=4)).rebuilds_weight(torch.randn(1, 64, 320))
    assert not LoRAModule("a", conv, LoRAConfig(rank=2)).rebuilds_weight(x)
    oft = OFTModule("a", linear, OFTConfig(block_size=32))
    assert oft.rebuilds_weight(torch.randn(4, 4096, 320)) and not oft.rebuilds_weight(torch.randn(1, 256, 320))
    wide = LoHaModule("a", nn.Linear(5120, 1280), LoHaConfig(rank=4))
    assert not wide.rebuilds_weight(torch.randn(1, 16, 5120))  # the rank-r² product is cheaper there
    assert LoHaModule("a", linear, LoHaConfig(rank=16)).rebuilds_weight(torch.randn(1, 256, 320))


@pytest.mark.parametrize("case", list(CASES))
def test_lent_weight_in_half_precision_under_autocast(case):
    """As on a GPU: frozen base in bf16, adapters in fp32, autocast. The lent weight takes the base's dtype, the
    gradients reach the fp32 parameters and match the fp32 run within bf16 precision."""
    module, x = CASES[case]()
    module.attach()
    out32 = module.base(x)
    out32.square().sum().backward()
    reference = [p.grad.clone() for p in module.parameters()]
    module.zero_grad(set_to_none=True)
    module.base.to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert module.rebuilds_weight(x)
        out16 = module.base(x.to(torch.bfloat16))
    assert out16.dtype == torch.bfloat16 and module.base.weight.dtype == torch.bfloat16
    out16.float().square().sum().backward()
    for parameter, expected in zip(module.parameters(), reference):
        assert parameter.dtype == torch.float32 and torch.isfinite(parameter.grad).all()
        cosine = torch.nn.functional.cosine_similarity(parameter.grad.flatten(), expected.flatten(), dim=0)
        assert cosine > 0.98
