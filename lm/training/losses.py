"""Losses and their accumulation, in one place and without Lightning (evaluation imports this module
without loading Lightning and torchmetrics, which take many seconds to import).

* :func:`cross_entropy_sum`: next-token cross-entropy, optionally in chunks of tokens so that the full
  ``[B*T, vocab]`` logits tensor never exists at once (each chunk's logits are recomputed in the
  backward pass by activation checkpointing);
* :func:`token_loss` / :func:`task_loss` / :func:`batch_loss`: the loss sum and scored count of a corpus
  batch (documents reset at their starts with ``data.packing: reset``) or a synthetic-task batch;
* :class:`LossSums` and :func:`evaluate`: the sums over batches that every validation loop keeps (the
  Lightning module's validation, the trainer's final report, ``lm eval icl``), and the metrics made from
  them (:func:`validation_metrics`: loss, perplexity, bits per byte, accuracies).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def cross_entropy_sum(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    h: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int = 0,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Summed token cross-entropy of ``logits_fn(h)`` against ``targets``.

    h: [N, D] hidden states; targets: [N]; chunk_size > 0 processes ``chunk_size`` tokens at a time.
    """
    if chunk_size <= 0 or h.shape[0] <= chunk_size:
        return F.cross_entropy(logits_fn(h).float(), targets, ignore_index=ignore_index, reduction="sum")

    def piece(h_chunk: torch.Tensor, t_chunk: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits_fn(h_chunk).float(), t_chunk, ignore_index=ignore_index, reduction="sum")

    total = h.new_zeros((), dtype=torch.float32)
    for start in range(0, h.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        total = total + checkpoint(piece, h[sl], targets[sl], use_reentrant=False)
    return total


def task_loss(model, batch: Dict[str, torch.Tensor], output: str) -> tuple:
    """Loss over the masked positions of a task batch, and accuracy counts.

    classes: cross-entropy; vectors: squared error summed over output dims; multilabel: binary
    cross-entropy averaged over labels. ``correct`` counts right positions (argmax, or every label
    right at threshold 0.5), ``seq_correct`` sequences right at every scored position.
    """
    out, _ = model(batch["inputs"])
    mask = batch["mask"].bool()
    targets = batch["targets"]
    count = mask.sum()
    extra: Dict[str, torch.Tensor] = {}
    if output == "classes":
        per_pos = F.cross_entropy(out.float().transpose(1, 2), targets, reduction="none")
        right = out.argmax(-1) == targets
    elif output == "vectors":
        per_pos = (out.float() - targets.float()).pow(2).sum(-1)
        right = None
    else:
        per_pos = F.binary_cross_entropy_with_logits(out.float(), targets.float(), reduction="none").mean(-1)
        right = ((out > 0) == (targets > 0.5)).all(-1)
    total = (per_pos * mask).sum()
    if right is not None:
        right = right | ~mask
        extra = {
            "correct": (right & mask).sum().detach().float(),
            "seq_correct": right.all(-1).sum().detach().float(),
            "sequences": torch.tensor(float(mask.shape[0]), device=out.device),
        }
    return total, count, extra


def segment_starts(doc_start_mask: torch.Tensor) -> torch.Tensor:
    """The model's document starts for inputs ``tokens[:, :-1]`` from a window's ``doc_start_mask``
    [B, T+1] (True at a document's first token): bool [B, T].

    Input position t opens a document's segment when its target ``t + 1`` is that document's first
    token, i.e. when the input is the end-of-document id that precedes it: the document is read from a
    fresh state after that id, as ``lm eval ppl`` scores it. A window whose first token is itself a
    document's first token (the split's start) opens a segment at position 0 as well.
    """
    starts = doc_start_mask[:, 1:].clone()
    starts[:, 0] |= doc_start_mask[:, 0]
    return starts


def boundary_targets(targets: torch.Tensor, doc_start_mask: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """``targets`` [B, T] with every document's first token replaced by ``ignore_index`` (for
    ``data.loss_across_boundary: false``)."""
    return targets.masked_fill(doc_start_mask[:, 1:], ignore_index)


def token_loss(
    model,
    tokens: torch.Tensor,
    chunk_size: int = 0,
    doc_start_mask: Optional[torch.Tensor] = None,
    loss_across_boundary: bool = True,
    state: Any = None,
    return_state: bool = False,
) -> tuple:
    """(summed cross-entropy, number of scored targets[, new state]) of next-token prediction on
    tokens [B, T+1].

    doc_start_mask [B, T+1] (``data.packing: reset``): the model resets at every document
    (:func:`segment_starts`); without it the window is one stream. ``loss_across_boundary=False``
    leaves each document's first token unscored (needs the mask). ``state``/``return_state``: start
    from and return the model state (``train.state_passing``).
    """
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    starts = None if doc_start_mask is None else segment_starts(doc_start_mask)
    count: Any = targets.numel()
    if not loss_across_boundary:
        if doc_start_mask is None:
            raise ValueError("data.loss_across_boundary=false needs the windows' document starts (doc_start_mask)")
        targets = boundary_targets(targets, doc_start_mask)
        count = (targets != -100).sum()  # a tensor: no host sync
    kwargs = {} if starts is None else {"doc_starts": starts}
    h, new_state = model.hidden_states(inputs, state, return_state, **kwargs)
    total = cross_entropy_sum(model.logits, h.reshape(-1, h.shape[-1]), targets.reshape(-1), chunk_size=chunk_size)
    return (total, count, new_state) if return_state else (total, count)


def batch_loss(
    model,
    batch: Dict[str, torch.Tensor],
    task_output: str = "classes",
    chunk_size: int = 0,
    loss_across_boundary: bool = True,
) -> tuple:
    """(loss sum, scored count, extra sums) for a corpus batch (``tokens``, optional
    ``doc_start_mask``: :func:`token_loss`) or a task batch (``inputs``/``targets``/``mask``:
    :func:`task_loss` by the task's output kind)."""
    if "tokens" in batch:
        total, count = token_loss(model, batch["tokens"], chunk_size, batch.get("doc_start_mask"), loss_across_boundary)
        return total, count, {}
    return task_loss(model, batch, task_output)


#: validation metrics shown in the progress bar
VAL_PROG_BAR = ("val/loss", "val/bpb", "val/acc")


def validation_metrics(
    loss_sum, count, bytes_per_token: float, correct=0.0, seq_correct=0.0, sequences=0.0
) -> Dict[str, Any]:
    """``val/loss``, ``val/ppl`` (``exp`` capped at loss 30), ``val/bpb`` (``loss / ln 2 /
    bytes_per_token``, when that is > 0) and, when sequences were counted, ``val/acc`` (per scored
    position) and ``val/seq_acc`` from summed loss/counts (tensors or floats; empty when count <= 0)."""
    if count <= 0:
        return {}
    loss = loss_sum / count
    metrics: Dict[str, Any] = {
        "val/loss": loss,
        "val/ppl": torch.exp(loss.clamp(max=30.0)) if isinstance(loss, torch.Tensor) else math.exp(min(loss, 30.0)),
    }
    if bytes_per_token > 0:
        metrics["val/bpb"] = loss / math.log(2) / bytes_per_token
    if sequences > 0:
        metrics["val/acc"] = correct / count
        metrics["val/seq_acc"] = seq_correct / sequences
    return metrics


@dataclass
class LossSums:
    """Summed loss, scored positions and accuracy counts over batches (host numbers)."""

    loss_sum: float = 0.0
    count: int = 0
    correct: float = 0.0
    seq_correct: float = 0.0
    sequences: float = 0.0

    def add(self, total, count, extra: Optional[Dict[str, Any]] = None) -> None:
        """One batch's :func:`batch_loss` result."""
        extra = extra or {}
        self.loss_sum += float(total)
        self.count += int(count)
        self.correct += float(extra.get("correct", 0.0))
        self.seq_correct += float(extra.get("seq_correct", 0.0))
        self.sequences += float(extra.get("sequences", 0.0))

    def all_reduced(self, device: Any = "cpu") -> "LossSums":
        """The sums over every rank of a running ``torch.distributed`` group (itself without one)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return self
        values = torch.tensor(
            [self.loss_sum, self.count, self.correct, self.seq_correct, self.sequences],
            dtype=torch.float64,
            device=device,
        )
        dist.all_reduce(values)
        loss_sum, count, correct, seq_correct, sequences = values.tolist()
        return LossSums(loss_sum, int(round(count)), correct, seq_correct, sequences)

    def metrics(self, bytes_per_token: float = 0.0) -> Dict[str, Any]:
        """:func:`validation_metrics` of these sums."""
        return validation_metrics(
            self.loss_sum, self.count, bytes_per_token, self.correct, self.seq_correct, self.sequences
        )


@torch.no_grad()
def evaluate(
    model,
    batches: Iterable[Dict[str, torch.Tensor]],
    task_output: str = "classes",
    chunk_size: int = 0,
    loss_across_boundary: bool = True,
    max_batches: int = 0,
) -> LossSums:
    """:class:`LossSums` of ``model`` (in eval mode) over ``batches`` (the first ``max_batches`` when > 0),
    each moved to the model's device and scored by :func:`batch_loss`."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums = LossSums()
    try:
        for i, batch in enumerate(batches):
            if max_batches and i >= max_batches:
                break
            sums.add(
                *batch_loss(
                    model, {k: v.to(device) for k, v in batch.items()}, task_output, chunk_size, loss_across_boundary
                )
            )
    finally:
        model.train(was_training)
    return sums
