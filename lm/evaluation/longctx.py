"""``lm eval longctx``: passkey retrieval and needle in a haystack at controlled depths and lengths.

Each trial is one prompt of exactly ``L`` tokens (the context length) and one expected answer::

    [eod] filler[:p]  needle  filler[p:]  question        p = round(depth * F),  F = L - 1 - |needle| - |question|

* ``filler``: ``F`` consecutive tokens of the run's own corpus (by default the checkpoint's
  validation shards; documents joined by a blank line instead of the end-of-document id, which
  would tell the model a new document starts), from a seeded random start, wrapping around;
* ``needle``/``question``: the task's templates (``passkey``: "The pass key is {value}. Remember
  it. {value} is the pass key." / "What is the pass key? The pass key is"; ``needle``: "The
  special magic number for {key} is: {value}." with a named key), encoded with the checkpoint's
  tokenizer; ``depth`` 0 puts the needle right after the start of the document, 1 right before
  the question;
* the answer (``value``: a random number of ``digits`` digits) never occurs in the filler: the
  decoded filler is searched and the value (with a new stretch of filler) redrawn until it does not.

Scoring: greedy decoding with the model's state (the prompt read once in pieces of
``lm.evaluation.generate.PREFILL_CHUNK`` tokens by :func:`lm.evaluation.sampling.prefill`, then one
``step`` per new token), exact match: the generated text, leading spaces removed, starts with the
answer and the answer is not followed by a letter or digit. Accuracy per (depth, length) cell,
drawn as a heatmap. With ``likelihood`` (default) also a graded signal for models that never
answer exactly: the mean negative log-likelihood per token of the answer after the prompt, teacher
forced from the same state, against the same after a control prompt whose needle holds another
value (same filler, key and position)::

    nll_gain = NLL(answer | control prompt) - NLL(answer | prompt)      nats/token; > 0: the needle is used

Trial ``i`` of the cell (``L``, ``depth``) draws everything from ``(seed, L, depth, i)``: results
are reproducible and a cell does not change when others are added.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from lm.errors import LMError
from lm.evaluation.common import Checkpoint, map_state, write_atomic, write_json

DEFAULT_LENGTHS = [512, 1024, 2048, 4096, 8192, 16384, 32768]
DEFAULT_DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]

#: keys of the ``needle`` task (one per trial, drawn with the trial's generator)
NEEDLE_KEYS = [
    "Amsterdam",
    "Berlin",
    "Cairo",
    "Dublin",
    "Edinburgh",
    "Florence",
    "Geneva",
    "Helsinki",
    "Istanbul",
    "Jakarta",
    "Kyoto",
    "Lisbon",
    "Madrid",
    "Nairobi",
    "Oslo",
    "Prague",
    "Quito",
    "Rome",
    "Seoul",
    "Toronto",
    "Utrecht",
    "Vienna",
    "Warsaw",
    "Zurich",
]


@dataclass(frozen=True)
class Template:
    """A needle (must hold ``{value}``) and the question that asks for it (``{key}`` optional in both)."""

    needle: str
    question: str
    digits: int


TEMPLATES: Dict[str, Template] = {
    "passkey": Template(
        "\nThe pass key is {value}. Remember it. {value} is the pass key.\n",
        "\nWhat is the pass key? The pass key is",
        5,
    ),
    "needle": Template(
        "\nThe special magic number for {key} is: {value}.\n",
        "\nWhat is the special magic number for {key}? The special magic number for {key} is:",
        7,
    ),
}


def make_template(
    task: str, needle: Optional[str] = None, question: Optional[str] = None, digits: Optional[int] = None
) -> Template:
    """The task's template with any of its parts replaced (checked: the needle holds ``{value}``)."""
    if task not in TEMPLATES:
        raise LMError(f"--task: expected {' or '.join(TEMPLATES)}, got {task!r}")
    base = TEMPLATES[task]
    t = Template(
        needle if needle is not None else base.needle,
        question if question is not None else base.question,
        int(digits) if digits is not None else base.digits,
    )
    if "{value}" not in t.needle:
        raise LMError(f"--needle: the needle text must contain {{value}} (the answer), got {t.needle!r}")
    if "{value}" in t.question:
        raise LMError("--question: the question must not contain {value} (it would give the answer away)")
    if not 1 <= t.digits <= 18:
        raise LMError(f"--digits: the answer's number of digits must be in 1..18, got {t.digits}")
    for what, text in (("--needle", t.needle), ("--question", t.question)):
        try:
            text.format(key="k", value="1")
        except (KeyError, IndexError, ValueError) as e:
            raise LMError(
                f"{what}: only {{key}} and {{value}} may appear in braces ({type(e).__name__}: {e})"
            ) from None
    return t


