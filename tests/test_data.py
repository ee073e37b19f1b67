"""Tests for data.py: exact GPT-2 token ids, chunked encoding, the token cache (also under
concurrent preparation), the book's sliding windows, DDP shards and the DataError messages.
Every token cache goes to pytest's tmp_path, never the user's cache."""
import multiprocessing
import re
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # so that `pytest` works as well as `python -m pytest`
    sys.path.insert(0, str(ROOT))

import data  # noqa: E402
from data import (DataError, GPTDataset, create_dataloader, encode_text, get_tokenizer,  # noqa: E402
                  num_windows, prepare_tokens, split_tokens, text_files, tokens_needed)

EOT = 50256
DEFAULT_TEXT = data.DEFAULT_DATA.read_text(encoding="utf-8")

# Whitespace runs, tabs, CRLF, non-breaking and em spaces, digits, contractions, punctuation,
# non-ASCII letters: everything where a chunk boundary could split a pre-tokenizer piece.
NASTY_UNIT = (
    "Hello  world\t\ttabs\t word\r\nCRLF\r\n\r\nNew para  \n  indented\n\n\nthree\n \n x"
    "\u00a0nbsp\u00a0 word\u00a0\u00a0two \u2003em\u2003 space\u3000ideo "
    "12345 678 9a b1 x2 2024-01-02 3.14159 1,000,000 007\n42\n\n7 "
    "don't it's we'll they've I'm you're she'd HE'S 'tis o'clock ''quoted'' "
    "?!... ,,, ;; -- (parens) [brackets] {braces} \"quotes\" `back`  \t \n word "
    "café naïve Ünïcödé 日本語 テスト 😀 emoji  \u00a0\n x<|endoftext|>y\n"
)
NASTY = "   \n " + "".join(NASTY_UNIT[i:] + NASTY_UNIT[:i] for i in range(0, 200, 13)) + "  \t\n\n "


@pytest.fixture(autouse=True)
def _never_the_user_cache(tmp_path, monkeypatch):
    """Safety net: even a call without cache_dir stays inside pytest's tmp_path."""
    monkeypatch.setenv("GPT_DDP_CACHE", str(tmp_path / "default-cache"))


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer()


def without_commas(msg):
    """'5,145' -> '5145', so that messages can be checked whatever the number format."""
    return re.sub(r"(?<=\d),(?=\d)", "", msg)


# ---------------------------------------------------------------------------------------------
# Tokenizer

def test_known_token_ids(tok):
    """GPT-2's published ids; a different rank file or pattern gives different ids."""
    assert tok.n_vocab == 50257
    assert tok.encode("Hello, world") == [15496, 11, 995]
    text = "Hello, do you like tea? <|endoftext|> In the sunlit terraces"
    assert tok.encode(text, allowed_special={"<|endoftext|>"}) == [
        15496, 11, 466, 345, 588, 8887, 30, 220, 50256, 554, 262, 4252, 18250, 8812, 2114]
    assert tok.decode([EOT]) == "<|endoftext|>"


@pytest.mark.parametrize("text", [DEFAULT_TEXT, NASTY], ids=["default", "nasty"])
def test_decode_round_trips(tok, text):
    assert tok.decode(tok.encode_ordinary(text)) == text
    assert tok.decode(encode_text(text, tok).tolist()) == text


def test_default_text_has_5145_tokens(tok, tmp_path):
    tokens = prepare_tokens(cache_dir=tmp_path)
    assert len(tokens) == 5145
    assert tokens.dtype == np.uint16
    assert tokens.tolist() == tok.encode(DEFAULT_TEXT)
    assert prepare_tokens(data.DEFAULT_DATA, cache_dir=tmp_path).tolist() == tokens.tolist()


class CountingTokenizer:
    """Wraps the tokenizer to count encode_ordinary calls (it is called from several threads)."""

    def __init__(self, inner):
        self.inner, self.calls, self.lock = inner, 0, threading.Lock()

    def encode_ordinary(self, text):
        with self.lock:
            self.calls += 1
        return self.inner.encode_ordinary(text)


