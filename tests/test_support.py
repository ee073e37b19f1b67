"""The shape the lesson promises: every collective is a tagged line of the scripts, the support
modules make the ranks meet nowhere, their pieces are built without a process group or a file,
the plan cannot change, `main` returns, and ranks that fall out of step are named as such."""
import ast
import dataclasses
import json
import sys

import pytest
import torch.distributed as dist

from conftest import (ROOT, SPLITS, TINY, finish, load_script, metrics, run, same_weights,
                      script_env, start)

SCRIPTS = ["DDP-script.py", "DDP-script-torchrun.py"]
SUPPORT = sorted((ROOT / "ddp_support").glob("*.py"))
# What makes ranks meet: collectives, and the calls every rank must enter (groups, the group itself)
MEETING = {"all_reduce", "all_gather", "all_gather_object", "broadcast", "broadcast_object_list",
           "barrier", "monitored_barrier", "reduce", "scatter", "gather", "reduce_scatter",
           "all_to_all", "new_group", "init_process_group", "destroy_process_group"}


def dist_calls(path):
    """(line, name) of every call of torch.distributed's functions (`dist.name(...)`) in a file."""
    calls = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                isinstance(node.func.value, ast.Name) and node.func.value.id == "dist":
            calls.append((node.func.lineno, node.func.attr))
    return sorted(calls)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_collective_is_a_tagged_line_of_the_script(script):
    lines = (ROOT / script).read_text().splitlines()
    meets = [(n, name) for n, name in dist_calls(ROOT / script) if name in MEETING]
    # the group, the stop flag's group; evaluation, the stop flag, the training loss, the same
    # start (snapshot, text, precision); the replica check; the last meeting and the goodbye
    expected = ["init_process_group", "new_group", "all_reduce", "all_reduce", "all_reduce",
                "all_reduce", "monitored_barrier", "all_gather_object", "barrier",
                "destroy_process_group"]  # monitored_barrier: with --compile, all compiled
    assert sorted(name for _, name in meets) == sorted(expected), meets
    for n, name in meets:  # the tag on the call's own line, so that grep prints the call
        assert "# NEW" in lines[n - 1], f"{script}:{n}: dist.{name} has no NEW: tag on its line"
    for call in ["DDP(", "model.no_sync()", "set_epoch(", "DistributedSampler", ".backward()"] + (
            ["mp.spawn("] if script == "DDP-script.py" else ["restart_safe_store("]):
        tagged = [line for line in lines if call in line and "# NEW" in line]
        assert tagged, f"{script}: no line holds {call} with a NEW: tag after it"


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_group_forms_inside_setup_errors(script):
    """The process group and the stop flag's Gloo group (with NCCL) form inside `setup_errors`,
    so that an interface that reaches no other node is one line for either (the stop group once
    formed later, in a constructor, and failed there with a traceback)."""
    tree = ast.parse((ROOT / script).read_text())
    blocks = [node for node in ast.walk(tree) if isinstance(node, ast.With) and any(
        isinstance(item.context_expr, ast.Call) and getattr(item.context_expr.func, "id", "") ==
        "setup_errors" for item in node.items)]
    assert len(blocks) == 1
    inside = {node.func.attr for node in ast.walk(blocks[0]) if isinstance(node, ast.Call)
              and isinstance(node.func, ast.Attribute)}
    assert {"init_process_group", "new_group"} <= inside


def test_no_support_module_makes_the_ranks_meet():
    """Only the scripts call collectives; the one group a support module makes is the DDP group
    of workarounds.py, which the scripts call in ddp_setup."""
    meets = {(path.name, name) for path in SUPPORT for _, name in dist_calls(path) if name in MEETING}
    assert meets == {("workarounds.py", "new_group")}
    assert all(len(path.read_text().splitlines()) <= 380 for path in SUPPORT)  # a few small modules


