"""What a run keeps of its progress: the training position, the snapshot to resume from
(ckpt.pt), the log (its lines, metrics.jsonl, loss.png) and the final weights (model.pt).
Rank 0 writes; every rank reads a snapshot to resume. Nothing here talks to the other ranks."""
import contextlib
import dataclasses
import hashlib
import json
import os
import signal
import sys
import time

import torch

from ddp_support.process import TrainingError, UsageError, tune_process
from gpt_model import GPTModel, count_parameters, load_weights, pad_rows, unpadded


@dataclasses.dataclass(frozen=True)
class Position:
    """Where training stands: what a snapshot saves and a resume restores. steps_into_epoch
    counts optimizer steps of this run's size (the snapshot keeps samples, so that a run resumed
    at another world size skips the same data)."""
    step: int = 0
    epoch: int = 0
    steps_into_epoch: int = 0
    tokens_seen: int = 0


# ---------------------------------------------------------------------------------------------
# Snapshots

def read_snapshot(path):
    """A checkpoint, memory-mapped on the CPU (for the checks before training); UsageError if it
    cannot be read."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated or not a checkpoint at all
        raise UsageError(f"cannot read {path} ({type(e).__name__}); it is damaged: "
                         f"restore a good copy or start a fresh run with another --out")


def snapshot_to_resume(path, out, resume):
    """The checkpoint to resume from (memory-mapped), or None for a fresh run: with --resume, or
    after a torchrun restart. Refuses to overwrite a checkpoint without --resume."""
    exists = os.path.exists(path)
    restarts = os.environ.get("TORCHELASTIC_RUN_ID", "none") != "none"  # torchrun may restart us
    ckpt = read_snapshot(path) if exists and (resume or restarts) else None
    if ckpt is not None and (resume or restarted_by_torchrun(ckpt)):
        return ckpt
    if exists:
        raise UsageError(f"{path} already exists: pass --resume to continue that run, "
                         f"or choose another --out")
    if resume:
        raise UsageError(f"--resume: no checkpoint at {path}: run once without --resume, "
                         f"or point --out at the run to continue")
    check_writable(out)
    return None


def restarted_by_torchrun(ckpt):
    """Under `torchrun --max-restarts=R` a failed worker makes torchrun restart every worker.
    TORCHELASTIC_RESTART_COUNT > 0 says so; a node whose own workers were healthy may still see 0,
    so a snapshot written under the same rendezvous id (--rdzv-id) counts too."""
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        return True
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    return run_id != "none" and ckpt.get("run_id") == run_id


def check_writable(out):
    """--out, or the folder it would be made in, must be a writable folder (nothing is created)."""
    folder = os.path.abspath(out)
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise UsageError(f"--out {out} is not writable ({folder} is not a writable folder): "
                         f"choose another --out")


def check_weights_fit(ckpt, path, fix="resume with the version that wrote it, or start a "
                                      "fresh run with another --out"):
    """A checkpoint whose weights this gpt_model.py would not load (other names or shapes, as
    written by an older version of it) is refused before any process starts."""
    with torch.device("meta"):  # saved without the padding rows a GPU run adds (older: with)
        expected = GPTModel({**ckpt["config"], "pad_vocab_multiple": None}).state_dict()
        padded = GPTModel(ckpt["config"]).state_dict()
    saved = ckpt["model"]
    if set(saved) != set(expected) or any(saved[k].shape not in (expected[k].shape, padded[k].shape)
                                          for k in saved):
        raise UsageError(f"{path} holds weights this gpt_model.py cannot load (other parameter "
                         f"names or shapes, e.g. from an older version of it): {fix}")


def save_snapshot(plan, position, raw_model, optimizer, scheduler, scaler):
    """Rank 0: ckpt.pt, to resume from `position`."""
    save_checkpoint(plan.ckpt_path, {
        "model": clean_state_dict(raw_model), "optimizer": vocab_rows(
            optimizer.state_dict(), raw_model.tok_emb.weight.shape[0], plan.model_config["vocab_size"]),
        "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
        "step": position.step, "epoch": position.epoch, "tokens_seen": position.tokens_seen,
        "samples_in_epoch": position.steps_into_epoch * plan.global_batch,
        "world_size": plan.world_size, "config": plan.model_config, "args": plan.as_dict(),
        "run_id": os.environ.get("TORCHELASTIC_RUN_ID")})


def load_snapshot(plan, raw_model, optimizer, scheduler, scaler, device):
    """Every rank: restore the state in plan.resume_from; returns (position, the world size it
    was saved at)."""
    ckpt = torch.load(plan.resume_from, map_location=device, weights_only=True)
    load_weights(raw_model, ckpt["model"])
    optimizer.load_state_dict(vocab_rows(ckpt["optimizer"], plan.model_config["vocab_size"],
                                         raw_model.tok_emb.weight.shape[0]))
    scheduler.load_state_dict(ckpt["scheduler"])
    if ckpt["scaler"]:  # empty when saved without fp16: an fp16 run then starts a fresh scale
        scaler.load_state_dict(ckpt["scaler"])
    # Skip what the epoch already consumed, counted in optimizer steps of this run.
    epoch, skip = ckpt["epoch"], ckpt["samples_in_epoch"] // plan.global_batch
    if skip >= plan.steps_per_epoch:  # less than one step of this run is left there
        epoch, skip = epoch + 1, 0
    return Position(ckpt["step"], epoch, skip, ckpt["tokens_seen"]), ckpt["world_size"]


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
    one tensor, so a GPU run's files hold it once, as a CPU run's do; without the vocabulary's
    padding rows, so a GPU run's files hold 50257 rows, as a CPU run's (and the book's) do."""
    copies, state, vocab = {}, {}, raw_model.cfg["vocab_size"]
    for name, t in raw_model.state_dict().items():
        key = (t.data_ptr(), t.dtype, t.shape)
        if key not in copies:
            real = unpadded(name, t.detach(), vocab)
            copies[key] = real.cpu().clone() if real.shape != t.shape else real.cpu()
        state[name] = copies[key]
    return state


