"""Perplexity: carrying the state piece by piece (down to one token at a time) gives the
whole-sequence losses for every recurrent family; sliding windows score each token once; the CLI
writes JSON/CSV/PNG with bits per byte from the evaluated text; a tokenizer mismatch is an error."""

from __future__ import annotations

import csv
import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lm.evaluation.ppl import perplexity, score_documents, text_file_documents, window_plan
from tests.evaluation.conftest import error_line, in_memory_checkpoint, random_model, run_lm


def whole_sequence_losses(model, doc: np.ndarray, prefix: int) -> np.ndarray:
    inputs = torch.tensor(np.concatenate([[prefix], doc[:-1]]))[None]
    with torch.no_grad():
        logits, _ = model(inputs)
    return F.cross_entropy(logits[0].double(), torch.tensor(doc), reduction="none").numpy()


@pytest.mark.parametrize("name", ["gla", "deltanet", "rwkv7", "gated_rnn", "srwm", "aaren"])
def test_stepwise_equals_whole_sequence_for_recurrent_families(name):
    torch.manual_seed(0)
    model, cfg = random_model(name)
    ckpt = in_memory_checkpoint(model, {"model": cfg, "train": {"seq_len": 16}})
    rng = np.random.default_rng(0)
    docs = [rng.integers(2, 64, size=n) for n in (90, 37, 5)]
    expected = [whole_sequence_losses(model, d, prefix=0) for d in docs]
    for seq_len in (1, 13, 4096):  # one token at a time, odd pieces, the whole document at once
        stats, method = score_documents(ckpt, docs, prefix_id=0, seq_len=seq_len, batch_size=2)
        assert method["seq_len"] == seq_len
        for i, d in enumerate(docs):
            assert stats.doc_tokens[i] == len(d)
            np.testing.assert_allclose(stats.doc_loss[i], expected[i].sum(), rtol=2e-5, err_msg=f"{name} {seq_len}")
        ppl_whole = math.exp(sum(e.sum() for e in expected) / sum(len(d) for d in docs))
        assert math.exp(stats.total / stats.tokens) == pytest.approx(ppl_whole, rel=2e-5)


def test_sliding_windows_score_every_token_once():
    for n, window, stride in ((1, 8, 4), (8, 8, 3), (29, 8, 3), (30, 10, 10), (17, 16, 1)):
        plan = window_plan(n, window, stride)
        scored = [p for b, e, s in plan for p in range(s, e)]
        assert scored == list(range(n))
        assert all(e - b <= window and b <= s for b, e, s in plan)
        assert all(s - b >= window - stride for b, e, s in plan[1:])  # context of later windows
    torch.manual_seed(0)
    model, cfg = random_model("transformer", max_seq_len=64)
    ckpt = in_memory_checkpoint(model, {"model": cfg, "train": {"seq_len": 32}})
    doc = np.random.default_rng(1).integers(2, 64, size=150)
    # a window as long as the document is the whole-sequence loss
    short = doc[:40]
    stats, _ = score_documents(ckpt, [short], 0, seq_len=64, stride=16)
    np.testing.assert_allclose(stats.total, whole_sequence_losses(model, short, 0).sum(), rtol=1e-5)
    # longer documents: every token once, each window's first scored token by the window's own pass
    stats, method = score_documents(ckpt, [doc, short], 0, seq_len=32, stride=8, batch_size=3)
    assert method == {"method": "sliding windows", "seq_len": 32, "stride": 8}
    assert stats.tokens == 190 and list(stats.doc_tokens) == [150, 40]
    with pytest.raises(Exception, match="max_seq_len"):
        score_documents(ckpt, [doc], 0, seq_len=65)


@pytest.mark.xdist_group("evaluation")
def test_ppl_cli_on_shards_and_text_file(lm_runs, eval_data, tmp_path):
    meta = json.loads((eval_data / "metadata.json").read_text())
    val = meta["splits"]["validation"]
    out = tmp_path / "ppl-gla"
    proc = run_lm("eval", "ppl", str(lm_runs["gla"]), "--context", "full", "--seq-len", "48", "--out", str(out))
    assert "bits/byte" in proc.stdout and "not the same treatment for every family" in proc.stdout
    res = json.loads((out / "ppl.json").read_text())
    assert res["tokens"] == val["tokens"] and res["documents"] == val["documents"]
    assert res["bytes"] == val["bytes"] and res["bytes_from"] == "split metadata"
    assert res["bits_per_byte"] == pytest.approx(res["loss"] / math.log(2) * res["tokens"] / res["bytes"])
    assert res["ppl"] == pytest.approx(math.exp(res["loss"]))
    assert res["train_seq_len"] == 32 and res["tokens_beyond_train_len"] > 0
    assert res["max_document_tokens"] > 32  # scored beyond the training length, state carried
    rows = list(csv.DictReader(open(out / "loss_by_position.csv")))
    assert sum(int(r["tokens"]) for r in rows) == res["tokens"]
    weighted = sum(float(r["loss"]) * int(r["tokens"]) for r in rows) / res["tokens"]
    assert weighted == pytest.approx(res["loss"], rel=1e-5)
    assert (out / "loss_by_position.png").stat().st_size > 5000

    # a text file with the Transformer (windows of its max_seq_len 64, stride 16); a subset of docs
    text = tmp_path / "doc.txt"
    text.write_text("def f(x):\n    return [i * x for i in range(10)]\n" * 12 + "# naïve café\n", encoding="utf-8")
    out_t = tmp_path / "ppl-t"
    run_lm(
        "eval",
        "ppl",
        str(lm_runs["transformer"]),
        "--data",
        str(text),
        "--context",
        "full",
        "--stride",
        "16",
        "--out",
        str(out_t),
    )
    res_t = json.loads((out_t / "ppl.json").read_text())
    assert res_t["bytes"] == len(text.read_bytes()) and res_t["documents"] == 1
    assert res_t["method"] == "sliding windows" and res_t["seq_len"] == 64 and res_t["stride"] == 16
    assert res_t["tokens"] > 64
    out_s = tmp_path / "ppl-subset"
    run_lm("eval", "ppl", str(lm_runs["gla"]), "--max-docs", "1", "--max-tokens", "100", "--out", str(out_s))
    sub = json.loads((out_s / "ppl.json").read_text())
    assert sub["tokens"] == min(100, sub["max_document_tokens"]) and sub["bytes_from"] == "decoded scored tokens"
    assert 0 < sub["bytes"] < val["bytes"]


