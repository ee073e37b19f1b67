"""Stops, repeated: Ctrl-C (SIGINT to the whole process group) and a scheduler's SIGTERM, under
mp.spawn and under torchrun. Every stop must end cleanly and soon: the agreed step saved and
loadable (tests/test_ddp_script.py resumes from such a snapshot, to the weights of a run that
never stopped), no `terminate called ...` abort while the ranks exit (issue 15: about 1 stop in
100 ended that way, exit 1 instead of 143), no traceback, no process left behind."""
import os
import random
import re
import signal
import sys
import time

import pytest
import torch

from conftest import TINY, finish, leftovers, script_env, start

FLAGS = TINY + ["--batch-size", "2", "--max-steps", "500", "--save-every", "2"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
REPEATS = 2  # jobs per launcher and signal, side by side; each signal lands at another moment


def stop_together(launcher, sig, outs, cache, rng):
    """Start one run per folder in `outs` side by side (the load makes the exits race harder),
    signal each once its first snapshot exists, and check how each ended."""
    procs, signalled = [], []
    for out in outs:
        if launcher == "spawn":
            cmd = [sys.executable, "DDP-script.py", *FLAGS, "--nprocs", "2"]
        else:
            cmd = [*TORCHRUN, "DDP-script-torchrun.py", *FLAGS]
        procs.append(start(cmd + ["--out", str(out)], script_env(cache)))
    for proc, out in zip(procs, outs):
        deadline = time.time() + 90
        while not (out / "ckpt.pt").exists():
            assert proc.poll() is None and time.time() < deadline, finish(proc, 10).stderr
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.5))  # anywhere in the next steps: forward, backward, all-reduce
        if sig == signal.SIGINT or launcher == "torchrun":
            os.killpg(proc.pid, sig)  # Ctrl-C, or a scheduler stopping every process of the job
        else:
            os.kill(proc.pid, sig)  # a scheduler that signals the parent alone: it passes it on
        signalled.append(time.time())
    for proc, out, t0 in zip(procs, outs, signalled):
        check_stop(launcher, finish(proc, 60), out)
        assert time.time() - t0 < 20, "the stop took more than 20 s"  # one step, one snapshot


def check_stop(launcher, result, out):
    report = f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "terminate called" not in result.stderr, report
    assert not result.leftovers, f"processes left behind: {result.leftovers}\n{report}"
    if launcher == "spawn":
        assert result.returncode in (130, 143), report
        assert "Traceback" not in result.stderr, report
    else:  # torchrun reports a signal as its own SignalException, exit 1; the ranks print none
        assert result.returncode == 1 and "SignalException" in result.stderr, report
        assert result.stderr.count("Traceback") == 1, report
    stopped = re.findall(r"stopped by (SIGINT|SIGTERM) after step (\d+);", result.stdout)
    assert len(stopped) == 1, report
    if launcher == "spawn":
        assert result.returncode == 128 + signal.Signals[stopped[0][0]], report
    snapshot = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)
    assert snapshot["step"] == int(stopped[0][1]) >= 2, report
    assert snapshot["world_size"] == 2 and not (out / "model.pt").exists()


@pytest.mark.parametrize("launcher", ["spawn", "torchrun"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_repeated_stops_end_cleanly(launcher, sig, tmp_path, token_cache):
    rng = random.Random(f"{launcher}-{sig}")
    stop_together(launcher, sig, [tmp_path / f"stop{i}" for i in range(REPEATS)], token_cache, rng)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_stop_while_the_workers_start(sig, tmp_path, token_cache):
    """A stop that comes while the workers still import torch (Ctrl-C reaches them too; a SIGTERM
    reaches the parent alone) must not end them with KeyboardInterrupt tracebacks: they start
    ignoring both signals, and the parent passes the stop on again once they listen. The run then
    stops as any other: after one step, saved, exit 130 or 143."""
    proc = start([sys.executable, "DDP-script.py", *FLAGS, "--nprocs", "2", "--out", str(tmp_path)],
                 script_env(token_cache))
    deadline = time.time() + 60
    while len(leftovers(proc.mark)) < 3:  # the parent and its two workers (and mp's tracker)
        assert proc.poll() is None and time.time() < deadline, finish(proc, 10).stderr
        time.sleep(0.01)
    time.sleep(0.2)  # the parent has set its own handlers right after starting the workers
    if sig == signal.SIGINT:
        os.killpg(proc.pid, sig)
    else:
        os.kill(proc.pid, sig)
    result = finish(proc, 60)
    report = f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert result.returncode == 128 + sig, report
    assert "Traceback" not in result.stderr and not result.leftovers, report
    assert re.search(rf"stopped by {sig.name} after step \d+;", result.stdout), report
    assert torch.load(tmp_path / "ckpt.pt", map_location="cpu", weights_only=True)["step"] >= 1
