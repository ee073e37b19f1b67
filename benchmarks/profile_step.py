"""The top kernels (or CPU operators) of one training step, as DDP-script.py takes it: the model,
its optimizer and its loss from the script itself, profiled with torch.profiler.

    python3 benchmarks/profile_step.py --device cuda --preset gpt2-small --context 1024 --batch 16 --compile
"""
import argparse
import importlib.util
import sys
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from ddp_support.plan import OPTIMIZERS  # noqa: E402
from gpt_model import GPT_CONFIGS, GPTModel  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--preset", choices=list(GPT_CONFIGS), default="gpt2-small")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--amp", choices=["bf16", "off"], default="bf16")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rows", type=int, default=12)
    p.add_argument("--output", default=None, help="also write the table to this file")
    args = p.parse_args(argv)
    spec = importlib.util.spec_from_file_location("ddp_script", ROOT / "DDP-script.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True  # as ddp_setup
    torch.manual_seed(0)
    cfg = {**GPT_CONFIGS[args.preset], "context_length": max(args.context, 1)}
    if cuda:
        cfg["pad_vocab_multiple"] = 64  # as make_plan does on GPUs
    raw = GPTModel(cfg).to(device)
    model = torch.compile(raw) if args.compile else raw
    optimizer = script.configure_optimizer(raw, types.SimpleNamespace(peak_lr=4e-4,
                                                                      **OPTIMIZERS["gpt2"]))
    amp_dtype = torch.bfloat16 if args.amp == "bf16" else None
    x = torch.randint(0, cfg["vocab_size"], (args.batch, args.context))
    y = torch.randint(0, cfg["vocab_size"], (args.batch, args.context))

    def step():
        loss = script.calc_loss_batch(x, y, model, device, amp_dtype)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(raw.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)

    for _ in range(args.warmup):
        step()
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    text = (f"One step of {args.preset}, context {args.context}, batch {args.batch}, amp "
            f"{args.amp}{', compiled' if args.compile else ''}, on "
            f"{torch.cuda.get_device_name() if cuda else 'the CPU'}: top {args.rows} by "
            f"{key.replace('_', ' ')}\n"
            + prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=60))
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
