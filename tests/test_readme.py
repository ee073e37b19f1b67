"""The READMEs and docs/ cannot drift from the code: every flag their commands pass to a script
is one the script accepts, every line they point at holds the code they name (in code, not in a
comment or a docstring), and every grep listing is what the grep prints now.
`python tests/relink.py` re-points the links and re-runs the listings after a change."""
import re
import subprocess
import sys

import pytest

from conftest import ROOT
from relink import LISTING, PAGES, links, where

READMES = ["README.md", "README.zh-CN.md"]
DOCS = [page for page in PAGES if page.startswith("docs/")]
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


@pytest.mark.parametrize("page", DOCS)
def test_docs_commands_use_real_flags(page, accepted):
    flags_checked(page, accepted)


def wrong_links(text):
    """The links of `text` whose line does not hold their code, as messages."""
    wrong = []
    for code, path, line in links(text):
        found = where(code, path)
        if line not in found:
            wrong.append(f"{path}#L{line} should hold {code!r} in code; it is on {found}")
    return wrong


@pytest.mark.parametrize("page", PAGES)
def test_line_links_hold_their_code(page):
    text = (ROOT / page).read_text()
    assert not wrong_links(text), (f"{page}: run `python tests/relink.py`: "
                                   + "; ".join(wrong_links(text)))


def test_a_link_to_a_docstring_or_comment_is_wrong():
    """Line 7 of DDP-script.py names `ddp_setup` in the docstring: the word is there, the code is
    not, so the link is wrong (a check of the word alone passed it)."""
    line = next(n for n, text in enumerate((ROOT / "DDP-script.py").read_text().splitlines(), 1)
                if "`ddp_setup`" in text)
    assert wrong_links(f"[`ddp_setup`](DDP-script.py#L{line})")
    comment = next(n for n, text in enumerate((ROOT / "DDP-script.py").read_text().splitlines(), 1)
                   if text.strip().startswith("#") and "no_sync" in text)
    assert wrong_links(f"[`no_sync`](DDP-script.py#L{comment})")
    assert not wrong_links(f"[`def ddp_setup(`](DDP-script.py#L{where('def ddp_setup(', 'DDP-script.py')[0]})")


def test_the_readmes_pin_few_lines():
    """Pinned line links only where a reader needs the line (the appendix's table): elsewhere the
    READMEs name functions, so a change to a script does not mean editing both READMEs."""
    for readme in READMES:
        assert 5 <= len(links((ROOT / readme).read_text())) <= 14, readme


def test_links_hold_and_every_docs_page_is_linked_from_the_readme():
    """Every relative link of the READMEs and docs/ names a file that exists, and every page of
    docs/ is reached from README.md (the README is the map; a run's full output may hang off the
    page that quotes it)."""
    links = {}
    for page in PAGES:
        links[page] = set()
        for target in re.findall(r"\]\((?!https?://)([^)#\s]+)", (ROOT / page).read_text()):
            path = (ROOT / page).parent.joinpath(target).resolve()
            assert path.exists(), f"{page}: {target}"
            links[page].add(str(path.relative_to(ROOT)))
    reached, todo = set(), ["README.md"]
    while todo:
        page = todo.pop()
        for target in links.get(page, ()):
            if target not in reached:
                reached.add(target)
                todo.append(target)
    assert set(DOCS) <= reached, sorted(set(DOCS) - reached)
    assert {p for p in DOCS if "benchmark-" not in p} <= links["README.md"]


@pytest.mark.parametrize("page", PAGES)
def test_listings_are_what_the_grep_prints(page):
    for _, command, shown, _ in LISTING.findall((ROOT / page).read_text()):
        printed = subprocess.run(command, shell=True, cwd=ROOT, capture_output=True, text=True).stdout
        assert shown == printed, f"{page}: `{command}` prints otherwise now: run `python tests/relink.py`"
