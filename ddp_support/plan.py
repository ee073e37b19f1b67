"""The flags both scripts take, and the plan: every decision and check that can be made before
training starts, from the flags, the data and the checkpoint, made once (`make_plan`)."""
import dataclasses
import os

import torch

from data import batches_per_rank, prepare_tokens
from ddp_support.process import (ArgumentParser, HelpFormatter, UsageError, choose_backend,
                                 choose_device, launched_by_launcher)
from ddp_support.progress import check_weights_fit, snapshot_to_resume
from ddp_support.workarounds import cpu_has_bf16
from gpt_model import GPT_CONFIGS, hf_gpt2_config

SPAWN_SCRIPT = "DDP-script.py"  # the script that starts its own processes (--nprocs)
AUTOCASTS = ("off", "bf16", "fp16")  # Plan.autocast, as a number the ranks can compare


# What the flags leave open. A bare `python DDP-script.py` trains DEFAULT_MODEL; each model trains
# with its recipe. The book's chapter 5 (context 256, AdamW at a constant 4e-4, 10 epochs) for
# every model but gpt-mini, the CPU default, which learns the text visibly in about 90 s on 2 cores:
# 20 epochs at 1e-3, warmed up over 10% of the steps, then decayed to 1e-4 (appendix D's schedule).
DEFAULT_MODEL = {"cuda": "book-124m", "cpu": "gpt-mini"}
BOOK_RECIPE = {"context_length": 256, "lr": 4e-4, "epochs": 10, "warmup": 0.0, "min_lr": None}
RECIPES = {"gpt-mini": {"context_length": 128, "lr": 1e-3, "epochs": 20, "warmup": 0.1,
                        "min_lr": 1e-4}}
# How AdamW steps. The book's models (book-*) take chapter 5's: AdamW(model.parameters(),
# weight_decay=0.1), default betas, no clipping. The others GPT-2 practice: betas (0.9, 0.95), no
# decay on biases and LayerNorm, gradients clipped at norm 1. A snapshot keeps the one it began with.
OPTIMIZERS = {"book": {"betas": (0.9, 0.999), "decay": "all", "weight_decay": 0.1, "max_norm": 0.0},
              "gpt2": {"betas": (0.9, 0.95), "decay": "matrices", "weight_decay": 0.1,
                       "max_norm": 1.0}}


