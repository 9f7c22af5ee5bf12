"""``lm eval icl``: the synthetic in-context-learning suite.

Suite tasks (names accepted by ``--tasks``)::

    associative_recall  induction  mqar  icl_regression  lsa_teacher   (data/tasks generators)
    parity aa_star abab_star anbn anbncn shuffle2 dyck1 reset_dyck1 (formal languages)
    lm_icl_score                                                    (a language model on a corpus)

How each is run depends on the checkpoint:

* a checkpoint trained on a task (``data.source.kind: task``) is evaluated on that task (its
  language, for ``formal``) across the task's ``eval_settings()`` sweep (or ``--sweep``), on
  fresh examples of the test stream. A sweep value ``lo-hi`` draws that parameter uniformly in
  ``[lo, hi]`` per example (length buckets).
* a language-model checkpoint runs the token tasks ``associative_recall`` and ``induction``
  remapped onto its vocabulary: task token ``t >= 1`` becomes a fixed, seeded choice of distinct
  ordinary (non-special) tokenizer ids, and the sequence starts with the end-of-document id (the
  position every training document starts from); predictions are the argmax over the whole
  vocabulary. ``lm_icl_score`` runs on a data directory: the mean loss at late context
  positions minus the mean loss at early ones (Olsson et al., 2022: positions 500 and 50, each a
  window of +-10%); negative means the model uses its context.

Metrics: ``classes`` accuracy per scored position (``acc``) and per sequence (``seq_acc``, every
scored position right); ``multilabel`` the same, a position right when every label is (a string is
accepted when ``seq_acc``); ``vectors`` the loss (squared error summed over output dims), for
``icl_regression`` with the loss of one gradient-descent step from W = 0 (best learning rate).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from lm.errors import LMError, did_you_mean
from lm.evaluation.common import Checkpoint, write_atomic, write_json

FORMAL_LANGUAGES = ["parity", "aa_star", "abab_star", "anbn", "anbncn", "shuffle2", "dyck1", "reset_dyck1"]
TOKEN_TASKS = ["associative_recall", "induction"]
SUITE = TOKEN_TASKS + ["mqar", "icl_regression", "lsa_teacher"] + FORMAL_LANGUAGES + ["lm_icl_score"]
#: per-example parameter draws have their own generator stream (examples use TEST_STREAM)
DRAW_STREAM = 3

SweepValue = Union[int, Tuple[int, int]]


# ------------------------------------------------------------------------------ task names


def suite_name(config: Dict[str, Any]) -> Optional[str]:
    """The suite name of the task a checkpoint was trained on (its language for ``formal``)."""
    data = config.get("data", {})
    if data.get("source", {}).get("kind") != "task":
        return None
    task = data.get("task", {})
    if task.get("name") == "formal":
        return str(task.get("params", {}).get("language", "parity"))
    return str(task.get("name"))


def resolve_tasks(ckpt: Checkpoint, names: Sequence[str]) -> List[str]:
    """Check requested names (unknown ones list the known); default: what the checkpoint supports."""
    trained = suite_name(ckpt.config)
    for name in names:
        if name not in SUITE and name != "formal":
            raise LMError(f"--tasks: unknown task '{name}'{did_you_mean(name, SUITE)}; known: {', '.join(SUITE)}")
    if trained is not None:
        out = []
        for name in names or [trained]:
            if name == "formal" and trained in FORMAL_LANGUAGES:
                name = trained
            if name != trained:
                raise LMError(
                    f"--tasks: {ckpt.path} was trained on task '{trained}', so it can only be evaluated "
                    f"on '{trained}' (got '{name}'); language-model checkpoints run "
                    f"{', '.join(TOKEN_TASKS)} and lm_icl_score"
                )
            out.append(name)
        return list(dict.fromkeys(out))
    names = list(names) or TOKEN_TASKS + ["lm_icl_score"]
    for name in names:
        if name not in TOKEN_TASKS + ["lm_icl_score"]:
            raise LMError(
                f"--tasks: '{name}' needs a checkpoint trained on it (data.source.kind: task); a language "
                f"model runs {', '.join(TOKEN_TASKS)} (remapped onto its vocabulary) and lm_icl_score"
            )
    return list(dict.fromkeys(names))


def parse_sweeps(items: Sequence[str]) -> Dict[str, List[SweepValue]]:
    """``["length=10,20-40"]`` -> ``{"length": [10, (20, 40)]}``."""
    sweeps: Dict[str, List[SweepValue]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key.strip() or not values.strip():
            raise LMError(f"--sweep: expected key=v1,v2,... (a value may be a range lo-hi), got {item!r}")
        parsed: List[SweepValue] = []
        for v in values.split(","):
            v = v.strip()
            try:
                if "-" in v:
                    lo, hi = (int(x) for x in v.split("-", 1))
                    if lo > hi or lo <= 0:
                        raise ValueError
                    parsed.append((lo, hi))
                else:
                    n = int(v)
                    if n <= 0:
                        raise ValueError
                    parsed.append(n)
            except ValueError:
                raise LMError(f"--sweep {key}: values must be positive integers or ranges lo-hi, got {v!r}") from None
        sweeps[key.strip()] = parsed
    return sweeps


def value_label(value: SweepValue) -> str:
    return f"{value[0]}-{value[1]}" if isinstance(value, tuple) else str(value)


# ------------------------------------------------------------------------------- examples


class TokenRemap:
    """Task token ids -> a language model's vocabulary, and a leading end-of-document token.

    Task id 0 (padding, never scored) maps to the end-of-document id; ids ``1 .. V-1`` to distinct
    ordinary tokenizer ids drawn with ``seed``.
    """

    def __init__(self, task_vocab: int, tokenizer, eod_id: int, seed: int):
        special = set(tokenizer.get_added_tokens_decoder().keys())
        ordinary = np.array([i for i in range(tokenizer.get_vocab_size()) if i not in special], dtype=np.int64)
        if len(ordinary) < task_vocab - 1:
            raise LMError(
                f"the task needs {task_vocab - 1} distinct tokens but the tokenizer has only "
                f"{len(ordinary)} ordinary ones"
            )
        rng = np.random.default_rng([int(seed), 7])
        self.table = np.concatenate([[eod_id], rng.choice(ordinary, size=task_vocab - 1, replace=False)])
        self.eod_id = int(eod_id)

    def __call__(self, example: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        x, y, m = example["inputs"], example["targets"], example["mask"]
        return {
            "inputs": np.concatenate([[self.eod_id], self.table[x]]),
            "targets": np.concatenate([self.table[x[:1]], self.table[y]]),
            "mask": np.concatenate([[False], m]),
        }


def make_examples(
    task, seed: int, n: int, key: Optional[str], value: Optional[SweepValue], remap: Optional[TokenRemap] = None
) -> List[Dict[str, np.ndarray]]:
    """``n`` test-stream examples with ``key`` set to ``value`` (a range: drawn per example)."""
    from data.tasks import rng_for
    from data.tasks.datamodule import TEST_STREAM

    if key is not None and key not in example_parameters(task):
        raise LMError(f"--sweep: task '{task.name}' has no per-example parameter '{key}'")
    out = []
    for i in range(n):
        overrides = {}
        if key is not None:
            if isinstance(value, tuple):
                overrides[key] = int(rng_for(seed, i, DRAW_STREAM).integers(value[0], value[1] + 1))
            else:
                overrides[key] = int(value)
        try:
            ex = task.example(rng_for(seed, i, TEST_STREAM), **overrides)
        except ValueError as e:
            raise LMError(f"--sweep {key}={value_label(value)}: {e}") from None
        ex = remap(ex) if remap is not None else ex
        ex["index"] = i
        out.append(ex)
    return out


@torch.no_grad()
def score_examples(
    model, examples: List[Dict[str, np.ndarray]], output: str, batch_size: int, pad_id: int = 0
) -> Dict[str, Any]:
    """Loss and accuracies of ``model`` on ``examples`` (see the module docstring)."""
    from data.tasks.datamodule import collate_examples
    from lm.training.losses import evaluate

    batches = (collate_examples(examples[b : b + batch_size], pad_id) for b in range(0, len(examples), batch_size))
    sums = evaluate(model, batches, output)
    row: Dict[str, Any] = {"examples": len(examples), "scored": sums.count, "loss": sums.loss_sum / max(sums.count, 1)}
    if output != "vectors":
        row["acc"] = sums.correct / max(sums.count, 1)
        row["seq_acc"] = sums.seq_correct / max(sums.sequences, 1)
    return row


def example_parameters(task) -> List[str]:
    """The per-example parameters of a task (what ``--sweep`` may set)."""
    import inspect

    return [p for p in inspect.signature(task.example).parameters if p != "rng"]


def _sweeps(task, overrides: Dict[str, List[SweepValue]]) -> Dict[Optional[str], List[Optional[SweepValue]]]:
    """The task's own sweep, with ``--sweep`` keys the task takes replacing or adding sweeps."""
    sweeps: Dict[Optional[str], List[Optional[SweepValue]]] = dict(task.eval_settings())
    accepted = example_parameters(task)
    sweeps.update({k: v for k, v in overrides.items() if k in accepted})
    return sweeps or {None: [None]}


