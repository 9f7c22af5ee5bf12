"""Reproductions of "Gated recurrent neural networks discover attention" (Zucchet et al., 2023).

(a) :func:`construction`: gated RNNs set by the explicit construction equal random linear
    self-attention layers; the error per setting, and a plot of RNN output against LSA output.
(c) :func:`icl_regression`: test losses of trained models on in-context linear regression next to
    one step of gradient descent with the best learning rate, and the LSA-fit R^2 of each trained
    token mixer. (b) is ``lm train repro-lsa-teacher`` followed by ``lm probe``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence

import torch

from lm.evaluation.common import write_atomic, write_json
from lm.models.gated_rnn import GatedRNN, linear_self_attention, set_lsa_construction
from lm.models.lm import as_model_config
from lm.models.registry import model_name, resolve_options
from lm.plotting import pyplot, save_figure
from lm.probes.form import stepped_outputs


def _save(fig, path: Path) -> None:
    save_figure(fig, path)
    pyplot().close(fig)


def construction(
    out_dir: str,
    settings: Sequence[tuple] = ((1, 4, 4), (2, 3, 5), (4, 8, 8)),
    d_model: int = 16,
    seq_len: int = 64,
    batch: int = 4,
    seed: int = 0,
) -> List[Dict]:
    """For each (heads, dk, dv): max relative error between the constructed RNN and the LSA layer,
    in the whole-sequence and the stepped form (fp32)."""
    plt = pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    rows, last = [], None
    for heads, dk, dv in settings:
        cfg = as_model_config(
            dict(
                family="gated_rnn",
                variant="static",
                d_model=d_model,
                n_heads=1,
                vocab_size=8,
                mixer={"state_dim": heads * dk * dv},
            )
        )
        layer = GatedRNN(cfg, resolve_options("gated_rnn", "static", cfg.mixer), 0)
        scale = d_model**-0.5
        W_Q = torch.randn(heads, dk, d_model, generator=gen) * scale
        W_K = torch.randn(heads, dk, d_model, generator=gen) * scale
        W_V = torch.randn(heads, dv, d_model, generator=gen) * scale
        W_O = torch.randn(d_model, heads * dv, generator=gen) * (heads * dv) ** -0.5
        set_lsa_construction(layer, W_Q, W_K, W_V, W_O)
        x = torch.randn(batch, seq_len, d_model, generator=gen)
        with torch.no_grad():
            y, _ = layer(x)
            stepped, _ = stepped_outputs(layer, x)
            expected = linear_self_attention(x, W_Q, W_K, W_V, W_O)
        denom = expected.abs().max()
        rows.append(
            {
                "heads": heads,
                "dk": dk,
                "dv": dv,
                "units": heads * dk * dv,
                "error": float((y - expected).abs().max() / denom),
                "error_stepped": float((stepped - expected).abs().max() / denom),
            }
        )
        last = (expected.flatten(), y.flatten())
    fig, ax = plt.subplots(figsize=(4.2, 4))
    ax.scatter(last[0].numpy(), last[1].numpy(), s=2, alpha=0.4)
    ax.set_xlabel("linear self-attention output")
    ax.set_ylabel("constructed gated RNN output")
    ax.set_title(f"construction, H={settings[-1][0]}, dk={settings[-1][1]}, dv={settings[-1][2]}", fontsize=9)
    fig.tight_layout()
    _save(fig, out / "construction.png")
    table = ["| heads | d_k | d_v | RNN units | max rel. error | stepped |", "|---|---|---|---|---|---|"]
    table += [
        f"| {r['heads']} | {r['dk']} | {r['dv']} | {r['units']} | {r['error']:.1e} | {r['error_stepped']:.1e} |"
        for r in rows
    ]
    write_atomic(out / "construction.md", "\n".join(table) + "\n")
    write_json(out / "construction.json", rows)
    return rows


def icl_regression(run_dirs: Sequence[str], out_dir: str, n_examples: int = 4096, seed: int = 1234) -> List[Dict]:
    """Test loss per trained run, the one-step-GD baseline, and each run's LSA-fit R^2."""
    plt = pyplot()
    from data.tasks import one_step_gd_loss, task_from_config
    from lm.evaluation.icl import make_examples, score_examples
    from lm.probes.runner import probe_batch, run_probes
    from lm.training.export import load_model

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    task = None
    for run in run_dirs:
        loaded = load_model(run)
        cfg = loaded.config
        task = task_from_config(cfg["data"])
        examples = make_examples(task, seed, n_examples, None, None)
        loss = score_examples(loaded.model, examples, "vectors", batch_size=256)["loss"]
        # inputs span dx + dy dims: a projection of that rank is lossless; enough sequences for its features
        rank = task.spec.input_dim
        batch = probe_batch(cfg, 512, 0, seed)
        probes = run_probes(loaded.model, batch["inputs"], ("lsa_fit",), None, lsa_rank=rank)
        model = cfg["model"]
        name = model_name(model)
        rows.append(
            {
                "run": str(run),
                "model": name,
                "step": loaded.step,
                "test_loss": loss,
                "lsa_r2": probes.scalars.get("probe/lsa_r2/mean"),
            }
        )
    gd_loss, eta = one_step_gd_loss(task, n_examples=n_examples, seed=seed)
    zero_loss = float(task.options.dx * task.options.dy)  # predicting 0: E||W x||^2
    table = ["| model | step | test loss | LSA-fit R² |", "|---|---|---|---|"]
    table += [
        f"| {r['model']} | {r['step']} | {r['test_loss']:.4f} | "
        + (f"{r['lsa_r2']:.3f}" if r["lsa_r2"] is not None else "n/a")
        + " |"
        for r in rows
    ]
    table += [
        f"| one step of GD (best lr {eta:.4f}) | - | {gd_loss:.4f} | - |",
        f"| predict 0 | - | {zero_loss:.4f} | - |",
    ]
    write_atomic(out / "icl_regression.md", "\n".join(table) + "\n")
    write_json(
        out / "icl_regression.json", {"runs": rows, "one_step_gd": {"loss": gd_loss, "lr": eta}, "zero": zero_loss}
    )
    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = [r["model"] for r in rows] + ["1-step GD"]
    values = [r["test_loss"] for r in rows] + [gd_loss]
    ax.bar(range(len(names)), values, color=["tab:blue"] * len(rows) + ["tab:gray"])
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=20, fontsize=8)
    ax.axhline(zero_loss, ls="--", lw=0.8, color="k", label="predict 0")
    ax.legend(fontsize=8, loc="upper left")
    ax.set_ylabel("test loss (squared error)")
    ax.set_title("in-context linear regression", fontsize=10)
    fig.tight_layout()
    _save(fig, out / "icl_regression.png")
    return rows
