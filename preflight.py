"""Check a cluster before a long job: every rank meets, collectives are exact, the link is timed.

    python preflight.py                        # one machine: spawns one rank per GPU (2 on the CPU)
    python preflight.py --nprocs 4 --model gpt2-small
    torchrun --standalone --nproc_per_node=4 preflight.py
    torchrun --nproc_per_node=4 --nnodes=2 --node_rank=0 --master_addr=HOST --master_port=29500 \\
        preflight.py                           # and --node_rank=1 on the second machine

Start it with the launcher line of the training job, preflight.py in place of the script. Rank 0
prints one line per rank (host, the address and interface it talks from, device, backend,
versions); whether all_reduce, broadcast and all_gather give exact results on every rank; the
all-reduce's time and bus bandwidth at a few sizes beside what the ring model predicts from the
measured point-to-point rate; what that means for a training step of --model; and a verdict.

A rank that does not arrive within --timeout is named, with the ranks that did. (Under torchrun a
missing node stalls torchrun's own rendezvous before any rank starts: see docs/preflight.md.)
Exit codes: 0 every check passed; 1 a check failed (a rank that never came, versions that differ,
a wrong result, a collective that failed, a bus bandwidth under --min-busbw); 2 bad flags.
"""
import argparse
import datetime
import json
import os
import re
import signal
import socket
import struct
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ddp_support.plan import BOOK_RECIPE, DEFAULT_MODEL, RECIPES, auto_autocast
from ddp_support.process import (INTERFACE_FIX, ArgumentParser, HelpFormatter, UsageError,
                                 choose_backend, choose_device, collective_error,
                                 ignore_stop_signals, launched_by_launcher, master_port,
                                 setup_errors, supervise, tune_process, usage_errors)
from ddp_support.workarounds import abort_process_group, exit_now, restart_safe_store
from gpt_model import GPT_CONFIGS, GPTModel

DEFAULT_SIZES = [4 * 2**10, 64 * 2**10, 2**20, 16 * 2**20]  # bytes; then the model's gradient
SECONDS_PER_SIZE = 0.5  # the timed all-reduces of one size take about this long (2 to 20 of them)
P2P_BYTES = 16 * 2**20  # at most, for the point-to-point rate
P2P_REPS, PINGS = 3, 5


class CheckFailed(Exception):
    """A check failed: one `error:` line from the rank that found it, exit code 1."""


class Stopped(Exception):
    """Rank 0 stopped the check and said why: this rank exits with code 1 and says nothing."""


def parse_size(text):
    """'4K', '64KiB', '16M', '1G' or a number of bytes (K, M, G: powers of 1024)."""
    m = re.fullmatch(r"(\d+(?:\.\d*)?)([KMG]?)(I?B)?", text.strip().upper())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (4K, 16M, 1G or bytes)")
    nbytes = int(float(m[1]) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m[2]]) // 4 * 4
    if nbytes < 4:
        raise argparse.ArgumentTypeError(f"{text!r} is less than one fp32 (4 bytes)")
    return nbytes


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--nprocs", type=int, default=None,
                   help="processes to spawn without a launcher (default: one per visible GPU, "
                        "or 2 on the CPU)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="auto: CUDA when PyTorch sees a GPU, else the CPU")
    p.add_argument("--backend", choices=["auto", "nccl", "gloo"], default="auto",
                   help="auto: NCCL for CUDA GPUs on Linux, else Gloo")
    p.add_argument("--timeout", type=float, default=30,
                   help="seconds to wait for every rank to arrive, and for each collective")
    p.add_argument("--model", choices=list(GPT_CONFIGS), default=None,
                   help=f"the preset whose gradient is the largest all-reduce and whose step is "
                        f"timed (default: {DEFAULT_MODEL['cuda']} on GPUs, {DEFAULT_MODEL['cpu']} "
                        f"on the CPU, as the scripts train)")
    p.add_argument("--batch-size", type=int, default=2,
                   help="sequences per micro-batch of the timed step (the scripts' default)")
    p.add_argument("--sizes", nargs="+", type=parse_size, default=None, metavar="SIZE",
                   help="all-reduce sizes, as 4K 16M 1G (default: 4K 64K 1M 16M, those below "
                        "the model's gradient, and the gradient's own size)")
    p.add_argument("--min-busbw", type=float, default=0.0, metavar="GB/s",
                   help="fail when the bus bandwidth at the largest size is below this "
                        "(default 0: report only)")
    return p.parse_args(argv)


