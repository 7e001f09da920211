"""Training data, offline: GPT-2 token ids -> a fixed validation split and shuffled windows.

    train, val = data.load("data/shakespeare.txt", T=128, batch=1)      # or "shards_*.bin"
    x, y = data.get_batch(train, step=0, batch=1, T=128, seed=0)     # [B, T] each, y = x shifted

Token files (.bin: llm.c shards, 256 int32 of header then uint16 ids, or nanoGPT's bare uint16;
a quoted glob for several) are memory-mapped; a UTF-8 text is tokenized once into a .bin beside
it. The validation split is the same for every run (the paper holds out fixed tokens); windows of
T + 1 tokens are drawn in a seeded shuffle, one pass before any repeats, step i's from (seed, i).
"""
import base64
import codecs
import functools
import glob
import hashlib
import itertools
import mmap
import os
import re
import time
from pathlib import Path

import numpy as np
import tiktoken

DATA_DIR = Path(__file__).resolve().parent / "data"
DEFAULT_TEXT = DATA_DIR / "shakespeare.txt"
RANKS_FILE = DATA_DIR / "gpt2.tiktoken"
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# GPT-2's pre-tokenizer (tiktoken's r50k/gpt2 pattern): contractions, letters, digits, other, spaces.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOT = 50_256  # <|endoftext|>, the one special token; the vocabulary has 50,257 ids
MIN_VAL_TOKENS, MAX_VAL_TOKENS = 16_384, 2 ** 20   # max: all are evaluated each time (README)
SHARD_MAGIC, SHARD_VERSION, HEADER_BYTES = 20_240_520, 1, 256 * 4    # llm.c's token shards
FULL_READ, SAMPLE_BLOCKS, BLOCK = 2 ** 24, 1024, 256   # ids read whole; beyond, blocks x ids
TAKES = "; --data and --val-data take a UTF-8 text or .bin token files (a quoted glob of them)."


class DataError(Exception):
    """A data file that cannot be used; the message is one sentence for the user."""


@functools.cache
def tokenizer():
    """GPT-2's BPE: the same ids as tiktoken.get_encoding("gpt2"), with no network access."""
    blob = RANKS_FILE.read_bytes()
    if hashlib.sha256(blob).hexdigest() != RANKS_SHA256:
        raise DataError(f"{RANKS_FILE} is not the GPT-2 rank file (its sha256 differs).")
    ranks = {base64.b64decode(token): int(rank)
             for token, rank in (line.split() for line in blob.splitlines() if line)}
    return tiktoken.Encoding("gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": EOT}, explicit_n_vocab=EOT + 1)


def encode(text):
    """Text -> GPT-2 ids. '<|endoftext|>' in the text is ordinary text, as in nanoGPT."""
    return tokenizer().encode_ordinary(text)


def decode(ids):
    return tokenizer().decode(list(ids))


class Tokens:
    """Memory-mapped files of ids as one sequence: len(), slices (views), np.asarray and gathers
    (np.searchsorted finds each position's file). A glob of shards gives the batches of the same
    tokens in one file; a gather checks its ids against the vocabulary (load's: a sample)."""

    def __init__(self, parts, vocab):
        self.parts, self.vocab = parts, vocab    # 1-D uint16 arrays, most of them np.memmap
        self.starts = np.cumsum([0] + [len(p) for p in parts])
        for p in (p for p in parts if isinstance(p, np.memmap) and hasattr(mmap, "MADV_RANDOM")):
            p._mmap.madvise(mmap.MADV_RANDOM)   # random windows: readahead would map MBs more

    def __len__(self):
        return int(self.starts[-1])

    def __array__(self, dtype=None, copy=None):   # all the ids, 2^20 at a time: small data only
        r = [self[np.arange(a, min(a + 2 ** 20, len(self)))] for a in range(0, len(self), 2 ** 20)]
        return np.concatenate(r or [np.zeros(0, np.uint16)]).astype(dtype or np.uint16)

    def __getitem__(self, i):
        if isinstance(i, slice):   # the parts that overlap [start, stop), cut to it
            (start, stop, _), s = i.indices(len(self)), self.starts
            return Tokens([p[max(start - s[k], 0):stop - s[k]] for k, p in enumerate(self.parts)
                           if s[k] < stop and s[k + 1] > start], self.vocab)
        i = np.asarray(i)
        part, out = np.searchsorted(self.starts, i, side="right") - 1, np.empty(i.shape, np.uint16)
        for k in np.unique(part):
            ids = out[part == k] = self.parts[k][i[part == k] - self.starts[k]]
            if ids.max() >= self.vocab:
                raise DataError(f"{getattr(self.parts[k], 'filename', 'the data')} holds token "
                                f"id {ids.max():,}, not below the vocabulary's {self.vocab:,}.")
        return out


