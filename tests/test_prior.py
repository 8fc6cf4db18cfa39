"""Forgetting (trainer.prior): the prior loss ratio, checkpoints.json and its pick, the early stop on the prior
ratio, and the regularisation images of ``python -m trainer regularise``. Tiny SD1 models, 16 px images."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from train_helpers import build_model, make_config, of_kind, write_images, write_trigger_data

from methods.base import ConfigError
from trainer.cli import main as cli_main
from trainer.config import TrainerConfig
from trainer.loop import Trainer
from trainer.prior import (
    CHECKPOINTS_FILE,
    CheckpointLog,
    CheckpointRecord,
    best_checkpoint,
    regularisation_prompts,
    remove_words,
)

FAST_SAMPLE = {"steps": 2, "guidance_scale": 1.0}


@pytest.fixture(scope="module")
def model(tmp_path_factory, tokenizer_dir):
    return build_model(tmp_path_factory.mktemp("prior-model"), "sd1", tokenizer_dir)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return write_trigger_data(tmp_path / "data")


def trainer_run(model, data, out, **sections):
    events: list[dict] = []
    sections = {**sections, "sample": {**FAST_SAMPLE, **sections.get("sample", {})}}
    trainer = Trainer(make_config(model["folder"], data, out, **sections), on_event=events.append)
    return trainer, trainer.run(), events


# ==================================================================================================== the ratio
def test_prior_ratio_is_one_for_a_zero_adapter_and_stays_flat(model, data, tmp_path):
    trainer, _, events = trainer_run(model, data, tmp_path / "out",
                                     train={"max_steps": 2, "prior_every_n_steps": 1, "prior_images": 3})
    priors = of_kind(events, "prior")
    assert [e["step"] for e in priors] == [0, 1, 2]
    assert priors[0]["ratio"] == 1.0  # the fresh LoRA is exactly zero
    assert priors[0]["images"] == 3 and priors[0]["source"] == "base-model images"
    assert priors[1]["ratio"] != 1.0
    meter, network = trainer.forgetting.meter, trainer.state.network
    with torch.no_grad():
        for name, param in network.named_parameters():
            if "lora_up" in name:
                param.zero_()
    network.eval()
    assert [meter.measure()["ratio"] for _ in range(3)] == [1.0, 1.0, 1.0]  # the same noise every time
    with torch.no_grad():
        for param in network.parameters():
            param.normal_(0.0, 0.3)
    assert meter.measure()["ratio"] != 1.0
    network.set_multiplier(0.0)
    assert meter.measure()["ratio"] == 1.0


def toy_config(out: Path, **train) -> TrainerConfig:
    from test_toy_learning import demo_config

    config = demo_config(out)
    config.sample.every_n_steps, config.sample.prompts = 0, []
    for key, value in train.items():
        setattr(config.train, key, value)
    config.validate()
    return config


def test_on_the_toy_model_the_ratio_rises_as_the_adapter_bleeds_and_stops_the_run(tmp_path):
    """A model that knows its prior (the toy model): training the demo's new colour raises the adapted model's
    loss on the base model's own images of unrelated prompts; train.prior_stop_ratio ends the run with a save."""
    events: list[dict] = []
    config = toy_config(tmp_path / "out", max_steps=60, prior_every_n_steps=5, prior_images=4,
                        prior_stop_ratio=1.03)
    result = Trainer(config, on_event=events.append).run()
    ratios = [event["ratio"] for event in of_kind(events, "prior")]
    assert ratios[0] == 1.0 and ratios[-1] > 1.03 and ratios[-1] == max(ratios)
    assert result.stopped_early and result.steps < 60 and "train.prior_stop_ratio" in result.reason
    assert result.output_file is not None and result.output_file.is_file()
    report = json.loads((tmp_path / "out" / CHECKPOINTS_FILE).read_text())
    assert report["checkpoints"][-1]["step"] == result.steps
    assert report["checkpoints"][-1]["prior_ratio"] == ratios[-1]