def check_flags(args):
    """Bad flags, or a launch that cannot work: UsageError, before any rank starts. Fills in
    what the flags leave open: args.device_type, args.backend, args.world_size, args.model."""
    if args.timeout <= 0 or args.batch_size < 1 or args.min_busbw < 0:
        raise UsageError("--timeout must be positive, --batch-size at least 1, --min-busbw >= 0")
    args.device_type = choose_device(args.device)
    args.backend = choose_backend(args.backend, args.device_type)
    n_gpus = torch.cuda.device_count() if args.device_type == "cuda" else 0
    if launched_by_launcher():
        if args.nprocs is not None:
            raise UsageError("--nprocs is for `python preflight.py`; under a launcher its own "
                             "flags (torchrun's --nproc_per_node) start the processes")
        unset = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
        if unset:
            raise UsageError(f"RANK and WORLD_SIZE are set but {' and '.join(unset)} not: set "
                             f"them too (torchrun sets all four)")
        args.world_size = int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if args.device_type == "cuda" and local_rank >= n_gpus:
            raise UsageError(f"LOCAL_RANK {local_rank} but only {n_gpus} GPU(s) visible: use "
                             f"--nproc_per_node={n_gpus}")
    else:
        args.world_size = args.nprocs if args.nprocs is not None else (
            n_gpus if args.device_type == "cuda" else 2)
        if args.world_size < 1:
            raise UsageError(f"--nprocs must be at least 1, not {args.world_size}")
        if args.device_type == "cuda" and args.world_size > n_gpus:
            raise UsageError(f"--nprocs {args.world_size} but only {n_gpus} GPU(s) visible: use "
                             f"--nprocs {n_gpus} (one process per GPU)")
    args.model = args.model or DEFAULT_MODEL[args.device_type]


def model_config(preset, device_type):
    config = dict(GPT_CONFIGS[preset])
    if device_type == "cuda":
        config["pad_vocab_multiple"] = 64  # as the scripts build it on GPUs: 50304 rows
    return config


# ---------------------------------------------------------------------------------------------
# Who each rank is, and where it talks from

def interface_address(name):
    """The IPv4 address of network interface `name` (Linux's SIOCGIFADDR), or None."""
    try:
        import fcntl
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))
        return socket.inet_ntoa(packed[20:24])
    except (ImportError, OSError):
        return None


def interface_of(addr):
    try:
        return next(name for _, name in socket.if_nameindex() if interface_address(name) == addr)
    except (OSError, StopIteration):
        return "?"


def talks_from(backend):
    """(address, interface, what chose it) for this rank's backend."""
    if backend == "gloo":
        ifname = os.environ.get("GLOO_SOCKET_IFNAME", "").split(",")[0]
        if ifname:
            return interface_address(ifname) or "no IPv4 address", ifname, "GLOO_SOCKET_IFNAME"
        # Without it, Gloo binds the address the host name resolves to (so 127.0.1.1 where
        # /etc/hosts maps the name to loopback: other hosts cannot reach it).
        try:
            addr = socket.gethostbyname(socket.gethostname())
        except OSError:
            addr = "127.0.0.1"
        return addr, interface_of(addr), "host name"
    # NCCL chooses its own interface (NCCL_SOCKET_IFNAME, else InfiniBand, else the first that
    # is up; NCCL_DEBUG=INFO names it): show the way to the store, which it also bootstraps by.
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])))  # sends nothing
            addr = s.getsockname()[0]
    except OSError:
        addr = "?"
    return addr, interface_of(addr), "route to MASTER_ADDR"


