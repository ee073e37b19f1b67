"""Train GPT-2 with DistributedDataParallel, started by torchrun: one process per GPU, on one
machine or many (N CPU processes on Gloo where there is no GPU).

    torchrun --standalone --nproc_per_node=2 DDP-script-torchrun.py
    torchrun --nproc_per_node=4 --nnodes=2 --node_rank=0 --master_addr=HOST --master_port=29500 \
        DDP-script-torchrun.py                 # and --node_rank=1 on the second machine
    torchrun --nproc_per_node=4 --nnodes=2 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \
        --rdzv-id=job1 --max-restarts=3 DDP-script-torchrun.py   # restarts that resume
    python DDP-script-torchrun.py              # without torchrun: one process, world size 1

Read it in the order of the book's appendix (A.9.3): `ddp_setup` joins the process group, the
model is built the same on every rank and wrapped in DDP, a DistributedSampler gives each rank its
own shard of the data, `train` runs the loop (`set_epoch`, accumulation with `no_sync`, mixed
precision, clipping), and `main` is one process; torchrun starts them. The lines that DDP adds
to single-device training carry a NEW: comment, as in the book; diff against DDP-script.py shows
what torchrun changes.

Every point where the ranks must meet is a `dist.` call in this file: a rank that skips one
(say, under `if rank == 0`) leaves the others waiting. What keeps a long run safe and observable
(the plan, snapshots, the log, stop signals, exit codes) is in ddp_support/.
"""
import contextlib
import datetime
import math
import os

import torch
import torch.distributed as dist  # NEW: process groups and collectives (all-reduce)
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks  # NEW: DDP's all-reduce hooks
from torch.nn.parallel import DistributedDataParallel as DDP  # NEW: the wrapper that syncs gradients

from data import (create_dataloader, get_tokenizer, prepare_tokens, split_tokens, text_to_token_ids,
                  token_ids_to_text)
from ddp_support.plan import AUTOCASTS, argument_parser, check_same_start, make_plan
from ddp_support.process import (COMPILE_WAIT, COMPILE_WAIT_S, TrainingError, UsageError,
                                 check_finite, compile_before_training, master_port, run_and_exit,
                                 setup_errors, stop_signal, tune_process, usage_errors, waiting_for)
from ddp_support.progress import (Log, Position, check_and_exit, load_snapshot, print_plan,
                                  save_snapshot, weights_sha256)
from ddp_support.workarounds import ddp_group_for_debug, restart_safe_store
from gpt_model import GPTModel, count_parameters, generate, load_hf_gpt2


def parse_args(argv=None):
    return argument_parser(__doc__).parse_args(argv)  # torchrun's own flags set the processes


# ---------------------------------------------------------------------------------------------
# Setup: the process group, the model, the data.

def ddp_setup(rank, local_rank, world_size, plan):
    """Join the process group. rank: this process's place in the whole job (0 writes the files);
    local_rank: its place on this machine, which picks its GPU."""
    if plan.device_type == "cuda":
        torch.cuda.set_device(local_rank)  # NEW: one GPU per process, before NCCL starts
        device = torch.device("cuda", local_rank)
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls on tensor cores (TF32)
        torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device("cpu")
    tune_process(device, world_size)  # CPU threads and memory reuse
    timeout = datetime.timedelta(seconds=plan.timeout)
    with setup_errors(rank, world_size, plan.timeout):  # a process that never comes: one line
        store = restart_safe_store(rank, world_size, plan.timeout, UsageError)  # NEW: torchrun's
        # meet the others through torchrun's store; NCCL between GPUs, Gloo between CPUs
        dist.init_process_group(plan.backend, rank=rank, world_size=world_size,  # NEW: join the group
                                timeout=timeout, device_id=device if plan.backend == "nccl" else None,
                                store=store)
        # The stop flag goes through a CPU group, so checking it never waits for the GPU.
        stop_group = (dist.new_group(backend="gloo", timeout=timeout)  # NEW: every rank joins
                      if plan.backend == "nccl" else None)
        ddp_group = ddp_group_for_debug(plan.backend, timeout)  # None, but see workarounds.py
    return device, stop_group, ddp_group


