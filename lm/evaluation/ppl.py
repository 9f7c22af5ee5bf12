"""Token perplexity and bits per byte of whole documents, and the loss by position within them.

Each document ``d_0 .. d_{n-1}`` (for token shards: ending with the end-of-document id) is scored
as next-token prediction after a prefix token ``p`` (the end-of-document id, which precedes every
document in training)::

    inputs  p    d_0  ...  d_{n-2}
    targets d_0  d_1  ...  d_{n-1}          loss_i = -log softmax(f(inputs_{<=i}))[d_i]

* recurrent families: the document is read in pieces of ``seq_len`` tokens, the state carried from
  piece to piece (``model(piece, state)``): every token sees the whole document before it and the
  memory does not grow with the document length (length extrapolation beyond training);
* the Transformer: sliding windows of ``window`` tokens (at most ``max_seq_len``) starting every
  ``stride`` tokens; the first window scores all its tokens, each later one only the tokens after
  the previous window's end, so every token is scored once with between ``window - stride`` and
  ``window`` tokens of context.

With a ``context`` of N tokens (``lm eval ppl --context N``, default: the training sequence
length) every family is scored the same way: sliding windows of N tokens with the state or cache
starting empty in each window, so every token sees between ``N - stride`` and N tokens of its
document. ``--context full`` gives each family its own longest reach (recurrent: the whole document;
Transformer: windows of ``max_seq_len``), which is not the same treatment.

The protocol: ``per-document`` scores each document on its own (its first token sees only the
prefix); ``stream`` concatenates them into one token stream (each document still ends with the
end-of-document id), as whole-file scoring does. The default is the semantics the checkpoint was
trained with (:func:`training_protocol`): ``data.packing: reset`` trains every document from a fresh
state after the end-of-document id, exactly what ``per-document`` scores; ``stream`` (and runs from
before ``data.packing``) trained on one stream. The report names both.

perplexity = exp(sum loss / tokens);  bits per byte = sum loss / ln 2 / UTF-8 bytes of the text.
"""

from __future__ import annotations

import math
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from lm.errors import DataError, LMError
from lm.evaluation.common import Checkpoint, peak_rss_mb, select_state, write_atomic, write_json

IGNORE = -100


# ----------------------------------------------------------------------------------- scoring


def _piece(doc: np.ndarray, start: int, end: int, prefix_id: int) -> Tuple[np.ndarray, np.ndarray]:
    """Inputs and targets of positions ``start .. end-1`` of one document (end <= len(doc))."""
    targets = np.asarray(doc[start:end], dtype=np.int64)
    if start == 0:
        inputs = np.concatenate([[prefix_id], np.asarray(doc[: end - 1], dtype=np.int64)])
    else:
        inputs = np.asarray(doc[start - 1 : end - 1], dtype=np.int64)
    return inputs, targets


