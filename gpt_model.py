"""GPT-2, as in chapter 4 of *Build a Large Language Model (From Scratch)*, built from PyTorch's
own fast parts: one fused q/k/v projection, `scaled_dot_product_attention` (flash kernels on CUDA),
`nn.LayerNorm`, tanh-GELU and an output head tied to the token embedding, exactly as GPT-2 has it.
"""
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

# The book's chapter-4 config: GPT-2 small without q/k/v bias (124,412,160 parameters, head tied).
GPT_CONFIG_124M = {
    "vocab_size": 50257,     # GPT-2's BPE vocabulary
    "context_length": 1024,  # longest sequence the position embedding covers
    "emb_dim": 768,
    "n_heads": 12,
    "n_layers": 12,
    "drop_rate": 0.1,
    "qkv_bias": False,
}


def _gpt2(emb_dim, n_layers, n_heads):
    return {"vocab_size": 50257, "context_length": 1024, "emb_dim": emb_dim, "n_heads": n_heads,
            "n_layers": n_layers, "drop_rate": 0.1, "qkv_bias": True}


GPT_CONFIGS = {
    # GPT-2's own four sizes (OpenAI's checkpoints have q/k/v bias).
    "gpt2-small": _gpt2(768, 12, 12),     # 124,439,808 parameters
    "gpt2-medium": _gpt2(1024, 24, 16),   # 354,823,168
    "gpt2-large": _gpt2(1280, 36, 20),    # 774,030,080
    "gpt2-xl": _gpt2(1600, 48, 25),       # 1,557,611,200
    # Small models for CPU runs and tests: same vocabulary, so the same tokenizer and data.
    "gpt-mini": {"vocab_size": 50257, "context_length": 256, "emb_dim": 192, "n_heads": 6,
                 "n_layers": 6, "drop_rate": 0.1, "qkv_bias": True},
    "gpt-nano": {"vocab_size": 50257, "context_length": 128, "emb_dim": 48, "n_heads": 3,
                 "n_layers": 3, "drop_rate": 0.0, "qkv_bias": True},
}


class MultiHeadAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d, self.n_heads = cfg["emb_dim"], cfg["n_heads"]
        assert d % self.n_heads == 0, "emb_dim must be divisible by n_heads"
        self.qkv = nn.Linear(d, 3 * d, bias=cfg["qkv_bias"])  # q, k and v in one matmul
        self.out_proj = nn.Linear(d, d)
        self.dropout = cfg["drop_rate"]

    def forward(self, x):
        b, t, d = x.shape
        # (b, t, 3d) -> three tensors of (b, heads, t, head_dim)
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(y.transpose(1, 2).reshape(b, t, d))


class FeedForward(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d = cfg["emb_dim"]
        self.fc = nn.Linear(d, 4 * d)
        self.proj = nn.Linear(4 * d, d)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class TransformerBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg["emb_dim"])
        self.att = MultiHeadAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg["emb_dim"])
        self.ff = FeedForward(cfg)
        self.drop_shortcut = nn.Dropout(cfg["drop_rate"])

    def forward(self, x):
        x = x + self.drop_shortcut(self.att(self.norm1(x)))
        return x + self.drop_shortcut(self.ff(self.norm2(x)))


def padded_vocab_size(cfg):
    """Rows of the embedding table: vocab_size rounded up to `pad_vocab_multiple` (if set)."""
    m = cfg.get("pad_vocab_multiple") or 1
    return (cfg["vocab_size"] + m - 1) // m * m


class GPTModel(nn.Module):
    """GPT-2. `forward(idx[B, T]) -> logits[B, T, vocab_size]`.

    Set `cfg["pad_vocab_multiple"] = 64` to give the embedding table and output matmul a width that
    GPU kernels like (50257 -> 50304); the extra rows are never returned, so they never win a sample.
    """

    def __init__(self, cfg):
        super().__init__()
        self.cfg = dict(cfg)
        self.tok_emb = nn.Embedding(padded_vocab_size(cfg), cfg["emb_dim"])
        self.pos_emb = nn.Embedding(cfg["context_length"], cfg["emb_dim"])
        self.drop_emb = nn.Dropout(cfg["drop_rate"])
        self.trf_blocks = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg["n_layers"]))
        self.final_norm = nn.LayerNorm(cfg["emb_dim"])
        self.out_head = nn.Linear(cfg["emb_dim"], padded_vocab_size(cfg), bias=False)
        self.out_head.weight = self.tok_emb.weight  # weight tying, as GPT-2 does
        self.apply(self._init_weights)
        # GPT-2: scale the init of projections that write into the residual stream by 1/sqrt(2L),
        # so the residual's variance does not grow with depth.
        std = 0.02 / math.sqrt(2 * cfg["n_layers"])
        for block in self.trf_blocks:
            nn.init.normal_(block.att.out_proj.weight, mean=0.0, std=std)
            nn.init.normal_(block.ff.proj.weight, mean=0.0, std=std)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx):
        t = idx.shape[1]
        if t > self.cfg["context_length"]:
            raise ValueError(f"sequence of {t} tokens is longer than the model's context "
                             f"({self.cfg['context_length']})")
        pos = torch.arange(t, device=idx.device)
        x = self.drop_emb(self.tok_emb(idx) + self.pos_emb(pos))
        for block in self.trf_blocks:
            x = block(x)
        logits = self.out_head(self.final_norm(x))
        if logits.shape[-1] != self.cfg["vocab_size"]:
            logits = logits[..., :self.cfg["vocab_size"]]  # drop the padding rows
        return logits