def test_pieces_are_built_without_a_group_or_a_file(tmp_path, token_cache, monkeypatch):
    """The plan is frozen and holds no flag namespace; Position and Log are built with no process
    group and create no file."""
    from ddp_support.plan import make_plan
    from ddp_support.progress import Log, Position
    monkeypatch.setenv("GPT_DDP_CACHE", str(token_cache))
    script = load_script()
    out = tmp_path / "out"
    plan = make_plan(script.parse_args(TINY + ["--out", str(out)]), "DDP-script.py", "test")
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.peak_lr = 1.0
    assert not hasattr(plan, "nprocs") and not hasattr(plan, "args")  # no reading through
    assert (plan.script, plan.launcher, plan.world_size, plan.resume_from) == (
        "DDP-script.py", "test", 2, None)
    position = Position()
    log = Log(plan, position, {"calls": 0, "bytes": 0})
    assert (position.step, position.epoch, log.start_step) == (0, 0, 0)
    assert not dist.is_initialized() and not out.exists() and not list(tmp_path.iterdir())
    assert json.loads(json.dumps(plan.as_dict()))["peak_lr"] == plan.peak_lr  # plain values


MAIN_IN_A_CHILD = """
import importlib.util, json, os, signal, sys
import torch.distributed as dist
from ddp_support import process
from ddp_support.plan import make_plan
from ddp_support.process import master_port

spec = importlib.util.spec_from_file_location("ddp_script", "DDP-script.py")
script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(script)
flags, done, stopped = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
results = []
for out, stop in ((done, 0), (stopped, signal.SIGTERM)):
    plan = make_plan(script.parse_args(flags + ["--out", out]), "DDP-script.py", "a test")
    os.environ["MASTER_PORT"] = master_port("127.0.0.1")
    process._received["signal"] = stop  # as if SIGTERM came before the first step
    code = script.main(0, 1, plan)
    results.append({"code": code, "in_group": dist.is_initialized()})
print("results: " + json.dumps(results), flush=True)
"""


def test_main_returns_in_a_child_interpreter(runs, tmp_path, token_cache):
    """main(rank, world_size, plan) in a fresh interpreter, world size 1, twice: it returns 0
    after a run to the end, 143 after a SIGTERM (the flag the handler raises), leaves the group
    each time, and writes what the command-line run of the same flags writes."""
    flags = TINY + ["--max-steps", "10"] + SPLITS["1x8"]
    done, stopped = tmp_path / "done", tmp_path / "stopped"
    proc = start([sys.executable, "-c", MAIN_IN_A_CHILD, json.dumps(flags), str(done), str(stopped)],
                 script_env(token_cache))
    result = finish(proc, 120)
    assert result.returncode == 0, result.stdout + result.stderr
    line = next(l for l in result.stdout.splitlines() if l.startswith("results: "))
    assert json.loads(line.split(": ", 1)[1]) == [{"code": 0, "in_group": False},
                                                  {"code": 143, "in_group": False}]
    assert [r["step"] for r in metrics(done)] == [5, 10]
    assert "done: 10 steps" in result.stdout and (done / "ckpt.pt").exists()
    assert "stopped by SIGTERM after step 1" in result.stdout
    assert (stopped / "ckpt.pt").exists() and not (stopped / "model.pt").exists()
    assert same_weights(runs("1x8", SPLITS["1x8"])[0], done)


def rank_0_only_evaluation(tmp_path):
    """DDP-script.py with the mistake a practitioner makes "to save time": validation on rank 0
    alone. Rank 0 then enters an all-reduce that rank 1 never does."""
    text = (ROOT / "DDP-script.py").read_text()
    old = "plan.eval_iters)\n                                if val_due else None)"
    assert text.count(old) == 1
    mistaken = tmp_path / "DDP-script.py"
    mistaken.write_text(text.replace(old, old.replace("if val_due", "if rank == 0 and val_due")))
    return mistaken


def cause_line(result):
    """The one error line that names why; the others only point at another rank's error."""
    report = f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert result.returncode == 1 and not result.leftovers, report
    assert "Traceback" not in result.stderr, report
    lines = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    causes = [l for l in lines if "lost contact with another rank, which failed" not in l]
    assert len(causes) == 1 and len(lines) <= 2, report
    line = causes[0]
    assert "the ranks fell out of step, at a collective that not every rank reached (one under " \
           "`if rank == 0`, or a rank that left the loop early)" in line, report
    assert "TORCH_DISTRIBUTED_DEBUG=DETAIL" in line and "network" not in line, report
    return line


