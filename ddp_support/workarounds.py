"""Where the scripts work around a behaviour of torch, glibc or CPython, each in one place, with
what it is for and the versions it was seen on. When the floor in requirements.txt moves past a
bug, its workaround can go.

- `restart_safe_store`: torchrun's store keeps a dead generation's keys (pytorch/pytorch#135712);
- `exit_now`: a Gloo thread dies in Python's shutdown (pytorch/pytorch#179291, #190489);
- `abort_process_group`: after an error, a group whose peer is gone cannot be destroyed;
- `peer_lost`, `timed_out`, `out_of_step`: telling torch's errors apart by their messages' text;
- `ddp_group_for_debug`: DDP crashes under TORCH_DISTRIBUTED_DEBUG=DETAIL with Gloo;
- `keep_freed_memory`: glibc's malloc unmaps and re-zeroes every large block, every step;
- `cpu_has_bf16`: asks torch's private CPU-feature checks;
- `still_ignores`: the one way to learn whether a child has set its signal handlers yet.
"""
import ctypes
import datetime
import os
import platform
import sys
import time

import torch
import torch.distributed as dist


def restart_safe_store(rank, world_size, timeout, error):
    """Under torchrun: the agent's TCP store, under a key prefix that is new for every start of
    the workers (None elsewhere: init_process_group then reads MASTER_ADDR and MASTER_PORT).

    torchrun shares its own store with the workers (TORCHELASTIC_USE_AGENT_STORE, since torch
    2.4), and it outlives them: after a restart it still holds the process group keys of the
    workers that died, and a plain init can read those and hang (pytorch/pytorch#135712, seen
    on 2.11 to 2.14.1). TORCHELASTIC_RESTART_COUNT would make a prefix, but nodes need not agree
    on it, so rank 0 hands out a fresh generation number: each rank posts a random token, and
    rank 0 answers every token it sees until all ranks have taken this generation. `error`: the
    exception to raise when a rank never comes."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          is_master=False, timeout=datetime.timedelta(seconds=timeout))
    if rank == 0:
        generation = store.add("gpt-ddp/generation", 1)
        waiting, answered, deadline = set(range(1, world_size)), set(), time.time() + timeout
        while waiting:
            for r in sorted(waiting):
                if store.check([f"gpt-ddp/{generation}/joined/{r}"]):
                    waiting.discard(r)
                elif store.check([f"gpt-ddp/hello/{r}"]):
                    token = store.get(f"gpt-ddp/hello/{r}").decode()
                    if token not in answered:  # stale tokens of dead workers get answers too
                        store.set(f"gpt-ddp/welcome/{token}", str(generation))
                        answered.add(token)
            if waiting and time.time() > deadline:
                raise error(f"rank(s) {sorted(waiting)} did not reach torchrun's store within "
                            f"--timeout {timeout:g}s: check that every node runs torchrun "
                            f"(with the c10d rendezvous, --local-addr on every node)")
            time.sleep(0.01)
    else:
        token = os.urandom(8).hex()
        store.set(f"gpt-ddp/hello/{rank}", token)
        store.wait([f"gpt-ddp/welcome/{token}"])
        generation = int(store.get(f"gpt-ddp/welcome/{token}"))
        store.set(f"gpt-ddp/{generation}/joined/{rank}", "1")
    return dist.PrefixStore(f"gpt-ddp/{generation}/pg", store)


def exit_now(code):
    """End the process without Python's shutdown. A Gloo thread may still be freeing the tensors
    of the last collective when the main thread exits; freeing them takes the GIL, and CPython
    3.11 ends a thread that asks for the GIL during finalization with pthread_exit, which C++
    turns into std::terminate: "terminate called without an active exception", exit 1 instead
    of 0, 130 or 143 (about 1 stop in 180 on torch 2.14.1; pytorch/pytorch#179291, #190489).
    Everything the run wrote is closed by now."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def abort_process_group():
    """After an error: abort the group instead of destroying it. A peer may be gone with
    collectives still queued, which a plain destroy would wait for (with NCCL, forever).
    `_abort_process_group` is private (torch 2.3 and later); older ones only destroy."""
    getattr(dist.distributed_c10d, "_abort_process_group", dist.destroy_process_group)()


# torch raises most failures of a collective as a plain RuntimeError (or DistBackendError), so
# they are told apart by their text: Gloo's messages as seen here, NCCL's as they stand in
# libtorch_cuda.so of torch 2.11.0 and 2.14.1 (ProcessGroupNCCL and its watchdog).
LOST_PEER_SIGNS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                   "NCCL communicator was aborted", "ncclRemoteError", "ncclSystemError",
                   "remote process exiting prematurely")
