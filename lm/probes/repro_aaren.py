"""Seed 002 ("Attention as an RNN", Feng et al., 2024): Aaren against a Transformer on an offline,
synthetic time-series forecasting task (issue #21).

Task (:func:`forecast_batch`): every sequence is its own sum of three sines with random amplitude
a ~ U(0.5, 1.5), angular frequency w ~ U(0.05, 0.6) and phase, plus N(0, sigma^2) noise; the
model reads x_1..x_t (one scalar per step) and predicts x_{t+1} at every step (squared error). The
same skeleton (2 layers, SwiGLU, RMS norm, d_model 32, 2 heads, linear input and output) is trained
with each token mixer, in-process (AdamW, fresh sequences every step); test MSE is reported overall
and on the last quarter of the window, next to predicting the last value (persistence) and the
noise floor sigma^2. ``lm repro aaren-forecast`` writes ``aaren_forecast.md/.json/.png``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Dict, Sequence, Tuple

import torch

from lm.evaluation.common import write_atomic, write_json
from lm.plotting import pyplot, save_figure

MODELS = {"Aaren": ("aaren", "aaren"), "Transformer (softmax, RoPE)": ("transformer", "transformer")}


def forecast_batch(n: int, length: int, gen: torch.Generator, noise: float = 0.1) -> Tuple[torch.Tensor, torch.Tensor]:
    """inputs [n, length, 1] (x_1..x_T) and targets [n, length, 1] (x_2..x_{T+1})."""
    t = torch.arange(length + 1, dtype=torch.float32)
    amp = 0.5 + torch.rand(n, 3, 1, generator=gen)
    freq = 0.05 + 0.55 * torch.rand(n, 3, 1, generator=gen)
    phase = 2 * math.pi * torch.rand(n, 3, 1, generator=gen)
    x = (amp * torch.sin(freq * t + phase)).sum(1) + noise * torch.randn(n, length + 1, generator=gen)
    return x[:, :-1, None], x[:, 1:, None]


def aaren_forecast_study(
    out_dir: str,
    models: Dict[str, Tuple[str, str]] = MODELS,
    seeds: Sequence[int] = (0, 1, 2),
    length: int = 128,
    steps: int = 1500,
    batch: int = 32,
    lr: float = 3e-3,
    d_model: int = 32,
    n_test: int = 512,
    noise: float = 0.1,
) -> Dict:
    from lm.models import build_model

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    test_x, test_y = forecast_batch(n_test, length, torch.Generator().manual_seed(999), noise)
    tail = slice(3 * length // 4, length)
    rows = []
    curves: Dict[str, list] = {}
    for name, (family, variant) in models.items():
        for seed in seeds:
            torch.manual_seed(seed)
            model = build_model(
                dict(
                    family=family,
                    variant=variant,
                    d_model=d_model,
                    n_layers=2,
                    n_heads=2,
                    input_dim=1,
                    output_dim=1,
                    vocab_size=0,
                    tie_embeddings=False,
                    kernel_backend="torch",
                )
            )
            opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
            gen = torch.Generator().manual_seed(100 + seed)
            t0 = time.time()
            losses = []
            for step in range(steps):
                warm = max(1, steps // 20)
                f = (step + 1) / warm if step < warm else 0.5 * (1 + math.cos(math.pi * (step - warm) / (steps - warm)))
                for g in opt.param_groups:
                    g["lr"] = lr * max(f, 0.01)
                x, y = forecast_batch(batch, length, gen, noise)
                loss = (model(x)[0] - y).pow(2).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                losses.append(float(loss.detach()))
            seconds = time.time() - t0
            with torch.no_grad():
                err = (model(test_x)[0] - test_y).pow(2)
            rows.append(
                {
                    "model": name,
                    "seed": seed,
                    "test_mse": float(err.mean()),
                    "test_mse_last_quarter": float(err[:, tail].mean()),
                    "parameters": sum(p.numel() for p in model.parameters()),
                    "train_seconds": seconds,
                }
            )
            curves.setdefault(name, []).append(losses[:: max(1, steps // 100)])
    persistence = (test_x - test_y).pow(2)
    reference = {
        "persistence_mse": float(persistence.mean()),
        "persistence_mse_last_quarter": float(persistence[:, tail].mean()),
        "noise_floor": noise**2,
    }
    result = {
        "setting": dict(
            length=length,
            steps=steps,
            batch=batch,
            lr=lr,
            d_model=d_model,
            n_test=n_test,
            noise=noise,
            seeds=list(seeds),
        ),
        "rows": rows,
        "reference": reference,
    }
    write_json(out / "aaren_forecast.json", result)
    table = [
        "| model | parameters | test MSE (all steps) | test MSE (last quarter) | train s / seed |",
        "|---|---|---|---|---|",
    ]
    for name in models:
        rs = [r for r in rows if r["model"] == name]
        mean = lambda key: sum(r[key] for r in rs) / len(rs)  # noqa: E731
        each = lambda key: ", ".join(f"{r[key]:.4f}" for r in rs)  # noqa: E731
        table.append(
            f"| {name} | {rs[0]['parameters']} | {mean('test_mse'):.4f} ({each('test_mse')}) | "
            f"{mean('test_mse_last_quarter'):.4f} ({each('test_mse_last_quarter')}) | {mean('train_seconds'):.0f} |"
        )
    table.append(
        f"| predict the last value | - | {reference['persistence_mse']:.4f} | {reference['persistence_mse_last_quarter']:.4f} | - |"
    )
    table.append(f"| noise floor σ² | - | {noise**2:.4f} | {noise**2:.4f} | - |")
    write_atomic(out / "aaren_forecast.md", "\n".join(table) + "\n")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for (name, cs), color in zip(curves.items(), ("tab:blue", "tab:orange", "tab:green")):
        for i, c in enumerate(cs):
            ax.semilogy(
                [k * max(1, steps // 100) for k in range(len(c))],
                c,
                color=color,
                alpha=0.7,
                label=name if i == 0 else None,
            )
    ax.axhline(noise**2, ls="--", color="k", lw=0.8, label="noise floor")
    ax.set_xlabel("step")
    ax.set_ylabel("training MSE")
    ax.legend(fontsize=8)
    ax.set_title("synthetic forecasting: Aaren vs Transformer", fontsize=9)
    fig.tight_layout()
    save_figure(fig, out / "aaren_forecast.png")
    plt.close(fig)
    return result
