"""What the CUDA path changes, tested on the CPU: the vocabulary padding (50304 rows on GPUs) and
the fp16 scaler, in the model and in the snapshots."""
import dataclasses
import types

import pytest
import torch

from ddp_support.process import UsageError
from ddp_support.progress import Position, clean_state_dict, load_snapshot, save_snapshot
from gpt_model import GPT_CONFIGS, GPTModel, load_weights

SMALL = {"emb_dim": 32, "n_layers": 2, "n_heads": 2, "context_length": 16}
VOCAB = 50257


def padded(cfg):
    return {**cfg, "pad_vocab_multiple": 64}


@pytest.mark.parametrize("preset", ["book-124m", "gpt2-small"])
def test_padding_leaves_the_seeded_weights_alone(preset):
    """With the 47 padding rows on, every real row and every other parameter is what the same
    seed draws without them (the book's seed-123 weights on a GPU too); the padding is zeros."""
    cfg = {**GPT_CONFIGS[preset], **SMALL}
    torch.manual_seed(123)
    plain = GPTModel(cfg).state_dict()
    torch.manual_seed(123)
    model = GPTModel(padded(cfg))
    assert model.tok_emb.weight.shape == (50304, 32)
    assert (model.out_head.weight is model.tok_emb.weight) == bool(cfg.get("weight_tying"))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor[:plain[name].shape[0]], plain[name]), name
        assert not tensor[plain[name].shape[0]:].any(), name


@pytest.mark.parametrize("preset", ["book-124m", "gpt2-small"])
def test_saved_weights_hold_the_real_rows_only(preset):
    """model.pt and ckpt.pt of a padded model hold 50257 rows, as a CPU run's do: the unpadded
    model (the book's layout) loads them, and so does a padded one."""
    cfg = {**GPT_CONFIGS[preset], **SMALL}
    model = GPTModel(padded(cfg))
    state = clean_state_dict(model)
    assert state["tok_emb.weight"].shape == (VOCAB, 32) == state["out_head.weight"].shape
    assert state["tok_emb.weight"].untyped_storage().nbytes() == VOCAB * 32 * 4  # no hidden rows
    GPTModel(cfg).load_state_dict(state)
    again = load_weights(GPTModel(padded(cfg)), state)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in model.state_dict().items())


def train_steps(model, optimizer, steps):
    torch.manual_seed(0)
    for _ in range(steps):
        x = torch.randint(0, VOCAB, (2, 8))
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def snapshot_plan(tmp_path, cfg):
    """The few plan fields that save_snapshot and load_snapshot read."""
    ckpt = str(tmp_path / "ckpt.pt")
    return types.SimpleNamespace(ckpt_path=ckpt, resume_from=ckpt, global_batch=2, world_size=1,
                                 steps_per_epoch=10, model_config=cfg, as_dict=lambda: {})


