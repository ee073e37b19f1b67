"""The GPT of chapter 4 of *Build a Large Language Model (From Scratch)*, and GPT-2, in one class
built from PyTorch's own fast parts (`scaled_dot_product_attention`, flash kernels on CUDA; the
fused `layer_norm` kernel), with the book's names for every module and parameter.

Two config keys choose between the two models; a config without them (like the book's own
GPT_CONFIG_124M) builds the book's model:
- "weight_tying": the output head reuses the token embedding, as GPT-2 does (the book: its own head);
- "init": "gpt2" draws weights from N(0, 0.02), scaled by 1/sqrt(2 * n_layers) for the projections
  that write into the residual stream, as GPT-2 does (the book: PyTorch's default initialisation).
"""
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

# The book's chapter-4 config: 163,009,536 parameters, with its own output head.
GPT_CONFIG_124M = {
    "vocab_size": 50257,     # GPT-2's BPE vocabulary
    "context_length": 1024,  # longest sequence the position embedding covers
    "emb_dim": 768,
    "n_heads": 12,
    "n_layers": 12,
    "drop_rate": 0.1,
    "qkv_bias": False,
}


def _gpt2(emb_dim, n_layers, n_heads, context_length=1024, drop_rate=0.1):
    return {"vocab_size": 50257, "context_length": context_length, "emb_dim": emb_dim,
            "n_heads": n_heads, "n_layers": n_layers, "drop_rate": drop_rate, "qkv_bias": True,
            "weight_tying": True, "init": "gpt2"}


GPT_CONFIGS = {
    # The book's model (chapters 4 and 5): untied head, no q/k/v bias, PyTorch's initialisation.
    "book-124m": dict(GPT_CONFIG_124M),
    "book-mini": dict(GPT_CONFIG_124M, context_length=256, emb_dim=192, n_heads=6, n_layers=6),
    # GPT-2's own four sizes (OpenAI's checkpoints load into these).
    "gpt2-small": _gpt2(768, 12, 12),     # 124,439,808 parameters
    "gpt2-medium": _gpt2(1024, 24, 16),   # 354,823,168
    "gpt2-large": _gpt2(1280, 36, 20),    # 774,030,080
    "gpt2-xl": _gpt2(1600, 48, 25),       # 1,557,611,200
    # Small GPT-2-style models for CPU runs and tests: same vocabulary, tokenizer and data.
    "gpt-mini": _gpt2(192, 6, 6, context_length=256),
    "gpt-nano": _gpt2(48, 3, 3, context_length=128, drop_rate=0.0),
}


class LayerNorm(nn.Module):
    """The book's LayerNorm (a learned scale and shift), computed by PyTorch's fused kernel."""

    def __init__(self, emb_dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x):
        return F.layer_norm(x, self.scale.shape, self.scale, self.shift, self.eps)


class MultiHeadAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d, self.n_heads = cfg["emb_dim"], cfg["n_heads"]
        assert d % self.n_heads == 0, "emb_dim must be divisible by n_heads"
        self.W_query = nn.Linear(d, d, bias=cfg["qkv_bias"])
        self.W_key = nn.Linear(d, d, bias=cfg["qkv_bias"])
        self.W_value = nn.Linear(d, d, bias=cfg["qkv_bias"])
        self.out_proj = nn.Linear(d, d)
        self.dropout = cfg["drop_rate"]

    def forward(self, x):
        b, t, d = x.shape
        # (b, t, d) -> (b, heads, t, head_dim)
        q, k, v = (w(x).view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2)
                   for w in (self.W_query, self.W_key, self.W_value))
        # the causal mask, scaling, softmax and dropout of chapter 3, in one kernel
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(y.transpose(1, 2).reshape(b, t, d))


class FeedForward(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d = cfg["emb_dim"]
        self.layers = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(approximate="tanh"),
                                    nn.Linear(4 * d, d))

    def forward(self, x):
        return self.layers(x)


class TransformerBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.norm1 = LayerNorm(cfg["emb_dim"])
        self.att = MultiHeadAttention(cfg)
        self.norm2 = LayerNorm(cfg["emb_dim"])
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
    """`forward(idx[B, T]) -> logits[B, T, vocab_size]`.

    Set `cfg["pad_vocab_multiple"] = 64` to give the embedding table and output matmul a width that
    GPU kernels like (50257 -> 50304); the extra rows are never returned, so they never win a sample.
    They are zeros added after the real rows are drawn, so the same seed gives the same weights
    with or without them, and saved weights leave them out (`unpadded`, `load_weights`).
    """

    def __init__(self, cfg):
        super().__init__()
        self.cfg = dict(cfg)
        init = cfg.get("init", "pytorch")
        if init not in ("pytorch", "gpt2"):
            raise ValueError(f'cfg["init"] is "pytorch" (the book) or "gpt2", not {init!r}')
        vocab = cfg["vocab_size"]  # the rows drawn from the random stream; padding comes later
        self.tok_emb = nn.Embedding(vocab, cfg["emb_dim"])
        self.pos_emb = nn.Embedding(cfg["context_length"], cfg["emb_dim"])
        self.drop_emb = nn.Dropout(cfg["drop_rate"])
        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg) for _ in range(cfg["n_layers"])])
        self.final_norm = LayerNorm(cfg["emb_dim"])
        self.out_head = nn.Linear(cfg["emb_dim"], vocab, bias=False)
        if cfg.get("weight_tying"):
            self.out_head.weight = self.tok_emb.weight  # one matrix reads tokens in and out
        if init == "gpt2":
            self.apply(self._init_weights)
            # scale the projections that write into the residual stream by 1/sqrt(2L), so the
            # residual's variance does not grow with depth
            std = 0.02 / math.sqrt(2 * cfg["n_layers"])
            for block in self.trf_blocks:
                nn.init.normal_(block.att.out_proj.weight, mean=0.0, std=std)
                nn.init.normal_(block.ff.layers[2].weight, mean=0.0, std=std)
        self._pad_vocab(padded_vocab_size(cfg) - vocab)

    def _pad_vocab(self, rows):
        """Append `rows` zero rows to the token embedding and the output head (once if tied)."""
        if not rows:
            return
        tied = self.out_head.weight is self.tok_emb.weight
        heads = (self.tok_emb,) if tied else (self.tok_emb, self.out_head)
        for module in heads:
            w = module.weight.detach()
            module.weight = nn.Parameter(torch.cat([w, w.new_zeros(rows, w.shape[1])]))
        if tied:
            self.out_head.weight = self.tok_emb.weight

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx, last_only=False):
        """last_only: logits of the last position alone, all that generation needs (the output
        head is most of a small model's compute)."""
        t = idx.shape[1]
        if t > self.cfg["context_length"]:
            raise ValueError(f"sequence of {t} tokens is longer than the model's context "
                             f"({self.cfg['context_length']})")
        pos = torch.arange(t, device=idx.device)
        x = self.drop_emb(self.tok_emb(idx) + self.pos_emb(pos))
        x = self.trf_blocks(x)
        if last_only:
            x = x[:, -1:, :]
        logits = self.out_head(self.final_norm(x))
        if logits.shape[-1] != self.cfg["vocab_size"]:
            logits = logits[..., :self.cfg["vocab_size"]]  # drop the padding rows
        return logits


VOCAB_ROWS = ("tok_emb.weight", "out_head.weight")  # the tensors with a row per token


def unpadded(name, tensor, vocab_size):
    """A tensor of a state dict without the vocabulary's padding rows (a view: clone to save)."""
    return tensor[:vocab_size] if name in VOCAB_ROWS and tensor.shape[0] > vocab_size else tensor


def load_weights(model, state):
    """Load a state dict saved without padding rows (or with them) into `model`, padded or not."""
    own = model.state_dict()
    state = {k: pad_rows(v, own[k].shape[0]) if k in VOCAB_ROWS and k in own else v
             for k, v in state.items()}
    model.load_state_dict(state)
    return model


