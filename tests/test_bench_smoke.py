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