def network_stack():
    """Which machine and network namespace this process is in: ranks that share one reach each
    other on loopback, ranks that do not cannot."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f"{f.read().strip()}/{os.stat('/proc/self/ns/net').st_ino}"
    except OSError:
        return socket.gethostname()


def who_am_i(rank, device, backend):
    addr, iface, chosen_by = talks_from(backend)
    name = f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "cpu"
    nccl = ".".join(map(str, torch.cuda.nccl.version())) if backend == "nccl" else None
    return {"rank": rank, "host": socket.gethostname(), "stack": network_stack(), "addr": addr,
            "iface": iface, "chosen_by": chosen_by, "device": name, "backend": backend,
            "torch": str(torch.__version__), "nccl": nccl}


def rank_line(post):
    versions = f"torch {post['torch']}" + (f", NCCL {post['nccl']}" if post["nccl"] else "")
    return (f"rank {post['rank']}: host {post['host']}, {post['addr']} ({post['iface']}, "
            f"{post['chosen_by']}), {post['device']}, {post['backend']}, {versions}")


def ranks_text(ranks):
    """[0, 1, 2, 5] -> '0-2, 5'."""
    ranks, parts = sorted(ranks), []
    for r in ranks:
        if parts and r == parts[-1][1] + 1:
            parts[-1][1] = r
        else:
            parts.append([r, r])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in parts)


def by_host(posts):
    """'0-3 from node1 (10.0.0.1); 4-7 from node2 (10.0.0.2)'."""
    hosts = {}
    for p in posts:
        hosts.setdefault((p["host"], p["addr"]), []).append(p["rank"])
    return "; ".join(f"{ranks_text(rs)} from {host} ({addr})" for (host, addr), rs in hosts.items())


# ---------------------------------------------------------------------------------------------
# Meeting: through the store, before the process group, so that rank 0 can say who is missing

def open_store(rank, world_size, timeout):
    """Under torchrun, its agent's store (under keys of this start of the workers); elsewhere
    rank 0 hosts a store at MASTER_ADDR:MASTER_PORT and the others connect to it."""
    store = restart_safe_store(rank, world_size, timeout, CheckFailed)
    if store is None:
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                              is_master=rank == 0, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=timeout))
    return store


def meet(store, me, args):
    """Every rank posts who it is; rank 0 waits up to --timeout for all of them, prints one line
    per rank, checks that they can work together, and tells the others to go on or to stop.
    Returns the ranks' posts."""
    rank, world_size = me["rank"], args.world_size
    claim = store.add(f"claims/{rank}", 1)  # 2 or more: two processes were given this rank
    store.set(f"post/{rank}/{claim}", json.dumps(me))
    store.add("arrived", 1)
    if rank != 0:
        try:
            store.wait(["verdict"], datetime.timedelta(seconds=args.timeout + 60))
        except dist.DistStoreError:
            raise CheckFailed(f"rank {rank} waited {args.timeout + 60:g}s for rank 0's word: "
                              f"rank 0 hangs or died; see its own output") from None
        verdict = store.get("verdict")
        store.add("left", 1)
        if verdict != b"go":
            raise Stopped()
        return None
    print(f"preflight: {world_size} rank(s), {args.backend} on {args.device_type}, started by "
          f"{launcher()}; waiting up to {args.timeout:g}s for every rank at "
          f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}", flush=True)
    deadline = time.monotonic() + args.timeout
    while store.add("arrived", 0) < world_size and time.monotonic() < deadline:
        time.sleep(0.05)
    claims = [store.add(f"claims/{r}", 0) for r in range(world_size)]
    posts = [[json.loads(store.get(f"post/{r}/{c}")) for c in range(1, n + 1)]
             for r, n in enumerate(claims)]
    arrived = [p for ps in posts for p in ps]
    for post in arrived:
        print(rank_line(post), flush=True)
    problem = (missing_or_twice(posts, args) or different_versions(arrived)
               or loopback_between_hosts(arrived))
    if problem:  # said before the others may exit: mp.spawn then stops this process too
        print(f"error: {problem}", file=sys.stderr, flush=True)
    store.set("verdict", "stop" if problem else "go")
    if problem:
        deadline = time.monotonic() + 5  # the store lives in this process: let them read it
        while store.add("left", 0) < len(arrived) - 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        raise Stopped()
    return arrived


