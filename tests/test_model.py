"""Tests for gpt_model.py: sizes, weight tying, padding, causality, attention, init, loading
Hugging Face GPT-2 weights and generation. Tiny configs only; big models are built on `meta`."""
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # so that `pytest` works as well as `python -m pytest`
    sys.path.insert(0, str(ROOT))

from gpt_model import (GPT_CONFIG_124M, GPT_CONFIGS, GPTModel, LayerNorm,  # noqa: E402
                       MultiHeadAttention, count_parameters, generate, generate_text_simple, hf_gpt2_config,
                       load_hf_gpt2)

VOCAB = 50257
# a tiny GPT-2 (tied head, GPT-2 init)
TINY = {"vocab_size": VOCAB, "context_length": 32, "emb_dim": 48, "n_heads": 3, "n_layers": 2,
        "drop_rate": 0.0, "qkv_bias": True, "weight_tying": True, "init": "gpt2"}


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPTModel({**TINY, **overrides}).eval()


def random_ids(*shape, seed=1, high=VOCAB):
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# Sizes and weight tying

@pytest.mark.parametrize("name, expected", [
    ("gpt2-small", 124_439_808),
    ("gpt2-medium", 354_823_168),
    ("gpt2-large", 774_030_080),
    ("gpt2-xl", 1_557_611_200),
])
def test_parameter_counts_of_gpt2_sizes(name, expected):
    """GPT-2's published sizes. A wrong MLP width, a missing bias or an untied head (+38.6M for
    small) changes the count."""
    with torch.device("meta"):
        model = GPTModel(GPT_CONFIGS[name])
    assert all(p.device.type == "meta" for p in model.parameters())  # nothing was allocated
    assert count_parameters(model) == expected
    cfg = GPT_CONFIGS[name]
    no_pos = expected - cfg["context_length"] * cfg["emb_dim"]
    assert count_parameters(model, exclude_position_embedding=True) == no_pos


@pytest.mark.parametrize("pad", [None, 64])
def test_parameter_count_of_book_config(pad):
    """The book's chapter-4 GPTModel(GPT_CONFIG_124M): no q/k/v bias and an output head of its own,
    163,009,536 parameters as the book counts them; the GPU's vocabulary padding is not counted."""
    with torch.device("meta"):
        model = GPTModel({**GPT_CONFIG_124M, "pad_vocab_multiple": pad})
    assert model.trf_blocks[0].att.W_query.bias is None
    assert model.out_head.weight is not model.tok_emb.weight
    assert count_parameters(model) == 163_009_536
    assert GPT_CONFIGS["book-124m"] == GPT_CONFIG_124M


def test_output_head_is_tied_to_token_embedding():
    """A copied (not shared) head would have its own storage and would not follow updates."""
    model = tiny_model()
    assert model.out_head.weight is model.tok_emb.weight
    assert model.out_head.weight.data_ptr() == model.tok_emb.weight.data_ptr()
    with torch.no_grad():
        model.tok_emb.weight[123].fill_(0.5)
    assert torch.equal(model.out_head.weight[123], torch.full((TINY["emb_dim"],), 0.5))


# ---------------------------------------------------------------------------------------------
# Forward pass

def test_forward_shape():
    model = tiny_model()
    logits = model(random_ids(2, 7))
    assert logits.shape == (2, 7, VOCAB)
    assert logits.dtype == torch.float32


def test_forward_accepts_full_context_and_rejects_longer():
    """A sequence longer than the position table must fail clearly, not index out of range."""
    model = tiny_model()
    assert model(random_ids(1, TINY["context_length"])).shape == (1, 32, VOCAB)
    with pytest.raises(ValueError, match="longer than the model's context"):
        model(random_ids(1, TINY["context_length"] + 1))


def test_padded_vocab_never_returns_padding_rows():
    """With pad_vocab_multiple=64 the table has 50304 rows but logits stay 50257 wide. The padding
    rows are made huge so that, were they returned, argmax and generate would pick them."""
    model = tiny_model(pad_vocab_multiple=64)
    assert model.tok_emb.weight.shape == (50304, TINY["emb_dim"])
    assert model.out_head.weight is model.tok_emb.weight
    with torch.no_grad():
        model.tok_emb.weight[VOCAB:] = 100.0 * torch.randn(50304 - VOCAB, TINY["emb_dim"])

    hidden = {}
    model.final_norm.register_forward_hook(lambda mod, inp, out: hidden.setdefault("h", out))
    idx = random_ids(2, 6)
    logits = model(idx)
    assert logits.shape == (2, 6, VOCAB)
    # the trap is armed: over all 50304 rows the padding would win everywhere
    full = hidden["h"] @ model.tok_emb.weight.T
    assert (full.argmax(-1) >= VOCAB).all()
    assert (logits.argmax(-1) < VOCAB).all()

    out = generate(model, idx, max_new_tokens=5, context_size=32)
    assert (out < VOCAB).all()
    sampled = generate(model, idx, max_new_tokens=5, context_size=32, temperature=1.0,
                       generator=torch.Generator().manual_seed(0))
    assert (sampled < VOCAB).all()


