"""The life of a training process: its start (CPU threads, a free port, joining the group), stop
signals, one-line errors and exit codes, and the parent that supervises mp.spawn's workers.

Exit codes: 0 done; 2 bad input; 3 training cannot go on (diverged, a full disk, replicas that
differ); 1 another rank was lost; 128 + signal after a stop by SIGINT (130) or SIGTERM (143).
"""
import argparse
import contextlib
import datetime
import math
import os
import signal
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from data import DataError
from ddp_support import workarounds


class UsageError(Exception):
    """A mistake in the command line or its files: reported as one line, exit code 2."""


class TrainingError(Exception):
    """Training cannot go on (for example a non-finite loss): one line on every rank, exit code 3."""


STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
_received = {"signal": 0}  # set by the handler: the training loop asks `stop_signal()` each step
# Why the ranks' collectives did not meet, most often, and how to find the one that did not.
OUT_OF_STEP = ("the ranks fell out of step, at a collective that not every rank reached (one under "
               "`if rank == 0`, or a rank that left the loop early)")
SEE_WHICH = ("run with TORCH_DISTRIBUTED_DEBUG=DETAIL to have every collective's kind and shapes "
             "checked across the ranks")


def stop_signal():
    """0, or the SIGINT / SIGTERM this process received (it only raises this flag)."""
    return _received["signal"]


def _request_stop(signum, frame):
    _received["signal"] = signum


def check_finite(value, step, plan, what="gradient norm"):
    if not math.isfinite(value):
        raise TrainingError(f"the {what} is {value} at step {step}: training diverged; lower --lr "
                            f"(now {plan.peak_lr:g}) and --resume from the last checkpoint, or "
                            f"start again")


# ---------------------------------------------------------------------------------------------
# Before the workers: bad input, the port

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # show "(default: ...)" unless the help says it already
        text = action.help or ""
        return text if "default" in text else super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the whole usage text
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def launched_by_launcher():
    """torchrun and torch.distributed.launch set these for every process they start."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


@contextlib.contextmanager
def usage_errors():
    """Bad input found before training: one `error:` line (from local rank 0 alone, where a
    launcher started several processes), exit code 2."""
    try:
        yield
    except (UsageError, DataError) as e:
        if os.environ.get("LOCAL_RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C while the flags are checked or the text is tokenized
        if os.environ.get("LOCAL_RANK", "0") == "0":
            print("stopped by SIGINT before training began; nothing was saved", flush=True)
        sys.exit(128 + signal.SIGINT)


def choose_device(flag):
    """--device: "cuda" or "cpu" (auto: CUDA when PyTorch sees a GPU)."""
    cuda = torch.cuda.is_available()
    if flag == "cuda" and not cuda:
        raise UsageError("--device cuda, but PyTorch sees no CUDA GPU: use --device cpu "
                         "(or install a CUDA build of torch)")
    return {"auto": "cuda" if cuda else "cpu"}.get(flag, flag)


def choose_backend(flag, device):
    """--backend: "nccl" or "gloo" (auto: NCCL for CUDA GPUs on Linux, else Gloo)."""
    backend = flag
    if backend == "auto":
        backend = "nccl" if device == "cuda" and sys.platform == "linux" else "gloo"
    if backend == "nccl" and (device != "cuda" or not dist.is_nccl_available()):
        raise UsageError("--backend nccl needs CUDA GPUs and a Linux build of torch with NCCL: "
                         "use --backend gloo (or --device cuda on a GPU machine)")
    return backend


def master_port(addr, wanted=None):
    """A port for rank 0's store on addr: `wanted` if it is free (if it is taken, rank 0 fails and
    the rest would wait), else any free one."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        port = int(wanted or 0)
        try:
            s.bind((addr, port))
        except OSError:
            raise UsageError(f"MASTER_PORT {port} on {addr} is already in use: set MASTER_PORT to "
                             f"a free port, or unset it to let the script pick one") from None
        return str(s.getsockname()[1])


