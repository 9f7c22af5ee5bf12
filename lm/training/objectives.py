"""Training objectives without Lightning (importable by evaluation without loading Lightning and
torchmetrics, which take many seconds to import): next-token cross-entropy of corpus batches, the
loss of synthetic-task batches, and the validation metrics computed from their sums."""

from __future__ import annotations

import math
from typing import Any, Dict, Optional

import torch

from lm.training.losses import cross_entropy_sum


def task_loss(model, batch: Dict[str, torch.Tensor], output: str) -> tuple:
    """Loss over the masked positions of a task batch, and accuracy counts.

    classes: cross-entropy; vectors: squared error summed over output dims; multilabel: binary
    cross-entropy averaged over labels. ``correct`` counts right positions (argmax, or every label
    right at threshold 0.5), ``seq_correct`` sequences right at every scored position.
    """
    import torch.nn.functional as F

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
        extra = {"correct": (right & mask).sum().detach().float(), "seq_correct": right.all(-1).sum().detach().float(),
                 "sequences": torch.tensor(float(mask.shape[0]), device=out.device)}
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


def token_loss(model, tokens: torch.Tensor, chunk_size: int = 0, doc_start_mask: Optional[torch.Tensor] = None,
               loss_across_boundary: bool = True, state: Any = None, return_state: bool = False) -> tuple:
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


def batch_loss(model, batch: Dict[str, torch.Tensor], task_output: str = "classes", chunk_size: int = 0,
               loss_across_boundary: bool = True) -> tuple:
    """(loss sum, scored count, extra sums) for a corpus batch (``tokens``, optional
    ``doc_start_mask``: :func:`token_loss`) or a task batch (``inputs``/``targets``/``mask``:
    :func:`task_loss` by the task's output kind)."""
    if "tokens" in batch:
        total, count = token_loss(model, batch["tokens"], chunk_size, batch.get("doc_start_mask"),
                                  loss_across_boundary)
        return total, count, {}
    return task_loss(model, batch, task_output)


#: validation metrics shown in the progress bar
VAL_PROG_BAR = ("val/loss", "val/bpb", "val/acc")


def validation_metrics(loss_sum, count, bytes_per_token: float, correct=0.0, seq_correct=0.0,
                       sequences=0.0) -> Dict[str, Any]:
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
