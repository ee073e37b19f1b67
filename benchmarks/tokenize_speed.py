"""How fast data.prepare_tokens tokenizes a large corpus, and how fast a prepared one opens.

    python benchmarks/tokenize_speed.py --mb 100

Builds a text of about --mb megabytes (copies of the shipped the-verdict.txt) in a temporary
folder, tokenizes it into a fresh cache (cold), then opens it again (cached).
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import data  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mb", type=float, default=100, help="size of the text in MB")
    args = p.parse_args()
    text = data.DEFAULT_DATA.read_text()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text(text * max(1, int(args.mb * 1e6 / len(text.encode()))))
        size_mb = corpus.stat().st_size / 1e6
        t0 = time.perf_counter()
        tokens = data.prepare_tokens(corpus, cache_dir=Path(tmp) / "cache")
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        data.prepare_tokens(corpus, cache_dir=Path(tmp) / "cache")
        cached = time.perf_counter() - t0
    print(f"{size_mb:.1f} MB of text -> {len(tokens):,} tokens on {os.cpu_count()} core(s): "
          f"tokenized in {cold:.1f} s ({size_mb / cold:.1f} MB/s, {len(tokens) / cold / 1e6:.2f} M "
          f"tokens/s); opened again from the cache in {cached:.2f} s")


if __name__ == "__main__":
    main()
