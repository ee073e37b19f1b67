"""The baseline for benchmarks/benchmark.py: GPT-2 written the way chapters 4 and 5 of the book write
it, with none of gpt_model.py's fast parts.

- attention: separate W_query / W_key / W_value projections, scores from a plain matmul, a causal
  mask kept as a registered buffer (torch.triu of ones) applied with masked_fill(-inf), softmax,
  dropout on the attention weights;
- a hand-written LayerNorm (mean and biased variance, eps 1e-5, scale and shift) and a hand-written
  tanh GELU;
- an output head of its own (Linear emb_dim -> vocab, no bias), not tied to the token embedding.

The training step is chapter 5's: fp32, no autocast, plain (unfused) AdamW, clipping at 1.0.
"""
import math

import torch
import torch.nn as nn


class BookLayerNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))
        self.shift = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True, unbiased=False)
        return self.scale * ((x - mean) / torch.sqrt(var + self.eps)) + self.shift


class BookGELU(nn.Module):
    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


class BookAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d = cfg["emb_dim"]
        self.n_heads, self.head_dim = cfg["n_heads"], d // cfg["n_heads"]
        self.W_query = nn.Linear(d, d, bias=cfg["qkv_bias"])
        self.W_key = nn.Linear(d, d, bias=cfg["qkv_bias"])
        self.W_value = nn.Linear(d, d, bias=cfg["qkv_bias"])
        self.out_proj = nn.Linear(d, d)
        self.dropout = nn.Dropout(cfg["drop_rate"])
        n = cfg["context_length"]
        self.register_buffer("mask", torch.triu(torch.ones(n, n), diagonal=1))

    def heads(self, x):  # (b, t, d) -> (b, heads, t, head_dim)
        b, t, _ = x.shape
        return x.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.heads(self.W_query(x)), self.heads(self.W_key(x)), self.heads(self.W_value(x))
        scores = q @ k.transpose(2, 3)
        scores.masked_fill_(self.mask.bool()[:t, :t], -torch.inf)
        weights = self.dropout(torch.softmax(scores / self.head_dim ** 0.5, dim=-1))
        context = (weights @ v).transpose(1, 2).contiguous().view(b, t, d)
        return self.out_proj(context)


class BookFeedForward(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(d, 4 * d), BookGELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        return self.layers(x)


class BookBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d = cfg["emb_dim"]
        self.norm1 = BookLayerNorm(d)
        self.att = BookAttention(cfg)
        self.norm2 = BookLayerNorm(d)
        self.ff = BookFeedForward(d)
        self.drop_shortcut = nn.Dropout(cfg["drop_rate"])

    def forward(self, x):
        x = x + self.drop_shortcut(self.att(self.norm1(x)))
        return x + self.drop_shortcut(self.ff(self.norm2(x)))


class BookGPTModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d = cfg["emb_dim"]
        self.tok_emb = nn.Embedding(cfg["vocab_size"], d)
        self.pos_emb = nn.Embedding(cfg["context_length"], d)
        self.drop_emb = nn.Dropout(cfg["drop_rate"])
        self.trf_blocks = nn.Sequential(*[BookBlock(cfg) for _ in range(cfg["n_layers"])])
        self.final_norm = BookLayerNorm(d)
        self.out_head = nn.Linear(d, cfg["vocab_size"], bias=False)

    def forward(self, idx):
        t = idx.shape[1]
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(t, device=idx.device))
        x = self.trf_blocks(self.drop_emb(x))
        return self.out_head(self.final_norm(x))


def book_loss_batch(input_batch, target_batch, model, device):
    """Chapter 5's calc_loss_batch."""
    input_batch, target_batch = input_batch.to(device), target_batch.to(device)
    logits = model(input_batch)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), target_batch.flatten())


def book_optimizer(model):
    """Chapter 5's optimizer: AdamW on every parameter, lr 4e-4, weight decay 0.1, not fused."""
    return torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1)
