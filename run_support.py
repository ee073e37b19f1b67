"""What keeps a long DDP run safe and observable, shared by DDP-script.py and DDP-script-torchrun.py.

None of this is DDP itself; the scripts call each piece in one line, so that they read as the
lesson. Here are:
- the flags and the run plan: every check that can be made before a process starts (`plan_run`,
  `plan_data`), and the settings derived from the flags and the data (`Plan`);
- errors and exit codes: bad input 2, training diverged 3, a crash or a lost peer 1, stopped by
  SIGINT / SIGTERM 130 / 143 (`one_process`, `usage_errors`);
- the books of a run (`Run`): resume position, log lines, metrics.jsonl, atomic snapshots, the stop
  flag the ranks agree on after every step, loss.png and model.pt at the end;
- the replica check, CPU thread and memory tuning, supervising mp.spawn's workers, and torchrun
  restart support (`restart_safe_store`, `restarted_by_torchrun`).
"""
import argparse
import contextlib
import ctypes
import dataclasses
import datetime
import hashlib
import json
import math
import os
import platform
import signal
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from data import DataError
from gpt_model import GPT_CONFIGS, GPTModel, hf_gpt2_config


class UsageError(Exception):
    """A mistake in the command line or its files: reported as one line, exit code 2."""


class TrainingError(Exception):
    """Training cannot go on (for example a non-finite loss): one line on every rank, exit code 3."""


# ---------------------------------------------------------------------------------------------
# Flags

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # show "(default: ...)" unless the help says it already
        text = action.help or ""
        return text if "default" in text else super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the whole usage text
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


# What the flags leave open. A bare `python DDP-script.py` trains DEFAULT_MODEL; each model trains
# with its recipe. The book's chapter 5 (context 256, AdamW at a constant 4e-4, 10 epochs) for
# every model but gpt-mini, the CPU default, which learns the text visibly in about 90 s on 2 cores:
# 20 epochs at 1e-3, warmed up over 10% of the steps, then decayed to 1e-4 (appendix D's schedule).
DEFAULT_MODEL = {"cuda": "book-124m", "cpu": "gpt-mini"}
BOOK_RECIPE = {"context_length": 256, "lr": 4e-4, "epochs": 10, "warmup": 0.0, "min_lr": None}
RECIPES = {"gpt-mini": {"context_length": 128, "lr": 1e-3, "epochs": 20, "warmup": 0.1,
                        "min_lr": 1e-4}}


def recipe(model):
    return RECIPES.get(model, BOOK_RECIPE)


def argument_parser(doc):
    """The flags both scripts take; each script adds its own launch flags to the "processes"
    group (`parser.processes`)."""
    p = ArgumentParser(description=doc.split("\n")[0], formatter_class=HelpFormatter)
    g = p.processes = p.add_argument_group("processes")
    g.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="auto: CUDA when PyTorch sees a GPU, else the CPU")
    g.add_argument("--backend", choices=["auto", "nccl", "gloo"], default="auto",
                   help="auto: NCCL for CUDA GPUs on Linux, else Gloo")
    g.add_argument("--timeout", type=float, default=600,
                   help="seconds to wait for the other processes at setup and in a collective")
    g = p.add_argument_group("model")
    g.add_argument("--model", choices=list(GPT_CONFIGS), default=None,
                   help=f"preset (default: {DEFAULT_MODEL['cuda']} on GPUs, "
                        f"{DEFAULT_MODEL['cpu']} on the CPU)")
    g.add_argument("--init-from", default=None, metavar="PATH",
                   help="start from GPT-2 weights in the Hugging Face layout (a folder with "
                        "model.safetensors or pytorch_model.bin, and config.json)")
    g.add_argument("--dropout", type=float, default=None, help="override the preset's drop rate")
    g.add_argument("--compile", action="store_true", help="torch.compile the model before DDP")
    g = p.add_argument_group("data")
    g.add_argument("--data", nargs="+", default=None, metavar="PATH",
                   help="text files or folders of .txt files (default: the shipped the-verdict.txt)")
    g.add_argument("--cache-dir", default=None,
                   help="folder for token files (default: $GPT_DDP_CACHE or ~/.cache/gpt-ddp)")
    g.add_argument("--val-ratio", type=float, default=0.1, help="share of tokens for validation")
    g.add_argument("--context-length", type=int, default=None,
                   help="tokens per training sequence, at most the model's (default: 256, "
                        "128 for gpt-mini)")
    g.add_argument("--batch-size", type=int, default=2, help="sequences per process per micro-batch")
    g.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", type=int, default=None,
                   help="passes over the training split (default: 10, 20 for gpt-mini)")
    g.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many optimizer steps (the LR schedule ends there too)")
    g.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches per optimizer step; all but the last skip the all-reduce")
    g.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default: 4e-4, the book's; 1e-3 for gpt-mini)")
    g.add_argument("--warmup-steps", type=int, default=None,
                   help="linear warm-up from 0 to --lr over this many steps (default: none; "
                        "10%% of the steps for gpt-mini)")
    g.add_argument("--min-lr", type=float, default=None,
                   help="cosine decay from --lr to this at the last step (default: none, a "
                        "constant learning rate as in the book's chapter 5; 1e-4 for gpt-mini)")
    g.add_argument("--weight-decay", type=float, default=0.1, help="AdamW, 2-D weights only")
    g.add_argument("--max-norm", type=float, default=1.0, help="gradient clipping; 0 disables it")
    g.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto",
                   help="autocast precision; auto: bf16 on GPUs that have it, else fp16; on the CPU "
                        "bf16 where it is native (AVX512-BF16, AMX), else off (default: auto)")
    g.add_argument("--grad-compression", choices=["none", "bf16"], default="none",
                   help="all-reduce gradients as bf16 (halves traffic between nodes)")
    g.add_argument("--seed", type=int, default=123, help="same seed, same settings: same weights")
    g = p.add_argument_group("logging and checkpoints")
    g.add_argument("--out", default="runs/ddp", help="folder for ckpt.pt, model.pt, metrics, plot")
    g.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt")
    g.add_argument("--save-every", type=int, default=0,
                   help="write ckpt.pt every N steps (0: at the end of each epoch)")
    g.add_argument("--log-every", type=int, default=5, help="steps between log lines")
    g.add_argument("--eval-every", type=int, default=5, help="steps between validation runs")
    g.add_argument("--eval-iters", type=int, default=0,
                   help="validation batches per process (0: the whole validation split)")
    g.add_argument("--sample-prompt", default="Every effort moves you",
                   help="prompt for the text sample printed after each epoch")
    g.add_argument("--sample-tokens", type=int, default=50, help="length of that sample")
    return p


