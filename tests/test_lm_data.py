"""Background text (raretask.lm.corpus, .tokenizer, .tokens, .rng, .ngram, .stream, .background)."""

from __future__ import annotations

import gzip
import hashlib
import json
import sys
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raretask.errors import UserError
from raretask.lm.background import BackgroundConfig
from raretask.lm.corpus import TextCorpus, kjv_path
from raretask.lm.ngram import NGramModel
from raretask.lm.rng import mix, row_keys
from raretask.lm.stream import TokenStream
from raretask.lm.tokenizer import _pieces, cache_root, tokenise, train_tokenizer
from raretask.lm.tokens import TokenArray
from raretask.runs import store

V = 512  # small BPE for speed
N_CHAPTERS = 120  # Genesis 1 .. Exodus 10: ~150K tokens at V = 512


@pytest.fixture(scope="session")
def kjv_docs() -> list[str]:
    return list(TextCorpus.kjv().documents())


@pytest.fixture(scope="session")
def subset(tmp_path_factory, kjv_docs):
    """The first chapters of the KJV as JSONL, and a session cache directory."""
    root = tmp_path_factory.mktemp("lmdata")
    path = root / "kjv_subset.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in kjv_docs[:N_CHAPTERS]))
    return path, root / "cache"


@pytest.fixture(scope="session")
def bg(subset):
    path, cache = subset
    return BackgroundConfig(corpus=[str(path)], vocab_size=V, cache_dir=str(cache)).build()


def write_bin(path, tokens, dtype):
    np.asarray(tokens, dtype=dtype).tofile(path)
    return str(path)


# -- the embedded corpus ------------------------------------------------------------------------
def test_kjv_is_one_document_per_chapter_without_importing_bible(kjv_docs):
    assert "bible" not in sys.modules
    assert kjv_path().name == "kjv.jsonl"
    assert len(kjv_docs) == 1189  # chapters of the Protestant canon
    assert kjv_docs[0].startswith("In the beginning God created the heaven and the earth. And the")
    assert kjv_docs[0].endswith("And the evening and the morning were the sixth day.")
    assert kjv_docs[-1].endswith("The grace of our Lord Jesus Christ be with you all. Amen.")
    assert sum(map(len, kjv_docs)) == 4_136_263


def test_default_background_is_the_kjv(tmp_path, kjv_docs):
    built = BackgroundConfig(
        corpus=["kjv"], cache_dir=str(tmp_path)
    ).build()  # vocab 8192: trains in ~1.5 s
    info = built.describe()
    assert info["corpus"] == "kjv" and info["vocab_size"] == info["tokenizer_ids"] == 8192
    tokens = np.concatenate(built.train.pieces + built.val.pieces)
    assert (tokens == 0).sum() == 1189 and tokens[-1] == 0  # one EOD after each chapter
    assert len(tokens) == pytest.approx(944_714, rel=0.01)  # tokenizers 0.23: 4.4 chars/token
    assert info["val_tokens"] == pytest.approx(0.01 * len(tokens), rel=0.2)
    assert tokens[info["train_tokens"] - 1] == 0  # validation starts at a chapter
    opening = built.decode(built.val.pieces[0][:20])  # Revelation 9 with tokenizers 0.23
    assert [d for d in kjv_docs[-30:] if d.startswith(opening)]


