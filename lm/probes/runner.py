"""Run the probes on one batch and collect scalars, per-layer attention maps and a figure."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from lm.models.lm import LanguageModel
from lm.plotting import pyplot, save_figure
from lm.probes.attention import attention_stats, row_distributions
from lm.probes.capture import capture_layers
from lm.probes.form import form_equivalence
from lm.probes.lsa_fit import lsa_r2

PROBES = ("form", "attention", "lsa_fit")


@dataclass
class ProbeResult:
    scalars: Dict[str, float] = field(default_factory=dict)
    per_layer: List[Dict[str, Any]] = field(default_factory=list)
    maps: Dict[int, torch.Tensor] = field(default_factory=dict)


def probe_batch(config: Dict[str, Any], batch_size: int, seq_len: int, seed: int = 0) -> Dict[str, Any]:
    """A fixed probe batch: for token models a random segment followed by its repeat (so that
    induction can be measured, period = seq_len // 2); for task models, task examples."""
    gen = torch.Generator().manual_seed(seed)
    data = config.get("data", {})
    if data.get("source", {}).get("kind") == "task":
        from data.tasks import task_from_config
        from data.tasks.datamodule import TaskExamples, VAL_STREAM, collate_examples

        task = task_from_config(data)
        examples = TaskExamples(task, seed, VAL_STREAM)
        batch = collate_examples([examples[i] for i in range(batch_size)], task.spec.pad_id)
        return {"inputs": batch["inputs"], "period": None}
    vocab = int(config["model"]["vocab_size"])
    half = max(2, seq_len // 2)
    segment = torch.randint(0, vocab, (batch_size, half), generator=gen)
    return {"inputs": torch.cat([segment, segment], 1), "period": half}


def _check(probes: Sequence[str]) -> None:
    unknown = [p for p in probes if p not in PROBES]
    if unknown:
        from lm.errors import ConfigError

        raise ConfigError(f"probes.probes: unknown probe(s) {unknown}; known: {', '.join(PROBES)}")


@torch.no_grad()
def run_probes(
    model: LanguageModel,
    inputs: torch.Tensor,
    probes: Sequence[str] = PROBES,
    period: Optional[int] = None,
    lsa_rank: int = 6,
) -> ProbeResult:
    """All requested probes on ``inputs`` (tokens [B, T] or vectors [B, T, d])."""
    _check(probes)
    was_training = model.training
    model.eval()
    result = ProbeResult()
    try:
        layers = capture_layers(model, inputs)
        for io in layers:
            mixer = model.blocks[io.layer].mixer
            # the layer's mixer (a hybrid mixes families: attention layers report their exact softmax
            # matrix, the recurrent ones their closed form)
            row: Dict[str, Any] = {"layer": io.layer, "mixer": model.blocks[io.layer].layer.name}
            if "form" in probes:
                form = form_equivalence(mixer, io.x, (io.y, io.state), io.shared)
                row.update({f"form_{k}": v for k, v in form.items()})
            if "attention" in probes:
                ia = mixer.implicit_attention(io.x, **io.shared)
                if ia is not None:
                    p = row_distributions(ia.weights)
                    row.update({f"attn_{k}": v for k, v in attention_stats(ia, period, p).items()})
                    result.maps[io.layer] = p.mean((0, 1)).float().cpu()  # the heatmap: mean over batch, heads
            if "lsa_fit" in probes and io.x.shape[0] >= 4:
                row["lsa_r2"] = lsa_r2(io.x, io.y, rank=lsa_rank)
            result.per_layer.append(row)
    finally:
        model.train(was_training)
    for row in result.per_layer:
        for key, value in row.items():
            if key != "layer" and isinstance(value, float) and math.isfinite(value):
                result.scalars[f"probe/{key}/layer{row['layer']}"] = value
    for key in {k for row in result.per_layer for k, v in row.items() if k != "layer" and isinstance(v, float)}:
        values = [row[key] for row in result.per_layer if key in row]
        agg = max if key.startswith("form_") or key == "attn_recon_error" else (lambda v: sum(v) / len(v))
        result.scalars[f"probe/{key}/{'max' if agg is max else 'mean'}"] = float(agg(values))
    return result


def plot_probes(result: ProbeResult, path: Path, title: str = "") -> Path:
    """One PNG: a heatmap per layer (implicit attention) and bars of the per-layer scalars."""
    plt = pyplot()
    n_maps = len(result.maps)
    cols = max(1, min(4, n_maps))
    map_rows = math.ceil(n_maps / cols) if n_maps else 0
    fig = plt.figure(figsize=(3.2 * max(cols, 3), 3.0 * map_rows + 2.8))
    grid = fig.add_gridspec(map_rows + 1, max(cols, 3))
    for i, (layer, amap) in enumerate(sorted(result.maps.items())):
        ax = fig.add_subplot(grid[i // cols, i % cols])
        ax.imshow(amap.numpy() ** 0.5, cmap="viridis", interpolation="nearest")
        ax.set_title(f"layer {layer}: implicit attention", fontsize=9)
        ax.set_xlabel("source s", fontsize=8)
        ax.set_ylabel("target t", fontsize=8)
    layers = [row["layer"] for row in result.per_layer]
    panels = [
        ("lsa_r2", "LSA fit R² (held out)", False),
        ("form_out_rel", "form error (rel.)", True),
        ("attn_entropy", "attention entropy", False),
    ]
    for j, (key, label, log) in enumerate(panels):
        ax = fig.add_subplot(grid[map_rows, j])
        values = [row.get(key, float("nan")) for row in result.per_layer]
        ax.bar(layers, [max(v, 1e-12) if log else v for v in values], color="tab:blue")
        if log:
            ax.set_yscale("log")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("layer", fontsize=8)
        ax.set_xticks(layers)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)
    return Path(path)