# ---------------------------------------------------------------------------------------------
# The plan: everything that can be checked before a single process starts.

@dataclasses.dataclass
class Plan:
    """The run's settings: the flags as given (read through: `plan.seed` is `args.seed`) and what the
    run derived from them and from the data, which takes their place (`plan.device` is "cpu" or
    "cuda", never "auto")."""
    args: argparse.Namespace
    launcher: str
    device: str
    backend: str
    world_size: int
    amp: str
    amp_auto: bool
    model: str
    model_config: dict
    context_length: int
    resume: bool
    ckpt_path: str
    lr: float = 0.0  # the flag, or the model's recipe
    epochs: int = 0
    steps_per_epoch: int = 0  # set by plan_data
    total_steps: int = 0
    warmup_steps: int = 0
    min_lr: float = 0.0

    def __getattr__(self, name):  # only called for names that are not fields: the flags
        if name.startswith("__") or name == "args":  # (unpickling asks before args exists)
            raise AttributeError(name)
        return getattr(self.args, name)

    def as_dict(self):
        """The settings as plain values, so that a checkpoint loads with weights_only=True
        (ckpt["args"]: every flag, resolved, and the derived settings)."""
        derived = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                   if f.name not in ("args", "model_config", "launcher")}
        return {**vars(self.args), **derived}


