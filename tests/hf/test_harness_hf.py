"""lm-evaluation-harness's own ``hf`` model on an export: its log-likelihoods equal this
project's ``rnn-lm`` adapter on the same weights, its batched greedy ``generate_until`` runs, and
``simple_evaluate`` scores a local multiple-choice task fully offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.helpers import write_mc_task
from tests.hf.conftest import tiny_config, write_source

pytest.importorskip("transformers", reason="the optional extra 'hf' (transformers) is not installed")
pytest.importorskip("lm_eval", reason="the optional extra 'eval' (lm-evaluation-harness) is not installed")


class Request:
    def __init__(self, *args):
        self.args = args


@pytest.mark.parametrize("name", ["gla", "transformer"])
def test_hf_model_scores_equal_rnn_lm_adapter(tmp_path, tokenizer_file, name):
    from lm_eval.models.huggingface import HFLM

    from lm.evaluation.harness import RecurrentLM
    from lm.hf.export import export_hf

    src = write_source(tmp_path / "src", tiny_config(name), tokenizer_file)
    out = export_hf(str(src), str(tmp_path / f"hf-eval-{name}"))
    hf = HFLM(pretrained=str(out), trust_remote_code=True, batch_size=3, dtype="float32", device="cpu")
    ours = RecurrentLM(str(src), batch_size=3)
    requests = [Request(c, x) for c in ["def add(a, b):\n    return a", "import"] for x in [" + b", " os", "(a)"]]
    requests.append(Request("", "class Foo"))
    for (got, got_greedy), (want, want_greedy) in zip(hf.loglikelihood(requests), ours.loglikelihood(requests)):
        assert got == pytest.approx(want, abs=1e-4) and got_greedy == want_greedy
    outs = hf.generate_until(
        [
            Request("def add", {"until": ["\n\n"], "max_gen_toks": 4, "do_sample": False}),
            Request("import os\nprint", {"until": ["\n\n"], "max_gen_toks": 4, "do_sample": False}),
        ]
    )
    want = ours.generate_until(
        [
            Request("def add", {"until": ["\n\n"], "max_gen_toks": 4}),
            Request("import os\nprint", {"until": ["\n\n"], "max_gen_toks": 4}),
        ]
    )
    assert outs == want


def test_simple_evaluate_hf_on_local_task(tmp_path, tokenizer_file):
    from lm.hf.export import export_hf

    out = export_hf(str(write_source(tmp_path / "src", tiny_config("rwkv7"), tokenizer_file)), str(tmp_path / "hf-se"))
    mc = tmp_path / "mc.jsonl"
    mc.write_text(
        "\n".join(
            json.dumps(d)
            for d in [
                {"question": "def add(a, b):\n    return a", "choices": [" + b", " ((", " 42 ]"], "answer": 0},
                {"question": "import", "choices": [" os", " )))", " ]"], "answer": 0},
            ]
        )
        + "\n"
    )
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_mc_task(tasks, mc)
    code = textwrap.dedent(f"""\
        import json
        from lm_eval import simple_evaluate
        from lm_eval.tasks import TaskManager
        res = simple_evaluate(model="hf", model_args="pretrained={out},trust_remote_code=True,dtype=float32",
                              tasks=["tiny_mc"], task_manager=TaskManager(include_path="{tasks}", include_defaults=False),
                              batch_size=2, device="cpu")
        print(json.dumps(res["results"]["tiny_mc"]))
        """)
    env = {
        **os.environ,
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "HF_DATASETS_CACHE": str(tmp_path / "hf" / "datasets"),
        "OMP_NUM_THREADS": "1",
    }
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600
    )
    assert res.returncode == 0, res.stderr[-3000:]
    scores = json.loads(res.stdout.strip().splitlines()[-1])
    assert 0.0 <= scores["acc,none"] <= 1.0
