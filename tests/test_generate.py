"""generate.py: continues a prompt with a run's model.pt (or ckpt.pt); bad input is one line."""
import pytest
import torch

import generate as cli
from conftest import SPLITS, ok, one_error, run
from data import get_tokenizer
from gpt_model import GPTModel, generate


def test_continues_with_the_trained_weights(runs, token_cache, capsys):
    """The printed text is the greedy continuation by the run's own weights, from model.pt (in a
    process of its own) and from the final snapshot alike."""
    out, _ = runs("2x4", SPLITS["2x4"])
    saved = torch.load(out / "model.pt", weights_only=True)
    model = GPTModel(saved["config"])
    model.load_state_dict(saved["model"])
    tokenizer = get_tokenizer()
    idx = torch.tensor([tokenizer.encode("Every effort moves you")])
    expected = tokenizer.decode(generate(model.eval(), idx, 12, 32, eos_id=tokenizer.eot_token)[0].tolist())
    printed = ok(run(["--model", out / "model.pt", "--max-new-tokens", 12], token_cache,
                     script="generate.py")).stdout
    assert printed == expected + "\n"
    assert printed.startswith("Every effort moves you") and len(printed) > len("Every effort moves you\n")
    assert cli.main(["--model", str(out / "ckpt.pt"), "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out == printed


@pytest.mark.parametrize("args, needle", [
    (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["--temperature", "-1"], "--temperature must be 0 (greedy) or more"),
    (["--top-k", "0"], "--top-k must be at least 1"),
    (["--prompt", ""], "--prompt is empty"),
])
def test_bad_flags(args, needle, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--model", "unused.pt", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1, err


def test_bad_model_files(runs, tmp_path, capsys):
    out, _ = runs("2x4", SPLITS["2x4"])
    not_torch = tmp_path / "notes.txt"
    not_torch.write_text("not a checkpoint")
    a_tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), a_tensor)
    old_layout = tmp_path / "old.pt"  # the names before the book's LayerNorm scale/shift
    saved = torch.load(out / "model.pt", weights_only=True)
    saved["model"] = {k.replace(".scale", ".weight").replace(".shift", ".bias"): v
                      for k, v in saved["model"].items()}
    torch.save(saved, old_layout)
    for path, needle in [(tmp_path / "missing.pt", "no file"), (tmp_path, "cannot read"),
                         (not_torch, "cannot read"), (a_tensor, "is not a model.pt or ckpt.pt"),
                         (old_layout, "holds weights this gpt_model.py cannot load")]:
        assert cli.main(["--model", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and needle in err and err.count("\n") == 1, err


def test_a_damaged_file_in_a_real_process(tmp_path, token_cache):
    """The same, in a process of its own: one line, exit 2, no traceback."""
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"\x80\x02garbage")
    line = one_error(run(["--model", bad], token_cache, script="generate.py"), "cannot read", 2)
    assert line.startswith("error: cannot read")