def launched_by_launcher():
    """torchrun and torch.distributed.launch set these for every process they start."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def plan_run(args, launcher):
    """Checks the command line and decides device, backend, world size, precision and model.
    Raises UsageError or DataError with a one-line message; creates nothing."""
    for name in ("batch_size", "grad_accum", "epochs", "log_every", "eval_every", "sample_tokens"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(args, name)}")
    if args.max_steps is not None and args.max_steps < 1:
        raise UsageError(f"--max-steps must be at least 1, not {args.max_steps}")
    if not 0.0 < args.val_ratio < 1.0:
        raise UsageError(f"--val-ratio must be between 0 and 1, not {args.val_ratio}")
    if (args.lr is not None and args.lr <= 0) or args.max_norm < 0 or args.weight_decay < 0 \
            or args.timeout <= 0:
        raise UsageError("--lr and --timeout must be positive, --max-norm and --weight-decay >= 0")
    if (args.warmup_steps is not None and args.warmup_steps < 0) or \
            (args.min_lr is not None and args.min_lr < 0):
        raise UsageError("--warmup-steps and --min-lr must be >= 0")
    if args.dropout is not None and not 0.0 <= args.dropout < 1.0:
        raise UsageError(f"--dropout must be in [0, 1), not {args.dropout}")

    # Devices, backend and world size.
    cuda = torch.cuda.is_available()
    if args.device == "cuda" and not cuda:
        raise UsageError("--device cuda, but PyTorch sees no CUDA GPU: use --device cpu "
                         "(or install a CUDA build of torch)")
    device = "cuda" if args.device == "auto" and cuda else args.device
    device = "cpu" if device == "auto" else device
    n_gpus = torch.cuda.device_count() if device == "cuda" else 0
    if launched_by_launcher():
        world_size = int(os.environ["WORLD_SIZE"])
        procs_here = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    else:  # DDP-script.py spawns the processes itself
        nprocs = args.nprocs if args.nprocs is not None else n_gpus if device == "cuda" else 2
        if nprocs < 1:
            raise UsageError(f"--nprocs must be at least 1, not {nprocs}")
        world_size = procs_here = nprocs
    if device == "cuda" and procs_here > n_gpus:
        fix = (f"--nprocs {n_gpus} (or --nproc_per_node={n_gpus})" if hasattr(args, "nprocs")
               else f"--nproc_per_node={n_gpus}")
        raise UsageError(f"{procs_here} processes on this machine but only {n_gpus} GPU(s) "
                         f"visible: use {fix}")
    backend = args.backend
    if backend == "auto":
        backend = "nccl" if device == "cuda" and sys.platform == "linux" else "gloo"
    if backend == "nccl" and (device != "cuda" or not dist.is_nccl_available()):
        raise UsageError("--backend nccl needs CUDA GPUs and a Linux build of torch with NCCL: "
                         "use --backend gloo (or --device cuda on a GPU machine)")

    # Precision. Parameters, gradients and the all-reduce stay fp32; autocast runs the matmuls.
    amp = args.amp
    if amp == "auto":
        if device == "cuda":
            # Ampere (compute capability 8) and later compute bf16; is_bf16_supported() also
            # says yes on older GPUs that emulate it slowly, and allocates on GPU 0 to find out.
            amp = "bf16" if torch.cuda.get_device_capability(0)[0] >= 8 else "fp16"
        else:  # bf16 where the CPU computes it natively (AVX512-BF16, AMX), else fp32
            amp = "bf16" if cpu_has_bf16() else "off"
    if amp == "fp16" and device != "cuda":
        raise UsageError("--amp fp16 needs a CUDA GPU: use --amp bf16 or --amp off on the CPU")

    # Model config: a preset, GPT-2 weights, or (when resuming) the checkpoint's own.
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    resume = args.resume or (os.path.exists(ckpt_path) and restarted_by_torchrun(ckpt_path))
    ckpt = check_checkpoint(ckpt_path, args.out, resume)
    model = args.model
    if ckpt is not None:
        model_config = ckpt["config"]
        check_weights_fit(ckpt, ckpt_path)
        model = ckpt["args"]["model"] if model is None else model
        if model != ckpt["args"]["model"]:
            raise UsageError(f"{ckpt_path} holds a {ckpt['args']['model']} model, not "
                             f"{model}: drop --model, or use another --out")
    elif args.init_from:
        if model:
            raise UsageError("--model and --init-from both choose the model: drop --model "
                             "(the weights' config.json decides the size)")
        try:
            model_config = hf_gpt2_config(args.init_from)
        except (OSError, KeyError, ValueError) as e:
            raise UsageError(f"--init-from {args.init_from}: cannot read GPT-2 weights ({e})")
        model = "hf:" + os.path.basename(os.path.normpath(args.init_from))
    else:
        model = model or DEFAULT_MODEL[device]
        model_config = dict(GPT_CONFIGS[model])
        if device == "cuda":
            model_config["pad_vocab_multiple"] = 64  # 50304 rows: faster GPU matmuls
    if args.dropout is not None:
        model_config["drop_rate"] = args.dropout
    max_context = model_config["context_length"]
    r = recipe(model)
    context_length = args.context_length
    if context_length is None:
        context_length = min(max_context, r["context_length"])
    if not 1 <= context_length <= max_context:
        raise UsageError(f"--context-length {context_length} is outside 1..{max_context}, "
                         f"the context of {model}: lower --context-length")
    plan = Plan(args, launcher, device, backend, world_size, amp, args.amp == "auto", model,
                model_config, context_length, resume, ckpt_path)
    plan.lr = r["lr"] if args.lr is None else args.lr
    plan.epochs = r["epochs"] if args.epochs is None else args.epochs
    return plan


def plan_data(plan, build_loaders):
    """Tokenize the corpus (once: later calls find the token file) and size the run from it."""
    train_loader, _ = build_loaders(plan, 0)
    plan.steps_per_epoch = len(train_loader) // plan.grad_accum
    if plan.steps_per_epoch == 0:
        raise UsageError(f"each process gets {len(train_loader)} batch(es) per epoch, fewer than "
                         f"--grad-accum {plan.grad_accum}: lower --grad-accum or --batch-size, or "
                         f"pass more text with --data")
    plan.total_steps = plan.epochs * plan.steps_per_epoch
    if plan.max_steps is not None:
        plan.total_steps = min(plan.total_steps, plan.max_steps)
    r = recipe(plan.model)
    plan.warmup_steps = (int(r["warmup"] * plan.total_steps) if plan.args.warmup_steps is None
                         else plan.args.warmup_steps)
    min_lr = r["min_lr"] if plan.args.min_lr is None else plan.args.min_lr
    plan.min_lr = plan.lr if min_lr is None else min_lr


def plan_data_per_node(local_rank, plan, build_loaders, device):
    """Local rank 0 tokenizes the corpus for its node (nodes need not share a filesystem) while
    the others wait; then all ranks learn whether it worked, so a bad corpus ends every rank."""
    error = ""
    if local_rank == 0:
        try:
            plan_data(plan, build_loaders)
        except (UsageError, DataError) as e:
            error = str(e)
    failed = torch.tensor([int(bool(error))], device=device)
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if failed.item():
        raise UsageError(error or "another node could not prepare the data")
    if local_rank != 0:
        plan_data(plan, build_loaders)  # finds the token file ready


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


def cpu_has_bf16():
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def check_writable(out):
    """--out, or the folder it would be made in, must be a writable folder (nothing is created)."""
    folder = os.path.abspath(out)
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise UsageError(f"--out {out} is not writable ({folder} is not a writable folder): "
                         f"choose another --out")


def check_checkpoint(ckpt_path, out, resume):
    """The checkpoint to resume from (loaded lazily, memory-mapped), or None for a fresh run.
    Refuses to overwrite a checkpoint without --resume."""
    exists = os.path.exists(ckpt_path)
    if exists and not resume:
        raise UsageError(f"{ckpt_path} already exists: pass --resume to continue that run, "
                         f"or choose another --out")
    if not resume:
        check_writable(out)
        return None
    if not exists:
        raise UsageError(f"--resume: no checkpoint at {ckpt_path}: run once without --resume, "
                         f"or point --out at the run to continue")
    try:
        return torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated or not a checkpoint at all
        raise UsageError(f"cannot read {ckpt_path} ({type(e).__name__}); it is damaged: "
                         f"restore a good copy or start a fresh run with another --out")


def check_weights_fit(ckpt, ckpt_path, fix="resume with the version that wrote it, or start a "
                                           "fresh run with another --out"):
    """A checkpoint whose weights this gpt_model.py would not load (other names or shapes, as
    written by an older version of it) is refused before any process starts."""
    with torch.device("meta"):
        expected = GPTModel(ckpt["config"]).state_dict()
    saved = ckpt["model"]
    if set(saved) != set(expected) or any(saved[k].shape != expected[k].shape for k in saved):
        raise UsageError(f"{ckpt_path} holds weights this gpt_model.py cannot load (other parameter "
                         f"names or shapes, e.g. from an older version of it): {fix}")


def restarted_by_torchrun(ckpt_path):
    """Under `torchrun --max-restarts=R` a failed worker makes torchrun restart every worker.
    TORCHELASTIC_RESTART_COUNT > 0 says so; a node whose own workers were healthy may still see 0,
    so a snapshot written under the same rendezvous id (--rdzv-id) counts too."""
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        return True
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    try:
        saved = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
        return run_id != "none" and saved.get("run_id") == run_id
    except Exception:
        return False  # a damaged snapshot is reported by check_checkpoint


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


def print_plan(plan, n_params):
    seqs = plan.batch_size * plan.world_size * plan.grad_accum
    lines = [
        f"world size {plan.world_size} ({plan.backend} on {plan.device}"
        + (f", {torch.get_num_threads()} thread(s) per process" if plan.device == "cpu" else "")
        + f"), started by {plan.launcher}",
        f"model {plan.model}: {n_params:,} parameters, context {plan.context_length}"
        f" (of {plan.model_config['context_length']}), dropout {plan.model_config['drop_rate']}"
        + (", from " + plan.init_from if plan.init_from else "") + (", compiled" if plan.compile else ""),
        f"precision: {'fp32' if plan.amp == 'off' else plan.amp + ' autocast'}"
        + (" (--amp auto: this CPU computes bf16 natively)"
           if plan.amp_auto and plan.amp == "bf16" and plan.device == "cpu" else "")
        + ", fp32 weights"
        f" and gradients, {'bf16' if plan.grad_compression == 'bf16' else 'fp32'} all-reduce",
        f"batch: {plan.batch_size} x {plan.context_length} tokens per process, x {plan.world_size}"
        f" process(es) x {plan.grad_accum} accumulation = {seqs} sequences,"
        f" {seqs * plan.context_length:,} tokens per step",
        f"{plan.steps_per_epoch} steps per epoch, {plan.total_steps} steps in all; lr {plan.lr:g}"
        + (f", {plan.warmup_steps} warm-up steps" if plan.warmup_steps else "")
        + (f", cosine to {plan.min_lr:g}" if plan.min_lr != plan.lr else " constant")
        + (f", clip {plan.max_norm:g}" if plan.max_norm else ", no clipping"),
        f"writing to {plan.out}",
    ]
    print("\n".join("plan: " + l for l in lines), flush=True)


# ---------------------------------------------------------------------------------------------
# Setting up a process

def tune_process(device, world_size):
    """Before the process group forms: Windows' store transport; on the CPU, threads and memory."""
    if sys.platform == "win32":
        os.environ["USE_LIBUV"] = "0"  # Windows builds of torch come without libuv
    if device.type == "cpu":
        if "OMP_NUM_THREADS" not in os.environ:  # else the user (or torchrun) chose already
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(
                os.environ.get("LOCAL_WORLD_SIZE", world_size))))
        keep_freed_memory()


