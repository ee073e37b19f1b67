"""The READMEs cannot drift from the code: every flag their commands pass to a script is one the
script accepts, and every line they point at holds the code they name."""
import re
import subprocess
import sys

import pytest

from conftest import ROOT

READMES = ["README.md", "README.zh-CN.md"]
SCRIPTS = ["DDP-script.py", "DDP-script-torchrun.py", "generate.py", "preflight.py"]


@pytest.fixture(scope="module")
def accepted():
    """The flags each script's --help lists."""
    flags = {}
    for script in SCRIPTS:
        help_text = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True,
                                   text=True, timeout=60, check=True).stdout
        flags[script] = set(re.findall(r"(--[a-z][a-z0-9_-]*)", help_text))
    return flags


def commands(readme):
    """Lines of the README's shell code blocks, with backslash continuations joined."""
    text = (ROOT / readme).read_text()
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        yield from block.replace("\\\n", " ").splitlines()


def flags_checked(readme, accepted):
    """Asserts that every flag a command passes to a script is one it accepts; returns how many."""
    checked = 0
    for line in commands(readme):
        words = line.split("#")[0].split()
        for script in SCRIPTS:
            if script in words:
                for word in words[words.index(script) + 1:]:
                    if word.startswith("--"):
                        flag = word.split("=")[0]
                        assert flag in accepted[script], f"{readme}: {script} has no {flag}: {line}"
                        checked += 1
    return checked


@pytest.mark.parametrize("readme", READMES)
def test_readme_commands_use_real_flags(readme, accepted):
    assert flags_checked(readme, accepted) >= 10  # the READMEs do show commands with flags


def test_preflight_note_commands_use_real_flags(accepted):
    assert flags_checked("docs/preflight.md", accepted) >= 5


@pytest.mark.parametrize("readme", READMES)
def test_readme_line_references_hold_their_code(readme):
    refs = re.findall(r"\[`([^`]+)`\]\(([\w./-]+\.py)#L(\d+)\)", (ROOT / readme).read_text())
    assert len(refs) >= 5
    for code, path, line in refs:
        lines = (ROOT / path).read_text().splitlines()
        where = [i + 1 for i, text in enumerate(lines) if code in text]
        assert code in lines[int(line) - 1], f"{readme}: {path}#L{line} should hold {code!r}; it is on {where}"
