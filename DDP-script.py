"""Train GPT-2 with DistributedDataParallel, one process per GPU (or N CPU processes on Gloo).

    python DDP-script.py                       # spawns the workers itself (torch.multiprocessing)
    python DDP-script.py --nprocs 4 --epochs 2 # 4 processes
    python -m torch.distributed.launch --nproc_per_node=2 DDP-script.py   # a launcher starts them

Read it in the order of the book's appendix (A.9.3): `ddp_setup` joins the process group, the
model is built the same on every rank and wrapped in DDP, a DistributedSampler gives each rank its
own shard of the data, `train` runs the loop (`set_epoch`, accumulation with `no_sync`, mixed
precision, clipping), `main` is one process, and the end of the file spawns them. The lines
that DDP adds to single-device training carry a NEW: comment, as in the book; grep lists them.
What keeps a long run safe and observable (flag checks, log lines, snapshots, stop signals, exit
codes) is in run_support.py, one call each.
"""
import contextlib
import datetime
import math
import os
import sys

import torch
import torch.distributed as dist  # NEW: process groups and collectives (all-reduce)
import torch.multiprocessing as mp  # NEW: starts one process per GPU
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP  # NEW: the wrapper that syncs gradients

import run_support as rs
from data import create_dataloader, get_tokenizer, prepare_tokens, split_tokens
from gpt_model import GPTModel, count_parameters, generate, load_hf_gpt2


def parse_args(argv=None):
    parser = rs.argument_parser(__doc__)
    parser.processes.add_argument("--nprocs", type=int, default=None,
                                  help="processes to spawn (default: one per visible GPU, or 2 on the CPU)")
    parser.processes.add_argument("--local-rank", "--local_rank", type=int, default=None,
                                  help="set by `python -m torch.distributed.launch`; not for people")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Setup: the process group, the model, the data.

def ddp_setup(rank, local_rank, world_size, plan):
    """Join the process group. rank: this process's place in the whole job (0 writes the files);
    local_rank: its place on this machine, which picks its GPU."""
    if plan.device == "cuda":
        torch.cuda.set_device(local_rank)  # NEW: one GPU per process, before NCCL starts
        device = torch.device("cuda", local_rank)
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls on tensor cores (TF32)
        torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device("cpu")
    rs.tune_process(device, world_size)  # CPU threads and memory reuse
    with rs.setup_errors(rank, world_size, plan.timeout):  # a process that never comes: one line
        # NEW: meet the others at MASTER_ADDR:MASTER_PORT; NCCL between GPUs, Gloo between CPUs
        dist.init_process_group(plan.backend, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=plan.timeout),
                                device_id=device if plan.backend == "nccl" else None)
    return device


def build_model(plan, device):
    torch.manual_seed(plan.seed)  # the same initial weights on every rank
    model = GPTModel(plan.model_config)
    if plan.init_from and not plan.resume:
        load_hf_gpt2(model, plan.init_from)
    model.to(device)
    raw_model = model  # the model itself, for saving, sampling and the optimizer
    if plan.compile:
        model = torch.compile(model)
    # NEW: DDP broadcasts rank 0's weights, then all-reduces gradient buckets during backward
    model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                gradient_as_bucket_view=True)  # gradients live in the buckets: no extra copy
    return model, raw_model


def build_loaders(plan, rank):
    tokens = prepare_tokens(plan.data, plan.cache_dir)
    train_tokens, val_tokens = split_tokens(tokens, plan.val_ratio)
    common = dict(batch_size=plan.batch_size, max_length=plan.context_length,
                  stride=plan.context_length, num_workers=plan.num_workers,
                  distributed=True, num_replicas=plan.world_size, rank=rank,  # NEW: a shard per rank
                  seed=plan.seed, pin_memory=plan.device == "cuda")
    # Training: a DistributedSampler; validation: an even split, every window exactly once.
    train_loader = create_dataloader(train_tokens, shuffle=True, drop_last=True,
                                     name="the training split", **common)
    val_loader = create_dataloader(val_tokens, shuffle=False, drop_last=False,
                                   name=f"the validation split (--val-ratio {plan.val_ratio})",
                                   **common)
    return train_loader, val_loader


