"""preflight.py, the check before a long job: on loopback with 1, 2 and 3 ranks (mp.spawn and
torchrun), across two network namespaces joined by a tbf-limited veth, and the ways it fails: a
rank that never starts, a rank taken twice, different torch versions, a wrong sum, loopback
between hosts, a bus bandwidth under --min-busbw, bad flags. The speed is asserted only against
the tbf link's rate, which the check cannot exceed."""
import re
import socket
import sys
import time

import pytest
import torch

import netns
from conftest import FAULTS, TORCHRUN, finish, free_port, no_gpu, ok, one_error, run, script_env, start

SCRIPT = "preflight.py"
FAST = ["--device", "cpu", "--model", "gpt-nano"]  # its gradient: 2,503,392 fp32, 9.55 MiB
HOST = socket.gethostname()


def by_hand(ranks, world, args, cache, link=None, **env):
    """Processes started as a launcher starts them (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
    MASTER_PORT in their environment), only those of `ranks`; with a link, rank r in namespace r
    on its veth (GLOO_SOCKET_IFNAME unless env says otherwise), MASTER_ADDR namespace 0's address."""
    port, procs = free_port(), []
    for r in ranks:
        where = ({"MASTER_ADDR": link.addr[0], "GLOO_SOCKET_IFNAME": link.ifname[r]} if link
                 else {})
        e = script_env(cache, RANK=r, WORLD_SIZE=world, LOCAL_RANK=0 if link else r,
                       LOCAL_WORLD_SIZE=1 if link else world, MASTER_PORT=port,
                       **{**where, **env})
        cmd = [sys.executable, SCRIPT, *map(str, args)]
        procs.append(start(link.cmd(r, cmd) if link else cmd, e))
    return procs


def without_c10d_name_warning(result):
    """The result without c10d's warning that a peer's address has no host name (in the
    namespaces, which have no DNS: "[W... socket.cpp:...] [c10d] The hostname of the client
    socket cannot be retrieved"), which c10d prints itself, on stderr."""
    result.stderr = "".join(line for line in result.stderr.splitlines(keepends=True)
                            if not re.match(r"\[W\d+ [0-9:.]+ socket\.cpp:\d+\] \[c10d\] The "
                                            r"hostname of the client socket cannot be retrieved", line))
    return result


def rank_lines(stdout):
    return [line for line in stdout.splitlines() if re.match(r"rank \d+: host ", line)]


def busbw(stdout):
    """The verdict's bus bandwidth, bytes/s."""
    return float(re.search(r"^verdict: ok: .* bus bandwidth ([0-9.e+-]+) GB/s", stdout, re.M)[1]) * 1e9


def check_passed(result, world, sizes="4 KiB to 9.55 MiB", places=None, launcher="mp.spawn"):
    """Exit 0, and the report with the values that a broken check gets wrong: each rank's line in
    rank order, each rank's own sums (1 + 2 + ... + world, and so on), the gathered ranks' order."""
    ok(result)
    out = result.stdout
    assert not result.stderr.strip(), result.stderr
    assert out.startswith(f"preflight: {world} rank(s), gloo on cpu, started by {launcher}; "), out
    places = places or [("127.0.0.1", "lo")] * world
    assert rank_lines(out) == [
        f"rank {r}: host {HOST}, {addr} ({iface}, GLOO_SOCKET_IFNAME), cpu, gloo, "
        f"torch {torch.__version__}" for r, (addr, iface) in enumerate(places)], out
    total = world * (world + 1) // 2
    every = lambda v: "[" + ", ".join([str(v)] * world) + "]"  # noqa: E731
    assert (f"all_reduce, sum of rank + 1 (fp32, {sizes}): {every(total)}, expected {total}: ok"
            in out), out
    int64 = total * 2**33 + world * (world - 1) // 2
    assert f"(int64): {every(int64)}, expected {int64}: ok" in out, out
    sent = (world - 1 + 7) * sum(range(1024))  # the last rank's arange(1024) x (rank + 7)
    assert f"broadcast from rank {world - 1} (int64, its sum): {every(sent)}, expected {sent}: ok" in out
    order = list(range(world))
    assert f"whose tensor in each place): {every(order)}, expected {order} on every rank: ok" in out
    assert re.search(r"^gpt-nano: a forward and backward of 2 x 128 tokens \(--amp (off|bf16)\) "
                     r"takes [0-9.]+ [mu]?s on the slowest rank", out, re.M), out
    assert re.search(rf"^verdict: ok: {world} rank\(s\) on \d host\(s\) met; all_reduce, "
                     rf"broadcast and all_gather are exact", out, re.M), out
    return out


