"""DDP-script-torchrun.py under real torchrun processes: one node, two nodes on loopback, restarts."""
import os
import re
import signal
import subprocess
import time

import torch

from conftest import (ROOT, FAULTS, RESUME, RESUME_EPOCH_STEPS, RESUME_STEPS, SPLITS, TINY, TORCHRUN,
                      drop_nprocs, finish, free_port, ok, run, same_weights, script_env, start)

SCRIPT = "DDP-script-torchrun.py"


def two_nodes(args, cache, nproc, rdzv="static", max_restarts=0, node_args=((), ()),
              node_env=({}, {})):
    """Start two torchrun agents on this machine, as node 0 and node 1, talking over 127.0.0.1;
    node_args, node_env: flags and environment for one node only (the rest go to both)."""
    port = free_port()
    procs = []
    for node in (0, 1):
        if rdzv == "static":
            launch = [f"--node_rank={node}", "--master_addr=127.0.0.1", f"--master_port={port}"]
        else:
            launch = ["--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=test-job"]
        cmd = TORCHRUN + ["--nnodes=2", f"--nproc_per_node={nproc}", f"--max-restarts={max_restarts}",
                          *launch, SCRIPT, *map(str, args), *map(str, node_args[node])]
        procs.append(start(cmd, {**script_env(cache), **node_env[node]}))
    return procs


def workers_of(agent):
    """Worker processes that a torchrun agent started."""
    out = subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def wait_for(path, procs, timeout=90):
    deadline = time.time() + timeout
    while not path.exists():
        assert time.time() < deadline and all(p.poll() is None for p in procs), "no snapshot came"
        time.sleep(0.01)


def test_standalone_matches_mp_spawn(runs, tmp_path, token_cache):
    """torchrun --standalone and mp.spawn, same flags, same world size: identical weights."""
    result = ok(run(TINY + drop_nprocs(SPLITS["2x4"]) + ["--out", tmp_path, "--max-steps", "10"],
                    token_cache, script=SCRIPT, launcher=TORCHRUN + ["--standalone", "--nproc_per_node=2"]))
    assert "world size 2 (gloo on cpu, 1 thread(s) per process), started by torchrun" in result.stdout
    assert "check: all 2 replicas hold identical weights" in result.stdout
    for name in ("ckpt.pt", "model.pt", "metrics.jsonl", "loss.png"):
        assert (tmp_path / name).exists()
    assert same_weights(runs("2x4", SPLITS["2x4"])[0], tmp_path)


def test_plain_python_is_world_size_one(runs, tmp_path, token_cache):
    result = ok(run(TINY + ["--out", tmp_path, "--max-steps", "10", "--batch-size", "8"], token_cache,
                    script=SCRIPT))
    assert "world size 1 (gloo on cpu" in result.stdout and "started by python" in result.stdout
    assert same_weights(runs("1x8", SPLITS["1x8"])[0], tmp_path)


def test_two_nodes_one_process_each(runs, tmp_path, token_cache):
    """--nnodes=2 on loopback: global ranks 0 and 1 on different 'nodes'; one checkpoint."""
    args = TINY + drop_nprocs(SPLITS["2x4"]) + ["--out", tmp_path, "--max-steps", "10"]
    node0, node1 = (finish(p, 180) for p in two_nodes(args, token_cache, nproc=1))
    ok(node0), ok(node1)
    assert "check: all 2 replicas" in node0.stdout and "plan:" not in node1.stdout  # rank 0 alone prints
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "loss.png", "metrics.jsonl", "model.pt"]
    assert same_weights(runs("2x4", SPLITS["2x4"])[0], tmp_path)


def test_two_nodes_two_processes_each(tmp_path, token_cache):
    """World size 4 as 2 nodes x 2 processes equals 4 processes on one node (mp.spawn)."""
    flags = TINY + ["--batch-size", "2", "--max-steps", "6"]
    ok(run(flags + ["--nprocs", "4", "--out", tmp_path / "one-node"], token_cache, timeout=180))
    node0, node1 = (finish(p, 180) for p in two_nodes(flags + ["--out", tmp_path / "two-nodes"],
                                                         token_cache, nproc=2))
    ok(node0), ok(node1)
    assert "world size 4" in node0.stdout
    assert same_weights(tmp_path / "one-node", tmp_path / "two-nodes")


