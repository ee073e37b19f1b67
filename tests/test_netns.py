"""Two hosts on a real network: each node's torchrun in its own network namespace, the two joined
by a veth pair (tests/netns.py). Unlike two "nodes" on loopback, they share no 127.0.0.1 and no
port, so a store or Gloo bound to the wrong interface, or an address the other node cannot
reach, fails here as it would on a cluster. Needs root; skips otherwise (fails under CI=true)."""
import os
import subprocess
import sys
import time

import pytest
import torch

import netns
from conftest import (ROOT, RESUME, RESUME_STEPS, SPLITS, TINY, TORCHRUN, drop_nprocs, finish,
                      free_port, ok, run, same_weights, script_env, start)

SCRIPT = "DDP-script-torchrun.py"
CUT_TIMEOUT = 10  # --timeout of the link-cut run


@pytest.fixture(scope="session")
def hosts_ok():
    """Once per session: sweep namespaces that a killed earlier run left, check that two hosts
    can be made here."""
    netns.require(netns.why_not())


@pytest.fixture
def link(hosts_ok):
    with netns.Link() as link:  # closed also when the test fails or is interrupted
        yield link
    assert not any(ns in netns.list_namespaces() for ns in link.ns)


@pytest.fixture
def tmpdir_env(tmp_path):
    """A TMPDIR of the test's own (torchrun leaves torchelastic_* folders there)."""
    d = tmp_path / "tmp"
    d.mkdir()
    return {"TMPDIR": d}


def agent(link, node, args, cache, port, nproc=1, rdzv="static", max_restarts=0, local_addr=True,
          **env):
    """node's torchrun, started inside its namespace; Gloo on that namespace's veth unless env
    says otherwise (env wins, GLOO_SOCKET_IFNAME included). local_addr=False: c10d without
    --local-addr."""
    if rdzv == "static":
        launch = [f"--node_rank={node}", f"--master_addr={link.addr[0]}", f"--master_port={port}"]
    else:
        # In a namespace the hostname resolves to 127.0.0.1: --local-addr is what this node
        # advertises, and node 0 must be told that it hosts the rendezvous store (it cannot
        # recognise the endpoint's address as its own).
        launch = ["--rdzv-backend=c10d", f"--rdzv-endpoint={link.addr[0]}:{port}",
                  "--rdzv-id=two-hosts"]
        if local_addr:
            launch.append(f"--local-addr={link.addr[node]}")
        if node == 0:
            launch.append("--rdzv-conf=is_host=1")
    cmd = TORCHRUN + ["--nnodes=2", f"--nproc_per_node={nproc}", f"--max-restarts={max_restarts}",
                      *launch, SCRIPT, *args]
    return start(link.cmd(node, cmd),
                 script_env(cache, **{"GLOO_SOCKET_IFNAME": link.ifname[node], **env}))


def two_hosts(link, args, cache, node_args=((), ()), **kw):
    port = free_port()
    return [agent(link, node, [*map(str, args), *map(str, node_args[node])], cache, port, **kw)
            for node in (0, 1)]


def wait_for(path, procs, timeout=120):
    deadline = time.time() + timeout
    while not path.exists():
        assert time.time() < deadline, f"no {path.name} within {timeout}s"
        for p in procs:
            assert p.poll() is None, finish(p, 10)
        time.sleep(0.01)


def empty(link):
    return not link.pids(0) and not link.pids(1)


# The files of the script and its support modules, as a traceback names them.
OWN_FILES = [SCRIPT] + [f"ddp_support{os.sep}{p.name}" for p in (ROOT / "ddp_support").glob("*.py")]


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def own_traceback(stderr):
    """A traceback through the script's own files (torchrun's agent may print its own)."""
    return any(f'{name}", line' in stderr for name in OWN_FILES)


