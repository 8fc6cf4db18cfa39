"""train.compile: the compiled training step gives the eager step's losses and weights, saves the same keys, reports
its graphs, and falls back to eager when compiling fails.

The default tests compile with Dynamo + AOTAutograd only (``aot_eager``: the traced graphs, hooks inlined, run by
the eager kernels; seconds on the tiny models); the slow ones compile the toy demo with Inductor (C++ code
generation with gcc: a few minutes on one CPU thread).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import build_model, make_config, of_kind, run, write_images

from methods.base import ConfigError
from methods.embeddings import embedding_path
from trainer import compiling
from trainer.config import TrainerConfig

ROOT = Path(__file__).resolve().parents[1]
LOSS_RTOL = 2e-3


def assert_same_training(eager, compiled, weights_rtol: float) -> None:
    (eager_result, _), (compiled_result, _) = eager, compiled
    assert len(compiled_result.losses) == len(eager_result.losses)
    for step, (want, got) in enumerate(zip(eager_result.losses, compiled_result.losses), 1):
        assert abs(got - want) <= LOSS_RTOL * abs(want), (step, want, got)
    want, got = load_file(eager_result.output_file), load_file(compiled_result.output_file)
    assert sorted(got) == sorted(want)  # no _orig_mod. or other wrapper prefix
    assert not any("_orig_mod" in key for key in got)
    for key, value in want.items():
        scale = float(value.abs().max()) or 1.0
        assert torch.allclose(got[key], value, rtol=0, atol=weights_rtol * scale), key


# ----- the tiny model, Dynamo + AOTAutograd ---------------------------------------------------------------------
@pytest.fixture
def aot_eager(monkeypatch):
    monkeypatch.setattr(compiling, "BACKEND", "aot_eager")


@pytest.fixture(scope="module")
def sd1(tmp_path_factory, tokenizer_dir) -> Path:
    return build_model(tmp_path_factory.mktemp("model-sd1"), "sd1", tokenizer_dir)["folder"]


@pytest.fixture
def data(tmp_path: Path) -> Path:
    write_images(tmp_path / "data" / "1_zq", 2)
    return tmp_path / "data"


def tiny_config(model: Path, data: Path, out: Path, **train) -> TrainerConfig:
    return make_config(model, data, out, train={"max_steps": 3, **train})


def test_compiled_step_matches_eager(sd1, data, tmp_path, aot_eager):
    eager = run(tiny_config(sd1, data, tmp_path / "eager"))
    compiled = run(tiny_config(sd1, data, tmp_path / "compiled", compile=True))
    assert_same_training(eager, compiled, weights_rtol=1e-4)
    reports = of_kind(compiled[1], "compiled")
    # the first step compiles the UNet's and the text encoder's graphs; the other steps reuse them (one bucket)
    assert len(reports) == 1 and reports[0]["step"] == 1 and reports[0]["graphs"] >= 2
    assert reports[0]["graph_breaks"] == 0 and reports[0]["shape"] == [1, 4, 8, 8]
    assert reports[0]["mode"] == "default" and reports[0]["total_graphs"] == reports[0]["graphs"]
    assert not of_kind(compiled[1], "warning")
    assert not of_kind(eager[1], "compiled")


def test_compiled_bf16_mixed_precision_matches_eager(sd1, data, tmp_path, aot_eager):
    """Under Accelerate's bf16 autocast the compiled graphs see the same casts as the eager step."""
    eager = run(tiny_config(sd1, data, tmp_path / "eager", mixed_precision="bf16"))
    compiled = run(tiny_config(sd1, data, tmp_path / "compiled", mixed_precision="bf16", compile=True))
    assert_same_training(eager, compiled, weights_rtol=2e-3)
    assert of_kind(compiled[1], "compiled") and not of_kind(compiled[1], "warning")


def test_compiled_step_with_output_preservation_matches_eager(sd1, data, tmp_path, aot_eager):
    """The preservation term's base-model pass (adapters at multiplier 0) inside the compiled step."""
    eager = run(tiny_config(sd1, data, tmp_path / "eager", output_preservation_weight=1.0))
    compiled = run(tiny_config(sd1, data, tmp_path / "compiled", output_preservation_weight=1.0, compile=True))
    assert_same_training(eager, compiled, weights_rtol=1e-4)
    assert eager[0].losses != run(tiny_config(sd1, data, tmp_path / "plain"))[0].losses  # the term is there
    assert of_kind(compiled[1], "compiled") and not of_kind(compiled[1], "warning")