def keep_freed_memory():
    """CPU on Linux: glibc's malloc hands each large freed block back to the kernel, so every step
    maps its activations afresh and the kernel zeroes about a gigabyte of pages (a third of a
    GPT-2 step). Keep freed memory in the process for reuse instead, as PyTorch's CUDA allocator
    does."""
    if platform.libc_ver()[0] == "glibc":
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 2**31 - 1)  # M_MMAP_THRESHOLD: large blocks come from the heap, not mmap
        libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD: keep up to 2 GiB free at its top


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
        if "Unable to find address for" in text or "connectFullMesh" in text:
            fix = ("set GLOO_SOCKET_IFNAME (NCCL_SOCKET_IFNAME on GPUs) on every node to the "
                   "interface that reaches the others (ip route get MASTER_ADDR shows it)")
        else:
            fix = ("start every process or node, or check MASTER_ADDR, MASTER_PORT and firewalls "
                   "(under torchrun's c10d rendezvous, --local-addr on every node)")
        raise UsageError(
            f"rank {rank} of {world_size} could not form the process group within --timeout "
            f"{timeout:g}s via {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} "
            f"({text.splitlines()[0] if text else type(e).__name__}): {fix}") from None
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def restart_safe_store(rank, world_size, timeout):
    """Under torchrun: the agent's TCP store, under a key prefix that is new for every start of
    the workers (None elsewhere: init_process_group then reads MASTER_ADDR and MASTER_PORT).

    torchrun shares its own store with the workers, and it outlives them: after a restart it
    still holds the process group keys of the workers that died, and a plain init can read those
    and hang (pytorch/pytorch#135712). TORCHELASTIC_RESTART_COUNT would make a prefix, but nodes
    need not agree on it, so rank 0 hands out a fresh generation number: each rank posts a random
    token, and rank 0 answers every token it sees until all ranks have taken this generation."""
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
                raise UsageError(f"rank(s) {sorted(waiting)} did not reach torchrun's store within "
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


# ---------------------------------------------------------------------------------------------
# Stop signals, errors and exit codes

STOP = {"signal": 0, "agreed": 0}  # set by SIGINT/SIGTERM; the ranks agree on it after every step
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def request_stop(signum, frame):
    STOP["signal"] = signum


def ignore_stop_signals():
    """Ignore SIGINT and SIGTERM here and in the processes started next, which inherit "ignored"
    (a handler does not survive their exec): a Ctrl-C while the workers still import torch then
    cannot end them with KeyboardInterrupt tracebacks. The workers set their handlers in
    `one_process`; this process sets its own in `supervise`, which passes a stop on again to a
    worker that was still ignoring it. Only where /proc tells whether a worker still ignores it
    (Linux); elsewhere the workers start with Python's default handlers."""
    if os.path.exists(f"/proc/{os.getpid()}/status"):
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)