def launcher():
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        return "torchrun"
    return "hand (RANK and WORLD_SIZE set)" if launched_by_launcher() else "mp.spawn"


def missing_or_twice(posts, args):
    twice = [r for r, ps in enumerate(posts) if len(ps) > 1]
    missing = [r for r, ps in enumerate(posts) if not ps]
    if twice:
        r = twice[0]
        absent = f", and rank(s) {ranks_text(missing)} never came" if missing else ""
        places = ", ".join(f"{p['host']} ({p['addr']})" for p in posts[r])
        return (f"rank {r} was taken by {len(posts[r])} processes ({places}){absent}: "
                f"every process needs a RANK of its own (node_rank x nproc_per_node + local "
                f"rank); was the local rank passed as the global rank?")
    if missing:
        addr, port = os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]
        return (f"rank(s) {ranks_text(missing)} of {args.world_size} did not arrive within "
                f"--timeout {args.timeout:g}s (arrived: {by_host([ps[0] for ps in posts if ps])})"
                f": start every process or node; if they run, check that MASTER_ADDR {addr} "
                f"reaches this host from theirs, that no firewall blocks port {port}, and that "
                f"WORLD_SIZE counts the processes of the job")
    return None


def different_versions(posts):
    for key, name in (("torch", "torch"), ("nccl", "NCCL")):
        found = {}
        for p in posts:
            found.setdefault(p[key], []).append(p)
        if len(found) > 1:
            listed = ", ".join(f"{v} on {ranks_text(p['rank'] for p in ps)} "
                               f"({', '.join(sorted({p['host'] for p in ps}))})"
                               for v, ps in found.items())
            return (f"the ranks run different {name} versions ({listed}): install the same "
                    f"torch build on every node")
    return None


def loopback_between_hosts(posts):
    hosts = {p["stack"] for p in posts}
    looped = [p for p in posts if p["backend"] == "gloo" and
              (p["addr"].startswith("127.") or p["addr"] == "::1")]
    if len(hosts) > 1 and looped:
        return (f"rank(s) {ranks_text(p['rank'] for p in looped)} talk from a loopback address "
                f"({looped[0]['addr']}, {looped[0]['iface']}) but the ranks are on {len(hosts)} "
                f"hosts, which cannot reach each other there: {INTERFACE_FIX}")
    return None


# ---------------------------------------------------------------------------------------------
# Exact results: integers, so that every rank can check the sum it got

