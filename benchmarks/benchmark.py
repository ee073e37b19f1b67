"""Performance benchmark for the training scripts: one run, markdown tables on stdout, JSON on disk.

    python benchmarks/benchmark.py                      # the defaults below; JSON to ./benchmark.json
    python benchmarks/benchmark.py --skip-compile --json out/bench.json   # without torch.compile
    python benchmarks/benchmark.py --quick              # tiny sizes, for the test suite

Sections:
1. Ceiling: the device's measured matmul rate (fp32, bf16), MFU's denominator, beside the
   datasheet's dense peak for known GPUs.
2. Training-step throughput of one process (no DDP): tokens/s, step time and its phases, peak
   memory, MFU, for fp32 and bf16 autocast, with and without torch.compile. The step is the
   scripts' own: DDP-script.py's calc_loss_batch and configure_optimizer, clipping at 1.0,
   optimizer.step, zero_grad(set_to_none=True). Each configuration runs in a fresh process, so
   its peak memory is its own.
3. DDP weak scaling: the real DDP-script.py at world size 1 and 2 (or 1..GPUs), the same batch per
   process, gradient accumulation 1 and 4, figures read from its metrics.jsonl. Beside it, the
   all-reduce alone: W processes all-reduce one buffer the size of the gradients (fp32, and bf16
   as --grad-compression bf16 sends it), which bounds what overlap with backward can hide.
4. Baseline: the book's chapter-4/5 model and step (benchmarks/book_model.py), timed interleaved
   with ours as the scripts run it by default (--amp auto, no compile).

FLOPs per token are 6*N + 12*n_layers*emb_dim*T (N: parameters without the position embedding),
so MFU = tokens/s * FLOPs per token / measured matmul rate of the matching precision (bf16 for
bf16 autocast; fp32, or TF32 on CUDA where the scripts turn TF32 on, for fp32).
CPU timings are disturbed by anything else running: the report says how much CPU other processes
used meanwhile.
"""
import argparse
import concurrent.futures
import contextlib
import importlib.util
import json
import math
import os
import platform
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from book_model import BookGPTModel, book_loss_batch, book_optimizer  # noqa: E402
from gpt_model import GPT_CONFIGS, GPTModel, count_parameters  # noqa: E402
from ddp_support.plan import OPTIMIZERS, make_plan  # noqa: E402
from ddp_support.process import usage_errors  # noqa: E402
from ddp_support.workarounds import keep_freed_memory  # noqa: E402

VOCAB = 50257
RESULT_MARK = "BENCHMARK-RESULT "

# Datasheet dense peaks (TFLOP/s, no sparsity), matched in this order against the device name.
GPU_PEAKS = [
    ("H200 NVL", {"gpu": "H200 NVL", "fp32": 60.0, "tf32": 417.5, "bf16": 835.0}),
    ("H200", {"gpu": "H200", "fp32": 67.0, "tf32": 494.7, "bf16": 989.0}),
    ("H100 NVL", {"gpu": "H100 NVL", "fp32": 60.0, "tf32": 417.5, "bf16": 835.0}),
    ("H100 PCIe", {"gpu": "H100 PCIe", "fp32": 51.0, "tf32": 378.0, "bf16": 756.0}),
    ("H100", {"gpu": "H100 SXM", "fp32": 67.0, "tf32": 494.7, "bf16": 989.0}),
    ("A100", {"gpu": "A100", "fp32": 19.5, "tf32": 156.0, "bf16": 312.0}),
]

