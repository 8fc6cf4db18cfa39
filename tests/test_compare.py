"""Method comparison (trainer/compare.py): per-method configs, the report, scores, the CLI, stop and no-overwrite.

Everything runs on the tiny sd1 pipeline of train_helpers: 16 px images, a few steps per method, 2 sampling steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from train_helpers import build_model, make_config, write_images

from methods.base import ConfigError
from trainer import cli
from trainer.compare import (
    DEFAULT_METHODS,
    GENERIC_DRIFT_PROMPTS,
    OPTIONS_KEY,
    RenderPlan,
    compare,
    default_out_dir,
    evaluate_adapters,
    method_config,
    parse_method_override,
    prior_drift,
    render_plan,
)
from trainer.events import StopSignal
from trainer.sampling import make_grid
from ui.jobs import CompareView

STEPS = 3
PROMPTS = ["a photo of zq", "zq on grass"]
DRIFT_PROMPTS = ["a red car", "a blue house"]


@pytest.fixture(scope="module")
def model(tmp_path_factory, tokenizer_dir) -> Path:
    return build_model(tmp_path_factory.mktemp("compare-model"), "sd1", tokenizer_dir)["folder"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("compare-data")
    write_images(root / "1_zq", 3)
    return root


def base_config(model: Path, data: Path, out: Path, **sections):
    """LoRA rank 2 (alpha 1) as the base run; 2 sampling steps for the previews and the drift score."""
    sections.setdefault("network", {"rank": 2, "alpha": 1.0})
    sections.setdefault("train", {"max_steps": STEPS})
    sections.setdefault("sample", {"steps": 2, "prompts": PROMPTS, "every_n_steps": 1})
    return make_config(model, data, out, **sections)


@pytest.fixture(scope="module")
def all_methods(model, data, tmp_path_factory):
    """One comparison of the five methods, shared by the tests that read its report."""
    root = tmp_path_factory.mktemp("compare-all")
    events: list[dict] = []
    report = compare(base_config(model, data, root / "out"), DEFAULT_METHODS, root / "report",
                     overrides={"oft": {"train.learning_rate": 3e-3, "network.block_size": 4}},
                     on_event=events.append, drift_prompts=DRIFT_PROMPTS)
    return report, events


# ================================================================================================ report
def test_every_method_trains_and_is_reported(all_methods):
    report, _ = all_methods
    data = json.loads(report.json_path.read_text())
    assert [run["method"] for run in data["methods"]] == list(DEFAULT_METHODS)
    for run in data["methods"]:
        assert run["status"] == "done", run
        assert run["trainable_parameters"] > 0 and run["file_bytes"] > 0 and run["seconds_per_step"] > 0
        assert len(run["losses"]) == run["steps"] == STEPS and run["final_loss"] == pytest.approx(
            np.mean(run["losses"]))
        assert Path(run["output_file"]).stat().st_size == run["file_bytes"]
        assert Path(run["output_file"]).parent == report.folder / run["method"]
        assert run["prior_drift"] > 0  # a trained adapter changes unrelated prompts a little
        assert run["concept_score"] is None  # only the toy model defines one
    assert data["base"]["concept_score"] is None and not data["stopped"]
    assert data["settings"]["drift_prompts"] == DRIFT_PROMPTS and data["settings"]["preview_prompts"] == PROMPTS
    assert data["settings"]["natural_variation"] > 0
    # Per-run previews are off (the comparison renders every method itself): no samples folder.
    assert not any((report.folder / method / "samples").exists() for method in DEFAULT_METHODS)


def test_options_a_method_does_not_accept_are_dropped_and_overrides_apply(all_methods):
    report, _ = all_methods
    runs = {run.method: run for run in report.runs}
    assert runs["lora"].options == {"rank": 2, "alpha": 1.0} and not runs["lora"].dropped_options
    assert runs["oft"].dropped_options == ["alpha", "rank"] and runs["oft"].options == {"block_size": 4}
    assert runs["loha"].options == {"rank": 2, "alpha": 1.0}
    written = {method: (report.folder / method / f"adapter_{method}.toml").read_text() for method in ("lora", "oft")}
    assert "learning_rate = 0.003" in written["oft"] and "learning_rate = 0.001" in written["lora"]
    assert "block_size = 4" in written["oft"] and "rank" not in written["oft"]


def test_grid_has_a_row_per_method_below_the_base_model(all_methods):
    report, _ = all_methods
    grid = Image.open(report.grid)
    blank = Image.new("RGB", (16, 16))
    labels = ["base", *DEFAULT_METHODS]
    expected = make_grid(rows=[[blank] * len(PROMPTS)] * len(labels), row_labels=labels, column_labels=PROMPTS)
    assert grid.size == expected.size
    assert json.loads(grid.text["rows"]) == labels
    one_row_less = make_grid(rows=[[blank] * len(PROMPTS)] * (len(labels) - 1), row_labels=labels[:-1],
                             column_labels=PROMPTS)
    assert grid.height - one_row_less.height >= 16


def test_loss_plot_and_markdown_report(all_methods):
    report, _ = all_methods
    assert Image.open(report.loss_plot).size == (800, 400)
    text = report.markdown_path.read_text()
    assert "| method | trainable params | file size | s/step | final loss | concept score | prior drift |" in text
    assert text.count("| done |") == len(DEFAULT_METHODS)
    assert "![previews](grid.png)" in text and "![loss curves](losses.png)" in text
    assert "dropped (not accepted) alpha, rank" in text
    assert not list(report.folder.glob(".*.tmp"))  # written atomically: no temporary files left


def test_events_pass_through_with_the_method_and_the_view_folds_them(all_methods):
    report, events = all_methods
    kinds = [event["event"] for event in events]
    assert kinds[0] == "compare_start" and kinds[-1] == "compare_done"
    assert kinds.count("compare_method_start") == kinds.count("compare_method_done") == len(DEFAULT_METHODS)
    assert kinds.count("compare_render") == len(DEFAULT_METHODS) + 1
    steps = [event for event in events if event["event"] == "step"]
    assert [event["method"] for event in steps] == [m for m in DEFAULT_METHODS for _ in range(STEPS)]
    assert events[-1]["report"] == str(report.json_path) and events[-1]["table"] == report.table()
    logged = [json.loads(line) for line in (report.folder / "events.jsonl").read_text().splitlines()]
    assert [event["event"] for event in logged] == kinds

    view = CompareView("job")  # what the UI shows, from the same events
    for event in logged:
        view.apply(event)
    assert view.finished and view.status == "done" and view.fraction == 1.0
    assert view.rows == report.table() and view.report["grid"] == str(report.grid)
    assert {method: len(losses) for method, losses in view.method_losses.items()} == dict.fromkeys(DEFAULT_METHODS,
                                                                                                 STEPS)


# ================================================================================================ configs
def test_method_config_drops_options_and_applies_overrides(model, data, tmp_path):
    base = base_config(model, data, tmp_path / "out", network={"rank": 4, "alpha": 2.0, "dora": True})
    oft = method_config(base, "oft", tmp_path / "cmp", {"train.learning_rate": 3e-3, "network.block_size": 8})
    assert oft.config.network.method == "oft" and oft.dropped_options == ["alpha", "dora", "rank"]
    assert oft.config.network.options == {"block_size": 8} and oft.config.train.learning_rate == 3e-3
    assert oft.config.output.dir == str(tmp_path / "cmp" / "oft") and oft.config.output.name == "adapter_oft"
    assert oft.config.sample.prompts == [] and oft.config.sample.every_n_steps == 0
    lokr = method_config(base, "lokr", tmp_path / "cmp")
    assert lokr.config.network.options == {"rank": 4, "alpha": 2.0, "dora": True} and not lokr.dropped_options
    assert lokr.config.train == base.train and lokr.config.dataset == base.dataset
    # network.options replaces the base options as a whole (the UI's per-method form groups)
    own = method_config(base, "locon", tmp_path / "cmp", {OPTIONS_KEY: {"rank": 8}})
    assert own.method == "lora" and own.config.network.options == {"rank": 8}
    with pytest.raises(ConfigError, match="oft: .*unknown option"):
        method_config(base, "oft", tmp_path / "cmp", {"network.rank": 4})
    with pytest.raises(ConfigError, match="boft: .*learning_rate"):
        method_config(base, "boft", tmp_path / "cmp", {"train.learning_rate": -1.0})


def test_method_overrides_from_the_command_line():
    assert parse_method_override("oft:train.learning_rate=3e-3") == ("oft", "train.learning_rate", 3e-3)
    assert parse_method_override("lokr:network.factor=4") == ("lokr", "network.factor", 4)
    assert parse_method_override("loha:train.optimizer=lion") == ("loha", "train.optimizer", "lion")
    for bad in ("train.learning_rate=1", "oft:learning_rate=1", "oft:train.learning_rate", ":train.x=1"):
        with pytest.raises(ConfigError, match="METHOD:section.key=value"):
            parse_method_override(bad)


def test_unknown_methods_and_stray_overrides_are_refused_before_training(model, data, tmp_path):
    config = base_config(model, data, tmp_path / "out")
    from methods import available_methods

    available = ", ".join(available_methods())
    with pytest.raises(ConfigError, match=f"unknown adapter method 'lorax'; available: {available}"):
        compare(config, ["lora", "lorax"], tmp_path / "cmp")
    with pytest.raises(ConfigError, match="overrides for oft, which is not compared"):
        compare(config, ["lora"], tmp_path / "cmp", overrides={"oft": {"train.seed": 1}})
    with pytest.raises(ConfigError, match="no method"):
        compare(config, [" "], tmp_path / "cmp")
    assert not (tmp_path / "cmp").exists()


# ================================================================================================ scores
def solid(values: list[int]) -> list[Image.Image]:
    return [Image.new("RGB", (4, 4), (value, value, value)) for value in values]


def test_prior_drift_is_relative_to_a_new_seed():
    base, other_seed = solid([100, 200]), solid([110, 180])  # natural variation: (10 + 20) / 2 = 15
    assert prior_drift(base, base, other_seed) == 0.0
    assert prior_drift(base, other_seed, other_seed) == 1.0
    assert prior_drift(base, solid([103, 206]), other_seed) == pytest.approx(0.3)
    assert prior_drift(base, solid([70, 200]), other_seed) == pytest.approx(1.0)
    assert prior_drift(base, solid([101, 201]), base) is None  # the base ignores the seed: no scale
    with pytest.raises(ValueError, match="equally long"):
        prior_drift(base, solid([1]), other_seed)


def test_strength_zero_adapter_does_not_drift(tiny_pipeline, randomize, tmp_path):
    from methods.apply import create_network, save_network

    pipe = tiny_pipeline("sd1")
    network = create_network(pipe, "lora", {"rank": 2})
    randomize(network, std=0.5)
    path = save_network(network, tmp_path / "random.safetensors", dtype="fp32")
    network.detach()
    options = {"sampler": "euler_a", "steps": 2, "guidance_scale": 7.0, "seed": 5, "width": 16, "height": 16}
    plan = RenderPlan(PROMPTS, DRIFT_PROMPTS, None, options, strength=0.0)
    rows = []
    off = evaluate_adapters(pipe, {"random": path}, plan, on_row=lambda *row: rows.append(row))
    assert off.prior_drift == {"random": 0.0} and off.concept_score == {"base": None, "random": None}
    assert rows == [("base", 0, 2), ("random", 1, 2)]
    from trainer import toy

    concept_prompts = toy.DEMO_PROMPTS[:2]  # as for the toy model: the concept score is then defined
    on = evaluate_adapters(pipe, {"random": path}, RenderPlan(PROMPTS, DRIFT_PROMPTS, concept_prompts, options))
    assert on.prior_drift["random"] > 0 and on.natural_variation == off.natural_variation > 0
    assert on.grid.size == off.grid.size
    assert set(on.concept_score) == {"base", "random"} and all(0 <= v <= 1 for v in on.concept_score.values())


def test_toy_model_defines_the_concept_score(model, data, tmp_path):
    from trainer import toy

    config = base_config(model, data, tmp_path / "out")
    plan = render_plan(config)
    assert plan.concept_prompts is None and plan.drift_prompts == list(GENERIC_DRIFT_PROMPTS)
    (model / "rankwright_toy.json").write_text("{}")
    try:
        toy_plan = render_plan(base_config(model, data, tmp_path / "out", sample={"steps": 1}))
    finally:
        (model / "rankwright_toy.json").unlink()
    assert toy_plan.concept_prompts == toy.CONCEPT_PROMPTS and toy_plan.preview_prompts == toy.DEMO_PROMPTS
    assert toy_plan.drift_prompts == toy.EVAL_PROMPTS
    assert toy_plan.options["width"] == toy_plan.options["height"] == toy.RESOLUTION


def test_the_concept_scored_is_chosen_or_found_from_the_dataset(model, data, tmp_path):
    from trainer import toy

    with pytest.raises(ConfigError, match="toy model only"):
        render_plan(base_config(model, data, tmp_path / "out"), concept="orange")
    (model / "rankwright_toy.json").write_text("{}")
    try:
        config = base_config(model, data, tmp_path / "out", sample={"steps": 1})
        assert render_plan(config).concept == "purple"  # the 1_zq folder: the demo's trigger
        chosen = render_plan(config, concept="hollow")
        with pytest.raises(ConfigError, match="unknown toy concept 'teal'; known: purple, orange"):
            render_plan(config, concept="teal")
        found = render_plan(base_config(model, toy.make_concept_dataset(tmp_path / "d", "checkered", 1).parent,
                                        tmp_path / "out", sample={"steps": 1}))
    finally:
        (model / "rankwright_toy.json").unlink()
    assert chosen.concept == "hollow" and chosen.concept_prompts == toy.CONCEPTS["hollow"].prompts
    assert chosen.preview_prompts == toy.CONCEPTS["hollow"].prompts[:8]
    assert found.concept == "checkered" and found.concept_prompts == toy.CONCEPTS["checkered"].prompts


def test_toy_compare_reports_trigger_subject_and_prompts_kept(tmp_path):
    """One LoRA step on the toy model and a held-out concept's dataset: the report carries the concept found from
    the dataset, the trigger subject kept and the prompts kept (the adapted rate over the base model's)."""
    from trainer import toy
    from trainer.config import TrainerConfig

    root = Path(__file__).resolve().parents[1]
    config = TrainerConfig.load(root / "presets" / "toy_demo.toml")
    config.model.base = str(root / config.model.base)
    config.dataset.dir = str(toy.make_concept_dataset(tmp_path / "data", "orange", count=2).parent)
    config.output.dir, config.output.tensorboard, config.output.save_state = str(tmp_path / "out"), False, False
    config.train.max_steps, config.sample.steps, config.sample.prompts = 1, 4, ["a large kq circle"]
    report = compare(config, ["lora"], tmp_path / "report", drift_prompts=toy.EVAL_PROMPTS[:4])
    data = json.loads(report.json_path.read_text())
    assert data["settings"]["concept"] == "orange"
    assert data["settings"]["concept_prompts"] == toy.CONCEPTS["orange"].prompts
    base, run = data["base"], data["methods"][0]
    assert 0 < base["prompt_rate"] <= 1 and 0 <= base["subject_kept"] <= 1
    assert 0 <= run["subject_kept"] <= 1 and run["concept_score"] is not None
    rate = run["prompts_kept"] * base["prompt_rate"]
    assert rate == pytest.approx(round(rate * 4) / 4)  # a whole number of the four drift prompts
    rows = report.table()
    assert rows[0]["prompts kept"].startswith("1 (reference: ")
    assert rows[1]["prompts kept"] == f"{run['prompts_kept']:.3f}"
    assert rows[1]["trigger subject"].endswith("%")
    assert "held-out concept `orange`" in report.markdown_path.read_text()


def test_previews_default_to_the_dataset_captions(model, data, tmp_path):
    config = base_config(model, data, tmp_path / "out", sample={"steps": 2},
                         dataset={"trigger_word": "ohwx"})
    assert render_plan(config, ["x"]).preview_prompts == ["ohwx, a photo of zq"]


# ================================================================================================ CLI, stop, folders
def test_cli_compares_two_methods(model, data, tmp_path, capsys):
    config = base_config(model, data, tmp_path / "out")
    path = tmp_path / "run.toml"
    path.write_text(config.to_toml())
    out = tmp_path / "report"
    code = cli.main(["compare", "--config", str(path), "--methods", "lora,lokr", "--out", str(out),
                     "--set", "train.max_steps=2", "--override", "lokr:network.factor=4",
                     "--override", "lokr:train.learning_rate=2e-3", "--drift-prompts", "a red car", "a tree"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "[1/2] lora" in captured.out and "[2/2] lokr" in captured.out
    assert "rendering previews and prior drift: lokr (3/3)" in captured.out
    table = captured.out.split("method ", 1)[1]
    assert "trainable params" in table and "prior drift" in table and "lokr" in table
    assert f"report: {out / 'report.md'}" in captured.out
    data = json.loads((out / "report.json").read_text())
    assert [run["steps"] for run in data["methods"]] == [2, 2]
    assert data["methods"][1]["overrides"] == {"network.factor": 4, "train.learning_rate": 2e-3}
    assert data["settings"]["drift_prompts"] == ["a red car", "a tree"]

    code = cli.main(["compare", "--config", str(path), "--methods", "lora,nope", "--out", str(tmp_path / "x")])
    captured = capsys.readouterr()
    from methods import available_methods

    assert code == 2 and captured.err.strip() == ("error: unknown adapter method 'nope'; available: "
                                                  + ", ".join(available_methods()))
    code = cli.main(["compare", "--config", str(path), "--methods", "lora", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 2 and "already exists and is not empty" in captured.err
    assert json.loads((out / "report.json").read_text()) == data  # untouched


def test_stop_mid_way_writes_a_partial_report(model, data, tmp_path):
    stop = StopSignal()

    def stop_in_loha(event):
        if event["event"] == "step" and event["method"] == "loha":
            stop.request("test stop")

    config = base_config(model, data, tmp_path / "out", train={"max_steps": 4})
    report = compare(config, ["lora", "loha", "lokr"], tmp_path / "cmp", on_event=stop_in_loha, stop=stop,
                     drift_prompts=DRIFT_PROMPTS)
    runs = {run.method: run for run in report.runs}
    assert report.stopped and runs["lora"].status == "done" and runs["lokr"].status == "skipped"
    assert runs["loha"].status == "stopped" and runs["loha"].steps == 1 and Path(runs["loha"].output_file).is_file()
    assert runs["loha"].prior_drift is None and not (tmp_path / "cmp" / "lokr").exists()
    data = json.loads(report.json_path.read_text())
    assert data["stopped"] and [run["status"] for run in data["methods"]] == ["done", "stopped", "skipped"]
    grid = Image.open(report.grid)
    assert json.loads(grid.text["rows"]) == ["base", "lora"]
    assert "stopped at step 1/4" in report.markdown_path.read_text()


def test_stop_file_in_the_report_folder_skips_everything(model, data, tmp_path):
    (tmp_path / "cmp").mkdir()
    (tmp_path / "cmp" / "STOP").write_text("asked before the start")
    report = compare(base_config(model, data, tmp_path / "out"), ["lora", "oft"], tmp_path / "cmp")
    assert report.stopped and [run.status for run in report.runs] == ["skipped", "skipped"]
    assert report.grid is None and report.loss_plot is None and report.json_path.is_file()


def test_a_diverging_method_fails_alone(model, data, tmp_path):
    overrides = {"loha": {"train.learning_rate": 1e30, "train.max_grad_norm": 0.0}}
    report = compare(base_config(model, data, tmp_path / "out", train={"max_steps": 4}), ["loha", "lora"],
                     tmp_path / "cmp", overrides=overrides, drift_prompts=DRIFT_PROMPTS)
    loha, lora = report.runs
    assert loha.status == "failed" and "became" in loha.message and lora.status == "done"
    assert json.loads(Image.open(report.grid).text["rows"]) == ["base", "lora"]


def test_an_existing_report_folder_is_never_replaced(model, data, tmp_path):
    config = base_config(model, data, tmp_path / "out")
    taken = tmp_path / "cmp"
    taken.mkdir()
    (taken / "report.md").write_text("an earlier comparison")
    with pytest.raises(FileExistsError, match="already exists and is not empty"):
        compare(config, ["lora"], taken)
    assert [p.name for p in taken.iterdir()] == ["report.md"]
    first = default_out_dir(config)
    assert first == tmp_path / "out" / "adapter-compare"
    first.mkdir(parents=True)
    assert default_out_dir(config) == tmp_path / "out" / "adapter-compare-1"