def exact_results(rank, world_size, device, sizes):
    """What this rank got from each collective, to compare with the expected values."""
    got = {}
    for nbytes in sizes:  # fp32, as DDP all-reduces gradients: rank r adds (r + 1) x 1..7
        # (exact while world_size (world_size + 1) / 2 x 7 < 2^24, fp32's integers: 2,000 ranks)
        pattern = torch.arange(nbytes // 4, dtype=torch.int32, device=device).remainder_(7)
        pattern = pattern.add_(1).float()
        x = pattern * (rank + 1)
        dist.all_reduce(x)  # every rank: the sum over all ranks
        x.div_(pattern)  # exact: world_size (world_size + 1) / 2 in every element, if the sum was
        got[f"fp32 {nbytes}"] = (x.min().item(), x.max().item())
    del pattern, x
    big = torch.full((1024,), (rank + 1) * 2**33 + rank, dtype=torch.int64, device=device)
    dist.all_reduce(big)  # int64 beyond 32 bits: a sum through a narrower type would show
    got["int64"] = (big.min().item(), big.max().item())
    src = world_size - 1  # not rank 0: a broadcast that ignores src would show
    sent = torch.arange(1024, dtype=torch.int64, device=device) * (src + 7)
    x = sent.clone() if rank == src else torch.full_like(sent, -1)
    dist.broadcast(x, src=src)  # every rank: src's tensor
    got["broadcast"] = x.sum().item() if torch.equal(x, sent) else None
    ramp = torch.arange(256, dtype=torch.int64, device=device)
    parts = [torch.empty_like(ramp) for _ in range(world_size)]
    dist.all_gather(parts, ramp + 1000 * rank)  # every rank: each rank's tensor, in rank order
    got["all_gather"] = [int(p[0]) // 1000 if torch.equal(p - p[0], ramp) else None for p in parts]
    return got


def judge(got, world_size, sizes):
    """Lines for rank 0, and the problems (the same on every rank: `got` is everybody's)."""
    total = world_size * (world_size + 1) // 2
    wanted = {f"fp32 {n}": (total, total) for n in sizes}
    wanted["int64"] = (total * 2**33 + world_size * (world_size - 1) // 2,) * 2
    wanted["broadcast"] = (world_size + 6) * 1023 * 1024 // 2
    wanted["all_gather"] = list(range(world_size))
    wrong = {key: [r for r in range(world_size) if got[r][key] != want] for key, want in wanted.items()}

    def seen(key):  # what each rank got, where the world is small enough to list it
        values = [got[r][key] for r in range(world_size)]
        values = [span(v) if isinstance(v, tuple) else v for v in values]
        if world_size <= 8:
            return f"[{', '.join(map(str, values))}]"
        return f"{values[0]} on all {world_size} ranks" if not wrong[key] else "differ"

    def verdict(keys):
        bad = sorted({r for k in keys for r in wrong[k]})
        return "ok" if not bad else f"WRONG on rank(s) {ranks_text(bad)}"
    fp32 = [f"fp32 {n}" for n in sizes]
    values = sorted({got[r][k] for r in range(world_size) for k in fp32})
    fp32_seen = (seen(fp32[0]) if len(values) == 1 else
                 span((min(v[0] for v in values), max(v[1] for v in values))))
    lines = [
        f"all_reduce, sum of rank + 1 (fp32, {human_size(sizes[0])} to {human_size(sizes[-1])}): "
        f"{fp32_seen}, expected {total}: {verdict(fp32)}",
        f"all_reduce, sum of (rank + 1) x 2^33 + rank (int64): {seen('int64')}, expected "
        f"{wanted['int64'][0]}: {verdict(['int64'])}",
        f"broadcast from rank {world_size - 1} (int64, its sum): {seen('broadcast')}, expected "
        f"{wanted['broadcast']}: {verdict(['broadcast'])}",
        f"all_gather (int64, whose tensor in each place): {seen('all_gather')}, expected "
        f"{wanted['all_gather']} on every rank: {verdict(['all_gather'])}",
    ]
    problems = []
    for what, keys in (("all_reduce", fp32 + ["int64"]), ("broadcast", ["broadcast"]),
                       ("all_gather", ["all_gather"])):
        if any(wrong[k] for k in keys):
            problems.append(f"{what} gave wrong results ({verdict(keys)}): the network or the "
                            f"{got[0]['backend']} build corrupts data; do not train on these ranks")
    return lines, problems


# ---------------------------------------------------------------------------------------------
# Speed: point to point, all-reduce, a step of the model

def clock(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the GPU's work so far is done
    return time.perf_counter()


def send_then_ack(rank, src, dst, tensor, times, ack, device):
    """src sends `tensor` to dst `times` times, dst answers once with `ack`: the seconds it took."""
    t0 = clock(device)
    if rank == src:
        for _ in range(times):
            dist.send(tensor, dst)  # this pair only
        dist.recv(ack, dst)
    else:
        for _ in range(times):
            dist.recv(tensor, src)
        dist.send(ack, src)
    return clock(device) - t0


def point_to_point(rank, world_size, device, nbytes):
    """Each pair of ring neighbours in turn (rank i sends to i + 1, the last to 0), as the sender
    sees it: the one-way latency of a small message, the rate of a large one (bytes/s). Returns
    {"i->j": (latency, rate)} for the pairs this rank sent on."""
    ack, data = torch.zeros(1, device=device), torch.zeros(nbytes // 4, device=device)
    found = {}
    for src in range(world_size):
        dst = (src + 1) % world_size
        if rank not in (src, dst):
            continue
        send_then_ack(rank, src, dst, ack, 1, ack, device)  # both are here, connected
        latency = min(send_then_ack(rank, src, dst, ack, 1, ack, device)
                      for _ in range(PINGS)) / 2  # half the quickest round trip
        send_then_ack(rank, src, dst, data, 1, ack, device)  # warm-up
        seconds = send_then_ack(rank, src, dst, data, P2P_REPS, ack, device)
        if rank == src:  # less the first byte's way there and the answer's way back
            found[f"{src}->{dst}"] = (latency, P2P_REPS * nbytes / max(seconds - 2 * latency, 1e-9))
    return found


def ring_seconds(nbytes, world_size, latency, rate):
    """The ring all-reduce: 2 (n - 1) steps, in each of which every rank sends 1/n of the buffer
    to the next one; so 2 (n - 1)/n of the buffer crosses each link."""
    return 2 * (world_size - 1) * (latency + nbytes / world_size / rate)


def bus_bandwidth(nbytes, seconds, world_size):
    """nccl-tests' busbw: algbw (size / time) x 2 (n - 1)/n, comparable with a link's rate."""
    return nbytes / seconds * 2 * (world_size - 1) / world_size


def all_reduce_seconds(nbytes, device):
    """The mean time of one all-reduce of nbytes of fp32, as the slowest rank saw it."""
    x = torch.zeros(nbytes // 4, device=device)  # zeros: repeated sums stay finite
    t0 = clock(device)
    dist.all_reduce(x)  # a warm-up, whose time sets the number of repetitions
    warm = torch.tensor([clock(device) - t0], dtype=torch.float64, device=device)
    dist.all_reduce(warm, op=dist.ReduceOp.MAX)  # every rank: the same number
    reps = int(min(20, max(2, SECONDS_PER_SIZE / warm.item())))
    dist.barrier()  # all start together
    t0 = clock(device)
    for _ in range(reps):
        dist.all_reduce(x)  # the timed ones
    took = torch.tensor([(clock(device) - t0) / reps], dtype=torch.float64, device=device)
    dist.all_reduce(took, op=dist.ReduceOp.MAX)  # every rank: the slowest rank's time
    return took.item()


def step_seconds(args, device):
    """A forward and backward of one micro-batch of the preset, as the scripts train it by default
    (--batch-size sequences of its recipe's context, in --amp auto's precision): the compute of a
    step without the all-reduce and the optimizer. The mean of two, after a warm-up. Returns
    (seconds, precision, context, the gradient's numel: what DDP all-reduces)."""
    config = model_config(args.model, device.type)
    context = min(config["context_length"], RECIPES.get(args.model, BOOK_RECIPE)["context_length"])
    amp = auto_autocast(device.type, [device.index])
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    with torch.device(device):
        model = GPTModel(config)
    tokens = torch.randint(config["vocab_size"], (args.batch_size, context + 1), device=device)
    times = []
    for _ in range(3):
        t0 = clock(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        loss.backward()
        times.append(clock(device) - t0)
    return sum(times[1:]) / 2, amp, context, sum(p.numel() for p in model.parameters())


def bandwidth(rank, world_size, device, sizes):
    """The point-to-point rates, then the all-reduce at each size beside the ring model's time
    for those rates. Returns the report's lines, and the bus bandwidth at the largest size,
    measured and as the ring model predicts it (bytes/s)."""
    pairs = [None] * world_size
    p2p_bytes = min(sizes[-1], P2P_BYTES)
    dist.all_gather_object(pairs, point_to_point(rank, world_size, device, p2p_bytes))
    pairs = {k: v for found in pairs for k, v in found.items()}  # every pair, from its sender
    latency, rate = max(v[0] for v in pairs.values()), min(v[1] for v in pairs.values())
    lines = [f"point to point ({human_size(p2p_bytes)}, one ring neighbour pair at a time): "
             + ", ".join(f"{k} {gbps(v[1])} GB/s" for k, v in pairs.items())
             + f"; latency up to {human_time(latency)}",
             f"all_reduce of fp32, the slowest rank's mean time; busbw = size / time x 2(n-1)/n; "
             f"ring model: 2(n-1) x (latency + size/n / {gbps(rate)} GB/s)",
             f"{'size':>10} {'time':>10} {'busbw GB/s':>11}   {'ring model':>10} {'busbw GB/s':>11}"]
    for nbytes in sizes:
        seconds = all_reduce_seconds(nbytes, device)
        model_s = ring_seconds(nbytes, world_size, latency, rate)
        busbw, ring_busbw = (bus_bandwidth(nbytes, t, world_size) for t in (seconds, model_s))
        lines.append(f"{human_size(nbytes):>10} {human_time(seconds):>10} {gbps(busbw):>11}   "
                     f"{human_time(model_s):>10} {gbps(ring_busbw):>11}")
    return lines, busbw, ring_busbw


def step_lines(args, world_size, compute, amp, context, grad_numel, busbw, largest):
    """What the measured speed means for a step of --model: the gradient's all-reduce at the
    bus bandwidth of the largest size, beside the step's compute."""
    step = (f"{args.model}: a forward and backward of {args.batch_size} x {context} tokens "
            f"(--amp {amp}) takes {human_time(compute)} on the slowest rank")
    if world_size == 1:
        return [step + "; one rank sends no gradients"]
    grad_bytes = 4 * grad_numel
    reduce_s = grad_bytes * 2 * (world_size - 1) / world_size / busbw
    return [f"{args.model}: its gradient ({grad_numel:,} fp32 values, {human_size(grad_bytes)}) "
            f"all-reduces in {human_time(reduce_s)} at the busbw measured at {human_size(largest)}",
            step + f"; without overlap the all-reduce would be {reduce_s / (reduce_s + compute):.0%}"
            f" of a step (DDP overlaps it with the backward; --grad-accum K all-reduces once per "
            f"K micro-batches)"]


def span(low_high):
    """(3.0, 3.0) -> '3'; (3.0, 4.0) -> '3 to 4'."""
    low, high = (str(int(v)) if float(v).is_integer() else f"{v:g}" for v in low_high)
    return low if low == high else f"{low} to {high}"


def human_size(nbytes):
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{nbytes} B"


def human_time(seconds):
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    return f"{seconds * 1e3:.3g} ms" if seconds < 1 else f"{seconds:.3g} s"


def gbps(rate):
    return f"{rate / 1e9:.3g}"


# ---------------------------------------------------------------------------------------------
# One rank of the check, and the launch

def main(rank, world_size, args, local_rank):
    """One rank: meet, check, measure; rank 0 reports. Returns the exit code."""
    device = torch.device("cuda", local_rank) if args.device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    tune_process(device, world_size)  # CPU threads, as the scripts run
    with setup_errors(rank, world_size, args.timeout):  # rank 0's store out of reach: one line
        store = open_store(rank, world_size, args.timeout)
    posts = meet(dist.PrefixStore("preflight", store), who_am_i(rank, device, args.backend), args)
    with setup_errors(rank, world_size, args.timeout):
        # every rank has arrived: the process group, through the same store
        dist.init_process_group(args.backend, store=dist.PrefixStore("pg", store), rank=rank,
                                world_size=world_size,
                                timeout=datetime.timedelta(seconds=args.timeout),
                                device_id=device if args.backend == "nccl" else None)
    # A step of the model first, on every rank at once as in training: it sizes the all-reduces.
    compute, amp, context, grad_numel = step_seconds(args, device)
    slowest = torch.tensor([compute], dtype=torch.float64, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)  # every rank: the slowest rank's step
    compute, grad_bytes = slowest.item(), 4 * grad_numel
    sizes = sorted(set(args.sizes or [n for n in DEFAULT_SIZES if n < grad_bytes] + [grad_bytes]))

    mine = exact_results(rank, world_size, device, sizes)
    mine["backend"] = args.backend
    got = [None] * world_size
    dist.all_gather_object(got, mine)  # every rank: what every rank got
    report, problems = judge(got, world_size, sizes)
    busbw = ring_busbw = None
    if not problems and world_size > 1:
        lines, busbw, ring_busbw = bandwidth(rank, world_size, device, sizes)
        report += lines
    if not problems:
        report += step_lines(args, world_size, compute, amp, context, grad_numel, busbw, sizes[-1])
        if busbw is not None and busbw < args.min_busbw * 1e9:
            problems.append(f"the bus bandwidth, {gbps(busbw)} GB/s at {human_size(sizes[-1])}, "
                            f"is below --min-busbw {args.min_busbw:g} GB/s: check the interface "
                            f"each rank talks from (NCCL_DEBUG=INFO shows NCCL's)")
    if rank == 0:
        print("\n".join(report), flush=True)
        if problems:
            print(f"error: {'; '.join(problems)}", file=sys.stderr, flush=True)
        else:
            hosts = len({post["stack"] for post in posts})  # (machine, network namespace)
            speed = (f"; bus bandwidth {gbps(busbw)} GB/s ({busbw * 8 / 1e9:.3g} Gbit/s) at "
                     f"{human_size(sizes[-1])}, {busbw / ring_busbw:.0%} of the ring model's"
                     if busbw is not None else "; one rank: no link to measure")
            print(f"verdict: ok: {world_size} rank(s) on {hosts} host(s) met; all_reduce, "
                  f"broadcast and all_gather are exact{speed}", flush=True)
    dist.barrier()  # nobody leaves before rank 0 has said it all
    dist.destroy_process_group()
    return 1 if problems else 0


def run(rank, world_size, args, local_rank=None):
    """What each process runs (mp.spawn's workers, a launcher's): main, its failure as one line,
    then the end of the process with its exit code."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)  # a check saves nothing: a stop ends it at once
    local_rank = rank if local_rank is None else local_rank
    try:
        code = main(rank, world_size, args, local_rank)
    except Stopped:
        code = 1
    except (CheckFailed, UsageError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        code = 1
    except (dist.DistError, RuntimeError) as e:
        line = collective_error(e, rank, world_size, args.timeout)
        if line is None:
            raise
        print(line, file=sys.stderr, flush=True)
        code = 1
    finally:
        if dist.is_initialized():  # ended by an error
            abort_process_group()
    exit_now(code)


if __name__ == "__main__":
    args = parse_args()
    with usage_errors():  # bad flags: one line, exit code 2, before any process starts
        check_flags(args)
        if not launched_by_launcher():
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")  # where rank 0's store listens
            os.environ["MASTER_PORT"] = master_port(os.environ["MASTER_ADDR"],
                                                    os.environ.get("MASTER_PORT"))
    if launched_by_launcher():  # torchrun, or RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT by hand
        run(int(os.environ["RANK"]), args.world_size, args, int(os.environ.get("LOCAL_RANK", 0)))
    else:
        ignore_stop_signals()  # until the workers set theirs: a Ctrl-C now reaches them later
        workers = mp.spawn(run, args=(args.world_size, args), nprocs=args.world_size, join=False)
        sys.exit(supervise(workers))
