"""The README's experiments, run as the README shows them: every ```bash block and ```diff edit of
its "## Experiments" section, in a copy of the repository, and every line of each ```text block
found in what the commands printed. So the commands, the edits and the figures cannot drift.

A shown line may hold `...` (any text: times, process ids, paths); a line that is only `...`
stands for lines left out. A `sha256 <16 hex digits>` matches any digest, but digests the README
shows equal must come out equal, and those it shows different, different (the digests themselves
depend on the CPU and the torch build). The Chinese README's section holds the same code blocks.
"""
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import ROOT, finish, script_env

SECTIONS = {"README.md": "## Experiments", "README.zh-CN.md": "## 实验"}
BLOCK = re.compile(r"^```(bash|diff|text)\n(.*?)^```$", re.M | re.S)
DIGEST = re.compile(r"sha256 [0-9a-f]{16}")
TIMEOUT = 240  # seconds for one ```bash block (the slowest takes about 30 s alone)


def section(readme):
    """The text of the readme's experiments section, from its heading to the next `## `."""
    text = (ROOT / readme).read_text()
    heading = SECTIONS[readme]
    match = re.search(rf"^{re.escape(heading)}\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert match, f"{readme} has no section {heading!r}"
    return match.group(1)


def experiments(readme="README.md"):
    """(the blocks before the first ###: the shell set-up, [(title, [(kind, body), ...]), ...])."""
    parts = re.split(r"^### (.+)\n", section(readme), flags=re.M)
    blocks = [BLOCK.findall(part) for part in parts]
    return blocks[0], list(zip(parts[1::2], blocks[2::2]))


def edit_of(diff):
    """(file, old line, new line) of a ```diff block: `@@ FILE ... @@`, one `-` and one `+` line."""
    lines = diff.splitlines()
    header = [line for line in lines if line.startswith("@@ ")]
    old = [line[1:] for line in lines if line.startswith("-")]
    new = [line[1:] for line in lines if line.startswith("+")]
    assert len(header) == 1 and len(old) == 1 and len(new) == 1, f"not a one-line edit:\n{diff}"
    return header[0].split()[1].rstrip(","), old[0], new[0]


def apply_edit(copy, diff):
    path, old, new = edit_of(diff)
    lines = (copy / path).read_text().splitlines(keepends=True)
    found = [i for i, line in enumerate(lines) if line.rstrip("\n") == old]
    assert len(found) == 1, f"{path} holds the line to edit {len(found)} times, not once: {old!r}"
    lines[found[0]] = new + "\n"
    (copy / path).write_text("".join(lines))


def tools(folder):
    """`python` and `torchrun` as the README's commands call them, for this interpreter."""
    folder.mkdir()
    for name, run in (("python", ""), ("torchrun", "-m torch.distributed.run ")):
        (folder / name).write_text(f'#!/bin/sh\nexec "{sys.executable}" {run}"$@"\n')
        (folder / name).chmod(0o755)
    return folder


def run_block(script, copy, env):
    """A ```bash block in the copy, with the set-up before it: its output, stderr after stdout."""
    proc = subprocess.Popen(["bash", "-c", script], cwd=copy, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    proc.mark = env["GPT_DDP_TEST_MARK"]
    result = finish(proc, TIMEOUT)
    assert not result.leftovers, f"processes left behind: {result.leftovers}\n{result.stdout}"
    return result.returncode, result.stdout


def run_experiment(setup, blocks, base, cache):
    """Every block of one experiment, in order, in a fresh copy of the repository (edits apply
    to the copy; runs/ lands in it). Returns [(rc, output) per bash block], [shown text blocks]."""
    copy = base / "repo"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(
        ".git", "runs", "out", "__pycache__", ".pytest_cache", ".whl", ".gl", "gpu-results"))
    env = script_env(cache, PYTHONPATH=copy)
    env["PATH"] = f"{tools(base / 'bin')}{os.pathsep}{env['PATH']}"
    prelude = "".join(body for kind, body in setup if kind == "bash")
    ran, shown = [], []
    for kind, body in blocks:
        if kind == "bash":
            ran.append(run_block(prelude + body, copy, env))
        elif kind == "diff":
            apply_edit(copy, body)
        else:
            shown.append(body)
    return ran, shown


def pattern(shown):
    """A regex for one shown line: `...` is any text, a digest is captured."""
    parts = re.split(r"(\.\.\.|sha256 [0-9a-f]{16})", shown.rstrip())
    return re.compile("".join(".*" if p == "..." else r"sha256 ([0-9a-f]{16})" if DIGEST.fullmatch(p)
                              else re.escape(p) for p in parts))


def check_shown(shown_blocks, output):
    """Each shown line matches its own line of the output (the first unused one that fits);
    returns [(shown digest, printed digest), ...]."""
    lines = [line.rstrip() for line in output.splitlines()]
    used, digests = set(), []
    for block in shown_blocks:
        for shown in block.splitlines():
            if shown.strip() == "...":
                continue
            regex = pattern(shown)
            hit = next((i for i, line in enumerate(lines) if i not in used and regex.fullmatch(line)),
                       None)
            assert hit is not None, f"the README shows {shown!r}; the commands printed:\n{output}"
            used.add(hit)
            digests += zip([d[7:] for d in DIGEST.findall(shown)], regex.fullmatch(lines[hit]).groups())
    for a_shown, a_real in digests:  # shown equal if and only if printed equal
        for b_shown, b_real in digests:
            assert (a_shown == b_shown) == (a_real == b_real), (
                f"the README shows {a_shown} and {b_shown}; the runs printed {a_real} and {b_real}")
    return digests


SETUP, EXPERIMENTS = experiments()


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, token_cache):
    """All experiments, two at a time (each runs up to two processes, several only wait)."""
    pool = ThreadPoolExecutor(max_workers=2)
    futures = [pool.submit(run_experiment, SETUP, blocks, tmp_path_factory.mktemp(f"experiment{i}"),
                           token_cache) for i, (_, blocks) in enumerate(EXPERIMENTS, 1)]
    yield futures
    for future in futures:
        future.cancel()
    pool.shutdown(wait=True)