def evaluate_task(
    ckpt: Checkpoint,
    name: str,
    sweeps: Dict[str, List[SweepValue]],
    n_examples: int,
    batch_size: int,
    seed: int,
    progress: bool = False,
) -> Dict[str, Any]:
    """One suite task on the checkpoint: trained on it, or remapped onto an LM's vocabulary
    (``progress``: a bar over the sweep's points on stderr)."""
    import sys

    from tqdm import tqdm

    from data.tasks import one_step_gd_loss

    task = ckpt.task(name)
    if ckpt.task_trained:
        remap, kind, output = None, "trained", task.spec.output
    else:
        tokenizer = ckpt.tokenizer()
        remap = TokenRemap(task.spec.vocab_size, tokenizer, ckpt.eod_id(tokenizer), seed)
        kind, output = "remapped onto the LM vocabulary", "classes"
    rows = []
    points = [(key, value) for key, values in _sweeps(task, sweeps).items() for value in values]
    for key, value in tqdm(points, desc=name, unit="point", file=sys.stderr, disable=not progress, leave=False):
        examples = make_examples(task, seed, n_examples, key, value, remap)
        row = {
            "key": key or "default",
            "value": value_label(value) if value is not None else "default",
            **score_examples(ckpt.model, examples, output, batch_size, task.spec.pad_id if remap is None else 0),
        }
        if task.name == "icl_regression" and key == "n_pairs" and not isinstance(value, tuple):
            row["baseline_loss"], row["baseline_lr"] = one_step_gd_loss(
                task, n_examples=max(n_examples, 1024), seed=seed, n_pairs=int(value)
            )
        elif task.name == "icl_regression" and key is None:
            row["baseline_loss"], row["baseline_lr"] = one_step_gd_loss(task, max(n_examples, 1024), seed)
        rows.append(row)
    out = {"task": name, "kind": kind, "output": output, "params": _params(task), "rows": rows}
    chance = chance_accuracy(task.spec)
    if chance is not None:
        out["chance_acc"] = chance
    return out