def test_compiled_step_with_trigger_vectors_matches_eager(sd1, data, tmp_path, aot_eager):
    """Pivotal tuning's hook on the token table inside the compiled text encoder; the vectors train the same."""
    eager = run(tiny_config(sd1, data, tmp_path / "eager", embedding_lr=0.05))
    compiled = run(tiny_config(sd1, data, tmp_path / "compiled", embedding_lr=0.05, compile=True))
    assert_same_training(eager, compiled, weights_rtol=1e-4)
    vectors = [load_file(str(embedding_path(result.output_file)))["emb_params"] for result in (eager[0], compiled[0])]
    torch.testing.assert_close(vectors[1], vectors[0], rtol=1e-4, atol=1e-6)
    assert of_kind(compiled[1], "compiled") and not of_kind(compiled[1], "warning")


def test_each_bucket_shape_compiles_once(sd1, tmp_path, aot_eager):
    data = tmp_path / "data"
    write_images(data / "1_zq", 2, size=(16, 16))
    write_images(data / "1_zq", 2, size=(32, 16), start=2)  # bucket (24, 8) w×h
    config = tiny_config(sd1, data, tmp_path / "out", max_steps=6, compile=True)
    _, events = run(config)
    shapes = [tuple(report["shape"]) for report in of_kind(events, "compiled")]
    assert sorted(shapes) == [(1, 4, 4, 12), (1, 4, 8, 8)]  # one report per bucket, later steps reuse the graphs
    assert of_kind(events, "compiled")[-1]["total_graphs"] == sum(r["graphs"] for r in of_kind(events, "compiled"))


@pytest.mark.slow
def test_resumed_compiled_run_matches_the_eager_run(sd1, data, tmp_path, aot_eager):
    """Accumulation (two micro-batches per step) and a resume into a compiled run: the state saved by a compiled
    run is the eager one's, and the resumed steps match an uninterrupted eager run."""
    eager, _ = run(tiny_config(sd1, data, tmp_path / "eager", max_steps=4, gradient_accumulation=2))
    first, _ = run(tiny_config(sd1, data, tmp_path / "compiled", max_steps=2, gradient_accumulation=2, compile=True))
    second = tiny_config(sd1, data, tmp_path / "compiled", max_steps=4, gradient_accumulation=2, compile=True)
    resumed, events = run(second, resume=first.state_dir)
    for want, got in zip(eager.losses, first.losses + resumed.losses[-2:]):
        assert abs(got - want) <= LOSS_RTOL * abs(want)
    assert of_kind(events, "resumed") and of_kind(events, "compiled")


