"""Data-parallel training on the CPU: ``torchrun --nproc_per_node 2 -m trainer train`` against one process.

Two processes × batch 2 and one process × batch 2 × gradient accumulation 2 have the same global batch (4) and,
by construction, see the same samples per optimizer step: the sampler's batches are dealt round-robin to the
processes, and each sample's noise and timestep are keyed by its global batch index, not by the process. The
gradients then differ only in the order of float32 additions (an all-reduce mean of two micro-batch gradients
vs. two accumulated backward passes of loss/2), i.e. by a few ulps per step; over 4 AdamW steps that stays far
below the 1e-5 we allow (measured: bit-identical on this machine).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import build_model, make_config, of_kind, read_event_log, run, write_images

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("multiprocess")
    model = build_model(root, "sd1", tokenizer_dir)
    write_images(root / "data" / "1_zq", 8, caption="a photo of zq")
    return root, model


def torchrun() -> list[str]:
    found = shutil.which("torchrun")
    return [found] if found else [sys.executable, "-m", "torch.distributed.run"]


def train_two_processes(config, tmp_path: Path, **env: str) -> None:
    config_path = tmp_path / "run.toml"
    config_path.write_text(config.to_toml())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **env}
    command = [*torchrun(), "--standalone", "--nproc_per_node", "2", "-m", "trainer", "train",
               "--config", str(config_path)]
    completed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=540)
    assert completed.returncode == 0, (completed.stdout + completed.stderr)[-4000:]


def test_two_processes_match_one_with_the_same_global_batch(setup, tmp_path):
    root, model = setup
    # sd-scripts' noise options on: every draw is keyed per sample, so they keep the processes equal too
    noise = {"noise_offset": 0.05, "noise_offset_random_strength": True, "adaptive_noise_scale": 0.02,
             "multires_noise_iterations": 3, "ip_noise_gamma": 0.1, "ip_noise_gamma_random_strength": True}
    # the prior loss ratio too: measured by the main process, base-model images drawn once
    settings = {"train": {"max_steps": 4, "batch_size": 2, "learning_rate": 1e-2, "prior_every_n_steps": 2,
                          "prior_images": 2, **noise},
                "dataset": {"flip": True}, "output": {"save_every_n_steps": 2}}
    config = make_config(model["folder"], root / "data", tmp_path / "two", **settings)
    train_two_processes(config, tmp_path)

    events = read_event_log(tmp_path / "two")
    kinds = [e["event"] for e in events]
    assert kinds.count("start") == 1 and kinds.count("done") == 1  # only the main process reports
    (ready,) = of_kind(events, "ready")
    assert ready["processes"] == 2 and ready["global_batch_size"] == 4
    saves = of_kind(events, "save")
    assert [(s["step"], s["final"]) for s in saves] == [(2, False), (4, True)]  # saved once per save point
    files = sorted(p.name for p in (tmp_path / "two").glob("*.safetensors"))
    assert files == ["adapter-step000002.safetensors", "adapter.safetensors"]
    two_losses = [e["loss"] for e in of_kind(events, "step")]
    two_ratios = [(e["step"], e["ratio"]) for e in of_kind(events, "prior")]
    assert [step for step, _ in two_ratios] == [0, 2, 4] and two_ratios[0][1] == 1.0

    torch.set_num_threads(1)
    single = config.with_overrides([f"output.dir='{tmp_path / 'one'}'", "train.gradient_accumulation=2"])
    one, one_events = run(single)
    assert of_kind(one_events, "ready")[0]["global_batch_size"] == 4
    loss_difference = max(abs(a - b) for a, b in zip(one.losses, two_losses))
    a, b = load_file(one.output_file), load_file(tmp_path / "two" / "adapter.safetensors")
    assert a.keys() == b.keys()
    weight_difference = max(float((a[k] - b[k]).abs().max()) for k in a)
    scale = max(float(t.abs().max()) for k, t in a.items() if not k.endswith("alpha"))
    print(f"losses 1 process {one.losses}\n       2 processes {two_losses}\n"
          f"max |Δloss| {loss_difference:.3g}, max |Δweight| {weight_difference:.3g} (weights up to {scale:.3g})")
    assert len(two_losses) == len(one.losses) == 4
    one_ratios = [(e["step"], e["ratio"]) for e in of_kind(one_events, "prior")]
    assert [s for s, _ in one_ratios] == [0, 2, 4]
    assert max(abs(a[1] - b[1]) for a, b in zip(one_ratios, two_ratios)) <= 1e-5
    assert loss_difference <= 1e-5
    assert weight_difference <= 1e-5 * max(1.0, scale)


def test_two_compiled_processes_match_one_eager_process(setup, tmp_path):
    """train.compile in a 2-process run: each process compiles its own graphs (Dynamo + AOTAutograd here, Inductor's
    code generation would take minutes on this CPU) and the run trains what one eager process trains."""
    root, model = setup
    settings = {"train": {"max_steps": 3, "batch_size": 2, "learning_rate": 1e-2, "compile": True}}
    config = make_config(model["folder"], root / "data", tmp_path / "two", **settings)
    train_two_processes(config, tmp_path, RANKWRIGHT_COMPILE_BACKEND="aot_eager")
    events = read_event_log(tmp_path / "two")
    assert of_kind(events, "compiled") and not of_kind(events, "warning")
    two_losses = [e["loss"] for e in of_kind(events, "step")]

    torch.set_num_threads(1)
    single = config.with_overrides([f"output.dir='{tmp_path / 'one'}'", "train.gradient_accumulation=2",
                                    "train.compile=false"])
    one, _ = run(single)
    assert len(two_losses) == len(one.losses) == 3
    assert all(abs(two - eager) <= 2e-3 * abs(eager) for two, eager in zip(two_losses, one.losses))
    a, b = load_file(one.output_file), load_file(tmp_path / "two" / "adapter.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(b[key], a[key], rtol=0, atol=2e-3 * (float(a[key].abs().max()) or 1.0)), key