def ignores(pid, signum):
    """Whether process pid ignores signum (from Linux's /proc)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            mask = next(line for line in f if line.startswith("SigIgn:")).split()[1]
    except (OSError, StopIteration):
        return False
    return bool(int(mask, 16) >> (signum - 1) & 1)


@contextlib.contextmanager
def one_process(rank, local_rank):
    """Runs one rank of the job, then ends the process with its exit code. Ctrl-C and SIGTERM
    only raise a flag (the ranks agree on it after the step, save and exit with 128 + signal); an
    error becomes one `error:` line and an exit code: 2 bad input, 3 training diverged, 1 another
    rank was lost. After an error the process group is aborted, not destroyed: a peer may be gone
    with collectives still queued, which a plain destroy would wait for (with NCCL, forever)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, request_stop)
    code = 0
    try:
        yield
        code = 128 + STOP["agreed"] if STOP["agreed"] else 0
    except (UsageError, DataError) as e:
        if local_rank == 0 or not dist.is_initialized():
            print(f"error: {e}", file=sys.stderr, flush=True)
        code = 2
    except TrainingError as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        code = 3
    except (dist.DistError, RuntimeError) as e:
        how = lost_a_peer(e)
        if not how:
            raise
        # Another rank died or went silent (its own error, if any, is the cause, printed by it
        # or by the launcher); wait a moment so that the launcher sees that failure first.
        time.sleep(1)
        print(f"error: rank {rank} lost contact with another rank{how}", file=sys.stderr,
              flush=True)
        code = 1
    finally:
        if dist.is_initialized():  # still in the group: training ended with an error
            abort = getattr(dist.distributed_c10d, "_abort_process_group", dist.destroy_process_group)
            abort()
    # End without Python's shutdown. A Gloo thread may still be freeing the tensors of the last
    # collective (the replica check's all-gather) when the main thread exits; freeing them takes
    # the GIL, and CPython 3.11 ends a thread that asks for the GIL during finalization with
    # pthread_exit, which C++ turns into std::terminate: "terminate called without an active
    # exception", exit 1 instead of 0, 130 or 143 (about 1 stop in 180 here; upstream
    # pytorch/pytorch#179291, #190489). Everything the run wrote is closed by now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def lost_a_peer(error):
    """How this rank lost another, as the end of the error line; None for any other error."""
    text = str(error)
    if "Timed out waiting" in text:  # Gloo: nothing came within the process group's timeout
        return (": nothing arrived within --timeout (a rank or node hangs or died, or the "
                "network between the nodes failed)")
    if isinstance(error, dist.DistNetworkError) or any(
            sign in text for sign in ("Connection closed by peer", "Connection reset by peer",
                                      "Broken pipe", "NCCL communicator was aborted")):
        return ", which failed or was killed: see that rank's error"
    return None


