"""``lm generate``: streamed output for one and several prompts, batched decoding equals one-by-one
decoding, prompts read in pieces give the same continuation, the Transformer's length limit and a
model without tokenizer are one-line errors; the generation benchmark script runs."""

from __future__ import annotations

import json

import pytest
import torch

from lm.evaluation.common import open_checkpoint
from lm.evaluation.generate import decode_batch, generate
from lm.evaluation.sampling import generate_tokens
from tests.evaluation.conftest import error_line, random_model, run_lm


def test_batched_greedy_decoding_equals_one_by_one_and_pieces():
    torch.manual_seed(0)
    for name in ("gla", "rwkv7"):
        model, _ = random_model(name)
        prompts = [[0, 5, 9, 3, 7, 1, 2], [0, 4], [0, 8, 8, 8, 2]]
        together = decode_batch(model, prompts, 6, 0.0, 0, 1.0, 0, eod_id=None)
        for p, c in zip(prompts, together):
            alone = decode_batch(model, [p], 6, 0.0, 0, 1.0, 0, eod_id=None)[0]
            assert c.tokens == alone.tokens, name
            # the prompt read in pieces of 2 tokens (state carried) continues identically
            pieces = [int(t[0]) for t in generate_tokens(model, [p], 6, temperature=0.0, prefill_chunk=2)]
            assert pieces == alone.tokens, name


@pytest.mark.xdist_group("evaluation")
def test_generate_cli_streams_and_checks_lengths(lm_runs, parity_run, tmp_path):
    # one prompt: the prompt, then the text inline; JSON with the completion
    out = tmp_path / "gen.json"
    proc = run_lm(
        "generate",
        str(lm_runs["gla"]),
        "--prompt",
        "def main(",
        "--max-new-tokens",
        "12",
        "--temperature",
        "0",
        "--out",
        str(out),
    )
    res = json.loads(out.read_text())
    comp = res["completions"][0]
    assert proc.stdout.startswith("def main(") and proc.stdout.rstrip("\n").endswith(comp["text"].rstrip("\n")[-5:])
    assert 0 < len(comp["tokens"]) <= 12 and "tokens/s" in proc.stderr
    # sampling is reproducible with a seed; several prompts stream as [k] lines
    args = (
        "generate",
        str(lm_runs["gla"]),
        "-p",
        "import os",
        "-p",
        "class A:",
        "-p",
        "x",
        "-n",
        "10",
        "--temperature",
        "0.9",
        "--top-k",
        "20",
        "--top-p",
        "0.9",
        "--seed",
        "3",
    )
    first, second = run_lm(*args, "--out", str(tmp_path / "a.json")), run_lm(*args, "--out", str(tmp_path / "b.json"))
    a = json.loads((tmp_path / "a.json").read_text())["completions"]
    assert a == json.loads((tmp_path / "b.json").read_text())["completions"] and len(a) == 3
    assert first.stdout == second.stdout
    for k in (1, 2, 3):
        assert f"[{k}] <end>" in first.stdout
    # the Transformer: prompts of different lengths one by one, in the KV-cache limit
    ckpt = open_checkpoint(str(lm_runs["transformer"]))
    res = generate(ckpt, ["a = 1", "def f(x):\n    return"], max_new_tokens=8, temperature=0.0)
    assert [c["prompt"] for c in res["completions"]] == ["a = 1", "def f(x):\n    return"]
    line = error_line(run_lm("generate", str(lm_runs["transformer"]), "-p", "x = 1\n" * 30, "-n", "16", check=False))
    assert "max_seq_len (64)" in line and "--prompt 1" in line
    # a checkpoint trained on a synthetic task has no tokenizer
    line = error_line(run_lm("generate", str(parity_run), "-p", "hi", check=False))
    assert "no tokenizer" in line


def test_generation_benchmark_runs(tmp_path, capsys):
    from lm.evaluation.bench_generate import main

    out = tmp_path / "bench.json"
    main(
        [
            "--size",
            "tiny",
            "--contexts",
            "16",
            "48",
            "--steps",
            "3",
            "--chunk",
            "16",
            "--in-process",
            "--json",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert "| gla (tiny" in printed and "| transformer (tiny" in printed
    rows = json.loads(out.read_text())["rows"]
    state = {(r["model"], r["context"]): r["state_mb_after_context"] for r in rows}
    assert state[("gla", 16)] == state[("gla", 48)]  # the recurrent state does not grow
    assert state[("transformer", 48)] == pytest.approx(3 * state[("transformer", 16)])  # the KV cache does