# Launcher variables that must not leak from the caller into the runs this benchmark starts.
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                 "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_RUN_ID", "GROUP_RANK")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--json", default="benchmark.json", metavar="PATH",
                   help="where to write the figures (default: ./benchmark.json)")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes (gpt-nano, context 32, few steps, matmul 256), no compile")
    g = p.add_argument_group("1. ceiling")
    g.add_argument("--matmul-size", type=int, default=None,
                   help="n of the n x n x n product (default: 8192 on GPUs, enough to fill an "
                        "H100 or H200; 2048 on the CPU)")
    g.add_argument("--matmul-reps", type=int, default=7, help="timings; the median counts")
    g = p.add_argument_group("2. one process")
    g.add_argument("--preset", choices=list(GPT_CONFIGS), default="gpt2-small")
    g.add_argument("--context", type=int, default=256)
    g.add_argument("--batch", type=int, default=2)
    g.add_argument("--dropout", type=float, default=None,
                   help="drop rate for sections 2 and 4 (default: the preset's, as the scripts)")
    g.add_argument("--steps", type=int, default=6, help="timed steps per configuration")
    g.add_argument("--warmup", type=int, default=5,
                   help="untimed steps first: compilation happens in the first, and on the CPU "
                        "the heap grows (fresh pages, page faults) for the first few")
    g.add_argument("--skip-compile", action="store_true",
                   help="no torch.compile configurations (compiling takes about a minute each on "
                        "a 2-core CPU)")
    g.add_argument("--configs", nargs="+", choices=["fp32", "bf16", "fp32+compile", "bf16+compile"],
                   default=None, help="exactly these configurations (default: all four, or the "
                                      "first two with --skip-compile)")
    g.add_argument("--no-tf32", action="store_true",
                   help="CUDA: fp32 matmuls at full precision (the scripts enable TF32 on CUDA)")
    g.add_argument("--profile", action="store_true",
                   help="also profile one step per eager configuration: time by kind of operator")
    g.add_argument("--worker-timeout", type=float, default=3600,
                   help="seconds allowed to one configuration's process")
    g = p.add_argument_group("3. DDP weak scaling")
    g.add_argument("--skip-scaling", action="store_true")
    g.add_argument("--scaling-preset", choices=list(GPT_CONFIGS), default=None,
                   help="default: gpt-mini on the CPU, --preset on GPUs")
    g.add_argument("--scaling-context", type=int, default=None, help="default: 128 on the CPU")
    g.add_argument("--scaling-batch", type=int, default=None, help="default: 4 on the CPU")
    g.add_argument("--scaling-worlds", type=int, nargs="+", default=None,
                   help="world sizes (default: 1 2 on the CPU, 1 2 4 .. GPUs on CUDA)")
    g.add_argument("--scaling-accum", type=int, nargs="+", default=[1, 4])
    g.add_argument("--scaling-amp", choices=["off", "bf16", "fp16"], default=None,
                   help="--amp for the runs (default: what the script picks here, as --ours-amp)")
    g.add_argument("--scaling-intervals", type=int, default=7,
                   help="log intervals counted per run, after the warm-up")
    g.add_argument("--scaling-warmup-steps", type=int, default=8,
                   help="optimizer steps left out at the start of each run, rounded up to whole "
                        "log intervals (at least one): processes that start together run slowly "
                        "for their first seconds")
    g.add_argument("--scaling-micro", type=int, default=4,
                   help="micro-batches per log interval (steps per interval = this / accumulation)")
    g.add_argument("--scaling-repeats", type=int, default=3,
                   help="runs of each (world size, accumulation), alternated; their log intervals "
                        "are pooled")
    g.add_argument("--scaling-script-args", default="", metavar="ARGS",
                   help="more flags for DDP-script.py, e.g. \"--grad-compression bf16\"")
    g.add_argument("--scaling-timeout", type=float, default=900, help="seconds allowed to one run")
    g.add_argument("--allreduce-reps", type=int, default=10,
                   help="timings of the all-reduce alone; the median counts")
    g = p.add_argument_group("4. baseline")
    g.add_argument("--skip-baseline", action="store_true")
    g.add_argument("--ours-amp", choices=["off", "bf16", "fp16"], default=None,
                   help="autocast of ours (default: what the scripts' make_plan picks here)")
    g.add_argument("--rounds", type=int, default=4, help="interleaved rounds (ours, baseline)")
    g.add_argument("--round-steps", type=int, default=2, help="steps of each model per round")
    p.add_argument("--report-from", default=None, metavar="PATH",
                   help="print the markdown report of a saved JSON (also of a run cut short)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one config
    args = p.parse_args(argv)
    if args.matmul_size is None:
        args.matmul_size = 8192 if args.device == "cuda" or (
            args.device == "auto" and torch.cuda.is_available()) else 2048
    if args.quick:
        args.preset, args.context, args.batch, args.steps, args.warmup = "gpt-nano", 32, 2, 3, 1
        args.matmul_size, args.matmul_reps = 256, 5
        args.skip_compile = True
        args.scaling_preset, args.scaling_context, args.scaling_batch = "gpt-nano", 32, 2
        args.scaling_intervals, args.scaling_micro, args.scaling_repeats = 2, 4, 1
        args.scaling_warmup_steps = 1
        args.rounds, args.round_steps, args.allreduce_reps = 2, 1, 3
    return args


# ---------------------------------------------------------------------------------------------
# Helpers

def load_script():
    """DDP-script.py as a module (its name has a hyphen, so no plain import)."""
    spec = importlib.util.spec_from_file_location("ddp_script", ROOT / "DDP-script.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def script_plan(script, device, preset, context, dropout):
    """What the scripts' make_plan decides for one process on this device: amp and model config."""
    out = tempfile.mkdtemp(prefix="bench-plan-")
    try:
        argv = ["--device", device, "--nprocs", "1", "--model", preset, "--context-length",
                str(context), "--out", os.path.join(out, "run")]
        if dropout is not None:
            argv += ["--dropout", str(dropout)]
        plan = make_plan(script.parse_args(argv), "DDP-script.py", launcher="benchmark")
        return plan.autocast, plan.model_config
    finally:
        shutil.rmtree(out, ignore_errors=True)


def cpu_busy_seconds():
    """CPU time the whole machine spent busy since boot, all cores (/proc/stat)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    return 0.0


def own_cpu_seconds():
    """CPU time of this process and of every process it started (they have all been waited for)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def machine_info(device):
    info = {"device": device, "torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count()}
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            text = f.read()
        for line in text.splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        flags = next((l.split(":", 1)[1].split() for l in text.splitlines()
                      if l.startswith("flags")), [])
        info["cpu_bf16"] = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    info["allocator_env"] = {k: os.environ[k] for k in ("GLIBC_TUNABLES", "LD_PRELOAD",
                                                        "MALLOC_CONF") if k in os.environ}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_count"] = torch.cuda.device_count()
        info["cuda"] = torch.version.cuda
    return info


def datasheet_peak(device):
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in GPU_PEAKS if key in name), None)


def flops_per_token(model, cfg, context):
    """6N + 12 * layers * emb_dim * T, N the parameters that multiply: neither embedding lookup
    counts (the token table counts once, as the head, where the two are tied)."""
    n = count_parameters(model, exclude_position_embedding=True)
    if model.out_head.weight is not model.tok_emb.weight:
        n -= cfg["vocab_size"] * cfg["emb_dim"]
    return 6 * n + 12 * cfg["n_layers"] * cfg["emb_dim"] * context, n


class Clock:
    """Time marks: perf_counter on the CPU, CUDA events on a GPU (no synchronization until read)."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, a, b):
        if self.cuda:
            torch.cuda.synchronize()
            return a.elapsed_time(b) / 1000.0
        return b - a


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    # the repository first; what PYTHONPATH held already (the tests' fault hooks, say) after it
    env.update(PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_command(cmd, env, timeout, cwd=ROOT):
    """Run a command in its own process group; on timeout kill the whole group. Returns
    (returncode, stdout, stderr)."""
    proc = subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise RuntimeError(f"timed out after {timeout:g}s: {' '.join(map(str, cmd))}\n"
                           f"{out[-2000:]}\n{err[-2000:]}")
    finally:
        with contextlib.suppress(ProcessLookupError):  # nothing the command started outlives it
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, out, err


# ---------------------------------------------------------------------------------------------
# 1. Ceiling

def matmul_rate(device, dtype, n, reps):
    """Measured n x n x n matmul rate in TFLOP/s: warmed up, median of `reps` timings."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    clock = Clock(device)

    def timed(k):
        start = clock.mark()
        for _ in range(k):
            torch.mm(a, b)
        return clock.seconds(start, clock.mark())

    timed(2)  # warm-up
    inner = max(1, math.ceil(0.05 / max(timed(1), 1e-6)))  # at least ~50 ms per timing
    times = sorted(timed(inner) / inner for _ in range(reps))
    return 2 * n ** 3 / statistics.median(times) / 1e12


def measure_ceiling(device, args, ceiling=None):
    """Matmul rates per precision. Called at the start and again at the end of the benchmark: the
    higher of the two medians counts, since anything else running can only lower a rate."""
    dev = torch.device(device)
    rates = {"fp32": matmul_rate(dev, torch.float32, args.matmul_size, args.matmul_reps),
             "bf16": matmul_rate(dev, torch.bfloat16, args.matmul_size, args.matmul_reps)}
    if device == "cuda":  # TF32: what fp32 matmuls run as in the scripts on CUDA (ddp_setup)
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            rates["tf32"] = matmul_rate(dev, torch.float32, args.matmul_size, args.matmul_reps)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old
    ceiling = ceiling or {"n": args.matmul_size, "reps": args.matmul_reps,
                          "peak": datasheet_peak(device), "runs": []}
    ceiling["runs"].append(rates)
    for precision in ("fp32", "bf16", "tf32"):
        values = [run[precision] for run in ceiling["runs"] if precision in run]
        ceiling[f"{precision}_tflops"] = max(values) if values else None
    return ceiling


def measured(rows):
    """The rows of a section that have figures (not those that record an error)."""
    return [r for r in rows or [] if "error" not in r]


def first_line(error):
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def add_mfu(result):
    """MFU of each configuration of section 2, against the ceiling of its matmul precision."""
    ceiling = result.get("ceiling")
    if not ceiling or "error" in ceiling:
        return
    for r in measured(result.get("single")):
        precision = r["matmul_precision"]
        peak = (ceiling["peak"] or {}).get(precision)
        r["mfu"] = r["achieved_tflops"] / ceiling[f"{precision}_tflops"]
        r["mfu_vs_datasheet"] = r["achieved_tflops"] / peak if peak else None


class OtherLoad:
    """How much CPU other processes used since start(), in cores (0.5: half a core on average)."""

    def start(self):
        self.busy, self.own, self.t = cpu_busy_seconds(), own_cpu_seconds(), time.perf_counter()

    def share(self):
        others = (cpu_busy_seconds() - self.busy) - (own_cpu_seconds() - self.own)
        return max(0.0, others) / max(time.perf_counter() - self.t, 1e-9)


# ---------------------------------------------------------------------------------------------
# 2 and 4. Training steps, in a worker process of their own (python benchmark.py --worker SPEC)

def current_rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def random_batch(spec, device):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, VOCAB, (spec["batch"], spec["context"]), generator=g)
    y = torch.randint(0, VOCAB, (spec["batch"], spec["context"]), generator=g)
    if device.type == "cuda":  # as the scripts' DataLoader (pin_memory=True), moved in the step
        x, y = x.pin_memory(), y.pin_memory()
    return x, y