def optimizer_recipe(model):
    """The name of a model's optimizer recipe in OPTIMIZERS."""
    return "book" if model.startswith("book-") else "gpt2"


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
    g.add_argument("--check", action="store_true",
                   help="check the flags, the data and --out, print the plan, and exit (0, or 2 "
                        "with the error) before any process starts")
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
                        "128 for gpt-mini, by its recipe, and gpt-nano, whose context it is)")
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
                   help="linear warm-up over this many steps: step k (from 0) trains at "
                        "--lr x (k+1)/N, so the first at --lr/N and step N-1 at --lr (default: "
                        "none; 10%% of the steps for gpt-mini)")
    g.add_argument("--min-lr", type=float, default=None,
                   help="cosine decay from --lr to this at the last step (default: none, a "
                        "constant learning rate as in the book's chapter 5; 1e-4 for gpt-mini)")
    g.add_argument("--weight-decay", type=float, default=None, help="AdamW's (default: 0.1)")
    g.add_argument("--decay", choices=["all", "matrices"], default=None,
                   help="the parameters weight decay applies to: all (the book's), or matrices "
                        "and embeddings, not biases and LayerNorm (GPT-2 practice) (default: "
                        "all for book-* models, else matrices)")
    g.add_argument("--betas", type=float, nargs=2, default=None, metavar=("B1", "B2"),
                   help="AdamW's betas (default: 0.9 0.999, PyTorch's and the book's, for book-* "
                        "models; 0.9 0.95 for the others)")
    g.add_argument("--max-norm", type=float, default=None,
                   help="clip gradients to this norm; 0: no clipping (default: 0 for book-* "
                        "models, as the book's chapter 5; 1 for the others)")
    g.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto",
                   help="autocast precision; auto: bf16 where every GPU of the job has it, else "
                        "fp16; on CPUs bf16 where every one computes it natively (AVX512-BF16, "
                        "AMX), else off (default: auto)")
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
    g.add_argument("--train-eval-iters", type=int, default=0, metavar="N",
                   help="on validation steps, also the training loss as the book measures it: in "
                        "eval mode (no dropout), over the first N training batches per process "
                        "(0: off; the book uses 5)")
    g.add_argument("--sample-prompt", default="Every effort moves you",
                   help="prompt for the text sample printed after each epoch")
    g.add_argument("--sample-tokens", type=int, default=50, help="length of that sample")
    return p


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the run does, decided once before training: no flag is read after this. A field named
    as a flag holds what that flag sets; where the flag was left out, the model's recipe or the
    checkpoint fills it in (the comment says so). A decision that is more than its flag has a
    name of its own: device_type, autocast, peak_lr, final_lr, resume_from."""
    script: str              # DDP-script.py or DDP-script-torchrun.py
    launcher: str            # who started the processes: mp.spawn, torchrun, a launcher, python
    device_type: str         # "cuda" or "cpu" (from --device)
    backend: str             # "nccl" or "gloo" (from --backend)
    world_size: int
    timeout: float
    model: str               # a preset, "hf:NAME", or the checkpoint's (from --model)
    model_config: dict       # GPTModel's config dict: the preset's, --dropout applied
    init_from: str
    compile: bool
    data: list
    cache_dir: str
    val_ratio: float
    context_length: int      # the flag, or the recipe's (at most the model's)
    batch_size: int
    num_workers: int
    n_tokens: int            # of the tokenized text, both splits
    steps_per_epoch: int     # training batches per rank // --grad-accum
    epochs: int              # the flag, or the recipe's
    total_steps: int         # epochs x steps_per_epoch, at most --max-steps
    grad_accum: int
    peak_lr: float           # --lr, or the recipe's
    warmup_steps: int        # the flag, or the recipe's share of total_steps
    final_lr: float          # --min-lr, or the recipe's, or peak_lr (a constant rate)
    optimizer: str           # "book" or "gpt2": the recipe in OPTIMIZERS (the snapshot's when resuming)
    betas: tuple             # the flag, or the recipe's
    decay: str               # "all" or "matrices": the flag, or the recipe's
    weight_decay: float      # the flag, or the recipe's
    max_norm: float          # the flag, or the recipe's (the snapshot's when resuming)
    autocast: str            # "bf16", "fp16" or "off" (from --amp)
    autocast_chosen: bool    # by --amp auto
    grad_compression: str
    seed: int
    out: str
    ckpt_path: str
    resume_from: str         # the snapshot to continue from (--resume, or a torchrun restart), or None
    resume_step: int         # the step that snapshot was saved at (0 without one)
    save_every: int
    log_every: int
    eval_every: int
    eval_iters: int
    train_eval_iters: int
    sample_prompt: str
    sample_tokens: int

    @property
    def global_batch(self):
        """Sequences per optimizer step, all ranks."""
        return self.batch_size * self.world_size * self.grad_accum

    @property
    def amp_dtype(self):
        """autocast's dtype, or None for fp32 (torch.autocast's enabled=False)."""
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.autocast)

    @property
    def tokens_per_step(self):
        return self.global_batch * self.context_length

    def as_dict(self):
        """Plain values, so that a checkpoint holding them loads with weights_only=True."""
        return dataclasses.asdict(self)


def auto_autocast(device, gpus=()):
    """What --amp auto picks for these GPUs (indices), or for this CPU: "bf16", "fp16" or "off"."""
    if device == "cuda":
        # Ampere (compute capability 8) and later compute bf16; is_bf16_supported() also says
        # yes on older GPUs that emulate it slowly, and allocates on GPU 0 to find out.
        oldest = min(torch.cuda.get_device_capability(i)[0] for i in gpus)
        return "bf16" if oldest >= 8 else "fp16"
    return "bf16" if cpu_has_bf16() else "off"  # bf16 where the CPU computes it natively, else fp32


def make_plan(args, script, launcher):
    """Checks the flags, the checkpoint and the data (tokenizing the text, once: later calls find
    its token file) and decides everything else. Raises UsageError or DataError with a one-line
    message; creates nothing but the token file."""
    for name in ("batch_size", "grad_accum", "epochs", "log_every", "eval_every", "sample_tokens",
                 "max_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(args, name)}")
    if args.train_eval_iters < 0 or args.eval_iters < 0:
        raise UsageError("--eval-iters and --train-eval-iters must be >= 0")
    if args.betas is not None and not all(0.0 <= b < 1.0 for b in args.betas):
        raise UsageError(f"--betas must be in [0, 1), not {args.betas[0]:g} {args.betas[1]:g}")
    if not 0.0 < args.val_ratio < 1.0:
        raise UsageError(f"--val-ratio must be between 0 and 1, not {args.val_ratio}")
    if (args.lr is not None and args.lr <= 0) or (args.max_norm or 0) < 0 or \
            (args.weight_decay or 0) < 0 or args.timeout <= 0:
        raise UsageError("--lr and --timeout must be positive, --max-norm and --weight-decay >= 0")
    if (args.warmup_steps is not None and args.warmup_steps < 0) or \
            (args.min_lr is not None and args.min_lr < 0):
        raise UsageError("--warmup-steps and --min-lr must be >= 0")
    if args.dropout is not None and not 0.0 <= args.dropout < 1.0:
        raise UsageError(f"--dropout must be in [0, 1), not {args.dropout}")

    # Devices, backend and world size.
    device = choose_device(args.device)
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
        fix = (f"--nprocs {n_gpus} (or --nproc_per_node={n_gpus})" if script == SPAWN_SCRIPT
               else f"--nproc_per_node={n_gpus}")
        raise UsageError(f"{procs_here} processes on this machine but only {n_gpus} GPU(s) "
                         f"visible: use {fix}")
    backend = choose_backend(args.backend, device)

    # Precision. Parameters, gradients and the all-reduce stay fp32; autocast runs the matmuls.
    # The oldest of this node's GPUs that the job uses decides; between nodes, check_same_start
    # settles on what every rank computes: one precision for all.
    autocast = auto_autocast(device, range(procs_here)) if args.amp == "auto" else args.amp
    if autocast == "fp16" and device != "cuda":
        raise UsageError("--amp fp16 needs a CUDA GPU: use --amp bf16 or --amp off on the CPU")

    # The model: the checkpoint's own when resuming, else GPT-2 weights or a preset.
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    ckpt = snapshot_to_resume(ckpt_path, args.out, args.resume)  # the one read before training
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
    resume_from, resume_step = (ckpt_path, ckpt["step"]) if ckpt is not None else (None, 0)
    optimizer = optimizer_settings(args, model, ckpt)
    del ckpt
    if args.dropout is not None:
        model_config["drop_rate"] = args.dropout
    recipe = RECIPES.get(model, BOOK_RECIPE)
    max_context = model_config["context_length"]
    context_length = args.context_length
    if context_length is None:
        context_length = min(max_context, recipe["context_length"])
    if not 1 <= context_length <= max_context:
        raise UsageError(f"--context-length {context_length} is outside 1..{max_context}, "
                         f"the context of {model}: lower --context-length")

    # The data decides the length of an epoch; the length of the run decides the schedule.
    tokens = prepare_tokens(args.data, args.cache_dir)
    batches = batches_per_rank(tokens, args.val_ratio, context_length, args.batch_size, world_size)
    steps_per_epoch = batches // args.grad_accum
    if steps_per_epoch == 0:
        raise UsageError(f"each process gets {batches} batch(es) per epoch, fewer than "
                         f"--grad-accum {args.grad_accum}: lower --grad-accum or --batch-size, or "
                         f"pass more text with --data")
    epochs = recipe["epochs"] if args.epochs is None else args.epochs
    total_steps = epochs * steps_per_epoch
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    peak_lr = recipe["lr"] if args.lr is None else args.lr
    warmup_steps = (int(recipe["warmup"] * total_steps) if args.warmup_steps is None
                    else args.warmup_steps)
    final_lr = next(lr for lr in (args.min_lr, recipe["min_lr"], peak_lr) if lr is not None)
    return Plan(
        script=script, launcher=launcher, device_type=device, backend=backend,
        world_size=world_size, timeout=args.timeout, model=model, model_config=model_config,
        init_from=args.init_from, compile=args.compile, data=args.data, cache_dir=args.cache_dir,
        val_ratio=args.val_ratio, context_length=context_length, batch_size=args.batch_size,
        num_workers=args.num_workers, n_tokens=len(tokens), steps_per_epoch=steps_per_epoch,
        epochs=epochs, total_steps=total_steps, grad_accum=args.grad_accum, peak_lr=peak_lr,
        warmup_steps=warmup_steps, final_lr=final_lr, **optimizer,
        autocast=autocast, autocast_chosen=args.amp == "auto",
        grad_compression=args.grad_compression, seed=args.seed, out=args.out,
        ckpt_path=ckpt_path, resume_from=resume_from, resume_step=resume_step,
        save_every=args.save_every, log_every=args.log_every, eval_every=args.eval_every,
        eval_iters=args.eval_iters, train_eval_iters=args.train_eval_iters,
        sample_prompt=args.sample_prompt,
        sample_tokens=args.sample_tokens)


def optimizer_settings(args, model, ckpt):
    """The flags, or the model's recipe in OPTIMIZERS; when resuming, the snapshot's (a snapshot
    written before the recipes had names took GPT-2's). Its AdamW state holds the betas, the
    weight decay and the parameter groups: a flag may change the clipping only."""
    flags = {"betas": args.betas and tuple(args.betas), "decay": args.decay,
             "weight_decay": args.weight_decay, "max_norm": args.max_norm}
    if ckpt is None:
        name = optimizer_recipe(model)
        settings = {"optimizer": name, **OPTIMIZERS[name]}
    else:
        settings = {"optimizer": "gpt2", **OPTIMIZERS["gpt2"]}
        settings.update((k, ckpt["args"][k]) for k in list(settings) if k in ckpt["args"])
        settings["betas"] = tuple(settings["betas"])
        for key in ("betas", "decay", "weight_decay"):
            if flags[key] is not None and flags[key] != settings[key]:
                flag = "--" + key.replace("_", "-")
                raise UsageError(f"the snapshot in {args.out} trains with {flag} {settings[key]}, "
                                 f"not {flags[key]}: drop {flag}, or start a fresh run with a "
                                 f"new --out")
    settings.update((k, v) for k, v in flags.items() if v is not None)
    return settings


def check_same_start(plan, lowest, highest):
    """After the ranks compared (the step of the snapshot resumed from, the tokens of the text,
    the precision, whether --amp auto chose it): one line naming what differs between them, if
    anything does. Returns the plan all ranks train with: where --amp auto chose bf16 on some
    ranks and not on others, everybody trains in the other one (fp16 on GPUs, fp32 on CPUs),
    since bf16 and fp16 (or fp32) gradients must not meet in one all-reduce."""
    (step_lo, tokens_lo, amp_lo, auto_lo), (step_hi, tokens_hi, amp_hi, _) = lowest, highest
    if tokens_lo != tokens_hi:
        raise UsageError(f"the nodes hold different text ({tokens_lo:,} to {tokens_hi:,} tokens): "
                         f"pass the same --data on every node")
    if amp_lo != amp_hi:
        if not auto_lo:  # some node passed --amp itself
            raise UsageError(f"the nodes train in different precisions ({AUTOCASTS[amp_lo]} and "
                             f"{AUTOCASTS[amp_hi]}): pass the same --amp on every node, or --amp "
                             f"auto on all (the lowest precision that every rank computes)")
        lowest_amp = "off" if AUTOCASTS[amp_lo] == "off" else "fp16"  # bf16 is the other one
        plan = dataclasses.replace(plan, autocast=lowest_amp)
    if step_lo != step_hi:
        raise UsageError(f"the ranks found different snapshots in --out {plan.out} (steps "
                         f"{step_lo} to {step_hi}): --out must be a folder that every node shares, "
                         f"or start a fresh run with a new --out")
    return plan