def build_model(plan, device, ddp_group):
    torch.manual_seed(plan.seed)  # the same initial weights on every rank
    model = GPTModel(plan.model_config)
    if plan.init_from and not plan.resume_from:
        load_hf_gpt2(model, plan.init_from)
    model.to(device)
    raw_model = model  # the model itself, for saving, sampling and the optimizer
    if plan.compile:
        model = torch.compile(model)
    device_ids = [device.index] if device.type == "cuda" else None
    # DDP broadcasts rank 0's weights now, and all-reduces gradient buckets during backward;
    # gradient_as_bucket_view: the gradients are views of those buckets, so nothing is copied
    model = DDP(model, device_ids=device_ids, gradient_as_bucket_view=True,  # NEW: wrap the replica
                process_group=ddp_group)
    return model, raw_model


def build_loaders(plan, rank):
    tokens = prepare_tokens(plan.data, plan.cache_dir)
    train_tokens, val_tokens = split_tokens(tokens, plan.val_ratio)
    common = dict(batch_size=plan.batch_size, max_length=plan.context_length,
                  stride=plan.context_length, num_workers=plan.num_workers,
                  distributed=True, num_replicas=plan.world_size, rank=rank,  # NEW: DistributedSampler
                  seed=plan.seed, pin_memory=plan.device_type == "cuda")
    # Training: a DistributedSampler; validation: an even split, every window exactly once.
    train_loader = create_dataloader(train_tokens, shuffle=True, drop_last=True, **common)
    val_loader = create_dataloader(val_tokens, shuffle=False, drop_last=False, **common)
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
    params = list(raw_model.parameters())
    if plan.decay == "all":  # the book's: AdamW(model.parameters(), weight_decay=0.1)
        groups = [{"params": params, "weight_decay": plan.weight_decay}]
    else:  # GPT-2 practice: decay matmul weights and embeddings, not biases and LayerNorm
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": plan.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    # fused: one kernel updates every tensor (on CUDA, and on the CPU since torch 2.4); the
    # default for-each loop takes several times longer on the CPU for GPT-2 sizes.
    return torch.optim.AdamW(groups, lr=plan.peak_lr, betas=plan.betas, fused=True)