@pytest.fixture(scope="session")
def four_processes(tmp_path_factory, token_cache):
    """World size 4 on one node (mp.spawn), the reference for 2 hosts x 2 processes."""
    out = tmp_path_factory.mktemp("one-node-4")
    ok(run(TINY + ["--batch-size", "2", "--max-steps", "6", "--nprocs", "4", "--out", out],
           token_cache, timeout=180))
    return out


def test_fixture_configures_only_its_namespaces_and_cleans_up(hosts_ok):
    """The host's own interfaces and addresses stay as they are; a killed run's namespaces are
    swept."""
    def host_view():
        return [subprocess.run(["ip", "-br", what], capture_output=True, text=True).stdout
                for what in ("link", "addr")]
    before = host_view()
    with netns.Link() as link:
        assert host_view() == before
        for node in (0, 1):
            shown = subprocess.run(link.cmd(node, ["ip", "-br", "addr"]), capture_output=True,
                                   text=True).stdout
            assert link.addr[node] in shown and link.addr[1 - node] not in shown
        sleeper = subprocess.Popen(link.cmd(1, ["sleep", "60"]))
        deadline = time.time() + 10  # ip netns exec first enters the namespace, then execs sleep
        while sleeper.pid not in link.pids(1) and time.time() < deadline:
            time.sleep(0.05)
        assert link.pids(1) == [sleeper.pid]
    assert sleeper.wait(10) == -9  # killed before its namespace was deleted
    # SIGTERM: the namespaces go first, then the process dies of the signal.
    code = ("import subprocess, sys, time; sys.path.insert(0, 'tests'); import netns; "
            "l = netns.Link(); subprocess.Popen(l.cmd(1, ['sleep', '60'])); "
            "print(*l.ns, flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            cwd=ROOT)
    names = proc.stdout.readline().split()
    assert len(names) == 2 and set(names) <= set(netns.list_namespaces())
    proc.terminate()
    assert proc.wait(30) == -15
    assert not set(names) & set(netns.list_namespaces())
    # SIGKILL leaves no chance to clean up: the next session's sweep does.
    code = ("import os, signal, sys; sys.path.insert(0, 'tests'); import netns; "
            "l = netns.Link(); print(*l.ns, flush=True); os.kill(os.getpid(), signal.SIGKILL)")
    orphan = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=ROOT).stdout.split()
    assert len(orphan) == 2 and set(orphan) <= set(netns.list_namespaces())
    assert set(orphan) <= set(netns.sweep())
    assert not set(orphan) & set(netns.list_namespaces())
    assert host_view() == before


def test_no_root_skips_with_one_line_or_fails_under_ci(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    reason = netns.why_not()
    assert reason and "\n" not in reason and "root" in reason
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        netns.require(reason)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception):
        netns.require(reason)


def test_static_two_hosts_one_process_each(link, runs, tmp_path, tmpdir_env, token_cache):
    """--master_addr = node 0's veth address: global rank 0 alone writes, weights equal one node."""
    out = tmp_path / "out"
    args = TINY + drop_nprocs(SPLITS["2x4"]) + ["--out", out, "--max-steps", "10"]
    node0, node1 = (finish(p, 180) for p in two_hosts(link, args, token_cache, **tmpdir_env))
    ok(node0), ok(node1)
    assert "world size 2 (gloo on cpu, 1 thread(s) per process), started by torchrun" in (
        node0.stdout)
    assert "check: all 2 replicas" in node0.stdout and "plan:" not in node1.stdout
    assert sorted(os.listdir(out)) == ["ckpt.pt", "loss.png", "metrics.jsonl", "model.pt"]
    assert same_weights(runs("2x4", SPLITS["2x4"])[0], out)
    assert empty(link)