def vocab_rows(optimizer_state, rows, to_rows):
    """An optimizer state dict whose per-token moments (AdamW's, of the token embedding and the
    head: 2-D, `rows` rows) are cut or zero-padded to `to_rows`; the optimizer's own is untouched."""
    if rows == to_rows:
        return optimizer_state
    resized = {i: {k: pad_rows(t, to_rows).clone()
                   if torch.is_tensor(t) and t.dim() == 2 and t.shape[0] == rows else t
                   for k, t in entry.items()} for i, entry in optimizer_state["state"].items()}
    return {**optimizer_state, "state": resized}


def weights_sha256(raw_model):
    """A digest of every byte of the weights: equal digests, identical replicas."""
    digest = hashlib.sha256()
    for tensor in raw_model.state_dict().values():
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# The log

def print_plan(plan, n_params):
    """Rank 0, before training: the plan in seven lines."""
    threads = f", {torch.get_num_threads()} thread(s) per process" if plan.device_type == "cpu" else ""
    model = (f"model {plan.model}: {n_params:,} parameters, context {plan.context_length} (of "
             f"{plan.model_config['context_length']}), dropout {plan.model_config['drop_rate']}")
    model += f", from {plan.init_from}" if plan.init_from else ""
    model += ", compiled" if plan.compile else ""
    precision = "fp32" if plan.autocast == "off" else f"{plan.autocast} autocast"
    if plan.autocast_chosen and plan.autocast == "bf16" and plan.device_type == "cpu":
        precision += " (--amp auto: this CPU computes bf16 natively)"
    if plan.autocast_chosen and plan.autocast == "fp16":
        precision += " with a loss scaler (--amp auto: a GPU of the job lacks bf16)"
    wire = "bf16" if plan.grad_compression == "bf16" else "fp32"
    schedule = f"lr {plan.peak_lr:g}"
    schedule += f", {plan.warmup_steps} warm-up steps" if plan.warmup_steps else ""
    schedule += f", cosine to {plan.final_lr:g}" if plan.final_lr != plan.peak_lr else " constant"
    from ddp_support.plan import OPTIMIZERS  # (plan.py imports this module)
    recipe = {"book": "the book's chapter 5", "gpt2": "GPT-2's"}[plan.optimizer]
    if any(getattr(plan, k) != v for k, v in OPTIMIZERS[plan.optimizer].items()):
        recipe += ", changed by flags"
    adamw = (f"optimizer: AdamW ({recipe}): betas {plan.betas[0]:g}/{plan.betas[1]:g}, weight "
             f"decay {plan.weight_decay:g} on "
             f"{'every parameter' if plan.decay == 'all' else 'matrices and embeddings'}, ")
    adamw += f"clip {plan.max_norm:g}" if plan.max_norm else "no clipping"
    lines = [
        f"world size {plan.world_size} ({plan.backend} on {plan.device_type}{threads}), started by "
        f"{plan.launcher}",
        model,
        f"precision: {precision}, fp32 weights and gradients, {wire} all-reduce",
        f"batch: {plan.batch_size} x {plan.context_length} tokens per process, x {plan.world_size}"
        f" process(es) x {plan.grad_accum} accumulation = {plan.global_batch} sequences,"
        f" {plan.tokens_per_step:,} tokens per step",
        f"{plan.steps_per_epoch} steps per epoch, {plan.total_steps} steps in all; {schedule}",
        adamw,
        f"writing to {plan.out}",
    ]
    print("\n".join("plan: " + line for line in lines), flush=True)