# ---------------------------------------------------------------------------------------------
# A worker: its start, its end

def tune_process(device, world_size):
    """Before the process group forms: Windows' store transport; on the CPU, threads and memory."""
    if sys.platform == "win32":
        os.environ["USE_LIBUV"] = "0"  # Windows builds of torch come without libuv
    if device.type == "cpu":
        if "OMP_NUM_THREADS" not in os.environ:  # else the user (or torchrun) chose already
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(
                os.environ.get("LOCAL_WORLD_SIZE", world_size))))
        workarounds.keep_freed_memory()


INTERFACE_FIX = ("set GLOO_SOCKET_IFNAME (NCCL_SOCKET_IFNAME on GPUs) on every node to the "
                 "interface that reaches the others (ip route get MASTER_ADDR shows it)")


@contextlib.contextmanager
def setup_errors(rank, world_size, timeout):
    """A process (or a node) that never came, a wrong address or network interface: one line,
    not a traceback. (Gloo reports its connection failures as plain RuntimeErrors.) A stop signal
    waits until the group is formed: arriving mid-connect, it makes the store client retry with a
    warning and a C++ stack dump; the training loop sees it after the first step."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    except (dist.DistError, RuntimeError) as e:
        text = str(e)
        if workarounds.unreachable_interface(e):
            fix = INTERFACE_FIX
        else:
            fix = ("start every process or node, or check MASTER_ADDR, MASTER_PORT and firewalls "
                   "(under torchrun's c10d rendezvous, --local-addr on every node)")
        raise UsageError(
            f"rank {rank} of {world_size} could not form the process group within --timeout "
            f"{timeout:g}s via {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} "
            f"({text.splitlines()[0] if text else type(e).__name__}): {fix}") from None
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


COMPILE_WAIT_S = 3600  # how long a rank may wait for the others to compile (not --timeout)
COMPILE_WAIT = datetime.timedelta(seconds=COMPILE_WAIT_S)


def compile_before_training(model, batch, loss):
    """--compile: the first forward and backward compile, in seconds to minutes that differ
    between ranks, and so does the evaluation's forward (eval mode, no gradients: another graph).
    Run them once here, where no collective waits (under no_sync: no all-reduce), then drop the
    gradients; the ranks then meet in a wait of its own (`waiting_for`)."""
    with model.no_sync():
        loss(*batch, model).backward()
    model.zero_grad(set_to_none=False)
    model.eval()
    with torch.no_grad():
        loss(*batch, model)
    model.train()


@contextlib.contextmanager
def waiting_for(what, seconds):
    """A meeting of the ranks that is no training step, with a bound of its own: if a rank does
    not come within `seconds`, one line that says what the others waited for."""
    try:
        yield
    except (dist.DistError, RuntimeError) as e:
        if "monitoredBarrier" not in str(e):
            raise
        raise TrainingError(f"waited {seconds:g}s for {what} ({str(e).splitlines()[0]}): that "
                            f"rank hangs or died; see its own error") from None


def run_and_exit(rank, main, world_size, plan, local_rank=None):
    """What mp.spawn and the launchers run in each process: main(rank, world_size, plan,
    local_rank), then the end of the process with its exit code. Ctrl-C and SIGTERM only raise a
    flag (the ranks agree on it after the step, save, and main returns 128 + signal); an error
    becomes one `error:` line and an exit code."""
    local_rank = rank if local_rank is None else local_rank
    for sig in STOP_SIGNALS:
        signal.signal(sig, _request_stop)
    try:
        code = main(rank, world_size, plan, local_rank)
    except (UsageError, DataError) as e:
        if local_rank == 0 or not dist.is_initialized():
            print(f"error: {e}", file=sys.stderr, flush=True)
        code = 2
    except TrainingError as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        code = 3
    except (dist.DistError, RuntimeError) as e:
        line = collective_error(e, rank, world_size, plan.timeout)
        if line is None:
            raise
        print(line, file=sys.stderr, flush=True)
        code = 1
    finally:
        if dist.is_initialized():  # still in the group: training ended with an error
            workarounds.abort_process_group()
    workarounds.exit_now(code)


def collective_error(error, rank, world_size, timeout):
    """The error line for a collective that failed, or None for any other error."""
    several_nodes = int(os.environ.get("LOCAL_WORLD_SIZE", world_size)) < world_size
    if workarounds.timed_out(error):  # (the other ranks then see it as a lost peer)
        cause = (f"a node hangs or died, the network between the nodes failed, or {OUT_OF_STEP}"
                 if several_nodes else f"most often {OUT_OF_STEP}")
        return (f"error: rank {rank} lost contact with another rank: nothing arrived within "
                f"--timeout {timeout:g}s: {cause}; {SEE_WHICH}")
    if workarounds.out_of_step(error):  # found by TORCH_DISTRIBUTED_DEBUG=DETAIL's checks
        return f"error: rank {rank}: the ranks fell out of step: {str(error).splitlines()[0]}"
    if workarounds.peer_lost(error):
        # Another rank died or went silent (its own error, if any, is the cause, printed by it
        # or by the launcher); wait a moment so that the launcher sees that failure first.
        time.sleep(1)
        return f"error: rank {rank} lost contact with another rank, which failed or was killed: see that rank's error"
    return None


# ---------------------------------------------------------------------------------------------
# The parent of mp.spawn's workers

def ignore_stop_signals():
    """Ignore SIGINT and SIGTERM here and in the processes started next, which inherit "ignored"
    (a handler does not survive their exec): a Ctrl-C while the workers still import torch then
    cannot end them with KeyboardInterrupt tracebacks. The workers set their handlers in
    `run_and_exit`; this process sets its own in `supervise`, which passes a stop on again to a
    worker that was still ignoring it. Only where /proc tells whether a worker still ignores it
    (Linux); elsewhere the workers start with Python's default handlers."""
    if os.path.exists(f"/proc/{os.getpid()}/status"):
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)


