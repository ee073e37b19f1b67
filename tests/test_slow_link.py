"""benchmarks/slow_link.py --quick: two namespaces, a tbf-shaped veth, every figure reported.
Speed is never asserted. Needs root; skips otherwise (fails under CI=true)."""
import json

import pytest

import netns
from conftest import ok, positive, run


def test_quick_slow_link_benchmark_reports_every_figure(tmp_path, token_cache):
    netns.require(netns.why_not(shaping=True))
    out = tmp_path / "slow-link.json"
    result = ok(run(["--quick", "--json", out], token_cache, timeout=300,
                    script="benchmarks/slow_link.py", TMPDIR=tmp_path))
    assert "| link | gradients | tokens/s | efficiency |" in result.stdout
    data = json.loads(out.read_text())
    assert [r["config"] for r in data["single"]] == ["fp32", "bf16+accum"]
    for r in data["single"]:
        assert r["world"] == 1
        for key in ("tokens_per_sec", "step_ms", "allreduce_mb_per_step"):
            positive(r[key], f"one process {r['config']} {key}")
    rows = data["rows"]
    assert sorted((r["rate_bits"], r["config"]) for r in rows) == [
        (0.0, "bf16+accum"), (0.0, "fp32"), (1e8, "bf16+accum"), (1e8, "fp32")]
    for r in rows:
        what = f"{r['link']} {r['config']}"
        assert r["world"] == 2
        for key in ("tokens_per_sec", "efficiency", "allreduce_mb_per_step", "allreduce_alone_ms",
                    "step_ms", "allreduce_calls_per_step"):
            positive(r[key], f"{what} {key}")
        if r["rate_bits"]:
            positive(r["ring_model_ms"], f"{what} ring model")
        else:
            assert r["ring_model_ms"] is None
    # bf16 compression halves the bytes counted; accumulation does not add all-reduce rounds
    fp32, bf16 = (next(r for r in rows if r["rate_bits"] == 0 and r["config"] == c)
                  for c in ("fp32", "bf16+accum"))
    assert bf16["allreduce_mb_per_step"] * 2 == pytest.approx(fp32["allreduce_mb_per_step"])
    assert bf16["allreduce_calls_per_step"] == fp32["allreduce_calls_per_step"]
    assert [a["link"] for a in data["allreduce_alone"]] == ["no limit", "100 Mbit/s"]
    positive(data["runtime_s"], "runtime")