def test_static_two_hosts_two_processes_each_own_cache(link, four_processes, tmp_path, tmpdir_env,
                                                       token_cache):
    """World size 4 as 2 hosts x 2 processes, each host with its own --cache-dir (no shared data
    folder) and one shared --out: equals 4 processes on one node."""
    out, caches = tmp_path / "out", [tmp_path / "cache0", tmp_path / "cache1"]
    args = TINY + ["--batch-size", "2", "--max-steps", "6", "--out", out]
    agents = two_hosts(link, args, token_cache, nproc=2, **tmpdir_env,
                       node_args=[["--cache-dir", c] for c in caches])
    node0, node1 = (finish(p, 240) for p in agents)
    ok(node0), ok(node1)
    assert "world size 4" in node0.stdout and "plan:" not in node1.stdout
    for cache in caches:  # each host tokenized the corpus once, into its own folder
        assert [p.suffix for p in cache.iterdir()] == [".u16"]
    assert same_weights(four_processes, out)
    assert empty(link)


def test_c10d_two_hosts_advertise_local_addr(link, runs, tmp_path, tmpdir_env, token_cache):
    """c10d rendezvous at node 0's address, each host advertising its --local-addr."""
    out = tmp_path / "out"
    args = TINY + drop_nprocs(SPLITS["2x4"]) + ["--out", out, "--max-steps", "10"]
    node0, node1 = (finish(p, 180) for p in two_hosts(link, args, token_cache, rdzv="c10d",
                                                         **tmpdir_env))
    ok(node0), ok(node1)
    assert "check: all 2 replicas" in node0.stdout + node1.stdout
    assert same_weights(runs("2x4", SPLITS["2x4"])[0], out)
    assert empty(link)


def test_c10d_whole_host_lost_then_replaced(link, uninterrupted, tmp_path, tmpdir_env, token_cache):
    """Every process of host 1 killed after the first snapshot, then its torchrun started again, as
    a scheduler would: the job resumes and ends with the uninterrupted run's weights.

    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: with torch's default (the agent's store shared with the
    workers) a torchrun that joins a later round waits for MASTER_ADDR that the rank-0 agent
    publishes only in its first round, and both nodes fail after 60 s (torch 2.13)."""
    out = tmp_path / "out"
    args = [*map(str, drop_nprocs(RESUME)), "--out", str(out)]
    env = dict(tmpdir_env, TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1)
    port = free_port()

    def host(node):
        return agent(link, node, args, token_cache, port, rdzv="c10d", max_restarts=1, **env)
    agents = [host(0), host(1)]
    wait_for(out / "ckpt.pt", agents)
    assert link.kill(1) and not link.pids(1)  # the whole host: its agent and its worker
    lost = finish(agents[1], 30)
    assert lost.returncode == -9
    agents[1] = host(1)
    node0, node1 = (finish(p, 240) for p in agents)
    ok(node0), ok(node1)
    log = node0.stdout + node1.stdout
    assert "resumed from step" in log and f"done: {RESUME_STEPS} steps" in log
    assert same_weights(uninterrupted, out)
    assert empty(link)


def test_gloo_on_lo_between_hosts_says_which_interface_to_set(link, tmp_path, tmpdir_env,
                                                             token_cache):
    """GLOO_SOCKET_IFNAME=lo on both hosts: each rank advertises 127.0.0.1, which the other host
    cannot reach. Every rank ends with one line naming GLOO_SOCKET_IFNAME; Gloo's own log shows the
    loopback remote=. (The rank that only waits to be connected gives up after about 5 x
    --timeout; the one whose connects are refused, within seconds.)"""
    out = tmp_path / "out"
    args = TINY + ["--batch-size", "2", "--max-steps", "4", "--timeout", "5", "--out", out]
    agents = two_hosts(link, args, token_cache, **tmpdir_env, GLOO_SOCKET_IFNAME="lo")
    results = [finish(p, 150) for p in agents]
    stderr = [r.stderr for r in results]
    for rank, r in enumerate(results):  # node i runs global rank i
        assert r.returncode == 1 and not r.leftovers, r.stdout + r.stderr  # torchrun's code
        assert "exitcode  : 2" in r.stderr, r.stderr  # the worker's: bad set-up
        lines = error_lines(r.stderr)
        assert len(lines) == 1, r.stderr
        assert lines[0].startswith(f"error: rank {rank} of 2 could not form the process group "
                                   f"within --timeout 5s via {link.addr[0]}:"), r.stderr
        assert "set GLOO_SOCKET_IFNAME" in lines[0], r.stderr
    assert "Connection refused, remote=[127.0.0.1]:" in "".join(stderr)
    assert not any(map(own_traceback, stderr)), "\n".join(stderr)
    assert not (out / "ckpt.pt").exists()
    assert empty(link)


