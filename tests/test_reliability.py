"""Faults and bad input: every case ends quickly, says what went wrong in one line, leaves no
process behind and never damages the last good checkpoint."""
import os
import shutil

import pytest
import torch

from conftest import (FAULTS, RESUME, RESUME_EPOCH_STEPS, TINY, TORCHRUN, finish, free_port,
                      no_gpu, one_error, ok, run, same_weights, script_env, start)

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


@pytest.mark.parametrize("args, needle", [
    (["--batch-size", "-1"], "--batch-size must be at least 1"),
    (["--nprocs", "0"], "--nprocs must be at least 1"),
    (["--grad-accum", "0"], "--grad-accum must be at least 1"),
    (["--context-length", "129"], "outside 1..128"),
    (["--model", "gpt-huge"], "invalid choice: 'gpt-huge'"),
    pytest.param(["--backend", "nccl"], "--backend nccl needs CUDA", marks=no_gpu),
    (["--data", "/nonexistent.txt"], "data file not found"),
    (["--model", "gpt-mini"], "holds a gpt-nano model, not gpt-mini"),
])
def test_bad_input_leaves_checkpoint_alone(args, needle, guarded, token_cache):
    one_error(run(SHORT + ["--out", guarded, "--resume"] + args, token_cache, timeout=60), needle, 2)


def test_out_not_writable(tmp_path, token_cache):
    (tmp_path / "file").write_text("not a folder")
    one_error(run(SHORT + ["--out", tmp_path / "file" / "run"], token_cache, timeout=60),
              "is not writable", 2)


def test_resume_from_truncated_checkpoint(guarded, token_cache):
    ckpt = guarded / "ckpt.pt"
    good = ckpt.read_bytes()
    ckpt.write_bytes(good[:1000])
    one_error(run(SHORT + ["--out", guarded, "--resume"], token_cache, timeout=60), "is damaged", 2)
    assert ckpt.read_bytes() == good[:1000]  # the damaged file itself is left as it was
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
    old = ckpt.read_bytes()
    one_error(run(SHORT + ["--out", guarded, "--resume"], token_cache, timeout=60),
              "holds weights this gpt_model.py cannot load", 2)
    assert ckpt.read_bytes() == old  # the refused file itself is left as it was
    ckpt.write_bytes(good)  # for the fixture's check


def test_a_node_that_never_arrives_under_script_timeout(tmp_path, token_cache):
    """RANK 0 of a 2-process job whose rank 1 never starts: --timeout bounds the wait."""
    result = run(TINY + ["--out", tmp_path, "--timeout", "5"], token_cache, timeout=60,
                 RANK=0, WORLD_SIZE=2, LOCAL_RANK=0, LOCAL_WORLD_SIZE=1, MASTER_PORT=free_port())
    one_error(result, "rank 0 of 2 could not form the process group within --timeout 5s", 2)


def test_a_node_that_never_arrives_under_torchrun(tmp_path, token_cache):
    """c10d rendezvous with join_timeout: torchrun gives up on the missing node by itself."""
    proc = start(TORCHRUN + ["--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
                             f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-id=lonely",
                             "--rdzv-conf=join_timeout=5", "DDP-script-torchrun.py",
                             *map(str, TINY + ["--out", tmp_path])], script_env(token_cache))
    result = finish(proc, 60)
    assert result.returncode == 1  # torchrun's own exit code for a failed rendezvous
    assert "RendezvousTimeoutError" in result.stderr  # torchrun's own report
    assert not result.leftovers
    assert not (tmp_path / "ckpt.pt").exists()


def test_a_rank_that_raises_ends_the_job(guarded, token_cache):
    """Rank 1 raises mid-epoch (an error the script does not foresee): mp.spawn's parent prints
    `error: rank 1 failed:` with that rank's traceback, rank 0 one line, and all exit."""
    result = run(SHORT + ["--out", guarded, "--resume", "--max-steps", "40", "--save-every", "100"],
                 token_cache, timeout=60, PYTHONPATH=FAULTS, GPT_DDP_FAULT="raise:1:3")
    report = f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert result.returncode == 1 and not result.leftovers, report
    failure = result.stderr.split("error: rank 1 failed:\n", 1)
    assert len(failure) == 2, report
    assert "Traceback" in failure[1] and "RuntimeError: injected failure on rank 1 at step 3" in (
        failure[1]), report
    assert "error: rank 0 lost contact with another rank, which failed or was killed" in (
        result.stderr), report


def test_a_rank_that_raises_under_torchrun(tmp_path, token_cache):
    result = run(TINY + ["--batch-size", "2", "--max-steps", "40", "--out", tmp_path], token_cache,
                 script="DDP-script-torchrun.py", timeout=60,
                 launcher=TORCHRUN + ["--standalone", "--nproc_per_node=2"],
                 PYTHONPATH=FAULTS, GPT_DDP_FAULT="raise:1:3")
    assert result.returncode == 1 and not result.leftovers  # torchrun's code for a failed worker
    assert "injected failure on rank 1 at step 3" in result.stderr
    assert "error: rank 0 lost contact with another rank" in result.stderr  # one line, no traceback