# -- tokenizer -----------------------------------------------------------------------------------
def test_round_trip_on_corpus_and_odd_text(bg, kjv_docs):
    for doc in kjv_docs[:: len(kjv_docs) // 25]:  # also chapters the BPE never saw
        assert bg.decode(bg.encode(doc)) == doc
    odd = "  naïve café — 東京 🎉\n\n\ttabs  <|endoftext|> end "
    ids = bg.encode(odd)
    assert bg.decode(ids) == odd
    assert bg.eod_id == 0 and 0 not in ids  # the literal string is text, never EOD
    assert bg.tokenizer.get_vocab_size() == V and max(ids) < V


def test_token_cache_is_documents_then_eod(bg, subset, kjv_docs):
    tokens = np.concatenate(bg.train.pieces + bg.val.pieces)
    oracle = np.concatenate([bg.encode(d) + [0] for d in kjv_docs[:N_CHAPTERS]])
    np.testing.assert_array_equal(tokens, oracle)
    assert isinstance(bg.train.pieces[0].base, np.memmap) and tokens.dtype == np.uint16
    assert bg.tokenizer_path.parent == subset[1] / "tokenizers"
    assert bg.tokenizer_path.with_suffix(".bin").stat().st_size == 2 * len(oracle)


def test_second_build_loads_the_cache(bg, subset):
    path, cache = subset
    files = [bg.tokenizer_path, bg.tokenizer_path.with_suffix(".bin")]
    before = [(f.stat().st_mtime_ns, f.read_bytes()) for f in files]
    again = BackgroundConfig(corpus=[str(path)], vocab_size=V, cache_dir=str(cache)).build()
    assert again.tokenizer_path == bg.tokenizer_path
    assert [(f.stat().st_mtime_ns, f.read_bytes()) for f in files] == before  # not rewritten
    np.testing.assert_array_equal(again.train.pieces[0], bg.train.pieces[0])
    assert sorted(p.suffix for p in (cache / "tokenizers").iterdir() if "tmp" in p.name) == []


def test_training_is_deterministic_and_keyed(tmp_path, kjv_docs):
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in kjv_docs[:15]))
    corpus = TextCorpus.from_paths([path])
    _, a = train_tokenizer(corpus, 300, tmp_path / "one")
    _, b = train_tokenizer(corpus, 300, tmp_path / "two")  # a fresh cache: trained again
    _, c = train_tokenizer(corpus, 320, tmp_path / "one")
    assert a.read_bytes() == b.read_bytes() and a.name == b.name
    assert c.name != a.name
    moved = tmp_path / "copy.jsonl"  # content-addressed: a copy hits the same entry
    moved.write_bytes(path.read_bytes())
    assert train_tokenizer(TextCorpus.from_paths([moved]), 300, tmp_path / "one")[1] == a


def test_concurrent_builds_train_once(monkeypatch, tmp_path, kjv_docs):
    """Two builders of one cache entry (as the ranks of one host): the lock makes one train and
    write, the other wait and load the same file."""
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in kjv_docs[:15]))
    corpus = TextCorpus.from_paths([path])
    writes, write_text = [], store.write_text

    def counted(p, text):
        writes.append(p)
        write_text(p, text)

    monkeypatch.setattr(store, "write_text", counted)
    results = []

    def build():
        results.append(train_tokenizer(corpus, 300, tmp_path))

    builders = [threading.Thread(target=build) for _ in range(2)]
    for t in builders:
        t.start()
    for t in builders:
        t.join()
    assert len(writes) == 1 and [r[1] for r in results] == writes * 2


