"""benchmarks/benchmark.py --quick runs to the end and reports every figure (speed is never
asserted); bad input is one line."""
import json

import torch

from conftest import FAULTS, ok, one_error, positive, run


def test_quick_benchmark_reports_every_figure(tmp_path, token_cache):
    out = tmp_path / "bench.json"
    result = ok(run(["--quick", "--json", out], token_cache, timeout=240,
                    script="benchmarks/benchmark.py"))
    assert "| config |" in result.stdout and "ours / baseline" in result.stdout
    data = json.loads(out.read_text())

    positive(data["ceiling"]["fp32_tflops"], "fp32 matmul rate")
    positive(data["ceiling"]["bf16_tflops"], "bf16 matmul rate")

    names = {r["name"] for r in data["single"]}
    assert {"fp32", "bf16"} <= names, names
    for row in data["single"]:
        for key in ("tokens_per_sec", "step_time_s", "peak_mem_mb", "mfu", "flops_per_token"):
            positive(row[key], f"{row['name']} {key}")
        for phase, seconds in row["phases_s"].items():
            positive(seconds, f"{row['name']} {phase}")
    positive(data["bf16_over_fp32"], "bf16 / fp32")

    rows = data["scaling"]["rows"]
    assert sorted((r["world"], r["grad_accum"], r["independent"]) for r in rows) == [
        (1, 1, False), (1, 4, False), (2, 1, False), (2, 1, True), (2, 4, False), (2, 4, True)]
    for row in rows:
        for key in ("tokens_per_sec", "per_process_tokens_per_sec", "efficiency",
                    "allreduce_calls_per_step", "allreduce_mb_per_step"):
            positive(row[key], f"world {row['world']} accum {row['grad_accum']} {key}")
        if row["world"] == 2 and not row["independent"]:  # DDP against 2 independent processes
            positive(row["of_independent"], "of independent")
            positive(row["no_overlap_bound"], "efficiency bound without overlap")
            assert row["no_overlap_bound"] < 1, row
    (alone,) = data["scaling"]["allreduce_alone"]
    assert alone["world"] == 2 and alone["numel"] == 2_503_392, alone  # gpt-nano's parameters
    positive(alone["fp32_ms"], "all-reduce alone fp32")
    positive(alone["bf16_ms"], "all-reduce alone bf16")

    base = data["baseline"]
    for key in ("ours_tokens_per_sec", "baseline_tokens_per_sec", "ratio"):
        positive(base[key], key)
    positive(data["runtime_s"], "runtime")
    assert len(data["targets"]) == 5

    # The report can be printed again from the JSON, also from one that a timeout cut short
    # (the JSON is saved after every section).
    again = ok(run(["--report-from", out], token_cache, script="benchmarks/benchmark.py"))
    assert again.stdout.strip() == result.stdout[result.stdout.index("# Training benchmark"):].strip()
    partial = {k: data[k] for k in ("machine", "settings", "other_cpu_load", "ceiling", "single")}
    (tmp_path / "partial.json").write_text(json.dumps(partial))
    cut = ok(run(["--report-from", tmp_path / "partial.json"], token_cache,
                 script="benchmarks/benchmark.py"))
    assert "The run was cut short" in cut.stdout and "| config |" in cut.stdout
    assert "DDP weak scaling" not in cut.stdout


def test_bad_input_is_one_line(tmp_path, token_cache):
    not_json = tmp_path / "bench.json"
    not_json.write_text("{cut short")
    for args, needle in [(["--report-from", not_json], "cannot read"),
                         (["--device", "cuda"] if not torch.cuda.is_available() else
                          ["--preset", "gpt-nano", "--context", "129"], "--")]:
        one_error(run(args, token_cache, timeout=60, script="benchmarks/benchmark.py"), needle, 2)


def test_a_failed_configuration_loses_no_other_figure(tmp_path, token_cache):
    """The bf16 worker of section 2 dies: its row records why, fp32's figures and the ceiling
    measured after it still stand in the JSON and the report, and the exit code says so."""
    out = tmp_path / "bench.json"
    result = run(["--quick", "--json", out, "--skip-scaling", "--skip-baseline"], token_cache,
                 timeout=240, script="benchmarks/benchmark.py", PYTHONPATH=FAULTS,
                 GPT_DDP_FAULT='fail-argv:"name": "bf16"')
    assert result.returncode == 1, result.stdout + result.stderr
    data = json.loads(out.read_text())
    rows = {r["name"]: r for r in data["single"]}
    assert rows["bf16"]["error"].startswith("RuntimeError: worker step bf16 failed (exit 1)")
    for key in ("tokens_per_sec", "mfu", "flops_per_token"):
        positive(rows["fp32"][key], f"fp32 {key}")
    assert len(data["ceiling"]["runs"]) == 2  # the section after the failure ran
    assert "Failed (every other figure below stands): 2. one process, bf16: RuntimeError: " \
           "worker step bf16 failed (exit 1)" in result.stdout
    one_process = result.stdout.split("## 2. One process")[1]
    assert "| fp32 |" in one_process and "| bf16 |" not in one_process
