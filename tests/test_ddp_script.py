"""DDP-script.py run for real: spawned Gloo processes on the CPU, torchrun, torch.distributed.launch."""
import math
import shutil
import signal
import sys

import pytest
import torch

from conftest import (FAULTS, RESUME, RESUME_EPOCH_STEPS, RESUME_STEPS, SPLITS, TINY, TORCHRUN,
                      free_port, load_script, load_weights, metrics, no_gpu, ok, one_error, records,
                      run, same_weights, weights_sha256)
from gpt_model import GPT_CONFIGS, GPTModel

def test_trains_and_writes_outputs(runs):
    out, result = runs("2x4", SPLITS["2x4"])
    assert "world size 2 (gloo on cpu, 1 thread(s) per process), started by mp.spawn" in result.stdout
    assert "8 sequences, 256 tokens per step" in result.stdout
    assert "check: all 2 replicas hold identical weights" in result.stdout
    assert "sample: Every effort moves you" in result.stdout
    assert "Traceback" not in result.stderr
    rows = metrics(out)
    assert [r["step"] for r in rows] == [5, 10]
    assert rows[-1]["tokens_seen"] == 10 * 8 * 32
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] < 10.9
    assert all(r["val_loss"] is not None for r in rows)
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]
    for key in ("epoch", "lr", "tokens_per_sec"):
        assert key in rows[-1]
    for name in ("ckpt.pt", "model.pt", "loss.png", "metrics.jsonl"):
        assert (out / name).stat().st_size > 0
    # model.pt loads into a plain GPTModel, no DDP, no prefixes
    saved = torch.load(out / "model.pt", map_location="cpu", weights_only=True)
    model = GPTModel(saved["config"])
    model.load_state_dict(saved["model"])
    ckpt = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)
    assert ckpt["step"] == 10 and ckpt["world_size"] == 2
    assert all(torch.equal(ckpt["model"][k], v) for k, v in saved["model"].items())


def grad_norms(probed):
    """Each step's gradient norm before clipping, as clip_grad_norm_ returned it (the probe's
    record); the same on every rank, since the gradients were all-reduced."""
    per_rank = [[r["value"] for r in rows] for rows in records(probed, "grad_norm").values()]
    assert all(norms == per_rank[0] for norms in per_rank), per_rank
    return per_rank[0]


def initial_weights(config, seed=123):
    """The weights the scripts start from: GPTModel drawn right after torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    return GPTModel(config).state_dict()


def distance(a, b):
    return math.sqrt(sum(((a[k] - b[k]).double() ** 2).sum().item() for k in a))


def test_world_size_invariance(runs):
    """2 x 4, 1 x 8 and 2 x 1 x (4 accumulated) see the same 8 sequences per step, so the same
    gradient: its norm before clipping matches in every step (a loss not divided by the
    accumulation steps makes it 4 times larger, an all-reduce that sums instead of averaging 2
    times; AdamW would hide either in the weights), and so do the weights."""
    norms = {name: grad_norms(runs(name, args)[1].probe) for name, args in SPLITS.items()}
    assert len(norms["2x4"]) == 10
    for name in ("1x8", "2x1x4"):
        assert norms[name] == pytest.approx(norms["2x4"], rel=1e-5), name
    weights = {name: load_weights(runs(name, args)[0]) for name, args in SPLITS.items()}
    ref = weights["2x4"]
    for name in ("1x8", "2x1x4"):
        for k in ref:
            torch.testing.assert_close(weights[name][k], ref[k], rtol=0, atol=1e-5, msg=f"{name} {k}")
    # Training moved the weights far beyond that tolerance, from the seeded start (which is the
    # real start: the trained weights lie near it, not as far as another seed's draw).
    config = torch.load(runs("2x4", SPLITS["2x4"])[0] / "model.pt", weights_only=True)["config"]
    init = initial_weights(config)
    assert max((ref[k] - init[k]).abs().max().item() for k in ref) > 1e-3
    assert distance(ref, init) < 0.2 * distance(initial_weights(config, seed=124), init)


def bucket_rounds(probed):
    """DDP's gradient all-reduces per optimizer step on each rank, as the probe saw them handed
    to Gloo: {rank: {step: [(dtype, bytes), ...]}} (the other all-reduces carry a few numbers)."""
    rounds = {}
    for rank, rows in records(probed, "allreduce").items():
        steps = rounds.setdefault(rank, {})
        for r in rows:
            if r["numel"] > 64:
                steps.setdefault(r["step"], []).append((r["dtype"], r["bytes"]))
    return rounds


def ddp_buckets(probed):
    """DDP's own gradient bucket sizes in bytes (its logging data), the same on every rank."""
    finals = list(records(probed, "final").values())
    assert all(len(f) == 1 and f[0]["buckets"] == finals[0][0]["buckets"] for f in finals)
    return finals[0][0]["buckets"]