def test_a_run_starts_without_the_compiled_code_of_earlier_runs(aot_eager):
    """Dynamo's code cache is per code object and process-wide: an earlier run's entries (another method of a
    comparison) would count against this run's recompile limit and, past it, leave it eager without a word."""
    from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list

    class Doubler(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * x

    torch.compile(Doubler().forward, backend="eager")(torch.ones(2))
    assert len(_debug_get_cache_entry_list(Doubler.forward.__code__)) == 1
    compiler = compiling.StepCompiler({"doubler": Doubler()}, "default", shapes=1)
    assert compiler.start() is None
    assert len(_debug_get_cache_entry_list(Doubler.forward.__code__)) == 0
    compiler.restore_eager()


def test_refused_compile_trains_eagerly(sd1, data, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", refuse)
    eager = run(tiny_config(sd1, data, tmp_path / "eager"))
    compiled = run(tiny_config(sd1, data, tmp_path / "compiled", compile=True))
    (warning,) = of_kind(compiled[1], "warning")
    assert "torch.compile failed (RuntimeError: no compiler here); training eagerly" in warning["message"]
    assert compiled[0].losses == eager[0].losses


def test_failing_first_step_falls_back_to_eager(sd1, data, tmp_path, monkeypatch):
    """A compiler failure surfaces at the first call (code generation is lazy): the step is redone eagerly."""
    calls = []

    def failing_compile(function, **kwargs):
        def compiled(*args, **kw):
            calls.append(kwargs)
            raise RuntimeError("C++ compile error: gcc not found")

        return compiled

    monkeypatch.setattr(torch, "compile", failing_compile)
    eager = run(tiny_config(sd1, data, tmp_path / "eager"))
    compiled = run(tiny_config(sd1, data, tmp_path / "compiled", compile=True))
    assert len(calls) == 1 and calls[0]["dynamic"] is False and calls[0]["mode"] == "default"
    (warning,) = of_kind(compiled[1], "warning")
    assert "compiling the training step failed (RuntimeError: C++ compile error: gcc not found)" in warning["message"]
    assert "training eagerly from here" in warning["message"]
    assert compiled[0].losses == eager[0].losses  # the failed attempt left no gradient behind


def test_config_validation_and_modes():
    config = TrainerConfig.from_dict({"train": {"compile": True, "compile_mode": "max-autotune"}})
    assert config.train.compile and config.train.compile_mode == "max-autotune"
    with pytest.raises(ConfigError, match=r"train.compile_mode = 'fast' is not allowed; choose one of: auto, "):
        TrainerConfig.from_dict({"train": {"compile_mode": "fast"}})
    with pytest.raises(ConfigError, match="train.compile must be true or false"):
        TrainerConfig.from_dict({"train": {"compile": "yes"}})
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert compiling.resolve_mode("auto", cpu, 1) == "default"
    assert compiling.resolve_mode("auto", cuda, 1) == "reduce-overhead"  # static shapes: CUDA graphs
    assert compiling.resolve_mode("auto", cuda, compiling.CUDA_GRAPH_SHAPES + 1) == "max-autotune-no-cudagraphs"
    assert compiling.resolve_mode("max-autotune", cpu, 1) == "max-autotune"
    assert compiling.recompile_limit(shapes=1, models=2) == 8
    assert compiling.recompile_limit(shapes=10, models=2) == 2 * (10 + compiling.EXTRA_GRAPHS)


def test_cli_flag_sets_compile(tmp_path, monkeypatch):
    from trainer import cli, loop

    seen = {}
    monkeypatch.setattr(loop, "train", lambda config, **kwargs: seen.setdefault("config", config))
    toml = tmp_path / "run.toml"
    toml.write_text('[model]\nbase = "x"\n')
    assert cli.main(["train", "--config", str(toml), "--compile"]) == 0
    assert seen["config"].train.compile is True


# ----- the toy demo, Inductor ------------------------------------------------------------------------------------
def toy_config(out: Path, method: str, steps: int, **train) -> TrainerConfig:
    config = TrainerConfig.load(ROOT / "presets" / "toy_demo.toml")
    config.model.base = str(ROOT / config.model.base)
    config.dataset.dir = str(ROOT / config.dataset.dir)
    config.output.dir = str(out)
    config.output.tensorboard = False
    config.output.save_dtype = "fp32"
    config.sample.prompts = []
    config.network.method = method
    config.network.options = {} if method != "lora" else config.network.options
    config.train.max_steps = steps
    for key, value in train.items():
        setattr(config.train, key, value)
    return config


@pytest.mark.slow
def test_toy_demo_oft_compiled_with_inductor_matches_eager(tmp_path):
    """OFT (its shared Cayley solve before the graph, the rotations inside it) with gradient checkpointing and two
    micro-batches per step; the same steps eagerly. LoRA matched as closely when last run
    (README, Speed); one method here keeps the suite's time down (each run compiles for about a minute)."""
    settings = {"gradient_checkpointing": True, "gradient_accumulation": 2, "batch_size": 2}
    eager = run(toy_config(tmp_path / "eager", "oft", 3, **settings))
    compiled = run(toy_config(tmp_path / "compiled", "oft", 3, compile=True, **settings))
    assert_same_training(eager, compiled, weights_rtol=2e-3)
    (report,) = of_kind(compiled[1], "compiled")
    # With checkpointing the checkpointed blocks run eagerly (graph breaks: the adapters' hooks keep per-call state,
    # which a checkpoint region inside a graph may not change; README, Training): equal results, less speed.
    assert report["shape"] == [2, 4, 16, 16] and report["graphs"] >= 1
    assert not of_kind(compiled[1], "warning")
