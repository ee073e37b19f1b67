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


TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
FAULTS = f"{ROOT}{os.pathsep}{ROOT / 'tests' / 'faults'}"  # PYTHONPATH with the test-only hooks

_reserved = {}  # port: the socket that holds it until the session ends


def free_port():
    """A port on 127.0.0.1 that stays reserved for this test session, with no window in which
    another socket can take it: it is held bound (not listening) with SO_REUSEADDR, so the kernel
    gives it to no connection or bind(0), while a TCPStore (which binds with SO_REUSEADDR, as
    torchrun's and Gloo's rendezvous do) can still listen on it."""
    while True:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        if port not in _reserved:  # bind(0) with SO_REUSEADDR may offer a port held already
            _reserved[port] = s
            return port
        s.close()


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


def one_error(result, needle, code):
    """Bad input or a failure the scripts foresee: exit `code`, stderr exactly one `error:` line
    holding `needle`, no traceback, no process left behind. Returns that line."""
    report = f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert result.returncode == code, report
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), report
    assert needle in lines[0], report
    assert not result.leftovers, f"processes left behind: {result.leftovers}\n{report}"
    return lines[0]


def load_script(name="DDP-script.py"):
    """A training script as a module (its name has a hyphen, so no plain import)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name.replace("-", "_")[:-3], ROOT / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def probe(folder):
    """What tests/faults/sitecustomize.py recorded (GPT_DDP_PROBE): {rank: [records]}."""
    ranks = {}
    for path in sorted(Path(folder).glob("rank-*.jsonl")):
        with open(path) as f:
            ranks[int(path.stem.split("-")[1])] = [json.loads(line) for line in f]
    return ranks


def records(folder, kind):
    """The probe's records of one kind: {rank: [record, ...]}, in the order they were made."""
    return {rank: [r for r in rows if r["kind"] == kind] for rank, rows in probe(folder).items()}


def weights_sha256(state):
    """The digest the probe takes of a rank's weights, of a saved state dict."""
    import hashlib
    digest = hashlib.sha256()
    for tensor in state.values():
        digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# Bad-input cases that are bad only where torch sees no CUDA GPU.
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="these flags are fine with a GPU")


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
        """(out, result); result.probe: the folder of the probe's records (tests/faults)."""
        if name not in done:
            out, probed = tmp_path_factory.mktemp(name), tmp_path_factory.mktemp(name + "-probe")
            result = ok(run(TINY + ["--out", out, "--max-steps", "10"] + args, token_cache,
                            PYTHONPATH=FAULTS, GPT_DDP_PROBE=probed))
            result.probe = probed
            done[name] = (out, result)
        return done[name]
    return get


# With dropout on, so the resumed run must also continue the dropout randomness exactly. 40
# steps: one epoch is 36 (2 processes x 2 sequences of 32 tokens), so a run resumed late in the
# first epoch crosses into the second, where a wrong epoch (set_epoch) would change the order.
RESUME_STEPS, RESUME_EPOCH_STEPS = 40, 36
RESUME = TINY + ["--dropout", "0.1", "--nprocs", "2", "--batch-size", "2",
                 "--max-steps", str(RESUME_STEPS), "--save-every", "2"]


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory, token_cache):
    """The run that resumed runs must equal (its --out; the probe's records in the folder
    `probe` beside it)."""
    base = tmp_path_factory.mktemp("uninterrupted")
    out, probed = base / "out", base / "probe"
    probed.mkdir()
    ok(run(RESUME + ["--out", out], token_cache, PYTHONPATH=FAULTS, GPT_DDP_PROBE=probed))
    return out