def test_the_section_has_five_experiments_with_commands_and_output():
    assert [kind for kind, _ in SETUP] == ["bash"] and "OMP_NUM_THREADS=1" in SETUP[0][1]
    assert len(EXPERIMENTS) == 5
    for title, blocks in EXPERIMENTS:
        kinds = [kind for kind, _ in blocks]
        assert "bash" in kinds and "text" in kinds and kinds.count("diff") <= 1, title


def code(readme):
    """The section's code blocks, the shell's comments (two spaces, then `#`) left out: the
    Chinese README translates them."""
    return [(kind, re.sub(r" {2,}#.*$", "", body, flags=re.M) if kind == "bash" else body)
            for kind, body in BLOCK.findall(section(readme))]


def test_the_chinese_section_holds_the_same_code():
    assert code("README.zh-CN.md") == code("README.md")


def test_a_wrong_figure_fails():
    """The checks catch a README that states what did not happen."""
    printed = "check: all 2 replicas hold identical weights (sha256 0123456789abcdef)\n" \
              "exp-accum 1.0 all-reduces a step\nerror: rank 0 was killed by SIGABRT: x\n"
    check_shown(["exp-accum 1.0 all-reduces ...\n...\nerror: rank 0 was killed ..."], printed)
    for wrong in ("exp-accum 4.0 all-reduces a step", "error: rank 1 was killed ...",
                  "done: 10 steps"):
        with pytest.raises(AssertionError):
            check_shown([wrong], printed)
    with pytest.raises(AssertionError):  # shown equal, printed different
        check_shown(["... (sha256 1111111111111111)\n... (sha256 1111111111111111)"],
                    printed + printed.replace("0123", "9999"))
    with pytest.raises(AssertionError):  # shown different, printed equal
        check_shown(["... (sha256 1111111111111111)\n... (sha256 2222222222222222)"],
                    printed + printed)
    with pytest.raises(AssertionError):
        edit_of("@@ DDP-script.py @@\n-a\n+b\n+c\n")


def experiment(outcomes, number):
    ran, shown = outcomes[number - 1].result(timeout=6 * TIMEOUT)
    output = "".join(out for _, out in ran)
    return ran, shown, output, check_shown(shown, output)


def test_1_two_processes_equal_one_accumulating(outcomes):
    ran, _, output, digests = experiment(outcomes, 1)
    assert [rc for rc, _ in ran] == [0]
    printed = [real for _, real in digests]
    assert len(printed) == 3 and printed[0] == printed[1] != printed[2], output


def test_2_no_sync_saves_three_all_reduces_of_four(outcomes):
    ran, _, output, _ = experiment(outcomes, 2)
    assert [rc for rc, _ in ran] == [0, 0]
    calls = dict(re.findall(r"^(exp-accum\S*) (\S+) all-reduces a step$", output, flags=re.M))
    assert float(calls["exp-accum-edited"]) == 4 * float(calls["exp-accum"]) >= 4, output


def test_3_set_epoch_changes_the_order_shards_are_disjoint(outcomes):
    ran, _, output, _ = experiment(outcomes, 3)
    assert [rc for rc, _ in ran] == [0]
    rows = re.findall(r"^rank (\d): epoch 0 (\[.*?\]), again (\[.*?\]), set_epoch\(1\) (\[.*?\])$",
                      output, flags=re.M)
    assert len(rows) == 2 and all(first == again != epoch1 for _, first, again, epoch1 in rows), output
    assert re.search(r"^(\d+) windows in epoch 0, \1 distinct$", output, flags=re.M), output


def test_4_a_collective_on_rank_0_alone_fails_with_its_cause(outcomes):
    ran, shown, output, _ = experiment(outcomes, 4)
    assert [rc for rc, _ in ran] == [1], output  # the second run's exit code
    assert output.count("Traceback") == 0, output
    assert "error: rank 0 was killed by SIGABRT" in shown[0], shown  # the first run's cause
    assert "lost contact with another rank: nothing arrived within --timeout 10s" in shown[0], shown


def test_5_a_killed_worker_resumes_to_the_same_weights(outcomes):
    ran, shown, output, digests = experiment(outcomes, 5)
    assert [rc for rc, _ in ran] == [0], output
    assert "resumed from step 4" in shown[0] and output.count("resumed from step") == 1
    printed = {real for _, real in digests}
    assert len(digests) == 2 and len(printed) == 1, output