def supervise(context):
    """Wait for mp.spawn's workers; pass a stop signal on to them; if one fails, stop the rest
    within seconds. Returns the exit code for the whole job."""
    stop, deaf = [], set()  # the stop signal; workers that ignored it while they were starting

    def forward(signum, frame):  # a scheduler may signal only this process: pass it on
        stop.append(signum)
        for p in context.processes:
            if p.is_alive():
                if ignores(p.pid, signum):
                    deaf.add(p)
                os.kill(p.pid, signum)
    for sig in STOP_SIGNALS:
        signal.signal(sig, forward)
    try:
        while not context.join(timeout=0.5, grace_period=5):
            for p in [p for p in deaf if not ignores(p.pid, stop[-1])]:  # listening now
                deaf.discard(p)
                if p.is_alive():
                    os.kill(p.pid, stop[-1])
    except mp.ProcessExitedException as e:
        if stop and e.exit_code == -stop[-1]:  # where workers start with default handlers
            print(f"stopped by {signal.Signals(stop[-1]).name} before training began; nothing "
                  f"was saved", flush=True)
            return 128 + stop[-1]
        if e.exit_code < 0:  # no chance to say why: SIGKILL is most often the out-of-memory killer
            hint = ("; unless someone killed it, the kernel's out-of-memory killer did (dmesg "
                    "tells): try a smaller --batch-size or --model, or fewer --nprocs"
                    if e.exit_code == -signal.SIGKILL
                    else "")
            print(f"error: rank {e.error_index} was killed by {e.signal_name}{hint}",
                  file=sys.stderr, flush=True)
            return 1
        return e.exit_code  # the worker printed its own one-line error
    except mp.ProcessRaisedException as e:  # an unexpected error: show the worker's traceback
        print(f"error: rank {e.error_index} failed:\n{e}", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------------------------------
# The books of a run: resume, log lines, snapshots, the stop flag

class Run:
    """Everything the training loop counts and writes besides training itself.

    Loads the snapshot when resuming (all ranks) and checks that every rank found the same one;
    after each optimizer step (`end_step`) counts it, lets the ranks agree on a stop signal and
    says what is due: a log line (`log_due`, `eval_due`), a snapshot (`save_due`), the end
    (`done`, `stop_signal`). Rank 0 alone calls `log`, `save` and `finish`."""

    def __init__(self, rank, plan, device, raw_model, optimizer, scheduler, scaler, comm):
        self.rank, self.plan, self.device, self.comm = rank, plan, device, comm
        self.raw_model, self.optimizer, self.scheduler, self.scaler = (raw_model, optimizer,
                                                                       scheduler, scaler)
        world = plan.world_size
        # The stop flag goes through a CPU group, so checking it never waits for the GPU.
        self.control = (dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=plan.timeout))
                        if plan.backend == "nccl" else None)
        self.step, self.epoch, self.skip, self.tokens_seen, saved_world = 0, 0, 0, 0, world
        if plan.resume:
            ckpt = torch.load(plan.ckpt_path, map_location=device, weights_only=True)
            raw_model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            scaler.load_state_dict(ckpt["scaler"])
            self.step, self.epoch, self.tokens_seen = ckpt["step"], ckpt["epoch"], ckpt["tokens_seen"]
            saved_world = ckpt["world_size"]
            # Skip what the epoch already consumed, counted in global batches of this run.
            self.skip = ckpt["samples_in_epoch"] // (plan.batch_size * world * plan.grad_accum)
            if self.skip >= plan.steps_per_epoch:  # less than one step of this run is left there
                self.epoch, self.skip = self.epoch + 1, 0
            del ckpt
        # Each rank read --out itself: nodes that do not share it may hold different snapshots.
        where = torch.tensor([self.step, -self.step], device=device)
        dist.all_reduce(where, op=dist.ReduceOp.MAX)
        highest, lowest = where[0].item(), -where[1].item()
        if highest != lowest:
            raise UsageError(f"the ranks found different snapshots in --out {plan.out} (steps "
                             f"{lowest} to {highest}): --out must be a folder that every node "
                             f"shares, or start a fresh run with a new --out")
        if rank == 0:
            os.makedirs(plan.out, exist_ok=True)
            if plan.resume:
                print(f"resumed from step {self.step} (epoch {self.epoch + 1}, {self.skip} step(s) "
                      f"into it)" + ("" if saved_world == world else
                                     f"; saved at world size {saved_world}, now {world}: the "
                                     f"data order differs from the original run"), flush=True)
            keep_metrics_until(self.metrics_path, self.step)  # step 0: a fresh log

        self.tokens_per_step = plan.batch_size * plan.context_length * plan.grad_accum * world
        self.loss_sum = torch.zeros((), device=device)  # summed on the device: no sync per step
        self.loss_count = 0
        self.t_start = self.t_log = time.time()
        self.paused = 0.0  # seconds spent evaluating, saving and sampling, left out of tokens/s
        self.start_step = self.step_log = self.step
        self.calls_log = self.bytes_log = 0
        self.stop_signal = 0
        self.log_due = self.eval_due = self.save_due = self.epoch_end = False

    @property
    def metrics_path(self):
        return os.path.join(self.plan.out, "metrics.jsonl")

    @property
    def done(self):
        return self.step >= self.plan.total_steps

    def epochs(self):
        """The epochs to train: from the snapshot's when resuming, until the last step or a stop."""
        while self.epoch < self.plan.epochs and not self.done and not self.stop_signal:
            yield self.epoch
            self.epoch, self.skip = self.epoch + 1, 0

    def skip_steps_taken(self, batches):
        """A resumed epoch: pass over the batches its earlier steps trained on; returns the first
        step of the epoch to train."""
        for _ in range(self.skip * self.plan.grad_accum):
            next(batches)
        return self.skip

    def step_seed(self):
        """Dropout masks depend on seed, rank and step alone, so a resumed run continues exactly."""
        return self.plan.seed * 1_000_003 + self.rank * 10_007 + self.step

    def add_loss(self, loss):
        self.loss_sum += loss.detach()
        self.loss_count += 1

    def end_step(self, grad_norm, epoch_end):
        """After an optimizer step: count it, agree on a stop signal, say what is due."""
        plan = self.plan
        self.step += 1
        self.tokens_seen += self.tokens_per_step
        self.epoch_end = epoch_end
        # All ranks must leave the loop at the same step, so they share the stop flag.
        flag = torch.tensor([STOP["signal"]])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.control)
        self.stop_signal = STOP["agreed"] = int(flag)
        end = epoch_end or self.done or self.stop_signal
        self.save_due = bool(end or (plan.save_every and self.step % plan.save_every == 0))
        self.log_due = bool(self.step % plan.log_every == 0 or end)
        self.eval_due = self.step % plan.eval_every == 0 or epoch_end or self.done
        if (self.save_due or self.log_due) and not self.scaler.is_enabled():
            # The gradient norm is the same on every rank (the gradients were all-reduced), so
            # all ranks stop here together and a non-finite state is never saved. Only here:
            # .item() waits for the GPU. (With fp16 the scaler skips inf steps by design.)
            check_finite(grad_norm.item(), self.step, plan)

    def mean_train_loss(self):
        """The mean training loss since the last log line, over all ranks (every rank calls it:
        it is an all-reduce, and every rank then sees a NaN together)."""
        stats = torch.stack([self.loss_sum, torch.tensor(float(self.loss_count), device=self.device)])
        dist.all_reduce(stats)
        train_loss = (stats[0] / stats[1]).item()
        self.loss_sum.zero_()
        self.loss_count = 0
        check_finite(train_loss, self.step, self.plan, "training loss")
        self.t_now = time.time()
        return train_loss

    def log(self, train_loss, val_loss, grad_norm):
        """Rank 0: the log line and its row in metrics.jsonl."""
        now, n = self.t_now, max(1, self.step - self.step_log)
        record = {"step": self.step, "epoch": self.epoch + 1, "tokens_seen": self.tokens_seen,
                  "train_loss": train_loss, "val_loss": val_loss,
                  "lr": self.scheduler.get_last_lr()[0],
                  "tokens_per_sec": self.tokens_per_step * n / max(now - self.t_log - self.paused, 1e-9),
                  "grad_norm": grad_norm.item(), "elapsed_s": now - self.t_start,
                  "allreduce_calls_per_step": (self.comm["calls"] - self.calls_log) / n,
                  "allreduce_mb_per_step": (self.comm["bytes"] - self.bytes_log) / n / 2**20}
        print_log(record, self.plan, self.start_step)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.step_log, self.calls_log, self.bytes_log = self.step, self.comm["calls"], self.comm["bytes"]
        # the next interval starts now; evaluating and writing this line count as paused
        self.t_log, self.paused = now, time.time() - now

    def save(self, steps_into_epoch):
        """Rank 0: the snapshot to resume from, written atomically. At the end of an epoch it
        points at the start of the next one."""
        plan = self.plan
        epoch, steps_into_epoch = ((self.epoch + 1, 0) if self.epoch_end
                                   else (self.epoch, steps_into_epoch))
        with self.pause():
            save_checkpoint(plan.ckpt_path, {
                "model": clean_state_dict(self.raw_model), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "step": self.step, "epoch": epoch, "tokens_seen": self.tokens_seen,
                "samples_in_epoch": steps_into_epoch * plan.batch_size * plan.world_size * plan.grad_accum,
                "world_size": plan.world_size, "config": plan.model_config, "args": plan.as_dict(),
                "run_id": os.environ.get("TORCHELASTIC_RUN_ID")})

    @contextlib.contextmanager
    def pause(self):
        """Time spent on work that is not training (the text sample), left out of tokens/s."""
        t0 = time.time()
        yield
        self.paused += time.time() - t0

    def finish(self):
        """Rank 0, after training: model.pt and loss.png, or where a stopped run can resume."""
        if self.stop_signal:
            print(f"stopped by {signal.Signals(self.stop_signal).name} after step {self.step}; "
                  f"{self.plan.ckpt_path} holds it: add --resume to continue", flush=True)
            return
        path = os.path.join(self.plan.out, "model.pt")
        torch.save({"config": self.plan.model_config, "model": clean_state_dict(self.raw_model)}, path)
        plot_losses(self.plan.out)
        print(f"done: {self.step} steps; weights in {path}", flush=True)


