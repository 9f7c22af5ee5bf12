"""The in-context-learning suite: scores are right (oracle models score 1, constant ones chance),
length buckets and remapped LM tasks work, the one-step-GD baseline is reported, the CLI writes
tables and plots, and bad task names or sweeps are one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from lm.evaluation.icl import TokenRemap, evaluate_task, parse_sweeps, run_suite
from lm.errors import LMError
from tests.evaluation.conftest import error_line, in_memory_checkpoint, random_model, run_lm


class ParityOracle(nn.Module):
    """Predicts at every position the parity of the '1' tokens read so far (right at '=')."""

    def __init__(self, one: int, zero: int, vocab: int, wrong: bool = False):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))
        self.one, self.zero, self.vocab, self.wrong = one, zero, vocab, wrong

    def forward(self, tokens, state=None, return_state=None):
        parity = (tokens == self.one).long().cumsum(1) % 2
        if self.wrong:  # always answers '0'
            parity = torch.zeros_like(parity)
        cls = torch.where(parity == 1, self.one, self.zero)
        return torch.nn.functional.one_hot(cls, self.vocab).float() * 10, None

    def num_parameters(self):
        return 0


class CopyOracle(nn.Module):
    """Predicts token ``inputs[t - lag]`` at position t (the induction copy)."""

    def __init__(self, lag: int, vocab: int):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))
        self.lag, self.vocab = lag, vocab

    def forward(self, tokens, state=None, return_state=None):
        shifted = torch.roll(tokens, self.lag, dims=1)
        return torch.nn.functional.one_hot(shifted, self.vocab).float() * 10, None

    def num_parameters(self):
        return 0


def parity_config(max_length=8):
    return {
        "data": {
            "source": {"kind": "task"},
            "task": {"name": "formal", "params": {"language": "parity", "max_length": max_length}},
        },
        "model": {"family": "fwp", "variant": "recurrent_delta"},
    }


def test_parity_oracle_scores_one_across_length_buckets():
    from data.tasks import build_task

    task = build_task("formal", {"language": "parity"})
    one, zero = task.token["1"], task.token["0"]
    sweeps = parse_sweeps(["length=2-8,9-40,41-80"])
    assert sweeps == {"length": [(2, 8), (9, 40), (41, 80)]}
    good = in_memory_checkpoint(ParityOracle(one, zero, task.spec.vocab_size), parity_config())
    res = evaluate_task(good, "parity", sweeps, n_examples=48, batch_size=16, seed=0)
    assert [r["value"] for r in res["rows"]] == ["2-8", "9-40", "41-80"]
    assert all(r["acc"] == 1.0 and r["seq_acc"] == 1.0 and r["scored"] == 48 for r in res["rows"])
    bad = in_memory_checkpoint(ParityOracle(one, zero, task.spec.vocab_size, wrong=True), parity_config())
    res = evaluate_task(bad, "parity", sweeps, n_examples=200, batch_size=64, seed=0)
    assert all(0.35 < r["acc"] < 0.65 for r in res["rows"])  # answering '0' is right half the time


class ParitySetOracle(nn.Module):
    """Character prediction for parity: labels 0 and 1 always, end-of-string when the number of
    '1' tokens read so far is even."""

    def __init__(self, one: int, flip_after: int = 0):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))
        self.one, self.flip_after = one, flip_after

    def forward(self, tokens, state=None, return_state=None):
        even = (tokens == self.one).long().cumsum(1) % 2 == 0
        if self.flip_after:  # a model that loses track after `flip_after` positions
            even[:, self.flip_after :] = True
        logits = torch.full(tokens.shape + (3,), 10.0)
        logits[..., 2] = torch.where(even, 10.0, -10.0)
        return logits, None

    def num_parameters(self):
        return 0


def test_parity_character_prediction_scores_whole_strings():
    from data.tasks import build_task

    params = {"language": "parity", "parity_target": "next_symbols", "max_length": 8}
    task = build_task("formal", params)
    assert task.spec.output == "multilabel" and task.spec.output_dim == 3
    ex = task.example(np.random.default_rng(0), length=30)
    bits = ex["inputs"][1:] == task.token["1"]
    assert bits.sum() % 2 == 0  # in the language
    assert (ex["targets"][:, 2] == (np.concatenate([[0], np.cumsum(bits)]) % 2 == 0)).all()
    config = {
        "data": {"source": {"kind": "task"}, "task": {"name": "formal", "params": params}},
        "model": {"family": "fwp", "variant": "srwm"},
    }
    sweeps = {"length": [(2, 8), (9, 40)]}
    res = evaluate_task(in_memory_checkpoint(ParitySetOracle(task.token["1"]), config), "parity", sweeps, 40, 16, 0)
    assert all(r["acc"] == 1.0 and r["seq_acc"] == 1.0 for r in res["rows"])
    lost = in_memory_checkpoint(ParitySetOracle(task.token["1"], flip_after=10), config)
    res = evaluate_task(lost, "parity", sweeps, 200, 50, 0)
    assert res["rows"][0]["seq_acc"] == 1.0  # strings of <= 8 bits never reach position 10
    assert res["rows"][1]["seq_acc"] < 0.2 and res["rows"][1]["acc"] > 0.5  # longer ones almost always fail


def test_remapped_induction_on_a_language_model(eval_data):
    """A copy oracle on the remapped task scores 1: inputs and targets are remapped consistently,
    the leading end-of-document token shifts nothing that is scored."""
    from data.tokenizer import load_tokenizer

    tok = load_tokenizer(eval_data / "tokenizer.json")
    cfg = {
        "data": {"source": {"kind": "stdlib"}, "tokenizer": {"eod_token": "<|endoftext|>"}},
        "model": {"family": "gla"},
    }
    ckpt = in_memory_checkpoint(CopyOracle(lag=13, vocab=tok.get_vocab_size()), cfg, eval_data / "tokenizer.json")
    res = evaluate_task(ckpt, "induction", {"length": [13]}, n_examples=16, batch_size=8, seed=0)
    assert res["kind"].startswith("remapped")
    assert res["rows"][0]["acc"] == 1.0 and res["rows"][0]["seq_acc"] == 1.0
    assert res["chance_acc"] == pytest.approx(1 / 34)  # a uniform guess over the task's symbols (the plots' line)
    remap = TokenRemap(34, tok, 0, seed=0)
    assert len(set(remap.table[1:].tolist())) == 33 and 0 not in remap.table[1:] and 1 not in remap.table[1:]


def test_regression_reports_one_step_gd_baseline():
    from data.tasks import build_task, one_step_gd_loss

    torch.manual_seed(0)
    task = build_task("icl_regression", {"dx": 4, "n_pairs": 6, "eval_pairs": [3, 6]})
    model, cfg = random_model("gla", vocab=0, input_dim=5, output_dim=1)
    config = {
        "data": {
            "source": {"kind": "task"},
            "task": {"name": "icl_regression", "params": {"dx": 4, "n_pairs": 6, "eval_pairs": [3, 6]}},
        },
        "model": cfg,
    }
    res = evaluate_task(in_memory_checkpoint(model, config), "icl_regression", {}, n_examples=32, batch_size=16, seed=0)
    assert [r["value"] for r in res["rows"]] == ["3", "6"] and res["output"] == "vectors"
    for r in res["rows"]:
        assert "acc" not in r and r["loss"] > 0
        expected, _ = one_step_gd_loss(task, n_examples=1024, seed=0, n_pairs=int(r["value"]))
        assert r["baseline_loss"] == pytest.approx(expected)


def test_bad_names_and_sweeps():
    ckpt = in_memory_checkpoint(nn.Linear(1, 1), parity_config())
    with pytest.raises(LMError, match="unknown task 'parityy'.*did you mean 'parity'.*known: associative_recall"):
        run_suite(ckpt, ["parityy"], {})
    with pytest.raises(LMError, match="trained on task 'parity'"):
        run_suite(ckpt, ["anbn"], {})
    with pytest.raises(LMError, match="no requested task has a per-example parameter 'n_pairs'"):
        run_suite(ckpt, ["parity"], {"n_pairs": [4]})
    for bad in (["length"], ["length=0"], ["length=9-3"], ["length=a"]):
        with pytest.raises(LMError, match="--sweep"):
            parse_sweeps(bad)


@pytest.mark.xdist_group("evaluation")
def test_icl_cli_on_task_and_lm_checkpoints(parity_run, lm_runs, tmp_path):
    out = tmp_path / "icl-parity"
    proc = run_lm("eval", "icl", str(parity_run), "--sweep", "length=2-8,9-24", "--examples", "24", "--out", str(out))
    assert "| parity | length | 9-24 | 24 |" in proc.stdout
    res = json.loads((out / "icl.json").read_text())
    assert res["trained_on"]["task"] == "formal" and res["tasks"][0]["task"] == "parity"
    rows = res["tasks"][0]["rows"]
    assert [r["value"] for r in rows] == ["2-8", "9-24"] and all(0 <= r["acc"] <= 1 for r in rows)
    assert (out / "icl.md").read_text().startswith("**fwp/recurrent_delta**")
    assert (out / "icl-parity-length.png").stat().st_size > 5000
    # default sweep: the task's eval_lengths; the default output directory is <run>/eval/icl
    run_lm("eval", "icl", str(parity_run), "--examples", "8")
    default = json.loads((parity_run / "eval" / "icl" / "icl.json").read_text())
    assert [r["value"] for r in default["tasks"][0]["rows"]] == ["20", "40", "80", "160"]
    table = run_lm("eval", "icl-compare", str(parity_run), str(out / "icl.json"), "--metric", "acc").stdout
    assert "| parity length 20 |" in table and "| parity length 9-24 |" in table
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    assert len(lines) == 3 and lines[1].startswith(f"| {parity_run.name} | ")  # header, one row per result

    # a language model: remapped recall and induction, and the LM in-context-learning score
    out = tmp_path / "icl-lm"
    proc = run_lm(
        "eval",
        "icl",
        str(lm_runs["gla"]),
        "--examples",
        "16",
        "--sweep",
        "n_pairs=4,8",
        "--sweep",
        "length=8",
        "--early",
        "4",
        "--late",
        "40",
        "--out",
        str(out),
    )
    res = json.loads((out / "icl.json").read_text())
    names = [t["task"] for t in res["tasks"]]
    assert names == ["associative_recall", "induction", "lm_icl_score"]
    score = res["tasks"][2]["rows"][0]
    assert score["documents"] >= 1 and score["score"] == pytest.approx(score["late_loss"] - score["early_loss"])
    assert "LM in-context-learning score" in proc.stdout
    if score["documents"] < 16:  # too few long documents: said in the report
        assert f"warning: only {score['documents']} documents" in proc.stdout and score["warning"]

    # bad input: one-line errors
    line = error_line(run_lm("eval", "icl", str(parity_run), "--tasks", "dyck", check=False))
    assert "unknown task 'dyck'" in line and "known: associative_recall, induction" in line
    line = error_line(run_lm("eval", "icl", str(lm_runs["gla"]), "--tasks", "parity", check=False))
    assert "needs a checkpoint trained on it" in line
