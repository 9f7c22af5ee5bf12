"""``lm eval recall-vs-state``: MQAR accuracy against the size of the model's recurrent state.

For each checkpoint trained on the ``mqar`` task (``data/tasks/mqar.py``):

* **state bytes per layer**: the token mixer's state for one sequence, measured from its tensors,
  ``sum(numel * element_size)`` -- for the recurrent families that of ``mixer.init_state(1)``
  (constant in the sequence length: GLA's ``S`` [H, K, V] plus short-convolution buffers,
  RWKV-7's ``S`` and token shift, Aaren's ``(m, u, w)``, ...); for the Transformer the KV cache
  after reading ``seq_len`` tokens (``2 * H * seq_len * K`` elements), which grows with the
  length: the reference point. Layers are averaged (they are alike); the total is reported too;
* **accuracy**: per query (``acc``) and per example (``seq_acc``, every query right) on fresh
  test-stream examples of the checkpoint's own task at each ``n_pairs`` asked, scored with the
  in-context-learning suite (:func:`lm.evaluation.icl.score_examples`).

Outputs: ``recall_state.json``, ``recall_state.md`` (one row per checkpoint) and
``recall_vs_state.png`` (accuracy against bytes per layer on a log axis, one panel per pair count,
the Transformer drawn as a star).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence


from lm.errors import LMError
from lm.evaluation.common import Checkpoint, write_atomic, write_json

TASK = "mqar"


# --------------------------------------------------------------------------------- state size


def mixer_state_bytes(model, seq_len: int) -> List[int]:
    """Bytes of each layer's token-mixer state for one sequence (see the module docstring): a
    constant-size state, or a growing one (KV cache) after ``seq_len`` tokens
    (:meth:`~lm.models.mixer.TokenMixer.state_size`)."""
    dtype = next(model.parameters()).dtype
    return [block.mixer.state_size(1, int(seq_len), dtype) for block in model.blocks]


# --------------------------------------------------------------------------------- checkpoints


def is_model_dir(path: Path) -> bool:
    """A run directory, a checkpoint directory or an export (what :func:`open_checkpoint` takes)."""
    from lm.training.export import WEIGHTS

    return (path / "checkpoints").is_dir() or (path / "manifest.json").is_file() or (path / WEIGHTS).is_file()


def expand_checkpoints(paths: Sequence[str]) -> List[str]:
    """The given checkpoints, a directory of runs standing for the runs inside it (sorted)."""
    out: List[str] = []
    for p in map(Path, paths):
        if not p.exists():
            raise LMError(f"checkpoint not found: {p}")
        if p.is_dir() and not is_model_dir(p):
            runs = sorted(str(c) for c in p.iterdir() if c.is_dir() and is_model_dir(c))
            if not runs:
                raise LMError(f"{p}: neither a checkpoint nor a directory of runs (no run directory inside)")
            out += runs
        else:
            out.append(str(p))
    if not out:
        raise LMError("give at least one checkpoint or a directory of runs")
    return list(dict.fromkeys(out))


def mqar_task(ckpt: Checkpoint):
    """The checkpoint's MQAR task (one-line error for anything else)."""
    from data.tasks import task_from_config

    trained = ckpt.config.get("data", {}).get("task", {}).get("name") if ckpt.task_trained else None
    if trained != TASK:
        what = f"task '{trained}'" if trained else "language modelling"
        raise LMError(
            f"{ckpt.path}: trained on {what}, not on '{TASK}'; recall-vs-state needs MQAR checkpoints "
            f"(e.g. lm train mqar-tiny model=gla/tiny)"
        )
    return task_from_config(ckpt.config["data"])


# ------------------------------------------------------------------------------------ evaluate


def mqar_examples(task, n_pairs: int, seq_len: int, n: int, seed: int) -> List[Dict[str, Any]]:
    """``n`` test-stream examples with ``n_pairs`` pairs in ``seq_len`` tokens."""
    from data.tasks import rng_for
    from data.tasks.datamodule import TEST_STREAM

    out = []
    for i in range(n):
        try:
            ex = task.example(rng_for(seed, i, TEST_STREAM), n_pairs=int(n_pairs), seq_len=int(seq_len))
        except ValueError as e:
            raise LMError(f"--pairs {n_pairs} / --seq-len {seq_len}: {e}") from None
        ex["index"] = i
        out.append(ex)
    return out


