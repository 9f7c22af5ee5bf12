"""Training objectives without Lightning (importable by evaluation without loading Lightning and
torchmetrics, which take many seconds to import): next-token cross-entropy of corpus batches, the
loss of synthetic-task batches, and the validation metrics computed from their sums."""

from __future__ import annotations

import math
from typing import Any, Dict

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


def token_loss(model, tokens: torch.Tensor, chunk_size: int = 0) -> tuple:
    """(summed cross-entropy, number of target tokens) of next-token prediction on tokens [B, T+1]."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    h, _ = model.hidden_states(inputs)
    total = cross_entropy_sum(model.logits, h.reshape(-1, h.shape[-1]), targets.reshape(-1), chunk_size=chunk_size)
    return total, targets.numel()


def batch_loss(model, batch: Dict[str, torch.Tensor], task_output: str = "classes", chunk_size: int = 0) -> tuple:
    """(loss sum, scored count, extra sums) for a corpus batch (``tokens``: :func:`token_loss`) or a
    task batch (``inputs``/``targets``/``mask``: :func:`task_loss` by the task's output kind)."""
    if "tokens" in batch:
        total, count = token_loss(model, batch["tokens"], chunk_size)
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