def pad_rows(tensor, rows):
    """tensor[:rows], or tensor with zero rows added up to `rows`."""
    if tensor.shape[0] >= rows:
        return tensor[:rows]
    return torch.cat([tensor, tensor.new_zeros(rows - tensor.shape[0], *tensor.shape[1:])])


def count_parameters(model, exclude_position_embedding=False):
    """Parameters, each counted once (a tied head shares the token embedding), without the rows
    that pad the vocabulary on GPUs."""
    n = sum(p.numel() for p in model.parameters())
    pad_rows = model.tok_emb.weight.shape[0] - model.cfg["vocab_size"]
    heads = 1 if model.out_head.weight is model.tok_emb.weight else 2
    n -= heads * pad_rows * model.cfg["emb_dim"]
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
        logits = model(idx[:, -context_size:], last_only=True)[:, -1, :].float()
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
                "drop_rate": 0.0, "qkv_bias": True, "weight_tying": True, "init": "gpt2"}
    sd = {k.removeprefix("transformer."): v for k, v in (state_dict or _read_hf_state_dict(path)).items()}
    vocab, d = sd["wte.weight"].shape
    if d % 64:
        raise ValueError(f"no config.json beside {path}, and a width of {d} does not tell the "
                         f"number of heads (GPT-2's sizes use 64 dimensions per head)")
    n_layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("h."))
    return {"vocab_size": vocab, "context_length": sd["wpe.weight"].shape[0], "emb_dim": d,
            "n_heads": d // 64, "n_layers": n_layers, "drop_rate": 0.0, "qkv_bias": True,
            "weight_tying": True, "init": "gpt2"}


def load_hf_gpt2(model, path):
    """Copy GPT-2 weights stored in the Hugging Face layout into a GPTModel of the same shape.
    HF's Conv1D keeps weights as (in, out), so they are transposed into nn.Linear's (out, in), and
    its one q/k/v projection (c_attn) is split into W_query, W_key and W_value."""
    if not (model.cfg["qkv_bias"] and model.cfg.get("weight_tying")):
        raise ValueError("GPT-2 checkpoints have q/k/v bias and a tied head: build the model with "
                         "qkv_bias=True and weight_tying=True (a gpt2-* preset)")
    sd = {k.removeprefix("transformer."): v for k, v in _read_hf_state_dict(path).items()}
    ours = {"tok_emb.weight": sd["wte.weight"], "pos_emb.weight": sd["wpe.weight"],
            "final_norm.scale": sd["ln_f.weight"], "final_norm.shift": sd["ln_f.bias"]}
    linears = {"attn.c_proj": "att.out_proj", "mlp.c_fc": "ff.layers.0", "mlp.c_proj": "ff.layers.2"}
    for i in range(model.cfg["n_layers"]):
        h, b = f"h.{i}.", f"trf_blocks.{i}."
        for hf_name, our_name in (("ln_1", "norm1"), ("ln_2", "norm2")):
            ours[b + our_name + ".scale"] = sd[h + hf_name + ".weight"]
            ours[b + our_name + ".shift"] = sd[h + hf_name + ".bias"]
        for hf_name, our_name in linears.items():
            ours[b + our_name + ".weight"] = sd[h + hf_name + ".weight"].t()
            ours[b + our_name + ".bias"] = sd[h + hf_name + ".bias"]
        weights = sd[h + "attn.c_attn.weight"].t().chunk(3, dim=0)
        biases = sd[h + "attn.c_attn.bias"].chunk(3, dim=0)
        for name, w, bias in zip(("W_query", "W_key", "W_value"), weights, biases):
            ours[b + f"att.{name}.weight"], ours[b + f"att.{name}.bias"] = w, bias
    own = model.state_dict()
    with torch.no_grad():
        for name, tensor in ours.items():
            target = own[name]
            if name == "tok_emb.weight":  # padded rows (if any) stay zero
                target = target[:tensor.shape[0]]
            if target.shape != tensor.shape:
                raise ValueError(f"{name}: checkpoint has shape {tuple(tensor.shape)}, "
                                 f"the model {tuple(target.shape)}")
            target.copy_(tensor)
    return model
