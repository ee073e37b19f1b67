"""Continue a prompt with a model trained by DDP-script.py (or DDP-script-torchrun.py).

    python generate.py --model runs/ddp/model.pt --prompt "Every effort moves you"
    python generate.py --model runs/ddp/ckpt.pt    # a snapshot of a run still going, or stopped
"""
import sys

import torch

from data import get_tokenizer, text_to_token_ids, token_ids_to_text
from gpt_model import GPTModel, generate, load_weights
from ddp_support.process import ArgumentParser, UsageError
from ddp_support.progress import check_weights_fit


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="runs/ddp/model.pt",
                   help="model.pt written by a training run, or its ckpt.pt snapshot")
    p.add_argument("--prompt", default="Every effort moves you")
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k likeliest tokens")
    p.add_argument("--seed", type=int, default=123)
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        p.error(f"--max-new-tokens must be at least 1, not {args.max_new_tokens}")
    if args.temperature < 0:
        p.error(f"--temperature must be 0 (greedy) or more, not {args.temperature:g}")
    if args.top_k is not None and args.top_k < 1:
        p.error(f"--top-k must be at least 1, not {args.top_k}")
    if not args.prompt:
        p.error("--prompt is empty: give the text to continue")
    return args


def load_model(path):
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UsageError(f"no file {path}: pass --model with the model.pt (or ckpt.pt) of a run")
    except Exception as e:  # a folder, truncated, or not a PyTorch file at all
        raise UsageError(f"cannot read {path} ({type(e).__name__}): pass --model with the model.pt "
                         f"(or ckpt.pt) of a run")
    if not isinstance(saved, dict) or not {"config", "model"} <= saved.keys():
        raise UsageError(f"{path} is not a model.pt or ckpt.pt of DDP-script.py: it holds no "
                         f"model config and weights")
    check_weights_fit(saved, path, fix="use the version of this repository that wrote it")
    return load_weights(GPTModel(saved["config"]), saved["model"]).eval()


def main(argv=None):
    args = parse_args(argv)
    try:
        model = load_model(args.model)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tokenizer = get_tokenizer()
    out = generate(model, text_to_token_ids(args.prompt, tokenizer), args.max_new_tokens, model.cfg["context_length"],
                   temperature=args.temperature, top_k=args.top_k,
                   eos_id=tokenizer.eot_token, generator=torch.Generator().manual_seed(args.seed))
    print(token_ids_to_text(out, tokenizer))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
