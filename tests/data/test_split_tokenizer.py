"""Split assignment, tokenizer training and loading, the tokenizer sample, shard files."""

from __future__ import annotations

import numpy as np
import pytest

from lm.errors import DataError
from data.split import TEST, TRAIN, VALIDATION, assign_splits, splitmix64, unit_hash
from data.tokenizer import (
    TrainingSample,
    ensure_special_tokens,
    load_tokenizer,
    tokenizer_sha256,
    train_tokenizer,
)
from data.shards import SplitWriter, TokenShards, FlatTokens

from tests.data.conftest import paragraph


def keys(n, seed):
    return [unit_hash(seed, 1, i) for i in range(n)]


def test_unit_hash_is_deterministic_and_uniform():
    assert splitmix64(0) == 0xE220A8397B1DCDAF  # the published first output for state 0
    a = np.array(keys(20000, 5))
    assert np.array_equal(a, np.array(keys(20000, 5)))
    assert 0 <= a.min() and a.max() < 1 and abs(a.mean() - 0.5) < 0.01
    assert not np.array_equal(a, np.array(keys(20000, 6)))


def test_split_same_seed_same_split_different_seed_different():
    s1 = assign_splits(keys(500, 1), 0.1, 0.05)
    assert np.array_equal(s1, assign_splits(keys(500, 1), 0.1, 0.05))
    s2 = assign_splits(keys(500, 2), 0.1, 0.05)
    assert not np.array_equal(s1, s2)
    frac = [(s1 == lab).mean() for lab in (TRAIN, VALIDATION, TEST)]
    assert abs(frac[1] - 0.1) < 0.04 and abs(frac[2] - 0.05) < 0.03
    # a document's split does not depend on how many documents follow it
    assert np.array_equal(assign_splits(keys(300, 1), 0.1, 0.05), s1[:300])


def test_split_small_corpora():
    labels = assign_splits([0.9, 0.8, 0.7], 0.02, 0.0)  # nothing hashed below 0.02
    assert (labels == VALIDATION).sum() == 1 and labels[2] == VALIDATION  # the smallest key moves
    labels = assign_splits([0.01, 0.015], 0.02, 0.0)  # everything hashed into validation
    assert sorted(labels.tolist()) == [TRAIN, VALIDATION]
    with pytest.raises(DataError, match="corpus has 1 document"):
        assign_splits([0.5], 0.02, 0.0)
    assert assign_splits([0.5], 0.0, 0.0).tolist() == [TRAIN]


def test_train_bpe_with_special_tokens(tmp_path):
    texts = [paragraph(i) for i in range(50)]
    tok = train_tokenizer(texts, 300, 2, ["<|endoftext|>", "<|pad|>"])
    assert tok.get_vocab_size() == 300
    assert tok.token_to_id("<|endoftext|>") == 0 and tok.token_to_id("<|pad|>") == 1
    ids = tok.encode("doc 3: alpha omega ünïcode ✓").ids
    assert tok.decode(ids) == "doc 3: alpha omega ünïcode ✓"  # byte-level: no unknown tokens
    assert len(ids) < len("doc 3: alpha omega ünïcode ✓".encode())  # merges were learned
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    again = train_tokenizer(texts, 300, 2, ["<|endoftext|>", "<|pad|>"])
    assert again.to_str() == tok.to_str()  # deterministic training
    assert load_tokenizer(tmp_path).encode("alpha beta").ids == tok.encode("alpha beta").ids
    assert tokenizer_sha256(path) == tokenizer_sha256(tmp_path) and len(tokenizer_sha256(path)) == 64
    with pytest.raises(DataError, match="at least 258"):
        train_tokenizer(texts, 200, 2, ["<|endoftext|>", "<|pad|>"])
    with pytest.raises(DataError, match="tokenizer file not found"):
        load_tokenizer(tmp_path / "nope.json")


def test_ensure_special_tokens_adds_missing():
    tok = train_tokenizer([paragraph(i) for i in range(20)], 280, 2, ["<|endoftext|>"])
    (eod, pad), added = ensure_special_tokens(tok, ["<|endoftext|>", "<|pad|>"])
    assert (eod, pad, added) == (0, 280, ["<|pad|>"])


