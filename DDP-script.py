"""Train GPT-2 with DistributedDataParallel, one process per GPU (or N CPU processes on Gloo).

    python DDP-script.py                       # spawns the workers itself (torch.multiprocessing)
    python DDP-script.py --nprocs 4 --epochs 2 # 4 processes
    python -m torch.distributed.launch --nproc_per_node=2 DDP-script.py   # a launcher starts them

The recipe, in order: pick backend and world size (`plan_run`), spawn the workers (`main`), join the
process group (`ddp_setup`), build the same model on every rank and wrap it in DDP (`build_model`),
shard the data with a DistributedSampler (`build_loaders`), then train (`train`): gradient
accumulation with `no_sync`, autocast mixed precision, gradient clipping, rank-0 logging and
checkpoints, and `destroy_process_group` on every way out.
"""
import argparse
import contextlib
import ctypes
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
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP

from data import DataError, create_dataloader, get_tokenizer, prepare_tokens, split_tokens
from gpt_model import (GPT_CONFIGS, GPTModel, count_parameters, generate, hf_gpt2_config,
                       load_hf_gpt2)


class UsageError(Exception):
    """A mistake in the command line or its files: reported as one line, exit code 2."""


class TrainingError(Exception):
    """Training cannot go on (for example a non-finite loss): one line on every rank, exit code 3."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # show "(default: ...)" unless the help says it already
        text = action.help or ""
        return text if "default" in text else super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the whole usage text
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    g = p.add_argument_group("processes")
    g.add_argument("--nprocs", type=int, default=None,
                   help="processes to spawn (default: one per visible GPU, or 2 on the CPU)")
    g.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="auto: CUDA when PyTorch sees a GPU, else the CPU")
    g.add_argument("--backend", choices=["auto", "nccl", "gloo"], default="auto",
                   help="auto: NCCL when every process has its own GPU, else Gloo")
    g.add_argument("--timeout", type=float, default=600,
                   help="seconds to wait for the other processes at setup and in a collective")
    g.add_argument("--local-rank", "--local_rank", type=int, default=None,
                   help="set by `python -m torch.distributed.launch`; not for people")
    g = p.add_argument_group("model")
    g.add_argument("--model", choices=list(GPT_CONFIGS), default=None,
                   help="preset (default: gpt2-small on GPUs, gpt-mini on the CPU)")
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
                   help="tokens per training sequence, at most the model's (default: 256 on GPUs, "
                        "128 on the CPU)")
    g.add_argument("--batch-size", type=int, default=2, help="sequences per process per micro-batch")
    g.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", type=int, default=10, help="passes over the training split")
    g.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many optimizer steps (the LR schedule ends there too)")
    g.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches per optimizer step; all but the last skip the all-reduce")
    g.add_argument("--lr", type=float, default=4e-4, help="peak learning rate")
    g.add_argument("--min-lr", type=float, default=None, help="final learning rate (default: lr/10)")
    g.add_argument("--warmup-steps", type=int, default=None,
                   help="linear warm-up steps before the cosine decay (default: 10%% of the steps)")
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
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# The plan: everything that can be checked before a single process starts.

def launched_by_launcher():
    """torchrun and torch.distributed.launch set these for every process they start."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def plan_run(args):
    """Checks the command line and completes args in place: device, backend, world size, model
    config and data. Raises UsageError or DataError with a one-line message."""
    for name in ("batch_size", "grad_accum", "epochs", "log_every", "eval_every", "sample_tokens"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(args, name)}")
    if args.max_steps is not None and args.max_steps < 1:
        raise UsageError(f"--max-steps must be at least 1, not {args.max_steps}")
    if not 0.0 < args.val_ratio < 1.0:
        raise UsageError(f"--val-ratio must be between 0 and 1, not {args.val_ratio}")
    if args.lr <= 0 or args.max_norm < 0 or args.weight_decay < 0 or args.timeout <= 0:
        raise UsageError("--lr and --timeout must be positive, --max-norm and --weight-decay >= 0")
    if args.dropout is not None and not 0.0 <= args.dropout < 1.0:
        raise UsageError(f"--dropout must be in [0, 1), not {args.dropout}")

    # Devices, backend and world size.
    cuda = torch.cuda.is_available()
    if args.device == "cuda" and not cuda:
        raise UsageError("--device cuda, but PyTorch sees no CUDA GPU: use --device cpu "
                         "(or install a CUDA build of torch)")
    args.device = "cuda" if args.device == "auto" and cuda else args.device
    args.device = "cpu" if args.device == "auto" else args.device
    n_gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    if launched_by_launcher():
        args.world_size = int(os.environ["WORLD_SIZE"])
        procs_here = int(os.environ.get("LOCAL_WORLD_SIZE", args.world_size))
    else:
        if args.nprocs is None:
            args.nprocs = n_gpus if args.device == "cuda" else 2
        if args.nprocs < 1:
            raise UsageError(f"--nprocs must be at least 1, not {args.nprocs}")
        args.world_size = procs_here = args.nprocs
    if args.device == "cuda" and procs_here > n_gpus:
        raise UsageError(f"{procs_here} processes on this machine but only {n_gpus} GPU(s) "
                         f"visible: use --nprocs {n_gpus} (or --nproc_per_node={n_gpus})")
    if args.backend == "auto":
        args.backend = "nccl" if args.device == "cuda" and sys.platform == "linux" else "gloo"
    if args.backend == "nccl" and (args.device != "cuda" or not dist.is_nccl_available()):
        raise UsageError("--backend nccl needs CUDA GPUs and a Linux build of torch with NCCL: "
                         "use --backend gloo (or --device cuda on a GPU machine)")

    # Precision. Parameters, gradients and the all-reduce stay fp32; autocast runs the matmuls.
    args.amp_auto = args.amp == "auto"
    if args.amp == "auto":
        if args.device == "cuda":
            # Ampere (compute capability 8) and later compute bf16; is_bf16_supported() also
            # says yes on older GPUs that emulate it slowly, and allocates on GPU 0 to find out.
            args.amp = "bf16" if torch.cuda.get_device_capability(0)[0] >= 8 else "fp16"
        else:  # bf16 where the CPU computes it natively (AVX512-BF16, AMX), else fp32
            args.amp = "bf16" if cpu_has_bf16() else "off"
    if args.amp == "fp16" and args.device != "cuda":
        raise UsageError("--amp fp16 needs a CUDA GPU: use --amp bf16 or --amp off on the CPU")

    # Model config: a preset, GPT-2 weights, or (when resuming) the checkpoint's own.
    args.ckpt_path = os.path.join(args.out, "ckpt.pt")
    ckpt = check_checkpoint(args)
    if ckpt is not None:
        args.model_config = ckpt["config"]
        args.model = ckpt["args"]["model"] if args.model is None else args.model
        if args.model != ckpt["args"]["model"]:
            raise UsageError(f"{args.ckpt_path} holds a {ckpt['args']['model']} model, not "
                             f"{args.model}: drop --model, or use another --out")
    elif args.init_from:
        if args.model:
            raise UsageError("--model and --init-from both choose the model: drop --model "
                             "(the weights' config.json decides the size)")
        try:
            args.model_config = hf_gpt2_config(args.init_from)
        except (OSError, KeyError, ValueError) as e:
            raise UsageError(f"--init-from {args.init_from}: cannot read GPT-2 weights ({e})")
        args.model = "hf:" + os.path.basename(os.path.normpath(args.init_from))
    else:
        args.model = args.model or ("gpt2-small" if args.device == "cuda" else "gpt-mini")
        args.model_config = dict(GPT_CONFIGS[args.model])
        if args.device == "cuda":
            args.model_config["pad_vocab_multiple"] = 64  # 50304 rows: faster GPU matmuls
    if args.dropout is not None:
        args.model_config["drop_rate"] = args.dropout
    max_context = args.model_config["context_length"]
    if args.context_length is None:
        args.context_length = min(max_context, 256 if args.device == "cuda" else 128)
    if not 1 <= args.context_length <= max_context:
        raise UsageError(f"--context-length {args.context_length} is outside 1..{max_context}, "
                         f"the context of {args.model}: lower --context-length")
    return args