def check_and_exit(plan):
    """--check, once the plan is made (flags, data and --out checked): the plan as training would
    print it, the model counted on the meta device (no memory, no weights), then exit 0. No
    process is started and no process group formed; nothing is written but the token file."""
    if os.environ.get("RANK", "0") == "0":  # under a launcher: one plan, not one per process
        tune_process(torch.device(plan.device_type), plan.world_size)  # the threads it will use
        with torch.device("meta"):
            print_plan(plan, count_parameters(GPTModel(plan.model_config)))
        print(f"check: the flags, the data ({plan.n_tokens:,} tokens) and --out {plan.out} are "
              f"fine; nothing was started (--check)", flush=True)
    sys.exit(0)


class Log:
    """Rank 0's account of the run: a line every --log-every steps and its row in metrics.jsonl,
    tokens/s (leaving out the time spent in `paused()` blocks: evaluation, snapshots, samples),
    and at the end model.pt and loss.png. Other ranks may hold one and never write."""

    def __init__(self, plan, start, comm):
        self.plan, self.comm, self.start_step = plan, comm, start.step
        self.metrics_path = os.path.join(plan.out, "metrics.jsonl")
        self.t_start = self.t_log = time.time()
        self.paused_s = 0.0
        self.step_log, self.calls_log, self.bytes_log = start.step, 0, 0

    def begin(self, start, saved_world):
        """Rank 0, before the first step: --out exists; after a resume, say from where, and drop
        the log lines of the steps that will be trained again."""
        os.makedirs(self.plan.out, exist_ok=True)
        if self.plan.resume_from:
            moved = ("" if saved_world == self.plan.world_size else
                     f"; saved at world size {saved_world}, now {self.plan.world_size}: the data "
                     f"order differs from the original run")
            print(f"resumed from step {start.step} (epoch {start.epoch + 1}, "
                  f"{start.steps_into_epoch} step(s) into it){moved}", flush=True)
        keep_metrics_until(self.metrics_path, start.step)  # step 0: a fresh log

    @contextlib.contextmanager
    def paused(self):
        """Time spent on work that is not training, left out of tokens/s."""
        t0 = time.time()
        yield
        self.paused_s += time.time() - t0

    def write(self, step, epoch, tokens_seen, train_loss, val_loss, grad_norm, lr, eval_loss=None):
        """Rank 0: the log line and its row in metrics.jsonl. train_loss: the mean over the steps
        since the last line, in training mode; eval_loss: the book's (--train-eval-iters)."""
        now, n = time.time(), max(1, step - self.step_log)
        record = {"step": step, "epoch": epoch + 1, "tokens_seen": tokens_seen,
                  "train_loss": train_loss, "val_loss": val_loss, "lr": lr,
                  "train_loss_eval_mode": eval_loss,
                  "tokens_per_sec": self.plan.tokens_per_step * n / max(
                      now - self.t_log - self.paused_s, 1e-9),
                  "grad_norm": grad_norm, "elapsed_s": now - self.t_start,
                  "allreduce_calls_per_step": (self.comm["calls"] - self.calls_log) / n,
                  "allreduce_mb_per_step": (self.comm["bytes"] - self.bytes_log) / n / 2**20}
        eta = record["elapsed_s"] / max(1, step - self.start_step) * (self.plan.total_steps - step)
        val = "-" if val_loss is None else f"{val_loss:.3f}"
        train = f"{train_loss:.3f}" + ("" if eval_loss is None else f" (eval mode {eval_loss:.3f})")
        print(f"epoch {epoch + 1} step {step}/{self.plan.total_steps}: train {train}, "
              f"val {val}, lr {lr:.2e}, {record['tokens_per_sec']:,.0f} tok/s, "
              f"{record['elapsed_s']:.0f}s elapsed, eta {eta:.0f}s", flush=True)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.step_log, self.calls_log, self.bytes_log = step, self.comm["calls"], self.comm["bytes"]
        self.t_log, self.paused_s = time.time(), 0.0  # writing this line counts as paused

    def finish(self, raw_model, step, stop):
        """Rank 0, after training: model.pt and loss.png, or where a stopped run can resume."""
        if stop:
            print(f"stopped by {signal.Signals(stop).name} after step {step}; "
                  f"{self.plan.ckpt_path} holds it: add --resume to continue", flush=True)
            return
        path = os.path.join(self.plan.out, "model.pt")
        torch.save({"config": self.plan.model_config, "model": clean_state_dict(raw_model)}, path)
        plot_losses(self.plan.out)
        print(f"done: {step} steps; weights in {path}", flush=True)


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
    book = [r for r in rows if r.get("train_loss_eval_mode") is not None]
    if book:  # --train-eval-iters
        ax.plot([r["tokens_seen"] for r in book], [r["train_loss_eval_mode"] for r in book], ":",
                label="train, eval mode (the book's)")
    ax.set_xlabel("tokens seen (all processes)")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "loss.png"), dpi=100)
    plt.close(fig)
