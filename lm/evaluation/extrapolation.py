"""``lm eval extrapolation``: loss by position within documents, beyond the training length, for
several checkpoints on one figure.

Each checkpoint is scored with :func:`lm.evaluation.ppl.perplexity` on the same text (a prepared
data directory -- whose tokenizer must be the checkpoint's -- or a UTF-8 text file, encoded with
each checkpoint's own tokenizer): by default with ``context full``, the recurrent families carry
their state through the whole document and the Transformer reads sliding windows of its
``max_seq_len`` (``--context N``: windows of N tokens for every family). The loss per position
bucket (0, 1, 2-3, 4-7, ... and the training length as an extra edge) is compared against the
position; a dashed line marks each model's training length. Losses are in nats per token of each
model's tokenizer: models with different tokenizers are not comparable token for token.

Outputs: ``extrapolation.json`` (the ppl summaries), ``extrapolation.csv`` (one row per model and
position bucket), ``extrapolation.png``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from lm.errors import LMError
from lm.evaluation.common import Checkpoint, write_atomic, write_json


def load_text(ckpt: Checkpoint, data: str, split: str, max_docs: Optional[int], max_tokens: Optional[int]):
    """The documents to score for one checkpoint (see the module docstring)."""
    from lm.evaluation.ppl import shard_documents, text_file_documents

    source = Path(data)
    if not source.exists():
        raise LMError(f"--data: {source} does not exist")
    if source.is_dir():
        return shard_documents(source, split, ckpt.loaded.tokenizer_sha256, max_docs, max_tokens)
    tokenizer = ckpt.tokenizer()
    src = ckpt.config.get("data", {}).get("source", {})
    how = str(src.get("split_by") or "file")
    regex = str(src.get("split_regex") or "")
    if how == "regex" and not regex:
        from lm.config.schema import SourceConfig

        regex = SourceConfig().split_regex
    return text_file_documents(source, tokenizer, ckpt.eod_id(tokenizer), max_tokens, how, regex, max_docs)


def parse_context(value: str) -> Optional[int]:
    """``full`` -> None (each family's longest reach), else a positive number of tokens."""
    if value == "full":
        return None
    try:
        n = int(value)
    except ValueError:
        raise LMError(f"--context: expected 'full' or a number of tokens, got {value!r}") from None
    if n <= 0:
        raise LMError(f"--context: must be > 0 tokens, got {n}")
    return n


def label_for(path: str, ckpt: Checkpoint) -> str:
    """``<run name> (<family/variant>)``: the run directory's name for a checkpoint inside ``checkpoints/``."""
    p = Path(path).resolve()
    run = p.parent.parent.name if p.parent.name == "checkpoints" else p.name
    return f"{run} ({ckpt.name})"


def run_extrapolation(
    paths: Sequence[str],
    data: Optional[str],
    split: str = "validation",
    context: str = "full",
    seq_len: Optional[int] = None,
    stride: Optional[int] = None,
    batch_size: int = 4,
    max_docs: Optional[int] = None,
    max_tokens: Optional[int] = None,
    stream: bool = False,
    labels: Sequence[str] = (),
    device: str = "cpu",
    progress: bool = False,
) -> Dict[str, Any]:
    """One :func:`lm.evaluation.ppl.perplexity` result per checkpoint (loaded one at a time)."""
    from lm.evaluation.common import open_checkpoint
    from lm.evaluation.ppl import perplexity
    from lm.evaluation.recall_state import expand_checkpoints

    paths = expand_checkpoints(paths)
    if labels and len(labels) != len(paths):
        raise LMError(f"--labels: {len(labels)} labels for {len(paths)} checkpoints")
    tokens_of_context = parse_context(context)
    results = []
    for i, path in enumerate(paths):
        ckpt = open_checkpoint(path, device)
        source = data or (str(ckpt.data_dir()) if ckpt.data_dir() is not None else None)
        if source is None:
            raise LMError(f"--data: {path}'s training data directory is gone; pass a data directory or a text file")
        text = load_text(ckpt, source, split, max_docs, max_tokens)
        if progress:
            print(f"[{i + 1}/{len(paths)}] {path}", file=sys.stderr)
        result = perplexity(
            ckpt,
            text,
            ckpt.eod_id(ckpt.tokenizer()),
            seq_len,
            stride,
            batch_size,
            context=tokens_of_context,
            protocol="stream" if stream else "per-document",
            progress=progress,
        )
        result["label"] = labels[i] if labels else label_for(path, ckpt)
        results.append(result)
        del ckpt
    return {"context": context, "protocol": "stream" if stream else "per-document", "models": results}


def csv_text(result: Dict[str, Any]) -> str:
    rows = ["label,model,checkpoint,train_seq_len,bucket_start,bucket_end,tokens,loss"]
    for m in result["models"]:
        for b in m["loss_by_position"]:
            rows.append(
                f'"{m["label"]}",{m["model"]},{m["checkpoint"]},{m["train_seq_len"] or ""},{b["start"]},'
                f"{b['end']},{b['tokens']},{b['loss']:.6f}"
            )
    return "\n".join(rows) + "\n"


def markdown(result: Dict[str, Any]) -> str:
    lines = [
        f"Loss by position (nats/token; protocol {result['protocol']}, context {result['context']})",
        "",
        "| model | train length | loss | within train length | beyond it | tokens beyond |",
        "|---|---|---|---|---|---|",
    ]
    for m in result["models"]:

        def f(x):
            return "-" if x is None else f"{x:.4f}"

        lines.append(
            f"| {m['label']} | {m['train_seq_len'] or '-'} | {m['loss']:.4f} | "
            f"{f(m['loss_within_train_len'])} | {f(m['loss_beyond_train_len'])} | "
            f"{m['tokens_beyond_train_len']:,} |"
        )
    return "\n".join(lines) + "\n"


def plot_extrapolation(result: Dict[str, Any], path: Path) -> Path:
    """Every model's loss by position bucket on one axis (log2 positions), training lengths dashed."""
    from lm.plotting import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, m in enumerate(result["models"]):
        colour = colours[i % len(colours)]
        buckets = m["loss_by_position"]
        xs = [max(0.5, (b["start"] + b["end"] - 1) / 2) for b in buckets]
        ax.plot(xs, [b["loss"] for b in buckets], "o-", ms=3, color=colour, label=m["label"])
        if m.get("train_seq_len"):
            ax.axvline(m["train_seq_len"], color=colour, ls="--", lw=1, alpha=0.7)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("position in document (bucket centre); dashed: training length")
    ax.set_ylabel("mean loss (nats/token)")
    ax.set_title(
        f"Loss by position beyond the training length (context {result['context']}, {result['protocol']})", fontsize=10
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = save_figure(fig, path)
    plt.close(fig)
    return out


def write_extrapolation_outputs(result: Dict[str, Any], out_dir: Path) -> Dict[str, Path]:
    out_dir = Path(out_dir)
    paths: Dict[str, Path] = {
        "csv": write_atomic(out_dir / "extrapolation.csv", csv_text(result)),
        "md": write_atomic(out_dir / "extrapolation.md", markdown(result)),
        "png": plot_extrapolation(result, out_dir / "extrapolation.png"),
    }
    paths["json"] = write_json(out_dir / "extrapolation.json", result)
    return paths


def labels_list(value: Optional[str]) -> List[str]:
    from lm.evaluation.common import parse_list

    return parse_list(value, "--labels") if value is not None else []