def counting_allreduce_hook(state, bucket):
    """DDP's all-reduce of one gradient bucket (as bf16 if state["bf16"]: half the bytes on the
    wire, for slow links between nodes), counting calls and bytes sent in `state`."""
    state["calls"] += 1
    if state["bf16"]:
        state["bytes"] += bucket.buffer().numel() * 2
        return default_hooks.bf16_compress_hook(None, bucket)
    state["bytes"] += bucket.buffer().numel() * bucket.buffer().element_size()
    return default_hooks.allreduce_hook(None, bucket)


def configure_optimizer(raw_model, plan):
    decay = [p for p in raw_model.parameters() if p.dim() >= 2]   # matmul weights, embeddings
    no_decay = [p for p in raw_model.parameters() if p.dim() < 2]  # biases, LayerNorm
    groups = [{"params": decay, "weight_decay": plan.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel updates every tensor (on CUDA, and on the CPU since torch 2.4); the
    # default for-each loop takes several times longer on the CPU for GPT-2 sizes.
    return torch.optim.AdamW(groups, lr=plan.lr, betas=(0.9, 0.95), fused=True)


def lr_factor(step, plan):
    """Linear warm-up to lr, then cosine decay to min_lr at the last step (a LambdaLR factor).
    By default neither: the learning rate stays constant, as in the book's chapter 5."""
    if step < plan.warmup_steps:
        return (step + 1) / plan.warmup_steps
    progress = (step - plan.warmup_steps) / max(1, plan.total_steps - plan.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return (plan.min_lr + (plan.lr - plan.min_lr) * cosine) / plan.lr


# ---------------------------------------------------------------------------------------------
# Training.

def calc_loss_batch(input_batch, target_batch, model, device, amp_dtype):
    input_batch = input_batch.to(device, non_blocking=True)
    target_batch = target_batch.to(device, non_blocking=True)
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        logits = model(input_batch)
    # the loss in fp32, outside autocast
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
    dist.all_reduce(total)  # NEW: sum over the ranks' shards
    model.train()
    return (total[0] / total[1]).item()


def sample_text(raw_model, plan, device):
    tokenizer = get_tokenizer()
    idx = torch.tensor([tokenizer.encode(plan.sample_prompt)], device=device)
    raw_model.eval()
    out = generate(raw_model, idx, plan.sample_tokens, plan.context_length)
    raw_model.train()
    return tokenizer.decode(out[0].tolist()).replace("\n", " ")


def train(model, raw_model, optimizer, scheduler, scaler, train_loader, val_loader, run, plan,
          device, rank):
    """The training loop. `run` keeps the books: step count, resume position, log lines,
    snapshots and the stop flag (run_support.py)."""
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(plan.amp)
    model.train()
    for epoch in run.epochs():
        train_loader.sampler.set_epoch(epoch)  # NEW: a new shuffle each epoch, the same on all ranks
        batches = iter(train_loader)
        for i in range(run.skip_steps_taken(batches), plan.steps_per_epoch):
            torch.manual_seed(run.step_seed())  # dropout: the rank's own masks, resumable
            for micro in range(plan.grad_accum):
                x, y = next(batches)
                last_micro = micro == plan.grad_accum - 1
                # NEW: no_sync on all but the last micro-batch: gradients stay local, one all-reduce per step
                with contextlib.nullcontext() if last_micro else model.no_sync():
                    loss = calc_loss_batch(x, y, model, device, amp_dtype)
                    # / grad_accum: the K micro-batches' summed gradients are then the gradient
                    # of the mean loss over the K-times larger batch
                    scaler.scale(loss / plan.grad_accum).backward()  # NEW: DDP all-reduces here
                run.add_loss(loss)
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            # the same averaged gradients on every rank: the same norm, the same clipped step
            grad_norm = torch.nn.utils.clip_grad_norm_(
                raw_model.parameters(), plan.max_norm if plan.max_norm > 0 else float("inf"))
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            run.end_step(grad_norm, epoch_end=i == plan.steps_per_epoch - 1)  # count; agree on stops

            if run.log_due:
                train_loss = run.mean_train_loss()  # NEW: all-reduced, the same on every rank
                # model.module: the replica itself, so no DDP machinery runs in evaluation
                val_loss = (evaluate(model.module, val_loader, device, amp_dtype, plan.eval_iters)
                            if run.eval_due else None)
                if rank == 0:  # NEW: global rank 0 alone writes: the replicas are identical
                    run.log(train_loss, val_loss, grad_norm)
            if run.save_due and rank == 0:  # NEW: one snapshot, written by one process
                run.save(i + 1)
            if run.done or run.stop_signal:
                break
        if rank == 0 and not run.stop_signal:  # NEW: one sample, printed once
            with run.pause():
                print(f"sample: {sample_text(raw_model, plan, device)}", flush=True)


# ---------------------------------------------------------------------------------------------
# One process of the job, and the launch.

def main(rank, world_size, plan, local_rank=None):  # NEW: runs in every process, with its rank
    """One process: set up, train, save, leave. Exits with an error line and code on failure."""
    local_rank = rank if local_rank is None else local_rank  # one machine: the same
    with rs.one_process(rank, local_rank):  # stop signals, one-line errors, exit codes
        device = ddp_setup(rank, local_rank, world_size, plan)
        model, raw_model = build_model(plan, device)
        if rank == 0:
            rs.print_plan(plan, count_parameters(raw_model))
        train_loader, val_loader = build_loaders(plan, rank)
        optimizer = configure_optimizer(raw_model, plan)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, plan))
        scaler = torch.amp.GradScaler(device.type, enabled=plan.amp == "fp16")
        comm = {"calls": 0, "bytes": 0, "bf16": plan.grad_compression == "bf16"}
        model.register_comm_hook(comm, counting_allreduce_hook)  # NEW: count (or compress) all-reduces
        run = rs.Run(rank, plan, device, raw_model, optimizer, scheduler, scaler, comm)  # or resume
        train(model, raw_model, optimizer, scheduler, scaler, train_loader, val_loader, run, plan,
              device, rank)
        rs.check_replicas_identical(raw_model, rank, world_size)  # DDP's promise, bit for bit
        if rank == 0:  # NEW: model.pt and loss.png, written once
            run.finish()
        dist.barrier()  # NEW: nobody exits (and so nobody gets killed) before rank 0 has saved
        dist.destroy_process_group()  # NEW: leave the process group cleanly


if __name__ == "__main__":
    args = parse_args()
    launched = rs.launched_by_launcher()  # torch.distributed.launch (or torchrun) started us
    with rs.usage_errors():  # bad input: one line, exit code 2, before any process starts
        plan = rs.plan_run(args, launcher="a launcher" if launched else "mp.spawn")
        rs.plan_data(plan, build_loaders)  # tokenize once: the workers find the token file ready
        if not launched:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")  # NEW: where rank 0 listens
            os.environ["MASTER_PORT"] = rs.master_port(  # NEW: yours if free, else a free port
                os.environ["MASTER_ADDR"], os.environ.get("MASTER_PORT"))
    if launched:  # the launcher set RANK; LOCAL_RANK (or --local-rank) picks the GPU
        main(int(os.environ["RANK"]), plan.world_size, plan,
             int(os.environ.get("LOCAL_RANK", args.local_rank or 0)))
    else:
        rs.ignore_stop_signals()  # until the workers set handlers: a Ctrl-C now reaches them later
        # NEW: start world_size processes; each runs main(rank, world_size, plan)
        workers = mp.spawn(main, args=(plan.world_size, plan), nprocs=plan.world_size, join=False)
        sys.exit(rs.supervise(workers))  # pass on Ctrl-C / SIGTERM; stop all if one fails