@pytest.mark.parametrize("chunk_chars", [1, 2, 7, 100, 4096, 1 << 20])
@pytest.mark.parametrize("text", [DEFAULT_TEXT, NASTY], ids=["default", "nasty"])
def test_chunked_encoding_equals_whole_text(tok, text, chunk_chars):
    """Encoding in chunks (on threads) must give exactly the tokens of the whole text; a cut inside
    a pre-tokenizer piece (e.g. between spaces of a run, or inside a word) changes them."""
    counting = CountingTokenizer(tok)
    got = encode_text(text, counting, chunk_chars=chunk_chars, num_threads=2)
    assert got.dtype == np.uint16
    assert got.tolist() == tok.encode_ordinary(text)
    if chunk_chars <= 100:
        assert counting.calls > 10  # the chunked path really ran


def test_chunked_encoding_of_short_pieces(tok):
    """Every short slice of the nasty text, at every small chunk size."""
    for start in range(0, 120, 5):
        piece = NASTY[start:start + 40]
        expected = tok.encode_ordinary(piece)
        for chunk_chars in (1, 3, 5):
            assert encode_text(piece, tok, chunk_chars=chunk_chars).tolist() == expected, \
                (piece, chunk_chars)


# ---------------------------------------------------------------------------------------------
# Several files, a folder

def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_folder_is_sorted_and_joined_with_endoftext(tok, tmp_path):
    """Files of a folder (recursively, sorted) joined with exactly one 50256 between documents."""
    folder = tmp_path / "corpus"
    texts = {"z.txt": "Last file here.", "b.txt": "Second one\n", "a.txt": "First, the start.",
             "sub/c.txt": "Nested text follows"}
    for name, text in texts.items():  # written out of order on purpose
        write(folder / name, text)
    write(folder / "notes.md", "not a text file")
    order = ["a.txt", "b.txt", "sub/c.txt", "z.txt"]
    assert text_files(folder) == [folder / name for name in order]

    tokens = prepare_tokens(folder, cache_dir=tmp_path / "cache")
    parts = [tok.encode_ordinary(texts[name]) for name in order]
    expected = parts[0] + [EOT] + parts[1] + [EOT] + parts[2] + [EOT] + parts[3]
    assert tokens.tolist() == expected
    assert len(tokens) == sum(map(len, parts)) + len(parts) - 1


def test_list_of_files_keeps_given_order(tok, tmp_path):
    a = write(tmp_path / "a.txt", "Alpha text.")
    b = write(tmp_path / "b.txt", "Beta text.")
    tokens = prepare_tokens([b, a], cache_dir=tmp_path / "cache")
    assert tokens.tolist() == tok.encode_ordinary("Beta text.") + [EOT] + tok.encode_ordinary("Alpha text.")
    single = prepare_tokens(a, cache_dir=tmp_path / "cache")
    assert single.tolist() == tok.encode_ordinary("Alpha text.")  # no EOT for one document


# ---------------------------------------------------------------------------------------------
# Token cache

def cache_files(folder):
    return sorted(p.name for p in Path(folder).iterdir())


def test_cache_is_reused_and_memory_mapped(tmp_path, monkeypatch):
    """The second call must read the cached file, not tokenize again."""
    text_file = write(tmp_path / "text.txt", DEFAULT_TEXT[:3000])
    cache = tmp_path / "cache"
    first = prepare_tokens(text_file, cache_dir=cache)
    assert isinstance(first, np.memmap)
    [name] = cache_files(cache)
    mtime = (cache / name).stat().st_mtime_ns

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("prepare_tokens tokenized again although the cache was there")

    monkeypatch.setattr(data, "encode_text", no_tokenizing)
    second = prepare_tokens(text_file, cache_dir=cache)
    assert isinstance(second, np.memmap)
    assert Path(second.filename).name == name
    assert np.array_equal(first, second)
    assert (cache / name).stat().st_mtime_ns == mtime
    assert cache_files(cache) == [name]


def test_changed_text_gets_a_new_cache_file(tok, tmp_path):
    """The cache is keyed by content: a changed text (even of the same length) must not reuse
    the old tokens."""
    text_file = write(tmp_path / "text.txt", "The cat sat on the mat.")
    cache = tmp_path / "cache"
    old = prepare_tokens(text_file, cache_dir=cache)
    write(text_file, "The dog sat on the mat.")
    new = prepare_tokens(text_file, cache_dir=cache)
    assert old.filename != new.filename
    assert new.tolist() == tok.encode_ordinary("The dog sat on the mat.")
    assert old.tolist() == tok.encode_ordinary("The cat sat on the mat.")
    assert len(cache_files(cache)) == 2