def plan_data(args):
    """Tokenize the corpus (once: later calls find the token file) and size the run from it."""
    train_loader, _ = build_loaders(args, rank=0)
    args.steps_per_epoch = len(train_loader) // args.grad_accum
    if args.steps_per_epoch == 0:
        raise UsageError(f"each process gets {len(train_loader)} batch(es) per epoch, fewer than "
                         f"--grad-accum {args.grad_accum}: lower --grad-accum or --batch-size, or "
                         f"pass more text with --data")
    args.total_steps = args.epochs * args.steps_per_epoch
    if args.max_steps is not None:
        args.total_steps = min(args.total_steps, args.max_steps)
    if args.warmup_steps is None:
        args.warmup_steps = args.total_steps // 10
    args.min_lr = args.lr / 10 if args.min_lr is None else args.min_lr
    return args


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


def check_checkpoint(args):
    """The checkpoint to resume from (loaded lazily, memory-mapped), or None for a fresh run.
    Refuses to overwrite a checkpoint without --resume."""
    exists = os.path.exists(args.ckpt_path)
    if exists and not args.resume:
        raise UsageError(f"{args.ckpt_path} already exists: pass --resume to continue that run, "
                         f"or choose another --out")
    if not args.resume:
        check_writable(args.out)
        return None
    if not exists:
        raise UsageError(f"--resume: no checkpoint at {args.ckpt_path}: run once without --resume, "
                         f"or point --out at the run to continue")
    try:
        return torch.load(args.ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated or not a checkpoint at all
        raise UsageError(f"cannot read {args.ckpt_path} ({type(e).__name__}); it is damaged: "
                         f"restore a good copy or start a fresh run with another --out")


def find_free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_port_free(addr, port):
    """The rank-0 store binds MASTER_PORT; if it is taken, rank 0 fails and the rest would wait."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((addr, port))
        except OSError:
            raise UsageError(f"MASTER_PORT {port} on {addr} is already in use: set MASTER_PORT to "
                             f"a free port, or unset it to let the script pick one") from None


# ---------------------------------------------------------------------------------------------
# Process group and model.

def keep_freed_memory():
    """CPU on Linux: glibc's malloc hands each large freed block back to the kernel, so every step
    maps its activations afresh and the kernel zeroes about a gigabyte of pages (a third of a
    GPT-2 step). Keep freed memory in the process for reuse instead, as PyTorch's CUDA allocator
    does."""
    if platform.libc_ver()[0] == "glibc":
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 2**31 - 1)  # M_MMAP_THRESHOLD: large blocks come from the heap, not mmap
        libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD: keep up to 2 GiB free at its top


def ddp_setup(rank, local_rank, args):
    if sys.platform == "win32":
        os.environ["USE_LIBUV"] = "0"  # Windows builds of torch come without libuv
    if args.device == "cuda":
        torch.cuda.set_device(local_rank)  # before init, so NCCL binds this process to its GPU
        device = torch.device("cuda", local_rank)
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls on tensor cores (TF32)
        torch.backends.cudnn.allow_tf32 = True
    else:
        if "OMP_NUM_THREADS" not in os.environ:  # else the user (or torchrun) chose already
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(
                os.environ.get("LOCAL_WORLD_SIZE", args.world_size))))
        keep_freed_memory()
        device = torch.device("cpu")
    try:
        dist.init_process_group(args.backend, rank=rank, world_size=args.world_size,
                                timeout=datetime.timedelta(seconds=args.timeout),
                                # NCCL: bind the group to this GPU (barriers use it too)
                                device_id=device if args.backend == "nccl" else None)
    except dist.DistError as e:  # a process (or a node) never came, or the address is wrong
        raise UsageError(
            f"rank {rank} of {args.world_size} could not form the process group within --timeout "
            f"{args.timeout:g}s via {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} "
            f"({str(e).splitlines()[0]}): start every process or node, or check MASTER_ADDR, "
            f"MASTER_PORT and firewalls") from None
    return device


def build_model(args, device):
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = GPTModel(args.model_config)
    if args.init_from and not args.resume:
        load_hf_gpt2(model, args.init_from)
    model.to(device)
    raw_model = model
    if args.compile:
        model = torch.compile(model)
    # DDP broadcasts rank 0's weights, then all-reduces gradient buckets during backward.
    # gradient_as_bucket_view: gradients live in the buckets, no extra copy.
    model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                gradient_as_bucket_view=True)
    return model, raw_model


def counting_allreduce_hook(state, bucket):
    """DDP's all-reduce of one gradient bucket (as bf16 if state["bf16"]: half the bytes on the
    wire, for slow links between nodes), counting calls and bytes sent in `state`."""
    state["calls"] += 1
    if state["bf16"]:
        state["bytes"] += bucket.buffer().numel() * 2
        return default_hooks.bf16_compress_hook(None, bucket)
    state["bytes"] += bucket.buffer().numel() * bucket.buffer().element_size()
    return default_hooks.allreduce_hook(None, bucket)


def configure_optimizer(raw_model, args):
    decay = [p for p in raw_model.parameters() if p.dim() >= 2]   # matmul weights, embeddings
    no_decay = [p for p in raw_model.parameters() if p.dim() < 2]  # biases, LayerNorm
    groups = [{"params": decay, "weight_decay": args.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel updates every tensor (on CUDA, and on the CPU since torch 2.4); the
    # default for-each loop takes several times longer on the CPU for GPT-2 sizes.
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), fused=True)


def lr_factor(step, args):
    """Linear warm-up to lr, then cosine decay to min_lr at the last step (a LambdaLR factor)."""
    if step < args.warmup_steps:
        return (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.total_steps - args.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return (args.min_lr + (args.lr - args.min_lr) * cosine) / args.lr


def build_loaders(args, rank):
    tokens = prepare_tokens(args.data, args.cache_dir)
    train_tokens, val_tokens = split_tokens(tokens, args.val_ratio)
    common = dict(batch_size=args.batch_size, max_length=args.context_length,
                  stride=args.context_length, num_workers=args.num_workers, distributed=True,
                  num_replicas=args.world_size, rank=rank, seed=args.seed,
                  pin_memory=args.device == "cuda")
    train_loader = create_dataloader(train_tokens, shuffle=True, drop_last=True,
                                     name="the training split", **common)
    val_loader = create_dataloader(val_tokens, shuffle=False, drop_last=False,
                                   name=f"the validation split (--val-ratio {args.val_ratio})",
                                   **common)
    return train_loader, val_loader


# ---------------------------------------------------------------------------------------------
# Training.

def calc_loss_batch(input_batch, target_batch, model, device, amp_dtype):
    input_batch = input_batch.to(device, non_blocking=True)
    target_batch = target_batch.to(device, non_blocking=True)
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        logits = model(input_batch)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), target_batch.flatten())


@torch.no_grad()
def evaluate(model, loader, device, amp_dtype, max_batches=0):
    """Mean validation loss over all ranks' shards: sums and counts are all-reduced, so the
    result equals one process evaluating the whole split."""
    model.eval()
    total = torch.zeros(2, device=device, dtype=torch.float64)  # loss sum, batches
    for i, (x, y) in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        total[0] += calc_loss_batch(x, y, model, device, amp_dtype) * x.shape[0]
        total[1] += x.shape[0]
    dist.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item()


def sample_text(raw_model, args, device):
    tokenizer = get_tokenizer()
    idx = torch.tensor([tokenizer.encode(args.sample_prompt)], device=device)
    raw_model.eval()
    out = generate(raw_model, idx, args.sample_tokens, args.context_length)
    raw_model.train()
    return tokenizer.decode(out[0].tolist()).replace("\n", " ")


def save_checkpoint(path, payload):
    """Write to a temporary file, then rename: a crash mid-write leaves the old file intact."""
    tmp = f"{path}.tmp"
    try:
        torch.save(payload, tmp)
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


STOP = {"signal": 0}  # set by SIGINT/SIGTERM; the ranks agree on it after every step


def request_stop(signum, frame):
    STOP["signal"] = signum


def train(rank, args, device, model, raw_model):
    world, is_main = args.world_size, rank == 0
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    train_loader, val_loader = build_loaders(args, rank)
    optimizer = configure_optimizer(raw_model, args)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, args))
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    comm = {"calls": 0, "bytes": 0, "bf16": args.grad_compression == "bf16"}
    model.register_comm_hook(comm, counting_allreduce_hook)
    # The stop flag goes through a CPU group, so checking it never waits for the GPU.
    control = (dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=args.timeout))
               if args.backend == "nccl" else None)

    step, epoch, skip, tokens_seen, saved_world = 0, 0, 0, 0, world
    if args.resume:
        ckpt = torch.load(args.ckpt_path, map_location=device, weights_only=True)
        raw_model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        step, epoch, tokens_seen = ckpt["step"], ckpt["epoch"], ckpt["tokens_seen"]
        saved_world = ckpt["world_size"]
        # Skip what the epoch already consumed, counted in global batches of this run.
        skip = ckpt["samples_in_epoch"] // (args.batch_size * world * args.grad_accum)
        if skip >= args.steps_per_epoch:  # less than one step of this run is left in that epoch
            epoch, skip = epoch + 1, 0
        del ckpt
    # Each rank read --out itself: nodes that do not share it may hold different snapshots.
    where = torch.tensor([step, -step], device=device)
    dist.all_reduce(where, op=dist.ReduceOp.MAX)
    highest, lowest = where[0].item(), -where[1].item()
    if highest != lowest:
        raise UsageError(f"the ranks found different snapshots in --out {args.out} (steps "
                         f"{lowest} to {highest}): --out must be a folder that every node "
                         f"shares, or start a fresh run with a new --out")
    if is_main:
        if args.resume:
            print(f"resumed from step {step} (epoch {epoch + 1}, {skip} step(s) into it)"
                  + ("" if saved_world == world else
                     f"; saved at world size {saved_world}, now {world}: the data order "
                     f"differs from the original run"), flush=True)
        keep_metrics_until(os.path.join(args.out, "metrics.jsonl"), step)  # step 0: a fresh log

    def snapshot(epoch, steps_into_epoch):
        return {"model": clean_state_dict(raw_model), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "step": step, "epoch": epoch, "tokens_seen": tokens_seen,
                "samples_in_epoch": steps_into_epoch * args.batch_size * world * args.grad_accum,
                "world_size": world, "config": args.model_config, "args": plain_args(args),
                "run_id": os.environ.get("TORCHELASTIC_RUN_ID")}

    tokens_per_step = args.batch_size * args.context_length * args.grad_accum * world
    loss_sum = torch.zeros((), device=device)  # summed on the device: no host sync per step
    loss_count = 0
    t_start = t_log = time.time()
    paused = 0.0  # seconds spent evaluating, saving and sampling, left out of tokens/s
    start_step = step_log = step
    calls_log = bytes_log = 0
    model.train()
    while epoch < args.epochs and step < args.total_steps:
        train_loader.sampler.set_epoch(epoch)  # a new shuffle each epoch, the same on all ranks
        batches = iter(train_loader)
        for _ in range(skip * args.grad_accum):
            next(batches)
        for i in range(skip, args.steps_per_epoch):
            # Dropout masks depend on seed, rank and step alone, so a resumed run continues exactly.
            torch.manual_seed(args.seed * 1_000_003 + rank * 10_007 + step)
            for micro in range(args.grad_accum):
                x, y = next(batches)
                # no_sync: gradients stay local on all but the last micro-batch (no all-reduce)
                last_micro = micro == args.grad_accum - 1
                with contextlib.nullcontext() if last_micro else model.no_sync():
                    loss = calc_loss_batch(x, y, model, device, amp_dtype)
                    scaler.scale(loss / args.grad_accum).backward()
                loss_sum += loss.detach()
                loss_count += 1
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            grad_norm = torch.nn.utils.clip_grad_norm_(
                raw_model.parameters(), args.max_norm if args.max_norm > 0 else float("inf"))
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            tokens_seen += tokens_per_step
            epoch_end = i == args.steps_per_epoch - 1
            done = step >= args.total_steps

            # All ranks must leave the loop at the same step, so they share the stop flag.
            flag = torch.tensor([STOP["signal"]])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=control)
            stop_signal = int(flag)

            save_now = (epoch_end or done or stop_signal
                        or (args.save_every and step % args.save_every == 0))
            log_now = step % args.log_every == 0 or epoch_end or done or stop_signal
            if (save_now or log_now) and not scaler.is_enabled():
                # The gradient norm is the same on every rank (the gradients were all-reduced), so
                # all ranks stop here together and a non-finite state is never saved. Only here:
                # .item() waits for the GPU. (With fp16 the scaler skips inf steps by design.)
                check_finite(grad_norm.item(), step, args)
            if log_now:
                stats = torch.stack([loss_sum, torch.tensor(float(loss_count), device=device)])
                dist.all_reduce(stats)  # the same mean on every rank, so all see a NaN together
                train_loss, norm = (stats[0] / stats[1]).item(), grad_norm.item()
                loss_sum.zero_()
                loss_count = 0
                check_finite(train_loss, step, args, "training loss")
                now, n = time.time(), max(1, step - step_log)
                tokens_per_sec = tokens_per_step * n / max(now - t_log - paused, 1e-9)
                t_log, paused = now, 0.0
                val_loss = None
                if step % args.eval_every == 0 or epoch_end or done:
                    # model.module: the replica itself, so no DDP collective runs in evaluation
                    val_loss = evaluate(model.module, val_loader, device, amp_dtype, args.eval_iters)
                record = {"step": step, "epoch": epoch + 1, "tokens_seen": tokens_seen,
                          "train_loss": train_loss, "val_loss": val_loss,
                          "lr": scheduler.get_last_lr()[0],
                          "tokens_per_sec": tokens_per_sec,
                          "grad_norm": norm, "elapsed_s": now - t_start,
                          "allreduce_calls_per_step": (comm["calls"] - calls_log) / n,
                          "allreduce_mb_per_step": (comm["bytes"] - bytes_log) / n / 2**20}
                if is_main:
                    print_log(record, args, start_step)
                    with open(os.path.join(args.out, "metrics.jsonl"), "a") as f:
                        f.write(json.dumps(record) + "\n")
                step_log, calls_log, bytes_log = step, comm["calls"], comm["bytes"]
                paused += time.time() - now

            if is_main and save_now:
                t0 = time.time()
                save_checkpoint(args.ckpt_path, snapshot(epoch + 1, 0) if epoch_end
                                else snapshot(epoch, i + 1))
                paused += time.time() - t0
            if done or stop_signal:
                break
        if stop_signal:
            return step, stop_signal
        if is_main:
            t0 = time.time()
            print(f"sample: {sample_text(raw_model, args, device)}", flush=True)
            paused += time.time() - t0
        epoch, skip = epoch + 1, 0
    return step, 0


def check_finite(value, step, args, what="gradient norm"):
    if not math.isfinite(value):
        raise TrainingError(f"the {what} is {value} at step {step}: training diverged; lower --lr "
                            f"(now {args.lr:g}) and --resume from the last checkpoint, or start again")


def print_log(record, args, start_step):
    steps_done = record["step"] - start_step
    eta = record["elapsed_s"] / steps_done * (args.total_steps - record["step"])
    val = "-" if record["val_loss"] is None else f"{record['val_loss']:.3f}"
    print(f"epoch {record['epoch']} step {record['step']}/{args.total_steps}: "
          f"train {record['train_loss']:.3f}, val {val}, lr {record['lr']:.2e}, "
          f"{record['tokens_per_sec']:,.0f} tok/s, {record['elapsed_s']:.0f}s elapsed, "
          f"eta {eta:.0f}s", flush=True)


def plain_args(args):
    """The run's settings as plain values, so the checkpoint loads with weights_only=True."""
    return {k: v for k, v in vars(args).items() if k != "model_config"}


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


