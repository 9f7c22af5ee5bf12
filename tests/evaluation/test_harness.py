"""lm-evaluation-harness: the adapter's scores equal plain whole-sequence scoring (context state
branched to each continuation; rolling likelihood), and ``lm eval harness`` runs a multiple-choice
and a rolling-loglikelihood task from local jsonl files fully offline."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from tests.evaluation.conftest import error_line, lm_env, run_lm, run_lm_subprocess
from tests.helpers import write_mc_task

pytest.importorskip("lm_eval", reason="the optional extra 'eval' (lm-evaluation-harness) is not installed")


class Request:
    def __init__(self, *args):
        self.args = args


def naive_logprob(model, ctx, cont):
    tokens = torch.tensor([ctx + cont])
    with torch.no_grad():
        logits, _ = model(tokens[:, :-1])
    logp = F.log_softmax(logits[0].double(), -1)
    positions = range(len(ctx) - 1, len(ctx) + len(cont) - 1)
    total = sum(float(logp[p, t]) for p, t in zip(positions, cont))
    greedy = all(int(logp[p].argmax()) == t for p, t in zip(positions, cont))
    return total, greedy


@pytest.mark.xdist_group("evaluation")
@pytest.mark.parametrize("name", ["gla", "transformer"])
def test_adapter_scores_equal_whole_sequence_scoring(lm_runs, name):
    from lm_eval.api.registry import get_model

    from lm.evaluation.harness import RecurrentLM

    assert get_model("rnn-lm") is RecurrentLM
    lm = RecurrentLM(str(lm_runs[name]), batch_size=3)
    model = lm.ckpt.model
    contexts = ["def add(a, b):\n    return a", "import", "x = [1, 2, 3]\nprint(x"]
    choices = [" + b", " - b", " * b", "(a)"]
    requests = [Request(c, x) for c in contexts for x in choices] + [Request("", "hello world")]
    results = lm.loglikelihood(requests)
    for req, (logp, greedy) in zip(requests, results):
        ctx, cont = lm.encode_pair(*req.args)
        want, want_greedy = naive_logprob(model, ctx, cont)
        assert logp == pytest.approx(want, rel=1e-4, abs=1e-4) and greedy == want_greedy
    assert lm.stats["contexts_read"] == 4  # each distinct context once, branched to 4 choices
    texts = ["def f(x):\n    return x * 2\n" * 4, "a"]
    rolling = lm.loglikelihood_rolling([Request(t) for t in texts])
    for text, value in zip(texts, rolling):
        ids = lm.tok_encode(text)
        if name == "gla" or len(ids) < lm.max_length:  # the Transformer's long text: sliding windows
            want, _ = naive_logprob(model, [lm.eod], ids)
            assert value == pytest.approx(want, rel=1e-4)
    outs = lm.generate_until([Request("def f(", {"until": [")"], "max_gen_toks": 6})])
    assert len(outs) == 1 and ")" not in outs[0]


@pytest.mark.xdist_group("evaluation")
def test_harness_cli_offline_with_local_tasks(lm_runs, tmp_path):
    mc = tmp_path / "mc.jsonl"
    mc.write_text(
        "\n".join(
            json.dumps(d)
            for d in [
                {"question": "def add(a, b):\n    return a", "choices": [" + b", " ((", " 42 ]"], "answer": 0},
                {"question": "import", "choices": [" os", " )))", " ]"], "answer": 0},
                {"question": "class Foo", "choices": [":", "!!", " +"], "answer": 0},
            ]
        )
        + "\n"
    )
    texts = tmp_path / "texts.jsonl"
    texts.write_text("\n".join(json.dumps({"text": t}) for t in ["def f(x):\n    return x\n", "import sys\n"]) + "\n")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_mc_task(tasks, mc)
    (tasks / "tiny_rolling.yaml").write_text(
        textwrap.dedent(f"""\
        task: tiny_rolling
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {texts}
        test_split: test
        output_type: loglikelihood_rolling
        doc_to_text: ""
        doc_to_target: "{{{{text}}}}"
        metric_list:
          - metric: word_perplexity
          - metric: bits_per_byte
        """)
    )
    out = tmp_path / "harness"
    env = lm_env(
        HF_DATASETS_OFFLINE="1",
        HF_HUB_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf"),
        HF_DATASETS_CACHE=str(tmp_path / "hf" / "datasets"),
    )
    proc = run_lm_subprocess(
        "eval",
        "harness",
        str(lm_runs["gla"]),
        "--tasks",
        "tiny_mc,tiny_rolling",
        "--include-path",
        str(tasks),
        "--limit",
        "3",
        "--out",
        str(out),
        env=env,
    )
    assert "tiny_mc" in proc.stdout and "bits_per_byte" in proc.stdout
    res = json.loads((out / "harness.json").read_text())
    assert 0.0 <= res["results"]["tiny_mc"]["acc,none"] <= 1.0
    assert res["results"]["tiny_rolling"]["bits_per_byte,none"] > 0
    assert res["adapter_stats"]["contexts_read"] == 3 and res["adapter_stats"]["continuations"] == 9


@pytest.mark.xdist_group("evaluation")
def test_harness_unknown_task_lists_close_names(lm_runs, tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager

    import lm.evaluation.harness as harness

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\noutput_type: multiple_choice\n"
        "doc_to_text: q\ndoc_to_choice: [a, b]\ndoc_to_target: 0\n"
    )
    # only the local tasks (indexing lm-eval's ~15k built-in tasks takes long on a small CPU)
    monkeypatch.setattr(
        harness, "task_manager_for", lambda names, path: TaskManager(include_path=path, include_defaults=False)
    )
    line = error_line(
        run_lm("eval", "harness", str(lm_runs["gla"]), "--tasks", "tiny_mcq", "--include-path", str(tasks), check=False)
    )
    assert "unknown lm-eval task(s) tiny_mcq" in line and "closest known: tiny_mc" in line


def test_harness_without_lm_eval_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    line = error_line(run_lm("eval", "harness", "/nonexistent", "--tasks", "x", check=False))
    assert "pip install -e '.[eval]'" in line