class OursStep:
    """One optimizer step exactly as DDP-script.py takes it (no DDP, no accumulation)."""

    def __init__(self, script, spec, device, compile_model):
        torch.manual_seed(0)
        self.raw = GPTModel(spec["model_config"]).to(device)
        self.model = torch.compile(self.raw) if compile_model else self.raw
        # GPT-2's optimizer recipe (the book's differs in its betas and groups, not in time),
        # with the book's learning rate
        self.optimizer = script.configure_optimizer(self.raw, types.SimpleNamespace(
            peak_lr=4e-4, **OPTIMIZERS["gpt2"]))
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(spec["amp"])
        self.script, self.device, self.tf32 = script, device, spec["tf32"]
        self.model.train()

    def forward(self, x, y):
        return self.script.calc_loss_batch(x, y, self.model, self.device, self.amp_dtype)

    def parameters(self):
        return self.raw.parameters()


class BookStep:
    """The book's step: fp32, book model, chapter-5 loss and plain AdamW."""

    def __init__(self, spec, device):
        torch.manual_seed(0)
        cfg = {k: v for k, v in spec["model_config"].items() if k != "pad_vocab_multiple"}
        self.model = BookGPTModel(cfg).to(device)
        self.optimizer = book_optimizer(self.model)
        self.device, self.tf32 = device, False
        self.model.train()

    def forward(self, x, y):
        return book_loss_batch(x, y, self.model, self.device)

    def parameters(self):
        return self.model.parameters()


def set_tf32(on):
    """DDP-script.py's ddp_setup turns TF32 on for CUDA; the book's code leaves it off."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = on


def train_steps(stepper, x, y, n, clock):
    """n optimizer steps; returns the time marks of each: start, loss, backward, clip, optimizer.
    Nothing waits for the device inside (no .item()), so the steps queue up as in training."""
    set_tf32(stepper.tf32)
    marks = []
    for _ in range(n):
        m = [clock.mark()]
        loss = stepper.forward(x, y)
        m.append(clock.mark())
        loss.backward()
        m.append(clock.mark())
        torch.nn.utils.clip_grad_norm_(stepper.parameters(), 1.0)
        m.append(clock.mark())
        stepper.optimizer.step()
        stepper.optimizer.zero_grad(set_to_none=True)
        m.append(clock.mark())
        marks.append(m)
    return marks


PHASES = ("forward", "backward", "clip", "optimizer")


def step_times(marks, clock):
    """Per step: total seconds and the seconds of each phase."""
    rows = []
    for m in marks:
        row = {"step": clock.seconds(m[0], m[-1])}
        row.update({name: clock.seconds(m[i], m[i + 1]) for i, name in enumerate(PHASES)})
        rows.append(row)
    return rows


OP_KINDS = [  # (kind, test on the operator name without "aten::"), first match wins
    ("loss (log-softmax, nll)", lambda n: any(k in n for k in ("log_softmax", "nll_loss",
                                                               "cross_entropy"))),
    ("attention (sdpa, softmax, mask)", lambda n: "attention" in n or "softmax" in n
     or n.startswith("masked_fill")),
    ("matmul", lambda n: n in ("mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "addmv", "mv",
                               "_addmm_activation") or n.startswith("mkldnn")),
    ("layernorm", lambda n: "layer_norm" in n),
    ("gelu", lambda n: "gelu" in n),
    ("dropout", lambda n: "dropout" in n or "bernoulli" in n),
    ("embedding", lambda n: "embedding" in n),
    ("dtype casts, copies", lambda n: n in ("to", "_to_copy", "copy_", "clone", "contiguous")),
]


def profile_step(stepper, x, y, device):
    """Forward and backward of one step under torch.profiler: self time by kind of operator (s)."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        loss = stepper.forward(x, y)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
    stepper.optimizer.zero_grad(set_to_none=True)
    kinds = {}
    for event in prof.key_averages():
        if device.type == "cuda":
            if not str(event.device_type).endswith("CPU"):
                continue  # a kernel: its time is counted already in the operator that launched it
            us = getattr(event, "self_device_time_total", None)
            us = event.self_cuda_time_total if us is None else us
        else:
            us = event.self_cpu_time_total
        name = event.key.removeprefix("aten::")
        kind = next((k for k, test in OP_KINDS if test(name)), "other (elementwise, autograd)")
        kinds[kind] = kinds.get(kind, 0.0) + us / 1e6
    return kinds


