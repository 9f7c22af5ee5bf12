"""Seed 000 (Zucchet et al., 2023) on the paper's own layer, ``gated_rnn/state_gated`` (issue #21).

(b') :func:`teacher_student_study`: students of several widths N trained on a random linear
     self-attention teacher; the final loss against N, the learned decays (the construction puts
     key-value neurons at lambda = 1 and query neurons at lambda = 0) and how the output gate pairs
     them (:func:`gate_pairing`), with one figure.
(c') :func:`icl_gd_study`: in-context linear regression; each model's predictions compared with one
     step of gradient descent whose learning rate is fitted on *held-out* sequences
     (:func:`fit_gd_rate`), as a prediction-level R^2, for the paper's layer, the ``x_gated`` layer,
     the ungated RNN and linear self-attention.

Both train in-process (plain Adam, fresh data every step, no Lightning) so that the whole study runs
in minutes on a CPU; ``lm repro mechanism`` and ``lm repro icl-gd`` write the tables and figures.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from lm.evaluation.common import write_atomic, write_json
from lm.models.gated_rnn import GatedRNN, linear_self_attention
from lm.models.lm import as_model_config
from lm.models.registry import resolve_options
from lm.plotting import pyplot, save_figure

#: neurons whose decay is above / below these count as memory (key-value) / query neurons
MEMORY_LAMBDA, QUERY_LAMBDA = 0.9, 0.1


def _cosine_lr(step: int, steps: int, lr: float, warmup: int = 50) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))))


def _train(module, batch_fn, loss_fn, steps: int, lr: float) -> List[float]:
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = _cosine_lr(step, steps, lr)
        loss = loss_fn(*batch_fn())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
    return losses


# ------------------------------------------------------------------------------ construction


def construction_state_gated(
    out_dir: str,
    settings: Sequence[tuple] = ((1, 4, 4), (2, 3, 5), (4, 8, 8)),
    d_model: int = 16,
    seq_len: int = 64,
    batch: int = 4,
    seed: int = 0,
) -> List[Dict]:
    """(a') For each (heads, dk, dv): max relative error between the ``state_gated`` layer set by
    :func:`~lm.models.gated_rnn.set_lsa_construction_state_gated` and the LSA layer (whole sequence
    and stepped, fp32); writes ``construction_state_gated.md/.json``."""
    from lm.models.gated_rnn import set_lsa_construction_state_gated, state_gated_neurons
    from lm.probes.form import stepped_outputs

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for heads, dk, dv in settings:
        N, M = state_gated_neurons(heads, dk, dv)
        cfg = as_model_config(dict(family="gated_rnn", variant="state_gated", d_model=d_model, n_heads=1, vocab_size=8))
        layer = GatedRNN(cfg, resolve_options("gated_rnn", "state_gated", {"state_dim": N, "gate_dim": M}), 0)
        s = d_model**-0.5
        W = (
            torch.randn(heads, dk, d_model, generator=gen) * s,
            torch.randn(heads, dk, d_model, generator=gen) * s,
            torch.randn(heads, dv, d_model, generator=gen) * s,
            torch.randn(d_model, heads * dv, generator=gen) * (heads * dv) ** -0.5,
        )
        set_lsa_construction_state_gated(layer, *W)
        x = torch.randn(batch, seq_len, d_model, generator=gen)
        with torch.no_grad():
            y, _ = layer(x)
            stepped, _ = stepped_outputs(layer, x)
        expected = linear_self_attention(x, *W)
        denom = expected.abs().max()
        rows.append(
            {
                "heads": heads,
                "dk": dk,
                "dv": dv,
                "neurons": N,
                "gate_width": M,
                "x_gated_neurons": heads * dk * dv,
                "error": float((y - expected).abs().max() / denom),
                "error_stepped": float((stepped - expected).abs().max() / denom),
            }
        )
    table = [
        "| heads | d_k | d_v | neurons H(d_k d_v + d_k) | output gate width | x_gated neurons | max rel. error | stepped |",
        "|---|---|---|---|---|---|---|---|",
    ]
    table += [
        f"| {r['heads']} | {r['dk']} | {r['dv']} | {r['neurons']} | {r['gate_width']} | {r['x_gated_neurons']} "
        f"| {r['error']:.1e} | {r['error_stepped']:.1e} |"
        for r in rows
    ]
    write_atomic(out / "construction_state_gated.md", "\n".join(table) + "\n")
    write_json(out / "construction_state_gated.json", rows)
    return rows


# ------------------------------------------------------------------------------ teacher-student


def decays(layer: GatedRNN) -> torch.Tensor:
    """The learned lambda per recurrent neuron [N] (static recurrence)."""
    return torch.exp(-torch.exp(layer.nu.detach()))


def gate_pairing(layer: GatedRNN) -> float:
    """How far the output gate pairs memory neurons with query neurons, as the construction does.

    Output gate unit m multiplies ``a_m = W_m[m] . h`` and ``b_m = W_q[m] . h``. With
    ``p(w) = ||w_memory||^2 / ||w||^2`` (the share of a readout on neurons of lambda > 0.9) and
    ``r(w)`` the share on neurons of lambda < 0.1, unit m scores
    ``max(p(W_m[m]) r(W_q[m]), r(W_m[m]) p(W_q[m]))``: 1 when one factor reads only memory neurons and
    the other only query neurons (the construction), 0 when, e.g., both read memory neurons. The
    mean over units is weighted by ``||W_o[:, m]|| ||W_m[m]|| ||W_q[m]||`` (the unit's weight in y).
    """
    lam = decays(layer)
    mem, qry = (lam > MEMORY_LAMBDA).float(), (lam < QUERY_LAMBDA).float()
    Wm, Wq, Wo = layer.w_m.weight.detach(), layer.w_q.weight.detach(), layer.w_o.weight.detach()

    def share(W, mask):
        return (W.pow(2) * mask).sum(1) / W.pow(2).sum(1).clamp_min(1e-30)

    score = torch.maximum(share(Wm, mem) * share(Wq, qry), share(Wm, qry) * share(Wq, mem))
    weight = Wo.norm(dim=0) * Wm.norm(dim=1) * Wq.norm(dim=1)
    return float((score * weight).sum() / weight.sum().clamp_min(1e-30))


def _teacher(dim: int, key_dim: int, gen: torch.Generator):
    s = dim**-0.5
    W_Q = torch.randn(1, key_dim, dim, generator=gen) * s
    W_K = torch.randn(1, key_dim, dim, generator=gen) * s
    W_V = torch.randn(1, key_dim, dim, generator=gen) * s
    W_O = torch.randn(dim, key_dim, generator=gen) * key_dim**-0.5
    return W_Q, W_K, W_V, W_O


def mean_field(x: torch.Tensor, W_Q, W_K, W_V, W_O) -> torch.Tensor:
    """E[y_t | x_t] of a one-head LSA teacher on x ~ N(0, I): the past's outer products replaced by
    their mean, ``W_O W_V ((t - 1) I + x_t x_t^T) W_K^T W_Q x_t`` (t counted from 1). x: [B, T, D].

    It needs no memory of the past beyond a step counter, so the loss is reported relative to the
    loss of this predictor: 1 = only the mean field learned, 0 = the teacher."""
    A, Bm = W_O @ W_V[0], W_K[0].t() @ W_Q[0]
    t = torch.arange(x.shape[1], dtype=x.dtype, device=x.device)[None, :, None]
    bx = x @ Bm.t()
    return (t * bx + x * (x * bx).sum(-1, keepdim=True)) @ A.t()


def teacher_student_study(
    out_dir: str,
    neuron_counts: Sequence[int] = (4, 6, 8, 10, 12, 14, 16, 20, 28),
    dim: int = 4,
    length: int = 16,
    steps: int = 4000,
    batch: int = 64,
    lr: float = 1e-2,
    seed: int = 0,
    gate_dim: int = 32,
) -> Dict:
    """Train a ``state_gated`` student per N in ``neuron_counts`` on one LSA teacher (1 head, key and
    value size ``dim``); returns and writes (``mechanism.json/.md/.png``) final losses (relative to
    the :func:`mean_field` predictor's), decays and gate pairing."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    W = _teacher(dim, dim, gen)
    x_test = torch.randn(1024, length, dim, generator=gen)
    y_test = linear_self_attention(x_test, *W)
    power = float((mean_field(x_test, *W) - y_test).pow(2).mean())
    rows, runs = [], {}
    for N in neuron_counts:
        torch.manual_seed(seed + N)
        cfg = as_model_config(
            dict(family="gated_rnn", variant="state_gated", d_model=dim, n_heads=1, vocab_size=8, mixer={})
        )
        opts = resolve_options("gated_rnn", "state_gated", {"state_dim": N, "gate_dim": gate_dim})
        layer = GatedRNN(cfg, opts, 0)
        for lin in (layer.w_v, layer.w_g, layer.w_m, layer.w_q, layer.w_o):
            torch.nn.init.normal_(lin.weight, std=lin.in_features**-0.5)
        data_gen = torch.Generator().manual_seed(seed * 1000 + N)

        def batch_fn():
            x = torch.randn(batch, length, dim, generator=data_gen)
            return x, linear_self_attention(x, *W)

        t0 = time.time()
        curve = _train(layer, batch_fn, lambda x, y: (layer(x)[0] - y).pow(2).mean() / power, steps, lr)
        with torch.no_grad():
            test = float((layer(x_test)[0] - y_test).pow(2).mean()) / power
        lam = decays(layer)
        rows.append(
            {
                "neurons": N,
                "relative_test_loss": test,
                "memory_neurons": int((lam > MEMORY_LAMBDA).sum()),
                "query_neurons": int((lam < QUERY_LAMBDA).sum()),
                "gate_pairing": gate_pairing(layer),
                "seconds": time.time() - t0,
            }
        )
        runs[N] = {"lambda": lam.tolist(), "curve": curve[:: max(1, steps // 200)]}
    result = {
        "setting": dict(
            dim=dim, key_dim=dim, length=length, steps=steps, batch=batch, lr=lr, seed=seed, gate_dim=gate_dim
        ),
        "mean_field_over_power": power / float(y_test.pow(2).mean()),
        "construction_neurons": dim * dim + dim,
        "symmetric_neurons": dim * (dim + 1) // 2 + dim,
        "rows": rows,
        "runs": {str(k): v for k, v in runs.items()},
    }
    write_json(out / "mechanism.json", result)
    table = [
        "| neurons N | test loss / mean-field loss | memory neurons (λ > 0.9) | query neurons (λ < 0.1) | gate pairing |",
        "|---|---|---|---|---|",
    ]
    table += [
        f"| {r['neurons']} | {r['relative_test_loss']:.1e} | {r['memory_neurons']} | {r['query_neurons']} "
        f"| {r['gate_pairing']:.2f} |"
        for r in rows
    ]
    write_atomic(out / "mechanism.md", "\n".join(table) + "\n")
    _mechanism_figure(result, out / "mechanism.png")
    return result


def _mechanism_figure(result: Dict, path: Path) -> None:
    plt = pyplot()
    rows = result["rows"]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    ax = axes[0]
    ax.semilogy([r["neurons"] for r in rows], [r["relative_test_loss"] for r in rows], "o-")
    ax.axvline(result["symmetric_neurons"], ls="--", color="tab:green", lw=0.8, label="d(d+1)/2 + d")
    ax.axvline(result["construction_neurons"], ls=":", color="tab:red", lw=0.8, label="construction d² + d")
    ax.set_xlabel("recurrent neurons N")
    ax.set_ylabel("test loss / mean-field predictor's loss")
    ax.legend(fontsize=7)
    ax.set_title("loss vs neurons", fontsize=9)
    ax = axes[1]
    big = max(rows, key=lambda r: r["neurons"])["neurons"]
    for N, color in ((result["construction_neurons"], "tab:red"), (big, "tab:blue")):
        lam = result["runs"].get(str(N), {}).get("lambda")
        if lam is not None:
            ax.hist(lam, bins=np.linspace(0, 1, 41), alpha=0.6, color=color, label=f"N = {N}")
    ax.set_xlabel("learned decay λ")
    ax.set_ylabel("neurons")
    ax.legend(fontsize=7)
    ax.set_title("learned decays (initialised uniform in [0.05, 0.95])", fontsize=9)
    ax = axes[2]
    ax.plot([r["neurons"] for r in rows], [r["gate_pairing"] for r in rows], "o-", label="gate pairing")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("recurrent neurons N")
    ax.set_ylabel("memory x query pairing of the output gate")
    ax.set_title("readout vs construction (construction = 1)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


# ---------------------------------------------------------------------- ICL regression vs GD


def icl_batch(n: int, dx: int, n_pairs: int, gen: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``icl_regression`` task's distribution, batched: inputs [n, n_pairs + 1, dx + 1] (the
    query's y zeroed) and the query's target [n]; W ~ N(0, I), x ~ N(0, I), y = W x, no noise."""
    W = torch.randn(n, dx, generator=gen)
    x = torch.randn(n, n_pairs + 1, dx, generator=gen)
    y = torch.einsum("nd,ntd->nt", W, x)
    inputs = torch.cat([x, y[..., None]], -1)
    inputs[:, -1, dx] = 0.0
    return inputs, y[:, -1]


def gd_predictions(inputs: torch.Tensor, dx: int) -> torch.Tensor:
    """One GD step from W = 0 with rate 1 on the context pairs, applied to the query: [n]."""
    x, y, xq = inputs[:, :-1, :dx], inputs[:, :-1, dx], inputs[:, -1, :dx]
    return torch.einsum("nt,ntd,nd->n", y, x, xq)


def fit_gd_rate(inputs: torch.Tensor, targets: torch.Tensor, dx: int) -> float:
    """The least-squares learning rate of one GD step (predictions are linear in it)."""
    p = gd_predictions(inputs, dx).double()
    return float((p * targets.double()).sum() / (p * p).sum())


def r2(pred: torch.Tensor, ref: torch.Tensor) -> float:
    """1 - sum (pred - ref)^2 / sum (ref - mean ref)^2 (prediction-level agreement with ``ref``)."""
    pred, ref = pred.double(), ref.double()
    return float(1 - (pred - ref).pow(2).sum() / (ref - ref.mean()).pow(2).sum())


ICL_MODELS = {
    "linear self-attention": dict(family="linear_attention", variant="lsa", n_heads=1),
    "gated RNN, paper (state_gated)": dict(
        family="gated_rnn", variant="state_gated", n_heads=1, mixer={"state_dim": 128}
    ),
    "gated RNN, x_gated": dict(family="gated_rnn", variant="x_gated", n_heads=1, mixer={"state_dim": 128}),
    "linear RNN (ungated)": dict(family="gated_rnn", variant="ungated", n_heads=1, mixer={"state_dim": 128}),
}


def icl_gd_study(
    out_dir: str,
    models: Optional[Dict[str, Dict]] = None,
    dx: int = 10,
    n_pairs: int = 10,
    steps: int = 4000,
    batch: int = 256,
    lr: float = 3e-3,
    d_model: int = 32,
    n_test: int = 4096,
    n_fit: int = 4096,
    seed: int = 1,
) -> Dict:
    """Train each model on in-context regression, then on ``n_test`` test sequences report its loss,
    one GD step's loss (rate fitted on ``n_fit`` other sequences) and the R^2 of the model's
    predictions against GD's; writes ``icl_gd.json/.md/.png``."""
    from lm.models import build_model

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    models = models or ICL_MODELS
    fit_in, fit_t = icl_batch(n_fit, dx, n_pairs, torch.Generator().manual_seed(seed + 101))
    test_in, test_t = icl_batch(n_test, dx, n_pairs, torch.Generator().manual_seed(seed + 202))
    eta = fit_gd_rate(fit_in, fit_t, dx)
    gd = eta * gd_predictions(test_in, dx)
    rows = [
        {
            "model": "one step of GD (rate fitted on held-out sequences)",
            "test_loss": float((gd - test_t).pow(2).mean()),
            "r2_vs_gd": 1.0,
            "r2_vs_target": r2(gd, test_t),
            "lr": eta,
        }
    ]
    for name, spec in models.items():
        torch.manual_seed(seed)
        model = build_model(
            dict(
                d_model=d_model,
                n_layers=1,
                mlp="none",
                norm="none",
                tie_embeddings=False,
                input_dim=dx + 1,
                output_dim=1,
                vocab_size=0,
                **spec,
            )
        )
        data_gen = torch.Generator().manual_seed(seed + 7)

        def batch_fn():
            return icl_batch(batch, dx, n_pairs, data_gen)

        def loss_fn(inputs, target):
            return (model(inputs)[0][:, -1, 0] - target).pow(2).mean()

        t0 = time.time()
        _train(model, batch_fn, loss_fn, steps, lr)
        with torch.no_grad():
            pred = model(test_in)[0][:, -1, 0]
        rows.append(
            {
                "model": name,
                "test_loss": float((pred - test_t).pow(2).mean()),
                "r2_vs_gd": r2(pred, gd),
                "r2_vs_target": r2(pred, test_t),
                "parameters": sum(p.numel() for p in model.parameters()),
                "seconds": time.time() - t0,
            }
        )
    result = {
        "setting": dict(
            dx=dx,
            n_pairs=n_pairs,
            steps=steps,
            batch=batch,
            lr=lr,
            d_model=d_model,
            n_test=n_test,
            n_fit=n_fit,
            seed=seed,
        ),
        "gd_rate": eta,
        "rows": rows,
    }
    write_json(out / "icl_gd.json", result)
    table = ["| model | test loss | R² vs 1-step GD predictions | R² vs targets |", "|---|---|---|---|"]
    table += [f"| {r['model']} | {r['test_loss']:.3f} | {r['r2_vs_gd']:.3f} | {r['r2_vs_target']:.3f} |" for r in rows]
    table.append(f"| predict 0 | {float(test_t.pow(2).mean()):.3f} | - | 0 |")
    write_atomic(out / "icl_gd.md", "\n".join(table) + "\n")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.4))
    names = [r["model"] for r in rows[1:]]
    ax.bar(range(len(names)), [r["r2_vs_gd"] for r in rows[1:]], color="tab:blue")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=15, fontsize=7)
    ax.set_ylabel("R² of predictions vs 1-step GD")
    ax.set_ylim(min(0.0, min(r["r2_vs_gd"] for r in rows[1:])), 1.02)
    ax.set_title(f"in-context regression: agreement with one GD step (rate {eta:.3f}, held-out fit)", fontsize=8)
    fig.tight_layout()
    save_figure(fig, out / "icl_gd.png")
    plt.close(fig)
    return result