def test_crash_while_writing_a_checkpoint(uninterrupted, tmp_path, token_cache):
    """The writer dies halfway through its 19th snapshot (step 38, in the second epoch): the 18th,
    written as the first epoch ended (step 36), is still whole; resuming from it starts the
    second epoch and ends on the weights of a run that never crashed."""
    flags = RESUME + ["--out", tmp_path]
    crashed = run(flags, token_cache, timeout=90, PYTHONPATH=FAULTS, GPT_DDP_FAULT="kill-in-save:19")
    assert crashed.returncode == 1 and not crashed.leftovers
    assert "error: rank 0 was killed by SIGKILL; unless someone killed it" in crashed.stderr
    assert (tmp_path / "ckpt.pt.tmp").exists()  # the half-written file
    kept = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert (kept["step"], kept["epoch"], kept["samples_in_epoch"]) == (RESUME_EPOCH_STEPS, 1, 0)
    resumed = ok(run(flags + ["--resume"], token_cache))
    assert f"resumed from step {RESUME_EPOCH_STEPS} (epoch 2, 0 step(s) into it)" in resumed.stdout
    assert same_weights(uninterrupted, tmp_path)


def test_disk_full_while_saving(guarded, token_cache):
    """The disk fills during a snapshot (the temporary file is /dev/full, which answers every
    write with ENOSPC): one line, exit 3, the previous snapshot intact, no temporary file left."""
    (guarded / "ckpt.pt.tmp").symlink_to("/dev/full")
    weights = (guarded / "model.pt").read_bytes()  # of the finished run it resumes
    result = run(SHORT + ["--out", guarded, "--resume", "--max-steps", "6", "--save-every", "1"],
                 token_cache, timeout=60)
    assert result.returncode == 3 and not result.leftovers, result.stderr
    # rank 0 alone writes, so it alone meets the full disk; rank 1 then loses it and says so
    assert result.stderr.splitlines() == [
        f"error: cannot write {guarded / 'ckpt.pt'}: No space left on device; free space or choose "
        f"another --out (the previous snapshot is intact)",
        "error: rank 1 lost contact with another rank, which failed or was killed: see that "
        "rank's error"], result.stderr
    assert not os.path.lexists(guarded / "ckpt.pt.tmp")
    assert (guarded / "model.pt").read_bytes() == weights


@pytest.mark.parametrize("script, launcher, fix", [
    ("DDP-script.py", [], "use --nprocs 1 (or --nproc_per_node=1)"),
    ("DDP-script-torchrun.py", ["--standalone", "--nproc_per_node=2"], "use --nproc_per_node=1"),
])
def test_more_processes_than_gpus(script, launcher, fix, tmp_path, token_cache):
    """Two processes on a machine that shows one GPU (torch told so by tests/faults): one line
    from the flag checks, exit 2, before any process touches a GPU."""
    flags = [a for a in TINY if a not in ("--device", "cpu", "--amp", "off")]
    result = run(flags + (["--nprocs", "2"] if not launcher else []) + ["--out", tmp_path / "out"],
                 token_cache, script=script, timeout=60, launcher=TORCHRUN + launcher if launcher
                 else None, PYTHONPATH=FAULTS, GPT_DDP_FAULT="fake-gpus:1")
    needle = f"2 processes on this machine but only 1 GPU(s) visible: {fix}"
    if launcher:  # each rank exits 2 with the line from local rank 0; torchrun reports the exit
        assert result.returncode == 1 and not result.leftovers, result.stderr
        errors = [l for l in result.stderr.splitlines() if l.startswith("error:")]
        assert errors == [f"error: {needle}"], result.stderr
        assert "exitcode  : 2" in result.stderr
    else:
        one_error(result, needle, 2)
    assert not (tmp_path / "out").exists()


def test_divergence_stops_every_rank_and_never_saves_nan(tmp_path, token_cache):
    """rank 0 speaks for all (exit 3, one line); every rank stopped at the same check."""
    result = run(SHORT + ["--lr", "1e4", "--max-steps", "40", "--save-every", "1", "--out", tmp_path],
                 token_cache, timeout=60)
    one_error(result, "training diverged; lower --lr", 3)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert not (tmp_path / "model.pt").exists()


def test_network_interface_that_does_not_exist(tmp_path, token_cache):
    """GLOO_SOCKET_IFNAME naming an interface this machine lacks: one line naming the variable."""
    result = run(SHORT + ["--out", tmp_path / "out"], token_cache, timeout=60,
                 GLOO_SOCKET_IFNAME="nosuch0")
    assert result.returncode == 2 and not result.leftovers, result.stderr
    lines = result.stderr.splitlines()  # each rank fails to form the group, each says so once
    assert sorted(line.split(" of 2 ")[0] for line in lines) == ["error: rank 0", "error: rank 1"], (
        result.stderr)
    assert all("Unable to find address for: nosuch0): set GLOO_SOCKET_IFNAME" in line
               for line in lines), result.stderr
    assert not (tmp_path / "out").exists()


def test_ctrl_c_before_the_workers_start(capsys):
    """Ctrl-C while the flags are checked or the text is tokenized (in the parent, before any
    worker exists): one line and exit 130, not a KeyboardInterrupt traceback."""
    from ddp_support.process import usage_errors
    with pytest.raises(SystemExit) as stopped:
        with usage_errors():
            raise KeyboardInterrupt
    assert stopped.value.code == 130
    assert capsys.readouterr().out == "stopped by SIGINT before training began; nothing was saved\n"