def count_parameters(model, exclude_position_embedding=False):
    """Parameters, each counted once (the tied head shares the token embedding)."""
    n = sum(p.numel() for p in model.parameters())
    if exclude_position_embedding:
        n -= model.pos_emb.weight.numel()
    return n


@torch.no_grad()
def generate(model, idx, max_new_tokens, context_size, temperature=0.0, top_k=None, eos_id=None,
             generator=None):
    """Extend idx[B, T] by up to max_new_tokens. temperature 0 is greedy; top_k keeps the k most
    likely tokens before sampling; eos_id stops once every row has produced it."""
    finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    for _ in range(max_new_tokens):
        logits = model(idx[:, -context_size:])[:, -1, :].float()
        if top_k is not None:
            kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if temperature > 0.0:
            probs = torch.softmax(logits / temperature, dim=-1)
            idx_next = torch.multinomial(probs, num_samples=1, generator=generator)
        else:
            idx_next = logits.argmax(dim=-1, keepdim=True)
        idx = torch.cat((idx, idx_next), dim=1)
        if eos_id is not None:
            finished |= idx_next[:, 0] == eos_id
            if bool(finished.all()):
                break
    return idx


def generate_text_simple(model, idx, max_new_tokens, context_size):
    """The book's greedy decoder (chapter 4)."""
    return generate(model, idx, max_new_tokens, context_size)


# ---------------------------------------------------------------------------------------------
# GPT-2 weights in the Hugging Face layout (model.safetensors or pytorch_model.bin), read locally.

def _read_hf_state_dict(path):
    path = os.fspath(path)
    if os.path.isdir(path):
        for name in ("model.safetensors", "pytorch_model.bin"):
            if os.path.isfile(os.path.join(path, name)):
                path = os.path.join(path, name)
                break
        else:
            raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {path}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GPT-2 weights not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file  # only needed for this format
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def hf_gpt2_config(path, state_dict=None):
    """The GPTModel config matching a Hugging Face GPT-2 checkpoint (its config.json if present)."""
    import json
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    cfg_file = os.path.join(folder, "config.json")
    if os.path.isfile(cfg_file):
        with open(cfg_file) as f:
            hf = json.load(f)
        return {"vocab_size": hf["vocab_size"], "context_length": hf["n_positions"],
                "emb_dim": hf["n_embd"], "n_heads": hf["n_head"], "n_layers": hf["n_layer"],
                "drop_rate": 0.0, "qkv_bias": True}
    sd = {k.removeprefix("transformer."): v for k, v in (state_dict or _read_hf_state_dict(path)).items()}
    vocab, d = sd["wte.weight"].shape
    if d % 64:
        raise ValueError(f"no config.json beside {path}, and a width of {d} does not tell the "
                         f"number of heads (GPT-2's sizes use 64 dimensions per head)")
    n_layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("h."))
    return {"vocab_size": vocab, "context_length": sd["wpe.weight"].shape[0], "emb_dim": d,
            "n_heads": d // 64, "n_layers": n_layers, "drop_rate": 0.0, "qkv_bias": True}


def load_hf_gpt2(model, path):
    """Copy GPT-2 weights stored in the Hugging Face layout into a GPTModel of the same shape.
    HF's Conv1D keeps weights as (in, out), so they are transposed into nn.Linear's (out, in)."""
    sd = {k.removeprefix("transformer."): v for k, v in _read_hf_state_dict(path).items()}
    ours = {"tok_emb.weight": sd["wte.weight"], "pos_emb.weight": sd["wpe.weight"],
            "final_norm.weight": sd["ln_f.weight"], "final_norm.bias": sd["ln_f.bias"]}
    names = {"ln_1": "norm1", "ln_2": "norm2", "attn.c_attn": "att.qkv",
             "attn.c_proj": "att.out_proj", "mlp.c_fc": "ff.fc", "mlp.c_proj": "ff.proj"}
    for i in range(model.cfg["n_layers"]):
        for hf_name, our_name in names.items():
            w = sd[f"h.{i}.{hf_name}.weight"]
            ours[f"trf_blocks.{i}.{our_name}.weight"] = w if hf_name.startswith("ln") else w.t()
            ours[f"trf_blocks.{i}.{our_name}.bias"] = sd[f"h.{i}.{hf_name}.bias"]
    if not model.cfg["qkv_bias"]:
        raise ValueError("GPT-2 checkpoints have q/k/v bias: build the model with qkv_bias=True")
    own = model.state_dict()
    with torch.no_grad():
        for name, tensor in ours.items():
            target = own[name]
            if name == "tok_emb.weight":  # padded rows (if any) keep their init
                target = target[:tensor.shape[0]]
            if target.shape != tensor.shape:
                raise ValueError(f"{name}: checkpoint has shape {tuple(tensor.shape)}, "
                                 f"the model {tuple(target.shape)}")
            target.copy_(tensor)
    return model
