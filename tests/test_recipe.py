"""The optimizer recipes: the book's models train with chapter 5's AdamW (every parameter decayed,
default betas, no clipping), the GPT-2 presets with GPT-2 practice; a snapshot keeps its recipe;
--train-eval-iters measures the training loss as the book does."""
import pytest
import torch

from conftest import SPLITS, TINY, load_script, metrics, ok, one_error, run

BOOK_FLAGS = ["--device", "cpu", "--context-length", "32", "--nprocs", "1"]


def plan_and_optimizer(flags, out, monkeypatch, token_cache):
    from ddp_support.plan import make_plan
    from gpt_model import GPTModel
    monkeypatch.setenv("GPT_DDP_CACHE", str(token_cache))
    script = load_script()
    plan = make_plan(script.parse_args(flags + ["--out", str(out)]), "DDP-script.py", "test")
    torch.manual_seed(0)
    model = GPTModel(plan.model_config)
    return plan, model, script.configure_optimizer(model, plan)


def hyperparameters(group):
    return {k: v for k, v in group.items() if k not in ("params", "fused", "foreach")}


def test_book_models_train_with_the_books_optimizer(tmp_path, token_cache, monkeypatch):
    """book-mini's optimizer has the param groups and settings of the book's gpt_train.py,
    `torch.optim.AdamW(model.parameters(), lr=0.0004, weight_decay=0.1)`, and no clipping."""
    plan, model, optimizer = plan_and_optimizer(BOOK_FLAGS + ["--model", "book-mini"], tmp_path,
                                                monkeypatch, token_cache)
    book = torch.optim.AdamW(model.parameters(), lr=0.0004, weight_decay=0.1)
    assert len(optimizer.param_groups) == len(book.param_groups) == 1
    ours, theirs = optimizer.param_groups[0], book.param_groups[0]
    assert [id(p) for p in ours["params"]] == [id(p) for p in theirs["params"]]  # every parameter
    assert hyperparameters(ours) == hyperparameters(theirs)  # betas (0.9, 0.999), decay 0.1, ...
    assert ours["fused"] is True
    assert (plan.optimizer, plan.max_norm) == ("book", 0.0)


@pytest.mark.parametrize("preset", ["gpt-nano", "gpt2-small"])
def test_gpt2_presets_keep_gpt2_practice(preset, tmp_path, token_cache, monkeypatch):
    """The other presets: betas (0.9, 0.95), decay on matrices and embeddings only, clip at 1."""
    plan, model, optimizer = plan_and_optimizer(BOOK_FLAGS + ["--model", preset], tmp_path,
                                                monkeypatch, token_cache)
    decay, no_decay = optimizer.param_groups
    assert {id(p) for p in decay["params"]} == {id(p) for p in model.parameters() if p.dim() >= 2}
    assert {id(p) for p in no_decay["params"]} == {id(p) for p in model.parameters() if p.dim() < 2}
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    assert decay["betas"] == no_decay["betas"] == (0.9, 0.95)
    assert (plan.optimizer, plan.max_norm) == ("gpt2", 1.0)


def test_flags_change_the_recipe(tmp_path, token_cache, monkeypatch):
    flags = BOOK_FLAGS + ["--model", "book-mini", "--betas", "0.9", "0.95", "--decay", "matrices",
                          "--max-norm", "1", "--weight-decay", "0.01"]
    plan, model, optimizer = plan_and_optimizer(flags, tmp_path, monkeypatch, token_cache)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.01, 0.0]
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.95) and plan.max_norm == 1.0


def test_a_snapshot_keeps_its_recipe(tmp_path, token_cache):
    """A snapshot written before the recipes had names (no optimizer, betas or decay among its
    settings: GPT-2's recipe, two param groups) resumes with that recipe and its clipping, and
    trains on; a flag that its AdamW state contradicts is one error line."""
    out = tmp_path / "out"
    flags = TINY + ["--model", "book-mini", "--nprocs", "1", "--batch-size", "2", "--out", out,
                    "--betas", "0.9", "0.95", "--decay", "matrices", "--max-norm", "1"]
    ok(run(flags + ["--max-steps", "2"], token_cache, timeout=180))
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    for key in ("optimizer", "betas", "decay", "weight_decay"):
        del ckpt["args"][key]
    torch.save(ckpt, out / "ckpt.pt")
    before = (out / "ckpt.pt").read_bytes()
    resume = TINY + ["--model", "book-mini", "--nprocs", "1", "--batch-size", "2", "--out", out,
                     "--resume", "--max-steps", "4"]
    one_error(run(resume + ["--betas", "0.9", "0.999"], token_cache),
              f"error: the snapshot in {out} trains with --betas (0.9, 0.95), not (0.9, 0.999): "
              f"drop --betas, or start a fresh run with a new --out", 2)
    assert (out / "ckpt.pt").read_bytes() == before
    result = ok(run(resume, token_cache, timeout=180))
    assert "plan: optimizer: AdamW (GPT-2's): betas 0.9/0.95, weight decay 0.1 on matrices and " \
           "embeddings, clip 1" in result.stdout
    assert "resumed from step 2" in result.stdout and "done: 4 steps" in result.stdout


def test_train_eval_iters_is_the_same_between_world_sizes(tmp_path, token_cache):
    """--train-eval-iters 1: the eval-mode loss over the first batch of each rank, all-reduced;
    1 process x 8 sequences and 2 x 4 see the same 8 sequences (the sampler deals one order), so
    the same loss, on the validation steps only."""
    flags = TINY + ["--max-steps", "10", "--train-eval-iters", "1", "--eval-every", "10"]
    rows = {}
    for split in ("1x8", "2x4"):
        ok(run(flags + SPLITS[split] + ["--out", tmp_path / split], token_cache, timeout=180))
        rows[split] = metrics(tmp_path / split)
    for split, split_rows in rows.items():
        assert [r["step"] for r in split_rows] == [5, 10]
        assert split_rows[0]["train_loss_eval_mode"] is None  # step 5: no validation
        assert split_rows[1]["train_loss_eval_mode"] != pytest.approx(split_rows[1]["train_loss"],
                                                                      abs=1e-3)
    one, two = rows["1x8"][1]["train_loss_eval_mode"], rows["2x4"][1]["train_loss_eval_mode"]
    assert one == pytest.approx(two, abs=1e-4)
