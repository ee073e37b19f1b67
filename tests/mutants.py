"""Deliberate bugs, each applied alone to a copy of the repository, and the tests that must catch
them: a test suite that passes with one of these in place proves less than it says.

    python tests/mutants.py            # every mutant (several minutes)
    python tests/mutants.py no-sync    # the named ones

Prints one line a mutant: caught (the tests failed, as they must) or MISSED. Not run by pytest or
CI; run it after changing the tests or the code they guard.
"""
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# name: (file, the text, what it becomes, the tests that must fail)
MUTANTS = {
    "no-divide-by-accumulation": (
        "DDP-script.py", "scaler.scale(loss / plan.grad_accum).backward()",
        "scaler.scale(loss).backward()",
        ["tests/test_ddp_script.py::test_world_size_invariance"]),
    "all-reduce-sums": (
        "DDP-script.py", "return default_hooks.allreduce_hook(None, bucket)",
        "return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then("
        "lambda fut: fut.value()[0])",
        ["tests/test_ddp_script.py::test_world_size_invariance"]),
    "no-set-epoch": (
        "DDP-script.py", "train_loader.sampler.set_epoch(epoch)", "pass",
        ["tests/test_ddp_script.py::test_each_epoch_is_a_new_shuffle_the_same_on_every_rank"]),
    "no-set-epoch-torchrun": (
        "DDP-script-torchrun.py", "train_loader.sampler.set_epoch(epoch)", "pass",
        ["tests/test_torchrun.py::test_standalone_restart_resumes"]),
    "resume-in-first-epoch": (
        "ddp_support/progress.py", 'epoch, skip = ckpt["epoch"], ckpt["samples_in_epoch"]',
        'epoch, skip = 0, ckpt["samples_in_epoch"]',
        ["tests/test_reliability.py::test_crash_while_writing_a_checkpoint"]),
    "replica-check-of-rank-0-only": (
        "DDP-script.py", "dist.all_gather_object(digests, weights_sha256(raw_model))",
        "digests = [weights_sha256(raw_model)] * world_size",
        ["tests/test_ddp_script.py::test_replica_check_catches_a_replica_that_differs"]),
    "no-sync-removed": (
        "DDP-script.py", "with contextlib.nullcontext() if last_micro else model.no_sync():",
        "with contextlib.nullcontext():",
        ["tests/test_ddp_script.py::test_one_all_reduce_round_per_step"]),
    "bf16-compression-ignored": (
        "DDP-script.py", "return default_hooks.bf16_compress_hook(None, bucket)",
        "return default_hooks.allreduce_hook(None, bucket)",
        ["tests/test_ddp_script.py::test_bf16_gradient_compression"]),
    "start-up-stop-not-passed-on": (
        "ddp_support/process.py", "                if p.is_alive():\n                    os.kill(p.pid, stop[-1])",
        "                pass",
        ["tests/test_stops.py::test_stop_while_the_workers_start"]),
    "save-through-torch-path": (
        "ddp_support/progress.py", 'with open(tmp, "wb") as f:\n            torch.save(payload, f)',
        'with open(tmp + ".x", "wb") as f:\n            torch.save(payload, tmp)',
        ["tests/test_reliability.py::test_disk_full_while_saving"]),
    "book-recipe-clips": (
        "ddp_support/plan.py", '"weight_decay": 0.1, "max_norm": 0.0}',
        '"weight_decay": 0.1, "max_norm": 1.0}',
        ["tests/test_recipe.py::test_book_models_train_with_the_books_optimizer"]),
    "auto-precision-not-lowered": (
        "ddp_support/plan.py", "        plan = dataclasses.replace(plan, autocast=lowest_amp)",
        "        pass",
        ["tests/test_torchrun.py::test_amp_auto_trains_all_nodes_in_the_lowest_precision"]),
}


def main(names):
    for name in names or MUTANTS:
        path, old, new, tests = MUTANTS[name]
        with tempfile.TemporaryDirectory(prefix=f"mutant-{name}-") as tmp:
            copy = Path(tmp) / "repo"
            shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".git", "runs", "__pycache__"))
            text = (copy / path).read_text()
            assert text.count(old) == 1, f"{name}: {old!r} is not once in {path}"
            (copy / path).write_text(text.replace(old, new))
            result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                                     *tests], cwd=copy, capture_output=True, text=True)
            last = (result.stdout.strip().splitlines() or ["(no output)"])[-1]
            verdict = "caught" if result.returncode == 1 else "MISSED"
            print(f"{verdict}: {name} ({' '.join(t.split('::')[-1] for t in tests)}: {last})",
                  flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
