"""GPT-2 tokenizer (offline), token files that are prepared once and memory-mapped, the book's
sliding-window dataset and `create_dataloader`, with the samplers DDP needs."""
import base64
import contextlib
import functools
import hashlib
import os
import re
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tiktoken
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler

ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_DATA = ASSETS / "the-verdict.txt"
RANKS_FILE = ASSETS / "gpt2.tiktoken"
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
EOT_ID = 50256  # <|endoftext|>, placed between documents
# GPT-2's pre-tokenizer: contractions, letters, digits, other symbols, whitespace runs.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
CACHE_VERSION = "gpt2-u16-eot-v1"  # change when the token file format or joining changes


class DataError(ValueError):
    """Bad input data: the message names the file, the numbers and the flag to change."""


@functools.lru_cache(maxsize=None)
def get_tokenizer():
    """tiktoken's `gpt2` encoding, built from the rank file shipped in assets/ (no download)."""
    raw = RANKS_FILE.read_bytes()
    if hashlib.sha256(raw).hexdigest() != RANKS_SHA256:
        raise DataError(f"{RANKS_FILE} is damaged (sha256 mismatch); restore it from the repository")
    ranks = {base64.b64decode(tok): int(rank) for tok, rank in (l.split() for l in raw.splitlines() if l)}
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": EOT_ID}, explicit_n_vocab=50257)


def text_to_token_ids(text, tokenizer):
    return torch.tensor(tokenizer.encode(text, allowed_special={"<|endoftext|>"})).unsqueeze(0)


def token_ids_to_text(token_ids, tokenizer):
    return tokenizer.decode(token_ids.squeeze(0).tolist())


# ---------------------------------------------------------------------------------------------
# Text files -> one token file, prepared once, memory-mapped by every process that needs it.

def text_files(data):
    """The .txt files that `data` names: a file, a folder (its .txt files, recursively, sorted),
    or a list of either."""
    items = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    if not items:
        raise DataError("no data given: pass --data with a .txt file or a folder of them")
    files = []
    for item in map(Path, items):
        if item.is_dir():
            found = sorted(p for p in item.rglob("*.txt") if p.is_file())
            if not found:
                raise DataError(f"folder {item} holds no .txt files: put text files there or "
                                f"pass --data with a .txt file")
            files += found
        elif item.is_file():
            files.append(item)
        else:
            raise DataError(f"data file not found: {item} (pass --data with an existing .txt file "
                            f"or folder)")
    return files


def _read_text(path):
    """The file's bytes, checked to be non-empty UTF-8 text."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror} (check --data and its permissions)") from None
    if not raw.strip():
        raise DataError(f"{path} is empty: pass --data with a file that holds text")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}): "
                        f"pass --data with a UTF-8 .txt file") from None
    return raw


# Where a space or newline is followed by a letter or digit, GPT-2's pre-tokenizer starts a new piece
# at that whitespace character (" word", "\nword") and the whitespace before it forms pieces of its
# own that end there, at the end of a string too. Cutting the text just before it and encoding the
# parts separately therefore gives exactly the tokens of the whole text.
_SAFE_CUT = re.compile(r"[ \n](?=[A-Za-z0-9])")


def _cut(text, size):
    start = 0
    while start < len(text):
        m = _SAFE_CUT.search(text, start + size) if start + size < len(text) else None
        end = m.start() if m else len(text)
        yield text[start:end]
        start = end


def encode_text(text, tokenizer=None, chunk_chars=1 << 20, num_threads=None):
    """`tokenizer.encode_ordinary(text)` as a uint16 array, on several threads for long texts."""
    tokenizer = tokenizer or get_tokenizer()
    chunks = list(_cut(text, chunk_chars))
    if len(chunks) == 1:
        return np.array(tokenizer.encode_ordinary(text), dtype=np.uint16)
    with ThreadPoolExecutor(num_threads or min(8, os.cpu_count() or 1)) as pool:
        # tiktoken releases the GIL while it encodes, so the threads run in parallel
        parts = pool.map(lambda c: np.array(tokenizer.encode_ordinary(c), dtype=np.uint16), chunks)
        return np.concatenate(list(parts))


def default_cache_dir():
    return Path(os.environ.get("GPT_DDP_CACHE", Path.home() / ".cache" / "gpt-ddp"))


def _cache_path(raws, cache_dir):
    """The token file's name is a hash of the texts' content and the tokenizer."""
    h = hashlib.sha256(f"{CACHE_VERSION}:{RANKS_SHA256}".encode())
    for raw in raws:
        h.update(len(raw).to_bytes(8, "little"))
        h.update(raw)
    return Path(cache_dir or default_cache_dir()) / f"tokens-{h.hexdigest()[:24]}.u16"


def prepare_tokens(data=None, cache_dir=None):
    """Tokenize `data` (default: the shipped text) once into a uint16 token file and memory-map it,
    so that all processes on a node share one copy in the page cache.

    Documents are joined with <|endoftext|>. Safe when several processes call it at once: the
    processes of a node take turns (a file lock), so one tokenizes and the others find its file;
    where there is no lock each writes a temporary file and renames it into place, and the
    content-keyed name means any finished file is the right one."""
    raws = [_read_text(f) for f in text_files(data or DEFAULT_DATA)]
    path = _cache_path(raws, cache_dir)
    if path.exists():
        return np.memmap(path, dtype=np.uint16, mode="r")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _one_at_a_time(path.parent):
            if not path.exists():
                tokens = _tokenize(raws)
                fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".tmp")
                with os.fdopen(fd, "wb") as out:
                    tokens.tofile(out)
                os.replace(tmp, path)
    except OSError as e:
        raise DataError(f"cannot write the token cache in {path.parent}: {e.strerror} "
                        f"(pass --cache-dir with a writable folder)") from None
    return np.memmap(path, dtype=np.uint16, mode="r")


def _tokenize(raws):
    tokenizer = get_tokenizer()
    parts = []
    for i, raw in enumerate(raws):
        if i:
            parts.append(np.array([EOT_ID], dtype=np.uint16))
        parts.append(encode_text(raw.decode("utf-8"), tokenizer))
    return np.concatenate(parts)


@contextlib.contextmanager
def _one_at_a_time(folder):
    """An exclusive lock on the cache folder while the block runs (fcntl: Linux and macOS; none
    on Windows, where each process tokenizes for itself)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # and with it the lock


