"""The seed-000 and seed-001 studies (issue #21): the mechanism measures score the construction as the
construction, the GD baseline's rate is fitted on held-out sequences, the mean-field reference is
E[y_t | x_t], and ``lm repro formal-table`` / ``mechanism`` write their tables end to end."""

import json

import pytest
import torch

from lm.models.gated_rnn import GatedRNN, linear_self_attention, set_lsa_construction_state_gated, state_gated_neurons
from lm.models.lm import as_model_config
from lm.models.registry import resolve_options
from lm.probes.repro_gated import (
    decays,
    fit_gd_rate,
    gate_pairing,
    gd_predictions,
    icl_batch,
    icl_gd_study,
    mean_field,
    r2,
    teacher_student_study,
)
from tests.helpers import run_lm


def _constructed(D=4, dk=4, dv=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    W = (
        torch.randn(1, dk, D, generator=gen),
        torch.randn(1, dk, D, generator=gen),
        torch.randn(1, dv, D, generator=gen),
        torch.randn(D, dv, generator=gen),
    )
    N, M = state_gated_neurons(1, dk, dv)
    cfg = as_model_config(dict(family="gated_rnn", variant="state_gated", d_model=D, n_heads=1, vocab_size=8))
    layer = GatedRNN(cfg, resolve_options("gated_rnn", "state_gated", {"state_dim": N, "gate_dim": M}), 0)
    set_lsa_construction_state_gated(layer, *W)
    return layer, W


def test_the_construction_scores_as_the_construction():
    layer, _ = _constructed()
    lam = decays(layer)
    assert int((lam == 1).sum()) == 16 and int((lam == 0).sum()) == 4
    assert gate_pairing(layer) == pytest.approx(1.0)
    with torch.no_grad():  # a layer whose gates read the same neurons on both sides pairs nothing
        layer.w_q.weight.copy_(layer.w_m.weight)
    assert gate_pairing(layer) == pytest.approx(0.0)


def test_mean_field_is_the_conditional_mean():
    _, W = _constructed(seed=1)
    gen = torch.Generator().manual_seed(2)
    T, n = 5, 40000
    x_last = torch.randn(1, 1, 4, generator=gen)
    x = torch.cat([torch.randn(n, T - 1, 4, generator=gen), x_last.expand(n, 1, 4)], 1)
    y = linear_self_attention(x, *W)[:, -1].mean(0)
    want = mean_field(x[:1], *W)[0, -1]
    assert torch.allclose(y, want, rtol=0.05, atol=0.05 * want.abs().max().item())


def test_gd_baseline_and_r2():
    gen = torch.Generator().manual_seed(0)
    inputs, target = icl_batch(512, 5, 8, gen)
    x, y, xq = inputs[:, :-1, :5], inputs[:, :-1, 5], inputs[:, -1, :5]
    assert torch.allclose(gd_predictions(inputs, 5), ((y[..., None] * x).sum(1) * xq).sum(-1), atol=1e-4)
    assert torch.all(inputs[:, -1, 5] == 0)
    eta = fit_gd_rate(inputs, target, 5)
    other = icl_batch(512, 5, 8, torch.Generator().manual_seed(1))
    assert eta != fit_gd_rate(*other, 5)  # a fit on other sequences is another number
    assert 0 < eta < 1
    assert r2(target, target) == 1.0 and r2(torch.zeros_like(target) + target.mean(), target) == pytest.approx(
        0.0, abs=1e-9
    )


def test_studies_write_their_outputs(tmp_path):
    res = teacher_student_study(str(tmp_path), neuron_counts=(4, 6), steps=3, batch=4)
    assert [r["neurons"] for r in res["rows"]] == [4, 6] and res["construction_neurons"] == 20
    assert (tmp_path / "mechanism.png").stat().st_size > 0 and "| 6 |" in (tmp_path / "mechanism.md").read_text()
    res = icl_gd_study(str(tmp_path), steps=2, batch=8, n_test=64, n_fit=64, d_model=8)
    assert len(res["rows"]) == 5 and res["rows"][0]["r2_vs_gd"] == 1.0
    assert (tmp_path / "icl_gd.png").exists() and "R² vs 1-step GD" in (tmp_path / "icl_gd.md").read_text()


def test_formal_table_command(tmp_path):
    out = tmp_path / "t"
    proc = run_lm(
        "repro",
        "formal-table",
        "--models",
        "lstm/lstm,linear_attention/deltanet_sumnorm",
        "--languages",
        "dyck1,shuffle2",
        "--seeds",
        "1",
        "--steps",
        "3",
        "--examples",
        "8",
        "--d-model",
        "8",
        "--out",
        str(out),
    )
    cells = json.loads((out / "formal_table.json").read_text())["cells"]
    assert {(c["variant"], c["language"]) for c in cells} == {
        (v, lang) for v in ("lstm", "deltanet_sumnorm") for lang in ("dyck1", "shuffle2")
    }
    assert all(len(c["seq_acc"]) == 2 and all(0 <= a <= 1 for a in c["seq_acc"]) for c in cells)
    table = (out / "formal_table.md").read_text()
    assert "Shuffle-2 bin 1 (42-80)" in table and "LSTM" in table and table in proc.stdout
    assert (out / "formal_table.png").stat().st_size > 0
    # a second call with the same setting reuses the cells it has and trains only the new ones
    from lm.probes.repro_formal import formal_table

    logs = []
    res = formal_table(
        str(out),
        models=["lstm/lstm"],
        languages=["dyck1", "parity"],
        seeds=(0,),
        steps=3,
        n_test=8,
        log=logs.append,
        d_model=8,
    )
    assert any("from the previous formal_table.json" in line for line in logs if "dyck1" in line)
    assert not any("from the previous" in line for line in logs if "parity" in line)
    assert [c["seq_acc"] for c in res["cells"] if c["language"] == "dyck1"] == [
        c["seq_acc"] for c in cells if c["variant"] == "lstm" and c["language"] == "dyck1"
    ]
    # the file keeps every cell of the setting, not only those of the last call's models and languages
    kept = json.loads((out / "formal_table.json").read_text())["cells"]
    assert {(c["variant"], c["language"]) for c in kept} == {
        (v, lang) for v in ("lstm", "deltanet_sumnorm") for lang in ("dyck1", "shuffle2")
    } | {("lstm", "parity")}
    # render only: the cells there are, "-" for the rest, nothing trained
    logs = []
    res = formal_table(
        str(out),
        models=["lstm/lstm", "transformer/transformer"],
        languages=["dyck1"],
        seeds=(0,),
        steps=3,
        n_test=8,
        log=logs.append,
        d_model=8,
        render_only=True,
    )
    assert [c["variant"] for c in res["cells"]] == ["lstm"] and all("from the previous" in line for line in logs)
    assert "| Transformer (softmax, RoPE) | - | - |" in (out / "formal_table.md").read_text()
    bad = run_lm("repro", "formal-table", "--models", "gru/gru", "--out", str(out), check=False)
    assert bad.returncode == 2 and "--models: unknown model 'gru/gru'" in bad.stderr


def test_state_gated_construction_report(tmp_path):
    from lm.probes.repro_gated import construction_state_gated

    rows = construction_state_gated(str(tmp_path), settings=((1, 4, 4), (2, 3, 5)), seq_len=16)
    assert [r["neurons"] for r in rows] == [20, 36] and [r["x_gated_neurons"] for r in rows] == [16, 30]
    assert all(r["error"] <= 1e-5 and r["error_stepped"] <= 1e-5 for r in rows)
    assert "| 2 | 3 | 5 | 36 | 30 | 30 |" in (tmp_path / "construction_state_gated.md").read_text()
