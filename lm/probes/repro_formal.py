"""Seed 001 (Irie, Csordás and Schmidhuber, 2023): the formal-language table, models x languages x
seeds, in one call (issue #21).

Every cell trains a fresh model on character prediction (:mod:`data.tasks.formal`: after every
prefix the set of valid next symbols, multi-label, end-of-string included) on strings of the
training range, then scores the fraction of test strings right at every position ("sequence
accuracy", the papers' measure) in each length bin (bin 0 = the training lengths, bin 1 = longer).
Training runs in-process (AdamW, fresh strings every step, the loss of
:func:`lm.training.losses.task_loss`), so the table is one command; ``lm repro formal-table`` writes
``formal_table.md``, ``formal_table.json`` and ``formal_table.png``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from data.tasks.formal import BINS, FormalLanguage, FormalOptions, valid_lengths
from lm.errors import LMError
from lm.evaluation.common import write_atomic, write_json
from lm.plotting import pyplot, save_figure

#: table row name -> (family, variant); the paper's definitions next to the project's
MODELS: Dict[str, Tuple[str, str]] = {
    "LT (elu+1, no denominator; paper)": ("linear_attention", "linear_transformer_nonorm"),
    "LT (with denominator)": ("linear_attention", "linear_transformer"),
    "DeltaNet (elu+1 sum-norm; paper)": ("linear_attention", "deltanet_sumnorm"),
    "DeltaNet (2024: conv, L2, SiLU)": ("linear_attention", "deltanet"),
    "recurrent delta": ("fwp", "recurrent_delta"),
    "SRWM": ("fwp", "srwm"),
    "recurrent delta (official layer)": ("fwp", "recurrent_delta_paper"),
    "SRWM (official layer)": ("fwp", "srwm_paper"),
    "LSTM": ("lstm", "lstm"),
    "e-LSTM": ("lstm", "elstm"),
    "Transformer (softmax, RoPE)": ("transformer", "transformer"),
}
LANGUAGES = ["parity", "aa_star", "abab_star", "anbn", "anbncn", "shuffle2", "dyck1", "reset_dyck1"]
LANGUAGE_NAMES = {
    "parity": "Parity",
    "aa_star": "(aa)*",
    "abab_star": "(abab)*",
    "anbn": "aⁿbⁿ",
    "anbncn": "aⁿbⁿcⁿ",
    "shuffle2": "Shuffle-2",
    "dyck1": "Dyck-1",
    "reset_dyck1": "reset Dyck-1",
}


def _task(language: str, bins: str) -> FormalLanguage:
    extra = {"parity_target": "next_symbols"} if language == "parity" else {}
    return FormalLanguage(FormalOptions(language=language, length_bins=bins, **extra))


def _batch(task: FormalLanguage, rng: np.random.Generator, n: int, lengths: Optional[List[int]] = None):
    from data.tasks.datamodule import collate_examples

    examples = []
    for i in range(n):
        ex = task.example(rng, length=int(rng.choice(lengths)) if lengths else 0)
        ex["index"] = i
        examples.append(ex)
    return collate_examples(examples, pad_id=0)


def train_and_score(
    family: str,
    variant: str,
    language: str,
    seed: int,
    bins: str = "small",
    steps: int = 1000,
    batch: int = 32,
    lr: float = 3e-3,
    d_model: int = 64,
    n_layers: int = 2,
    n_heads: int = 2,
    n_test: int = 256,
) -> Dict:
    """One cell: train ``family/variant`` on ``language`` with ``seed``; sequence accuracy per bin."""
    from lm.models import build_model
    from lm.training.losses import task_loss

    task = _task(language, bins)
    spec = task.spec
    torch.manual_seed(seed)
    model = build_model(
        dict(
            family=family,
            variant=variant,
            vocab_size=spec.vocab_size,
            output_dim=spec.output_dim,
            d_model=d_model,
            n_layers=n_layers,
            n_heads=n_heads,
            tie_embeddings=False,
            kernel_backend="torch",
        )
    )
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    rng = np.random.default_rng(seed)
    warmup = max(1, steps // 10)
    t0 = time.time()
    model.train()
    for step in range(steps):
        scale = (
            (step + 1) / warmup
            if step < warmup
            else 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
        )
        for g in opt.param_groups:
            g["lr"] = lr * max(scale, 0.01)
        total, count, _ = task_loss(model, _batch(task, rng, batch), "multilabel")
        loss = total / count
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    train_seconds = time.time() - t0
    model.eval()
    test_rng = np.random.default_rng(10_000 + seed)
    scores = []
    with torch.no_grad():
        for lo, hi in task.bins:
            right = 0
            for start in range(0, n_test, 128):
                b = _batch(task, test_rng, min(128, n_test - start), valid_lengths(language, lo, hi))
                _, _, extra = task_loss(model, b, "multilabel")
                right += int(extra["seq_correct"])
            scores.append(right / n_test)
    return {
        "family": family,
        "variant": variant,
        "language": language,
        "seed": seed,
        "bins": [list(b) for b in task.bins],
        "seq_acc": scores,
        "final_train_loss": float(loss.detach()),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_seconds": train_seconds,
    }


def formal_table(
    out_dir: str,
    models: Optional[Sequence[str]] = None,
    languages: Optional[Sequence[str]] = None,
    seeds: Sequence[int] = (0, 1, 2),
    bins: str = "small",
    steps: int = 1000,
    n_test: int = 256,
    log=print,
    render_only: bool = False,
    **train_kw,
) -> Dict:
    """Run every (model, language, seed) cell and write the table, JSON and figure. ``models``: keys of
    :data:`MODELS` or ``family/variant`` names; ``languages``: of :data:`LANGUAGES`. Cells already in
    ``out_dir/formal_table.json`` with the same setting are reused, not retrained."""
    if bins not in BINS:
        raise LMError(f"--bins: '{bins}' is not one of {', '.join(BINS)}")
    chosen = _models(models)
    languages = list(languages or LANGUAGES)
    for lang in languages:
        if lang not in LANGUAGES:
            raise LMError(f"--languages: unknown language '{lang}'; known: {', '.join(LANGUAGES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    setting = dict(bins=bins, steps=steps, n_test=n_test, **train_kw)
    done = _previous_cells(out / "formal_table.json", setting)
    cells = []
    for name, (family, variant) in chosen.items():
        for lang in languages:
            for seed in seeds:
                cell = done.get((family, variant, lang, seed))
                if cell is None and render_only:
                    continue
                if cell is None:
                    cell = train_and_score(
                        family, variant, lang, seed, bins=bins, steps=steps, n_test=n_test, **train_kw
                    )
                    log(f"{name} | {lang} | seed {seed}: seq acc {cell['seq_acc']} ({cell['train_seconds']:.0f} s)")
                else:
                    log(
                        f"{name} | {lang} | seed {seed}: seq acc {cell['seq_acc']} (from the previous formal_table.json)"
                    )
                cell["model"] = name
                cells.append(cell)
                # every finished cell is kept with the earlier run's cells of this setting (other models,
                # languages and seeds too), so a stopped run resumes and a table grows by parts
                done[(family, variant, lang, seed)] = cell
                write_json(out / "formal_table.json", {"setting": setting, "cells": list(done.values())})
    result = {"setting": setting, "cells": cells}
    if not cells:
        raise LMError(f"--render-only: {out / 'formal_table.json'} has no cell of this setting")
    write_atomic(out / "formal_table.md", table_markdown(cells, list(chosen), languages))
    present = [lang for lang in languages if any(c["language"] == lang for c in cells)]
    _figure(cells, list(chosen), present, out / "formal_table.png")
    return result


def _previous_cells(path: Path, setting: Dict) -> Dict[Tuple[str, str, str, int], Dict]:
    """Cells of an earlier run in ``path`` with the same setting (so a table can be extended or an
    interrupted run finished without retraining); {} when there is none or the setting differs."""
    import json

    if not path.exists():
        return {}
    try:
        prev = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    before = {k: v for k, v in prev.get("setting", {}).items() if k != "seeds"}  # the seeds may differ
    if before != json.loads(json.dumps(setting)):
        return {}
    return {(c["family"], c["variant"], c["language"], int(c["seed"])): c for c in prev.get("cells", [])}


def _models(models: Optional[Sequence[str]]) -> Dict[str, Tuple[str, str]]:
    if not models:
        return dict(MODELS)
    by_id = {f"{f}/{v}": name for name, (f, v) in MODELS.items()}
    chosen = {}
    for m in models:
        if m in MODELS:
            chosen[m] = MODELS[m]
        elif m in by_id:
            chosen[by_id[m]] = MODELS[by_id[m]]
        else:
            raise LMError(f"--models: unknown model '{m}'; known: {', '.join(by_id)}")
    return chosen


def _mean(cells: List[Dict], model: str, lang: str, b: int) -> Tuple[Optional[float], List[float]]:
    vals = [c["seq_acc"][b] for c in cells if c["model"] == model and c["language"] == lang]
    return (float(np.mean(vals)) if vals else None), vals


def table_markdown(cells: List[Dict], models: List[str], languages: List[str]) -> str:
    """Rows: models; columns: language x bin; cells: mean sequence accuracy (per seed in brackets)."""
    bins = {c["language"]: c["bins"] for c in cells}
    languages = [lang for lang in languages if lang in bins]
    head = ["model"] + [
        f"{LANGUAGE_NAMES[lang]} bin {b} ({lo}-{hi})" for lang in languages for b, (lo, hi) in enumerate(bins[lang])
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in models:
        row = [m]
        for lang in languages:
            for b in range(len(bins[lang])):
                mean, vals = _mean(cells, m, lang, b)
                row.append("-" if mean is None else f"{mean:.2f} ({', '.join(f'{v:.2f}' for v in vals)})")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _figure(cells: List[Dict], models: List[str], languages: List[str], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.45 * len(models) + 2.2))
    for b, ax in enumerate(axes):
        grid = np.array([[(_mean(cells, m, lang, b)[0] or 0.0) for lang in languages] for m in models])
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(languages)))
        ax.set_xticklabels([LANGUAGE_NAMES[lang] for lang in languages], rotation=30, fontsize=8)
        ax.set_yticks(range(len(models)))
        ax.set_yticklabels(models if b == 0 else [], fontsize=8)
        for i in range(len(models)):
            for j in range(len(languages)):
                ax.text(
                    j,
                    i,
                    f"{grid[i, j]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="w" if grid[i, j] < 0.6 else "k",
                )
        ax.set_title(["bin 0 (training lengths)", "bin 1 (longer strings)"][b] + ": sequence accuracy", fontsize=9)
    fig.subplots_adjust(left=0.2, right=0.88, bottom=0.22, wspace=0.08)
    fig.colorbar(im, ax=axes, shrink=0.8)
    save_figure(fig, path)
    plt.close(fig)