def summarize(rows, tokens):
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    return {"step_time_s": med["step"], "tokens_per_sec": tokens / med["step"],
            "phases_s": {k: med[k] for k in PHASES}}


def peak_memory(device, rss_before):
    if device.type == "cuda":
        return {"peak_mem_mb": torch.cuda.max_memory_allocated() / 2**20,
                "peak_mem_method": "torch.cuda.max_memory_allocated"}
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"peak_mem_mb": peak_rss - rss_before, "peak_rss_mb": peak_rss,
            "peak_mem_method": "peak RSS (ru_maxrss) of a fresh process minus its RSS before the "
                               "model was built"}


def worker(spec):
    """One configuration of section 2 (kind "step"), the interleaved comparison of section 4
    (kind "interleave") or section 3's all-reduce alone (kind "allreduce"), in this fresh process.
    Returns a dict of figures."""
    if spec["kind"] == "allreduce":
        return allreduce_alone(spec)
    device = torch.device(spec["device"])
    script = load_script()
    if device.type == "cpu":  # as ddp_setup does; in the interleaved run the baseline gains too
        keep_freed_memory()
    x, y = random_batch(spec, device)
    tokens = spec["batch"] * spec["context"]
    clock = Clock(device)
    rss_before = current_rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    result = {"threads": torch.get_num_threads()}

    if spec["kind"] == "step":
        stepper = OursStep(script, spec, device, spec["compile"])
        result["flops_per_token"], result["params"] = flops_per_token(
            stepper.raw, spec["model_config"], spec["context"])
        t0 = time.perf_counter()
        train_steps(stepper, x, y, 1, clock)
        if device.type == "cuda":
            torch.cuda.synchronize()
        result["first_step_s"] = time.perf_counter() - t0  # includes compilation
        train_steps(stepper, x, y, max(0, spec["warmup"] - 1), clock)
        before = resource.getrusage(resource.RUSAGE_SELF)
        rows = step_times(train_steps(stepper, x, y, spec["steps"], clock), clock)
        after = resource.getrusage(resource.RUSAGE_SELF)
        result.update(summarize(rows, tokens))
        # Where the CPU time went: user (compute) or system (mostly page faults: memory that
        # the allocator gave back to the kernel and takes again, zeroed, every step).
        result["cpu_user_s_per_step"] = (after.ru_utime - before.ru_utime) / spec["steps"]
        result["cpu_sys_s_per_step"] = (after.ru_stime - before.ru_stime) / spec["steps"]
        result["minor_faults_per_step"] = (after.ru_minflt - before.ru_minflt) / spec["steps"]
        result.update(peak_memory(device, rss_before))
        if spec.get("profile") and not spec["compile"]:
            result["profile_s"] = profile_step(stepper, x, y, device)
        return result

    # Interleaved: ours as the scripts run it by default, then the book's, round after round.
    ours, book = OursStep(script, spec, device, False), BookStep(spec, device)
    for stepper in (ours, book):
        train_steps(stepper, x, y, spec["warmup"], clock)
    rounds = []
    for _ in range(spec["rounds"]):
        row = {}
        for name, stepper in (("ours", ours), ("baseline", book)):
            times = step_times(train_steps(stepper, x, y, spec["round_steps"], clock), clock)
            row[name] = tokens * len(times) / sum(t["step"] for t in times)
        rounds.append(row)
    ours_tps = statistics.median(r["ours"] for r in rounds)
    base_tps = statistics.median(r["baseline"] for r in rounds)
    result.update({"ours_tokens_per_sec": ours_tps, "baseline_tokens_per_sec": base_tps,
                   "ratio": ours_tps / base_tps, "rounds": rounds,
                   "ours_params": count_parameters(ours.raw),
                   "baseline_params": sum(p.numel() for p in book.model.parameters())})
    return result


def run_worker(spec, timeout, env=None):
    cmd = [sys.executable, Path(__file__).resolve(), "--worker", json.dumps(spec)]
    code, out, err = run_command(cmd, env or clean_env(), timeout)
    lines = [l for l in out.splitlines() if l.startswith(RESULT_MARK)]
    if code != 0 or not lines:
        raise RuntimeError(f"worker {spec['kind']} {spec.get('name', '')} failed (exit {code}):\n"
                           f"{out[-3000:]}\n{err[-3000:]}")
    return json.loads(lines[-1][len(RESULT_MARK):])


def allreduce_proc(rank, spec, init_method, queue):
    """One of allreduce_alone's processes: times dist.all_reduce of a gradient-sized buffer."""
    cuda = spec["device"] == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(1)  # as the scaling runs
    dist.init_process_group("nccl" if cuda else "gloo", init_method=init_method, rank=rank,
                            world_size=spec["world"])
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    times = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        buffer = torch.ones(spec["numel"], dtype=dtype, device=device)
        runs = []
        for _ in range(spec["warmup"] + spec["reps"]):
            dist.barrier()
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            dist.all_reduce(buffer)
            if cuda:
                torch.cuda.synchronize()
            runs.append(time.perf_counter() - t0)
        times[f"{name}_ms"] = statistics.median(runs[spec["warmup"]:]) * 1000
    if rank == 0:
        queue.put(times)
    dist.destroy_process_group()