def test_training_sample_is_seeded_and_capped():
    docs = [(paragraph(i) * (1 + i % 3)) for i in range(200)]

    def build(seed, cap):
        s = TrainingSample(cap, seed)
        for i, d in enumerate(docs):
            s.offer(i, d, len(d))
        return s

    a, b, c = build(1, 20_000), build(1, 20_000), build(2, 20_000)
    assert a.texts() == b.texts() and a.texts() != c.texts()
    assert 15_000 < sum(map(len, a.texts())) <= 20_000 and a.bytes <= 20_000
    order = [docs.index(t) for t in a.texts()]
    assert order == sorted(order) and order[-1] > 100  # spread over the corpus, in source order
    assert len(build(1, 10**9).texts()) == 200
    assert build(1, 10).texts() == [docs[0][:10]]  # every document exceeds the cap


def test_split_writer_shards_and_flat_windows(tmp_path):
    import json

    tokens = np.arange(2500, dtype=np.uint16) % 1000
    w = SplitWriter(tmp_path, "train", "uint16", shard_tokens=1000)
    w.add(tokens[:1234], np.array([1000, 234]), nbytes=5000)
    w.add(tokens[1234:], np.array([1266]), nbytes=1)
    info = w.close()
    assert [s["tokens"] for s in info["shards"]] == [1000, 1000, 500]
    assert info["documents"] == 3 and info["bytes"] == 5001
    for s in info["shards"]:
        arr = np.load(tmp_path / s["file"], mmap_mode="r")
        assert arr.dtype == np.uint16 and len(arr) == s["tokens"]
    assert np.load(tmp_path / "train/doc_starts.npy").tolist() == [0, 1000, 1234]
    flat = FlatTokens([np.load(tmp_path / s["file"], mmap_mode="r") for s in info["shards"]])
    assert len(flat) == 2500
    for start, length in ((0, 10), (995, 10), (990, 1500), (2490, 10), (1000, 0)):
        assert np.array_equal(flat.window(start, length), tokens[start : start + length])
    assert np.array_equal(flat[998:1003], tokens[998:1003]) and flat[-1] == tokens[-1]
    with pytest.raises(IndexError):
        flat.window(2495, 10)
    (tmp_path / "metadata.json").write_text(
        json.dumps({"format": "lm-token-shards/1", "dtype": "uint16", "splits": {"train": info}})
    )
    shards = TokenShards(tmp_path, "train")
    assert len(shards) == 2500 and shards.num_documents == 3
    import pickle

    clone = pickle.loads(pickle.dumps(shards))
    assert np.array_equal(clone.window(990, 20), tokens[990:1010])
    with pytest.raises(DataError, match="no split 'test'"):
        TokenShards(tmp_path, "test")


@pytest.mark.parametrize("workers, backend", [(1, "processes"), (2, "processes"), (2, "threads")])
def test_encoder_appends_eod_and_keeps_literal_special_tokens_as_text(workers, backend):
    from data.encode import ParallelEncoder, make_tasks
    from data.sources import Document

    tok = train_tokenizer([paragraph(i) for i in range(30)], 300, 2, ["<|endoftext|>", "<|pad|>"])
    texts = [paragraph(i) + (" <|endoftext|> inside" if i % 2 else "") for i in range(9)]
    docs = [(i % 2, Document(t, len(t))) for i, t in enumerate(texts)]
    with ParallelEncoder(tok.to_str(), 0, "uint16", workers, backend) as enc:
        results = list(enc.map(make_tasks(docs, batch_size=2)))
    by_split = {0: [], 1: []}
    for label, tokens, lengths, nbytes in results:
        assert tokens.dtype == np.uint16 and lengths.sum() == len(tokens)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        by_split[label] += [tokens[s : s + n] for s, n in zip(starts, lengths)]
    for label in (0, 1):
        expected = [t for i, t in enumerate(texts) if i % 2 == label]
        assert len(by_split[label]) == len(expected)
        for ids, text in zip(by_split[label], expected):
            assert ids[-1] == 0 and (ids[:-1] != 0).all()  # one eod, at the end
            assert tok.decode(ids[:-1].tolist(), skip_special_tokens=False) == text