def open_tokens(pattern, vocab):
    """The ids of a text, a token file or a glob of token files (in name order), as Tokens."""
    paths = sorted(glob.glob(str(pattern))) if glob.has_magic(str(pattern)) else [str(pattern)]
    if not paths or not all(p.endswith(".bin") for p in paths) and len(paths) > 1:
        raise DataError(f"the glob {pattern} matches {'files that are not' if paths else 'no'} "
                        f".bin token files{TAKES}")
    try:
        if not paths[0].endswith(".bin"):
            return Tokens([load_tokens(paths[0])], vocab)
        formats, parts = zip(*map(open_shard, paths))
    except OSError as e:   # FileNotFoundError, IsADirectoryError, PermissionError, ...
        raise DataError(f"data file {e.filename} " + ("does not exist" + TAKES if isinstance(
            e, FileNotFoundError) else f"cannot be read ({e.strerror})."))
    if k := next((k for k, f in enumerate(formats) if f != formats[0]), None):
        raise DataError(f"{paths[0]} is an {formats[0]} token file but {paths[k]} is a "
                        f"{formats[k]} one; the files of one glob must share a format.")
    return Tokens(list(parts), vocab)


def open_shard(path):
    """("llm.c" or "nanoGPT", the ids memory-mapped): a shard with its header, or bare uint16."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        magic, version, count = map(int, np.frombuffer(f.read(12).ljust(12, b"\0"), "<i4"))
    llm_c, fits = magic == SHARD_MAGIC, count > 0 and size == HEADER_BYTES + 2 * count
    for bad, why in [   # in this order; a header that fits the size but not llm.c's magic
            (llm_c and version != SHARD_VERSION, f"has version {version}, not {SHARD_VERSION}"),
            (llm_c and size == HEADER_BYTES, "holds no tokens after its header"),
            (llm_c and not fits, f"says it holds {count:,} tokens, but its {size:,} bytes hold "
             f"{(size - HEADER_BYTES) // 2:,}"),
            (not llm_c and fits, f"has magic number {magic}, not llm.c's {SHARD_MAGIC}"),
            (size == 0 or size % 2, f"has {size:,} bytes, not a whole number of uint16 tokens")]:
        if bad:
            raise DataError(f"token file {path} {why}.")
    ids = np.memmap(path, "<u2", "r", offset=HEADER_BYTES if llm_c else 0)   # to the file's end
    return ("llm.c" if llm_c else "nanoGPT"), ids


def load_tokens(path, chunk=4 * 2 ** 20):   # bytes at a time: ~50 MB of Python ints at most
    """The GPT-2 ids of a UTF-8 text file as uint16, tokenized once and cached beside it."""
    with open(path, "rb") as f:   # a first pass: the text's hash names its cache
        digest = hashlib.file_digest(f, "sha256").hexdigest()[:16]
    cache, tmp = (Path(path).with_name(f"{Path(path).stem}.{digest}.bin{x}") for x in ("", ".tmp"))
    try:  # write then rename: an interrupted run never leaves a half-written token file behind
        if not cache.exists():
            with open(tmp, "wb") as sink:
                sink.writelines(ids.tobytes() for ids in stream_tokens(path, chunk))
            os.replace(tmp, cache)
    except OSError:   # a read-only folder: keep the tokens in memory, tokenize again next time
        return np.concatenate(list(stream_tokens(path, chunk)))
    except DataError:   # end the progress line before the message
        print()
        raise
    finally:
        tmp.unlink(missing_ok=True)
    return np.memmap(cache, np.uint16, "r")


def stream_tokens(path, chunk):
    """A text's ids, a chunk at a time, with a progress line. A chunk ends after its last non-space
    before an ASCII space, tab or line break: no GPT-2 pre-token has a non-space then a space."""
    decoder, carry, done, n, t0 = codecs.getincrementaldecoder("utf-8")(), "", 0, 0, time.time()
    with open(path, "rb") as f:
        for block in itertools.chain(iter(functools.partial(f.read, chunk), b""), [b""]):
            if b"\0" in block or not (block or n or carry.strip()):   # no text holds NUL bytes
                raise DataError(f"data file {path} is {'binary' if block else 'empty'}{TAKES}")
            try:   # a character split between chunks waits in the decoder for its other bytes
                text = carry + decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:   # e.object: the bytes held back, then this block
                raise DataError(f"data file {path} is not UTF-8 text (at byte "
                                f"{done - len(e.object) + len(block) + e.start:,}).")
            cut = re.match(r".*\S(?=[ \t\n\r\f\v])", text, re.S) if block else None  # the last
            end = cut.end() if cut else 0 if block else len(text)
            ids = np.array(encode(text[:end]), np.uint16)   # V = 50,257 < 2^16: ids fit
            carry, done, n = text[end:], done + len(block), n + len(ids)
            mb, rate = os.fstat(f.fileno()).st_size / 1e6, done / 1e6 / (time.time() - t0 + 1e-9)
            print(f"\rtokenizing {path}: {done / 1e6:,.1f} of {mb:,.1f} MB, {n:,} tokens, "
                  f"{rate:.1f} MB/s, {(mb - done / 1e6) / max(rate, 1e-3):.0f} s left",
                  end="" if block else "\n", flush=True)
            yield ids


def split(tokens):
    """(train, validation): validation is the last 10 %, in [MIN_VAL_TOKENS, MAX_VAL_TOKENS]."""
    n_val = min(max(MIN_VAL_TOKENS, len(tokens) // 10), MAX_VAL_TOKENS)
    return tokens[:-n_val], tokens[-n_val:]


def n_windows(train, T):
    return len(train) // (T + 1)


def load(path, T, batch, val_path=None, vocab=EOT + 1):
    """(train Tokens, val array): split's, or val_path's first MAX_VAL_TOKENS; or a DataError."""
    tokens = open_tokens(path, vocab)
    train, val = split(tokens) if val_path is None else (tokens, open_tokens(val_path, vocab))
    if len(tokens) <= (0 if val_path else MIN_VAL_TOKENS) or n_windows(train, T) < batch:
        raise DataError(f"data file {path} has {len(tokens):,} tokens, too few for "
                        + ("" if val_path else f"{MIN_VAL_TOKENS:,} validation tokens plus ")
                        + f"one batch of {batch} x {T + 1} training tokens.")
    if len(val) < T + 1:
        raise DataError(f"--val-data {val_path} has {len(val):,} tokens; a window needs {T + 1}.")
    fingerprint(train)    # reads the sample, which checks its ids against the vocabulary
    return train, np.asarray(val[:MAX_VAL_TOKENS])


@functools.lru_cache(maxsize=2)
def _window_order(n, seed, epoch):
    return np.random.default_rng([seed, epoch]).permutation(n)


def get_batch(train, step, batch, T, seed, steps=None, rows=slice(None)):
    """Inputs and targets [batch, T] (int32) of a training step: windows step*batch ... in the
    seeded shuffle, which is redrawn after each full pass over the windows. With steps=S, those of
    S consecutive steps at once, [S, batch, T]: one gather for a call of many steps. rows: only
    these rows of each batch (a process's share of it on several hosts)."""
    n, k = n_windows(train, T), steps or 1
    index = (step * batch + np.arange(k * batch).reshape(k, batch)[:, rows]).ravel()
    epoch, pos = np.divmod(index, n)
    window = np.empty(len(index), np.int64)
    for e in np.unique(epoch):                     # one pass, or two where a batch spans passes
        window[epoch == e] = _window_order(n, seed, int(e))[pos[epoch == e]]
    chunk = train[window[:, None] * (T + 1) + np.arange(T + 1)].astype(np.int32)  # [kB, T + 1]
    if steps is not None:
        chunk = chunk.reshape(steps, -1, T + 1)
    return chunk[..., :-1], chunk[..., 1:]


def compact_vocab(train, val, V):
    """The tokens (all read) renumbered into V ids: the V - 1 most frequent training tokens get ids
    0, 1, ... by rank, all others share V - 1: for the batch-size study's CPU model (its README)."""
    train, val = np.asarray(train), np.asarray(val)
    counts = np.bincount(train, minlength=EOT + 1)
    table = np.full(EOT + 1, V - 1, np.uint16)
    ranked = np.argsort(-counts, kind="stable")[:V - 1]
    ranked = ranked[counts[ranked] > 0]                 # an unseen token gets no id of its own
    table[ranked] = np.arange(len(ranked))
    return table[train], table[val]


def fingerprint(*token_arrays):
    """A checkpoint's record of its data, unchanged by moving or re-sharding the files: a sha256 of
    all ids up to FULL_READ (as before shards), beyond of the lengths and SAMPLE_BLOCKS blocks."""
    small, digest = sum(len(t) for t in token_arrays) <= FULL_READ, hashlib.sha256()
    for t in token_arrays:
        at = np.linspace(0, max(len(t) - BLOCK, 0), SAMPLE_BLOCKS).astype(np.int64)[:, None]
        digest.update(np.asarray(t).tobytes() if small else f"{len(t)} tokens".encode()
                      + t[np.minimum(at + np.arange(BLOCK), len(t) - 1)].tobytes())
    return digest.hexdigest()[:16]


def val_batches(val, T):
    """The whole validation split as inputs and targets [N, T]: every token is predicted once."""
    n = (len(val) - 1) // T
    return tuple(val[i:n * T + i].reshape(n, T).astype(np.int32) for i in (0, 1))  # x, then y