def chance_accuracy(spec) -> Optional[float]:
    """Per-position accuracy of guessing uniformly: 1 / classes (classes), 0.5^labels (multilabel,
    every label right); None for vector outputs."""
    if spec.output == "classes" and spec.vocab_size:
        return 1.0 / int(spec.vocab_size)
    if spec.output == "multilabel" and spec.output_dim:
        return 0.5 ** int(spec.output_dim)
    return None


def _check_sweep_keys(ckpt: Checkpoint, names: Sequence[str], sweeps: Dict[str, List[SweepValue]]) -> None:
    """Every ``--sweep`` key must be a per-example parameter of at least one requested task."""
    if not sweeps:
        return
    accepted: Dict[str, List[str]] = {}
    for name in names:
        if name == "lm_icl_score":
            continue
        accepted[name] = example_parameters(ckpt.task(name))
    for key in sweeps:
        if not any(key in params for params in accepted.values()):
            have = "; ".join(f"{n}: {', '.join(p) or '-'}" for n, p in accepted.items()) or "no swept task requested"
            raise LMError(f"--sweep: no requested task has a per-example parameter '{key}' ({have})")


def _params(task) -> Dict[str, Any]:
    import dataclasses

    return {k: v for k, v in dataclasses.asdict(task.options).items()}


# ----------------------------------------------------------------------------- LM ICL score


