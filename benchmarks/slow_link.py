"""What a slow link between two nodes costs: DDP-script-torchrun.py on 2 nodes x 1 process, each
node in its own network namespace, the two joined by a veth pair shaped with tbf.

    sudo python benchmarks/slow_link.py                 # gpt-mini; about 8 minutes on 2 cores
    sudo python benchmarks/slow_link.py --quick         # gpt-nano, 2 links, 2 configs: ~1 minute

For each link rate (no limit, then e.g. 1 Gbit/s, 300 Mbit/s, 100 Mbit/s; tbf on both ends, as it
shapes only what an interface sends) and each way to send the gradients (fp32, --grad-compression
bf16, --grad-accum 4, both), it reports:
- tokens/s of the 2-node job, and its efficiency: tokens/s per process against the same
  configuration in one process (no all-reduce over the link);
- the bytes all-reduced per optimizer step, as the script counts them (allreduce_mb_per_step in
  metrics.jsonl: one round of gradient buckets per step, whatever the accumulation);
- the all-reduce of those bytes timed alone over the same link (one buffer, Gloo, as DDP's
  buckets add up to), and what the ring all-reduce model predicts: 2 (N-1)/N * bytes / rate;
- the step time, and how much longer a step takes than in one process.

Each node's process is started as torchrun starts its workers (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR = node 0's veth address, GLOO_SOCKET_IFNAME = the node's veth); torchrun's agent
adds nothing per step. Needs root (ip netns, tc); prints one line and exits where it cannot.
Nothing is configured in the host's own network namespace.
"""
import argparse
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

RESULT_MARK = "SLOW-LINK-RESULT "
SCRIPT = ROOT / "DDP-script-torchrun.py"
CONFIGS = {  # name: (--grad-compression, --grad-accum multiplier: 1 or --accum)
    "fp32": ("none", False), "bf16": ("bf16", False),
    "accum": ("none", True), "bf16+accum": ("bf16", True)}
