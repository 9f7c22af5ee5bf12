"""``lm import``: a small random model built with fla's own modeling classes (GLAForCausalLM),
saved with ``save_pretrained``, imported into this project's export format, gives fla's logits
(fp32, max abs error <= 1e-4; fla runs on the Triton interpreter on the CPU, with the shims of
tests/kernels/test_fla_backend.py); features without an equivalent are refused by name."""

from __future__ import annotations

import json

import pytest
import torch

from kernels._dispatch import triton_interpret

pytest.importorskip("transformers", reason="the optional extra 'hf' (transformers) is not installed")
pytest.importorskip("fla.models", reason="flash-linear-attention (fla.models) is not installed: pip install -e '.[hf]'")

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or triton_interpret()),
    reason="fla's models run Triton kernels: needs CUDA or TRITON_INTERPRET=1",
)


def randomize(model, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model.eval()


def gla_model(**overrides):
    from fla.models import GLAConfig, GLAForCausalLM

    args = {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_heads": 2,
        "vocab_size": 96,
        "intermediate_size": 128,
        "fuse_cross_entropy": False,
        **overrides,
    }
    cfg = GLAConfig(**args)
    return randomize(GLAForCausalLM(cfg))


@pytest.mark.parametrize(
    "overrides",
    [{}, {"fuse_norm": False, "fuse_swiglu": False, "tie_word_embeddings": True, "use_output_gate": False}],
    ids=["fused", "plain-tied-nogate"],
)
def test_import_gla_matches_fla(tmp_path, fla_interpreter, overrides):
    from lm.hf.import_fla import import_fla
    from lm.training.export import load_model

    fla_model = gla_model(**overrides)
    fla_model.save_pretrained(str(tmp_path / "fla"))
    out = import_fla(str(tmp_path / "fla"), str(tmp_path / "ours"))
    ours = load_model(str(out)).model
    x = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = fla_model(x).logits.float()
        got, _ = ours(x)
    assert (got - want).abs().max().item() <= 1e-4


def test_import_refuses_missing_features(tmp_path):
    from lm.errors import LMError
    from lm.hf.import_fla import import_fla

    src = tmp_path / "fla"
    src.mkdir()
    base = {"model_type": "gla", "hidden_size": 64, "num_hidden_layers": 1, "num_heads": 2, "vocab_size": 96}
    for extra, feature in [
        ({"num_kv_heads": 1}, "grouped key/value heads"),
        ({"clamp_min": -1.0}, "clamped"),
        ({"attn": {"layers": [0]}}, "hybrid softmax-attention"),
        ({"use_short_conv": True}, "short convolution"),
    ]:
        (src / "config.json").write_text(json.dumps({**base, **extra}))
        with pytest.raises(LMError, match=feature):
            import_fla(str(src), str(tmp_path / "out"))
    (src / "config.json").write_text(json.dumps({**base, "model_type": "mamba"}))
    with pytest.raises(LMError, match="model_type 'mamba' is not importable"):
        import_fla(str(src), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_cli_import_then_generate(tmp_path, fla_interpreter):
    from tests.evaluation.conftest import error_line, run_lm
    from tests.hf.conftest import TEXTS

    from data.tokenizer import train_tokenizer

    src = tmp_path / "fla"
    gla_model(vocab_size=320).save_pretrained(str(src))
    train_tokenizer(TEXTS, 300, 1, ["<s>", "</s>"]).save(str(src / "tokenizer.json"))
    (src / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    proc = run_lm("import", str(src), str(tmp_path / "ours"))
    assert "linear_attention/gla" in proc.stdout
    gen = run_lm("generate", str(tmp_path / "ours"), "-p", "def ", "-n", "4", "--temperature", "0")
    assert gen.returncode == 0
    line = error_line(run_lm("import", str(tmp_path / "nowhere"), str(tmp_path / "x"), check=False))
    assert "no config.json" in line


def test_import_deltanet_matches_fla(tmp_path, fla_interpreter):
    from fla.models import DeltaNetConfig, DeltaNetForCausalLM

    from lm.hf.import_fla import import_fla
    from lm.training.export import load_model

    cfg = DeltaNetConfig(
        hidden_size=64, num_hidden_layers=2, num_heads=2, vocab_size=96, intermediate_size=128, fuse_cross_entropy=False
    )
    fla_model = randomize(DeltaNetForCausalLM(cfg))
    fla_model.save_pretrained(str(tmp_path / "fla"))
    ours = load_model(str(import_fla(str(tmp_path / "fla"), str(tmp_path / "ours")))).model
    x = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = fla_model(x).logits.float()
        got, _ = ours(x)
    assert (got - want).abs().max().item() <= 1e-4


@pytest.mark.parametrize(
    "overrides", [{}, {"use_gate": False, "expand_v": 1.0, "fuse_norm": False}], ids=["gated", "nogate-plain"]
)
def test_import_gated_deltanet_matches_fla(tmp_path, fla_interpreter, overrides):
    from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM

    from lm.hf.import_fla import import_fla
    from lm.training.export import load_model

    cfg = GatedDeltaNetConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_heads=2,
        head_dim=16,
        vocab_size=96,
        intermediate_size=128,
        fuse_cross_entropy=False,
        **overrides,
    )
    fla_model = randomize(GatedDeltaNetForCausalLM(cfg))
    fla_model.save_pretrained(str(tmp_path / "fla"))
    loaded = load_model(str(import_fla(str(tmp_path / "fla"), str(tmp_path / "ours"))))
    assert loaded.config["model"]["variant"] == "gated_deltanet" and loaded.config["model"]["head_dim"] == 16
    x = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = fla_model(x).logits.float()
        got, _ = loaded.model(x)
    assert (got - want).abs().max().item() <= 1e-4


def test_import_gated_deltanet_refuses_missing_features(tmp_path):
    from lm.errors import LMError
    from lm.hf.import_fla import import_fla

    src = tmp_path / "fla"
    src.mkdir()
    base = {
        "model_type": "gated_deltanet",
        "hidden_size": 64,
        "num_hidden_layers": 1,
        "num_heads": 2,
        "head_dim": 16,
        "vocab_size": 96,
    }
    for extra, feature in [
        ({"num_v_heads": 4}, "grouped value heads"),
        ({"allow_neg_eigval": True}, "negative eigen"),
        ({"output_gate_activation": "sigmoid"}, "output gate activation"),
        ({"use_short_conv": False}, "without the short convolution"),
        ({"attn": {"layers": [0]}}, "hybrid softmax-attention"),
    ]:
        (src / "config.json").write_text(json.dumps({**base, **extra}))
        with pytest.raises(LMError, match=feature):
            import_fla(str(src), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
