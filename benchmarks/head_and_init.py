"""Why the book's model memorises the-verdict.txt and GPT-2 does not: a grid over the output head
(tied to the token embedding, or its own) and the initialisation (GPT-2's, or PyTorch's default as
in the book), on the book's chapter-5 loop.

    python benchmarks/head_and_init.py                  # the 124M grid, about 8 min per row on 2 cores
    python benchmarks/head_and_init.py --rows book,gpt2 --epochs 3 --emb-dim 192 --n-layers 6

The loop is chapter 5's `train_model_simple`: one process, fp32, batch 2, context 256, the shipped
text (90% train), shuffled with seed 123, AdamW on every parameter (lr 4e-4, weight decay 0.1,
betas (0.9, 0.999)), no clipping, no schedule. After each epoch: the mean training loss of the
epoch's steps, the eval-mode losses over the whole training and validation splits (as the
book's table reports them), and the mean cosine similarity
between rows of the token embedding (for tokens in the text, and 2,000 tokens not in it) and
between rows of the output head, a measure of how far the rows drift toward one shared direction.
Prints a markdown table; --json writes every epoch.
"""
import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from data import create_dataloader, prepare_tokens, split_tokens  # noqa: E402
from gpt_model import GPT_CONFIG_124M, GPTModel, count_parameters  # noqa: E402

# name: the head and init; q/k/v bias off (the book's) unless a row turns it on, GPT-2's residual
# scaling as the init has it unless resid_scale=False, the token embedding's std set by emb_std
ROWS = {
    "book": dict(weight_tying=False, init="pytorch"),              # the book's chapter-4 model
    "untied+gpt2init": dict(weight_tying=False, init="gpt2"),
    "tied+bookinit": dict(weight_tying=True, init="pytorch"),
    "tied+gpt2init": dict(weight_tying=True, init="gpt2"),         # gpt2-small without q/k/v bias
    "gpt2-small": dict(weight_tying=True, init="gpt2", qkv_bias=True),
    "tied+gpt2init-noresid": dict(weight_tying=True, init="gpt2", resid_scale=False),
    "untied+gpt2init+emb1": dict(weight_tying=False, init="gpt2", emb_std=1.0),
}


def build(row, args):
    cfg = dict(GPT_CONFIG_124M, emb_dim=args.emb_dim, n_layers=args.n_layers, n_heads=args.n_heads,
               context_length=args.context_length, drop_rate=args.dropout,
               weight_tying=row["weight_tying"], init=row["init"],
               qkv_bias=row.get("qkv_bias", False))
    torch.manual_seed(args.seed)
    model = GPTModel(cfg)
    with torch.no_grad():
        if row.get("resid_scale") is False:  # GPT-2's init without the 1/sqrt(2L) factor
            for blk in model.trf_blocks:
                torch.nn.init.normal_(blk.att.out_proj.weight, std=0.02)
                torch.nn.init.normal_(blk.ff.layers[2].weight, std=0.02)
        if "emb_std" in row:  # the token embedding at the book's N(0, 1) scale
            torch.nn.init.normal_(model.tok_emb.weight, std=row["emb_std"])
    return model


def mean_cosine(rows):
    """Mean cosine similarity over all pairs of distinct rows."""
    u = torch.nn.functional.normalize(rows.double(), dim=1)
    s = u.sum(0)
    n = u.shape[0]
    return ((s @ s - n) / (n * (n - 1))).item()


@torch.no_grad()
def drift(model, seen, unseen):
    emb, head = model.tok_emb.weight, model.out_head.weight
    return {"cos_emb_seen": mean_cosine(emb[seen]), "cos_emb_unseen": mean_cosine(emb[unseen]),
            "cos_head": mean_cosine(head[torch.cat([seen, unseen])])}


@torch.no_grad()
def eval_loss(model, loader):
    model.eval()
    total, n = 0.0, 0
    for x, y in loader:
        logits = model(x)
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(),
                                                   reduction="sum").item()
        n += y.numel()
    model.train()
    return total / n


def run(name, args, train_loader, val_loader, seen, unseen):
    model = build(ROWS[name], args)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    epochs = [{"epoch": 0, "train_steps": None, "train": eval_loss(model, train_loader),
               "val": eval_loss(model, val_loader), **drift(model, seen, unseen)}]
    t0 = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        losses = []
        for x, y in train_loader:
            loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        epochs.append({"epoch": epoch, "train_steps": sum(losses) / len(losses),
                       "train": eval_loss(model, train_loader), "val": eval_loss(model, val_loader),
                       **drift(model, seen, unseen)})
        e = epochs[-1]
        print(f"  {name} epoch {epoch}: train {e['train']:.2f} val {e['val']:.2f} "
              f"cos emb seen {e['cos_emb_seen']:.2f} unseen {e['cos_emb_unseen']:.2f} "
              f"head {e['cos_head']:.2f}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    return {"row": name, "params": count_parameters(model), "seconds": time.perf_counter() - t0,
            "epochs": epochs}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="book,untied+gpt2init,tied+bookinit,tied+gpt2init",
                   help=f"comma-separated, from: {', '.join(ROWS)}")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--emb-dim", type=int, default=768)
    p.add_argument("--n-layers", type=int, default=12)
    p.add_argument("--n-heads", type=int, default=12)
    p.add_argument("--context-length", type=int, default=256)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--json", default=None, help="write every epoch's figures here")
    args = p.parse_args()
    rows = args.rows.split(",")
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        p.error(f"unknown row(s) {unknown}; choose from {list(ROWS)}")
    torch.set_num_threads(os.cpu_count())

    tokens = prepare_tokens()
    train_tokens, val_tokens = split_tokens(tokens, 0.1)
    common = dict(batch_size=2, max_length=args.context_length, stride=args.context_length,
                  seed=args.seed)
    train_loader = create_dataloader(train_tokens, shuffle=True, drop_last=True, **common)
    val_loader = create_dataloader(val_tokens, shuffle=False, drop_last=False, **common)
    seen = torch.tensor(sorted(set(int(t) for t in train_tokens)))
    g = torch.Generator().manual_seed(0)
    others = torch.tensor(sorted(set(range(50257)) - set(seen.tolist())))
    unseen = others[torch.randperm(len(others), generator=g)[:2000]]

    results = []
    for name in rows:
        print(f"{name}: {ROWS[name]}", flush=True)
        results.append(run(name, args, train_loader, val_loader, seen, unseen))
        if args.json:  # after each row, so that a stopped grid keeps the rows it finished
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "results": results}, f, indent=1)

    marks = [e for e in (1, 3, math.ceil(args.epochs * 0.7), args.epochs) if e <= args.epochs]
    marks = sorted(set(marks))
    print(f"\n{args.n_layers} layers x {args.emb_dim}, {args.epochs} epochs of "
          f"{len(train_loader)} steps; eval-mode train / val loss, then the mean row cosine at the end")
    print("| row | parameters | " + " | ".join(f"epoch {e}" for e in marks)
          + " | val min | cos emb (seen / unseen) | cos head |")
    print("|---|---:|" + "---|" * len(marks) + "---:|---|---:|")
    for r in results:
        ep = r["epochs"]
        cells = [f"{ep[e]['train']:.2f} / {ep[e]['val']:.2f}" for e in marks]
        last = ep[-1]
        print(f"| {r['row']} | {r['params']:,} | " + " | ".join(cells)
              + f" | {min(e['val'] for e in ep[1:]):.2f} | {last['cos_emb_seen']:.2f} / "
              f"{last['cos_emb_unseen']:.2f} | {last['cos_head']:.2f} |")


if __name__ == "__main__":
    main()