def test_causality():
    """Changing token j must leave logits before j untouched and change those from j on; a missing
    or wrong mask (e.g. triu offset) leaks the future."""
    model = tiny_model()
    idx = random_ids(1, 16)
    changed = idx.clone()
    j = 10
    changed[0, j] = (idx[0, j] + 1) % VOCAB
    with torch.no_grad():
        a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :j], b[:, :j], rtol=0, atol=1e-6)
    per_position = (a[0, j:] - b[0, j:]).abs().amax(-1)
    assert (per_position > 1e-4).all()


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_attention_matches_plain_masked_softmax(qkv_bias):
    """MultiHeadAttention (scaled_dot_product_attention) against the book's explicit
    q @ k^T / sqrt(d_head), -inf above the diagonal, softmax, @ v. A wrong head split, a q/k/v
    mix-up or a missing scale or mask fails this."""
    torch.manual_seed(0)
    cfg = {**TINY, "qkv_bias": qkv_bias}
    att = MultiHeadAttention(cfg).eval()
    with torch.no_grad():  # make sure the biases are not zero
        for lin in (att.W_query, att.W_key, att.W_value, att.out_proj):
            if lin.bias is not None:
                lin.bias.normal_(0, 0.5)
    b, t, d, h = 2, 7, cfg["emb_dim"], cfg["n_heads"]
    hd = d // h
    x = torch.randn(b, t, d)

    def heads(z):  # (b, t, d) -> (b, h, t, hd)
        return z.view(b, t, h, hd).transpose(1, 2)

    with torch.no_grad():
        q, k, v = (heads(x @ lin.weight.T + (lin.bias if qkv_bias else 0))
                   for lin in (att.W_query, att.W_key, att.W_value))
        scores = q @ k.transpose(-2, -1) / math.sqrt(hd)
        mask = torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)
        weights = torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1)
        context = (weights @ v).transpose(1, 2).reshape(b, t, d)
        expected = context @ att.out_proj.weight.T + att.out_proj.bias
        got = att(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Initialisation

def test_init_statistics():
    """GPT-2 init: weights N(0, 0.02), residual projections N(0, 0.02/sqrt(2L)), biases 0,
    LayerNorm 1/0. PyTorch's default init (kaiming-uniform, std ~0.036 here) or an unscaled
    residual projection fails."""
    n_layers = 8
    torch.manual_seed(0)
    model = GPTModel({"vocab_size": 1000, "context_length": 64, "emb_dim": 256, "n_heads": 4,
                      "n_layers": n_layers, "drop_rate": 0.0, "qkv_bias": True,
                      "weight_tying": True, "init": "gpt2"})
    blocks = model.trf_blocks
    plain = torch.cat([w.flatten() for blk in blocks
                       for w in (blk.att.W_query.weight, blk.att.W_value.weight,
                                 blk.ff.layers[0].weight)])
    resid = torch.cat([w.flatten() for blk in blocks for w in (blk.att.out_proj.weight,
                                                                 blk.ff.layers[2].weight)])
    resid_std = 0.02 / math.sqrt(2 * n_layers)  # 0.005
    assert plain.std().item() == pytest.approx(0.02, rel=0.02)
    assert abs(plain.mean().item()) < 1e-4
    assert resid.std().item() == pytest.approx(resid_std, rel=0.02)
    for blk in blocks:  # every single projection, not just the pooled estimate
        assert blk.att.out_proj.weight.std().item() == pytest.approx(resid_std, rel=0.05)
        assert blk.ff.layers[2].weight.std().item() == pytest.approx(resid_std, rel=0.05)
        assert blk.ff.layers[0].weight.std().item() == pytest.approx(0.02, rel=0.05)
        assert blk.att.W_key.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.tok_emb.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert model.pos_emb.weight.std().item() == pytest.approx(0.02, rel=0.05)

    biases = [m.bias for m in model.modules() if isinstance(m, torch.nn.Linear) and m.bias is not None]
    assert len(biases) == 6 * n_layers  # q, k, v, out_proj and the two feed-forward layers
    assert all(torch.count_nonzero(bias) == 0 for bias in biases)
    norms = [m for m in model.modules() if isinstance(m, LayerNorm)]
    assert len(norms) == 2 * n_layers + 1
    assert all(torch.all(n.scale == 1) and torch.all(n.shift == 0) for n in norms)


def _book_model():
    """benchmarks/book_model.py: the model as chapters 3 and 4 write it, module by module."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from book_model import BookGPTModel
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return BookGPTModel


def test_book_config_builds_the_books_model():
    """GPTModel(GPT_CONFIG_124M) has the book's parameter names and shapes, and with the same seed
    the very same initial weights (PyTorch's default init, drawn in the book's order), so the
    book's saved state dict loads into it and gives its logits."""
    BookGPTModel = _book_model()
    with torch.device("meta"):  # the full 124M size: names and shapes
        ours, book = GPTModel(GPT_CONFIG_124M), BookGPTModel(GPT_CONFIG_124M)
    assert ([(n, p.shape) for n, p in ours.named_parameters()]
            == [(n, p.shape) for n, p in book.named_parameters()])

    cfg = {**GPT_CONFIG_124M, "emb_dim": 96, "n_heads": 4, "n_layers": 3, "context_length": 64}
    torch.manual_seed(123)
    ours = GPTModel(cfg).eval()
    torch.manual_seed(123)
    book = BookGPTModel(cfg).eval()
    for (name, p), q in zip(ours.named_parameters(), book.parameters()):
        assert torch.equal(p, q), name
    # the statistics of PyTorch's default init, which GPT-2's N(0, 0.02) would fail
    assert ours.tok_emb.weight.std().item() == pytest.approx(1.0, rel=0.01)
    assert ours.pos_emb.weight.std().item() == pytest.approx(1.0, rel=0.05)
    bound = 1 / math.sqrt(96)  # nn.Linear: U(-1/sqrt(in), 1/sqrt(in))
    for lin in (ours.trf_blocks[0].att.W_query, ours.trf_blocks[2].ff.layers[0], ours.out_head):
        assert lin.weight.abs().max().item() <= bound * (1 + 1e-6)
        assert lin.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert ours.out_head.weight is not ours.tok_emb.weight
    assert torch.all(ours.final_norm.scale == 1) and torch.all(ours.final_norm.shift == 0)

    # the book saves `model.state_dict()` (its attention masks are buffers we do not need)
    saved = {k: v for k, v in book.state_dict().items() if not k.endswith(".mask")}
    ours.load_state_dict(saved)
    idx = random_ids(2, 20, seed=9)
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), book(idx), rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", [n for n in GPT_CONFIGS if n.startswith("gpt")])
def test_gpt2_presets_stay_gpt2(name):
    """Every gpt* preset is GPT-2: tied head, GPT-2 init, q/k/v bias (Hugging Face weights load)."""
    cfg = GPT_CONFIGS[name]
    assert cfg["weight_tying"] and cfg["init"] == "gpt2" and cfg["qkv_bias"]
    with torch.device("meta"):
        model = GPTModel(cfg)
    assert model.out_head.weight is model.tok_emb.weight