def fresh(cfg):
    model = GPTModel(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return model, optimizer, scheduler


def test_snapshot_of_a_padded_model_resumes_exactly(tmp_path):
    """A snapshot of a padded model holds 50257 rows, AdamW's moments included; resumed into a
    padded model it continues bit for bit as if nothing had been saved."""
    cfg = padded({**GPT_CONFIGS["book-124m"], **SMALL, "drop_rate": 0.0})
    plan = snapshot_plan(tmp_path, cfg)
    model, optimizer, scheduler = fresh(cfg)
    train_steps(model, optimizer, 2)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    save_snapshot(plan, Position(2, 0, 2, 32), model, optimizer, scheduler, scaler)
    saved = torch.load(plan.ckpt_path, weights_only=True)
    assert saved["model"]["out_head.weight"].shape[0] == VOCAB
    moments = [t for entry in saved["optimizer"]["state"].values() for t in entry.values()
               if t.dim() == 2 and t.shape[1] == 32 and t.shape[0] > 1000]
    assert len(moments) == 4 and all(t.shape[0] == VOCAB for t in moments)  # 2 tensors x 2
    assert model.tok_emb.weight.shape[0] == 50304  # the live optimizer state is untouched
    assert all(s["exp_avg"].shape == p.shape for p, s in optimizer.state.items())

    resumed, resumed_opt, resumed_sched = fresh(cfg)
    position, world = load_snapshot(plan, resumed, resumed_opt, resumed_sched, scaler, "cpu")
    assert (position, world) == (Position(2, 0, 2, 32), 1)
    train_steps(model, optimizer, 1)
    train_steps(resumed, resumed_opt, 1)
    assert all(torch.equal(resumed.state_dict()[k], v) for k, v in model.state_dict().items())


def test_resume_into_fp16_from_a_snapshot_without_a_scaler(tmp_path):
    """A bf16 (or CPU, or --amp off) snapshot resumed with --amp fp16: its scaler state is empty,
    and the enabled scaler starts fresh instead of raising "The source state dict is empty"."""
    cfg = {**GPT_CONFIGS["gpt-nano"], **SMALL}
    plan = snapshot_plan(tmp_path, cfg)
    model, optimizer, scheduler = fresh(cfg)
    save_snapshot(plan, Position(), model, optimizer, scheduler,
                  torch.amp.GradScaler("cpu", enabled=False))
    assert torch.load(plan.ckpt_path, weights_only=True)["scaler"] == {}
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    load_snapshot(plan, *fresh(cfg), scaler, "cpu")
    assert scaler.is_enabled() and scaler.get_scale() == 2.0 ** 16


def test_a_gpu_snapshot_passes_the_checks_before_resuming():
    """The check before training accepts a padded model's 50257-row weights (and refuses others)."""
    from ddp_support.process import UsageError
    from ddp_support.progress import check_weights_fit
    cfg = padded({**GPT_CONFIGS["gpt2-small"], **SMALL})
    state = clean_state_dict(GPTModel(cfg))
    check_weights_fit({"config": cfg, "model": state}, "ckpt.pt")
    state["tok_emb.weight"] = state["tok_emb.weight"][:1000]
    with pytest.raises(UsageError, match="cannot load"):
        check_weights_fit({"config": cfg, "model": state}, "ckpt.pt")


@pytest.mark.parametrize("capabilities, chosen", [([(8, 0), (8, 6)], "bf16"),
                                                  ([(8, 0), (7, 5)], "fp16")])
def test_precision_follows_the_oldest_gpu_of_the_node(capabilities, chosen, tmp_path, token_cache,
                                                      monkeypatch):
    """--amp auto on a node with an A100 and a T4: fp16 for both ranks (bf16 only where every
    GPU of the job computes it), not what GPU 0 alone would say."""
    from ddp_support.plan import make_plan
    from conftest import load_script
    monkeypatch.setenv("GPT_DDP_CACHE", str(token_cache))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(capabilities))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: capabilities[i])
    monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: True)
    args = load_script().parse_args(["--model", "gpt-nano", "--out", str(tmp_path / "out")])
    plan = make_plan(args, "DDP-script.py", "test")
    assert (plan.device_type, plan.world_size, plan.autocast) == ("cuda", 2, chosen)


def test_between_nodes_precision_is_the_lowest_any_rank_computes(tmp_path, token_cache,
                                                                 monkeypatch):
    """A node of A100s (--amp auto: bf16) and a node of T4s (fp16) in one job: every rank trains
    in fp16 (the same start's all-reduce carries [step, tokens, precision, chosen by auto]);
    nodes that passed different --amp flags themselves are refused."""
    from ddp_support.plan import AUTOCASTS, check_same_start, make_plan
    from conftest import TINY, load_script
    monkeypatch.setenv("GPT_DDP_CACHE", str(token_cache))
    args = load_script().parse_args(TINY + ["--out", str(tmp_path / "out")])
    plan = dataclasses.replace(make_plan(args, "DDP-script.py", "test"), device_type="cuda",
                               autocast="bf16", autocast_chosen=True)
    a100, t4 = ([0, plan.n_tokens, AUTOCASTS.index(amp), 1] for amp in ("bf16", "fp16"))
    assert check_same_start(plan, lowest=a100, highest=a100).autocast == "bf16"
    lowered = check_same_start(plan, lowest=[min(p) for p in zip(a100, t4)],
                               highest=[max(p) for p in zip(a100, t4)])
    assert (lowered.autocast, lowered.amp_dtype) == ("fp16", torch.float16)
    flag = [0, plan.n_tokens, AUTOCASTS.index("fp16"), 0]  # --amp fp16 passed on one node
    with pytest.raises(UsageError, match=r"different precisions \(bf16 and fp16\)"):
        check_same_start(plan, lowest=[min(p) for p in zip(a100, flag)],
                         highest=[max(p) for p in zip(a100, flag)])