def test_gradients_stay_in_ddps_buckets(runs):
    """gradient_as_bucket_view=True makes each gradient a view of DDP's bucket, so backward adds
    into the bucket and DDP copies nothing; zero_grad(set_to_none=False) keeps it so. (With
    set_to_none=True every step's gradients would be new tensors that DDP copies in.)"""
    _, result = runs("2x4", SPLITS["2x4"])
    buckets = {rank: rows[-1]["buckets"] for rank, rows in records(result.probe, "final").items()}
    for rank, rows in records(result.probe, "zero_grad").items():
        assert len(rows) == 10 and all(r["kept"] for r in rows), rows
        assert {r["storages"] for r in rows} == {len(buckets[rank])}, (rows, buckets)


def test_one_all_reduce_round_per_step(runs):
    """Each optimizer step all-reduces each of DDP's buckets once, also with accumulation 4
    (no_sync keeps the first three micro-batches' gradients local); the log's figures are those."""
    for name in ("2x4", "2x1x4"):
        out, result = runs(name, SPLITS[name])
        buckets = ddp_buckets(result.probe)
        assert buckets and sum(buckets) == 4 * sum(p.numel() for p in GPTModel(
            torch.load(out / "model.pt", weights_only=True)["config"]).parameters())
        rounds = bucket_rounds(result.probe)
        assert sorted(rounds) == [0, 1]
        for steps in rounds.values():
            assert sorted(steps) == list(range(1, 11)), name
            for step, calls in steps.items():
                assert sorted(b for _, b in calls) == sorted(buckets), (name, step, calls)
                assert all(dtype == "float32" for dtype, _ in calls)
        last = metrics(out)[-1]
        assert last["allreduce_calls_per_step"] == len(buckets)
        assert last["allreduce_mb_per_step"] * 2**20 == pytest.approx(sum(buckets))


def test_replicas_identical_seen_from_outside(runs):
    """Every rank's own weights, hashed by the probe as the process group ends: the same on each
    rank, and those in model.pt (the script's own check is not taken at its word)."""
    for name in ("2x4", "2x1x4"):
        out, result = runs(name, SPLITS[name])
        assert "check: all 2 replicas hold identical weights" in result.stdout
        finals = records(result.probe, "final")
        assert sorted(finals) == [0, 1] and all(len(f) == 1 for f in finals.values())
        assert finals[0][0]["sha256"] == finals[1][0]["sha256"] == weights_sha256(load_weights(out))


def test_replica_check_catches_a_replica_that_differs(tmp_path, token_cache):
    """One weight of rank 1 nudged mid-run (DDP syncs gradients, not weights, so the replicas then
    stay apart): the replica check must see it on every rank and end the run with exit 3."""
    result = run(TINY + SPLITS["2x4"] + ["--max-steps", "4", "--out", tmp_path], token_cache,
                 PYTHONPATH=FAULTS, GPT_DDP_FAULT="perturb:1:2")
    one_error(result, "the replicas' weights differ after training", 3)
    assert "check: all 2 replicas" not in result.stdout and not (tmp_path / "model.pt").exists()