# ---------------------------------------------------------------------------------------------
# One process of the job.

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


def print_plan(args, n_params):
    seqs = args.batch_size * args.world_size * args.grad_accum
    lines = [
        f"world size {args.world_size} ({args.backend} on {args.device}"
        + (f", {torch.get_num_threads()} thread(s) per process" if args.device == "cpu" else "")
        + "), started by " + ("a launcher" if launched_by_launcher() else "mp.spawn"),
        f"model {args.model}: {n_params:,} parameters, context {args.context_length}"
        f" (of {args.model_config['context_length']}), dropout {args.model_config['drop_rate']}"
        + (", from " + args.init_from if args.init_from else "") + (", compiled" if args.compile else ""),
        f"precision: {'fp32' if args.amp == 'off' else args.amp + ' autocast'}"
        + (" (--amp auto: this CPU computes bf16 natively)"
           if args.amp_auto and args.amp == "bf16" and args.device == "cpu" else "")
        + ", fp32 weights"
        f" and gradients, {'bf16' if args.grad_compression == 'bf16' else 'fp32'} all-reduce",
        f"batch: {args.batch_size} x {args.context_length} tokens per process, x {args.world_size}"
        f" process(es) x {args.grad_accum} accumulation = {seqs} sequences,"
        f" {seqs * args.context_length:,} tokens per step",
        f"{args.steps_per_epoch} steps per epoch, {args.total_steps} steps in all; lr {args.lr:g}"
        f" ({args.warmup_steps} warm-up steps, cosine to {args.min_lr:g}), clip {args.max_norm:g}",
        f"writing to {args.out}",
    ]
    print("\n".join("plan: " + l for l in lines), flush=True)