HZ = 100  # tbf's burst must be at least rate/HZ; 100 is the lowest HZ a kernel has, so safe


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="gpt-nano, context 32, batch 2; no limit and 100 Mbit/s; fp32 and "
                        "bf16+accum; 1 warm-up and 2 timed steps (for the test suite)")
    p.add_argument("--json", default="runs/slow-link.json", metavar="PATH")
    p.add_argument("--preset", default="gpt-mini")
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--batch", type=int, default=4, help="sequences per process per micro-batch")
    p.add_argument("--amp", default="auto", help="the scripts' --amp (auto: bf16 on this CPU)")
    p.add_argument("--accum", type=int, default=4, help="the accumulation of the accum configs")
    p.add_argument("--rates", nargs="+", default=["0", "1gbit", "300mbit", "100mbit"],
                   help="link rates (0: no limit); units kbit, mbit, gbit")
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    p.add_argument("--warmup-steps", type=int, default=4, help="steps left out at the start")
    p.add_argument("--steps", type=int, default=4, help="timed steps (their median counts)")
    p.add_argument("--allreduce-reps", type=int, default=3, help="timed all-reduces alone")
    p.add_argument("--timeout", type=float, default=900, help="seconds allowed to one run")
    p.add_argument("--allreduce-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.preset, args.context, args.batch = "gpt-nano", 32, 2
        args.rates, args.configs = ["0", "100mbit"], ["fp32", "bf16+accum"]
        args.warmup_steps, args.steps, args.allreduce_reps = 1, 2, 1
    args.rate_bits = [parse_rate(r) for r in args.rates]
    return args


def parse_rate(text):
    text = text.lower().removesuffix("/s").removesuffix("ps")
    for unit, scale in (("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3), ("bit", 1)):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * scale
    return float(text)


def rate_name(bits):
    if not bits:
        return "no limit"
    return f"{bits / 1e9:g} Gbit/s" if bits >= 1e9 else f"{bits / 1e6:g} Mbit/s"


# ---------------------------------------------------------------------------------------------
# The all-reduce alone: one process in each namespace (python slow_link.py --allreduce-worker).

def allreduce_worker(spec):
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=int(os.environ["RANK"]), world_size=2)
    result = {}
    for name, numel in spec["buffers"].items():
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
        buffer = torch.zeros(numel, dtype=dtype)
        times = []
        for _ in range(1 + spec["reps"]):  # the first is warm-up
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(buffer)
            times.append(time.perf_counter() - t0)
        result[f"{name}_ms"] = statistics.median(times[1:]) * 1000
    if dist.get_rank() == 0:
        print(RESULT_MARK + json.dumps(result), flush=True)
    dist.destroy_process_group()
    return 0


# ---------------------------------------------------------------------------------------------
# Runs

def node_env(base, link, node, world, port):
    env = dict(base, RANK=str(node), LOCAL_RANK="0", WORLD_SIZE=str(world), LOCAL_WORLD_SIZE="1",
               MASTER_ADDR=link.addr[0], MASTER_PORT=str(port),
               GLOO_SOCKET_IFNAME=link.ifname[node])
    return env


def run_nodes(link, argv_of_node, base_env, world, timeout):
    """argv_of_node(node) in namespace node, for node < world, started together; returns the
    (returncode, stdout, stderr) of each. Everything left in the namespaces is killed."""
    procs, files = [], []
    try:
        for node in range(world):
            files.append((tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")))
            procs.append(subprocess.Popen(
                link.cmd(node, argv_of_node(node)), cwd=ROOT, text=True,
                env=node_env(base_env, link, node, world, 29500), stdout=files[-1][0],
                stderr=files[-1][1], start_new_session=True))
        deadline = time.time() + timeout
        for p in procs:
            try:
                p.wait(timeout=max(1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"timed out after {timeout:g}s: {shlex.join(p.args)}") from None
        results = []
        for p, (out, err) in zip(procs, files):
            out.seek(0)
            err.seek(0)
            results.append((p.returncode, out.read(), err.read()))
        return results
    finally:
        for node in range(world):
            link.kill(node)
        for p in procs:
            p.wait()
        for out, err in files:
            out.close()
            err.close()


def train(link, args, config, world, out, base_env, corpus):
    compression, accumulate = CONFIGS[config]
    accum = args.accum if accumulate else 1
    steps = args.warmup_steps + args.steps

    def argv(node):
        return [sys.executable, SCRIPT, "--device", "cpu", "--model", args.preset,
                "--context-length", args.context, "--batch-size", args.batch, "--dropout", 0,
                "--amp", args.amp, "--grad-accum", accum, "--grad-compression", compression,
                "--epochs", 1000, "--max-steps", steps, "--log-every", 1,
                "--eval-every", 10**9, "--eval-iters", 1, "--sample-tokens", 1,
                "--data", corpus, "--out", out]
    results = run_nodes(link, lambda node: [str(a) for a in argv(node)], base_env, world,
                        args.timeout)
    for code, stdout, stderr in results:
        if code != 0:
            raise RuntimeError(f"{config} at world size {world} failed (exit {code}):\n"
                               f"{stdout[-2000:]}\n{stderr[-3000:]}")
    with open(out / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    timed = [r for r in rows if r["step"] > args.warmup_steps] or rows
    tps = statistics.median(r["tokens_per_sec"] for r in timed)
    tokens_per_step = args.batch * args.context * accum * world
    return {"config": config, "world": world, "grad_accum": accum, "compression": compression,
            "tokens_per_sec": tps, "per_process_tokens_per_sec": tps / world,
            "step_ms": 1000 * tokens_per_step / tps,
            "step_tokens_per_sec": [r["tokens_per_sec"] for r in timed],
            "allreduce_mb_per_step": statistics.median(r["allreduce_mb_per_step"] for r in timed),
            "allreduce_calls_per_step": statistics.median(r["allreduce_calls_per_step"]
                                                          for r in timed)}


def allreduce_alone(link, args, buffers, base_env):
    spec = json.dumps({"buffers": buffers, "reps": args.allreduce_reps})
    results = run_nodes(link, lambda node: [sys.executable, str(Path(__file__).resolve()),
                                            "--allreduce-worker", spec],
                        base_env, 2, args.timeout)
    for code, stdout, stderr in results:
        if code != 0:
            raise RuntimeError(f"the all-reduce alone failed (exit {code}):\n{stderr[-3000:]}")
    line = next(l for l in results[0][1].splitlines() if l.startswith(RESULT_MARK))
    return json.loads(line[len(RESULT_MARK):])


def ring_ms(mb, rate_bits, world=2):
    """The ring all-reduce moves 2 (N-1)/N of the buffer through each node's link."""
    if not rate_bits:
        return None
    return 1000 * 2 * (world - 1) / world * mb * 2**20 / (rate_bits / 8)


def measure(args, link, tmp):
    from benchmark import clean_env
    base_env = clean_env(OMP_NUM_THREADS="1", GPT_DDP_CACHE=tmp / "token-cache",
                         TMPDIR=tmp)
    # The shipped text repeated, so that no epoch ends (evaluates, samples, saves) in the run.
    text = (ROOT / "assets" / "the-verdict.txt").read_text(encoding="utf-8")
    needed = (args.warmup_steps + args.steps + 1) * args.accum * args.batch * args.context * 2
    corpus = tmp / "corpus.txt"
    corpus.write_text("\n".join([text] * (2 + math.ceil(needed / (0.9 * 5000)))), encoding="utf-8")

    single = {}
    for config in args.configs:  # one process, no link: the reference (tokenizes, too)
        single[config] = train(link, args, config, 1, tmp / f"single-{config}", base_env, corpus)
        print(f"  1 process, {config}: {single[config]['tokens_per_sec']:,.0f} tokens/s",
              file=sys.stderr, flush=True)
    rows, alone = [], []
    for bits in args.rate_bits:
        if bits:
            link.shape(bits, hz=HZ)
        else:
            link.unshape()
        found = []
        for config in args.configs:
            row = train(link, args, config, 2, tmp / f"{int(bits)}-{config}", base_env, corpus)
            base = single[config]
            row.update(rate_bits=bits, link=rate_name(bits),
                       efficiency=row["per_process_tokens_per_sec"] / base["tokens_per_sec"],
                       single_step_ms=base["step_ms"],
                       extra_ms_per_step=row["step_ms"] - base["step_ms"],
                       ring_model_ms=ring_ms(row["allreduce_mb_per_step"], bits))
            rows.append(row)
            found.append(row)
            print(f"  {rate_name(bits)}, {config}: {row['tokens_per_sec']:,.0f} tokens/s, "
                  f"efficiency {row['efficiency']:.2f}", file=sys.stderr, flush=True)
        # The all-reduce alone, of as many bytes as the runs sent per step, in each precision.
        buffers = {}
        for row in found:
            name = "bf16" if row["compression"] == "bf16" else "fp32"
            element = 2 if name == "bf16" else 4
            buffers[name] = round(row["allreduce_mb_per_step"] * 2**20 / element)
        times = allreduce_alone(link, args, buffers, base_env)
        alone.append({"rate_bits": bits, "link": rate_name(bits), "numel": buffers, **times})
        for row in found:
            row["allreduce_alone_ms"] = times[
                "bf16_ms" if row["compression"] == "bf16" else "fp32_ms"]
        print(f"  {rate_name(bits)}, all-reduce alone: "
              + ", ".join(f"{k.removesuffix('_ms')} {v:.0f} ms" for k, v in times.items()),
              file=sys.stderr, flush=True)
    link.unshape()
    return {"single": list(single.values()), "rows": rows, "allreduce_alone": alone}


# ---------------------------------------------------------------------------------------------
# Report

def config_label(row):
    parts = ["bf16" if row["compression"] == "bf16" else "fp32"]
    if row["grad_accum"] > 1:
        parts.append(f"accum {row['grad_accum']}")
    return ", ".join(parts)


def report(result):
    from benchmark import fmt, table
    m, s = result["machine"], result["settings"]
    out = ["# Slow link between two nodes", "",
           f"Machine: {m['cpu']}, {m['cpu_count']} core(s), Linux {m['kernel']}; "
           f"torch {m['torch']}."
           f" Total runtime {result['runtime_s']:.0f} s; CPU used by other processes meanwhile: "
           f"{result['other_cpu_load']:.2f} cores"
           + (" (disturbed: rerun on an idle machine)" if result["other_cpu_load"] > 0.1 else ""),
           "", f"Command: `{result['command']}`", "",
           f"DDP-script-torchrun.py, 2 nodes x 1 process (one network namespace each, a veth pair "
           f"between them, Gloo), {s['preset']}, context {s['context']}, batch {s['batch']} per "
           f"process, --amp {s['amp']}, 1 thread per process; {s['warmup_steps']} warm-up step(s), "
           f"then the median of {s['steps']} step(s). Links shaped with tbf on both veth ends "
           f"(burst max(64 KB, rate/{HZ}), latency 100 ms). Efficiency: tokens/s per process "
           f"against the same configuration in one process. Ring model: 2 (N-1)/N x bytes / "
           f"rate, N = 2.", ""]
    single = {r["config"]: r for r in result["single"]}
    rows = [["one process, no link", config_label(r), r["tokens_per_sec"], 1.0,
             r["allreduce_mb_per_step"], None, None, r["step_ms"], None]
            for r in single.values()]
    rows += [[r["link"], config_label(r), r["tokens_per_sec"], r["efficiency"],
              r["allreduce_mb_per_step"], r["allreduce_alone_ms"], r["ring_model_ms"],
              r["step_ms"], r["extra_ms_per_step"]] for r in result["rows"]]
    out.append(table(["link", "gradients", "tokens/s", "efficiency", "MB all-reduced per step",
                      "all-reduce alone, ms", "ring model, ms", "step, ms",
                      "step minus one process's, ms"], rows))
    out.append("")
    for a in result["allreduce_alone"]:
        parts = [f"{name} {fmt(a[name + '_ms'])} ms ({numel:,} elements)"
                 for name, numel in a["numel"].items()]
        out.append(f"All-reduce alone at {a['link']}: {', '.join(parts)}.")
    return "\n".join(out)


def main(argv=None):
    args = parse_args(argv)
    if args.allreduce_worker:
        return allreduce_worker(json.loads(args.allreduce_worker))
    import netns
    reason = netns.why_not(shaping=True)
    if reason:
        print(f"slow_link.py: skipped: {reason}", file=sys.stderr)
        return 0
    import torch
    from benchmark import OtherLoad, machine_info
    load = OtherLoad()
    load.start()
    t0 = time.perf_counter()
    machine = machine_info("cpu")
    machine["kernel"] = platform.release()
    given = argv if argv is not None else sys.argv[1:]
    command = "python benchmarks/slow_link.py " + shlex.join(map(str, given))
    with tempfile.TemporaryDirectory(prefix="slow-link-") as tmp, netns.Link() as link:
        result = {"machine": machine, "command": command.strip(),
                  "settings": {k: getattr(args, k) for k in (
                      "preset", "context", "batch", "amp", "accum", "rates", "rate_bits",
                      "configs", "warmup_steps", "steps", "allreduce_reps")},
                  **measure(args, link, Path(tmp))}
    result["runtime_s"] = time.perf_counter() - t0
    result["other_cpu_load"] = load.share()
    result["torch"] = torch.__version__
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    print(report(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