def kill_a_worker_then_finish(agents, out):
    """SIGKILL one worker after the first snapshot; torchrun restarts the workers, who resume."""
    wait_for(out / "ckpt.pt", agents)
    victim = workers_of(agents[-1])[-1]
    os.kill(victim, signal.SIGKILL)
    results = [finish(a, 240) for a in agents]
    for r in results:
        ok(r)
    log = "".join(r.stdout for r in results)
    assert "resumed from step" in log
    return log


def test_standalone_restart_resumes(uninterrupted, tmp_path, token_cache):
    """Rank 1 killed (SIGKILL, by tests/faults) in step 35, one before its epoch ends: torchrun
    restarts both workers, they resume from step 34's snapshot, cross into the second epoch and
    end on the uninterrupted run's weights."""
    killed_at = RESUME_EPOCH_STEPS - 1
    agent = start(TORCHRUN + ["--standalone", "--nproc_per_node=2", "--max-restarts=1", SCRIPT,
                              *map(str, drop_nprocs(RESUME)), "--out", str(tmp_path)],
                  script_env(token_cache, PYTHONPATH=FAULTS, GPT_DDP_FAULT=f"kill:1:{killed_at}"))
    result = ok(finish(agent, 240))
    saved = killed_at - 1
    assert f"resumed from step {saved} (epoch 1, {saved} step(s) into it)" in result.stdout
    assert f"done: {RESUME_STEPS} steps" in result.stdout
    assert same_weights(uninterrupted, tmp_path)


def test_two_node_c10d_restart_resumes(uninterrupted, tmp_path, token_cache):
    agents = two_nodes(drop_nprocs(RESUME) + ["--out", tmp_path], token_cache, nproc=1, rdzv="c10d",
                       max_restarts=1)
    kill_a_worker_then_finish(agents, tmp_path)
    assert same_weights(uninterrupted, tmp_path)


def test_resume_at_another_world_size(tmp_path, token_cache):
    """A snapshot of 2 processes continues in 1: the data order changes, the run finishes."""
    flags = TINY + ["--batch-size", "2", "--out", tmp_path]
    ok(run(flags + ["--max-steps", "6"], token_cache, script=SCRIPT,
           launcher=TORCHRUN + ["--standalone", "--nproc_per_node=2"]))
    result = ok(run(flags + ["--max-steps", "12", "--resume"], token_cache, script=SCRIPT))
    assert "resumed from step 6" in result.stdout
    assert "saved at world size 2, now 1" in result.stdout
    assert "done: 12 steps" in result.stdout
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 12


def test_nodes_with_different_snapshots_refuse_to_train(runs, tmp_path, token_cache):
    """Nodes that do not share --out may hold different snapshots: training from different steps
    would be silently wrong, so every rank stops with one line, and nothing is overwritten."""
    ckpt = torch.load(runs("2x4", SPLITS["2x4"])[0] / "ckpt.pt", weights_only=True)
    outs = [tmp_path / "node0", tmp_path / "node1"]
    for out, step in zip(outs, (10, 4)):
        out.mkdir()
        torch.save(dict(ckpt, step=step), out / "ckpt.pt")
    (outs[0] / "metrics.jsonl").write_text("".join(f'{{"step": {s}}}\n' for s in (5, 10, 11)))

    def files():
        return [(o / name).read_bytes() for o in outs for name in ("ckpt.pt", "metrics.jsonl")
                if (o / name).exists()]
    before = files()
    agents = two_nodes(TINY + ["--batch-size", "4", "--max-steps", "12", "--resume"], token_cache,
                       nproc=1, node_args=(["--out", outs[0]], ["--out", outs[1]]))
    results = [finish(a, 120) for a in agents]
    for r in results:
        assert r.returncode == 1 and not r.leftovers, r.stdout + r.stderr  # torchrun's code
        assert "exitcode  : 2" in r.stderr, r.stderr  # the worker's: bad input
        assert 'DDP-script-torchrun.py", line' not in r.stderr, r.stderr  # torchrun's report only
    stderr = "".join(r.stderr for r in results)
    assert stderr.count("error: the ranks found different snapshots in --out") == 2, stderr
    assert "(steps 4 to 10)" in stderr
    assert files() == before  # not even the log is trimmed
    assert not any((o / "model.pt").exists() for o in outs)