def test_each_epoch_is_a_new_shuffle_the_same_on_every_rank(uninterrupted, token_cache):
    """The order the ranks trained in, as DistributedSampler handed it out (the probe): every
    epoch a new permutation (set_epoch), the seeded one, split into disjoint shards."""
    orders = epoch_orders(uninterrupted.parent / "probe")
    assert sorted(orders) == [0, 1]
    windows = len(training_loader(token_cache, RESUME).dataset)
    assert windows // 2 // 2 == RESUME_EPOCH_STEPS  # windows per rank // batch size
    for rank, passes in orders.items():
        assert [epoch for epoch, _ in passes] == [0, 1]  # 40 steps: into the second epoch
        assert passes[0][1] != passes[1][1]
        for epoch, indices in passes:
            perm = torch.randperm(windows, generator=torch.Generator().manual_seed(123 + epoch))
            assert indices == perm.tolist()[:windows // 2 * 2][rank::2]
    for epoch in (0, 1):
        assert not set(orders[0][epoch][1]) & set(orders[1][epoch][1])


def epoch_orders(probed):
    """{rank: [(epoch, indices), ...]}: each pass of DistributedSampler, as the probe saw it."""
    return {rank: [(r["epoch"], r["indices"]) for r in rows]
            for rank, rows in records(probed, "order").items()}


def training_loader(cache, flags):
    """The training loader the scripts build for these flags, rank 0, in this process."""
    import data
    tokens = data.prepare_tokens(None, str(cache))
    train, _ = data.split_tokens(tokens, 0.1)
    get = lambda name: int(flags[flags.index(name) + 1])
    return data.create_dataloader(train, batch_size=get("--batch-size"),
                                  max_length=get("--context-length"),
                                  stride=get("--context-length"), shuffle=True, drop_last=True,
                                  distributed=True, num_replicas=get("--nprocs"), rank=0, seed=123)


def test_same_seed_same_weights(uninterrupted, tmp_path, token_cache):
    ok(run(RESUME + ["--out", tmp_path], token_cache))
    a, b = load_weights(uninterrupted), load_weights(tmp_path)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_then_resume_matches_uninterrupted(uninterrupted, tmp_path, token_cache):
    """SIGTERM to the job's main process (as a scheduler sends it) late in the first epoch: every
    rank stops at the same step and saves it; the resumed run crosses into the second epoch and
    ends with the uninterrupted run's weights, bit for bit, having trained in its very order."""
    signal_at = RESUME_EPOCH_STEPS - 3  # rank 0 signals its parent in step 33 (tests/faults)
    stopped = run(RESUME + ["--out", tmp_path], token_cache, PYTHONPATH=FAULTS,
                  GPT_DDP_FAULT=f"sigterm:{signal_at}")
    report = stopped.stdout + stopped.stderr
    assert stopped.returncode == 128 + signal.SIGTERM and not stopped.stderr, report
    step = torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"]
    # the step under way, or the next if the parent passed the signal on after a rank's check
    assert signal_at <= step <= signal_at + 1 < RESUME_EPOCH_STEPS, report
    assert f"stopped by SIGTERM after step {step}; {tmp_path / 'ckpt.pt'} holds it" in stopped.stdout
    assert not (tmp_path / "model.pt").exists()

    probed = tmp_path / "probe"
    probed.mkdir()
    resumed = ok(run(RESUME + ["--out", tmp_path, "--resume"], token_cache, PYTHONPATH=FAULTS,
                     GPT_DDP_PROBE=probed))
    assert f"resumed from step {step} (epoch 1, {step} step(s) into it)" in resumed.stdout
    assert same_weights(uninterrupted, tmp_path)
    steps = [r["step"] for r in metrics(tmp_path)]
    assert steps == sorted(set(steps)) and steps[-1] == RESUME_STEPS  # no step logged twice
    # epoch 1 (whose first steps it skipped), then epoch 2, shuffled anew
    assert epoch_orders(probed) == epoch_orders(uninterrupted.parent / "probe")


def test_resume_late_in_epoch_at_larger_world(tmp_path, token_cache):
    """1 process stops one step before its epoch ends; at 2 processes that remainder is less than
    a step, so the resumed run starts the next epoch (and does not crash on an empty epoch)."""
    flags = TINY + ["--batch-size", "11", "--out", tmp_path]
    first = ok(run(flags + ["--nprocs", "1", "--max-steps", "12"], token_cache))
    resumed = ok(run(flags + ["--nprocs", "2", "--max-steps", "14", "--resume"], token_cache))
    per_epoch = [int(r.stdout.split(" steps per epoch")[0].rsplit("plan: ", 1)[1])
                 for r in (first, resumed)]
    assert per_epoch[0] == 13  # so step 12 is one step before the end of epoch 1
    assert 12 * 11 // (11 * 2) >= per_epoch[1]  # and nothing of it is left at world size 2
    assert "resumed from step 12 (epoch 2, 0 step(s) into it)" in resumed.stdout
    assert "done: 14 steps" in resumed.stdout
    rows = metrics(tmp_path)
    assert [(r["step"], r["epoch"]) for r in rows][-1] == (14, 2)


def test_torchrun_runs_without_spawning(runs, tmp_path, token_cache):
    """Under torchrun the script is one rank; same settings, same weights as mp.spawn."""
    launcher = TORCHRUN + ["--standalone", "--nproc_per_node=2"]
    result = ok(run(TINY + SPLITS["2x4"][2:] + ["--out", tmp_path, "--max-steps", "10"],
                    token_cache, launcher=launcher))
    assert "started by a launcher" in result.stdout
    a, b = load_weights(runs("2x4", SPLITS["2x4"])[0]), load_weights(tmp_path)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_legacy_launch_passes_local_rank(tmp_path, token_cache):
    port = free_port()
    launcher = [sys.executable, "-m", "torch.distributed.launch", "--nproc_per_node=2",
                f"--master_port={port}", "--master_addr=127.0.0.1"]
    result = ok(run(TINY + ["--out", tmp_path, "--max-steps", "2", "--batch-size", "2"],
                    token_cache, launcher=launcher))
    assert "started by a launcher" in result.stdout
    assert (tmp_path / "model.pt").exists()


# ---------------------------------------------------------------------------------------------
# Bad input: one line, non-zero exit, seconds, nothing overwritten.

def expect_error(args, cache, needle, env=None):
    """Bad input: one `error:` line, exit 2, within the run's timeout, nothing left running."""
    return one_error(run(TINY + args, cache, timeout=60, **(env or {})), needle, 2)


@pytest.mark.parametrize("args, needle", [
    (["--nprocs", "0"], "--nprocs must be at least 1"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--grad-accum", "0"], "--grad-accum must be at least 1"),
    (["--context-length", "4096"], "outside 1..128"),
    pytest.param(["--backend", "nccl"], "--backend nccl needs CUDA", marks=no_gpu),
    pytest.param(["--device", "cuda"], "no CUDA GPU", marks=no_gpu),
    pytest.param(["--amp", "fp16"], "--amp fp16 needs a CUDA GPU", marks=no_gpu),
    (["--data", "/nonexistent/corpus.txt"], "data file not found: /nonexistent/corpus.txt"),
    (["--context-length", "128", "--batch-size", "64"], "--context-length"),
])
def test_bad_flags(args, needle, tmp_path, token_cache):
    expect_error(args + ["--out", tmp_path / "out"], token_cache, needle)
    assert not (tmp_path / "out").exists()


def test_bad_data_files(tmp_path, token_cache):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "binary.txt").write_bytes(b"\x00\xff\xfe" * 100)
    (tmp_path / "short.txt").write_text("Too short for one window.")
    (tmp_path / "folder").mkdir()
    out = ["--out", tmp_path / "out"]
    expect_error(["--data", tmp_path / "empty.txt"] + out, token_cache, "is empty")
    expect_error(["--data", tmp_path / "binary.txt"] + out, token_cache, "is not UTF-8")
    line = expect_error(["--data", tmp_path / "short.txt"] + out, token_cache, "tokens")
    assert "--context-length" in line
    expect_error(["--data", tmp_path / "folder"] + out, token_cache, "holds no .txt files")


def test_checkpoint_errors(runs, tmp_path, token_cache):
    """On a copy of a finished run (later tests read the shared one): nothing in it changes."""
    out = tmp_path / "run"
    shutil.copytree(runs("2x4", SPLITS["2x4"])[0], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    expect_error(["--out", out, "--max-steps", "10"], token_cache, "already exists: pass --resume")
    expect_error(["--out", tmp_path / "new", "--resume"], token_cache, "no checkpoint at")
    expect_error(["--out", out, "--resume", "--model", "gpt-mini"], token_cache,
                 "holds a gpt-nano model, not gpt-mini")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "ckpt.pt").write_bytes(before["ckpt.pt"][: len(before["ckpt.pt"]) // 2])
    expect_error(["--out", damaged, "--resume"], token_cache, "is damaged")
    assert (damaged / "ckpt.pt").read_bytes() == before["ckpt.pt"][: len(before["ckpt.pt"]) // 2]
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("script", ["DDP-script.py", "DDP-script-torchrun.py"])
def test_check_prints_the_plan_and_starts_nothing(script, runs, tmp_path, token_cache):
    """--check (what slurm/train.sbatch runs before torchrun): the checks before the first
    process, the plan, exit 0; no process group, no worker, no --out. Bad input: the same one
    error line and exit 2 as a run; a finished run's folder: refused, nothing in it changed."""
    result = ok(run(TINY + ["--check", "--out", tmp_path / "out", "--max-steps", "10"], token_cache,
                    script=script, timeout=60))
    world = 2 if script == "DDP-script.py" else 1
    assert f"plan: world size {world} (gloo on cpu, 1 thread(s) per process)" in result.stdout
    assert "plan: model gpt-nano: 2,503,392 parameters" in result.stdout
    assert "nothing was started (--check)" in result.stdout and not result.stderr
    assert "step" not in result.stdout.split("steps in all")[-1]  # no training step
    assert not (tmp_path / "out").exists()
    one_error(run(TINY + ["--check", "--batch-size", "0", "--out", tmp_path / "out"], token_cache,
                  script=script, timeout=60), "--batch-size must be at least 1", 2)
    finished = tmp_path / "finished"
    shutil.copytree(runs("2x4", SPLITS["2x4"])[0], finished)
    before = {p.name: p.read_bytes() for p in finished.iterdir()}
    one_error(run(TINY + ["--check", "--out", finished], token_cache, script=script, timeout=60),
              "already exists: pass --resume", 2)
    assert {p.name: p.read_bytes() for p in finished.iterdir()} == before


def test_master_port_in_use(tmp_path, token_cache):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        expect_error(["--out", tmp_path], token_cache, f"MASTER_PORT {port} on 127.0.0.1 is already in use",
                     env={"MASTER_PORT": port})


# ---------------------------------------------------------------------------------------------
# Options that change how the model is built or how gradients travel.

def test_compile_matches_eager(runs, tmp_path, token_cache):
    """torch.compile under DDP: the same training to float tolerance, plain keys in model.pt."""
    result = ok(run(TINY + SPLITS["2x4"] + ["--compile", "--max-steps", "10", "--out", tmp_path],
                    token_cache, timeout=300))
    assert "compiled" in result.stdout
    eager, compiled = load_weights(runs("2x4", SPLITS["2x4"])[0]), load_weights(tmp_path)
    assert eager.keys() == compiled.keys()  # no _orig_mod. or module. prefixes
    for k in eager:
        torch.testing.assert_close(compiled[k], eager[k], rtol=0, atol=1e-4)


def test_ranks_that_compile_at_different_speeds_meet_before_training(runs, tmp_path, token_cache):
    """--compile: the first forward and backward compile before training, with no collective
    waiting (under no_sync), and the evaluation's forward too; the ranks then meet in a wait of
    its own: one rank 12 s later than the other in each (training, then evaluation) is no
    --timeout 5 failure, and the training is what it is without the delays."""
    result = ok(run(TINY + SPLITS["2x4"] + ["--compile", "--max-steps", "10", "--timeout", "5",
                                            "--out", tmp_path], token_cache, timeout=300,
                    PYTHONPATH=FAULTS, GPT_DDP_FAULT="slow-loss:1:12"))
    assert "done: 10 steps" in result.stdout
    eager = load_weights(runs("2x4", SPLITS["2x4"])[0])
    for k, v in load_weights(tmp_path).items():
        torch.testing.assert_close(v, eager[k], rtol=0, atol=1e-4)


def test_bf16_gradient_compression(runs, token_cache):
    """--grad-compression bf16: what goes to Gloo is bf16, half the bytes of each fp32 bucket (as
    the probe saw it on the wire side); the rounding moves the weights, by little against how far
    training moved them."""
    plain_out, _ = runs("2x4", SPLITS["2x4"])
    out, result = runs("2x4-bf16", SPLITS["2x4"] + ["--grad-compression", "bf16"])
    assert "bf16 all-reduce" in result.stdout
    buckets = ddp_buckets(result.probe)
    for steps in bucket_rounds(result.probe).values():
        assert sorted(steps) == list(range(1, 11))
        for calls in steps.values():
            assert all(dtype == "bfloat16" for dtype, _ in calls)
            assert sorted(2 * b for _, b in calls) == sorted(buckets)
    plain, bf16 = metrics(plain_out)[-1], metrics(out)[-1]
    assert bf16["allreduce_mb_per_step"] * 2**20 == pytest.approx(sum(buckets) / 2)
    assert bf16["allreduce_mb_per_step"] == pytest.approx(plain["allreduce_mb_per_step"] / 2)
    assert bf16["train_loss"] < metrics(out)[0]["train_loss"]
    a, b = load_weights(plain_out), load_weights(out)
    assert not all(torch.equal(a[k], b[k]) for k in a)  # the gradients really were rounded
    moved = distance(a, initial_weights(torch.load(out / "model.pt", weights_only=True)["config"]))
    assert distance(a, b) < 0.05 * moved


def test_init_from_hugging_face_weights(tmp_path, token_cache):
    """--init-from: training starts from the given GPT-2 weights (lr ~0 keeps them)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from gpt_model import hf_gpt2_config, load_hf_gpt2
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_embd=48, n_layer=2, n_head=3, n_positions=64)).save_pretrained(
        tmp_path / "hf")
    flags = [a for a in TINY if a not in ("--model", "gpt-nano")]
    result = ok(run(flags + ["--nprocs", "2", "--batch-size", "2", "--max-steps", "2", "--lr", "1e-12",
                             "--init-from", tmp_path / "hf", "--out", tmp_path / "out"], token_cache))
    assert f"from {tmp_path / 'hf'}" in result.stdout
    expected = load_hf_gpt2(GPTModel(hf_gpt2_config(tmp_path / "hf")), tmp_path / "hf").state_dict()
    trained = load_weights(tmp_path / "out")
    for k, v in expected.items():
        torch.testing.assert_close(trained[k], v, rtol=0, atol=1e-6)
    expect_error(["--init-from", tmp_path / "hf", "--out", tmp_path / "o2"], token_cache,
                 "--model and --init-from both choose the model")


def test_checkpoint_keeps_tied_weights_as_one_tensor():
    """On a GPU each .cpu() call makes a new copy: the tied head and embedding must still be saved
    once (a tensor whose .cpu() copies, as a CUDA tensor's does, stands in for the GPU here)."""
    from ddp_support.progress import clean_state_dict

    class OnDevice(torch.Tensor):
        def cpu(self):
            return self.as_subclass(torch.Tensor).clone()

    model = GPTModel({**GPT_CONFIGS["gpt-nano"], "n_layers": 1})
    for p in model.parameters():
        p.data = p.data.as_subclass(OnDevice)
    state = clean_state_dict(model)
    assert state["out_head.weight"] is state["tok_emb.weight"]
    assert state["pos_emb.weight"] is not state["tok_emb.weight"]
    assert all(type(t) is torch.Tensor for t in state.values())
    assert all(torch.equal(t, model.state_dict()[k].as_subclass(torch.Tensor))
               for k, t in state.items())


@pytest.fixture(scope="module")
def script_module():
    return load_script()


def planned(script_module, argv, out):
    from ddp_support.plan import make_plan
    plan = make_plan(script_module.parse_args(argv + ["--out", str(out)]), "DDP-script.py", "test")
    return plan


def test_defaults_follow_the_model(script_module, token_cache, tmp_path, monkeypatch):
    """A bare run on the CPU trains gpt-mini with its quick recipe (warm-up, cosine decay); the
    book's model trains as in the book's chapter 5 (context 256, a constant 4e-4, 10 epochs)
    on any device; flags win over both."""
    monkeypatch.setenv("GPT_DDP_CACHE", str(token_cache))
    cpu = planned(script_module, ["--device", "cpu"], tmp_path / "a")
    assert (cpu.model, cpu.context_length, cpu.peak_lr, cpu.epochs) == ("gpt-mini", 128, 1e-3, 20)
    assert cpu.world_size == 2 and cpu.steps_per_epoch == 9 and cpu.total_steps == 180
    assert (cpu.warmup_steps, cpu.final_lr) == (18, 1e-4)

    book = planned(script_module, ["--model", "book-124m", "--nprocs", "1"], tmp_path / "b")
    assert (book.context_length, book.peak_lr, book.epochs) == (256, 4e-4, 10)
    assert (book.warmup_steps, book.final_lr) == (0, 4e-4)  # constant
    assert book.steps_per_epoch == 9 and book.batch_size == 2
    assert not book.model_config.get("weight_tying") and book.model_config.get("init") is None

    mine = planned(script_module, ["--model", "gpt-mini", "--lr", "5e-4", "--epochs", "3",
                                   "--min-lr", "5e-4", "--warmup-steps", "0"], tmp_path / "c")
    assert (mine.peak_lr, mine.epochs, mine.warmup_steps, mine.final_lr) == (5e-4, 3, 0, 5e-4)
    assert mine.as_dict()["peak_lr"] == 5e-4  # what ckpt["args"] records