def check_finite(value, step, plan, what="gradient norm"):
    if not math.isfinite(value):
        raise TrainingError(f"the {what} is {value} at step {step}: training diverged; lower --lr "
                            f"(now {plan.lr:g}) and --resume from the last checkpoint, or start again")


def print_log(record, plan, start_step):
    steps_done = record["step"] - start_step
    eta = record["elapsed_s"] / steps_done * (plan.total_steps - record["step"])
    val = "-" if record["val_loss"] is None else f"{record['val_loss']:.3f}"
    print(f"epoch {record['epoch']} step {record['step']}/{plan.total_steps}: "
          f"train {record['train_loss']:.3f}, val {val}, lr {record['lr']:.2e}, "
          f"{record['tokens_per_sec']:,.0f} tok/s, {record['elapsed_s']:.0f}s elapsed, "
          f"eta {eta:.0f}s", flush=True)


def keep_metrics_until(path, step):
    """After a resume, drop the log lines of steps that are being trained again."""
    if os.path.exists(path):
        with open(path) as f:
            lines = [l for l in f if l.strip() and json.loads(l)["step"] <= step]
        with open(path, "w") as f:
            f.writelines(lines)


def plot_losses(out):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed, so no loss.png (pip install matplotlib)")
        return
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(l) for l in f if l.strip()]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["tokens_seen"] for r in rows], [r["train_loss"] for r in rows], label="train")
    val = [r for r in rows if r["val_loss"] is not None]
    ax.plot([r["tokens_seen"] for r in val], [r["val_loss"] for r in val], "--", label="validation")
    ax.set_xlabel("tokens seen (all processes)")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "loss.png"), dpi=100)
    plt.close(fig)


