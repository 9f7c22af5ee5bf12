"""Probes: closed-form implicit attention reconstructs every family's output to fp32 precision;
form equivalence is tight; the LSA fit is ~1 for an exact LSA layer and ~0 for noise; the callback
logs its scalars and writes a PNG, also under 2-rank DeepSpeed; `lm probe` writes a report."""

import csv
import json
from pathlib import Path

import pytest
import torch

from lm.models import all_variants, build_model
from lm.models.gated_rnn import GatedRNN, set_lsa_construction
from lm.models.lm import as_model_config
from lm.models.registry import resolve_options
from lm.probes.attention import attention_stats
from lm.probes.lsa_fit import lsa_r2
from lm.probes.runner import probe_batch, run_probes
from tests.helpers import experiment, run_lm

CLOSED_FORM = [(f, v) for f, v in all_variants() if f not in ("fwp", "lstm")]


@pytest.mark.parametrize("family,variant", CLOSED_FORM, ids=[f"{f}/{v}" for f, v in CLOSED_FORM])
def test_implicit_attention_reconstructs_output(family, variant):
    torch.manual_seed(0)
    model = build_model(dict(family=family, variant=variant, vocab_size=32, d_model=32, n_layers=1, n_heads=2))
    x = torch.randn(2, 37, 32)
    with torch.no_grad():
        ia = model.blocks[0].mixer.implicit_attention(x)
    assert ia is not None
    B, H, T, _ = ia.weights.shape
    assert T == 37 and torch.all(ia.weights.triu(1) == 0), "implicit attention must be causal"
    assert ia.reconstruction_error() < 1e-5


def test_fast_weight_programmers_report_no_closed_form():
    for variant in ("recurrent_delta", "srwm"):
        model = build_model(dict(family="fwp", variant=variant, vocab_size=32, d_model=32, n_layers=1, n_heads=2))
        assert model.blocks[0].mixer.implicit_attention(torch.randn(1, 5, 32)) is None


def test_attention_statistics_on_known_matrices():
    from lm.models.mixer import ImplicitAttention

    T = 8
    prev = torch.diag(torch.ones(T - 1), -1)
    prev[0, 0] = 1.0
    ia = ImplicitAttention(
        prev[None, None], torch.randn(1, T, 1, 2), torch.einsum("ts,sv->tv", prev, torch.zeros(T, 2))[None, :, None]
    )
    stats = attention_stats(ia, period=None)
    assert stats["prev_token"] == pytest.approx((T - 1) / (T - 1), rel=1e-6) or stats["prev_token"] > 0.85
    assert stats["entropy"] == pytest.approx(0.0, abs=1e-6)
    uniform = torch.ones(T, T).tril()
    stats = attention_stats(ImplicitAttention(uniform[None, None], torch.zeros(1, T, 1, 1), torch.zeros(1, T, 1, 1)))
    expected_entropy = torch.log(torch.arange(1, T + 1, dtype=torch.float64)).mean().item()
    assert stats["entropy"] == pytest.approx(expected_entropy, rel=1e-6)


def test_lsa_fit_is_one_for_lsa_and_zero_for_noise():
    torch.manual_seed(0)
    D = 4
    cfg = as_model_config(
        dict(family="gated_rnn", variant="static", d_model=D, n_heads=1, vocab_size=8, mixer={"state_dim": 16})
    )
    layer = GatedRNN(cfg, resolve_options("gated_rnn", "static", cfg.mixer), 0)
    set_lsa_construction(
        layer, torch.randn(1, 4, D) / 2, torch.randn(1, 4, D) / 2, torch.randn(1, 4, D) / 2, torch.randn(D, 4) / 2
    )
    x = torch.randn(8, 48, D)
    with torch.no_grad():
        y, _ = layer(x)
    assert lsa_r2(x, y, rank=4) > 0.999
    assert abs(lsa_r2(x, torch.randn_like(y), rank=4)) < 0.1


def test_run_probes_scalars_and_form_equivalence():
    cfg = dict(family="linear_attention", variant="gated_deltanet", vocab_size=40, d_model=32, n_layers=2, n_heads=2)
    model = build_model(cfg)
    batch = probe_batch({"model": cfg}, 8, 32)
    assert torch.equal(batch["inputs"][:, :16], batch["inputs"][:, 16:])
    result = run_probes(model, batch["inputs"], period=batch["period"])
    for layer in (0, 1):
        for key in (
            "form_out_rel",
            "form_state_rel",
            "attn_recon_error",
            "attn_entropy",
            "attn_distance",
            "attn_prev_token",
            "attn_induction",
            "lsa_r2",
        ):
            assert f"probe/{key}/layer{layer}" in result.scalars
        assert result.scalars[f"probe/form_out_rel/layer{layer}"] < 1e-4
    assert set(result.maps) == {0, 1} and result.maps[0].shape == (32, 32)


def _probe_columns(run: Path):
    rows = list(csv.DictReader(open(run / "logs" / "metrics.csv")))
    return {k for r in rows for k, v in r.items() if k.startswith("probe/") and v}


def test_callback_logs_scalars_and_writes_png(tmp_path, tiny_data):
    path = experiment(
        tmp_path,
        tiny_data,
        train={"max_steps": 10, "val_every_n_steps": 0},
        probes={"every_n_steps": 5, "batch_size": 4, "seq_len": 16},
    )
    run_lm("train", str(path))
    run = tmp_path / "exp"
    assert sorted(p.name for p in (run / "probes").glob("*.png")) == ["step-00000005.png", "step-00000010.png"]
    columns = _probe_columns(run)
    for key in ("form_out_rel", "attn_entropy", "attn_induction", "lsa_r2"):
        assert f"probe/{key}/layer0" in columns and f"probe/{key}/layer1" in columns, columns
    rows = list(csv.DictReader(open(run / "logs" / "metrics.csv")))
    probed = sorted(int(r["step"]) for r in rows if r.get("probe/lsa_r2/mean"))
    assert probed == [5, 10], probed  # logged once per probe run, at its step, not carried forward
    # and offline
    out = tmp_path / "report"
    proc = run_lm("probe", str(run), "--out", str(out), "--batch-size", "4", "--seq-len", "16")
    assert "LSA R²" in proc.stdout
    assert (out / "probes.png").stat().st_size > 1000
    payload = json.loads((out / "probes.json").read_text())
    assert payload["step"] == 10 and len(payload["per_layer"]) == 2


@pytest.mark.distributed
@pytest.mark.slow
def test_callback_under_two_rank_deepspeed_zero3(tmp_path, tiny_data):
    path = experiment(
        tmp_path,
        tiny_data,
        train={"max_steps": 6, "val_every_n_steps": 0},
        probes={"every_n_steps": 3, "batch_size": 4, "seq_len": 16},
    )
    run_lm(
        "train",
        str(path),
        "train.devices=2",
        "train.accelerator=cpu",
        "train.strategy=deepspeed",
        "train.zero_stage=3",
        timeout=900,
    )
    run = tmp_path / "exp"
    assert (run / "probes" / "step-00000006.png").is_file()
    assert "probe/lsa_r2/layer1" in _probe_columns(run)
