"""Corpora, tokenizers, caches, batches and the n-gram baseline (nas.stages.data)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from nas.spec.errors import DataError, NasError
from nas.spec.files import atomic_write
from nas.stages import data
from nas.stages.data import (
    EOS,
    TokenizedCorpus,
    cache_dir,
    get_tokenizer,
    load_corpus,
    ngram_baseline_bpb,
    tokenize_corpus,
    train_batches,
    val_windows,
)

SUBSET = 400_000  # bytes of the stdlib: enough for a 1024-token BPE, small enough to stay fast
VOCAB = 512


@pytest.fixture(autouse=True)
def _own_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path_factory.mktemp("nas-cache")
    monkeypatch.setenv("NAS_CACHE_DIR", str(path))
    return path


@pytest.fixture(scope="module")
def stdlib_tc(tmp_path_factory: pytest.TempPathFactory) -> tuple[data.Corpus, TokenizedCorpus]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NAS_CACHE_DIR", str(tmp_path_factory.mktemp("shared-cache")))
        corpus = load_corpus(max_bytes=SUBSET)
        return corpus, tokenize_corpus(corpus, VOCAB)


def _write_lines(path: Path, n: int, width: int = 60) -> str:
    text = "".join(f"line {i:06d} " + "x" * (width - 13) + "\n" for i in range(n))
    path.write_text(text, encoding="utf-8")
    return text


# --- corpus -------------------------------------------------------------------------------------


def test_cache_dir_follows_env_and_is_created(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "a" / "b"
    monkeypatch.setenv("NAS_CACHE_DIR", str(target))
    assert cache_dir() == target and target.is_dir()


def test_stdlib_corpus_loads_the_same_way_twice() -> None:
    a, b = load_corpus(max_bytes=SUBSET), load_corpus("stdlib", max_bytes=SUBSET)
    assert a.name == "stdlib" and len(a.fingerprint) == 16
    assert a.fingerprint == b.fingerprint
    assert a.train_docs == b.train_docs and a.val_docs == b.val_docs
    assert 0 < a.val_bytes < a.train_bytes and a.train_bytes + a.val_bytes <= SUBSET


def test_stdlib_documents_are_library_sources_without_tests_or_site_packages() -> None:
    keys = list(data._stdlib_docs())
    assert len(keys) > 100
    assert all(k.endswith(".py") for k in keys)
    parts = {part for k in keys for part in k.split("/")[:-1]}
    assert not parts & {"test", "tests", "idle_test", "site-packages", "dist-packages"}
    assert "os.py" in keys and "json/decoder.py" in keys


def test_fingerprint_describes_the_subset_and_the_split_settings() -> None:
    base = load_corpus(max_bytes=SUBSET)
    assert load_corpus(max_bytes=SUBSET // 2).fingerprint != base.fingerprint
    assert load_corpus(max_bytes=SUBSET, val_fraction=0.2).fingerprint != base.fingerprint


def test_fingerprint_changes_when_a_document_changes(tmp_path: Path) -> None:
    for name in "abc":
        (tmp_path / f"{name}.txt").write_text(f"document {name}\n", encoding="utf-8")
    before = load_corpus(tmp_path)
    assert load_corpus(tmp_path).fingerprint == before.fingerprint
    (tmp_path / "b.txt").write_text("document b, edited\n", encoding="utf-8")
    assert load_corpus(tmp_path).fingerprint != before.fingerprint


def test_train_and_validation_are_disjoint_and_both_non_empty() -> None:
    corpus = load_corpus(max_bytes=SUBSET)
    assert corpus.train_docs and corpus.val_docs
    assert not set(corpus.train_docs) & set(corpus.val_docs)


def test_two_documents_still_split_into_one_train_and_one_validation(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("alpha\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("beta\n", encoding="utf-8")
    corpus = load_corpus(tmp_path)
    assert len(corpus.train_docs) == 1 and len(corpus.val_docs) == 1


def test_a_documents_split_does_not_depend_on_the_other_documents(tmp_path: Path) -> None:
    for i in range(40):
        (tmp_path / f"{i:02d}.txt").write_text(f"doc {i}\n", encoding="utf-8")
    before = load_corpus(tmp_path, val_fraction=0.25)
    (tmp_path / "new.txt").write_text("a new document\n", encoding="utf-8")
    after = load_corpus(tmp_path, val_fraction=0.25)
    assert set(before.val_docs) <= set(after.val_docs)
    assert set(before.train_docs) <= set(after.train_docs)


def test_max_bytes_keeps_a_subset_within_the_budget() -> None:
    full, small = load_corpus(), load_corpus(max_bytes=100_000)
    assert 50_000 < small.train_bytes + small.val_bytes <= 100_000
    assert set(small.train_docs + small.val_docs) <= set(full.train_docs + full.val_docs)


def test_big_txt_file_is_cut_into_documents_at_line_ends(tmp_path: Path) -> None:
    path = tmp_path / "big.txt"
    text = _write_lines(path, 5000)  # 300 KB
    corpus = load_corpus(path)
    docs = corpus.train_docs + corpus.val_docs
    assert corpus.name == str(path.resolve())
    assert len(docs) >= 4
    assert all(d.endswith("\n") and d in text for d in docs)
    assert sum(len(d.encode()) for d in docs) == len(text.encode())


def test_jsonl_takes_text_fields_and_bare_strings(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    rows = [{"text": "first document", "id": 1}, "second document", {"text": "third\u2028with a separator"}]
    # Unescaped U+2028 inside a JSON string must not be taken for a line end.
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n", encoding="utf-8")
    corpus = load_corpus(path)
    assert sorted(corpus.train_docs + corpus.val_docs) == sorted(
        ["first document", "second document", "third\u2028with a separator"])


def test_folder_reads_txt_md_jsonl_recursively_and_skips_other_and_hidden_files(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / ".git").mkdir()
    (tmp_path / "a.txt").write_text("from txt\n", encoding="utf-8")
    (tmp_path / "sub" / "b.MD").write_text("from md\n", encoding="utf-8")
    (tmp_path / "sub" / "c.jsonl").write_text('{"text": "from jsonl"}\n', encoding="utf-8")
    (tmp_path / "d.csv").write_text("not,read\n", encoding="utf-8")
    (tmp_path / ".git" / "e.txt").write_text("hidden\n", encoding="utf-8")
    corpus = load_corpus(tmp_path)
    assert sorted(corpus.train_docs + corpus.val_docs) == ["from jsonl", "from md\n", "from txt\n"]


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("missing.txt", None, "no such file"),
        ("table.csv", "a,b\n", "unsupported file type '.csv'"),
        ("empty.txt", "", "contains no text"),
        ("bad.jsonl", '{"text": "ok"}\n{"text": \n', "bad.jsonl:2: not valid JSON"),
        ("notext.jsonl", '{"text": "ok"}\n{"body": "x"}\n', "notext.jsonl:2: expected a JSON string"),
        ("latin1.txt", b"caf\xe9\n", "not UTF-8"),
    ],
)
def test_bad_input_raises_data_error_naming_the_file(tmp_path: Path, name: str, content: str | bytes | None,
                                                     expected: str) -> None:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_corpus(path)
    message = str(err.value)
    assert str(path) in message and expected in message and "\n" not in message
    assert isinstance(err.value, NasError)


def test_empty_folder_and_single_document_raise_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no text found"):
        load_corpus(tmp_path)
    (tmp_path / "one.txt").write_text("only one\n", encoding="utf-8")
    with pytest.raises(DataError, match="need at least 2"):
        load_corpus(tmp_path)


# --- tokenizer ----------------------------------------------------------------------------------


@pytest.mark.parametrize("vocab_size", [512, 1024])
def test_tokenizer_has_exactly_the_requested_vocabulary(vocab_size: int) -> None:
    tok = get_tokenizer(load_corpus(max_bytes=SUBSET), vocab_size)
    assert tok.get_vocab_size() == vocab_size
    assert tok.token_to_id(EOS) is not None


def test_tokenizer_is_loaded_from_disk_on_a_later_call(monkeypatch: pytest.MonkeyPatch) -> None:
    corpus = load_corpus(max_bytes=SUBSET)
    calls = []
    real_train = data._train_tokenizer
    monkeypatch.setattr(data, "_train_tokenizer", lambda *a: calls.append(a) or real_train(*a))

    first = get_tokenizer(corpus, VOCAB)
    path = cache_dir() / "tokenizers" / f"{corpus.fingerprint}-{VOCAB}.json"
    mtime = path.stat().st_mtime_ns
    assert get_tokenizer(corpus, VOCAB) is first  # memoized in process

    data.TOKENIZERS.clear()  # as a fresh process would start
    second = get_tokenizer(corpus, VOCAB)
    assert len(calls) == 1 and path.stat().st_mtime_ns == mtime
    assert second.to_str() == first.to_str()
    assert not list(path.parent.glob("*.tmp"))
    # A file retrained or replaced on disk is read again, not served from memory.
    path.write_text(first.to_str() + "\n")  # another size: seen as changed whatever the mtime's resolution
    assert get_tokenizer(corpus, VOCAB) is not second


def test_vocabulary_too_large_for_a_tiny_corpus_raises_data_error(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("tiny corpus\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("another tiny one\n", encoding="utf-8")
    with pytest.raises(DataError, match="too small for a vocabulary of 4096"):
        get_tokenizer(load_corpus(tmp_path), 4096)
    with pytest.raises(DataError, match="at least 257"):
        get_tokenizer(load_corpus(tmp_path), 200)


def test_token_bytes_add_up_to_the_utf8_length_of_encoded_text(stdlib_tc) -> None:
    corpus, tc = stdlib_tc
    tok = get_tokenizer(corpus, VOCAB)
    text = corpus.val_docs[0][:5000] + "\nnaïve café 😀 — 中文\n" + f"x = '{EOS}'\n"
    ids = tok.encode(text).ids
    assert int(tc.token_bytes[ids].sum()) == len(text.encode())
    assert tok.decode(ids) == text  # the literal separator in text stays text, not a boundary
    assert tc.token_bytes.dtype == np.int64 and tc.token_bytes.shape == (VOCAB,)


def test_val_bytes_is_the_validation_text_plus_one_per_document_boundary(stdlib_tc) -> None:
    corpus, tc = stdlib_tc
    assert tc.val_bytes == int(tc.token_bytes[np.asarray(tc.val_ids)].sum())
    assert tc.val_bytes == corpus.val_bytes + len(corpus.val_docs)


def test_tokenized_corpus_ends_every_document_with_eos(stdlib_tc) -> None:
    corpus, tc = stdlib_tc
    eos = get_tokenizer(corpus, VOCAB).token_to_id(EOS)
    assert tc.train_ids.dtype == np.uint16 and tc.train_ids.ndim == 1
    assert int((np.asarray(tc.train_ids) == eos).sum()) == len(corpus.train_docs)
    assert int(tc.val_ids[-1]) == eos and int(tc.train_ids[-1]) == eos


def test_tokenized_corpus_is_reused_from_the_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    corpus = load_corpus(max_bytes=SUBSET // 2)
    first = tokenize_corpus(corpus, VOCAB)
    monkeypatch.setattr(data, "_encode_docs", lambda *a: pytest.fail("encoded again"))
    second = tokenize_corpus(corpus, VOCAB)
    assert isinstance(second.train_ids, np.memmap)
    np.testing.assert_array_equal(first.train_ids, second.train_ids)
    np.testing.assert_array_equal(first.val_ids, second.val_ids)
    assert first.val_bytes == second.val_bytes


def test_retrained_tokenizer_invalidates_the_token_cache() -> None:
    corpus = load_corpus(max_bytes=SUBSET // 2)
    tokenize_corpus(corpus, VOCAB)
    meta = cache_dir() / "tokens" / f"{corpus.fingerprint}-{VOCAB}" / "meta.json"
    meta.write_text(json.dumps({"tokenizer_sha256": "from another tokenizer"}), encoding="utf-8")
    again = tokenize_corpus(corpus, VOCAB)
    assert not isinstance(again.train_ids, np.memmap)  # rebuilt rather than trusted
    assert json.loads(meta.read_text(encoding="utf-8"))["tokenizer_sha256"] != "from another tokenizer"


# --- batches ------------------------------------------------------------------------------------


def test_train_batches_are_shifted_windows_reproducible_by_seed() -> None:
    ids = np.arange(1000, dtype=np.uint16)
    x, y = next(train_batches(ids, batch_size=4, seq_len=16, seed=0))
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == np.int64
    np.testing.assert_array_equal(y[:, :-1], x[:, 1:])
    np.testing.assert_array_equal(y[:, -1], x[:, -1] + 1)  # ids are consecutive: the next token
    a, b = train_batches(ids, 4, 16, seed=7), train_batches(ids, 4, 16, seed=7)
    for _ in range(3):
        np.testing.assert_array_equal(next(a)[0], next(b)[0])
    other = next(train_batches(ids, 4, 16, seed=8))[0]
    assert not np.array_equal(other, next(train_batches(ids, 4, 16, seed=7))[0])


def test_train_batches_reach_the_last_token_and_reject_too_short_data() -> None:
    ids = np.arange(18)  # exactly one start is possible besides 0: windows of 17 tokens
    seen = {int(x[0, 0]) for x, _ in (next(train_batches(ids, 1, 16, seed=s)) for s in range(50))}
    assert seen == {0, 1}
    with pytest.raises(DataError, match="fewer than one window"):
        next(train_batches(np.arange(16), 2, 16, seed=0))


@pytest.mark.parametrize("max_tokens", [None, 1, 50, 64, 99, 10_000])
def test_val_windows_cover_the_requested_targets_exactly_once(max_tokens: int | None) -> None:
    ids = np.arange(100, dtype=np.uint16) * 3
    windows = list(val_windows(ids, seq_len=32, max_tokens=max_tokens))
    n = 99 if max_tokens is None else min(max_tokens, 99)
    assert all(x.shape == y.shape and x.shape[0] == 1 and 1 <= x.shape[1] <= 32 for x, y in windows)
    xs = np.concatenate([x[0] for x, _ in windows])
    ys = np.concatenate([y[0] for _, y in windows])
    np.testing.assert_array_equal(ys, ids[1:1 + n])
    np.testing.assert_array_equal(xs, ids[:n])
    assert ys.dtype == np.int64


# --- n-gram baseline ----------------------------------------------------------------------------


def test_bigram_baseline_beats_unigram_which_beats_uniform_bytes(stdlib_tc) -> None:
    _, tc = stdlib_tc
    unigram, bigram = ngram_baseline_bpb(tc, 1), ngram_baseline_bpb(tc, 2)
    assert 0 < bigram < unigram < 8


def test_unigram_baseline_is_add_one_counting() -> None:
    tb = np.array([1, 1, 2, 3], dtype=np.int64)
    tc = TokenizedCorpus(fingerprint="toy", vocab_size=4, train_ids=np.array([0, 1, 1, 2, 1, 0], np.uint16),
                         val_ids=np.array([0, 1, 3], np.uint16), token_bytes=tb, val_bytes=5)
    # Targets are the validation tokens after the first: 1 (count 3) and 3 (count 0), of 6 + 4.
    expected = -(np.log2(4 / 10) + np.log2(1 / 10)) / (1 + 3)
    assert ngram_baseline_bpb(tc, 1) == pytest.approx(expected)


def test_kneser_ney_bigram_is_a_distribution_for_seen_and_unseen_contexts() -> None:
    rng = np.random.default_rng(0)
    V = 50
    train = rng.integers(0, V - 5, size=5000)  # the last 5 tokens never occur in training
    for context in (0, 7, V - 1):
        p = data._kneser_ney_bigram(train, V, np.full(V, context), np.arange(V))
        assert p.sum() == pytest.approx(1.0) and (p > 0).all()


def test_ngram_order_other_than_1_or_2_raises(stdlib_tc) -> None:
    with pytest.raises(DataError, match="order must be 1 or 2"):
        ngram_baseline_bpb(stdlib_tc[1], 3)


def test_atomic_write_leaves_no_temporary_files(tmp_path: Path) -> None:
    target = tmp_path / "x" / "f.bin"
    atomic_write(target, b"abc")
    atomic_write(target, b"def")
    assert target.read_bytes() == b"def" and os.listdir(target.parent) == ["f.bin"]
