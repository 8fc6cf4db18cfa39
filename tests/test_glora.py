"""GLoRA against its oracles: LyCORIS 4's ``GLoRAModule`` (ΔW, forward both ways, gradients, on the same tensors) and
a hand-written transcription of ComfyUI's ``GLoRAAdapter.calculate_weight`` (merging our files, both layouts).

Run with ``-s`` and ``RANKWRIGHT_REPORT_DIFFS=1`` to print the largest differences measured.
"""

from __future__ import annotations

import copy
import os
from collections import defaultdict

import pytest
import torch
from torch import nn

from methods.apply import create_network, load_network, save_network
from methods.files import load_adapter_file
from methods.glora import GLoRAConfig, GLoRAModule, current_layout
from methods.network import group_by_module
from methods.targets import TargetConfig

lycoris_glora = pytest.importorskip("lycoris.modules.glora")

RANK, ALPHA = 3, 2.0
KINDS = {
    "linear": lambda: nn.Linear(12, 10),
    "conv1x1": lambda: nn.Conv2d(6, 8, 1),
    "conv3x3": lambda: nn.Conv2d(6, 8, 3, padding=1),
    "conv3x3_stride2": lambda: nn.Conv2d(6, 8, 3, stride=2, padding=1),
}
DIFFS: dict[str, float] = defaultdict(float)


@pytest.fixture(scope="module", autouse=True)
def _report_diffs():
    yield
    if os.environ.get("RANKWRIGHT_REPORT_DIFFS"):
        print("\nlargest absolute differences measured:")
        for what, value in sorted(DIFFS.items()):
            print(f"  {what:<55} {value:.2e}")


def record(what: str, a: torch.Tensor, b: torch.Tensor) -> float:
    value = (a.double() - b.double()).abs().max().item()
    DIFFS[what] = max(DIFFS[what], value)
    return value