@pytest.mark.parametrize("world, launch", [(1, "spawn"), (2, "spawn"), (3, "torchrun")])
def test_loopback(world, launch, tmp_path, token_cache):
    if launch == "spawn":
        result = run(FAST + ["--nprocs", world], token_cache, timeout=120, script=SCRIPT)
    else:
        result = run(FAST, token_cache, timeout=120, script=SCRIPT, TMPDIR=tmp_path,
                     launcher=TORCHRUN + ["--standalone", f"--nproc_per_node={world}"])
    out = check_passed(result, world, launcher="mp.spawn" if launch == "spawn" else "torchrun")
    if world == 1:
        assert "; one rank: no link to measure" in out and "point to point" not in out
        return
    pairs = re.search(r"^point to point \(9.55 MiB, .*\): (.*); latency", out, re.M)[1]
    assert [p.split()[0] for p in pairs.split(", ")] == [f"{r}->{(r + 1) % world}" for r in range(world)]
    rows = re.findall(r"^ +([0-9.]+ [KM]iB) +[0-9.]+ [mu]?s +([0-9.e+-]+) +[0-9.]+ [mu]?s +[0-9.e+-]+$",
                      out, re.M)
    assert [size for size, _ in rows] == ["4 KiB", "64 KiB", "1 MiB", "9.55 MiB"], out
    assert float(rows[-1][1]) * 1e9 == pytest.approx(busbw(out), rel=0.01)
    assert re.search(r"^gpt-nano: its gradient \(2,503,392 fp32 values, 9.55 MiB\) all-reduces in",
                     out, re.M), out


def test_tbf_link_between_two_namespaces(tmp_path, token_cache):
    """Two hosts joined by a veth pair limited to RATE bits/s each way: the bus bandwidth (and
    each point-to-point rate) is below the link's rate and above a tenth of it."""
    netns.require(netns.why_not(shaping=True))
    rate = 200e6
    with netns.Link() as link:
        link.shape(rate)
        procs = by_hand([0, 1], 2, FAST + ["--sizes", "64K", "1M", "4M"], token_cache, link)
        node0, node1 = (without_c10d_name_warning(finish(p, 120)) for p in procs)
    ok(node1)
    assert not node1.stdout.strip() and not node1.stderr.strip()
    out = check_passed(node0, 2, sizes="64 KiB to 4 MiB", launcher="hand (RANK and WORLD_SIZE set)",
                       places=list(zip(link.addr, link.ifname)))
    assert "verdict: ok: 2 rank(s) on 2 host(s) met" in out, out
    measured = busbw(out) * 8
    assert rate / 10 < measured < rate, out
    for pair in re.findall(r"\d->\d ([0-9.e+-]+) GB/s", out):
        assert rate / 10 < float(pair) * 8e9 < rate, out


def test_loopback_between_two_hosts_is_named_at_once(tmp_path, token_cache):
    """GLOO_SOCKET_IFNAME=lo on two hosts: one line that names the interface to set, before Gloo
    tries to connect (which would fail only after a multiple of --timeout)."""
    netns.require(netns.why_not())
    with netns.Link() as link:
        started = time.monotonic()
        procs = by_hand([0, 1], 2, FAST, token_cache, link, GLOO_SOCKET_IFNAME="lo")
        node0, node1 = (without_c10d_name_warning(finish(p, 120)) for p in procs)
        took = time.monotonic() - started
    line = one_error(node0, "rank(s) 0-1 talk from a loopback address (127.0.0.1, lo) but the "
                            "ranks are on 2 hosts", 1)
    assert "set GLOO_SOCKET_IFNAME" in line
    assert node1.returncode == 1 and not node1.stderr.strip() and not node1.leftovers
    assert took < 30  # the default --timeout: nothing waited for it