@pytest.mark.xdist_group("evaluation")
def test_ppl_rejects_shards_of_another_tokenizer(lm_runs, eval_data, tmp_path):
    other = tmp_path / "other-data"
    shutil.copytree(eval_data, other)
    meta = json.loads((other / "metadata.json").read_text())
    meta["tokenizer"]["sha256"] = meta["tokenizer_sha256"] = "0" * 64  # shards made with a different tokenizer
    (other / "metadata.json").write_text(json.dumps(meta))
    line = error_line(run_lm("eval", "ppl", str(lm_runs["gla"]), "--data", str(other), check=False))
    assert "tokenizer sha256" in line and str(other) in line
    line = error_line(run_lm("eval", "ppl", str(lm_runs["gla"]), "--split", "nope", check=False))
    assert "--split" in line and "validation" in line


class _Tokenizer:
    """Bytes as tokens (ids 1..63 by byte value mod 63 + 1): enough to score text without a BPE."""

    def encode(self, text):
        return type("E", (), {"ids": [b % 63 + 1 for b in text.encode("utf-8")]})()

    def decode(self, ids, skip_special_tokens=True):
        return "x" * len(ids)


@pytest.mark.parametrize("name", ["gla", "transformer"])
def test_per_document_ppl_is_the_mean_over_separately_scored_documents(tmp_path, name):
    """--per-document on a text file (blank-line documents) gives the token-weighted mean of scoring each
    document as its own file; --stream differs (later documents see earlier ones); the default
    context treats both families alike (sliding windows of the training length)."""
    torch.manual_seed(0)
    model, cfg = random_model(name, max_seq_len=64)
    ckpt = in_memory_checkpoint(model, {"model": cfg, "train": {"seq_len": 16}})
    docs = ["alpha beta gamma delta " * 3, "second document, a bit longer than the first one " * 2, "third."]
    whole = tmp_path / "all.txt"
    whole.write_text("\n\n".join(docs), encoding="utf-8")
    tok = _Tokenizer()
    text = text_file_documents(whole, tok, 0, split_by="blank_line")
    assert len(text.docs) == 3
    result = perplexity(ckpt, text, 0, context=16)
    assert result["method"] == "sliding windows (every family)" and result["seq_len"] == 16
    assert result["protocol"] == "per-document" and result["context"] == 16
    loss_sum, tokens = 0.0, 0
    for i, doc in enumerate(docs):
        single = tmp_path / f"doc{i}.txt"
        single.write_text(doc, encoding="utf-8")
        r = perplexity(ckpt, text_file_documents(single, tok, 0), 0, context=16)
        loss_sum += r["loss"] * r["tokens"]
        tokens += r["tokens"]
    assert result["tokens"] == tokens
    assert result["loss"] == pytest.approx(loss_sum / tokens, rel=1e-9)
    assert result["ppl"] == pytest.approx(math.exp(loss_sum / tokens), rel=1e-9)
    stream = perplexity(ckpt, text, 0, context=16, protocol="stream")
    assert stream["tokens"] == tokens and stream["loss"] != pytest.approx(result["loss"], rel=1e-9)


@pytest.mark.xdist_group("evaluation")
def test_ppl_default_protocol_is_the_same_for_every_family(lm_runs, tmp_path):
    text = tmp_path / "two.txt"
    text.write_text("def f(x):\n    return x\n\n\nclass A:\n    pass\n\n" * 3, encoding="utf-8")
    for name in ("gla", "transformer"):
        out = tmp_path / name
        proc = run_lm(
            "eval", "ppl", str(lm_runs[name]), "--data", str(text), "--split-by", "blank_line", "--out", str(out)
        )
        assert (
            "protocol: per-document (each document scored separately); context: 32 tokens for every family"
            in proc.stdout
        ), proc.stdout
        res = json.loads((out / "ppl.json").read_text())
        assert res["documents"] == 6 and res["method"] == "sliding windows (every family)" and res["seq_len"] == 32
    line = error_line(run_lm("eval", "ppl", str(lm_runs["gla"]), "--context", "lots", check=False))
    assert "--context" in line and "'lots'" in line