TIMEOUT_SIGNS = ("Timed out waiting",  # Gloo
                 "Watchdog caught collective operation timeout", "timed out in blocking wait",
                 "NCCL timeout in")  # NCCL


def timed_out(error):
    """A collective in which nothing arrived within the process group's timeout."""
    return any(s in str(error) for s in TIMEOUT_SIGNS)


def peer_lost(error):
    """A collective that failed because another rank's process ended."""
    return isinstance(error, dist.DistNetworkError) or any(s in str(error) for s in LOST_PEER_SIGNS)


def out_of_step(error):
    """TORCH_DISTRIBUTED_DEBUG=DETAIL's checks found ranks at different collectives."""
    return any(s in str(error) for s in ("failed to pass monitoredBarrier",
                                         "Detected mismatch between collectives"))


def unreachable_interface(error):
    """Gloo could not use the network interface it was given or found (GLOO_SOCKET_IFNAME)."""
    return "Unable to find address for" in str(error) or "connectFullMesh" in str(error)


def ddp_group_for_debug(backend, timeout):
    """The process group for DDP: None (the default group), except with Gloo under
    TORCH_DISTRIBUTED_DEBUG=DETAIL. There torch wraps every group in a checker, and DDP's
    constructor casts the wrapped group to a Gloo one and crashes (SIGSEGV in
    c10d::Logger::set_env_variables; seen on torch 2.11, 2.13 and 2.14.1). So DDP gets a Gloo
    group of its own, made unwrapped. Only its broadcast at the start goes unchecked: the
    scripts' comm hook all-reduces the gradient buckets in the default group, which is checked.
    Every rank calls this (every rank enters new_group)."""
    if backend != "gloo" or dist.get_debug_level() != dist.DebugLevel.DETAIL:
        return None
    dist.set_debug_level(dist.DebugLevel.INFO)
    try:
        return dist.new_group(backend="gloo", timeout=timeout)
    finally:
        dist.set_debug_level(dist.DebugLevel.DETAIL)


def keep_freed_memory():
    """CPU on Linux: glibc's malloc hands each large freed block back to the kernel, so every step
    maps its activations afresh and the kernel zeroes about a gigabyte of pages (a third of a
    GPT-2 step). Keep freed memory in the process for reuse instead, as PyTorch's CUDA allocator
    does (glibc's defaults; no torch version changes this)."""
    if platform.libc_ver()[0] == "glibc":
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 2**31 - 1)  # M_MMAP_THRESHOLD: large blocks come from the heap, not mmap
        libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD: keep up to 2 GiB free at its top


def still_ignores(pid, signum):
    """Whether process pid ignores signum, from Linux's /proc: a spawned worker inherits "ignored"
    and sets its own handler only once it has imported torch; Python has no call that asks."""
    try:
        with open(f"/proc/{pid}/status") as f:
            mask = next(line for line in f if line.startswith("SigIgn:")).split()[1]
    except (OSError, StopIteration):
        return False
    return bool(int(mask, 16) >> (signum - 1) & 1)


def cpu_has_bf16():
    """Whether this CPU computes bf16 natively (AVX512-BF16, AMX): torch asks it only through
    private functions (torch.cpu._is_avx512_bf16_supported, ...; present in 2.11 to 2.14.1)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