#: lm_icl_score: fewer documents than this make the score a noisy estimate (a warning in the report)
MIN_ICL_DOCUMENTS = 16


def lm_icl_score(
    ckpt: Checkpoint,
    data_dir: Optional[str],
    split: str,
    early: int,
    late: int,
    max_docs: int,
    batch_size: int,
    progress: bool = False,
) -> Dict[str, Any]:
    """Mean loss at positions ``late +- late/10`` minus at ``early +- early/10`` (documents long
    enough for both), scored with :mod:`lm.evaluation.ppl` (state carried / sliding windows)."""
    from lm.evaluation.ppl import score_documents, shard_documents

    if not 0 < early < late:
        raise LMError(f"--early/--late: need 0 < early < late, got {early}, {late}")
    directory = Path(data_dir) if data_dir else ckpt.data_dir()
    if directory is None:
        raise LMError("lm_icl_score: pass --data <prepared data dir> (the checkpoint's training data is not available)")
    text = shard_documents(directory, split, ckpt.loaded.tokenizer_sha256)
    need = late + max(1, late // 10) + 1
    docs = [np.asarray(d[:need]) for d in text.docs if len(d) >= need][:max_docs]
    if not docs:
        longest = max((len(d) for d in text.docs), default=0)
        raise LMError(
            f"lm_icl_score: no document of {directory} ({split}) has {need} tokens (longest: {longest}); lower --late"
        )
    tokenizer = ckpt.tokenizer()
    stats, method = score_documents(
        ckpt, docs, ckpt.eod_id(tokenizer), batch_size=batch_size, exact_positions=need, progress=progress
    )
    we, wl = max(1, early // 10), max(1, late // 10)
    early_loss = stats.mean_between(max(0, early - we), early + we + 1)
    late_loss = stats.mean_between(late - wl, late + wl + 1)
    row = {
        "key": "positions",
        "value": f"{early}->{late}",
        "documents": len(docs),
        "early_loss": early_loss,
        "late_loss": late_loss,
        "score": late_loss - early_loss,
        "data": str(directory),
        "split": split,
        **method,
    }
    if len(docs) < MIN_ICL_DOCUMENTS:
        row["warning"] = (
            f"only {len(docs)} documents of {directory} ({split}) have {need} tokens (< "
            f"{MIN_ICL_DOCUMENTS}): a noisy score; lower --late or use a split with longer documents"
        )
    return {"task": "lm_icl_score", "kind": "language model on a corpus", "output": "loss", "rows": [row]}


# ---------------------------------------------------------------------------------- suite


def run_suite(
    ckpt: Checkpoint,
    names: Sequence[str],
    sweeps: Dict[str, List[SweepValue]],
    n_examples: int = 256,
    batch_size: int = 32,
    seed: int = 0,
    data_dir: Optional[str] = None,
    split: str = "validation",
    early: int = 50,
    late: int = 500,
    max_docs: int = 64,
    progress: bool = False,
) -> Dict[str, Any]:
    if n_examples <= 0 or batch_size <= 0:
        raise LMError(f"--examples and --batch-size must be > 0, got {n_examples}, {batch_size}")
    tasks = resolve_tasks(ckpt, names)
    _check_sweep_keys(ckpt, tasks, sweeps)
    results = []
    for name in tasks:
        if name == "lm_icl_score":
            results.append(
                lm_icl_score(ckpt, data_dir, split, early, late, max_docs, max(1, batch_size // 8), progress)
            )
        else:
            results.append(evaluate_task(ckpt, name, sweeps, n_examples, batch_size, seed, progress))
    data = ckpt.config.get("data", {})
    return {
        "checkpoint": ckpt.path,
        "step": ckpt.loaded.step,
        "model": ckpt.name,
        "parameters": ckpt.model.num_parameters(),
        "trained_on": {"task": data.get("task", {}).get("name"), "params": data.get("task", {}).get("params")}
        if ckpt.task_trained
        else "language modelling",
        "semantics": suite_semantics(ckpt),
        "examples": n_examples,
        "seed": seed,
        "tasks": results,
    }


def suite_semantics(ckpt: Checkpoint) -> str:
    """What a model sees in the suite, said against how it was trained (``data.packing``)."""
    if ckpt.task_trained:
        return "every example from a fresh state, as in training (one example per sequence)"
    from lm.evaluation.ppl import training_packing

    packing = training_packing(ckpt)
    same = "the same semantics" if packing == "reset" else "unlike training, where documents formed one stream"
    return (
        f"every example and document from a fresh state after the end-of-document id (the per-document "
        f"semantics of data.packing=reset); trained with data.packing={packing}: {same}"
    )


def _fmt(x: Optional[float], digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}"


def markdown(result: Dict[str, Any]) -> str:
    """The suite's results as markdown tables (one for the sweeps, one for the LM ICL score)."""
    gd = any("baseline_loss" in r for t in result["tasks"] for r in t["rows"])
    lines = [
        f"**{result['model']}** step {result['step']} ({result['checkpoint']})",
        "",
        *([f"Semantics: {result['semantics']}.", ""] if result.get("semantics") else []),
        "| task | parameter | value | examples | loss | acc | seq acc |" + (" one-step GD loss |" if gd else ""),
        "|---|---|---|---|---|---|---|" + ("---|" if gd else ""),
    ]
    lm_rows = []
    for t in result["tasks"]:
        for r in t["rows"]:
            if t["task"] == "lm_icl_score":
                lm_rows.append(r)
                continue
            lines.append(
                f"| {t['task']} | {r['key']} | {r['value']} | {r['examples']} | {_fmt(r['loss'], 4)} | "
                f"{_fmt(r.get('acc'))} | {_fmt(r.get('seq_acc'))} |"
                + (f" {_fmt(r.get('baseline_loss'), 4)} |" if gd else "")
            )
    if len(lines) == 4:
        lines = lines[:2]
    if lm_rows:
        lines += [
            "",
            "| LM in-context-learning score | documents | early loss | late loss | late - early |",
            "|---|---|---|---|---|",
        ]
        for r in lm_rows:
            lines.append(
                f"| positions {r['value']} | {r['documents']} | {_fmt(r['early_loss'], 4)} | "
                f"{_fmt(r['late_loss'], 4)} | {_fmt(r['score'], 4)} |"
            )
        lines += [f"\nwarning: {r['warning']}" for r in lm_rows if r.get("warning")]
    return "\n".join(lines) + "\n"


def write_icl_outputs(result: Dict[str, Any], out_dir: Path) -> Dict[str, Path]:
    """``icl.json``, ``icl.md`` and one ``icl-<task>-<parameter>.png`` per swept task."""
    from lm.evaluation.plots import plot_sweep

    out_dir = Path(out_dir)
    paths: Dict[str, Path] = {"md": write_atomic(out_dir / "icl.md", markdown(result))}
    for t in result["tasks"]:
        if t["task"] == "lm_icl_score":
            continue
        by_key: Dict[str, List[Dict[str, Any]]] = {}
        for r in t["rows"]:
            by_key.setdefault(r["key"], []).append(r)
        for key, rows in by_key.items():
            paths[f"png:{t['task']}:{key}"] = plot_sweep(
                t["task"],
                key,
                rows,
                out_dir / f"icl-{t['task']}-{key}.png",
                result["model"],
                chance=t.get("chance_acc"),
            )
    paths["json"] = write_json(out_dir / "icl.json", result)
    return paths


def comparison_table(results: Sequence[Dict[str, Any]], metric: str = "seq_acc", labels: Sequence[str] = ()) -> str:
    """One markdown row per result (``icl.json`` contents), one column per (task, sweep value)."""
    columns: List[Tuple[str, str, str]] = []
    for res in results:
        for t in res["tasks"]:
            for r in t["rows"]:
                col = (t["task"], r["key"], r["value"])
                if t["task"] != "lm_icl_score" and col not in columns:
                    columns.append(col)
    head = "| model | " + " | ".join(f"{task} {key} {value}" for task, key, value in columns) + " |"
    lines = [f"{metric} by task and sweep value", "", head, "|---|" + "---|" * len(columns)]
    for i, res in enumerate(results):
        cells = {(t["task"], r["key"], r["value"]): r.get(metric) for t in res["tasks"] for r in t["rows"]}
        label = labels[i] if i < len(labels) else f"{res['model']} ({res['checkpoint']})"
        lines.append(f"| {label} | " + " | ".join(_fmt(cells.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"