def split_tokens(tokens, val_ratio=0.1):
    """First (1 - val_ratio) of the tokens for training, the rest for validation (views, no copy)."""
    n_train = int(round(len(tokens) * (1.0 - val_ratio)))
    return tokens[:n_train], tokens[n_train:]


# ---------------------------------------------------------------------------------------------
# The book's dataset: windows of max_length tokens every `stride` tokens, targets shifted by one.

def num_windows(n_tokens, max_length, stride):
    return max(0, (n_tokens - max_length - 1) // stride + 1)


def tokens_needed(windows, max_length, stride):
    return (windows - 1) * stride + max_length + 1


def check_windows(tokens, batch_size, world_size, max_length, stride, name):
    """DataError unless `tokens` hold a batch of windows for each of world_size processes."""
    need = batch_size * world_size
    if num_windows(len(tokens), max_length, stride) < need:
        raise DataError(
            f"{name} has {len(tokens):,} tokens, but {need} window(s) of {max_length} tokens "
            f"(batch {batch_size} x {world_size} process(es)) need "
            f"{tokens_needed(need, max_length, stride):,}: lower --context-length or "
            f"--batch-size, or pass more text with --data")


def batches_per_rank(tokens, val_ratio, max_length, batch_size, world_size):
    """Training batches per epoch that each rank gets from `tokens` as the scripts load them
    (split by val_ratio; windows every max_length tokens; a DistributedSampler that drops the
    remainder), after checking that both splits are long enough."""
    train, val = split_tokens(tokens, val_ratio)
    check_windows(train, batch_size, world_size, max_length, max_length, "the training split")
    check_windows(val, 1, 1, max_length, max_length,
                  f"the validation split (--val-ratio {val_ratio})")
    return num_windows(len(train), max_length, max_length) // world_size // batch_size


class GPTDataset(Dataset):
    def __init__(self, tokens, max_length, stride):
        self.tokens, self.max_length, self.stride = tokens, max_length, stride

    def __len__(self):
        return num_windows(len(self.tokens), self.max_length, self.stride)

    def __getitem__(self, i):
        if not 0 <= i < len(self):
            raise IndexError(i)
        s = i * self.stride
        chunk = torch.from_numpy(np.asarray(self.tokens[s:s + self.max_length + 1], dtype=np.int64))
        return chunk[:-1], chunk[1:]


class EvenShardSampler(Sampler):
    """Every index exactly once across the ranks: rank r takes a contiguous block, block sizes
    differ by at most one. For evaluation, where DistributedSampler would pad with repeats."""

    def __init__(self, dataset, num_replicas, rank):
        n = len(dataset)
        self.start, self.end = rank * n // num_replicas, (rank + 1) * n // num_replicas

    def __iter__(self):
        return iter(range(self.start, self.end))

    def __len__(self):
        return self.end - self.start


def create_dataloader(tokens, batch_size=4, max_length=256, stride=128, shuffle=True,
                      drop_last=True, num_workers=0, distributed=False, num_replicas=None,
                      rank=None, seed=0, pin_memory=False, name="the text"):
    """DataLoader over GPTDataset(tokens). With distributed=True each rank sees its own shard:
    for training (drop_last) a seeded DistributedSampler that gives every rank the same number of
    batches, each window at most once; call `loader.sampler.set_epoch(epoch)` every epoch.
    For evaluation (drop_last=False) an even split with every window exactly once."""
    if distributed and (num_replicas is None or rank is None):
        num_replicas, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    world = num_replicas if distributed else 1
    dataset = GPTDataset(tokens, max_length, stride)
    check_windows(tokens, batch_size if drop_last else 1, world if drop_last else 1, max_length,
                  stride, name)
    if not distributed:
        sampler = None
    elif drop_last:
        sampler = DistributedSampler(dataset, num_replicas, rank, shuffle=shuffle, seed=seed,
                                     drop_last=True)
    else:
        sampler = EvenShardSampler(dataset, num_replicas, rank)
    generator = torch.Generator().manual_seed(seed) if shuffle and sampler is None else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None,
                      sampler=sampler, drop_last=drop_last, num_workers=num_workers,
                      pin_memory=pin_memory, generator=generator)