def test_nodes_with_different_text_are_refused(tmp_path, token_cache):
    """Nodes tokenize their own copy of --data (they need not share a filesystem): if their texts
    differ, every node says so in one line and exits 2 before the first step, instead of
    training with epochs of different lengths."""
    longer = tmp_path / "longer.txt"
    longer.write_text((ROOT / "assets" / "the-verdict.txt").read_text() * 2)
    agents = two_nodes(TINY + ["--out", tmp_path / "out", "--max-steps", "4"], token_cache, 1,
                       node_args=((), ("--data", longer)))
    for node, agent in enumerate(agents):
        result = finish(agent, 120)
        lines = [l for l in result.stderr.splitlines() if l.startswith("error:")]
        assert result.returncode == 1 and "exitcode  : 2" in result.stderr, result.stderr
        assert len(lines) == 1 and lines[0].startswith("error: the nodes hold different text ("), (
            result.stderr)
        assert re.search(r"\(5,\d{3} to 10,\d{3} tokens\): pass the same --data on every node$",
                         lines[0]), lines[0]
        assert 'DDP-script-torchrun.py", line' not in result.stderr
    assert not (tmp_path / "out" / "ckpt.pt").exists()


def test_nodes_with_different_precisions_are_refused(tmp_path, token_cache):
    """Nodes that pass different --amp flags would mix bf16 and fp32 (or fp16) gradients in one
    all-reduce: they stop before the first step, one line a node."""
    agents = two_nodes(TINY + ["--out", tmp_path / "out", "--max-steps", "4"], token_cache, 1,
                       node_args=(("--amp", "off"), ("--amp", "bf16")))
    for agent in agents:
        result = finish(agent, 120)
        lines = [l for l in result.stderr.splitlines() if l.startswith("error:")]
        assert result.returncode == 1 and "exitcode  : 2" in result.stderr, result.stderr
        assert lines == ["error: the nodes train in different precisions (off and bf16): pass the "
                         "same --amp on every node, or --amp auto on all (the lowest precision "
                         "that every rank computes)"], result.stderr
    assert not (tmp_path / "out" / "ckpt.pt").exists()


def test_amp_auto_trains_all_nodes_in_the_lowest_precision(runs, tmp_path, token_cache):
    """--amp auto on two nodes whose CPUs differ: node 0 computes bf16, node 1 does not, so both
    train in fp32, and the weights are those of a 2-process --amp off run on one node."""
    args = TINY + drop_nprocs(SPLITS["2x4"]) + ["--out", tmp_path, "--max-steps", "10"]
    bf16 = ({"PYTHONPATH": FAULTS, "GPT_DDP_FAULT": "cpu-bf16:1"},
            {"PYTHONPATH": FAULTS, "GPT_DDP_FAULT": "cpu-bf16:0"})
    node0, node1 = (finish(p, 180) for p in two_nodes(args, token_cache, nproc=1,
                                                         node_args=(("--amp", "auto"),) * 2,
                                                         node_env=bf16))
    ok(node0), ok(node1)
    assert "plan: precision: fp32, " in node0.stdout, node0.stdout  # node 0 alone chose bf16
    assert same_weights(runs("2x4", SPLITS["2x4"])[0], tmp_path)


def test_a_slow_tokenization_is_not_a_collective_timeout(tmp_path, token_cache):
    """The text takes longer to tokenize than --timeout: one process of the node tokenizes while
    the other waits for its token file (a lock, not a collective), so no collective times out."""
    result = run(TINY + ["--out", tmp_path / "out", "--max-steps", "2", "--timeout", "3",
                         "--cache-dir", tmp_path / "cache"], token_cache, script=SCRIPT,
                 launcher=TORCHRUN + ["--standalone", "--nproc_per_node=2"], PYTHONPATH=FAULTS,
                 GPT_DDP_FAULT="slow-tokenize:6")
    ok(result)
    assert "done: 2 steps" in result.stdout
    assert len(list((tmp_path / "cache").glob("tokens-*.u16"))) == 1
