"""The method contract (``methods.base.AdapterModule``), checked for every registered method.

A new method file that passes these works everywhere: its files round-trip, the hooks equal merging, strength 0 is
the base model, ``trainer inspect`` and ``convert`` read it, it trains from a TOML file, and the UI form and the
benchmark offer it. Parity with LyCORIS/PEFT is each method's own test file's job (and tests/test_apply.py's).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
from train_helpers import config_dict, run, unet_output, write_images

from methods import available_methods, get_method
from methods.apply import apply_adapter, create_network, load_network, save_network
from methods.base import AdapterModule
from methods.network import AdapterNetwork, pipeline_parts
from methods.targets import TargetConfig
from methods.tools import convert_to_lora, inspect_adapter, module_deltas, read_adapter

METHODS = available_methods()
BENCH = Path(__file__).resolve().parents[1] / "bench" / "adapter_overhead.py"


@pytest.fixture
def adapted(tiny_pipeline, randomize):
    """``adapted(method)`` → (pipeline, detached network with random non-zero tensors, on every layer kind)."""

    def make(method: str, seed: int = 1):
        pipe = tiny_pipeline("sd1")
        options = dict(get_method(method).example_options)
        network = create_network(pipe, method, options, TargetConfig(preset="full"))
        randomize(network, seed=seed)
        network.detach()
        return pipe, network

    return make


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> bool:
    return (a.double() - b.double()).norm().item() <= rel * max(b.double().norm().item(), 1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_the_class_declares_its_contract(method):
    cls = get_method(method)
    assert cls.method == method and cls.label and cls.description
    for required in ("delta_weight", "own_tensors", "from_own_tensors", "file_rank"):
        assert getattr(cls, required) is not getattr(AdapterModule, required), f"{method} must define {required}"
    cls.config_class.from_dict(cls.example_options)  # the example options are valid
    assert isinstance(cls.lycoris_algo, str) and isinstance(cls.delta_uses_base, bool)


@pytest.mark.parametrize("method", METHODS)
def test_export_then_import_gives_the_same_delta(method, adapted):
    pipe, network = adapted(method)
    kinds = {(a.is_conv, tuple(a.weight_shape[2:])) for a in network}
    assert len(kinds) >= 3, kinds  # Linear, 1×1 and k×k convs all took an adapter
    expected = network.merged_deltas()
    parts, arch = pipeline_parts(pipe)
    for portable in (True, False):
        again, unmatched = AdapterNetwork.from_state_dict(parts, arch, network.export_state_dict(portable))
        assert not unmatched and set(again.adapters) == set(expected)
        for name, adapter in again.adapters.items():
            assert type(adapter) is type(network.adapters[name])
            assert close(adapter.merged_delta().float(), expected[name]), (name, portable)


@pytest.mark.parametrize("method", METHODS)
def test_file_reloads_and_hooks_equal_merge(method, adapted, run_unet, tmp_path):
    pipe, network = adapted(method)
    path = save_network(network, tmp_path / f"{method}.safetensors", dtype="fp32")
    base = run_unet(pipe)

    loaded, _ = load_network(pipe, path, require_all=True)
    assert set(loaded.adapters) == set(network.adapters) and loaded.method == method
    expected = network.merged_deltas()
    assert all(close(delta, expected[name]) for name, delta in loaded.merged_deltas().items())

    with apply_adapter(pipe, path, strength=0.6) as handle:
        hooked = run_unet(pipe)
        handle.set_strength(0.0)
        assert torch.equal(run_unet(pipe), base)  # strength 0 is exactly the base model
    assert torch.equal(run_unet(pipe), base)  # and removing it restores it exactly
    assert (hooked - base).abs().max() > 1e-4
    loaded.merge(0.6)
    merged = run_unet(pipe)
    loaded.unmerge()
    assert (hooked - merged).abs().max() <= 1e-4
    assert torch.equal(run_unet(pipe), base)


@pytest.mark.parametrize("method", METHODS)
def test_inspect_and_convert_read_the_file(method, adapted, tmp_path):
    pipe, network = adapted(method)
    cls = get_method(method)
    path = save_network(network, tmp_path / f"{method}.safetensors", dtype="fp32")
    report = inspect_adapter(path)
    assert report["methods"] == {method: len(network)} and report["architecture"] == "sd1"
    assert "?" not in report["ranks"] and sum(report["ranks"].values()) == len(network)

    source, _ = module_deltas(read_adapter(path), pipe)
    low = convert_to_lora(path, tmp_path / "r1.safetensors", rank=1, pipe=pipe)
    assert low.modules == len(network) and low.methods == {method: len(network)}
    assert 1e-4 < low.relative_error < 1
    assert low.base_dependent == ([cls.label] if cls.delta_uses_base else [])
    converted, methods = module_deltas(read_adapter(tmp_path / "r1.safetensors"))
    assert set(methods.values()) == {"lora"}
    total = sum(float(d.double().pow(2).sum()) for d in source.values())
    measured = math.sqrt(sum(float((converted[n] - source[n]).double().pow(2).sum()) for n in source) / total)
    assert measured == pytest.approx(low.relative_error, rel=1e-3)  # the error it reports is the error it made
    exact = convert_to_lora(path, tmp_path / "full.safetensors", rank=64, pipe=pipe)  # ≥ every tiny layer's rank
    assert exact.relative_error < 1e-5


@pytest.mark.parametrize("method", METHODS)
def test_the_ui_form_offers_the_method(method):
    from ui import form

    cls = get_method(method)
    field = next(f for f in form.config_fields() if f.key == "network.method")
    assert (cls.label, method) in field.choices
    names = {f.name for f in form.method_fields()[method]}
    assert names == {f.name for f in dataclasses.fields(cls.config_class)}
    values = form.config_to_values(form.values_to_config({}))
    values["network.method"] = method
    for key, value in cls.example_options.items():
        values[f"network.{method}.{key}"] = value
    config = form.values_to_config(values)
    assert config.network.method == method
    assert {k: config.network.options[k] for k in cls.example_options} == cls.example_options


@pytest.mark.parametrize("method", METHODS)
def test_trains_from_toml(method, tmp_path, tokenizer_dir, tiny_pipeline):
    from trainer.config import TrainerConfig, dump_toml

    pipe = tiny_pipeline("sd1")
    pipe.save_pretrained(tmp_path / "model")
    write_images(tmp_path / "data" / "2_zq", 2)
    data = config_dict(tmp_path / "model", tmp_path / "data", tmp_path / "out",
                       network={"method": method, **get_method(method).example_options},
                       train={"max_steps": 3, "learning_rate": 1e-2})
    toml = tmp_path / "run.toml"
    toml.write_text(dump_toml(data))
    result, events = run(TrainerConfig.load(toml))
    (save,) = [event for event in events if event["event"] == "save"]
    assert save["check_ok"] and save["check_modules"] > 0
    before = unet_output(pipe)
    with apply_adapter(pipe, result.output_file) as handle:
        assert handle.network.method == method
        assert (unet_output(pipe) - before).abs().max() > 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_the_benchmark_runs_the_method(method):
    spec = importlib.util.spec_from_file_location("adapter_overhead", BENCH)
    bench = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("adapter_overhead", bench)
    spec.loader.exec_module(bench)
    assert method in bench.default_methods()
    report = bench.run_benchmark("tiny", methods=[method], libraries=("ours",), latent=8, repeats=1, warmup=1,
                                 threads=1, isolate=False)
    (row,) = report["rows"]
    assert "error" not in row["ours"], row["ours"].get("error")
    assert row["ours"]["targets"] == row["ours"]["adapted"] > 0
    assert row["ours"]["tensors_with_grad"] == row["ours"]["trainable_tensors"]
