"""Continue a prompt with a model trained by DDP-script.py (or DDP-script-torchrun.py).

    python generate.py --model runs/ddp/model.pt --prompt "Every effort moves you"
"""
import argparse
import sys

import torch

from data import get_tokenizer
from gpt_model import GPTModel, generate


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="runs/ddp/model.pt", help="model.pt written by a training run")
    p.add_argument("--prompt", default="Every effort moves you")
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=123)
    args = p.parse_args(argv)
    try:
        saved = torch.load(args.model, map_location="cpu", weights_only=True)
        model = GPTModel(saved["config"])
        model.load_state_dict(saved["model"])
    except (OSError, KeyError, RuntimeError) as e:
        print(f"error: cannot load {args.model} ({type(e).__name__}): pass --model with the "
              f"model.pt of a finished run", file=sys.stderr)
        return 2
    model.eval()
    tokenizer = get_tokenizer()
    idx = torch.tensor([tokenizer.encode(args.prompt)])
    out = generate(model, idx, args.max_new_tokens, model.cfg["context_length"],
                   temperature=args.temperature, top_k=args.top_k,
                   eos_id=tokenizer.eot_token, generator=torch.Generator().manual_seed(args.seed))
    print(tokenizer.decode(out[0].tolist()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