def run(rank, local_rank, args):
    """Set up, train and clean up one rank. Returns the process exit code."""
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    clean = False
    try:
        device = ddp_setup(rank, local_rank, args)
        model, raw_model = build_model(args, device)
        if rank == 0:
            os.makedirs(args.out, exist_ok=True)
            print_plan(args, count_parameters(raw_model))
        step, stop_signal = train(rank, args, device, model, raw_model)
        check_replicas_identical(raw_model, rank, args.world_size)
        if rank == 0:
            if stop_signal:
                print(f"stopped by {signal.Signals(stop_signal).name} after step {step}; "
                      f"{args.ckpt_path} holds it: add --resume to continue", flush=True)
            else:
                torch.save({"config": args.model_config, "model": clean_state_dict(raw_model)},
                           os.path.join(args.out, "model.pt"))
                plot_losses(args.out)
                print(f"done: {step} steps; weights in {os.path.join(args.out, 'model.pt')}",
                      flush=True)
        dist.barrier()  # nobody exits (and so nobody gets killed) before rank 0 has saved
        clean = True
        return 128 + stop_signal if stop_signal else 0
    except (UsageError, DataError) as e:
        if local_rank == 0 or not dist.is_initialized():
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except TrainingError as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 3
    except (dist.DistError, RuntimeError) as e:
        if not lost_a_peer(e):
            raise
        # Another rank died (its own error is the cause, printed by it or by the launcher);
        # wait a moment so that the launcher sees that rank's failure before this one.
        time.sleep(1)
        print(f"error: rank {rank} lost contact with another rank, which failed or was killed: "
              f"see that rank's error", file=sys.stderr, flush=True)
        return 1
    finally:
        if dist.is_initialized():
            leave_process_group(clean)