def test_c10d_without_local_addr_names_the_missing_rank(link, tmp_path, tmpdir_env, token_cache):
    """c10d rendezvous with no --local-addr on either host: each agent advertises its hostname,
    which in a namespace resolves to a loopback address, so host 1's worker dials its own
    localhost for the store. Rank 0 names the rank that never reached the store after --timeout;
    rank 1 says it could not form the process group via localhost."""
    out = tmp_path / "out"
    args = TINY + ["--batch-size", "2", "--max-steps", "4", "--timeout", "10", "--out", out]
    node0, node1 = (finish(p, 150) for p in two_hosts(link, args, token_cache, rdzv="c10d",
                                                         local_addr=False, **tmpdir_env))
    for r in (node0, node1):
        assert r.returncode == 1 and not r.leftovers, r.stdout + r.stderr  # torchrun's code
        assert not own_traceback(r.stderr), r.stderr
    assert "exitcode  : 2" in node0.stderr, node0.stderr  # node 0's worker: bad set-up
    assert error_lines(node0.stderr) == [
        "error: rank(s) [1] did not reach torchrun's store within --timeout 10s: check that every "
        "node runs torchrun (with the c10d rendezvous, --local-addr on every node)"], node0.stderr
    assert ("The client socket has timed out after 10000ms while trying to connect to (localhost, "
            in node1.stderr), node1.stderr
    lines = error_lines(node1.stderr)
    assert len(lines) == 1 and lines[0].startswith(
        "error: rank 1 of 2 could not form the process group within --timeout 10s via localhost:"
    ) and "--local-addr on every node" in lines[0], node1.stderr
    assert not (out / "ckpt.pt").exists()
    assert empty(link)


def test_link_cut_mid_run_ends_every_rank(link, tmp_path, tmpdir_env, token_cache):
    """The cable pulled (node 1's veth down) mid-run, --timeout 10, no restarts: every rank on
    both hosts exits within the timeout plus some seconds (finish's bound), no process is left,
    and the last snapshot loads. Each worker says in one line what was lost, with no traceback of
    its own."""
    out = tmp_path / "out"
    args = TINY + ["--batch-size", "2", "--max-steps", "2000", "--save-every", "2",
                   "--timeout", CUT_TIMEOUT, "--out", out]
    agents = two_hosts(link, args, token_cache, **tmpdir_env)
    wait_for(out / "ckpt.pt", agents)
    link.set_up(1, False)
    results = [finish(p, CUT_TIMEOUT + 50) for p in agents]  # fails the test when it expires
    for r in results:
        assert r.returncode == 1 and not r.leftovers, r.stdout + r.stderr  # torchrun's code
    assert empty(link)
    ckpt = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)
    assert ckpt["step"] >= 2 and all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert not (out / "model.pt").exists()

    stderr = [r.stderr for r in results]
    own = [s for s in stderr if own_traceback(s)]
    assert not own, "\n".join(stderr)  # torchrun's agent prints its own summary, the script none
    for rank, s in enumerate(stderr):  # node i runs global rank i
        assert "exitcode  : 1" in s, s  # the worker's: a rank lost
        lines = [l for l in s.splitlines() if l.startswith("error:")]
        assert len(lines) == 1 and lines[0].startswith(f"error: rank {rank} lost contact"), s