def _batch(
    rows: List[Tuple[np.ndarray, np.ndarray]], width: int, pad_id: int, device
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Right-padded inputs [B, width] (pad_id) and targets [B, width] (IGNORE)."""
    inputs = np.full((len(rows), width), pad_id, dtype=np.int64)
    targets = np.full((len(rows), width), IGNORE, dtype=np.int64)
    for r, (x, y) in enumerate(rows):
        inputs[r, : len(x)] = x
        targets[r, : len(y)] = y
    return torch.from_numpy(inputs).to(device), torch.from_numpy(targets).to(device)


def _token_losses(logits: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
    """Per-position cross-entropy [B, T] in float64 (0 where the target is IGNORE)."""
    loss = F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=IGNORE, reduction="none")
    return loss.double().cpu().numpy()


@torch.no_grad()
def recurrent_losses(
    model, docs: Sequence[np.ndarray], prefix_id: int, seq_len: int, batch_size: int
) -> Iterator[Tuple[int, int, np.ndarray]]:
    """Yield ``(document index, first position, losses)`` pieces, carrying the state per document.

    Documents are batched longest first; a row leaves the batch (and its state) when its document
    ends, so the state stays ``batch_size`` documents wide and the work is proportional to tokens.
    """
    if seq_len <= 0:
        raise LMError(f"--seq-len: must be > 0, got {seq_len}")
    device = next(model.parameters()).device
    order = sorted((i for i in range(len(docs)) if len(docs[i])), key=lambda i: -len(docs[i]))
    for b in range(0, len(order), batch_size):
        active = order[b : b + batch_size]
        state = None
        start = 0
        while active:
            end = start + seq_len
            rows = [_piece(docs[i], start, min(end, len(docs[i])), prefix_id) for i in active]
            inputs, targets = _batch(rows, max(len(r[0]) for r in rows), prefix_id, device)
            logits, state = model(inputs, state, return_state=True)
            losses = _token_losses(logits, targets)
            for r, i in enumerate(active):
                yield i, start, losses[r, : len(rows[r][1])]
            keep = [r for r, i in enumerate(active) if len(docs[i]) > end]
            if len(keep) < len(active) and keep:
                state = select_state(state, torch.tensor(keep, dtype=torch.long))
            active = [active[r] for r in keep]
            start = end


def window_plan(n: int, window: int, stride: int) -> List[Tuple[int, int, int]]:
    """Sliding windows ``(begin, end, score_from)`` over positions ``0 .. n-1``: every position is
    scored exactly once, in the first window that reaches it."""
    if window <= 0 or stride <= 0 or stride > window:
        raise LMError(f"--stride: must be in 1..{window} (the window length), got {stride}")
    plan, begin, prev_end = [], 0, 0
    while True:
        end = min(begin + window, n)
        plan.append((begin, end, prev_end))
        prev_end = end
        if end >= n:
            return plan
        begin += stride


@torch.no_grad()
def window_losses(
    model, docs: Sequence[np.ndarray], prefix_id: int, window: int, stride: int, batch_size: int
) -> Iterator[Tuple[int, int, np.ndarray]]:
    """Yield ``(document index, first position, losses)`` for each sliding window's scored tail."""
    device = next(model.parameters()).device
    windows = [
        (i, b, e, s) for i in range(len(docs)) if len(docs[i]) for b, e, s in window_plan(len(docs[i]), window, stride)
    ]
    windows.sort(key=lambda w: -(w[2] - w[1]))
    for k in range(0, len(windows), batch_size):
        group = windows[k : k + batch_size]
        rows = [_piece(docs[i], b, e, prefix_id) for i, b, e, _ in group]
        inputs, targets = _batch(rows, max(e - b for _, b, e, _ in group), prefix_id, device)
        logits, _ = model(inputs)
        losses = _token_losses(logits, targets)
        for r, (i, b, e, s) in enumerate(group):
            yield i, s, losses[r, s - b : e - b]


# ------------------------------------------------------------------------------- accumulating


def position_edges(max_len: int, extra: Sequence[int] = ()) -> np.ndarray:
    """Bucket edges 0, 1, 2, 4, 8, ... past ``max_len``, plus ``extra`` (e.g. the training length)."""
    edges = {0}
    e = 1
    while e < max_len:
        edges.add(e)
        e *= 2
    edges.add(max(e, 1))
    edges.update(int(x) for x in extra if 0 < int(x) < max_len)
    return np.array(sorted(edges), dtype=np.int64)


@dataclass
class LossStats:
    """Streaming sums: total loss and tokens, per document, per position bucket, and exactly per
    position below ``exact_positions``."""

    n_docs: int
    edges: np.ndarray
    exact_positions: int = 0
    total: float = 0.0
    tokens: int = 0
    doc_loss: np.ndarray = None
    doc_tokens: np.ndarray = None
    bucket_loss: np.ndarray = None
    bucket_tokens: np.ndarray = None
    exact_loss: np.ndarray = None
    exact_tokens: np.ndarray = None

    def __post_init__(self):
        nb = len(self.edges) - 1
        self.doc_loss, self.doc_tokens = np.zeros(self.n_docs), np.zeros(self.n_docs, dtype=np.int64)
        self.bucket_loss, self.bucket_tokens = np.zeros(nb), np.zeros(nb, dtype=np.int64)
        self.exact_loss = np.zeros(self.exact_positions)
        self.exact_tokens = np.zeros(self.exact_positions, dtype=np.int64)

    def add(self, doc: int, start: int, losses: np.ndarray) -> None:
        n = len(losses)
        if n == 0:
            return
        s = float(losses.sum())
        self.total += s
        self.tokens += n
        self.doc_loss[doc] += s
        self.doc_tokens[doc] += n
        positions = start + np.arange(n)
        bucket = np.searchsorted(self.edges, positions, side="right") - 1
        nb = len(self.bucket_loss)
        self.bucket_loss += np.bincount(bucket, weights=losses, minlength=nb)[:nb]
        self.bucket_tokens += np.bincount(bucket, minlength=nb)[:nb]
        if self.exact_positions and start < self.exact_positions:
            k = min(n, self.exact_positions - start)
            self.exact_loss[start : start + k] += losses[:k]
            self.exact_tokens[start : start + k] += 1

    def mean_between(self, lo: int, hi: int) -> Optional[float]:
        """Mean loss over positions [lo, hi) from the exact per-position sums."""
        tokens = self.exact_tokens[lo:hi].sum()
        return float(self.exact_loss[lo:hi].sum() / tokens) if tokens else None


def score_documents(
    ckpt: Checkpoint,
    docs: Sequence[np.ndarray],
    prefix_id: int,
    seq_len: Optional[int] = None,
    stride: Optional[int] = None,
    batch_size: int = 4,
    exact_positions: int = 0,
    context: Optional[int] = None,
    progress: bool = False,
) -> Tuple[LossStats, Dict[str, Any]]:
    """Score every token of ``docs``; returns the sums and a description of the method used.

    ``context``: sliding windows of that many tokens for every family (see the module docstring);
    None: the recurrent state carried across each document (pieces of ``seq_len``), the
    Transformer's windows of ``seq_len`` (default ``max_seq_len``). ``progress``: a bar over tokens.
    """
    if batch_size <= 0:
        raise LMError(f"--batch-size: must be > 0, got {batch_size}")
    if seq_len is not None and seq_len <= 0:
        raise LMError(f"--seq-len: must be > 0, got {seq_len}")
    max_len = max((len(d) for d in docs), default=0)
    stats = LossStats(len(docs), position_edges(max_len, [ckpt.train_seq_len]), exact_positions)
    if context is not None:
        if context <= 0:
            raise LMError(f"--context: must be > 0 tokens (or 'full'), got {context}")
        if not ckpt.recurrent and context > ckpt.max_seq_len:
            raise LMError(f"--context: {context} exceeds the Transformer's max_seq_len ({ckpt.max_seq_len})")
        stride = int(stride or max(1, context // 2))
        method = {"method": "sliding windows (every family)", "seq_len": int(context), "stride": stride}
        chunks = window_losses(ckpt.model, docs, prefix_id, int(context), stride, batch_size)
    elif ckpt.recurrent:
        seq_len = int(seq_len or 512)
        method = {"method": "recurrent state carried across each document", "seq_len": seq_len, "stride": None}
        chunks = recurrent_losses(ckpt.model, docs, prefix_id, seq_len, batch_size)
    else:
        window = int(seq_len or ckpt.max_seq_len)
        if window > ckpt.max_seq_len:
            raise LMError(f"--seq-len: {window} exceeds the Transformer's max_seq_len ({ckpt.max_seq_len})")
        stride = int(stride or max(1, window // 2))
        method = {"method": "sliding windows", "seq_len": window, "stride": stride}
        chunks = window_losses(ckpt.model, docs, prefix_id, window, stride, batch_size)
    from tqdm import tqdm

    with tqdm(
        total=int(sum(len(d) for d in docs)),
        desc="scoring",
        unit="tok",
        unit_scale=True,
        file=sys.stderr,
        disable=not progress,
        dynamic_ncols=True,
        leave=False,
    ) as bar:
        for doc, start, losses in chunks:
            stats.add(doc, start, losses)
            bar.update(len(losses))
    return stats, method


# --------------------------------------------------------------------------------------- data


@dataclass
class EvalText:
    """Documents to score (token arrays), their UTF-8 size, and where they came from."""

    docs: List[np.ndarray]
    bytes: int
    source: str
    name: str
    details: Dict[str, Any] = field(default_factory=dict)


def shard_documents(
    data_dir: Path,
    split: str,
    expected_sha: Optional[str],
    max_docs: Optional[int] = None,
    max_tokens: Optional[int] = None,
) -> EvalText:
    """The documents of one split (each ending with the end-of-document id), in order.

    The tokenizer hash must match the checkpoint's. Bytes: the split's recorded UTF-8 size when the
    whole split is scored, else the decoded size of the scored tokens.
    """
    from data.shards import TokenShards, check_compatible
    from data.tokenizer import load_tokenizer

    if not expected_sha:
        raise DataError(f"--data {data_dir}: the checkpoint records no tokenizer hash to check the shards against")
    meta = check_compatible(data_dir, expected_sha)
    if split not in meta["splits"] or not meta["splits"][split].get("tokens"):
        have = [k for k, v in meta["splits"].items() if v.get("tokens")]
        raise DataError(f"--split: {data_dir} has no tokens in split '{split}'; splits with tokens: {', '.join(have)}")
    shards = TokenShards(data_dir, split)
    starts = np.asarray(shards.doc_starts, dtype=np.int64)
    ends = np.append(starts[1:], len(shards))
    docs: List[np.ndarray] = []
    taken = 0
    for s, e in zip(starts, ends):
        if max_docs is not None and len(docs) >= max_docs:
            break
        if max_tokens is not None:
            room = max_tokens - taken
            if room <= 0:
                break
            e = min(e, s + room)
        if e > s:
            docs.append(shards.window(int(s), int(e - s)))
            taken += int(e - s)
    info = meta["splits"][split]
    if taken == int(info["tokens"]):
        nbytes = int(info["bytes"])
        how = "split metadata"
    else:
        tok = load_tokenizer(Path(data_dir) / meta["tokenizer"]["file"])
        nbytes = sum(len(tok.decode(np.asarray(d).tolist(), skip_special_tokens=True).encode("utf-8")) for d in docs)
        how = "decoded scored tokens"
    return EvalText(
        docs,
        nbytes,
        str(data_dir),
        f"{Path(data_dir).name}-{split}",
        {"split": split, "bytes_from": how, "split_documents": len(starts)},
    )


def text_file_document(path: Path, tokenizer, eod_id: int, max_tokens: Optional[int] = None) -> EvalText:
    """A UTF-8 text file as one document (followed by the end-of-document id)."""
    return text_file_documents(path, tokenizer, eod_id, max_tokens, split_by="file")


def split_text(text: str, split_by: str, split_regex: str = "") -> List[str]:
    """A text's documents, cut the way ``data.source.split_by`` cuts training text (``file``: one;
    ``blank_line``; ``regex``: a document starts at each match of ``split_regex``), blank ones dropped."""
    from data.sources import _BLANK_LINES

    if split_by == "file":
        pieces = [text]
    elif split_by == "blank_line":
        pieces = _BLANK_LINES.split(text)
    elif split_by == "regex":
        try:
            pieces = re.split(split_regex, text)
        except re.error as e:
            raise LMError(f"--split-regex: invalid regular expression {split_regex!r} ({e})") from None
    else:
        raise LMError(f"--split-by: expected file, blank_line or regex, got {split_by!r}")
    return [p for p in pieces if p and not p.isspace()]


def text_file_documents(
    path: Path,
    tokenizer,
    eod_id: int,
    max_tokens: Optional[int] = None,
    split_by: str = "file",
    split_regex: str = "",
    max_docs: Optional[int] = None,
) -> EvalText:
    """A UTF-8 text file cut into documents by :func:`split_text`, each followed by the end-of-document id."""
    try:
        raw = Path(path).read_bytes()
        text = raw.decode("utf-8")
    except OSError as e:
        raise DataError(f"--data {path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"--data {path}: not UTF-8 text (byte {e.start})") from None
    pieces = split_text(text, split_by, split_regex)
    if not pieces:
        raise DataError(f"--data {path}: the file is empty")
    if max_docs is not None:
        pieces = pieces[:max_docs]
    docs, taken, nbytes, cut = [], 0, 0, False
    for piece in pieces:
        ids = np.array(tokenizer.encode(piece).ids + [eod_id], dtype=np.int64)
        if max_tokens is not None and taken + len(ids) > max_tokens:
            ids, cut = ids[: max_tokens - taken], True
        if len(ids):
            docs.append(ids)
            taken += len(ids)
            nbytes += (
                len(tokenizer.decode(ids.tolist(), skip_special_tokens=True).encode("utf-8"))
                if cut
                else len(piece.encode("utf-8"))
            )
        if cut:
            break
    return EvalText(
        docs,
        nbytes,
        str(path),
        Path(path).stem,
        {"bytes_from": "file", "split_by": split_by, "file_documents": len(pieces)},
    )


# ------------------------------------------------------------------------------------ command


def training_packing(ckpt: Checkpoint) -> str:
    """The checkpoint's ``data.packing`` (``stream`` for runs from before that key)."""
    return str((ckpt.config.get("data") or {}).get("packing", "stream"))


def training_protocol(ckpt: Checkpoint) -> str:
    """The scoring protocol with the semantics of the checkpoint's training: ``per-document`` for
    ``data.packing: reset``, ``stream`` otherwise."""
    return "per-document" if training_packing(ckpt) == "reset" else "stream"


def perplexity(
    ckpt: Checkpoint,
    text: EvalText,
    prefix_id: int,
    seq_len: Optional[int] = None,
    stride: Optional[int] = None,
    batch_size: int = 4,
    context: Optional[int] = None,
    protocol: str = "per-document",
    progress: bool = False,
) -> Dict[str, Any]:
    """Score ``text`` and summarise: loss, perplexity, bits per byte, loss by position bucket.

    ``protocol``: ``per-document`` scores each document separately, ``stream`` their concatenation;
    ``context``: see :func:`score_documents`.
    """
    if not text.docs:
        raise DataError(f"--data {text.source}: no tokens to score")
    if protocol not in ("per-document", "stream"):
        raise LMError(f"protocol: expected per-document or stream, got {protocol!r}")
    docs = text.docs if protocol == "per-document" else [np.concatenate([np.asarray(d) for d in text.docs])]
    t0 = time.perf_counter()
    stats, method = score_documents(
        ckpt, docs, prefix_id, seq_len, stride, batch_size, context=context, progress=progress
    )
    wall = time.perf_counter() - t0
    loss = stats.total / stats.tokens
    train_len = ckpt.train_seq_len
    buckets = []
    for k in range(len(stats.bucket_loss)):
        n = int(stats.bucket_tokens[k])
        if n:
            mean = float(stats.bucket_loss[k] / n)
            buckets.append(
                {
                    "start": int(stats.edges[k]),
                    "end": int(stats.edges[k + 1]),
                    "tokens": n,
                    "loss": mean,
                    "ppl": math.exp(min(mean, 50.0)),
                }
            )
    edges = stats.edges[:-1]
    within = stats.bucket_tokens[edges < train_len].sum() if train_len else 0
    beyond = stats.bucket_tokens[edges >= train_len].sum() if train_len else 0
    result = {
        "checkpoint": ckpt.path,
        "step": ckpt.loaded.step,
        "model": ckpt.name,
        "parameters": ckpt.model.num_parameters(),
        "data": text.source,
        **text.details,
        "documents": len(text.docs),
        "tokens": int(stats.tokens),
        "bytes": int(text.bytes),
        "protocol": protocol,
        "context": int(context) if context is not None else "full",
        "training_packing": training_packing(ckpt),
        "matches_training": protocol == training_protocol(ckpt),
        "loss": loss,
        "ppl": math.exp(min(loss, 50.0)),
        "bits_per_token": loss / math.log(2),
        "bits_per_byte": stats.total / math.log(2) / text.bytes if text.bytes else None,
        **method,
        "train_seq_len": train_len or None,
        "max_document_tokens": int(max(len(d) for d in docs)),
        "loss_within_train_len": float(stats.bucket_loss[edges < train_len].sum() / within) if within else None,
        "loss_beyond_train_len": float(stats.bucket_loss[edges >= train_len].sum() / beyond) if beyond else None,
        "tokens_beyond_train_len": int(beyond),
        "loss_by_position": buckets,
        "wall_s": wall,
        "tokens_per_s": stats.tokens / max(wall, 1e-9),
        "peak_rss_mb": peak_rss_mb(),
    }
    return result


def write_ppl_outputs(result: Dict[str, Any], out_dir: Path) -> Dict[str, Path]:
    """``ppl.json``, ``loss_by_position.csv`` and ``loss_by_position.png`` in ``out_dir``."""
    from lm.evaluation.plots import plot_loss_by_position

    out_dir = Path(out_dir)
    rows = ["bucket_start,bucket_end,tokens,loss,ppl"]
    rows += [
        f"{b['start']},{b['end']},{b['tokens']},{b['loss']:.6f},{b['ppl']:.4f}" for b in result["loss_by_position"]
    ]
    paths = {
        "json": out_dir / "ppl.json",
        "csv": out_dir / "loss_by_position.csv",
        "png": out_dir / "loss_by_position.png",
    }
    write_atomic(paths["csv"], "\n".join(rows) + "\n")
    plot_loss_by_position(result, paths["png"])
    write_json(paths["json"], result)
    return paths


def protocol_line(result: Dict[str, Any]) -> str:
    """How the tokens were scored, in words (printed in every report so results can be compared)."""
    how = (
        "each document scored separately"
        if result.get("protocol", "per-document") == "per-document"
        else "documents concatenated into one stream"
    )
    context = result.get("context", "full")
    if context == "full":
        reach = (
            "context: full (recurrent: the whole document before each token; Transformer: windows of "
            "max_seq_len) -- not the same treatment for every family"
        )
    else:
        reach = f"context: {context} tokens for every family (sliding windows, state reset per window)"
    line = f"{result.get('protocol', 'per-document')} ({how}); {reach}"
    if "training_packing" in result:
        same = "the same semantics" if result.get("matches_training") else "NOT the semantics it was trained with"
        line += f"; trained with data.packing={result['training_packing']}: {same}"
    return line


def format_summary(result: Dict[str, Any]) -> str:
    lines = [
        f"{result['model']} step {result['step']} on {result['data']}: {result['documents']} documents, "
        f"{result['tokens']:,} tokens, {result['bytes']:,} bytes",
        f"  loss {result['loss']:.4f}  perplexity {result['ppl']:.3f}  bits/byte "
        + (f"{result['bits_per_byte']:.4f}" if result["bits_per_byte"] is not None else "-"),
        f"  protocol: {protocol_line(result)}",
        f"  {result['method']}, seq_len {result['seq_len']}"
        + (f", stride {result['stride']}" if result["stride"] else "")
        + f"; {result['tokens_per_s']:,.0f} tokens/s, peak RSS {result['peak_rss_mb']:.0f} MiB",
    ]
    if result["loss_beyond_train_len"] is not None:
        lines.append(
            f"  loss within the training length ({result['train_seq_len']}): {result['loss_within_train_len']:.4f}; "
            f"beyond it ({result['tokens_beyond_train_len']:,} tokens): {result['loss_beyond_train_len']:.4f}"
        )
    return "\n".join(lines)
