"""Keep the READMEs' pinned line links and grep listings in step with the code.

    python tests/relink.py          # re-point every [`code`](file.py#Lnn) link, re-run the listings

A link [`code`](file.py#Lnn) must point at a line whose code (not a comment, not a docstring)
holds `code`; after a change moves it, this moves the link to the nearest such line. A listing is
a ```bash block of one `grep -n ...` command followed by a ```text block: the text is replaced by
what the command prints now. tests/test_readme.py checks both, and names this command when they
drift.
"""
import ast
import io
import re
import subprocess
import sys
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = ["README.md", "README.zh-CN.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[`([^`]+)`\]\(((?:\.\./)?)([\w/-][\w./-]*\.py)#L(\d+)\)")
LISTING = re.compile(r"(```bash\n(grep -n [^\n]+)\n```\n\n```text\n)(.*?)(```)", re.S)


def code_lines(path):
    """{line number: the line's code}: comments removed, docstrings and blank lines left out."""
    source = (ROOT / path).read_text()
    docstrings = set()
    for node in ast.walk(ast.parse(source)):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and \
                isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            docstrings.update(range(body[0].lineno, body[0].end_lineno + 1))
    lines = source.splitlines()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            row, col = tok.start
            lines[row - 1] = lines[row - 1][:col]
    return {n: text for n, text in enumerate(lines, 1) if n not in docstrings and text.strip()}


def where(code, path):
    """The line numbers whose code holds `code`."""
    return [n for n, text in code_lines(path).items() if code in text]


def links(text):
    """(code, path from the repository's root, line) of each line link; a page in docs/ links
    with ../ in front."""
    return [(code, path, int(line)) for code, _, path, line in LINK.findall(text)]


def relink(text):
    def move(match):
        code, up, path, line = match.group(1), match.group(2), match.group(3), int(match.group(4))
        found = where(code, path)
        if not found:
            raise SystemExit(f"error: {path} holds no code line with {code!r}: fix the link by hand")
        best = min(found, key=lambda n: abs(n - line))
        return f"[`{code}`]({up}{path}#L{best})"
    return LINK.sub(move, text)


def relist(text):
    def rerun(match):
        out = subprocess.run(match.group(2), shell=True, cwd=ROOT, capture_output=True, text=True).stdout
        return match.group(1) + out + match.group(4)
    return LISTING.sub(rerun, text)


def main():
    for page in PAGES:
        path = ROOT / page
        old = path.read_text()
        new = relist(relink(old))
        if new != old:
            path.write_text(new)
            print(f"updated {page}")


if __name__ == "__main__":
    sys.exit(main())