def leave_process_group(clean):
    """After an error a peer may be gone with collectives still queued, which a plain destroy
    would wait for (with NCCL, forever): abort the groups instead."""
    abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
    if clean or abort is None:
        dist.destroy_process_group()
    else:
        abort()


def lost_a_peer(error):
    text = str(error)
    return isinstance(error, dist.DistNetworkError) or any(
        sign in text for sign in ("Connection closed by peer", "Connection reset by peer",
                                  "Broken pipe", "NCCL communicator was aborted"))


def spawned_worker(rank, args):
    """Entry point of a process started by mp.spawn: on one machine, local rank = rank."""
    code = run(rank, rank, args)
    if code:
        sys.exit(code)


def main(argv=None):
    args = parse_args(argv)
    try:
        plan_run(args)
        plan_data(args)  # here, before spawning: the workers find the token file ready
        if launched_by_launcher():
            # torchrun or torch.distributed.launch started this process: no spawning.
            local_rank = int(os.environ.get("LOCAL_RANK", args.local_rank or 0))
            return run(int(os.environ["RANK"]), local_rank, args)
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" in os.environ:
            check_port_free(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]))
        else:
            os.environ["MASTER_PORT"] = str(find_free_port())
    except (UsageError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return spawn_workers(args)


def spawn_workers(args):
    """Start one process per rank; if one fails, stop the rest within seconds."""
    context = mp.spawn(spawned_worker, args=(args,), nprocs=args.world_size, join=False)

    def forward(signum, frame):  # a scheduler may signal only this process: pass it on
        for p in context.processes:
            if p.is_alive():
                os.kill(p.pid, signum)
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    try:
        while not context.join(grace_period=5):
            pass
    except mp.ProcessExitedException as e:  # the worker printed its own one-line error
        return e.exit_code if e.exit_code and e.exit_code > 0 else 1
    except mp.ProcessRaisedException as e:  # an unexpected error: show the worker's traceback
        print(f"error: rank {e.error_index} failed:\n{e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