# ----------------------------------------------------------------------------------- filler


class Filler:
    """The corpus as one token stream to cut filler from (documents joined by ``separator`` ids)."""

    def __init__(self, docs: Sequence[np.ndarray], eod_id: int, separator: Sequence[int], source: str = ""):
        pieces = []
        for d in docs:
            d = np.asarray(d, dtype=np.int64)
            d = d[d != eod_id]
            if len(d):
                pieces += [d, np.asarray(separator, dtype=np.int64)]
        self.tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
        self.source = source
        if len(self.tokens) < 64:
            raise LMError(f"filler: {source or 'the corpus'} has only {len(self.tokens)} tokens; need at least 64")

    def take(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` consecutive tokens from a random start (wrapping around the stream)."""
        if n <= 0:
            return np.zeros(0, dtype=np.int64)
        start = int(rng.integers(0, len(self.tokens)))
        idx = (start + np.arange(n)) % len(self.tokens)
        return self.tokens[idx]


def filler_from_checkpoint(ckpt: Checkpoint, data: Optional[str], split: str, max_tokens: int = 2_000_000) -> Filler:
    """Filler from ``data`` (a prepared data directory, or a UTF-8 text file) or the checkpoint's own
    training data directory (``split``, default validation)."""
    from lm.evaluation.ppl import shard_documents, text_file_documents

    tokenizer = ckpt.tokenizer()
    eod = ckpt.eod_id(tokenizer)
    source = Path(data) if data else ckpt.data_dir()
    if source is None:
        raise LMError(
            "--data: the checkpoint's training data directory is gone; pass a prepared data directory "
            "or a text file to take the filler from"
        )
    if not source.exists():
        raise LMError(f"--data: {source} does not exist")
    if source.is_dir():
        text = shard_documents(source, split, ckpt.loaded.tokenizer_sha256, max_tokens=max_tokens)
    else:
        text = text_file_documents(source, tokenizer, eod, max_tokens, split_by="blank_line")
    where = f"{source} ({split})" if source.is_dir() else str(source)
    return Filler(text.docs, eod, tokenizer.encode("\n\n").ids, where)


# ----------------------------------------------------------------------------------- trials


def trial_rng(seed: int, length: int, depth: float, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(length), int(round(float(depth) * 10_000)), int(index)])


def draw_number(rng: np.random.Generator, digits: int) -> str:
    """A random ``digits``-digit decimal number without a leading zero."""
    first = str(int(rng.integers(1, 10)))
    return first + "".join(str(int(d)) for d in rng.integers(0, 10, size=digits - 1))


def build_trial(
    tokenizer,
    filler: Filler,
    template: Template,
    length: int,
    depth: float,
    rng: np.random.Generator,
    eod_id: int,
    max_redraws: int = 100,
) -> Dict[str, Any]:
    """One prompt of exactly ``length`` tokens with the needle at ``depth`` of the filler (see the
    module docstring); the value and the filler are redrawn while the value occurs in the decoded
    filler."""
    if not 0.0 <= depth <= 1.0:
        raise LMError(f"--depths: each depth must be in [0, 1], got {depth}")
    key = NEEDLE_KEYS[int(rng.integers(0, len(NEEDLE_KEYS)))]
    question = tokenizer.encode(template.question.format(key=key)).ids
    for _ in range(max_redraws):
        value = draw_number(rng, template.digits)
        needle = tokenizer.encode(template.needle.format(key=key, value=value)).ids
        room = length - 1 - len(needle) - len(question)
        if room < 0:
            raise LMError(
                f"--lengths: {length} tokens cannot hold the needle ({len(needle)} tokens) and the question "
                f"({len(question)}); use lengths of at least {1 + len(needle) + len(question)}"
            )
        fill = filler.take(rng, room)
        if value not in tokenizer.decode(fill.tolist()):
            break
    else:
        raise LMError(f"filler: every {template.digits}-digit answer drawn occurs in the filler text; use more digits")
    pos = int(round(depth * len(fill)))
    prompt = np.concatenate([[eod_id], fill[:pos], needle, fill[pos:], question]).astype(np.int64)
    assert len(prompt) == length
    # the control: the same prompt with another value in the needle (preferably one as many tokens
    # long and absent from the filler); the answer occurs nowhere in it
    text = tokenizer.decode(fill.tolist())
    control, control_needle = None, None
    for _ in range(max_redraws):
        c = draw_number(rng, template.digits)
        if c == value:
            continue
        ids = tokenizer.encode(template.needle.format(key=key, value=c)).ids
        if control is None:
            control, control_needle = c, ids
        if len(ids) == len(needle) and c not in text:
            control, control_needle = c, ids
            break
    if control is None:
        raise LMError(f"--digits: {template.digits} digit(s) leave no value other than the answer for the control")
    control_prompt = np.concatenate([[eod_id], fill[:pos], control_needle, fill[pos:], question]).astype(np.int64)
    return {
        "prompt": prompt.tolist(),
        "answer": value,
        "key": key,
        "needle_start": 1 + pos,
        "needle_tokens": len(needle),
        "filler_tokens": len(fill),
        "control_prompt": control_prompt.tolist(),
        "control_answer": control,
    }


def exact_match(generated: str, answer: str) -> bool:
    """The generated text (leading whitespace removed) starts with ``answer``, which is not followed
    by a letter or digit (``714325`` does not match ``71432``)."""
    text = generated.lstrip()
    return text.startswith(answer) and not text[len(answer) : len(answer) + 1].isalnum()


def parse_lengths(value: Optional[str]) -> List[int]:
    """``"512,1k,32k"`` -> ``[512, 1024, 32768]``."""
    if value is None:
        return list(DEFAULT_LENGTHS)
    out = []
    for item in value.split(","):
        item = item.strip().lower()
        if not item:
            continue
        try:
            n = int(item[:-1]) * 1024 if item.endswith("k") else int(item)
        except ValueError:
            raise LMError(f"--lengths: expected token counts like 512,2k,32k, got {item!r}") from None
        if n <= 0:
            raise LMError(f"--lengths: lengths must be > 0, got {item!r}")
        out.append(n)
    if not out:
        raise LMError(f"--lengths: expected a comma-separated list, got {value!r}")
    return sorted(set(out))


def parse_depths(value: Optional[str]) -> List[float]:
    if value is None:
        return list(DEFAULT_DEPTHS)
    out = []
    for item in value.split(","):
        if not item.strip():
            continue
        try:
            d = float(item)
        except ValueError:
            raise LMError(f"--depths: expected fractions in [0, 1] like 0,0.5,1, got {item.strip()!r}") from None
        if not 0.0 <= d <= 1.0:
            raise LMError(f"--depths: each depth must be in [0, 1], got {item.strip()}")
        out.append(d)
    if not out:
        raise LMError(f"--depths: expected a comma-separated list, got {value!r}")
    return sorted(set(out))


# ----------------------------------------------------------------------------------- scoring


@torch.no_grad()
def read_prompt(model, prompt: Sequence[int]):
    """Next-token logits [1, V] after the prompt and the model state (read once, in pieces)."""
    from lm.evaluation.generate import PREFILL_CHUNK
    from lm.evaluation.sampling import prefill

    device = next(model.parameters()).device
    return prefill(model, torch.tensor([list(prompt)], dtype=torch.long, device=device), PREFILL_CHUNK)


@torch.no_grad()
def greedy_continuation(model, logits: torch.Tensor, state: Any, max_new: int, eod_id: Optional[int]) -> List[int]:
    """Greedy tokens from a read prompt, one ``step`` each (stops at the end-of-document id)."""
    out: List[int] = []
    for _ in range(max_new):
        token = int(logits[0].argmax())
        if token == eod_id:
            break
        out.append(token)
        if len(out) < max_new:
            logits, state = model.step(torch.tensor([token], device=logits.device), state)
    return out


@torch.no_grad()
def continuation_nll(model, logits: torch.Tensor, state: Any, ids: Sequence[int]) -> float:
    """Mean negative log-likelihood (nats per token) of ``ids`` continuing a read prompt, teacher
    forced from a copy of the state (the state itself is left as it was)."""
    lp = [torch.log_softmax(logits[0].float(), -1)[ids[0]]]
    if len(ids) > 1:
        copy = map_state(state, lambda t: t.clone())
        tokens = torch.tensor([list(ids[:-1])], dtype=torch.long, device=logits.device)
        h, _ = model.hidden_states(tokens, copy, return_state=True)
        rest = torch.log_softmax(model.logits(h)[0].float(), -1)
        lp += [rest[i, t] for i, t in enumerate(ids[1:])]
    return float(-torch.stack(lp).mean())


def run_longctx(
    ckpt: Checkpoint,
    filler: Filler,
    task: str = "passkey",
    lengths: Sequence[int] = DEFAULT_LENGTHS,
    depths: Sequence[float] = DEFAULT_DEPTHS,
    trials: int = 10,
    seed: int = 0,
    template: Optional[Template] = None,
    likelihood: bool = True,
    progress: bool = False,
) -> Dict[str, Any]:
    """Accuracy by (depth, length); lengths beyond the Transformer's ``max_seq_len`` are skipped (listed).

    ``likelihood``: also the answer's mean negative log-likelihood after the prompt (``answer_nll``)
    and after the control prompt, whose needle holds another value (``control_nll``); their
    difference ``nll_gain`` (nats per token) is how much the needle helps -- a graded signal where
    exact match is 0.
    """
    from tqdm import tqdm

    if trials <= 0:
        raise LMError(f"--trials must be > 0, got {trials}")
    template = template or make_template(task)
    tokenizer = ckpt.tokenizer()
    eod = ckpt.eod_id(tokenizer)
    model = ckpt.model
    max_new = len(tokenizer.encode(" " + "9" * template.digits).ids) + 2
    limit = None if ckpt.recurrent else ckpt.max_seq_len - max_new - 2  # 2: a control needle may be longer
    kept = [L for L in lengths if limit is None or L <= limit]
    skipped = [L for L in lengths if L not in kept]
    if not kept:
        raise LMError(
            f"--lengths: every length exceeds the Transformer's limit ({ckpt.max_seq_len} tokens of "
            f"max_seq_len minus {max_new + 2} to answer): use lengths <= {limit}"
        )
    cells, records = [], []
    bar = tqdm(
        total=len(kept) * len(depths) * trials,
        desc=task,
        unit="trial",
        file=sys.stderr,
        disable=not progress,
        dynamic_ncols=True,
        leave=False,
    )
    for L in kept:
        for d in depths:
            correct, nll, control_nll = 0, [], []
            for i in range(trials):
                t = build_trial(tokenizer, filler, template, L, d, trial_rng(seed, L, d, i), eod)
                logits, state = read_prompt(model, t["prompt"])
                record = {
                    "length": L,
                    "depth": d,
                    "index": i,
                    "key": t["key"],
                    "answer": t["answer"],
                    "needle_start": t["needle_start"],
                }
                if likelihood:
                    answer_ids = tokenizer.encode(" " + t["answer"]).ids
                    record["answer_nll"] = continuation_nll(model, logits, state, answer_ids)
                    c_logits, c_state = read_prompt(model, t["control_prompt"])
                    record["control_answer"] = t["control_answer"]
                    record["control_nll"] = continuation_nll(model, c_logits, c_state, answer_ids)
                    nll.append(record["answer_nll"])
                    control_nll.append(record["control_nll"])
                text = tokenizer.decode(greedy_continuation(model, logits, state, max_new, eod))
                record["generated"], record["correct"] = text, exact_match(text, t["answer"])
                correct += record["correct"]
                records.append(record)
                bar.update(1)
            cell = {"length": L, "depth": d, "trials": trials, "correct": correct, "acc": correct / trials}
            if likelihood:
                cell.update(
                    answer_nll=float(np.mean(nll)),
                    control_nll=float(np.mean(control_nll)),
                    nll_gain=float(np.mean(control_nll) - np.mean(nll)),
                )
            cells.append(cell)
    bar.close()
    return {
        "checkpoint": ckpt.path,
        "step": ckpt.loaded.step,
        "model": ckpt.name,
        "parameters": ckpt.model.num_parameters(),
        "train_seq_len": ckpt.train_seq_len or None,
        "task": task,
        "template": {"needle": template.needle, "question": template.question, "digits": template.digits},
        "filler": filler.source,
        "lengths": kept,
        "skipped_lengths": skipped,
        "depths": list(depths),
        "trials": trials,
        "seed": seed,
        "scoring": "greedy decoding, exact match",
        "likelihood": likelihood,
        "acc": sum(c["correct"] for c in cells) / max(1, sum(c["trials"] for c in cells)),
        "cells": cells,
        "records": records,
    }


# ----------------------------------------------------------------------------------- outputs


def length_label(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def accuracy_grid(result: Dict[str, Any], metric: str = "acc") -> np.ndarray:
    """``metric`` of each cell [depths, lengths] (NaN where a cell was not run)."""
    grid = np.full((len(result["depths"]), len(result["lengths"])), np.nan)
    for c in result["cells"]:
        if metric in c:
            grid[result["depths"].index(c["depth"]), result["lengths"].index(c["length"])] = c[metric]
    return grid


def markdown(result: Dict[str, Any]) -> str:
    lines = [
        f"**{result['model']}** step {result['step']} ({result['checkpoint']}): {result['task']}, "
        f"{result['trials']} trials per cell, exact match; overall {result['acc']:.3f}"
    ]
    tables = [("acc", "exact-match accuracy", 2)]
    if result.get("likelihood"):
        tables.append(
            ("nll_gain", "answer log-likelihood gain over the control prompt (nats/token; > 0: the needle helps)", 3)
        )
    for metric, title, digits in tables:
        grid = accuracy_grid(result, metric)
        lines += [
            "",
            title,
            "",
            "| depth \\ length | " + " | ".join(length_label(L) for L in result["lengths"]) + " |",
            "|---|" + "---|" * len(result["lengths"]),
        ]
        for i, d in enumerate(result["depths"]):
            lines.append(
                f"| {d:g} | " + " | ".join("-" if math.isnan(x) else f"{x:.{digits}f}" for x in grid[i]) + " |"
            )
    if result["skipped_lengths"]:
        lines.append(f"\nskipped (beyond the model's max_seq_len): {', '.join(map(str, result['skipped_lengths']))}")
    return "\n".join(lines) + "\n"


def plot_heatmap(result: Dict[str, Any], path: Path) -> Path:
    """Accuracy by depth (rows) and context length (columns), each cell annotated; with
    ``likelihood`` a second panel: the answer's log-likelihood gain over the control prompt."""
    from lm.plotting import pyplot, save_figure

    plt = pyplot()
    panels = [("acc", "exact-match accuracy", "RdYlGn", 0.0, 1.0, 2)]
    if result.get("likelihood"):
        gain = accuracy_grid(result, "nll_gain")
        top = float(np.nanmax(np.abs(gain))) if np.isfinite(gain).any() else 1.0
        panels.append(("nll_gain", "log-likelihood gain (nats/token)", "RdBu", -max(top, 0.1), max(top, 0.1), 3))
    w = 1.2 + 0.9 * len(result["lengths"])
    fig, axes = plt.subplots(
        1, len(panels), figsize=(w * len(panels), 1.6 + 0.55 * len(result["depths"])), squeeze=False
    )
    for ax, (metric, label, cmap, lo, hi, digits) in zip(axes[0], panels):
        grid = accuracy_grid(result, metric)
        im = ax.imshow(grid, cmap=cmap, vmin=lo, vmax=hi, aspect="auto")
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                if not math.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.{digits}f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(result["lengths"])), [length_label(L) for L in result["lengths"]])
        ax.set_yticks(range(len(result["depths"])), [f"{d:g}" for d in result["depths"]])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth (0 = start)")
        fig.colorbar(im, ax=ax, label=label)
    fig.suptitle(
        f"{result['model']} step {result['step']}: {result['task']} ({result['trials']} trials/cell)", fontsize=9
    )
    fig.tight_layout()
    out = save_figure(fig, path)
    plt.close(fig)
    return out


def write_longctx_outputs(result: Dict[str, Any], out_dir: Path) -> Dict[str, Path]:
    """``longctx.json``, ``longctx.md`` and ``longctx.png`` (the heatmap) in ``out_dir``."""
    out_dir = Path(out_dir)
    paths = {
        "md": write_atomic(out_dir / "longctx.md", markdown(result)),
        "png": plot_heatmap(result, out_dir / "longctx.png"),
    }
    paths["json"] = write_json(out_dir / "longctx.json", result)
    return paths
