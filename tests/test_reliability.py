"""Faults and bad input: every case ends quickly, says what went wrong in one line, leaves no
process behind and never damages the last good checkpoint."""
import os
import shutil
import sys
import time

import pytest
import torch

from conftest import RESUME, ROOT, TINY, finish, free_port, load_weights, ok, run, script_env, start

FAULTS = f"{ROOT}{os.pathsep}{ROOT / 'tests' / 'faults'}"  # PYTHONPATH with sitecustomize.py
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
SHORT = TINY + ["--nprocs", "2", "--batch-size", "2"]


@pytest.fixture(scope="module")
def good_run(tmp_path_factory, token_cache):
    """A finished run whose ckpt.pt every bad command below must leave exactly as it is."""
    out = tmp_path_factory.mktemp("good")
    ok(run(SHORT + ["--max-steps", "4", "--out", out], token_cache))
    return out


@pytest.fixture
def guarded(good_run, tmp_path):
    """A copy of the good run; after the test its ckpt.pt must be byte-identical."""
    out = tmp_path / "run"
    shutil.copytree(good_run, out)
    before = (out / "ckpt.pt").read_bytes()
    yield out
    assert (out / "ckpt.pt").read_bytes() == before, "the last good checkpoint was changed"


def failed(result, needle, seconds, started):
    """Non-zero exit, the cause in one `error:` line, no traceback, no process left, quickly."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    errors = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert any(needle in l for l in errors), result.stderr
    assert not result.leftovers, f"processes left behind: {result.leftovers}"
    assert time.time() - started < seconds
    return errors


@pytest.mark.parametrize("args, needle", [
    (["--batch-size", "-1"], "--batch-size must be at least 1"),
    (["--nprocs", "0"], "--nprocs must be at least 1"),
    (["--grad-accum", "0"], "--grad-accum must be at least 1"),
    (["--context-length", "129"], "outside 1..128"),
    (["--model", "gpt-huge"], "invalid choice: 'gpt-huge'"),
    (["--backend", "nccl"], "--backend nccl needs CUDA"),
    (["--data", "/nonexistent.txt"], "data file not found"),
    (["--model", "gpt-mini"], "holds a gpt-nano model, not gpt-mini"),
])
def test_bad_input_leaves_checkpoint_alone(args, needle, guarded, token_cache):
    t0 = time.time()
    failed(run(SHORT + ["--out", guarded, "--resume"] + args, token_cache, timeout=60), needle, 30, t0)


def test_out_not_writable(tmp_path, token_cache):
    (tmp_path / "file").write_text("not a folder")
    t0 = time.time()
    failed(run(SHORT + ["--out", tmp_path / "file" / "run"], token_cache, timeout=60),
           "is not writable", 30, t0)


def test_resume_from_truncated_checkpoint(guarded, token_cache):
    ckpt = guarded / "ckpt.pt"
    good = ckpt.read_bytes()
    ckpt.write_bytes(good[:1000])
    t0 = time.time()
    failed(run(SHORT + ["--out", guarded, "--resume"], token_cache, timeout=60), "is damaged", 30, t0)
    ckpt.write_bytes(good)  # for the fixture's check


def test_resume_from_checkpoint_of_an_older_layout(guarded, token_cache):
    """A checkpoint written before the model took the book's parameter names (norm.weight/bias,
    not scale/shift) is refused in one line, before any process starts."""
    ckpt = guarded / "ckpt.pt"
    good = ckpt.read_bytes()
    state = torch.load(ckpt, weights_only=True)
    state["model"] = {k.replace(".scale", ".weight").replace(".shift", ".bias"): v
                      for k, v in state["model"].items()}
    torch.save(state, ckpt)
    t0 = time.time()
    failed(run(SHORT + ["--out", guarded, "--resume"], token_cache, timeout=60),
           "holds weights this gpt_model.py cannot load", 30, t0)
    ckpt.write_bytes(good)  # for the fixture's check


def test_a_node_that_never_arrives_under_script_timeout(tmp_path, token_cache):
    """RANK 0 of a 2-process job whose rank 1 never starts: --timeout bounds the wait."""
    t0 = time.time()
    result = run(TINY + ["--out", tmp_path, "--timeout", "5"], token_cache, timeout=60,
                 RANK=0, WORLD_SIZE=2, LOCAL_RANK=0, LOCAL_WORLD_SIZE=1, MASTER_PORT=free_port())
    failed(result, "rank 0 of 2 could not form the process group within --timeout 5s", 30, t0)


def test_a_node_that_never_arrives_under_torchrun(tmp_path, token_cache):
    """c10d rendezvous with join_timeout: torchrun gives up on the missing node by itself."""
    t0 = time.time()
    proc = start(TORCHRUN + ["--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
                             f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-id=lonely",
                             "--rdzv-conf=join_timeout=5", "DDP-script-torchrun.py",
                             *map(str, TINY + ["--out", tmp_path])], script_env(token_cache))
    result = finish(proc, 90)
    assert result.returncode != 0
    assert "RendezvousTimeoutError" in result.stderr  # torchrun's own report
    assert not result.leftovers and time.time() - t0 < 60
    assert not (tmp_path / "ckpt.pt").exists()


def test_a_rank_that_raises_ends_the_job(guarded, token_cache):
    """Rank 1 raises mid-epoch: all ranks exit within seconds and the cause is that error."""
    t0 = time.time()
    result = run(SHORT + ["--out", guarded, "--resume", "--max-steps", "40", "--save-every", "100"],
                 token_cache, timeout=90, PYTHONPATH=FAULTS, GPT_DDP_FAULT="raise:1:3")
    assert result.returncode != 0
    assert "injected failure on rank 1 at step 3" in result.stderr
    assert not result.leftovers and time.time() - t0 < 60


def test_a_rank_that_raises_under_torchrun(tmp_path, token_cache):
    t0 = time.time()
    result = run(TINY + ["--batch-size", "2", "--max-steps", "40", "--out", tmp_path], token_cache,
                 script="DDP-script-torchrun.py", timeout=90,
                 launcher=TORCHRUN + ["--standalone", "--nproc_per_node=2"],
                 PYTHONPATH=FAULTS, GPT_DDP_FAULT="raise:1:3")
    assert result.returncode != 0
    assert "injected failure on rank 1 at step 3" in result.stderr
    assert "rank 0 lost contact with another rank" in result.stderr  # one line, no traceback
    assert not result.leftovers and time.time() - t0 < 60


def test_crash_while_writing_a_checkpoint(uninterrupted, tmp_path, token_cache):
    """The writer dies halfway through its second snapshot: the first one is still whole, and
    resuming from it ends on the weights of a run that never crashed."""
    flags = RESUME + ["--out", tmp_path]
    crashed = run(flags, token_cache, timeout=90, PYTHONPATH=FAULTS, GPT_DDP_FAULT="kill-in-save:2")
    assert crashed.returncode == 1 and not crashed.leftovers
    assert "error: rank 0 was killed by SIGKILL; unless someone killed it" in crashed.stderr
    assert (tmp_path / "ckpt.pt.tmp").exists()  # the half-written file
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 2
    resumed = ok(run(flags + ["--resume"], token_cache))
    assert "resumed from step 2" in resumed.stdout
    a, b = load_weights(uninterrupted), load_weights(tmp_path)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_divergence_stops_every_rank_and_never_saves_nan(tmp_path, token_cache):
    t0 = time.time()
    result = run(SHORT + ["--lr", "1e4", "--max-steps", "40", "--save-every", "1", "--out", tmp_path],
                 token_cache, timeout=90)
    errors = failed(result, "training diverged; lower --lr", 60, t0)
    assert len(errors) == 1  # rank 0 speaks for all; every rank stopped at the same check
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert not (tmp_path / "model.pt").exists()


def test_network_interface_that_does_not_exist(tmp_path, token_cache):
    """GLOO_SOCKET_IFNAME naming an interface this machine lacks: one line naming the variable."""
    t0 = time.time()
    result = run(SHORT + ["--out", tmp_path / "out"], token_cache, timeout=60,
                 GLOO_SOCKET_IFNAME="nosuch0")
    failed(result, "Unable to find address for: nosuch0): set GLOO_SOCKET_IFNAME", 30, t0)
    assert result.returncode == 2 and not (tmp_path / "out").exists()


def test_ctrl_c_before_the_workers_start(capsys):
    """Ctrl-C while the flags are checked or the text is tokenized (in the parent, before any
    worker exists): one line and exit 130, not a KeyboardInterrupt traceback."""
    import run_support as rs
    with pytest.raises(SystemExit) as stopped:
        with rs.usage_errors():
            raise KeyboardInterrupt
    assert stopped.value.code == 130
    assert capsys.readouterr().out == "stopped by SIGINT before training began; nothing was saved\n"
