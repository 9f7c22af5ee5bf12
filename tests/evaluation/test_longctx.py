"""Passkey and needle-in-a-haystack retrieval (lm/evaluation/longctx.py) and the extrapolation
figure (lm/evaluation/extrapolation.py): prompts are deterministic, exactly as long as asked, hold
the needle at the asked depth and never the answer in the filler; an induction (copying) model
decoding through the real generation path scores 100%, a constant model 0 (chance); the CLI
writes the heatmap and one-line errors."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn

from lm.errors import LMError
from lm.evaluation.longctx import (
    Filler,
    build_trial,
    exact_match,
    make_template,
    parse_depths,
    parse_lengths,
    run_longctx,
    trial_rng,
    write_longctx_outputs,
)
from tests.evaluation.conftest import error_line, in_memory_checkpoint, run_lm


class InductionOracle(nn.Module):
    """A language model that copies: the next token is the one that followed the latest earlier
    occurrence of the last ``k`` tokens (else ``fallback``). Its state is the token history, so it
    decodes through ``prefill`` + ``step`` like the real models; ``constant`` always predicts it."""

    def __init__(self, vocab: int, k: int = 3, fallback: int = 0, constant=None):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))
        self.vocab, self.k, self.fallback, self.constant = vocab, k, fallback, constant
        self.cfg = SimpleNamespace(variant="induction-oracle", max_seq_len=10**9, family="fwp")
        self.blocks = [SimpleNamespace(mixer=SimpleNamespace(constant_state=True))]  # what Checkpoint.recurrent reads

    def _next(self, history: np.ndarray) -> int:
        if self.constant is not None:
            return self.constant
        k, t = self.k, len(history)
        if t > k:
            tail = history[-k:]
            windows = np.lib.stride_tricks.sliding_window_view(history[:-1], k)  # windows ending before t-1
            hits = np.flatnonzero((windows == tail).all(1))
            if len(hits):
                return int(history[hits[-1] + k])
        return self.fallback

    def hidden_states(self, tokens, state=None, return_state=False):
        history = tokens if state is None else torch.cat([state, tokens], 1)
        T, offset = tokens.shape[1], history.shape[1] - tokens.shape[1]
        h = torch.zeros(tokens.shape[0], T, self.vocab)
        for b in range(tokens.shape[0]):
            for t in range(max(0, T - 8), T):  # prefill reads the last position, answer scoring a few
                h[b, t, self._next(history[b, : offset + t + 1].numpy())] = 10.0
        return h, (history if return_state else None)

    def logits(self, h):
        return h

    def step(self, token, state):
        h, state = self.hidden_states(token[:, None], state, return_state=True)
        return h[:, 0], state

    def num_parameters(self):
        return 0


def lm_checkpoint(model, tokenizer_path):
    config = {
        "model": {"family": "fwp", "variant": "induction-oracle"},
        "data": {"source": {"kind": "stdlib"}, "tokenizer": {"eod_token": "<|endoftext|>"}},
    }
    return in_memory_checkpoint(model, config, tokenizer_path)


@pytest.fixture(scope="module")
def tok(eval_data):
    from data.tokenizer import load_tokenizer

    return load_tokenizer(eval_data / "tokenizer.json")


@pytest.fixture(scope="module")
def filler(eval_data, tok):
    from lm.evaluation.ppl import shard_documents

    text = shard_documents(eval_data, "validation", _sha(eval_data))
    return Filler(text.docs, tok.token_to_id("<|endoftext|>"), tok.encode("\n\n").ids, "test")


def _sha(eval_data):
    return json.loads((eval_data / "metadata.json").read_text())["tokenizer"]["sha256"]


def test_parsing_and_templates():
    assert parse_lengths("512, 2k,32k,512") == [512, 2048, 32768]
    assert parse_depths("1,0,0.5") == [0.0, 0.5, 1.0]
    for bad, msg in (("5x", "--lengths"), ("0", "> 0")):
        with pytest.raises(LMError, match=msg):
            parse_lengths(bad)
    with pytest.raises(LMError, match=r"in \[0, 1\]"):
        parse_depths("0,1.5")
    with pytest.raises(LMError, match="must contain {value}"):
        make_template("passkey", needle="no answer here")
    with pytest.raises(LMError, match="give the answer away"):
        make_template("passkey", question="it is {value}")
    with pytest.raises(LMError, match="--task"):
        make_template("haystack")
    assert exact_match(" 71432. Remember", "71432") and exact_match("71432", "71432")
    for wrong in (" 714325", " 7143", "x71432", "7143 2"):
        assert not exact_match(wrong, "71432")


@pytest.mark.xdist_group("evaluation")
@pytest.mark.parametrize("task", ["passkey", "needle"])
def test_trials_are_deterministic_exact_length_and_placed_at_depth(tok, filler, task):
    template = make_template(task)
    eod = tok.token_to_id("<|endoftext|>")
    a = build_trial(tok, filler, template, 600, 0.5, trial_rng(3, 600, 0.5, 1), eod)
    b = build_trial(tok, filler, template, 600, 0.5, trial_rng(3, 600, 0.5, 1), eod)
    assert a == b
    c = build_trial(tok, filler, template, 600, 0.5, trial_rng(4, 600, 0.5, 1), eod)
    assert c["prompt"] != a["prompt"]
    for length in (256, 1000):
        for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
            t = build_trial(tok, filler, template, length, depth, trial_rng(0, length, depth, 0), eod)
            p = t["prompt"]
            assert len(p) == length and p[0] == eod and eod not in p[1:]
            s, n = t["needle_start"], t["needle_tokens"]
            needle_ids = tok.encode(template.needle.format(key=t["key"], value=t["answer"])).ids
            assert p[s : s + n] == needle_ids  # the needle is where the trial says
            assert abs((s - 1) - depth * t["filler_tokens"]) <= 0.5  # ... at the asked depth of the filler
            filler_text = tok.decode(p[1:s]) + tok.decode(
                p[s + n : len(p) - len(tok.encode(template.question.format(key=t["key"])).ids)]
            )
            assert t["answer"] not in filler_text and len(t["answer"]) == template.digits
    with pytest.raises(LMError, match="cannot hold the needle"):
        build_trial(tok, filler, template, 10, 0.5, trial_rng(0, 10, 0.5, 0), eod)


def test_answers_are_redrawn_until_absent_from_the_filler(tok):
    eod = tok.token_to_id("<|endoftext|>")
    one_digit = make_template("passkey", digits=1)
    # the filler holds every digit but 9: the only possible answer is 9
    no_nine = Filler([np.array(tok.encode("a1 b2 c3 d4 e5 f6 g7 h8 " * 40).ids)], eod, [], "digits")
    answers = {
        build_trial(tok, no_nine, one_digit, 200, 0.5, trial_rng(0, 200, 0.5, i), eod)["answer"] for i in range(20)
    }
    assert answers == {"9"}
    every = Filler([np.array(tok.encode("0 1 2 3 4 5 6 7 8 9 " * 40).ids)], eod, [], "digits")
    with pytest.raises(LMError, match="occurs in the filler"):
        build_trial(tok, every, one_digit, 200, 0.5, trial_rng(0, 200, 0.5, 0), eod)
    with pytest.raises(LMError, match="at least 64"):
        Filler([np.array([1, 2, 3])], eod, [], "tiny")


@pytest.mark.xdist_group("evaluation")
def test_copying_model_scores_one_and_constant_scores_zero(eval_data, tok, filler, tmp_path):
    vocab = tok.get_vocab_size()
    perfect = lm_checkpoint(InductionOracle(vocab), eval_data / "tokenizer.json")
    for task in ("passkey", "needle"):
        res = run_longctx(perfect, filler, task, [128, 384], [0.0, 0.5, 1.0], trials=3, seed=1)
        assert res["acc"] == 1.0 and len(res["cells"]) == 6 and all(c["acc"] == 1.0 for c in res["cells"])
        assert all(r["correct"] and r["generated"].lstrip().startswith(r["answer"]) for r in res["records"])
        # the copying model is sure of the answer after the needle, not after the control's other value
        assert all(
            r["answer_nll"] < 0.1 and r["control_nll"] > 3 and r["control_answer"] != r["answer"]
            for r in res["records"]
        )
        assert all(c["nll_gain"] > 3 for c in res["cells"])
    again = run_longctx(perfect, filler, "needle", [128, 384], [0.0, 0.5, 1.0], trials=3, seed=1, likelihood=False)
    assert [r["answer"] for r in again["records"]] == [r["answer"] for r in res["records"]]  # the seed decides
    zero = tok.encode(" 0").ids[0]
    constant = lm_checkpoint(InductionOracle(vocab, constant=zero), eval_data / "tokenizer.json")
    res0 = run_longctx(constant, filler, "passkey", [128], [0.0, 1.0], trials=4, seed=1)
    assert res0["acc"] == 0.0  # chance for a 5-digit number: 1 in 90,000
    assert all(abs(c["nll_gain"]) < 1e-6 for c in res0["cells"])  # a model that ignores the needle gains nothing
    paths = write_longctx_outputs(res, tmp_path)
    md = paths["md"].read_text()
    assert paths["png"].stat().st_size > 5000 and "| 0.5 | 1.00 | 1.00 |" in md and "log-likelihood gain" in md
    # a Transformer's lengths beyond max_seq_len are skipped, all of them an error
    short = lm_checkpoint(InductionOracle(vocab), eval_data / "tokenizer.json")
    short.loaded.config["model"]["family"] = "transformer"
    short.model.blocks[0].mixer.constant_state = False  # a KV cache
    short.model.cfg.max_seq_len = 200
    res = run_longctx(short, filler, "passkey", [128, 384], [0.5], trials=1)
    assert res["lengths"] == [128] and res["skipped_lengths"] == [384]
    with pytest.raises(LMError, match="every length exceeds"):
        run_longctx(short, filler, "passkey", [384], [0.5], trials=1)


@pytest.mark.xdist_group("evaluation")
def test_longctx_cli(lm_runs, parity_run, eval_data, tmp_path):
    out = tmp_path / "lc"
    proc = run_lm(
        "eval",
        "longctx",
        str(lm_runs["gla"]),
        "--lengths",
        "128,256",
        "--depths",
        "0,1",
        "--trials",
        "2",
        "--out",
        str(out),
    )
    res = json.loads((out / "longctx.json").read_text())
    assert res["lengths"] == [128, 256] and len(res["cells"]) == 4 and len(res["records"]) == 8
    assert "| depth \\ length | 128 | 256 |" in proc.stdout and (out / "longctx.png").stat().st_size > 5000
    assert "validation" in res["filler"]
    assert all("nll_gain" in c for c in res["cells"]) and "log-likelihood gain" in proc.stdout
    # same seed, same prompts, answers and generations (without the likelihood pass)
    run_lm(
        "eval",
        "longctx",
        str(lm_runs["gla"]),
        "--lengths",
        "128,256",
        "--depths",
        "0,1",
        "--trials",
        "2",
        "--no-likelihood",
        "--out",
        str(tmp_path / "lc2"),
    )
    again = json.loads((tmp_path / "lc2" / "longctx.json").read_text())
    assert [(r["answer"], r["generated"]) for r in again["records"]] == [
        (r["answer"], r["generated"]) for r in res["records"]
    ]
    assert "nll_gain" not in again["cells"][0]
    # the Transformer (max_seq_len 64) cannot hold 128 tokens
    line = error_line(run_lm("eval", "longctx", str(lm_runs["transformer"]), "--lengths", "128", check=False))
    assert "every length exceeds the Transformer's limit" in line
    line = error_line(run_lm("eval", "longctx", str(parity_run), check=False))
    assert "synthetic task" in line
    line = error_line(run_lm("eval", "longctx", str(lm_runs["gla"]), "--depths", "0,2", check=False))
    assert "--depths" in line
    line = error_line(run_lm("eval", "longctx", str(lm_runs["gla"]), "--data", str(tmp_path / "no"), check=False))
    assert "does not exist" in line


@pytest.mark.xdist_group("evaluation")
def test_extrapolation_cli_puts_models_on_one_figure(lm_runs, eval_data, tmp_path):
    out = tmp_path / "ex"
    proc = run_lm(
        "eval",
        "extrapolation",
        str(lm_runs["gla"]),
        str(lm_runs["transformer"]),
        "--data",
        str(eval_data),
        "--max-docs",
        "4",
        "--max-tokens",
        "3000",
        "--labels",
        "gla,transformer",
        "--out",
        str(out),
    )
    res = json.loads((out / "extrapolation.json").read_text())
    assert [m["label"] for m in res["models"]] == ["gla", "transformer"]
    assert all(m["train_seq_len"] == 32 and m["tokens_beyond_train_len"] > 0 for m in res["models"])
    rows = (out / "extrapolation.csv").read_text().splitlines()
    assert rows[0].startswith("label,") and {r.split(",")[0] for r in rows[1:]} == {'"gla"', '"transformer"'}
    assert (out / "extrapolation.png").stat().st_size > 5000 and "| gla | 32 |" in proc.stdout
    # the same numbers as `lm eval ppl --context full`
    run_lm(
        "eval",
        "ppl",
        str(lm_runs["gla"]),
        "--data",
        str(eval_data),
        "--max-docs",
        "4",
        "--max-tokens",
        "3000",
        "--context",
        "full",
        "--out",
        str(tmp_path / "ppl"),
    )
    ppl = json.loads((tmp_path / "ppl" / "ppl.json").read_text())
    assert ppl["loss"] == pytest.approx(res["models"][0]["loss"])
    line = error_line(run_lm("eval", "extrapolation", str(lm_runs["gla"]), "--labels", "a,b", check=False))
    assert "2 labels for 1 checkpoints" in line
    line = error_line(run_lm("eval", "extrapolation", str(lm_runs["gla"]), "--context", "wide", check=False))
    assert "--context" in line