def lr_factor(step, plan):
    """Linear warm-up to the peak, then cosine decay to final_lr at the last step (a LambdaLR factor).
    By default neither: the learning rate stays constant, as in the book's chapter 5."""
    if step < plan.warmup_steps:
        return (step + 1) / plan.warmup_steps
    progress = (step - plan.warmup_steps) / max(1, plan.total_steps - plan.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return (plan.final_lr + (plan.peak_lr - plan.final_lr) * cosine) / plan.peak_lr


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
    dist.all_reduce(total)  # NEW: every rank: sums over all the ranks' shards
    model.train()
    return (total[0] / total[1]).item()


def sample_text(raw_model, plan, device):
    tokenizer = get_tokenizer()
    raw_model.eval()
    out = generate(raw_model, text_to_token_ids(plan.sample_prompt, tokenizer).to(device),
                   plan.sample_tokens, plan.context_length)
    raw_model.train()
    return token_ids_to_text(out, tokenizer).replace("\n", " ")


def train(model, raw_model, optimizer, scheduler, scaler, train_loader, val_loader, start, log,
          plan, device, rank, stop_group):
    """The training loop, from `start` (a Position: step 0, or where the snapshot left off).
    Returns the step it reached and the stop signal the ranks agreed on (0: none)."""
    amp_dtype = plan.amp_dtype
    step, tokens_seen = start.step, start.tokens_seen
    loss_sum, loss_count = torch.zeros((), device=device), 0  # summed on the device: no sync per step
    stop = 0
    model.train()
    for epoch in range(start.epoch, plan.epochs):
        if step >= plan.total_steps or stop:  # the last step was taken, or the ranks stopped
            break
        train_loader.sampler.set_epoch(epoch)  # NEW: a new shuffle each epoch, the same on all ranks
        batches = iter(train_loader)
        first = start.steps_into_epoch if epoch == start.epoch else 0
        for _ in range(first * plan.grad_accum):  # a resumed epoch: pass what it trained on
            next(batches)
        for i in range(first, plan.steps_per_epoch):
            torch.manual_seed(plan.seed * 1_000_003 + rank * 10_007 + step)  # NEW: dropout per rank
            for micro in range(plan.grad_accum):
                x, y = next(batches)
                last_micro = micro == plan.grad_accum - 1
                # no_sync on all but the last micro-batch: gradients stay local, one all-reduce a step
                with contextlib.nullcontext() if last_micro else model.no_sync():  # NEW: no_sync
                    loss = calc_loss_batch(x, y, model, device, amp_dtype)
                    # / grad_accum: the K micro-batches' summed gradients are then the gradient
                    # of the mean loss over the K-times larger batch
                    scaler.scale(loss / plan.grad_accum).backward()  # NEW: DDP all-reduces here
                loss_sum += loss.detach()
                loss_count += 1
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            # the same averaged gradients on every rank: the same norm, the same clipped step
            grad_norm = torch.nn.utils.clip_grad_norm_(
                raw_model.parameters(), plan.max_norm if plan.max_norm > 0 else float("inf"))
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=False)  # zeroed in place: still DDP's bucket views
            scheduler.step()
            step, tokens_seen = step + 1, tokens_seen + plan.tokens_per_step
            epoch_end, done = i == plan.steps_per_epoch - 1, step == plan.total_steps

            flag = torch.tensor([stop_signal()])  # 0, or the SIGINT / SIGTERM this rank received
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=stop_group)  # NEW: every rank: stop now?
            stop = int(flag)
            log_due = step % plan.log_every == 0 or epoch_end or done or stop
            save_due = epoch_end or done or stop or (plan.save_every and step % plan.save_every == 0)
            if (log_due or save_due) and not scaler.is_enabled():  # (fp16 skips inf steps itself)
                check_finite(grad_norm.item(), step, plan)  # every rank's norm: all stop together
            if log_due:
                mean = torch.stack([loss_sum, torch.tensor(float(loss_count), device=device)])
                dist.all_reduce(mean)  # NEW: every rank: the loss summed over the ranks
                train_loss, loss_count = (mean[0] / mean[1]).item(), 0
                loss_sum.zero_()
                check_finite(train_loss, step, plan, "training loss")
                val_due = step % plan.eval_every == 0 or epoch_end or done
                with log.paused():  # evaluate the replica itself, outside DDP's machinery
                    val_loss = (evaluate(model.module, val_loader, device, amp_dtype,  # NEW: .module
                                         plan.eval_iters)
                                if val_due else None)
                    # the book's training loss: eval mode, the first batches of the epoch's order
                    eval_loss = (evaluate(model.module, train_loader, device, amp_dtype,
                                          plan.train_eval_iters)
                                 if val_due and plan.train_eval_iters else None)
                if rank == 0:  # NEW: global rank 0 alone writes: the replicas are identical
                    log.write(step, epoch, tokens_seen, train_loss, val_loss, grad_norm.item(),
                              scheduler.get_last_lr()[0], eval_loss)
            if save_due and rank == 0:  # NEW: one snapshot, written by one process
                with log.paused():  # at the end of an epoch it points at the next one
                    save_snapshot(plan, Position(step, epoch + 1, 0, tokens_seen) if epoch_end else
                                  Position(step, epoch, i + 1, tokens_seen),
                                  raw_model, optimizer, scheduler, scaler)
            if done or stop:
                break
        if rank == 0 and not stop:  # NEW: one sample, printed once
            with log.paused():
                print(f"sample: {sample_text(raw_model, plan, device)}", flush=True)
    return step, stop


# ---------------------------------------------------------------------------------------------
# One process of the job, and the launch.