def test_a_collective_under_if_rank_0_aborts_with_its_cause(tmp_path, token_cache):
    """Evaluation every 5 steps: rank 0's 2-number all-reduce meets rank 1's next gradient
    all-reduce, Gloo finds the sizes differ and aborts rank 0 (SIGABRT): the parent says why."""
    result = run(TINY + ["--nprocs", "2", "--max-steps", "12", "--out", tmp_path / "out"],
                 token_cache, script=rank_0_only_evaluation(tmp_path), timeout=120)
    line = cause_line(result)
    assert line.startswith("error: rank 0 was killed by SIGABRT: most often the ranks fell out")


def test_a_collective_under_if_rank_0_times_out_with_its_cause(tmp_path, token_cache):
    """Evaluation only at the end: rank 0 waits in it, rank 1 in the replica check; nothing comes
    within --timeout, and the rank that timed out says why (the single machine: no network)."""
    result = run(TINY + ["--nprocs", "2", "--max-steps", "6", "--eval-every", "100", "--timeout",
                         "8", "--out", tmp_path / "out"],
                 token_cache, script=rank_0_only_evaluation(tmp_path), timeout=120)
    line = cause_line(result)
    assert "lost contact with another rank: nothing arrived within --timeout 8s: most often" in line


def test_detail_mode_names_the_collectives_that_differ(tmp_path, token_cache):
    """The hint works: under TORCH_DISTRIBUTED_DEBUG=DETAIL (which would crash DDP's constructor
    on Gloo without workarounds.ddp_group_for_debug) each rank names the two collectives."""
    result = run(TINY + ["--nprocs", "2", "--max-steps", "6", "--out", tmp_path / "out"],
                 token_cache, script=rank_0_only_evaluation(tmp_path), timeout=120,
                 TORCH_DISTRIBUTED_DEBUG="DETAIL")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    lines = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert lines and all("the ranks fell out of step: Detected mismatch between collectives" in l
                         for l in lines), result.stderr
    assert any("TensorShape=[2], TensorDtypes=Double" in l for l in lines), result.stderr


def test_detail_mode_trains_as_usual(runs, tmp_path, token_cache):
    """Nothing out of step: the same weights as without the checks."""
    checked = run(TINY + ["--max-steps", "10"] + SPLITS["2x4"] + ["--out", tmp_path], token_cache,
                  TORCH_DISTRIBUTED_DEBUG="DETAIL")
    assert checked.returncode == 0, checked.stderr
    assert same_weights(runs("2x4", SPLITS["2x4"])[0], tmp_path)


@pytest.mark.parametrize("text, kind", [
    ("[../gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 8000ms for recv operation",
     "timeout"),
    ("[Rank 1] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=12, "
     "OpType=ALLREDUCE, NumelIn=2, NumelOut=2, Timeout(ms)=600000) ran for 600010 milliseconds",
     "timeout"),
    ("[Rank 0] Work WorkNCCL(SeqNum=7, OpType=ALLREDUCE) timed out in blocking wait.", "timeout"),
    ("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:48123", "lost"),
    ("NCCL error in: ../ProcessGroupNCCL.cpp:2100, remote process exited or there was a network "
     "error, NCCL version 2.27.5\nncclRemoteError: A call failed possibly due to a network error "
     "or a remote process exiting prematurely.", "lost"),
    ("NCCL communicator was aborted on rank 1.", "lost"),
    ("CUDA error: an illegal memory access was encountered", None),
])
def test_collective_errors_are_told_apart(text, kind, monkeypatch):
    """Gloo's and NCCL's messages (NCCL's as libtorch_cuda.so of torch 2.11 and 2.14.1 holds
    them) become the scripts' lines; any other error is left to show its traceback."""
    from ddp_support import process
    monkeypatch.setattr(process.time, "sleep", lambda s: None)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    line = process.collective_error(RuntimeError(text), 1, 2, 600)
    if kind == "timeout":
        assert line.startswith("error: rank 1 lost contact with another rank: nothing arrived "
                               "within --timeout 600s: most often the ranks fell out of step")
    elif kind == "lost":
        assert line == ("error: rank 1 lost contact with another rank, which failed or was "
                        "killed: see that rank's error")
    else:
        assert line is None
