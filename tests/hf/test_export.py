"""``lm export --format hf``: every model config loads through ``AutoModelForCausalLM`` with
logits equal to this project's model (fp32, max abs error <= 1e-5) and the same greedy tokens
(left-padded batches included); the state is generate()'s cache (constant size for the recurrent
families); ``AutoTokenizer`` prepends the end-of-document token; loading imports no CLI code."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.hf.conftest import REPO, VOCAB, tiny_config, write_source

pytest.importorskip("transformers", reason="the optional extra 'hf' (transformers) is not installed")

NAMES = sorted(p.name for p in (REPO / "configs" / "model").iterdir() if (p / "tiny.yaml").is_file())
PROMPTS = ["def add", "import os\nprint(os"]


def load_hf(out: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True)
    return model.eval(), AutoTokenizer.from_pretrained(str(out), trust_remote_code=True)


def greedy(model, ids, n):
    """Greedy decoding with this project's model (whole prompt, then ``step``)."""
    logits, state = model(torch.tensor([ids]), None, return_state=True)
    token, out = logits[:, -1].argmax(-1), []
    for _ in range(n):
        out.append(int(token))
        logits, state = model.step(token, state)
        token = logits.argmax(-1)
    return out


@pytest.mark.parametrize("name", NAMES)
def test_export_equals_model(tmp_path, tokenizer_file, name):
    from lm.hf.export import export_hf
    from lm.training.export import load_model

    src = write_source(tmp_path / "src", tiny_config(name), tokenizer_file)
    out = export_hf(str(src), str(tmp_path / f"hf-{name}"))
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "rnn_lm" and config["architectures"] == ["RnnLMForCausalLM"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_rnn_lm.RnnLMForCausalLM"
    hf, tok = load_hf(out)
    ours = load_model(str(src)).model
    x = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, _ = ours(x)
        got = hf(x).logits
    assert (got - want).abs().max().item() <= 1e-5
    # greedy generate(), a left-padded batch of two prompts, equals our own decoding of each
    enc = tok(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    gen = hf.generate(**enc, max_new_tokens=5, do_sample=False, eos_token_id=None)
    with torch.no_grad():
        for row, prompt in zip(gen, PROMPTS):
            ids = tok(prompt)["input_ids"]
            assert row[-5:].tolist() == greedy(ours, ids, 5), prompt


@pytest.mark.parametrize("name", ["gla", "rwkv7"])
def test_generate_cache_is_the_recurrent_state(tmp_path, tokenizer_file, name):
    """The cache generate() returns is the model state: its size does not grow with the context,
    and continuing from it equals reading the whole sequence."""
    from lm.hf.export import export_hf

    src = write_source(tmp_path / "src", tiny_config(name), tokenizer_file)
    hf, tok = load_hf(export_hf(str(src), str(tmp_path / f"hf-cache-{name}")))
    sizes = []
    for n in (4, 40):
        ids = torch.randint(2, VOCAB, (1, n))
        res = hf.generate(ids, max_new_tokens=3, do_sample=False, eos_token_id=None, return_dict_in_generate=True)
        cache = getattr(res, "cache", None) or getattr(res, "past_key_values", None)
        sizes.append(cache.nbytes())
        assert cache.seen == n + 2  # the last generated token is not read
    assert sizes[0] == sizes[1]
    ids = torch.randint(2, VOCAB, (2, 9))
    with torch.no_grad():
        whole = hf(ids).logits
        first = hf(ids[:, :5], use_cache=True)
        rest = hf(ids[:, 5:], cache=first.cache if hasattr(first, "cache") else first.past_key_values)
    assert (torch.cat([first.logits, rest.logits], 1) - whole).abs().max().item() <= 1e-5


def test_loads_without_cli_and_one_line_errors(tmp_path, tokenizer_file):
    from lm.errors import LMError
    from lm.hf.export import export_hf

    src = write_source(tmp_path / "src", tiny_config("gla"), tokenizer_file)
    out = export_hf(str(src), str(tmp_path / "hf-nocli"))
    code = (
        "import sys, torch; from transformers import AutoModelForCausalLM, AutoTokenizer; "
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True); "
        f"t = AutoTokenizer.from_pretrained({str(out)!r}, trust_remote_code=True); "
        "print(m.generate(**t('def', return_tensors='pt'), max_new_tokens=2).shape); "
        "assert not [k for k in sys.modules if k.startswith('lm.cli') or k.startswith('lm.training')], 'cli'"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    with pytest.raises(LMError, match="exists and is not empty"):
        export_hf(str(src), str(out))
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(LMError, match="is an existing file"):
        export_hf(str(src), str(tmp_path / "a-file"))
    no_tok = write_source(tmp_path / "src2", tiny_config("gla"), tokenizer_file)
    (no_tok / "tokenizer.json").unlink()
    with pytest.raises(LMError, match="no tokenizer file"):
        export_hf(str(no_tok), str(tmp_path / "hf-none"))
    assert not (tmp_path / "hf-none").exists()


def test_cli_export_format_hf(tmp_path, tokenizer_file):
    from tests.evaluation.conftest import error_line, run_lm

    src = write_source(tmp_path / "src", tiny_config("deltanet"), tokenizer_file)
    old_umask = os.umask(0o022)
    try:
        proc = run_lm("export", str(src), str(tmp_path / "hf-cli"), "--format", "hf")
    finally:
        os.umask(old_umask)
    # the modes a plain mkdir/open would give (not the temporary directory's 0700)
    assert stat.S_IMODE((tmp_path / "hf-cli").stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "hf-cli").iterdir()} == {0o644}
    assert "as a transformers model" in proc.stdout
    assert (tmp_path / "hf-cli" / "model.safetensors").is_file() and (
        tmp_path / "hf-cli" / "modeling_rnn_lm.py"
    ).is_file()
    line = error_line(run_lm("export", str(src), str(tmp_path / "x"), "--format", "onnx", check=False))
    assert "--format: 'onnx' is not one of lm, hf" in line
