"""Training data, offline: text -> GPT-2 token ids -> a fixed validation split and shuffled windows.

    train, val = data.load("data/shakespeare.txt", T=128, batch=1)
    x, y = data.get_batch(train, step=0, batch=1, T=128, seed=0)     # [B, T] each, y = x shifted

The GPT-2 BPE comes from tiktoken, built from the merge ranks shipped in data/ (nothing is ever
downloaded). A text file is tokenized once into a uint16 token file beside it (nanoGPT's .bin
convention), named by the text's hash so that it is reused exactly until the text changes.
The last 10 % of the tokens (at least 16,384) are the validation split, the same for every run
(the paper holds out fixed validation tokens). The rest is cut into non-overlapping windows of T + 1
tokens, visited in a seeded shuffle: one full pass before any window repeats, and the batch of
step i depends only on (seed, i), so any step's data can be rebuilt exactly.
"""
import base64
import functools
import hashlib
import os
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
MIN_VAL_TOKENS = 16_384


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


def load_tokens(path):
    """The GPT-2 ids of a UTF-8 text file as uint16, tokenized once and cached beside it."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"data file {path} does not exist; --data takes a UTF-8 text file.")
    except OSError as e:
        raise DataError(f"data file {path} cannot be read ({e.strerror}).")
    if not raw.strip():
        raise DataError(f"data file {path} is empty; --data takes a UTF-8 text file.")
    if b"\0" in raw:   # valid UTF-8, but no text file holds NUL bytes: an image, an archive, ...
        raise DataError(f"data file {path} is binary (it holds NUL bytes); --data takes a UTF-8 "
                        "text file.")
    cache = path.with_name(f"{path.stem}.{hashlib.sha256(raw).hexdigest()[:16]}.bin")
    if cache.exists():
        return np.fromfile(cache, np.uint16)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"data file {path} is not UTF-8 text (byte {e.start} is {raw[e.start]:#x}).")
    tokens = np.array(encode(text), np.uint16)   # V = 50,257 < 2^16, so ids fit in uint16
    try:  # write then rename: an interrupted run never leaves a half-written token file behind
        tokens.tofile(f"{cache}.tmp")
        os.replace(f"{cache}.tmp", cache)
    except OSError:
        pass  # a read-only folder: keep the tokens in memory and tokenize again next time
    return tokens


def split(tokens):
    """(train, validation): validation is the last 10 % of the tokens, at least MIN_VAL_TOKENS."""
    n_val = max(MIN_VAL_TOKENS, len(tokens) // 10)
    return tokens[:-n_val], tokens[-n_val:]


def n_windows(train, T):
    return len(train) // (T + 1)


def load(path, T, batch):
    """Tokens of a text file split for training; raises DataError if one batch would not fit."""
    tokens = load_tokens(path)
    train, val = split(tokens)
    if len(tokens) <= MIN_VAL_TOKENS or n_windows(train, T) < batch:
        raise DataError(
            f"data file {path} has {len(tokens):,} tokens, too few for {MIN_VAL_TOKENS:,} "
            f"validation tokens plus one batch of {batch} x {T + 1} training tokens.")
    return train, val


@functools.lru_cache(maxsize=2)
def _window_order(n, seed, epoch):
    return np.random.default_rng([seed, epoch]).permutation(n)


def get_batch(train, step, batch, T, seed, steps=None):
    """Inputs and targets [batch, T] (int32) of a training step: windows step*batch ... in the
    seeded shuffle, which is redrawn after each full pass over the windows. With steps=K, those of
    K consecutive steps at once, [K, batch, T]: one gather for a call of many steps."""
    n, k = n_windows(train, T), steps or 1
    epoch, pos = np.divmod(step * batch + np.arange(k * batch), n)
    window = np.empty(k * batch, np.int64)
    for e in np.unique(epoch):                     # one pass, or two where a batch spans passes
        window[epoch == e] = _window_order(n, seed, int(e))[pos[epoch == e]]
    chunk = train[window[:, None] * (T + 1) + np.arange(T + 1)].astype(np.int32)  # [kB, T + 1]
    if steps is not None:
        chunk = chunk.reshape(steps, batch, T + 1)
    return chunk[..., :-1], chunk[..., 1:]


def compact_vocab(train, val, V):
    """The tokens renumbered into a vocabulary of V ids: the V - 1 most frequent training tokens
    get ids 0, 1, ... by rank, and every other token (rarer, or never seen in training) shares
    id V - 1. The batch-size study's CPU model uses it: the output layer is most of a small
    model's cost, and the shipped corpus uses 12,031 of GPT-2's 50,257 tokens (the 4,095 most
    frequent make 95.5 % of it)."""
    counts = np.bincount(train, minlength=EOT + 1)
    table = np.full(EOT + 1, V - 1, np.uint16)
    ranked = np.argsort(-counts, kind="stable")[:V - 1]
    ranked = ranked[counts[ranked] > 0]                 # an unseen token gets no id of its own
    table[ranked] = np.arange(len(ranked))
    return table[train], table[val]


def fingerprint(*token_arrays):
    """A short hash of the tokens: what a checkpoint records of the data it was trained on."""
    return hashlib.sha256(b"".join(t.tobytes() for t in token_arrays)).hexdigest()[:16]


def val_batches(val, T):
    """The whole validation split as inputs and targets [N, T]: every token is predicted once."""
    n = (len(val) - 1) // T
    x = val[:n * T].reshape(n, T).astype(np.int32)
    y = val[1:n * T + 1].reshape(n, T).astype(np.int32)
    return x, y
