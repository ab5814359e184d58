"""Corpora, byte-level BPE tokenizers, tokenized caches, batches and the n-gram baseline.

A corpus is a set of documents, each with a key (its path, or path and chunk/line), split into
train and validation by a hash of the key, so that the split never depends on random state or on
which other documents are present. Its fingerprint names the data in every cache and in the store.

The embedded default is the running interpreter's own standard library sources: real text that
every install has, so a search needs no download (docs/dependencies.md, "Data").

Caches live under `cache_dir()` and are keyed by (fingerprint, vocab size). Several search
workers may fill them at once, so every file is written to a temporary name and moved into place
with `os.replace`; a reader sees either nothing or a whole file.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from nas.spec.errors import DataError
from nas.spec.files import atomic_write

DEFAULT_CORPUS = "stdlib"
EOS = "<|endoftext|>"

# Bumped when the reading, chunking or split rules change, so old caches are not reused.
_FORMAT = "nas-corpus-v1"
_USER_SUFFIXES = (".txt", ".md", ".jsonl")
_STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
# Big text files are cut into pieces of about this size so that one file can still be split into
# train and validation, and so that the hash-ordered subset of `max_bytes` has grains to pick.
_CHUNK_BYTES = 64 * 1024
# The byte-level alphabet (256) plus the document separator.
_MIN_VOCAB = 257


def cache_dir() -> Path:
    """Where tokenizers and tokenized corpora are cached: $NAS_CACHE_DIR, else ~/.cache/nas."""
    env = os.environ.get("NAS_CACHE_DIR")
    path = Path(env).expanduser() if env else Path.home() / ".cache" / "nas"
    path.mkdir(parents=True, exist_ok=True)
    return path


# ---------------------------------------------------------------------------------------------
# Corpus
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Corpus:
    name: str
    """"stdlib" or the resolved path the documents were read from."""
    fingerprint: str
    """16 hex chars of sha256 over the documents (keys and bytes) and the split settings."""
    # The documents are excluded from repr and comparison: they can be megabytes, and the
    # fingerprint already identifies them.
    train_docs: tuple[str, ...] = field(repr=False, compare=False)
    val_docs: tuple[str, ...] = field(repr=False, compare=False)

    @property
    def train_bytes(self) -> int:
        return sum(len(d.encode()) for d in self.train_docs)

    @property
    def val_bytes(self) -> int:
        return sum(len(d.encode()) for d in self.val_docs)


def load_corpus(data: str | Path | None = None, *, max_bytes: int | None = None,
                val_fraction: float = 0.05) -> Corpus:
    """Read a corpus and split it into train and validation.

    ``data`` is None or "stdlib" (the embedded default), a .txt/.md/.jsonl file, or a folder
    searched recursively for those. ``max_bytes`` keeps a deterministic subset of about that many
    bytes; ``val_fraction`` of the documents (by a hash of their keys) go to validation.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if max_bytes is not None and max_bytes <= 0:
        raise DataError(f"max_bytes must be positive, got {max_bytes}")

    if data is None or str(data) == DEFAULT_CORPUS:
        name, docs = DEFAULT_CORPUS, _stdlib_docs()
        if not docs:
            raise DataError(f"no readable .py files in the standard library at {_stdlib_root()}")
    else:
        path = Path(data).expanduser().resolve()
        name, docs = str(path), _user_docs(path)

    if max_bytes is not None:
        docs = _subset(docs, max_bytes)
    if len(docs) < 2:
        subset = f" within max_bytes={max_bytes}" if max_bytes is not None else ""
        raise DataError(f"{name}: {len(docs)} document(s){subset}; need at least 2 to split train "
                        "and validation")

    keys = sorted(docs)
    val_keys = _split(keys, val_fraction)
    return Corpus(
        name=name,
        fingerprint=_fingerprint(docs, keys, val_fraction),
        train_docs=tuple(docs[k] for k in keys if k not in val_keys),
        val_docs=tuple(docs[k] for k in keys if k in val_keys),
    )


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_docs() -> dict[str, str]:
    root = _stdlib_root()
    docs: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS]
        for fname in filenames:
            if not fname.endswith(".py"):
                continue
            path = Path(dirpath, fname)
            try:
                text = path.read_bytes().decode("utf-8")
            except (OSError, UnicodeDecodeError):
                continue  # a few installs carry latin-1 sources or unreadable files: not worth failing for
            if text:
                docs[path.relative_to(root).as_posix()] = text
    return docs