def allreduce_alone(spec):
    """spec["world"] processes (Gloo on the CPU, NCCL on GPUs), rendezvous through a file, not a
    port; rank 0's median times."""
    store = tempfile.mkdtemp(prefix="bench-allreduce-")
    try:
        queue = mp.get_context("spawn").SimpleQueue()
        mp.spawn(allreduce_proc, args=(spec, f"file://{store}/rendezvous", queue),
                 nprocs=spec["world"])
        return queue.get()
    finally:
        shutil.rmtree(store, ignore_errors=True)


CONFIGS = {"fp32": ("off", False), "bf16": ("bf16", False),  # name: (--amp, torch.compile)
           "fp32+compile": ("off", True), "bf16+compile": ("bf16", True)}


def single_configs(device, args):
    if args.configs:
        names = args.configs
    else:
        names = ["fp32", "bf16"] + ([] if args.skip_compile else ["fp32+compile", "bf16+compile"])
    return [(name,) + CONFIGS[name] for name in names]


def uses_tf32(device, args, amp):
    return device == "cuda" and amp == "off" and not args.no_tf32


def measure_single(device, args, model_config):
    rows = []
    for name, amp, compiled in single_configs(device, args):
        spec = {"kind": "step", "name": name, "device": device, "amp": amp, "compile": compiled,
                "model_config": model_config, "context": args.context, "batch": args.batch,
                "steps": args.steps, "warmup": args.warmup, "profile": args.profile,
                "tf32": not args.no_tf32}
        t0 = time.perf_counter()
        try:
            r = run_worker(spec, args.worker_timeout)
        except Exception as e:  # record it and go on: the other configurations still count
            rows.append({"name": name, "error": first_line(e)})
            print(f"  {name}: failed: {first_line(e)}", file=sys.stderr, flush=True)
            continue
        # MFU's denominator (add_mfu): the measured rate of the precision the matmuls ran in.
        precision = "bf16" if amp in ("bf16", "fp16") else (
            "tf32" if uses_tf32(device, args, amp) else "fp32")
        r.update({"name": name, "amp": amp, "compile": compiled, "matmul_precision": precision,
                  "achieved_tflops": r["tokens_per_sec"] * r["flops_per_token"] / 1e12,
                  "wall_s": time.perf_counter() - t0})
        rows.append(r)
        print(f"  {name}: {r['tokens_per_sec']:,.0f} tokens/s, {r['step_time_s'] * 1000:,.0f} ms "
              f"per step", file=sys.stderr, flush=True)
    return rows


def measure_baseline(device, args, model_config, ours_amp):
    spec = {"kind": "interleave", "device": device, "amp": ours_amp, "model_config": model_config,
            "context": args.context, "batch": args.batch, "warmup": args.warmup,
            "rounds": args.rounds, "round_steps": args.round_steps, "tf32": not args.no_tf32}
    t0 = time.perf_counter()
    r = run_worker(spec, args.worker_timeout)
    r.update({"ours_amp": ours_amp, "ours_compile": False, "baseline_amp": "off",
              "wall_s": time.perf_counter() - t0})
    return r


# ---------------------------------------------------------------------------------------------
# 3. DDP weak scaling with the real script

def scaling_settings(device, args):
    if device == "cuda":
        worlds = args.scaling_worlds or [w for w in (1, 2, 4, 8, 16)
                                         if w <= torch.cuda.device_count()]
        defaults = (args.preset, args.context, args.batch)
    else:
        worlds = args.scaling_worlds or [1, 2]
        defaults = ("gpt-mini", 128, 4)
    worlds = sorted(set(worlds) | {1})  # efficiency is measured against world size 1
    return (args.scaling_preset or defaults[0], args.scaling_context or defaults[1],
            args.scaling_batch or defaults[2], worlds)


