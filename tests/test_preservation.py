"""Differential output preservation (trainer.preservation, train.output_preservation_weight): the captions it
makes, its term of the loss (zero for an adapter that changes nothing, positive when it bleeds, gradients only to
the adapter), and on the toy model that it keeps the adapted model nearer the base on prompts without the trigger."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from train_helpers import build_model, make_config, of_kind, write_images, write_trigger_data

from methods.base import ConfigError
from trainer import events as ev
from trainer.dataset import collate_batch
from trainer.loop import Trainer
from trainer.preservation import OutputPreservation

FAST_SAMPLE = {"steps": 2, "guidance_scale": 1.0}


def test_the_trigger_is_replaced_or_removed_as_a_whole_word():
    removed = OutputPreservation(["zb"], "", 1.0)
    assert removed.captions(["a large red circle on a zb background", "zb, red circle, white", "a zbx circle",
                             "a red circle"]) == (
        ["a large red circle on a background", "red circle, white", "a zbx circle", "a red circle"],
        [True, True, False, False])
    named = OutputPreservation(["sks dog", "sks"], "dog", 1.0)
    assert named.captions(["a photo of sks dog running", "sks on grass"])[0] == ["a photo of dog running",
                                                                               "dog on grass"]
    with pytest.raises(ValueError):
        OutputPreservation([], "", 1.0)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer_dir):
    built: dict[str, dict[str, Path]] = {}

    def get(arch: str) -> dict[str, Path]:
        if arch not in built:
            built[arch] = build_model(tmp_path_factory.mktemp(f"preservation-{arch}"), arch, tokenizer_dir)
        return built[arch]

    return get


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return write_trigger_data(tmp_path / "data")


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_the_term_is_zero_for_an_adapter_that_changes_nothing_and_grows_when_it_bleeds(arch, models, data, tmp_path):
    events: list[dict] = []
    trainer = Trainer(make_config(models(arch)["folder"], data, tmp_path / "out", sample=FAST_SAMPLE,
                                  train={"max_steps": 1, "output_preservation_weight": 1.0}), on_event=events.append)
    trainer.run()
    assert of_kind(events, "ready")[0]["preserved_words"] == ["zq"]
    assert "without 'zq' held to the base model" in ev.Ready(preserved_words=["zq"]).text()
    state, network = trainer.state, trainer.state.network
    batch = collate_batch([trainer.data.dataset[i] for i in range(4)])
    keys = [("test", i) for i in range(4)]

    def losses(captions: list[str]) -> tuple[float, float]:
        batch["captions"] = captions
        with torch.no_grad():
            return (float(trainer._training_loss(state, batch, keys)),
                    float(trainer._training_loss(state, batch, keys, preserve=True)))

    with_trigger = ["a photo of zq"] * 4
    with torch.no_grad():
        for name, param in network.named_parameters():
            if "lora_up" in name:
                param.zero_()
    plain, preserved = losses(with_trigger)
    assert preserved == plain  # the adapted model is the base model: nothing to preserve
    with torch.no_grad():
        for param in network.parameters():
            param.normal_(0.0, 0.3)
    plain, preserved = losses(with_trigger)
    assert preserved > plain * 1.01
    assert losses(["a photo"] * 4)[0] == losses(["a photo"] * 4)[1]  # no trigger in the batch: no term

    # the term's gradient reaches the adapter (and nothing of the frozen model)
    batch["captions"] = with_trigger
    network.zero_grad(set_to_none=True)
    loaded = trainer.models
    noised = loaded.objective.noised(loaded.latents(batch), keys)

    def predict(captions: list[str]) -> torch.Tensor:
        return loaded.predict(noised, loaded.conditioning(captions, 1, None, True), batch, trainer.accelerator.autocast)

    trainer.data.preservation.loss(network, with_trigger, batch["loss_weights"], predict).backward()
    assert any(param.grad is not None and param.grad.abs().sum() > 0 for param in network.parameters())
    assert all(param.grad is None for param in loaded.denoiser.parameters())


def test_a_run_without_a_trigger_word_to_preserve_is_refused_before_loading(models, tmp_path):
    model = models("sd1")
    root = tmp_path / "data"
    write_images(root / "1_photos", 4, caption=None)
    config = make_config(model["folder"], root, tmp_path / "out", train={"max_steps": 1,
                                                                        "output_preservation_weight": 1.0})
    with pytest.raises(ConfigError, match="dataset.trigger_word"):
        Trainer(config).run()
    with pytest.raises(ConfigError, match="output_preservation_weight must be ≥ 0"):
        make_config(model["folder"], root, tmp_path / "out", train={"output_preservation_weight": -1.0}).validate()


def toy_run(out: Path, **train) -> list[dict]:
    from test_prior import toy_config

    events: list[dict] = []
    Trainer(toy_config(out, **train), on_event=events.append).run()
    return events


@pytest.mark.slow
def test_on_the_toy_model_preservation_keeps_prompts_without_the_trigger_nearer_the_base(tmp_path):
    """The demo's new colour at a high rate, with and without the term, measured by the prior loss ratio (the
    adapted model's loss on the base model's own images of unrelated prompts over the base's)."""
    settings = {"max_steps": 60, "learning_rate": 3e-3, "text_encoder_lr": 1e-3, "prior_every_n_steps": 60,
                "prior_images": 6}
    plain = of_kind(toy_run(tmp_path / "plain", **settings), "prior")[-1]["ratio"]
    held = of_kind(toy_run(tmp_path / "held", output_preservation_weight=1.0, **settings), "prior")[-1]["ratio"]
    assert plain > 1.0 and held < plain - 0.5 * (plain - 1.0), (plain, held)