def save_checkpoint(path, payload):
    """Write to a temporary file, then rename: a crash mid-write leaves the old file intact."""
    tmp = f"{path}.tmp"
    try:
        # Through a Python file, so that a full disk raises OSError (ENOSPC) here; torch.save(tmp)
        # writes in C++ and reports it as "RuntimeError: basic_ios::clear: iostream error".
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename: a power cut leaves one whole file
        os.replace(tmp, path)
    except OSError as e:  # a full disk, say: the previous file is still whole
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise TrainingError(f"cannot write {path}: {e.strerror}; free space or choose another "
                            f"--out (the previous snapshot is intact)") from None


def clean_state_dict(raw_model):
    """The weights on the CPU, each tensor copied once: the tied head and token embedding stay
    one tensor, so a GPU run's files hold it once, as a CPU run's do."""
    copies, state = {}, {}
    for name, t in raw_model.state_dict().items():
        key = (t.data_ptr(), t.dtype, t.shape)
        if key not in copies:
            copies[key] = t.detach().cpu()
        state[name] = copies[key]
    return state


def check_replicas_identical(raw_model, rank, world_size):
    """DDP's promise: after every step all replicas hold the same weights. Check it bit for bit."""
    digest = hashlib.sha256()
    for tensor in raw_model.state_dict().values():
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    digests = [None] * world_size
    dist.all_gather_object(digests, digest.hexdigest())
    if len(set(digests)) != 1:
        raise TrainingError(f"the replicas' weights differ after training ({digests}): "
                            f"this is a bug, please report it")
    if rank == 0:
        print(f"check: all {world_size} replicas hold identical weights "
              f"(sha256 {digests[0][:16]})", flush=True)