def test_regularisation_images_are_the_prior_set_and_generated_images_are_cached(model, data, tmp_path):
    reg = tmp_path / "reg"
    write_images(reg, 2, caption="a photo", seed=7)
    _, _, events = trainer_run(model, data, tmp_path / "out",
                               dataset={"reg_dir": str(reg)}, train={"max_steps": 1, "prior_every_n_steps": 1})
    assert of_kind(events, "prior")[0]["source"] == "regularisation images"
    assert of_kind(events, "prior")[0]["images"] == 2
    assert not (tmp_path / "out" / "cache" / "prior").exists()
    # base-model images: drawn once into the workspace cache, reused by the next run of the same settings
    settings = {"train": {"max_steps": 1, "prior_every_n_steps": 1, "prior_images": 2}, "output": {"overwrite": True}}
    _, _, first = trainer_run(model, data, tmp_path / "gen", **settings)
    cached = sorted((tmp_path / "gen" / "cache" / "prior").glob("*/*.png"))
    assert len(cached) == 2
    stamps = [p.stat().st_mtime_ns for p in cached]
    _, _, second = trainer_run(model, data, tmp_path / "gen", **settings)
    assert [p.stat().st_mtime_ns for p in cached] == stamps
    assert not [e for e in second if e["event"] == "phase" and e["phase"] == "prior" and e["done"]]
    assert of_kind(first, "prior")[0]["base_loss"] == of_kind(second, "prior")[0]["base_loss"]


# ==================================================================================================== checkpoints
def test_best_checkpoint_on_synthetic_records():
    records = [CheckpointRecord(100, "a", 0.30, 1.01), CheckpointRecord(200, "b", 0.20, 1.05),
               CheckpointRecord(300, "c", 0.10, 1.40), CheckpointRecord(400, "d", 0.05, 2.00)]
    assert best_checkpoint(records, max_prior_ratio=1.1)[0].path == "b"  # c and d fit better but bleed
    assert best_checkpoint(records, max_prior_ratio=1.5)[0].path == "c"
    best, why = best_checkpoint(records, max_prior_ratio=1.0)
    assert best.path == "a" and "lowest ratio" in why  # all past the tolerance: the least bleeding
    no_validation = [{"step": 1, "path": "x", "prior_ratio": 1.0}, {"step": 2, "path": "y", "prior_ratio": 1.02},
                     {"step": 3, "path": "z", "prior_ratio": 1.3}]
    assert best_checkpoint(no_validation, 1.1)[0].path == "y"  # the most trained within tolerance
    assert best_checkpoint([], 1.1) is None


def test_runs_sharing_a_folder_keep_each_others_saves(tmp_path):
    """The UI's runs share outputs/: a fresh run starts its own records over, never another run's."""
    def save(log: CheckpointLog, step: int, file: str, ratio: float) -> None:
        (tmp_path / file).write_bytes(b"")
        log.measured(step, prior_ratio=ratio)
        log.saved(step, tmp_path / file)

    first = CheckpointLog(tmp_path, 1.1, name="first")
    save(first, 2, "first-step000002.safetensors", 1.05)
    save(first, 4, "first.safetensors", 1.3)
    second = CheckpointLog(tmp_path, 1.1, name="second")
    save(second, 2, "second.safetensors", 1.2)
    report = json.loads((tmp_path / CHECKPOINTS_FILE).read_text())
    assert [Path(r["path"]).name for r in report["checkpoints"]] == [
        "first-step000002.safetensors", "first.safetensors", "second.safetensors"]
    assert Path(report["best"]["path"]).name == "second.safetensors"  # the writing run's pick
    again = CheckpointLog(tmp_path, 1.1, name="first")  # "first" trained anew (output.overwrite)
    save(again, 3, "first.safetensors", 1.0)
    names = [Path(r["path"]).name for r in json.loads((tmp_path / CHECKPOINTS_FILE).read_text())["checkpoints"]]
    assert names == ["second.safetensors", "first.safetensors"]