def test_unknown_init_is_refused():
    with pytest.raises(ValueError, match="pytorch"):
        GPTModel({**TINY, "init": "xavier"})


# ---------------------------------------------------------------------------------------------
# Hugging Face GPT-2 checkpoints

HF_EXPECTED_CFG = {"vocab_size": VOCAB, "context_length": 64, "emb_dim": 48, "n_heads": 3,
                   "n_layers": 2, "drop_rate": 0.0, "qkv_bias": True, "weight_tying": True,
                   "init": "gpt2"}


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    """A random tiny transformers GPT-2, every parameter (LayerNorms and biases too) moved away from
    its init, saved as model.safetensors and as pytorch_model.bin. Returns (hf_model, dirs)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(1234)
    config = transformers.GPT2Config(n_embd=48, n_layer=2, n_head=3, n_positions=64,
                                     vocab_size=VOCAB, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0)
    hf = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()

    st_dir = tmp_path_factory.mktemp("hf_safetensors")
    hf.save_pretrained(st_dir)
    assert (st_dir / "model.safetensors").is_file()

    bin_dir = tmp_path_factory.mktemp("hf_bin")
    try:  # transformers 4.x writes pytorch_model.bin; 5.x ignores the flag and writes safetensors
        hf.save_pretrained(bin_dir, safe_serialization=False)
    except TypeError:
        hf.config.save_pretrained(bin_dir)
    if not (bin_dir / "pytorch_model.bin").is_file():
        (bin_dir / "model.safetensors").unlink(missing_ok=True)
        torch.save(hf.state_dict(), bin_dir / "pytorch_model.bin")
    assert not (bin_dir / "model.safetensors").exists()
    return hf, {"safetensors": st_dir, "bin": bin_dir}


def _hf_logits(hf, idx):
    with torch.no_grad():
        return hf(idx).logits


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_hf_checkpoint_gives_same_logits(hf_checkpoint, fmt):
    """Our model with the checkpoint's weights must give transformers' logits. A missing Conv1D
    transpose, a mis-mapped LayerNorm or a dropped bias shows up as a large difference."""
    hf, dirs = hf_checkpoint
    cfg = hf_gpt2_config(dirs[fmt])
    assert cfg == HF_EXPECTED_CFG
    model = load_hf_gpt2(GPTModel(cfg), dirs[fmt]).eval()
    assert model.out_head.weight is model.tok_emb.weight  # still tied after loading
    idx = random_ids(2, 20, seed=5)
    expected = _hf_logits(hf, idx)
    with torch.no_grad():
        got = model(idx)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)

    # the comparison is sensitive: transposing the one square projection (c_proj, which the
    # shape check cannot catch) moves the logits far beyond the tolerance
    with torch.no_grad():
        w = model.trf_blocks[0].att.out_proj.weight
        w.copy_(w.T.clone())
        assert (model(idx) - expected).abs().max() > 1e-3


@pytest.mark.parametrize("fmt, name", [("safetensors", "model.safetensors"),
                                       ("bin", "pytorch_model.bin")])
def test_hf_checkpoint_file_path(hf_checkpoint, fmt, name):
    """The weights file itself may be passed (as a str); config.json is read from its folder."""
    hf, dirs = hf_checkpoint
    path = str(dirs[fmt] / name)
    cfg = hf_gpt2_config(path)
    assert cfg == HF_EXPECTED_CFG
    model = load_hf_gpt2(GPTModel(cfg), path).eval()
    idx = random_ids(1, 12, seed=6)
    with torch.no_grad():
        torch.testing.assert_close(model(idx), _hf_logits(hf, idx), rtol=0, atol=1e-5)


def test_hf_checkpoint_file_as_pathlib_path(hf_checkpoint):
    """A pathlib.Path to the weights file must work like a str (a folder Path already does).
    Known library bug: _read_hf_state_dict calls path.endswith(...), which Path lacks."""
    hf, dirs = hf_checkpoint
    path = dirs["safetensors"] / "model.safetensors"
    assert isinstance(path, Path)
    model = GPTModel(hf_gpt2_config(path))
    try:
        load_hf_gpt2(model, path)
        error = None
    except AttributeError as e:
        error = e
    assert error is None, f"load_hf_gpt2(model, Path('.../model.safetensors')) raised: {error!r}"
    idx = random_ids(1, 12, seed=6)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(idx), _hf_logits(hf, idx), rtol=0, atol=1e-5)


def test_hf_checkpoint_into_padded_vocab(hf_checkpoint):
    """Loading into a 50304-row table fills the first 50257 rows and logits still match."""
    hf, dirs = hf_checkpoint
    cfg = {**hf_gpt2_config(dirs["safetensors"]), "pad_vocab_multiple": 64}
    model = load_hf_gpt2(GPTModel(cfg), dirs["safetensors"]).eval()
    assert model.tok_emb.weight.shape == (50304, 48)
    assert model.out_head.weight is model.tok_emb.weight
    torch.testing.assert_close(model.tok_emb.weight[:VOCAB], hf.transformer.wte.weight,
                               rtol=0, atol=0)
    idx = random_ids(2, 20, seed=7)
    with torch.no_grad():
        got = model(idx)
    assert got.shape == (2, 20, VOCAB)
    torch.testing.assert_close(got, _hf_logits(hf, idx), rtol=0, atol=1e-5)


def test_hf_missing_path_raises(tmp_path):
    missing = tmp_path / "no-such-checkpoint"
    with pytest.raises(FileNotFoundError):
        hf_gpt2_config(missing)
    with pytest.raises(FileNotFoundError):
        load_hf_gpt2(tiny_model(), missing)
    with pytest.raises(FileNotFoundError):
        load_hf_gpt2(tiny_model(), tmp_path)  # a folder without weights
    with pytest.raises(FileNotFoundError):
        load_hf_gpt2(tiny_model(), tmp_path / "model.safetensors")


# ---------------------------------------------------------------------------------------------
# Generation

def reference_greedy(model, idx, max_new_tokens, context_size):
    """The book's loop: crop, take the last position's logits, append the argmax."""
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(idx[:, -context_size:])[:, -1, :]
            idx = torch.cat([idx, logits.argmax(-1, keepdim=True)], dim=1)
    return idx


def test_greedy_is_deterministic_and_matches_reference():
    model = tiny_model()
    idx = random_ids(2, 5, seed=3)
    out = generate(model, idx, max_new_tokens=8, context_size=32)
    assert out.shape == (2, 13)
    assert torch.equal(out[:, :5], idx)
    assert torch.equal(out, generate(model, idx, max_new_tokens=8, context_size=32))
    assert torch.equal(out, generate_text_simple(model, idx, max_new_tokens=8, context_size=32))
    assert torch.equal(out, reference_greedy(model, idx, 8, 32))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 5.0])
def test_top_k_1_sampling_equals_greedy(temperature):
    """With top_k=1 only the argmax survives the filter, whatever the temperature."""
    model = tiny_model()
    idx = random_ids(2, 5, seed=3)
    greedy = generate(model, idx, max_new_tokens=6, context_size=32)
    sampled = generate(model, idx, max_new_tokens=6, context_size=32, temperature=temperature,
                       top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sampled, greedy)


def test_top_k_sampling_stays_in_top_k_and_is_seeded():
    """Samples come only from the k most likely tokens (an off-by-one in the filter lets the
    (k+1)-th through), and the same generator seed gives the same samples."""
    model = tiny_model()
    idx = random_ids(1, 5, seed=3)
    with torch.no_grad():
        top3 = set(model(idx)[0, -1].topk(3).indices.tolist())
    gen = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(200):
        out = generate(model, idx, max_new_tokens=1, context_size=32, temperature=100.0, top_k=3,
                       generator=gen)
        seen.add(out[0, -1].item())
    assert seen == top3  # high temperature: all three appear, nothing else does

    def sample(seed):
        return generate(model, idx, max_new_tokens=10, context_size=32, temperature=1.0,
                        generator=torch.Generator().manual_seed(seed))

    assert torch.equal(sample(1), sample(1))
    assert not torch.equal(sample(1), sample(2))


def test_generate_crops_to_context():
    """A prompt longer than context_length works: only the last context_size tokens are fed."""
    model = tiny_model()
    ctx = TINY["context_length"]
    idx = random_ids(1, ctx + 8, seed=4)
    out = generate(model, idx, max_new_tokens=5, context_size=ctx)
    assert out.shape == (1, ctx + 13)
    assert torch.equal(out[:, :ctx + 8], idx)
    assert torch.equal(out, reference_greedy(model, idx, 5, ctx))
    # the first new token only depends on the last ctx tokens of the prompt
    tail = generate(model, idx[:, -ctx:], max_new_tokens=1, context_size=ctx)
    assert out[0, ctx + 8] == tail[0, -1]
    with pytest.raises(ValueError):  # not cropping to the context fails in forward
        generate(model, idx, max_new_tokens=1, context_size=ctx + 8)


def constant_model(token):
    """A tiny model whose greedy next token is always `token`: final_norm outputs a constant
    vector b (weight 0), and the embedding row of `token` is a large multiple of b."""
    model = tiny_model()
    with torch.no_grad():
        b = torch.randn(TINY["emb_dim"])
        model.final_norm.scale.zero_()
        model.final_norm.shift.copy_(b)
        model.tok_emb.weight[token] = 10 * b
    return model


def test_eos_stops_generation():
    """eos_id stops after the step that produced it; a never-produced eos_id runs to the end."""
    model = constant_model(token=42)
    idx = random_ids(2, 4, seed=8)
    assert (generate(model, idx, 6, 32)[:, 4:] == 42).all()  # the model does what we built

    out = generate(model, idx, max_new_tokens=10, context_size=32, eos_id=42)
    assert out.shape == (2, 5)
    assert (out[:, -1] == 42).all()
    assert generate(model, idx, max_new_tokens=10, context_size=32, eos_id=43).shape == (2, 14)
    sampled = generate(model, idx, max_new_tokens=10, context_size=32, eos_id=42, top_k=1,
                       temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert sampled.shape == (2, 5)


def test_eos_on_random_model_first_greedy_token():
    """Same check on an ordinary model: take the first greedy token as eos_id."""
    model = tiny_model()
    idx = random_ids(1, 6, seed=9)
    first = generate(model, idx, 1, 32)[0, -1].item()
    out = generate(model, idx, max_new_tokens=20, context_size=32, eos_id=first)
    assert out.shape == (1, 7)
    assert out[0, -1].item() == first