def make_input(kind: str, batch: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    if kind == "linear":
        return torch.randn(batch, 5, 12, generator=generator)
    return torch.randn(batch, 6, 7, 7, generator=generator)


def pair(kind: str) -> tuple[GLoRAModule, nn.Module]:
    """Our module and LyCORIS's on copies of the same base layer, holding the same random (non-zero) tensors."""
    torch.manual_seed(0)
    base = KINDS[kind]().requires_grad_(False)
    ours = GLoRAModule("m", base, GLoRAConfig(rank=RANK, alpha=ALPHA, conv_rank=RANK, conv_alpha=ALPHA))
    with torch.no_grad():
        for parameter in ours.parameters():
            parameter.normal_(0.0, 0.3)
    theirs = lycoris_glora.GLoRAModule("m", copy.deepcopy(base), 1.0, lora_dim=RANK, alpha=ALPHA)
    missing, unexpected = theirs.load_state_dict(ours.export_tensors(), strict=False)
    assert not unexpected and not [k for k in missing if k != "scalar"]
    theirs.apply_to()
    return ours, theirs


@pytest.mark.parametrize("kind", list(KINDS))
def test_delta_weight_and_forward_match_lycoris(kind):
    ours, theirs = pair(kind)
    x = make_input(kind)
    with torch.no_grad():
        theirs_delta = theirs.get_diff_weight()[0]
        assert record(f"ΔW vs LyCORIS [{kind}]", ours.delta_weight(), theirs_delta) <= 1e-6
        expected = theirs(x)
        assert record(f"bypass forward vs LyCORIS bypass [{kind}]", ours.bypass(x) + ours.base(x),
                      theirs.bypass_forward(x, 1.0)) <= 1e-5
        for rebuild in (True, False):  # both paths the hooks can take
            ours.rebuild_is_cheaper = lambda x, r=rebuild: r
            got = ours(x)
            assert record(f"forward vs LyCORIS [{kind}, {'lent weight' if rebuild else 'output path'}]",
                          got, expected) <= 1e-5
        ours.multiplier = theirs.multiplier = 0.6
        assert record(f"forward at strength 0.6 vs LyCORIS [{kind}]", ours(x), theirs(x)) <= 1e-5


@pytest.mark.parametrize("kind", ["linear", "conv3x3"])
def test_gradients_match_lycoris(kind):
    ours, theirs = pair(kind)
    ours.train()
    theirs.train()
    x = make_input(kind)
    ours(x).square().sum().backward()
    theirs(x).square().sum().backward()
    for name in ("a1", "a2", "b1", "b2"):
        ours_grad = getattr(ours, name).grad
        theirs_grad = getattr(theirs, name).weight.grad.reshape(ours_grad.shape)
        scale = theirs_grad.abs().max().item()
        assert record(f"gradient of {name} vs LyCORIS, relative [{kind}]", ours_grad / scale,
                      theirs_grad / scale) <= 1e-5


def test_starts_at_zero_like_lycoris():
    module = GLoRAModule("m", nn.Linear(12, 10), GLoRAConfig(rank=RANK))
    assert torch.count_nonzero(module.delta_weight()) == 0
    assert module.a1.abs().sum() > 0 and module.b1.abs().sum() > 0


# ----- ComfyUI's formula, transcribed by hand from comfy/weight_adapter/glora.py (GLoRAAdapter.calculate_weight) --
def comfy_glora_weight(weight, a1, a2, b1, b2, alpha, strength):
    """``calculate_weight`` without DoRA: layout told from the raw shapes, rank = a2.shape[0] (current layout) or
    a1.shape[0] (old), ``weight += strength·(alpha/rank)·lora_diff`` with the diff in fp32."""
    old_glora = False
    if b2.shape[1] == b1.shape[0] == a1.shape[0] == a2.shape[1]:
        rank = a1.shape[0]
        old_glora = True
    if b2.shape[0] == b1.shape[1] == a1.shape[1] == a2.shape[0]:
        if old_glora and a2.shape[0] == weight.shape[0] and weight.shape[0] == weight.shape[1]:
            pass
        else:
            old_glora = False
            rank = a2.shape[0]
    a1, a2, b1, b2 = (t.flatten(start_dim=1).float() for t in (a1, a2, b1, b2))
    scale = alpha / rank if alpha is not None else 1.0
    if old_glora:
        diff = (b2 @ b1 + (weight.flatten(start_dim=1).float() @ a2) @ a1).reshape(weight.shape)
    else:
        if weight.dim() > 2:
            diff = torch.einsum("o i ..., i j -> o j ...",
                                torch.einsum("o i ..., i j -> o j ...", weight.float(), a1), a2).reshape(weight.shape)
        else:
            diff = ((weight.float() @ a1) @ a2).reshape(weight.shape)
        diff += (b1 @ b2).reshape(weight.shape)
    return weight + (strength * scale * diff).type(weight.dtype)


def comfy_merge(network, path, strength: float, old_layout: bool = False) -> dict[str, torch.Tensor]:
    """Every module of the file merged into a copy of its layer's weight with ComfyUI's formula."""
    tensors, _ = load_adapter_file(path)
    merged = {}
    for name, module in group_by_module(tensors).items():
        a1, a2, b1, b2 = (module[k] for k in ("a1.weight", "a2.weight", "b1.weight", "b2.weight"))
        if old_layout:  # the file as old LyCORIS wrote it: ΔW = B2·B1 + W·A2·A1
            a1, a2, b1, b2 = a2, a1, b2, b1
        weight = network.adapters[name].base.weight.detach().clone()
        merged[name] = comfy_glora_weight(weight, a1, a2, b1, b2, float(module["alpha"]), strength)
    return merged


def test_our_file_merges_as_comfyui_merges_it(tiny_pipeline, randomize, tmp_path):
    pipe = tiny_pipeline("sd1")
    network = create_network(pipe, "glora", {"rank": 4, "alpha": 2.0}, TargetConfig(preset="full"))
    randomize(network, seed=5)
    network.detach()
    path = save_network(network, tmp_path / "glora.safetensors", dtype="fp32")
    assert any(a.is_conv and a.base.kernel_size != (1, 1) for a in network)  # k×k convs are covered too

    loaded, _ = load_network(pipe, path, require_all=True)
    expected = comfy_merge(loaded, path, 0.7)
    loaded.merge(0.7)
    worst = 0.0
    for name, adapter in loaded.adapters.items():
        worst = max(worst, record("our merge vs ComfyUI formula, strength 0.7", adapter.base.weight, expected[name]))
    loaded.unmerge()
    assert worst <= 1e-6

    # The old layout (B2·B1 + W·A2·A1, what A1111 reads): ComfyUI and we read the swapped file alike.
    from safetensors.torch import save_file

    swapped = {}
    for key, tensor in load_adapter_file(path)[0].items():
        name, _, suffix = key.partition(".")
        swap = {"a1.weight": "a2.weight", "a2.weight": "a1.weight", "b1.weight": "b2.weight",
                "b2.weight": "b1.weight"}
        swapped[f"{name}.{swap.get(suffix, suffix)}"] = tensor
    old_path = tmp_path / "glora_old.safetensors"
    save_file(swapped, str(old_path))
    old, _ = load_network(pipe, old_path, require_all=True)
    expected_old = comfy_merge(old, old_path, 1.0, old_layout=True)
    old.merge(1.0)
    worst = max(record("our merge vs ComfyUI formula, old layout", adapter.base.weight, expected_old[name])
                for name, adapter in old.adapters.items())
    old.unmerge()
    assert worst <= 1e-6


def test_layout_detection_follows_comfyui():
    """Square factors (rank = in = out) read as the old layout on a square weight of that side, as ComfyUI does."""
    r = 4
    square = {k: torch.randn(r, r) for k in ("a1.weight", "a2.weight", "b1.weight", "b2.weight")}
    factors, rank = current_layout(square, (r, r))
    assert rank == r and factors["a1.weight"] is square["a2.weight"]  # old: swapped
    factors, _ = current_layout(square, None)
    assert factors["a1.weight"] is square["a1.weight"]
    current = {"a1.weight": torch.randn(12, 3), "a2.weight": torch.randn(3, 12), "b1.weight": torch.randn(10, 3),
               "b2.weight": torch.randn(3, 12)}
    assert current_layout(current, (10, 12))[1] == 3
    with pytest.raises(ValueError, match="neither"):
        current_layout({**current, "a1.weight": torch.randn(5, 5)}, (10, 12))


def test_unsupported_tensors_are_refused_by_name():
    base = nn.Linear(12, 10)
    tensors = GLoRAModule("m", base, GLoRAConfig(rank=RANK)).export_tensors()
    with pytest.raises(ValueError, match="bm.weight"):
        GLoRAModule.from_tensors("m", base, {**tensors, "bm.weight": torch.zeros(3, 3, 1, 1)})
    with pytest.raises(ValueError, match="lacks b2.weight"):
        GLoRAModule.from_tensors("m", base, {k: v for k, v in tensors.items() if k != "b2.weight"})
    with pytest.raises(ValueError, match="dora_scale"):
        GLoRAModule.from_tensors("m", base, {**tensors, "dora_scale": torch.ones(10, 1)})