def test_a_run_writes_checkpoints_json_with_the_pick(model, data, tmp_path):
    out = tmp_path / "out"
    _, result, events = trainer_run(model, data, out,
                                    dataset={"validation_split": 0.5},
                                    train={"max_steps": 6, "prior_every_n_steps": 3, "prior_images": 2,
                                           "validation_every_n_steps": 3},
                                    output={"save_every_n_steps": 2, "save_state": False})
    report = json.loads((out / CHECKPOINTS_FILE).read_text())
    assert [r["step"] for r in report["checkpoints"]] == [2, 4, 6]
    assert all(r["validation_loss"] is not None and r["prior_ratio"] is not None for r in report["checkpoints"])
    assert report["checkpoints"][-1]["path"] == str(result.output_file)
    best = report["best"]
    expected, _ = best_checkpoint(report["checkpoints"], report["max_prior_ratio"])
    assert best["path"] == expected.path and Path(best["path"]).is_file()
    assert of_kind(events, "best_checkpoint")[0]["path"] == best["path"]
    assert of_kind(events, "done")[0]["best_checkpoint"] == best["path"]
    from safetensors import safe_open

    with safe_open(str(result.output_file), framework="pt") as handle:
        metadata = handle.metadata()
    final = report["checkpoints"][-1]
    assert float(metadata["rankwright_prior_ratio"]) == pytest.approx(final["prior_ratio"], rel=1e-5)
    assert float(metadata["rankwright_validation_loss"]) == pytest.approx(final["validation_loss"], rel=1e-5)
    picked = json.loads(metadata["rankwright_best_checkpoint"])
    assert picked["step"] == best["step"]


def test_an_extended_run_keeps_the_earlier_saves_in_checkpoints_json(model, data, tmp_path):
    out = tmp_path / "out"
    config = make_config(model["folder"], data, out, train={"max_steps": 2, "prior_every_n_steps": 1,
                                                            "prior_images": 2}, sample=FAST_SAMPLE)
    Trainer(config).run()
    Trainer(config.with_overrides(["train.max_steps=3"]), resume=out / "adapter-state").run()
    records = json.loads((out / CHECKPOINTS_FILE).read_text())["checkpoints"]
    assert [(r["step"], Path(r["path"]).name) for r in records] == [(2, "adapter-step000002.safetensors"),
                                                                     (3, "adapter.safetensors")]
    assert all(r["prior_ratio"] is not None for r in records)


def test_prior_options_are_checked(model, data, tmp_path):
    base = {"train": {"prior_every_n_steps": 0, "prior_stop_ratio": 1.5}}
    with pytest.raises(ConfigError, match="prior_every_n_steps"):
        make_config(model["folder"], data, tmp_path, **base)
    with pytest.raises(ConfigError, match="above 1.0"):
        make_config(model["folder"], data, tmp_path, train={"prior_every_n_steps": 5, "prior_stop_ratio": 0.9})
    with pytest.raises(ConfigError, match="prior_images"):
        make_config(model["folder"], data, tmp_path, train={"prior_images": 0})


# ==================================================================================================== regularise
def test_prompts_lose_the_trigger(data, tmp_path, model):
    assert remove_words("zq, a red ball", ["zq"]) == "a red ball"
    assert remove_words("a photo of zq", ["zq"]) == "a photo of"
    assert remove_words("a large zq circle, zq", ["zq"]) == "a large circle"
    config = make_config(model["folder"], data, tmp_path)
    from trainer.dataset import scan_dataset

    items = scan_dataset(config.dataset).train_items
    prompts, words = regularisation_prompts(config, items, count=3)
    assert words == ["zq"]  # the folder's class word, which the captions use
    assert prompts == ["a photo of", "a red ball", "a photo of"]
    config = make_config(model["folder"], data, tmp_path, dataset={"trigger_word": "ball"})
    assert regularisation_prompts(config, items)[1] == ["ball"]