def supervise(context):
    """Wait for mp.spawn's workers; pass a stop signal on to them; if one fails, stop the rest
    within seconds. Returns the exit code for the whole job."""
    stop, deaf = [], set()  # the stop signal; workers that ignored it while they were starting

    def forward(signum, frame):  # a scheduler may signal only this process: pass it on
        stop.append(signum)
        for p in context.processes:
            if p.is_alive():
                if workarounds.still_ignores(p.pid, signum):
                    deaf.add(p)
                os.kill(p.pid, signum)
    for sig in STOP_SIGNALS:
        signal.signal(sig, forward)
    try:
        while not context.join(timeout=0.5, grace_period=5):
            for p in [p for p in deaf if not workarounds.still_ignores(p.pid, stop[-1])]:
                deaf.discard(p)  # listening now
                if p.is_alive():
                    os.kill(p.pid, stop[-1])
    except mp.ProcessExitedException as e:
        if stop and e.exit_code == -stop[-1]:  # where workers start with default handlers
            print(f"stopped by {signal.Signals(stop[-1]).name} before training began; nothing "
                  f"was saved", flush=True)
            return 128 + stop[-1]
        if e.exit_code < 0:  # no chance to say why
            hint = {signal.SIGKILL: "; unless someone killed it, the kernel's out-of-memory killer "
                                    "did (dmesg tells): try a smaller --batch-size or --model, or "
                                    "fewer --nprocs",
                    # Gloo aborts a process whose collective meets one of another size
                    signal.SIGABRT: f": most often {OUT_OF_STEP}; {SEE_WHICH}"}.get(-e.exit_code, "")
            print(f"error: rank {e.error_index} was killed by {e.signal_name}{hint}",
                  file=sys.stderr, flush=True)
            return 1
        return e.exit_code  # the worker printed its own one-line error
    except mp.ProcessRaisedException as e:  # an unexpected error: show the worker's traceback
        print(f"error: rank {e.error_index} failed:\n{e}", file=sys.stderr)
        return 1
    return 0
