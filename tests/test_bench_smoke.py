"""Smoke test of bench/adapter_overhead.py: its core runs on the tiny UNet and yields a table row (no timing checks)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "adapter_overhead.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("adapter_overhead", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("adapter_overhead", module)
    spec.loader.exec_module(module)
    return module


def test_tiny_lora_row_has_positive_timings():
    bench = load_bench()
    report = bench.run_benchmark("tiny", methods=["lora"], libraries=("ours",), latent=8, repeats=1, warmup=1,
                                 threads=1, isolate=False)
    assert report["base_ms"] > 0
    (row,) = report["rows"]
    assert row["method"] == "lora"
    assert "error" not in row["ours"], row["ours"].get("error")
    assert row["ours_ms"] > 0 and row["ours_x"] > 0
    assert row["ours"]["targets"] == row["ours"]["adapted"] > 0
    assert row["ours"]["tensors_with_grad"] == row["ours"]["trainable_tensors"] > 0
    table = bench.markdown(report)
    assert "| lora" in table and "ours ×base" in table


def load_op_count():
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("op_count", SCRIPT.parent / "op_count.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_op_count_tiny_lora_counts_more_ops_than_the_frozen_step():
    bench = load_op_count()
    report = bench.run_counts("tiny", methods=["lora"], libraries=("ours",), compiled=False)
    base, (row,) = report["base"], report["rows"]
    assert base["eager"] > 100 and "compiled" not in base
    ours = row["ours"]
    assert "error" not in ours, ours.get("error")
    assert ours["adapted"] > 0 and ours["eager"] > base["eager"]
    assert ours["eager_x"] == ours["eager"] / base["eager"]
    assert "| lora | " in bench.markdown(report)