def scaling_intervals(args, accum):
    """Steps per log interval, and how many intervals at the start of a run are warm-up."""
    log_every = max(1, args.scaling_micro // accum)
    return log_every, max(1, math.ceil(args.scaling_warmup_steps / log_every))


def scaling_run(device, args, env, corpus, out, world, accum, amp, sizes, independent=False):
    """One DDP-script.py run at world size `world`, or with `independent`, `world` single-process
    runs at once, which share nothing: what the machine itself allows W processes (cores, memory
    bandwidth, clock speed) without any DDP. Returns each run's metrics.jsonl rows, in a list."""
    preset, context, batch = sizes
    log_every, warm = scaling_intervals(args, accum)

    def one(nprocs, out):
        cmd = [sys.executable, ROOT / "DDP-script.py", "--device", device, "--nprocs", nprocs,
               "--model", preset, "--context-length", context, "--batch-size", batch,
               "--dropout", "0", "--grad-accum", accum, "--amp", amp, "--epochs", 1000,
               "--max-steps", log_every * (warm + args.scaling_intervals),
               "--log-every", log_every,
               "--eval-every", 100000, "--eval-iters", 1, "--sample-tokens", 1,
               "--data", corpus, "--out", out] + shlex.split(args.scaling_script_args)
        code, stdout, stderr = run_command(cmd, env, args.scaling_timeout)
        if code != 0:
            raise RuntimeError(f"DDP-script.py failed (exit {code}) at world size {world}, "
                               f"accumulation {accum}:\n{stdout[-3000:]}\n{stderr[-3000:]}")
        with open(out / "metrics.jsonl") as f:
            return [json.loads(line) for line in f if line.strip()]

    if not independent:
        return [one(world, out)]
    with concurrent.futures.ThreadPoolExecutor(world) as pool:
        return list(pool.map(lambda i: one(1, out / f"copy{i}"), range(world)))


def measure_scaling(device, args, amp, tmp):
    preset, context, batch, worlds = scaling_settings(device, args)
    # The shipped text repeated, so that no epoch ends inside the measured steps (an epoch end
    # evaluates, samples and saves; the script leaves that time out of tokens/s, but not all of
    # its cost, and the short default text would end an epoch every step or two).
    text = (ROOT / "assets" / "the-verdict.txt").read_text(encoding="utf-8")
    micro_batches = max(log_every * (warm + args.scaling_intervals + 1) * accum
                        for accum in args.scaling_accum
                        for log_every, warm in [scaling_intervals(args, accum)])
    needed = micro_batches * batch * context * max(worlds)
    copies = 2 + math.ceil(needed / (0.9 * 5000))  # the text is about 5,100 tokens
    corpus = tmp / "corpus.txt"
    corpus.write_text("\n".join([text] * copies), encoding="utf-8")
    env = clean_env(GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1",
                    GPT_DDP_CACHE=tmp / "token-cache")
    # On the CPU, also W independent processes at once for each W > 1 (on GPUs each would take
    # GPU 0): the bound that the machine sets, so that DDP's own cost shows apart from it.
    kinds = [(w, False) for w in worlds] + [(w, True) for w in worlds
                                            if w > 1 and device == "cpu"]
    if device == "cpu":
        env["OMP_NUM_THREADS"] = "1"  # one thread per process: W processes on W cores
    # Log intervals after the first (warm-up) of each run, pooled over the repeats. The kinds
    # of run alternate (1 2 2-independent 1 2 ...) so that a slow spell hits them alike.
    intervals = {(w, a, ind): [[] for _ in range(w if ind else 1)]  # rows of each process run
                 for a in args.scaling_accum for w, ind in kinds}
    walls = {key: 0.0 for key in intervals}
    for repeat in range(args.scaling_repeats):
        for accum in args.scaling_accum:
            for world, independent in kinds:
                t0 = time.perf_counter()
                name = f"scaling-w{world}-a{accum}-r{repeat}" + ("-independent" * independent)
                runs = scaling_run(device, args, env, corpus, tmp / name, world, accum, amp,
                                   (preset, context, batch), independent)
                warm = scaling_intervals(args, accum)[1]
                counted = [metrics[warm:] or metrics for metrics in runs]
                for pooled, metrics in zip(intervals[world, accum, independent], counted):
                    pooled += metrics
                walls[world, accum, independent] += time.perf_counter() - t0
                tps = sum(statistics.median(m["tokens_per_sec"] for m in metrics)
                          for metrics in counted)
                print(f"  world {world}{' (independent processes)' * independent}, accumulation "
                      f"{accum}, run {repeat + 1}: {tps:,.0f} tokens/s", file=sys.stderr,
                      flush=True)
    rows = []
    for (world, accum, independent), runs in intervals.items():
        # the rate of W independent processes is the sum of theirs
        tps = sum(statistics.median(m["tokens_per_sec"] for m in metrics) for metrics in runs)
        every = [m for metrics in runs for m in metrics]
        rows.append({
            "world": world, "grad_accum": accum, "independent": independent,
            "runs": args.scaling_repeats, "intervals": len(every), "tokens_per_sec": tps,
            "interval_tokens_per_sec": [[m["tokens_per_sec"] for m in metrics] for metrics in runs],
            "per_process_tokens_per_sec": tps / world,
            "allreduce_calls_per_step": statistics.median(m["allreduce_calls_per_step"]
                                                          for m in every),
            "allreduce_mb_per_step": statistics.median(m["allreduce_mb_per_step"] for m in every),
            "wall_s": walls[world, accum, independent]})
    for row in rows:  # weak scaling: per-process throughput against world size 1
        base = next(r for r in rows if r["world"] == 1 and r["grad_accum"] == row["grad_accum"])
        row["efficiency"] = row["per_process_tokens_per_sec"] / base["per_process_tokens_per_sec"]
    for row in rows:  # DDP against the machine's bound: W processes that do not communicate
        bound = next((r for r in rows if r["independent"] and r["world"] == row["world"]
                      and r["grad_accum"] == row["grad_accum"]), None)
        row["of_independent"] = (row["tokens_per_sec"] / bound["tokens_per_sec"]
                                 if bound and not row["independent"] else None)
    alone = allreduce_rows(device, args, preset, context, worlds, env)
    for row in rows:  # what the all-reduce would cost if it overlapped none of the step
        ar = next((a for a in alone if a["world"] == row["world"]), None)
        base = next(r for r in rows if r["world"] == 1 and r["grad_accum"] == row["grad_accum"])
        step_ms = 1000 * batch * context * row["grad_accum"] / base["per_process_tokens_per_sec"]
        row["no_overlap_bound"] = (step_ms / (step_ms + ar["fp32_ms"])
                                   if ar and not row["independent"] else None)
    return {"preset": preset, "context": context, "batch": batch, "amp": amp, "worlds": worlds,
            "threads_per_process": 1 if device == "cpu" else None,
            "script_args": args.scaling_script_args,
            "warmup_intervals": {accum: scaling_intervals(args, accum)[1]
                                 for accum in args.scaling_accum},
            "data": f"assets/the-verdict.txt x {copies} (no epoch end inside the measured steps)",
            "rows": rows, "allreduce_alone": alone}


def allreduce_rows(device, args, preset, context, worlds, env):
    """For each world size above 1: all-reduce alone of one buffer with as many elements as the
    model has gradients (DDP splits them into buckets; their sum is this)."""
    _, config = script_plan(load_script(), device, preset, context, 0.0)
    with torch.device("meta"):
        numel = sum(p.numel() for p in GPTModel(config).parameters())
    rows = []
    for world in (w for w in worlds if w > 1):
        spec = {"kind": "allreduce", "device": device, "world": world, "numel": numel,
                "warmup": 3, "reps": args.allreduce_reps}
        times = run_worker(spec, args.scaling_timeout, env)
        rows.append({"world": world, "numel": numel, "mb": numel * 4 / 2**20,
                     "reps": args.allreduce_reps, **times})
        print(f"  all-reduce alone, world {world}: {times['fp32_ms']:.1f} ms fp32, "
              f"{times['bf16_ms']:.1f} ms bf16", file=sys.stderr, flush=True)
    return rows


# ---------------------------------------------------------------------------------------------
# Report

def fmt(x, digits=3):
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    if isinstance(x, float) and not math.isfinite(x):
        return "nan"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def targets(result):
    """The performance issue's targets, set for the 2-core CPU machine (rows only for what ran)."""
    single = {r["name"]: r for r in measured(result.get("single")) if "mfu" in r}
    rows = []
    scaling = (result.get("scaling") or {}).get("rows", [])
    for accum in sorted({r["grad_accum"] for r in scaling}):
        effs = [r["efficiency"] for r in scaling
                if r["grad_accum"] == accum and r["world"] > 1 and not r["independent"]]
        if effs:
            rows.append((f"DDP efficiency, accumulation {accum}", min(effs), 0.92))
    if "fp32" in single:
        rows.append(("fp32 MFU (of measured fp32 matmul)", single["fp32"]["mfu"], 0.75))
    if result.get("bf16_over_fp32") is not None:
        rows.append(("bf16 / fp32 tokens/s", result["bf16_over_fp32"], 1.7))
    if result.get("baseline"):
        rows.append(("ours / book baseline tokens/s", result["baseline"]["ratio"], 1.5))
    return [{"target": name, "measured": value, "goal": goal,
             "met": bool(value >= goal) if math.isfinite(value) else False}
            for name, value, goal in rows]


def report(result):
    m, c = result["machine"], result.get("ceiling")
    out = ["# Training benchmark", ""]
    where = m.get("gpu") or m["cpu"]
    out.append(f"Machine: {where} ({m['device']}); torch {m['torch']}"
               + (f", CUDA {m['cuda']}" if m.get("cuda") else "")
               + f"; {m['threads']} thread(s), {m['cpu_count']} CPU core(s)"
               + (f"; CPU bf16: {', '.join(m['cpu_bf16']) or 'none'}" if "cpu_bf16" in m else "")
               + "".join(f"; {k}={v}" for k, v in m["allocator_env"].items()))
    load = result["other_cpu_load"]
    runtime = (f"Total runtime: {result['runtime_s']:.0f} s." if "runtime_s" in result
               else "The run was cut short: only the sections below finished.")
    out.append(f"{runtime} CPU used by other processes meanwhile, in cores: "
               + ", ".join(f"{k} {v:.2f}" for k, v in load.items())
               + (" (disturbed: rerun on an idle machine)" if max(load.values()) > 0.1 else ""))
    if result.get("errors"):
        out += ["", "Failed (every other figure below stands): " + "; ".join(
            f"{e['section']}: {e['error']}" for e in result["errors"])]
    if c:
        out += ["", f"## 1. Ceiling: {c['n']}^3 matmul, median of {c['reps']} timings, at the "
                    f"start and at the end (the higher counts)", ""]
        peak = c["peak"] or {}
        names = {"fp32": "fp32", "bf16": "bf16", "tf32": "tf32 (fp32 matmuls in the scripts on CUDA)"}
        rows = [[label, c[f"{p}_tflops"]] + [run.get(p) for run in c["runs"]] + [peak.get(p)]
                for p, label in names.items() if c[f"{p}_tflops"] is not None]
        out.append(table(["precision", "TFLOP/s"] + [f"run {i + 1}" for i in range(len(c["runs"]))]
                         + ["datasheet dense TFLOP/s"], rows))

    s = result.get("settings", {})
    single = measured(result.get("single"))
    if single:
        out += ["", f"## 2. One process: {s['preset']}, context {s['context']}, batch {s['batch']}, "
                    f"dropout {s['dropout']} ({s['steps']} timed steps after {s['warmup']})", ""]
        rows = [[r["name"], r["tokens_per_sec"], r["step_time_s"] * 1000, r["peak_mem_mb"],
                 r["achieved_tflops"], f"{r['mfu']:.1%}" if r.get("mfu") else "-",
                 f"{r['mfu_vs_datasheet']:.1%}" if r.get("mfu_vs_datasheet") else "-",
                 r["first_step_s"]] for r in single]
        out.append(table(["config", "tokens/s", "step ms", "peak MB", "TFLOP/s", "MFU",
                          "MFU (datasheet)", "first step s"], rows))
        out += ["", f"FLOPs per token {single[0]['flops_per_token']:,} "
                    f"(N = {single[0]['params']:,}). Peak memory: "
                    f"{single[0]['peak_mem_method']}."]
        if result.get("bf16_over_fp32") is not None:
            out.append(f"bf16 / fp32 tokens/s: {result['bf16_over_fp32']:.2f}")
        out += ["", "Step phases (median ms), and CPU time and page faults per step:", ""]
        rows = [[r["name"]] + [r["phases_s"][p] * 1000 for p in PHASES]
                + [r["cpu_user_s_per_step"], r["cpu_sys_s_per_step"], r["minor_faults_per_step"]]
                for r in single]
        out.append(table(["config", "forward + loss", "backward", "clip", "optimizer + zero_grad",
                          "user CPU s", "system CPU s", "minor page faults"], rows))
        profiled = [r for r in single if r.get("profile_s")]
        if profiled:
            kinds = sorted({k for r in profiled for k in r["profile_s"]},
                           key=lambda k: -profiled[0]["profile_s"].get(k, 0))
            out += ["", "Forward + backward by kind of operator (profiler self time, ms):", ""]
            rows = [[k] + [r["profile_s"].get(k, 0) * 1000 for r in profiled] for k in kinds]
            out.append(table(["kind"] + [r["name"] for r in profiled], rows))

    if result.get("scaling"):
        sc = result["scaling"]
        out += ["", f"## 3. DDP weak scaling: DDP-script.py, {sc['preset']}, context {sc['context']}, "
                    f"batch {sc['batch']} per process, amp {sc['amp']}"
                    + (", 1 thread per process" if sc["threads_per_process"] else ""), ""]
        if sc.get("warmup_intervals"):
            out += ["Tokens/s of a process: the median of its log intervals, pooled over "
                    f"{sc['rows'][0]['runs']} run(s) of each kind, each run's warm-up left out ("
                    + ", ".join(f"{n} interval(s) at accumulation {a}"
                                for a, n in sc["warmup_intervals"].items()) + ").", ""]
        rows = [[f"{r['world']} x world 1, independent" if r["independent"] else r["world"],
                 r["grad_accum"], r["tokens_per_sec"], r["per_process_tokens_per_sec"],
                 f"{r['efficiency']:.3f}",
                 f"{r['of_independent']:.3f}" if r["of_independent"] else "-",
                 r["allreduce_calls_per_step"], r["allreduce_mb_per_step"]]
                for r in sorted(sc["rows"], key=lambda r: (r["grad_accum"], r["world"],
                                                           r["independent"]))]
        out.append(table(["processes", "accum", "tokens/s", "per process", "efficiency",
                          "of independent", "all-reduce calls/step", "all-reduce MB/step"], rows))
        for a in sc.get("allreduce_alone", []):
            steps = [(r["grad_accum"], r["no_overlap_bound"]) for r in sc["rows"]
                     if r["world"] == a["world"] and r["no_overlap_bound"] is not None]
            out += ["", f"All-reduce alone, {a['world']} processes, one buffer of "
                        f"{a['numel']:,} elements (the gradients' count), median of {a['reps']}: "
                        f"{a['fp32_ms']:.1f} ms as fp32 ({a['mb']:.1f} MB), {a['bf16_ms']:.1f} ms "
                        f"as bf16 (what `--grad-compression bf16` sends). One process's step "
                        f"plus this fp32 all-reduce, not overlapped, gives efficiency "
                        + ", ".join(f"{b:.3f} at accumulation {acc}" for acc, b in sorted(steps))
                        + "."]
        if any(r["independent"] for r in sc["rows"]):
            out += ["", "Efficiency: per-process tokens/s against one process. \"Independent\": "
                        "that many single-process runs at once, sharing nothing, so their "
                        "efficiency is the machine's own limit; \"of independent\": DDP's "
                        "tokens/s against them, the cost of DDP itself."]

    if result.get("baseline"):
        b = result["baseline"]
        out += ["", f"## 4. Ours (amp {b['ours_amp']}, as the scripts run by default) vs the book's "
                    f"step, interleaved, {len(b['rounds'])} rounds", ""]
        rows = [["ours", b["ours_tokens_per_sec"], b["ours_params"]],
                ["book baseline", b["baseline_tokens_per_sec"], b["baseline_params"]]]
        out.append(table(["model", "tokens/s (median of rounds)", "parameters"], rows))
        out += ["", f"ours / baseline: {b['ratio']:.2f}"]

    if result.get("targets"):
        out += ["", "## Targets of the performance issue (set for the 2-core CPU machine)", ""]
        rows = [[t["target"], t["measured"], t["goal"], "yes" if t["met"] else "no"]
                for t in result["targets"]]
        out.append(table(["target", "measured", "goal", "met"], rows))
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------

def save_json(result, path):
    """Written after every section, so a run cut short still leaves what it measured."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        print(RESULT_MARK + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    if args.report_from:
        try:
            with open(args.report_from) as f:
                saved = json.load(f)
        except (OSError, ValueError) as e:
            print(f"error: cannot read {args.report_from} ({type(e).__name__}): pass the JSON that "
                  f"--json wrote", file=sys.stderr)
            return 2
        print(report(saved))
        return 0
    # On SIGTERM (a `timeout`, say) exit through run_command's cleanup, which kills the process
    # group of the run in progress: its processes are in a session of their own.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    t_start = time.perf_counter()
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    script = load_script()
    with usage_errors():  # the scripts' own checks: one line, exit code 2
        plan_amp, model_config = script_plan(script, device, args.preset, args.context,
                                             args.dropout)
    ours_amp = args.ours_amp or plan_amp
    result = {"machine": machine_info(device),
              "settings": {"preset": args.preset, "context": args.context, "batch": args.batch,
                           "dropout": model_config["drop_rate"], "steps": args.steps,
                           "warmup": args.warmup, "quick": args.quick, "ours_amp": ours_amp,
                           "plan_run_amp": plan_amp, "model_config": model_config},
              "other_cpu_load": {}}
    load, whole = OtherLoad(), OtherLoad()
    whole.start()

    def section(name, title, measure, load_key=None):
        """One section; if it fails, its error is recorded and the next one runs."""
        print(title, file=sys.stderr, flush=True)
        load.start()
        try:
            result[name] = measure()
        except Exception as e:
            result.setdefault("errors", []).append({"section": title, "error": first_line(e)})
            print(f"  failed: {first_line(e)}", file=sys.stderr, flush=True)
        result["other_cpu_load"][load_key or name] = load.share()
        add_mfu(result)
        save_json(result, args.json)

    section("ceiling", "1. matmul ceiling", lambda: measure_ceiling(device, args))
    section("single", "2. one process", lambda: measure_single(device, args, model_config))
    for r in result.get("single", []):
        if "error" in r:
            result.setdefault("errors", []).append({"section": f"2. one process, {r['name']}",
                                                    "error": r["error"]})
    by_name = {r["name"]: r for r in measured(result.get("single"))}
    if "fp32" in by_name and "bf16" in by_name:
        result["bf16_over_fp32"] = (by_name["bf16"]["tokens_per_sec"]
                                    / by_name["fp32"]["tokens_per_sec"])
    if "fp32+compile" in by_name and "bf16+compile" in by_name:
        result["bf16_over_fp32_compiled"] = (by_name["bf16+compile"]["tokens_per_sec"]
                                             / by_name["fp32+compile"]["tokens_per_sec"])
    if not args.skip_scaling:
        with tempfile.TemporaryDirectory(prefix="bench-scaling-") as tmp:
            section("scaling", "3. DDP weak scaling",
                    lambda: measure_scaling(device, args, args.scaling_amp or ours_amp, Path(tmp)))
    if not args.skip_baseline:
        section("baseline", "4. baseline, interleaved",
                lambda: measure_baseline(device, args, model_config, ours_amp))
    section("ceiling", "1. matmul ceiling, again",
            lambda: measure_ceiling(device, args, result.get("ceiling")), "ceiling again")
    result["targets"] = targets(result) if device == "cpu" else []
    result["runtime_s"] = time.perf_counter() - t_start
    result["other_cpu_load"]["whole run"] = whole.share()
    save_json(result, args.json)
    print(report(result), flush=True)
    return 1 if result.get("errors") else 0  # every figure above still stands


if __name__ == "__main__":
    sys.exit(main())