def evaluate_checkpoint(
    ckpt: Checkpoint,
    pairs: Optional[Sequence[int]] = None,
    seq_len: Optional[int] = None,
    n_examples: int = 256,
    batch_size: int = 32,
    seed: int = 0,
) -> Dict[str, Any]:
    """State bytes per layer and MQAR accuracy at each pair count (default: the task's sweep)."""
    from lm.evaluation.icl import score_examples

    task = mqar_task(ckpt)
    L = int(seq_len or task.options.seq_len)
    if not ckpt.recurrent and L > ckpt.max_seq_len:
        raise LMError(f"--seq-len: {L} exceeds {ckpt.path}'s max_seq_len ({ckpt.max_seq_len})")
    counts = list(pairs) if pairs else task.eval_settings().get("n_pairs", [task.options.n_pairs])
    per_layer = mixer_state_bytes(ckpt.model, L)
    rows = []
    for n in counts:
        examples = mqar_examples(task, n, L, n_examples, seed)
        rows.append(
            {"n_pairs": int(n), **score_examples(ckpt.model, examples, "classes", batch_size, task.spec.pad_id)}
        )
    o = task.options
    return {
        "checkpoint": ckpt.path,
        "step": ckpt.loaded.step,
        "model": ckpt.name,
        "family": ckpt.family,
        "variant": ckpt.variant,
        "recurrent": ckpt.recurrent,
        "parameters": ckpt.model.num_parameters(),
        "d_model": int(ckpt.model.cfg.d_model),
        "n_layers": len(per_layer),
        "task": {
            "vocab_size": o.vocab_size,
            "seq_len": o.seq_len,
            "n_pairs": o.n_pairs,
            "n_queries": o.n_queries,
            "power_a": o.power_a,
        },
        "seq_len": L,
        "state_bytes_per_layer": sum(per_layer) / len(per_layer),
        "state_bytes_layers": per_layer,
        "state_bytes_total": sum(per_layer),
        "chance_acc": 2.0 / o.vocab_size,
        "rows": rows,
    }


def run_recall_vs_state(
    paths: Sequence[str],
    pairs: Optional[Sequence[int]] = None,
    seq_len: Optional[int] = None,
    n_examples: int = 256,
    batch_size: int = 32,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = False,
) -> Dict[str, Any]:
    """Every checkpoint (loaded one at a time); all of them are checked to be MQAR checkpoints first."""
    from tqdm import tqdm

    from lm.evaluation.common import open_checkpoint

    if n_examples <= 0 or batch_size <= 0:
        raise LMError(f"--examples and --batch-size must be > 0, got {n_examples}, {batch_size}")
    if pairs is not None and any(int(n) <= 0 for n in pairs):
        raise LMError(f"--pairs: pair counts must be > 0, got {list(pairs)}")
    paths = expand_checkpoints(paths)
    results = []
    for path in tqdm(paths, desc="recall-vs-state", unit="model", file=sys.stderr, disable=not progress, leave=False):
        ckpt = open_checkpoint(path, device)
        results.append(evaluate_checkpoint(ckpt, pairs, seq_len, n_examples, batch_size, seed))
        del ckpt
    return {"task": TASK, "examples": n_examples, "seed": seed, "models": results}


# -------------------------------------------------------------------------------------- output


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _label(m: Dict[str, Any]) -> str:
    return m["variant"] if m["variant"] and m["variant"] != m["family"] else m["family"]


def pair_counts(result: Dict[str, Any]) -> List[int]:
    return sorted({r["n_pairs"] for m in result["models"] for r in m["rows"]})