def test_regularise_cli_draws_captioned_images_without_the_trigger_and_reuses_them(model, data, tmp_path, capsys):
    config = make_config(model["folder"], data, tmp_path / "out", sample=FAST_SAMPLE)
    config_path = tmp_path / "run.toml"
    config_path.write_text(config.to_toml())
    assert cli_main(["regularise", "--config", str(config_path), "--count", "3"]) == 0
    folders = list((data.parent / "regularisation").iterdir())
    assert len(folders) == 1
    images = sorted(folders[0].glob("*.png"))
    captions = [p.with_suffix(".txt").read_text() for p in images]
    assert len(images) == 3 and captions == ["a photo of", "a red ball", "a photo of"]
    assert "3 image(s)" in capsys.readouterr().out
    stamps = [p.stat().st_mtime_ns for p in images]
    assert cli_main(["regularise", "--config", str(config_path), "--count", "3"]) == 0
    assert "(3 reused)" in capsys.readouterr().out
    assert [p.stat().st_mtime_ns for p in images] == stamps
    # the folder trains as dataset.reg_dir
    reg_config = TrainerConfig.from_dict({**config.to_dict(), "dataset": {**config.to_dict()["dataset"],
                                                                          "reg_dir": str(folders[0])}})
    from trainer.dataset import scan_dataset

    assert len(scan_dataset(reg_config.dataset).reg_items) == 3
    out = tmp_path / "elsewhere"
    assert cli_main(["regularise", "--config", str(config_path), "--count", "1", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["0000.png", "0000.txt", "regularisation.json"]


# ==================================================================================================== compare
def test_compare_reports_the_prior_ratio_and_goes_on_after_a_prior_stop(tmp_path):
    """On the toy model: a method stopped by train.prior_stop_ratio is done (its own rule), not a stop of the
    comparison; the report has each method's last prior ratio, and the drift lands in its checkpoints.json."""
    from trainer.compare import compare

    config = toy_config(tmp_path / "out", max_steps=20, prior_every_n_steps=5, prior_images=2)
    config.sample.steps = 4
    report = compare(config, ["lora", "loha"], tmp_path / "report", drift_prompts=["a large red circle on a white "
                                                                                   "background"],
                     overrides={"lora": {"train.prior_stop_ratio": 1.01}})
    lora, loha = report.runs
    assert [lora.status, loha.status] == ["done", "done"] and loha.steps == 20
    assert lora.steps < 20 and "train.prior_stop_ratio" in lora.message
    assert all(run.prior_ratio is not None for run in report.runs) and lora.prior_ratio > 1.01
    assert "Prior ratio" in report.markdown()
    for run in report.runs:
        records = json.loads((Path(run.output_file).parent / CHECKPOINTS_FILE).read_text())["checkpoints"]
        assert records[-1]["drift"] == pytest.approx(run.prior_drift)


# ==================================================================================================== any base
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_the_prior_ratio_on_sd3_and_flux(family, tmp_path):
    """The ratio is model-agnostic: the tiny SD3/Flux pipelines draw their prior images and measure it too."""
    from dit_pipelines import tiny_pipeline_factory
    from test_dit_training import BASES, SIZE, dit_config

    folder = tmp_path / BASES[family]
    tiny_pipeline_factory(tmp_path / "tokenizers")(BASES[family]).save_pretrained(folder)
    write_images(tmp_path / "data", 2, size=(SIZE, SIZE), caption="a photo of zq")
    bases = {"folders": {family: folder}, "data": tmp_path / "data"}
    config = dit_config(bases, family, tmp_path / "out", train={"max_steps": 2, "prior_every_n_steps": 1,
                                                                "prior_images": 2}, sample=FAST_SAMPLE)
    events: list[dict] = []
    Trainer(config, on_event=events.append).run()
    ratios = [event["ratio"] for event in of_kind(events, "prior")]
    assert len(ratios) == 3 and ratios[0] == 1.0 and all(math.isfinite(r) and r > 0 for r in ratios)