def test_rank_that_never_starts_is_named(token_cache):
    """Ranks 0 and 1 of a world of 3 started, rank 2 never: rank 0 names it and the ranks that came
    (with their host) in one line after --timeout, and both end with exit code 1."""
    timeout = 5
    started = time.monotonic()
    procs = by_hand([0, 1], 3, FAST + ["--timeout", timeout], token_cache)
    rank0, rank1 = (finish(p, 60) for p in procs)
    took = time.monotonic() - started
    line = one_error(rank0, f"rank(s) 2 of 3 did not arrive within --timeout {timeout}s (arrived: "
                            f"0-1 from {HOST} (127.0.0.1)): start every process or node", 1)
    assert "MASTER_ADDR 127.0.0.1" in line and "firewall" in line
    assert [l.split(":")[0] for l in rank_lines(rank0.stdout)] == ["rank 0", "rank 1"]
    assert rank1.returncode == 1 and not rank1.stderr.strip() and not rank1.leftovers
    assert timeout <= took < timeout + 30  # it waited --timeout, then did not hang


def test_rank_taken_twice_is_named_at_once(token_cache):
    """Ranks 0, 1 and 1 of a world of 3 (the local rank passed as the global one): one line."""
    procs = by_hand([0, 1, 1], 3, FAST + ["--timeout", 60], token_cache)
    results = [finish(p, 50) for p in procs]  # well before --timeout
    one_error(results[0], f"rank 1 was taken by 2 processes ({HOST} (127.0.0.1), {HOST} "
                          f"(127.0.0.1)), and rank(s) 2 never came", 1)
    assert "was the local rank passed as the global rank?" in results[0].stderr
    for r in results[1:]:
        assert r.returncode == 1 and not r.stderr.strip() and not r.leftovers


def test_different_torch_versions(token_cache):
    procs = by_hand([0, 1], 2, FAST, token_cache, PYTHONPATH=FAULTS,
                    GPT_DDP_FAULT="torch-version:1:2.13.0")
    rank0, rank1 = (finish(p, 60) for p in procs)
    one_error(rank0, f"the ranks run different torch versions ({torch.__version__} on 0 ({HOST}), "
                     f"2.13.0 on 1 ({HOST})): install the same torch build on every node", 1)
    assert rank_lines(rank0.stdout)[1].endswith(", gloo, torch 2.13.0"), rank0.stdout
    assert "all_reduce" not in rank0.stdout  # stopped before the process group
    assert rank1.returncode == 1 and not rank1.stderr.strip()


def test_wrong_sum_fails(token_cache):
    """Rank 1's all-reduce results off by one in their last element: the check says which rank.
    (Ranks started by hand, here and below: one interpreter fewer than under mp.spawn.)"""
    procs = by_hand([0, 1], 2, FAST, token_cache, PYTHONPATH=FAULTS, GPT_DDP_FAULT="bad-sum:1")
    rank0, rank1 = (finish(p, 120) for p in procs)
    one_error(rank0, "all_reduce gave wrong results (WRONG on rank(s) 1)", 1)
    assert "(fp32, 4 KiB to 9.55 MiB): 3 to 4, expected 3: WRONG on rank(s) 1" in rank0.stdout
    assert "broadcast from rank 1 (int64, its sum): [4190208, 4190208]" in rank0.stdout
    assert "verdict" not in rank0.stdout and "point to point" not in rank0.stdout
    assert rank1.returncode == 1 and not rank1.stderr.strip() and not rank1.leftovers


def test_min_busbw(token_cache):
    procs = by_hand([0, 1], 2, FAST + ["--sizes", "4K", "--min-busbw", "1000"], token_cache)
    rank0, rank1 = (finish(p, 120) for p in procs)
    one_error(rank0, "GB/s at 4 KiB, is below --min-busbw 1000 GB/s", 1)
    assert re.search(r"^ +4 KiB .*$", rank0.stdout, re.M) and "verdict" not in rank0.stdout
    assert rank1.returncode == 1 and not rank1.stderr.strip() and not rank1.leftovers


@pytest.mark.parametrize("args, env, needle", [
    (["--sizes", "4X"], {}, "argument --sizes: '4X' is not a size"),
    (["--nprocs", "0"], {}, "--nprocs must be at least 1, not 0"),
    (["--nprocs", "2"], {"RANK": 0, "WORLD_SIZE": 2, "MASTER_PORT": 29500},
     "--nprocs is for `python preflight.py`"),
    pytest.param(["--device", "cuda"], {}, "PyTorch sees no CUDA GPU", marks=no_gpu),
])
def test_bad_flags(args, env, needle, token_cache):
    """One line, exit code 2, nothing started."""
    result = run(args, token_cache, timeout=60, script=SCRIPT, **env)
    one_error(result, needle, 2)
    assert not result.stdout
