"""``lm probe <checkpoint>``: the training-time probes run offline, written as a report directory
(``report.md``, ``probes.json``, ``probes.png``): by default ``<run>/probes/<checkpoint name>/`` for a
checkpoint of a run (so pruning the checkpoint keeps the report), ``<export>/probe-report`` for an export."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from lm.evaluation.common import write_atomic, write_json
from lm.models.registry import model_name
from lm.probes.runner import PROBES, ProbeResult, plot_probes, probe_batch, run_probes

COLUMNS = [
    ("form_out_rel", "form err (out)"),
    ("form_state_rel", "form err (state)"),
    ("attn_recon_error", "A·v err"),
    ("attn_entropy", "entropy"),
    ("attn_distance", "distance"),
    ("attn_prev_token", "prev-token"),
    ("attn_induction", "induction"),
    ("lsa_r2", "LSA R²"),
]


def markdown_table(result: ProbeResult) -> str:
    present = [(k, label) for k, label in COLUMNS if any(k in row for row in result.per_layer)]
    lines = [
        "| layer | mixer | " + " | ".join(label for _, label in present) + " |",
        "|---|---|" + "---|" * len(present),
    ]
    for row in result.per_layer:
        cells = []
        for key, _ in present:
            value = row.get(key)
            if value is None:
                cells.append("n/a")
            elif key.startswith(("form_", "attn_recon")):
                cells.append(f"{value:.1e}")
            else:
                cells.append(f"{value:.3f}")
        lines.append(f"| {row['layer']} | {row.get('mixer', '')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def default_report_dir(source: Path) -> Path:
    """Where the report of checkpoint/export directory ``source`` goes when ``--out`` is not given."""
    source = Path(source)
    if source.parent.name == "checkpoints":
        return source.parent.parent / "probes" / source.name
    return source / "probe-report"


def write_report(
    checkpoint: str,
    out_dir: Optional[str] = None,
    batch_size: int = 8,
    seq_len: int = 64,
    lsa_rank: int = 6,
    seed: int = 0,
    probes=PROBES,
) -> Path:
    from lm.training.export import load_model

    loaded = load_model(checkpoint)
    config = loaded.config
    batch = probe_batch(config, batch_size, seq_len, seed)
    result = run_probes(loaded.model, batch["inputs"], probes, batch["period"], lsa_rank)
    out = Path(out_dir) if out_dir else default_report_dir(Path(loaded.source))
    out.mkdir(parents=True, exist_ok=True)
    model = config["model"]
    title = f"{model_name(model)} at step {loaded.step}"
    plot_probes(result, out / "probes.png", title=title)
    payload = {
        "checkpoint": str(loaded.source),
        "step": loaded.step,
        "model": model,
        "scalars": result.scalars,
        "per_layer": result.per_layer,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "lsa_rank": lsa_rank,
    }
    write_json(out / "probes.json", payload)
    B, T = batch["inputs"].shape[:2]
    text = [
        f"# Probe report: {title}",
        "",
        f"Checkpoint: `{loaded.source}`  ",
        f"Probe batch: {B} x {T}"
        + (f" (second half repeats the first: induction period {batch['period']})" if batch["period"] else ""),
        "",
        markdown_table(result),
        "",
        "![probes](probes.png)",
        "",
        "Columns: form err = max relative difference between the whole-sequence and the stepped form; "
        "A·v err = reconstruction error of the layer output from its implicit attention matrix; "
        "entropy / distance / prev-token / induction are statistics of the row-normalised |A|; "
        "LSA R² = held-out share of the layer's input->output map explained by one linear self-attention "
        "layer (on random projections of rank " + str(lsa_rank) + "): 1 is a perfect fit, 0 no better than "
        "predicting the mean output, and a negative value means the fitted LSA layer predicts the held-out "
        "outputs worse than their mean (the layer does not act as linear self-attention at this rank; common "
        "early in training and in language-trained models). n/a: no closed-form attention.",
        "",
    ]
    write_atomic(out / "report.md", "\n".join(text))
    return out