def test_document_boundaries_are_part_of_the_cache_key(tok, tmp_path):
    """["ab", "c"] and ["a", "bc"] have the same bytes but different tokens (EOT placement)."""
    cache = tmp_path / "cache"
    one = prepare_tokens([write(tmp_path / "1/a.txt", "Hello there"),
                          write(tmp_path / "1/b.txt", " world")], cache_dir=cache)
    two = prepare_tokens([write(tmp_path / "2/a.txt", "Hello"),
                          write(tmp_path / "2/b.txt", " there world")], cache_dir=cache)
    assert one.filename != two.filename
    assert two.tolist() == tok.encode_ordinary("Hello") + [EOT] + tok.encode_ordinary(" there world")


def _prepare_after_barrier(barrier, path, cache_dir):
    """Run in a spawned process: start all at once, then prepare the same tokens."""
    barrier.wait(timeout=120)
    tokens = prepare_tokens(path, cache_dir=cache_dir)
    assert len(tokens) > 0


def test_concurrent_preparation(tok, tmp_path):
    """Several processes preparing the same text at once: one valid file, no temporary files
    left, and every process succeeds (no half-written file is ever read)."""
    text = DEFAULT_TEXT * 20  # ~400 kB, so tokenizing takes a moment and the writers overlap
    text_file = write(tmp_path / "big.txt", text)
    cache = tmp_path / "cache"
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(4)
    procs = [ctx.Process(target=_prepare_after_barrier, args=(barrier, str(text_file), str(cache)))
             for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    names = cache_files(cache)
    assert len(names) == 1 and re.fullmatch(r"tokens-[0-9a-f]+\.u16", names[0]), names
    tokens = np.fromfile(cache / names[0], dtype=np.uint16)
    assert tokens.tolist() == tok.encode_ordinary(text)
    assert Path(prepare_tokens(text_file, cache_dir=cache).filename) == cache / names[0]


# ---------------------------------------------------------------------------------------------
# Sliding windows

def book_windows(token_ids, max_length, stride):
    """Chapter 2's GPTDatasetV1 loop, verbatim in spirit."""
    inputs, targets = [], []
    for i in range(0, len(token_ids) - max_length, stride):
        inputs.append(token_ids[i:i + max_length])
        targets.append(token_ids[i + 1:i + max_length + 1])
    return inputs, targets


@pytest.mark.parametrize("n, max_length, stride", [
    (50, 4, 1), (50, 8, 3), (50, 8, 8), (50, 8, 11), (51, 5, 5), (9, 8, 1), (8, 8, 1), (3, 8, 4),
])
def test_windows_match_the_book(n, max_length, stride):
    """x = tokens[i*stride : i*stride+L], y shifted by one; as many windows as the book's loop.
    An off-by-one in len() drops the last window or reads past the end."""
    tokens = (np.arange(n) * 7 % 50000).astype(np.uint16)
    ds = GPTDataset(tokens, max_length, stride)
    inputs, targets = book_windows(tokens.tolist(), max_length, stride)
    assert len(ds) == len(inputs) == num_windows(n, max_length, stride)
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.dtype == torch.int64 and x.shape == (max_length,)
        assert x.tolist() == inputs[i]
        assert y.tolist() == targets[i]
        assert x.tolist() == tokens[i * stride:i * stride + max_length].tolist()
    with pytest.raises(IndexError):
        ds[len(ds)]


@pytest.mark.parametrize("max_length, stride", [(4, 1), (8, 3), (8, 8), (5, 11)])
def test_tokens_needed_is_the_minimum(max_length, stride):
    for windows in range(1, 20):
        need = tokens_needed(windows, max_length, stride)
        assert num_windows(need, max_length, stride) == windows
        assert num_windows(need - 1, max_length, stride) == windows - 1


def test_plain_dataloader_order():
    tokens = np.arange(200, dtype=np.uint16)
    ordered = create_dataloader(tokens, batch_size=3, max_length=4, stride=4, shuffle=False,
                                drop_last=False)
    starts = [s for x, _ in ordered for s in x[:, 0].tolist()]
    assert starts == list(range(0, 196, 4))
    shuffled = [s for x, _ in create_dataloader(tokens, batch_size=3, max_length=4, stride=4,
                                                seed=3) for s in x[:, 0].tolist()]
    again = [s for x, _ in create_dataloader(tokens, batch_size=3, max_length=4, stride=4,
                                             seed=3) for s in x[:, 0].tolist()]
    assert shuffled == again and shuffled != sorted(shuffled)
    assert len(shuffled) == 48  # 49 windows, the last incomplete batch dropped


def test_split_tokens_sizes_and_views(tmp_path):
    tokens = np.arange(1000, dtype=np.uint16)
    train, val = split_tokens(tokens)
    assert (len(train), len(val)) == (900, 100)
    assert train.base is tokens and val.base is tokens  # views, no copy
    assert val.ctypes.data == train.ctypes.data + 900 * tokens.itemsize  # adjacent
    assert train[-1] == 899 and val[0] == 900
    assert [len(p) for p in split_tokens(np.arange(10), val_ratio=0.2)] == [8, 2]

    mm = prepare_tokens(cache_dir=tmp_path)
    train, val = split_tokens(mm)
    assert len(train) + len(val) == 5145 and abs(len(train) - 0.9 * 5145) <= 1
    assert np.shares_memory(train, mm) and np.shares_memory(val, mm)
    assert np.array_equal(np.concatenate([train, val]), mm)


# ---------------------------------------------------------------------------------------------
# DDP shards

L, STRIDE = 4, 4  # tokens = arange, so window i starts with token i * STRIDE


def window_ids(loader):
    ids = []
    for x, y in loader:
        assert torch.equal(y, x + 1)  # content is the window, targets shifted by one
        ids += (x[:, 0] // STRIDE).tolist()
    return ids


def training_loaders(n_windows, world, batch_size=2, seed=0):
    tokens = np.arange(tokens_needed(n_windows, L, STRIDE), dtype=np.uint16)
    return [create_dataloader(tokens, batch_size=batch_size, max_length=L, stride=STRIDE,
                              shuffle=True, drop_last=True, distributed=True, num_replicas=world,
                              rank=r, seed=seed) for r in range(world)]


@pytest.mark.parametrize("n_windows", [36, 37])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_training_shards(n_windows, world):
    """Every rank runs the same number of steps (else DDP hangs), the shards are disjoint, and
    together they cover all windows but fewer than `world`."""
    batch_size = 2
    loaders = training_loaders(n_windows, world, batch_size)
    per_rank = n_windows // world
    assert [len(ld) for ld in loaders] == [per_rank // batch_size] * world

    samples = [list(ld.sampler) for ld in loaders]
    flat = [i for s in samples for i in s]
    assert len(flat) == len(set(flat)) == per_rank * world  # disjoint
    assert set(flat) <= set(range(n_windows))
    assert n_windows - len(flat) < world

    batches = [window_ids(ld) for ld in loaders]
    for ids, s in zip(batches, samples):  # the loader yields its shard, in order, full batches only
        assert ids == s[:len(s) // batch_size * batch_size]

    for ld in loaders:
        ld.sampler.set_epoch(1)
    samples1 = [list(ld.sampler) for ld in loaders]
    flat1 = [i for s in samples1 for i in s]
    assert samples1 != samples  # a new order each epoch
    assert len(flat1) == len(set(flat1)) == len(flat)
    if n_windows % world == 0:
        assert sorted(flat1) == sorted(flat) == list(range(n_windows))


def test_training_order_is_seeded():
    def order(seed):
        return [window_ids(ld) for ld in training_loaders(37, 3, seed=seed)]

    assert order(5) == order(5)
    assert order(5) != order(6)


@pytest.mark.parametrize("n_windows", [1, 2, 3, 37])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_validation_shards(n_windows, world):
    """Evaluation sees every window exactly once across ranks (no padding repeats), also when
    there are fewer windows than ranks and some rank gets none."""
    tokens = np.arange(tokens_needed(n_windows, L, STRIDE), dtype=np.uint16)
    shards = [window_ids(create_dataloader(tokens, batch_size=3, max_length=L, stride=STRIDE,
                                           shuffle=False, drop_last=False, distributed=True,
                                           num_replicas=world, rank=r)) for r in range(world)]
    flat = [i for s in shards for i in s]
    assert sorted(flat) == list(range(n_windows))  # exactly once each
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1
    if n_windows < world:
        assert 0 in sizes


# ---------------------------------------------------------------------------------------------
# Bad input: DataError naming the file and the flag that fixes it

def test_missing_path(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(DataError) as e:
        prepare_tokens(missing, cache_dir=tmp_path)
    assert str(missing) in str(e.value) and "--data" in str(e.value)


def test_folder_without_txt(tmp_path):
    folder = tmp_path / "empty_folder"
    write(folder / "readme.md", "no text files here")
    with pytest.raises(DataError) as e:
        prepare_tokens(folder, cache_dir=tmp_path)
    assert str(folder) in str(e.value) and "--data" in str(e.value)


@pytest.mark.parametrize("content", [b"", b"  \n\t\r\n"], ids=["empty", "whitespace"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.txt"
    path.write_bytes(content)
    with pytest.raises(DataError) as e:
        prepare_tokens(path, cache_dir=tmp_path / "cache")
    assert str(path) in str(e.value) and "empty" in str(e.value) and "--data" in str(e.value)


def test_binary_file(tmp_path):
    path = tmp_path / "binary.txt"
    path.write_bytes(b"hello \xff\xfe\x00 world")
    with pytest.raises(DataError) as e:
        prepare_tokens(path, cache_dir=tmp_path / "cache")
    msg = str(e.value)
    assert str(path) in msg and "UTF-8" in msg and "--data" in msg
    assert re.search(r"offset 6\b", msg) and "0xff" in msg


def test_bad_file_in_folder_is_named(tmp_path):
    """In a folder, the message names the bad file, not just the folder."""
    write(tmp_path / "corpus/a.txt", "fine text")
    bad = tmp_path / "corpus/b.txt"
    bad.write_bytes(b"\x80abc")
    with pytest.raises(DataError, match="offset 0") as e:
        prepare_tokens(tmp_path / "corpus", cache_dir=tmp_path / "cache")
    assert str(bad) in str(e.value)


def test_unwritable_cache_dir(tmp_path):
    text_file = write(tmp_path / "t.txt", "some text")
    with pytest.raises(DataError, match="--cache-dir"):
        prepare_tokens(text_file, cache_dir=text_file / "cache")  # below a file: cannot exist


def test_text_too_short_for_one_window(tmp_path):
    """The message gives the tokens found and needed, and the flag (--context-length)."""
    text_file = write(tmp_path / "short.txt", "Hello, world")
    tokens = prepare_tokens(text_file, cache_dir=tmp_path / "cache")
    assert len(tokens) == 3
    with pytest.raises(DataError) as e:
        create_dataloader(tokens, batch_size=1, max_length=8, stride=8, shuffle=False,
                          drop_last=False, name=str(text_file))
    msg = str(e.value)
    assert str(text_file) in msg and "--context-length" in msg
    assert re.search(r"\b3 tokens", msg) and re.search(r"\bneed 9\b", msg), msg

    default = prepare_tokens(cache_dir=tmp_path / "cache")
    with pytest.raises(DataError) as e:
        create_dataloader(default, batch_size=1, max_length=8192, stride=8192, drop_last=False,
                          name=str(data.DEFAULT_DATA))
    msg = without_commas(str(e.value))
    assert "5145" in msg and "8193" in msg and str(data.DEFAULT_DATA) in msg


def test_text_too_short_for_batch_times_world(tmp_path):
    """10 windows cannot give batch 4 to each of 3 ranks (12 windows): say so and name the flags,
    instead of silently yielding zero steps on some rank."""
    tokens = np.arange(tokens_needed(10, L, STRIDE), dtype=np.uint16)
    with pytest.raises(DataError) as e:
        create_dataloader(tokens, batch_size=4, max_length=L, stride=STRIDE, drop_last=True,
                          distributed=True, num_replicas=3, rank=0, name="train.txt")
    msg = str(e.value)
    assert "train.txt" in msg and "--batch-size" in msg and "--context-length" in msg
    assert f"{len(tokens)} tokens" in msg and f"need {tokens_needed(12, L, STRIDE)}" in msg
    # 12 windows are enough for the same setting
    enough = np.arange(tokens_needed(12, L, STRIDE), dtype=np.uint16)
    loaders = [create_dataloader(enough, batch_size=4, max_length=L, stride=STRIDE,
                                 distributed=True, num_replicas=3, rank=r) for r in range(3)]
    assert [len(ld) for ld in loaders] == [1, 1, 1]
    with pytest.raises(DataError, match="--batch-size"):  # single process: batch 11 > 10 windows
        create_dataloader(tokens, batch_size=11, max_length=L, stride=STRIDE, name="train.txt")
