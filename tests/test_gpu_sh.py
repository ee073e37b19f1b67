"""benchmarks/gpu.sh rehearsed on the CPU (DEVICE=cpu): every part but --compile, at tiny sizes,
with the files it will bring back from a lent GPU machine (at most 8)."""
import os
import subprocess
import sys

from conftest import ROOT


def test_gpu_sh_rehearsal_on_the_cpu(tmp_path, token_cache):
    out = tmp_path / "out"
    env = {**os.environ, "DEVICE": "cpu", "PYTHON": sys.executable, "OUT": str(out),
           "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(["bash", "benchmarks/gpu.sh"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=240)
    summary = (out / "summary.md").read_text() if (out / "summary.md").exists() else ""
    log = (out / "gpu.log").read_text() if (out / "gpu.log").exists() else ""
    assert result.returncode == 0, f"{result.stdout}\n{summary}\n{log[-4000:]}"
    files = sorted(p.name for p in out.iterdir())
    assert files == ["benchmark.json", "benchmark.md", "gpu.log", "summary.md"], files
    for name in ("facts", "default", "fp16", "precision", "torchrun", "benchmark", "profile"):
        assert f"- {name}: ok" in summary, summary
    parts = summary.split("```")[0]
    assert "compile" not in parts and parts.strip().endswith("7 part(s) ok, 0 failed; results in "
                                                            f"{out}")  # compile: not rehearsed
    assert "resumed from step 4" in log and "done: 8 steps" in log  # the precision part
    assert "Self CPU" in summary and "| fp32 |" in (out / "benchmark.md").read_text()