def test_a_failed_tokenise_leaves_no_cache_file(bg, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "In the beginning"}) + "\n{not json\n")
    out = tmp_path / "cache" / "bad.bin"
    with pytest.raises(UserError, match=r"bad.jsonl:2"):
        tokenise(TextCorpus.from_paths([path]), bg.tokenizer, out, "uint16")
    assert sorted(p.name for p in out.parent.iterdir()) == ["bad.bin.lock"]  # no file, no temp


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("RARETASK_CACHE", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("RARETASK_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "raretask"


def test_long_documents_encode_in_pieces_to_the_same_ids(bg, kjv_docs):
    doc = "\n".join(kjv_docs[:3]).replace(". ", ".\n")
    pieces = _pieces(doc, max_chars=300)
    assert len(pieces) > 10 and "".join(pieces) == doc
    assert sum((bg.encode(p) for p in pieces), []) == bg.encode(doc)


# -- user corpora -------------------------------------------------------------------------------
def test_text_jsonl_gz_and_parquet_documents(tmp_path):
    (tmp_path / "a.txt").write_text("first file\n\nstill the first document\n")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write('{"body": "two"}\n\n{"body": ""}\n{"body": "three", "id": 3}\n')
    table = pa.table({"body": ["four", "five"], "n": [1, 2]})
    pq.write_table(table, tmp_path / "c.parquet", row_group_size=1)
    corpus = TextCorpus.from_paths([tmp_path], text_field="body")  # a directory, sorted
    assert list(corpus.documents()) == [
        "first file\n\nstill the first document\n",  # one document per text file
        "two",
        "three",  # blank lines and empty documents skipped
        "four",
        "five",
    ]


@pytest.mark.parametrize("dtype, vocab", [("uint16", 60_000), ("uint32", 300_000)])
def test_bin_shards_are_memory_mapped(tmp_path, dtype, vocab):
    rng = np.random.default_rng(0)
    a = rng.integers(1, vocab, 3000)
    b = rng.integers(1, vocab, 2000)
    a[::50] = 0  # EOD every 50 tokens
    paths = [write_bin(tmp_path / "s0.bin", a, dtype), write_bin(tmp_path / "s1.bin", b, dtype)]
    cfg = BackgroundConfig(corpus=paths, vocab_size=vocab, eod_id=0, cache_dir=str(tmp_path))
    built = cfg.build()
    assert all(isinstance(p.base, np.memmap) and p.dtype == dtype for p in built.train.pieces)
    together = np.concatenate(built.train.pieces + built.val.pieces)
    np.testing.assert_array_equal(together, np.concatenate([a, b]))
    assert built.tokenizer is None and built.eod_id == 0
    assert not (tmp_path / "tokenizers").exists()  # nothing cached for pre-tokenised input


def test_llmc_header_shards(tmp_path):
    tokens = np.arange(1, 101, dtype=np.uint16)
    header = np.zeros(256, dtype=np.int32)
    header[:3] = [20240520, 1, len(tokens)]
    path = tmp_path / "fineweb_train_000001.bin"
    path.write_bytes(header.tobytes() + tokens.tobytes())
    cfg = BackgroundConfig(corpus=[str(path)], vocab_size=200, eod_id=0, val_fraction=0.0)
    np.testing.assert_array_equal(cfg.build().train.pieces[0], tokens)


# -- malformed input: one UserError per case, naming the file and line --------------------------
BAD_JSONL = {
    "broken-json": (
        b'{"text": "a"}\n{"text": "b"}\n{"text": "c",\n',
        r"bad\.jsonl:3: not valid JSON",
    ),
    "missing-field": (b'{"text": "a"}\n{"txt": "b"}\n', r"bad\.jsonl:2: no field 'text'"),
    "not-a-string": (b'{"text": 5}\n', r"bad\.jsonl:1: field 'text' is int, expected a string"),
    "not-an-object": (b'{"text": "a"}\n["text"]\n', r"bad\.jsonl:2: expected a JSON object"),
    "non-utf8": (b'{"text": "a"}\n{"text": "caf\xe9"}\n', r"bad\.jsonl:2: not valid UTF-8"),
    "empty": (b'\n{"text": ""}\n  \n', r"corpus .*bad\.jsonl has no text"),
}


@pytest.mark.parametrize("case", list(BAD_JSONL))
def test_malformed_jsonl(tmp_path, case):
    content, message = BAD_JSONL[case]
    (tmp_path / "bad.jsonl").write_bytes(content)
    cfg = BackgroundConfig(
        corpus=[str(tmp_path / "bad.jsonl")], vocab_size=300, cache_dir=str(tmp_path)
    )
    with pytest.raises(UserError, match=message):
        cfg.build()
    assert not list((tmp_path / "tokenizers").glob("*.json"))  # no partial output


def test_non_utf8_text_file_names_line_and_column(tmp_path):
    (tmp_path / "book.txt").write_bytes(b"line one\nline two\nthird \xff line\n")
    with pytest.raises(UserError, match=r"book\.txt:3: not valid UTF-8 \(byte 0xff at column 7\)"):
        list(TextCorpus.from_paths([tmp_path / "book.txt"]).documents())


@pytest.mark.parametrize(
    "table, message",
    [
        (pa.table({"content": ["a"]}), r"bad\.parquet: no column 'text' \(columns: 'content'\)"),
        (pa.table({"text": [1, 2]}), r"bad\.parquet: column 'text' has type int64"),
        (pa.table({"text": ["a", "b", None]}), r"bad\.parquet: row 3: column 'text' is null"),
    ],
)
def test_malformed_parquet(tmp_path, table, message):
    pq.write_table(table, tmp_path / "bad.parquet")
    with pytest.raises(UserError, match=message):
        list(TextCorpus.from_paths([tmp_path / "bad.parquet"]).documents())


def test_not_parquet(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(UserError, match=r"bad\.parquet: not a readable Parquet file"):
        list(TextCorpus.from_paths([tmp_path / "bad.parquet"]).documents())


def bin_cfg(path, **kw):
    return BackgroundConfig(corpus=[str(path)], **{"vocab_size": V, "eod_id": 0, **kw})


def test_bin_id_outside_vocabulary(tmp_path):
    tokens = np.arange(10) * 100  # 600 at index 6
    path = write_bin(tmp_path / "shard.bin", tokens, "uint16")
    with pytest.raises(
        UserError, match=r"shard\.bin: token 6 \(0-based\) is id 600 >= vocab_size 512"
    ):
        bin_cfg(path).build()


def test_bin_errors(tmp_path):
    (tmp_path / "odd.bin").write_bytes(b"\x01\x00\x02")
    with pytest.raises(UserError, match=r"odd\.bin: 3 bytes is not a whole number of uint16"):
        bin_cfg(tmp_path / "odd.bin").build()
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(UserError, match=r"empty\.bin has no tokens"):
        bin_cfg(tmp_path / "empty.bin").build()
    path = write_bin(tmp_path / "ok.bin", np.arange(100), "uint16")
    with pytest.raises(UserError, match="a pre-tokenised corpus needs eod_id"):
        bin_cfg(path, eod_id=None).build()


def test_bad_paths(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n")
    (tmp_path / "t.txt").write_text("text")
    write_bin(tmp_path / "s.bin", [1, 2], "uint16")
    cases = [
        ([tmp_path / "x.csv"], r"x\.csv: unknown format"),
        ([tmp_path / "nope.txt"], r"nope\.txt does not exist"),
        ([tmp_path / "t.txt", tmp_path / "s.bin"], "either pre-tokenised .bin shards or text"),
    ]
    for paths, message in cases:
        with pytest.raises(UserError, match=message):
            BackgroundConfig(corpus=[str(p) for p in paths], eod_id=0).build()


# -- streams -------------------------------------------------------------------------------------
SOURCES = ["corpus", "ngram"]


@pytest.mark.parametrize("source", SOURCES)
def test_stream_is_seeded_and_resumes_exactly(bg, source):
    def stream(seed=0):
        return bg.stream(batch_size=4, seq_len=32, seed=seed, source=source)

    s = stream()
    uninterrupted = [next(s) for _ in range(3)] + [s.next_batch() for _ in range(3)]
    assert uninterrupted[0].shape == (4, 33) and uninterrupted[0].dtype == torch.long
    first = stream()
    part = [next(first) for _ in range(3)]
    state = first.state_dict()
    resumed = stream()
    resumed.load_state_dict(state)
    rest = [next(resumed) for _ in range(3)]
    for a, b in zip(uninterrupted, part + rest, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(next(stream(seed=1)), uninterrupted[0])
    assert len({tuple(r) for b in uninterrupted for r in b.tolist()}) == 24  # no row repeats


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("world", [2, 3])
def test_ranks_see_disjoint_rows_of_one_global_batch(bg, source, world):
    one = bg.stream(batch_size=2 * world, seq_len=16, seed=5, source=source)
    ranks = [
        bg.stream(batch_size=2, seq_len=16, seed=5, rank=r, world_size=world, source=source)
        for r in range(world)
    ]
    for _ in range(2):
        assert torch.equal(torch.cat([next(s) for s in ranks]), next(one))
    # a world-size change on resume keeps the global batch
    one.load_state_dict(ranks[0].state_dict())
    assert torch.equal(next(one), ranks[1].global_batch(2))


def test_resume_refuses_a_different_stream(bg):
    state = bg.stream(batch_size=4, seq_len=16, seed=0).state_dict()
    with pytest.raises(UserError, match="saved global_batch_size 4, this run has 8"):
        bg.stream(batch_size=8, seq_len=16, seed=0).load_state_dict(state)
    with pytest.raises(UserError, match="saved source 'corpus', this run has 'ngram:3'"):
        bg.stream(batch_size=4, seq_len=16, seed=0, source="ngram").load_state_dict(state)


def test_epochs_count_global_tokens(bg):
    ranks = [bg.stream(batch_size=8, seq_len=64, rank=r, world_size=2) for r in range(2)]
    for s in ranks:
        for _ in range(10):
            next(s)
    served = 10 * 16 * 64
    for s in ranks:
        summary = s.summary()
        assert summary["background_tokens"] == served
        assert summary["corpus_tokens"] == len(bg.train)
        assert summary["epochs"] == pytest.approx(served / len(bg.train))
        assert summary["repeats"] is True
    assert bg.stream(8, 64, source="ngram").summary()["background_source"] == "ngram (order 3)"


def test_windows_are_contiguous_training_text_and_never_validation(tmp_path):
    n, doc = 20_000, 100  # distinct ids 1 .. n - 1 except an EOD (0) ending every document
    tokens = np.arange(n)
    tokens[doc - 1 :: doc] = 0
    path = write_bin(tmp_path / "ids.bin", tokens, "uint16")
    built = bin_cfg(path, vocab_size=n).build()
    cut = len(built.train)
    assert cut == n - n // 100 and tokens[cut - 1] == 0  # 1% held out, at a document start
    assert len(built.val) == n // 100
    train_ids, val_ids = set(tokens[:cut].tolist()) - {0}, set(tokens[cut:].tolist()) - {0}
    for source in SOURCES:
        stream = built.stream(batch_size=64, seq_len=31, seed=1, source=source)
        seen = set(torch.cat([next(stream) for _ in range(20)]).flatten().tolist())
        assert not seen & val_ids and seen - {0} <= train_ids
    x = next(built.stream(batch_size=64, seq_len=31, seed=1)).numpy()
    real = x[:, 1:] != 0
    steps = np.diff(x, axis=1)[real & (x[:, :-1] != 0)]
    assert (steps == 1).all()  # consecutive positions of the corpus
    targets = torch.cat([b[:, 1:].flatten() for b in built.validation_batches(31, 4)])
    np.testing.assert_array_equal(targets.numpy(), tokens[cut + 1 : cut + 1 + len(targets)])
    assert len(targets) == (len(built.val) - 1) // 31 * 31  # each target once


def test_windows_never_cross_shards():
    pieces = [np.arange(0, 10), np.arange(100, 105), np.arange(200, 220)]
    arr = TokenArray(pieces)
    assert arr.window_count(5) == 6 + 1 + 16
    rows = arr.windows(np.arange(arr.window_count(5)), 5)
    assert (np.diff(rows, axis=1) == 1).all()
    assert rows[6].tolist() == [100, 101, 102, 103, 104]
    assert arr.slice(8, 27).pieces[1].tolist() == [100, 101, 102, 103, 104]


def test_window_longer_than_corpus(tmp_path):
    path = write_bin(tmp_path / "small.bin", np.arange(1, 50), "uint16")
    stream = bin_cfg(path, val_fraction=0.0).build().stream(batch_size=2, seq_len=64)
    with pytest.raises(UserError, match=r"\(49 tokens\) is shorter than one window of 65"):
        next(stream)


# -- the n-gram source ----------------------------------------------------------------------------
def test_ngram_unigram_matches_the_corpus(bg):
    train = bg.train.to_numpy()
    corpus = np.bincount(train, minlength=V) / len(train)
    sample = bg.ngram().sample(n_rows=256, length=257, seed=0)
    assert sample.max() < V and set(np.unique(sample)) <= set(np.unique(train))
    freq = np.bincount(sample.ravel(), minlength=V) / sample.size
    assert 0.5 * np.abs(freq - corpus).sum() < 0.05  # total variation


def test_ngram_follows_the_corpus_transitions():
    cycle = np.tile([1, 2, 3, 0], 500)  # a deterministic corpus
    rows = NGramModel(vocab_size=8, order=3).fit(cycle).sample(n_rows=64, length=100, seed=0)
    follows = rows[:, 1:] == np.array([1, 2, 3, 0])[rows[:, :-1]]
    # Witten-Bell leaves 1/(N+1) of the mass to lower orders; only the unigram can leave the cycle
    assert follows.mean() > 0.999 and rows.max() <= 3


def test_ngram_text_is_new_but_corpus_like(bg):
    train = bg.train.to_numpy()
    sample = bg.ngram().sample(n_rows=32, length=65, seed=1)
    k = 8  # an 8-token stretch of the sample, found verbatim in the corpus?
    grams = {tuple(train[i : i + k]) for i in range(len(train) - k)}
    found = [tuple(r[i : i + k]) in grams for r in sample for i in range(0, 65 - k, k)]
    assert np.mean(found) < 0.2  # fresh text, not a copy of the corpus (order 3 gives ~0.02)


def test_row_keys_depend_on_global_row_only():
    a = row_keys(3, 7, np.arange(8))
    assert np.array_equal(a[4:], row_keys(3, 7, np.arange(4, 8)))
    assert len(set(a.tolist()) | set(row_keys(3, 8, np.arange(8)).tolist())) == 16


# -- the fast sampler and the prefetching stream: same numbers as before ---------------------------
TEXT = (b"In the beginning God created the heaven and the earth. And the earth was without form, "
        b"and void; and darkness was upon the face of the deep.")


def synthetic_corpus(n=20_000, v=300):
    """Repeated text with 20% hashed noise: seen, backed-off and never-seen contexts at every
    order, from integer arithmetic only (no tokenizer, no numpy RNG)."""
    noise = (mix(np.arange(n, dtype=np.uint64)) % np.uint64(v)).astype(np.int64)
    text = np.resize(np.frombuffer(TEXT, dtype=np.uint8), n).astype(np.int64)
    return np.where(noise % 5 == 0, noise, text)


def digest(arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.asarray(a).astype("<i8").tobytes())
    return h.hexdigest()[:16]


def test_ngram_rows_equal_those_of_the_binary_search_sampler():
    """The oracle: digests computed by an independent implementation of the same chain (two
    binary searches per token instead of lookup tables, 1,024 rows per call, no prefetch
    thread; benchmarks/RESULTS.md, "LM host-side overhead"): same seeds, same rows."""
    x = synthetic_corpus()
    models = [NGramModel(300, order).fit(x) for order in (1, 2, 3, 4, 5)]
    keys = [row_keys(11, s, np.arange(40)) for s in range(3)]
    assert digest(m.rows(k, 50) for m in models for k in keys) == "df070d06c8d1d38e"
    stream = TokenStream(models[2], 6, 20, 4, 1, 2)
    assert digest(next(stream) for _ in range(7)) == "c7e64fcbc9dc5599"


def test_prefetch_serves_the_same_batches_and_saves_the_next_ones_step(monkeypatch):
    """A chunk of 3 steps per call; the thread samples the next chunk while this one is
    served. Resuming from any state_dict (mid-chunk, at a chunk's end, after a probe-style
    peek) continues with the batch the saved step names."""
    model = NGramModel(300, 3).fit(synthetic_corpus())
    model.rows_per_call = 3 * 4  # 3 steps of 4 rows
    threads = []
    rows = model.rows

    def spy(keys, length):
        threads.append(threading.current_thread().name)
        return rows(keys, length)

    monkeypatch.setattr(model, "rows", spy)
    plain = TokenStream(model, 4, 16, seed=2, prefetch=False)
    expected = [next(plain) for _ in range(12)]
    assert set(threads) == {threading.current_thread().name}
    threads.clear()

    stream = TokenStream(model, 4, 16, seed=2, prefetch=True)
    got, states = [], {}
    for step in range(12):
        states[step] = stream.state_dict()
        assert states[step]["step"] == step  # however far the thread has sampled
        if step % 5 == 4:  # the trainer's probe: peek at the next batch, put the stream back
            peek = stream.next_batch()
            stream.load_state_dict(states[step])
            assert torch.equal(peek, expected[step])
        got.append(next(stream))
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)
    assert any(name.startswith("raretask-stream") for name in threads)  # sampled ahead
    stream.load_state_dict(states[2])  # back to an earlier chunk: the thread's chunk is stale
    for want in expected[2:8]:
        assert torch.equal(next(stream), want)
    for step in (2, 3, 7, 11):  # mid-chunk and chunk starts
        resumed = TokenStream(model, 4, 16, seed=2, prefetch=True)
        resumed.load_state_dict(states[step])
        for want in expected[step:]:
            assert torch.equal(next(resumed), want)
        resumed.close()
    stream.close()
    assert stream._pool is None