def markdown(result: Dict[str, Any], metric: str = "acc") -> str:
    counts = pair_counts(result)
    lines = [
        f"MQAR {metric} against the token mixer's state size per layer ({result['examples']} examples per cell, "
        f"seed {result['seed']}; Transformer: KV cache at the evaluated length)",
        "",
        "| model | parameters | seq_len | state / layer | " + " | ".join(f"{n} pairs" for n in counts) + " |",
        "|---|---|---|---|" + "---|" * len(counts),
    ]
    for m in sorted(result["models"], key=lambda m: m["state_bytes_per_layer"]):
        cells = {r["n_pairs"]: r.get(metric) for r in m["rows"]}
        kind = "" if m["recurrent"] else " (KV cache)"
        lines.append(
            f"| {_label(m)} | {m['parameters']:,} | {m['seq_len']} | "
            f"{human_bytes(m['state_bytes_per_layer'])}{kind} | "
            + " | ".join("-" if cells.get(n) is None else f"{cells[n]:.3f}" for n in counts)
            + " |"
        )
    return "\n".join(lines) + "\n"


def csv_text(result: Dict[str, Any]) -> str:
    rows = ["model,family,checkpoint,parameters,seq_len,state_bytes_per_layer,n_pairs,acc,seq_acc,loss"]
    for m in result["models"]:
        for r in m["rows"]:
            rows.append(
                f"{_label(m)},{m['family']},{m['checkpoint']},{m['parameters']},{m['seq_len']},"
                f"{m['state_bytes_per_layer']:.0f},{r['n_pairs']},{r['acc']:.6f},{r['seq_acc']:.6f},"
                f"{r['loss']:.6f}"
            )
    return "\n".join(rows) + "\n"


def plot_recall_vs_state(result: Dict[str, Any], path: Path, metric: str = "acc") -> Path:
    """Accuracy against state bytes per layer (log x), one panel per pair count, one colour per
    model (legend on the right); the Transformer's KV cache as a star, chance dotted."""
    from lm.plotting import pyplot, save_figure

    plt = pyplot()
    counts = pair_counts(result)
    fig, axes = plt.subplots(1, len(counts), figsize=(2.4 + 3.2 * len(counts), 3.6), sharey=True, squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    models = sorted(result["models"], key=lambda m: m["state_bytes_per_layer"])
    chance = min((m["chance_acc"] for m in models), default=None)
    for k, (ax, n) in enumerate(zip(axes[0], counts)):
        for i, m in enumerate(models):
            row = next((r for r in m["rows"] if r["n_pairs"] == n), None)
            if row is None:
                continue
            label = _label(m) + ("" if m["recurrent"] else f" (KV cache at L={m['seq_len']})")
            ax.scatter(
                [m["state_bytes_per_layer"]],
                [row[metric]],
                s=110 if not m["recurrent"] else 45,
                marker="*" if not m["recurrent"] else "o",
                color=colours[i % len(colours)],
                zorder=3,
                label=label if k == 0 else None,
                edgecolors="black",
                linewidths=0.4,
            )
        if chance is not None:
            ax.axhline(
                chance, color="gray", ls=":", lw=1, label=f"chance ({chance:.3g}: 1 of V/2 values)" if k == 0 else None
            )
        ax.set_xscale("log", base=2)
        ax.set_title(f"{n} key-value pairs", fontsize=9)
        ax.set_xlabel("state bytes per layer")
        ax.set_ylim(-0.03, 1.05)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"MQAR accuracy ({metric})")
    fig.legend(loc="center right", fontsize=7, frameon=False)
    fig.suptitle("MQAR recall against the token mixer's state size", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - 2.2 / (2.4 + 3.2 * len(counts)), 1))
    out = save_figure(fig, path)
    plt.close(fig)
    return out


def write_recall_outputs(result: Dict[str, Any], out_dir: Path) -> Dict[str, Path]:
    out_dir = Path(out_dir)
    paths = {
        "md": write_atomic(out_dir / "recall_state.md", markdown(result)),
        "csv": write_atomic(out_dir / "recall_state.csv", csv_text(result)),
        "png": plot_recall_vs_state(result, out_dir / "recall_vs_state.png"),
    }
    paths["json"] = write_json(out_dir / "recall_state.json", result)
    return paths


def describe(m: Dict[str, Any]) -> str:
    """One line per model for the console."""
    accs = ", ".join(f"{r['n_pairs']} pairs {r['acc']:.3f}" for r in m["rows"])
    return f"{_label(m)}: {human_bytes(m['state_bytes_per_layer'])} per layer; acc {accs}"