def _user_docs(path: Path) -> dict[str, str]:
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_file():
        docs = _read_file(path, path.name)
        if not docs:
            raise DataError(f"{path}: contains no text")
        return docs
    docs = {}
    for file in _folder_files(path):
        docs.update(_read_file(file, file.relative_to(path).as_posix()))
    if not docs:
        raise DataError(f"{path}: no text found in {'/'.join(_USER_SUFFIXES)} files under this folder")
    return docs


def _folder_files(folder: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(folder):
        # Hidden folders (.git, .venv) hold tool files, not the user's corpus.
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        files += [Path(dirpath, f) for f in filenames
                  if not f.startswith(".") and f.lower().endswith(_USER_SUFFIXES)]
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def _read_file(path: Path, key: str) -> dict[str, str]:
    suffix = path.suffix.lower()
    if suffix not in _USER_SUFFIXES:
        raise DataError(f"{path}: unsupported file type '{path.suffix}' (allowed: "
                        f"{', '.join(_USER_SUFFIXES)}, or a folder of them)")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (bad byte at offset {e.start})") from e
    if suffix == ".jsonl":
        return _jsonl_docs(path, key, text)
    return {f"{key}#{i:05d}": chunk for i, chunk in enumerate(_chunks(text))}


def _chunks(text: str) -> Iterator[str]:
    """Pieces of about _CHUNK_BYTES, cut after a newline; a longer single line stays whole."""
    piece: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        piece.append(line)
        size += len(line.encode())
        if size >= _CHUNK_BYTES:
            yield "".join(piece)
            piece, size = [], 0
    if piece:
        yield "".join(piece)


def _jsonl_docs(path: Path, key: str, text: str) -> dict[str, str]:
    docs = {}
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and friends, which splitlines
    # treats as line ends and which would break a valid line in two.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
        doc = obj.get("text") if isinstance(obj, dict) else obj
        if not isinstance(doc, str):
            raise DataError(f"{path}:{lineno}: expected a JSON string or an object with a \"text\" "
                            "string field")
        if doc:
            docs[f"{key}:{lineno:07d}"] = doc
    return docs


def _key_hash(salt: str, key: str) -> int:
    """A uniform 64-bit number per key; the salt keeps the subset and the split independent."""
    return int.from_bytes(hashlib.sha256(f"{salt}\0{key}".encode()).digest()[:8], "big")


def _subset(docs: dict[str, str], max_bytes: int) -> dict[str, str]:
    # Documents in hash order, each taken if it still fits: the subset is a fair sample of the
    # corpus (not its alphabetically first files) and never exceeds the budget.
    kept: dict[str, str] = {}
    left = max_bytes
    for key in sorted(docs, key=lambda k: _key_hash("subset", k)):
        size = len(docs[key].encode())
        if size <= left:
            kept[key] = docs[key]
            left -= size
    return kept


def _split(keys: list[str], val_fraction: float) -> set[str]:
    u = {k: _key_hash("split", k) / 2**64 for k in keys}
    val = {k for k in keys if u[k] < val_fraction}
    # A tiny corpus may hash entirely to one side; move the document nearest the threshold.
    if not val:
        val = {min(keys, key=u.__getitem__)}
    elif len(val) == len(keys):
        val.discard(max(keys, key=u.__getitem__))
    return val


def _fingerprint(docs: dict[str, str], keys: list[str], val_fraction: float) -> str:
    h = hashlib.sha256(f"{_FORMAT}\0val_fraction={val_fraction!r}\0".encode())
    for key in keys:
        k, v = key.encode(), docs[key].encode()
        # Length prefixes keep (key, text) pairs unambiguous when concatenated.
        h.update(len(k).to_bytes(8, "big") + k + len(v).to_bytes(8, "big") + v)
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------

class TokenizerCache:
    """Tokenizers loaded in this process, so that a search's trials do not parse the same JSON
    again. Keyed by the tokenizer file's path (a different NAS_CACHE_DIR is a different cache)
    and its size and modification time, so that a file retrained or replaced on disk is read
    again rather than served stale."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: dict[tuple[str, int, int], tuple[Tokenizer, str]] = {}

    def get(self, path: Path, train: Callable[[], Tokenizer]) -> tuple[Tokenizer, str]:
        """(tokenizer, sha256 of its JSON) from ``path``, trained with ``train`` and written there
        first when the file does not exist."""
        with self._lock:
            if not path.exists():
                atomic_write(path, train().to_str())
            st = path.stat()
            key = (str(path), st.st_size, st.st_mtime_ns)
            if key not in self._items:
                text = path.read_text(encoding="utf-8")
                tok = Tokenizer.from_str(text)
                # Text that happens to contain "<|endoftext|>" must be encoded as those 13 bytes;
                # only the separator that tokenize_corpus inserts is the special token.
                tok.encode_special_tokens = True
                self._items = {k: v for k, v in self._items.items() if k[0] != key[0]}  # drop stale versions
                self._items[key] = (tok, hashlib.sha256(text.encode()).hexdigest())
            return self._items[key]

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


TOKENIZERS = TokenizerCache()
"""This process's tokenizers (see :class:`TokenizerCache`)."""


def get_tokenizer(corpus: Corpus, vocab_size: int) -> Tokenizer:
    """A byte-level BPE of exactly ``vocab_size`` tokens (``EOS`` included), trained on the train split.

    Cached on disk by (fingerprint, vocab size) and memoized in this process.
    """
    return _tokenizer_and_hash(corpus, vocab_size)[0]


def _tokenizer_and_hash(corpus: Corpus, vocab_size: int) -> tuple[Tokenizer, str]:
    if vocab_size < _MIN_VOCAB:
        raise DataError(f"vocab_size {vocab_size} is too small: a byte-level BPE needs at least "
                        f"{_MIN_VOCAB} (256 bytes and {EOS})")
    path = cache_dir() / "tokenizers" / f"{corpus.fingerprint}-{vocab_size}.json"
    return TOKENIZERS.get(path, lambda: _train_tokenizer(corpus, vocab_size))


def _train_tokenizer(corpus: Corpus, vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        # All 256 bytes from the start, so any text encodes, even bytes the train split lacks.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus.train_docs, trainer=trainer, length=len(corpus.train_docs))
    got = tok.get_vocab_size()
    if got != vocab_size:
        raise DataError(f"{corpus.name}: the train split ({corpus.train_bytes:,} bytes) is too small "
                        f"for a vocabulary of {vocab_size}: BPE stopped at {got} tokens; use more data "
                        "or a smaller vocab_size")
    return tok


# ---------------------------------------------------------------------------------------------
# Tokenized corpus
# ---------------------------------------------------------------------------------------------


# eq=False: comparing numpy arrays field by field has no single truth value.
@dataclass(frozen=True, eq=False)
class TokenizedCorpus:
    fingerprint: str
    vocab_size: int
    train_ids: np.ndarray = field(repr=False)
    """1-D token ids, each document followed by EOS; uint16 when the vocab allows."""
    val_ids: np.ndarray = field(repr=False)
    token_bytes: np.ndarray = field(repr=False)
    """int64 [vocab_size]: UTF-8 bytes each token stands for; EOS counts 1 (the boundary)."""
    val_bytes: int
    """Bytes of the whole validation split, as token_bytes[val_ids].sum()."""


_ENCODE_BATCH_DOCS = 256  # bounds the memory of the Encoding objects for a 13 MB corpus


def tokenize_corpus(corpus: Corpus, vocab_size: int) -> TokenizedCorpus:
    """Token ids of both splits (documents each followed by EOS), cached on disk as .npy, with
    the tokenizer trained for (corpus, vocab_size)."""
    tok, tok_hash = _tokenizer_and_hash(corpus, vocab_size)
    return encode_corpus(corpus, tok, tok_hash, cache_dir() / "tokens" / f"{corpus.fingerprint}-{vocab_size}")


def tokenize_with_file(corpus: Corpus, tokenizer_path: Path, vocab_size: int, cache: Path) -> TokenizedCorpus:
    """Both splits encoded with a tokenizer file (an exported winner's), cached under ``cache`` by
    (corpus fingerprint, tokenizer hash): the same ids and byte counts as :func:`tokenize_corpus`
    gives with that tokenizer, so BPB means the same in a full run as in the search."""
    text = tokenizer_path.read_text(encoding="utf-8")
    sha = hashlib.sha256(text.encode()).hexdigest()
    tok = Tokenizer.from_str(text)
    tok.encode_special_tokens = True  # only the separator we insert is the special token
    if tok.get_vocab_size() != vocab_size:
        raise DataError(f"{tokenizer_path} has {tok.get_vocab_size()} tokens, the spec wants {vocab_size}")
    return encode_corpus(corpus, tok, sha, cache / f"{corpus.fingerprint}-{sha[:16]}")


def encode_corpus(corpus: Corpus, tok: Tokenizer, tok_hash: str, folder: Path) -> TokenizedCorpus:
    """Both splits of ``corpus`` encoded with ``tok``, cached in ``folder``. The ids are only valid
    for the exact tokenizer that made them (a tokenizer that was deleted and retrained may
    differ), so the cache records the tokenizer's hash and is redone on a mismatch."""
    vocab_size = tok.get_vocab_size()
    meta_path = folder / "meta.json"
    names = ("train.npy", "val.npy", "token_bytes.npy")
    if meta_path.exists() and all((folder / n).exists() for n in names):
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            meta = {}
        if meta.get("tokenizer_sha256") == tok_hash:
            train, val, tb = (np.load(folder / n, mmap_mode="r") for n in names)
            # token_bytes as a writable copy: evaluate_bpb hands it to torch, which warns on a read-only map
            return _tokenized(corpus.fingerprint, vocab_size, train, val, np.array(tb))

    dtype = np.uint16 if vocab_size <= 65535 else np.uint32
    eos = tok.token_to_id(EOS)
    train = _encode_docs(tok, corpus.train_docs, eos, dtype)
    val = _encode_docs(tok, corpus.val_docs, eos, dtype)
    tb = _token_bytes(tok, vocab_size)
    # meta.json last: it marks the three arrays beside it as complete and consistent.
    for n, arr in zip(names, (train, val, tb), strict=True):
        atomic_write(folder / n, lambda f, a=arr: np.save(f, a))  # a file object: no extra .npy
    atomic_write(meta_path, json.dumps({"tokenizer_sha256": tok_hash, "corpus": corpus.name,
                                        "fingerprint": corpus.fingerprint, "vocab_size": vocab_size}))
    return _tokenized(corpus.fingerprint, vocab_size, train, val, tb)


def _tokenized(fingerprint: str, vocab_size: int, train: np.ndarray, val: np.ndarray,
               tb: np.ndarray) -> TokenizedCorpus:
    val_bytes = int(tb[np.asarray(val)].sum())
    return TokenizedCorpus(fingerprint=fingerprint, vocab_size=vocab_size, train_ids=train, val_ids=val,
                           token_bytes=tb, val_bytes=val_bytes)


def _encode_docs(tok: Tokenizer, docs: tuple[str, ...], eos: int, dtype: type) -> np.ndarray:
    parts: list[np.ndarray] = []
    for start in range(0, len(docs), _ENCODE_BATCH_DOCS):
        # encode_batch_fast skips the offsets we do not use; both run on all cores.
        batch = list(docs[start:start + _ENCODE_BATCH_DOCS])
        for enc in tok.encode_batch_fast(batch, add_special_tokens=False):
            parts.append(np.asarray(enc.ids, dtype=dtype))
            parts.append(np.array([eos], dtype=dtype))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def _token_bytes(tok: Tokenizer, vocab_size: int) -> np.ndarray:
    # ByteLevel maps each byte to one printable character, so a token's string length is the
    # number of bytes it stands for.
    tb = np.zeros(vocab_size, dtype=np.int64)
    for token, i in tok.get_vocab(with_added_tokens=True).items():
        tb[i] = len(token)
    tb[tok.token_to_id(EOS)] = 1
    return tb


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------


class WindowSampler:
    """Random training windows: inputs ids[i:i+T] and targets ids[i+1:i+T+1], int64 (B, T).

    The generator's state is exposed (:meth:`state`, :meth:`restore`), so that a checkpoint saves
    the data position and a resumed run draws the very windows an uninterrupted one would."""

    def __init__(self, ids: np.ndarray, batch_size: int, seq_len: int, seed: int) -> None:
        if batch_size <= 0 or seq_len <= 0:
            raise DataError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
        self.ids, self.batch_size, self.seq_len = ids, batch_size, seq_len
        self.n_starts = len(ids) - seq_len  # a window needs seq_len + 1 tokens
        if self.n_starts <= 0:
            raise DataError(f"the training split has {len(ids):,} tokens, fewer than one window of "
                            f"seq_len + 1 = {seq_len + 1}")
        self.rng = np.random.default_rng(seed)
        self.offsets = np.arange(seq_len + 1)

    def next(self) -> tuple[np.ndarray, np.ndarray]:
        starts = self.rng.integers(0, self.n_starts, size=self.batch_size)
        w = np.asarray(self.ids[starts[:, None] + self.offsets], dtype=np.int64)  # (B, T+1)
        return np.ascontiguousarray(w[:, :-1]), np.ascontiguousarray(w[:, 1:])

    def state(self) -> dict[str, Any]:
        return self.rng.bit_generator.state

    def restore(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state


def train_batches(ids: np.ndarray, batch_size: int, seq_len: int,
                  seed: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Endless random windows, as :class:`WindowSampler` draws them."""
    sampler = WindowSampler(ids, batch_size, seq_len, seed)
    while True:
        yield sampler.next()


def val_windows(ids: np.ndarray, seq_len: int,
                max_tokens: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Consecutive windows whose targets cover ids[1:1+max_tokens] exactly once, each as [1, T] int64.

    The last window may be shorter. Nothing is yielded when there is no target.
    """
    if seq_len <= 0:
        raise DataError(f"seq_len must be positive, got {seq_len}")
    n = max(len(ids) - 1, 0)
    if max_tokens is not None:
        n = min(n, max(max_tokens, 0))
    for s in range(0, n, seq_len):
        t = min(seq_len, n - s)
        w = np.asarray(ids[s:s + t + 1], dtype=np.int64)
        yield w[None, :-1].copy(), w[None, 1:].copy()


Window = tuple[np.ndarray, np.ndarray]


def stack_windows(windows: Iterator[Window], size: int) -> Iterator[Window]:
    """Group [1, T] windows into [n <= size, T] batches (a shorter last window goes alone)."""
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    for x, y in windows:
        if xs and (x.shape != xs[0].shape or len(xs) == size):
            yield np.concatenate(xs), np.concatenate(ys)
            xs, ys = [], []
        xs.append(x)
        ys.append(y)
    if xs:
        yield np.concatenate(xs), np.concatenate(ys)


# ---------------------------------------------------------------------------------------------
# N-gram baseline
# ---------------------------------------------------------------------------------------------


def ngram_baseline_bpb(tc: TokenizedCorpus, order: int = 2) -> float:
    """Validation bits per byte of a count model of this tokenizer, estimated on the train split.

    order 1: add-one unigram. order 2: interpolated Kneser-Ney bigram, its continuation unigram
    itself discounted and interpolated with a uniform distribution so unseen tokens keep mass.
    Scored on the same targets as `val_windows` (every validation token but the first).
    """
    V = tc.vocab_size
    train = np.asarray(tc.train_ids, dtype=np.int64)
    val = np.asarray(tc.val_ids, dtype=np.int64)
    if len(val) < 2 or len(train) < 2:
        raise DataError("the n-gram baseline needs at least 2 train and 2 validation tokens")
    prev, tgt = val[:-1], val[1:]

    if order == 1:
        counts = np.bincount(train, minlength=V).astype(np.float64)
        p = (counts[tgt] + 1.0) / (len(train) + V)
    elif order == 2:
        p = _kneser_ney_bigram(train, V, prev, tgt)
    else:
        raise DataError(f"n-gram baseline order must be 1 or 2, got {order}")

    bits = -np.log2(p).sum()
    return float(bits / tc.token_bytes[tgt].sum())


def _discount(counts: np.ndarray) -> float:
    # Ney's estimate D = n1 / (n1 + 2 n2) from the count-of-counts; 0.75 when it is undefined.
    n1, n2 = np.count_nonzero(counts == 1), np.count_nonzero(counts == 2)
    return float(n1 / (n1 + 2 * n2)) if n1 + n2 > 0 and n1 > 0 else 0.75


def _kneser_ney_bigram(train: np.ndarray, V: int, prev: np.ndarray, tgt: np.ndarray) -> np.ndarray:
    # Bigram types as one int64 code each; np.unique sorts them, which gives the sparse count
    # table and a searchsorted index for lookups without a Python loop over tokens.
    codes, counts = np.unique(train[:-1] * V + train[1:], return_counts=True)
    first, second = codes // V, codes % V

    # Continuation unigram: in how many distinct contexts each token appears, discounted and
    # interpolated with uniform.
    cont = np.bincount(second, minlength=V).astype(np.float64)
    n_types = float(len(codes))
    d_cont = _discount(cont[cont > 0])
    p_cont = np.maximum(cont - d_cont, 0.0) / n_types + d_cont * np.count_nonzero(cont) / n_types / V

    ctx_total = np.bincount(first, weights=counts, minlength=V)  # c(v .)
    ctx_types = np.bincount(first, minlength=V).astype(np.float64)  # N1+(v .)
    d = _discount(counts)

    q = prev * V + tgt
    pos = np.minimum(np.searchsorted(codes, q), len(codes) - 1)
    c_pair = np.where(codes[pos] == q, counts[pos], 0).astype(np.float64)
    c_ctx = ctx_total[prev]
    seen = c_ctx > 0
    safe = np.where(seen, c_ctx, 1.0)
    p_seen = np.maximum(c_pair - d, 0.0) / safe + d * ctx_types[prev] / safe * p_cont[tgt]
    # A context never seen in training backs off to the continuation unigram alone.
    return np.where(seen, p_seen, p_cont[tgt])