def main(rank, world_size, plan, local_rank=None):  # NEW: runs in every process, with its rank
    """One process: set up, train, save, leave. Returns 0, or 128 + the signal that stopped it."""
    local_rank = rank if local_rank is None else local_rank  # one machine: the same
    device, stop_group, ddp_group = ddp_setup(rank, local_rank, world_size, plan)
    # Each node made its own plan (its --out, its text, its GPUs): do all ranks start alike?
    mine = torch.tensor([plan.resume_step, plan.n_tokens, AUTOCASTS.index(plan.autocast),
                         int(plan.autocast_chosen)], device=device)
    extremes = torch.cat([mine, -mine])
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX)  # NEW: every rank: the same start?
    plan = check_same_start(plan, lowest=(-extremes[4:]).tolist(), highest=extremes[:4].tolist())
    model, raw_model = build_model(plan, device, ddp_group)
    if rank == 0:
        print_plan(plan, count_parameters(raw_model))
    train_loader, val_loader = build_loaders(plan, rank)
    optimizer = configure_optimizer(raw_model, plan)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, plan))
    scaler = torch.amp.GradScaler(device.type, enabled=plan.autocast == "fp16")
    comm = {"calls": 0, "bytes": 0, "bf16": plan.grad_compression == "bf16"}
    model.register_comm_hook(comm, counting_allreduce_hook)  # NEW: count (or compress) all-reduces
    start, saved_world = (load_snapshot(plan, raw_model, optimizer, scheduler, scaler, device)
                          if plan.resume_from else (Position(), world_size))
    if plan.compile:  # compile now, outside any collective: each rank takes its own time
        compile_before_training(model, next(iter(train_loader)),
                                lambda x, y, m: calc_loss_batch(x, y, m, device, plan.amp_dtype))
        with waiting_for("every rank to compile the model", COMPILE_WAIT_S):
            # a wait with a bound of its own (an hour), not --timeout's
            dist.monitored_barrier(group=stop_group, timeout=COMPILE_WAIT)  # NEW: all compiled?
    log = Log(plan, start, comm)
    if rank == 0:
        log.begin(start, saved_world)
    step, stop = train(model, raw_model, optimizer, scheduler, scaler, train_loader, val_loader,
                       start, log, plan, device, rank, stop_group)
    digests = [None] * world_size
    dist.all_gather_object(digests, weights_sha256(raw_model))  # NEW: every rank: identical replicas?
    if len(set(digests)) != 1:  # NEW: DDP's promise, checked
        raise TrainingError(f"the replicas' weights differ after training ({digests}): "
                            f"this is a bug, please report it")
    if rank == 0:  # NEW: model.pt and loss.png, written once
        print(f"check: all {world_size} replicas hold identical weights (sha256 {digests[0][:16]})",
              flush=True)
        log.finish(raw_model, step, stop)
    dist.barrier()  # NEW: nobody exits (and so nobody gets killed) before rank 0 has saved
    dist.destroy_process_group()  # NEW: leave the process group cleanly
    return 128 + stop if stop else 0


if __name__ == "__main__":
    args = parse_args()
    with usage_errors():  # bad input: one line, exit code 2, before training starts
        if "RANK" not in os.environ:  # plain `python DDP-script-torchrun.py`: a job of one process
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                              MASTER_ADDR="127.0.0.1", MASTER_PORT=master_port("127.0.0.1"))
        # flags, checkpoint and data checked; local rank 0 tokenizes for its node, the others wait
        plan = make_plan(args, "DDP-script-torchrun.py",
                         launcher="torchrun" if "TORCHELASTIC_RUN_ID" in os.environ else "python")
    if args.check:  # --check: the checks above and the plan, then exit 0; no process starts
        check_and_exit(plan)
    # torchrun tells each process who it is: RANK in the whole job, LOCAL_RANK on its node
    run_and_exit(int(os.environ["RANK"]), main, plan.world_size, plan,  # NEW: rank from RANK
                 int(os.environ["LOCAL_RANK"]))
