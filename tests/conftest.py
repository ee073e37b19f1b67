"""Shared helpers for tests that run the training scripts as real processes (CPU, Gloo, loopback)."""
import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# The settings most runs share: a tiny model, short sequences, fp32, no dropout.
TINY = ["--device", "cpu", "--model", "gpt-nano", "--context-length", "32", "--dropout", "0",
        "--amp", "off", "--lr", "4e-4", "--log-every", "5", "--eval-every", "5",
        "--sample-tokens", "5"]


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def token_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("token-cache")


def script_env(cache, **extra):
    """One thread per process, loopback only, a private token cache, no inherited launcher vars."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                        "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT", "GROUP_RANK")}
    env.update(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1",
               GPT_DDP_CACHE=str(cache), PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT),
               GPT_DDP_TEST_MARK=uuid.uuid4().hex)  # inherited by every process of the run
    env.update({k: str(v) for k, v in extra.items()})
    return env


def start(cmd, env, **kw):
    """Start a command in its own process group, so that a timeout can kill all it started."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, **kw)
    proc.mark = env["GPT_DDP_TEST_MARK"]
    return proc


def leftovers(mark):
    """Processes still alive that carry this run's mark in their environment."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if f"GPT_DDP_TEST_MARK={mark}".encode() in f.read().split(b"\0"):
                    pids.append(int(pid))
        except OSError:
            pass
    return pids


def finish(proc, timeout):
    """Wait for a started command; record processes of the run that outlived it, then kill all."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_all(proc)
        out, err = proc.communicate()
        pytest.fail(f"timed out after {timeout}s:\n{out}\n{err}")
    deadline = time.time() + 5
    while leftovers(proc.mark) and time.time() < deadline:
        time.sleep(0.1)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    result.leftovers = leftovers(proc.mark)  # a process that outlived the command is a bug...
    kill_all(proc)  # ... but it must not outlive the test either
    return result


def kill_all(proc):
    for pid in leftovers(proc.mark):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def run(args, cache, timeout=120, script="DDP-script.py", launcher=None, **env_extra):
    cmd = (launcher or [sys.executable]) + [script] + [str(a) for a in args]
    return finish(start(cmd, script_env(cache, **env_extra)), timeout)


def ok(result):
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert not result.leftovers, f"processes left behind: {result.leftovers}"
    return result


def load_weights(out_dir):
    return torch.load(Path(out_dir) / "model.pt", map_location="cpu", weights_only=True)["model"]


def drop_nprocs(args):
    """The same flags without DDP-script.py's --nprocs (torchrun decides the processes)."""
    i = args.index("--nprocs")
    return args[:i] + args[i + 2:]


def same_weights(out_a, out_b):
    a, b = load_weights(out_a), load_weights(out_b)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def positive(value, what):
    """A reported figure: a finite number above zero (speed itself is never asserted)."""
    assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{what}: {value!r}"
    assert math.isfinite(value) and value > 0, f"{what} is {value!r}"


def metrics(out_dir):
    with open(Path(out_dir) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


# Ten optimizer steps of 8 sequences each, split three ways (world size x batch x accumulation).
SPLITS = {
    "2x4": ["--nprocs", "2", "--batch-size", "4", "--grad-accum", "1"],
    "1x8": ["--nprocs", "1", "--batch-size", "8", "--grad-accum", "1"],
    "2x1x4": ["--nprocs", "2", "--batch-size", "1", "--grad-accum", "4"],
}


@pytest.fixture(scope="session")
def runs(tmp_path_factory, token_cache):
    """Each named run happens once per session; tests share the results."""
    done = {}

    def get(name, args):
        if name not in done:
            out = tmp_path_factory.mktemp(name)
            done[name] = (out, ok(run(TINY + ["--out", out, "--max-steps", "10"] + args, token_cache)))
        return done[name]
    return get


# With dropout on, so the resumed run must also continue the dropout randomness exactly.
RESUME = TINY + ["--dropout", "0.1", "--nprocs", "2", "--batch-size", "2", "--max-steps", "30",
                 "--save-every", "2"]


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory, token_cache):
    out = tmp_path_factory.mktemp("uninterrupted")
    ok(run(RESUME + ["--out", out], token_cache))
    return out
