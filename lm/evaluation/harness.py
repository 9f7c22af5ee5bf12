"""lm-evaluation-harness adapter: :class:`RecurrentLM`, registered as model ``rnn-lm``.

Requires the optional extra ``eval`` (``pip install -e '.[eval]'``); this module imports
``lm_eval`` at the top, so import it only when the harness is wanted (``lm eval harness`` does).

Every request is a new document, read after the end-of-document id (``prefix_token_id``).

* ``loglikelihood``: requests are grouped by their context tokens; each distinct context is read
  once (contexts of equal length in one batch) and its state is branched (``select_state``) to
  every continuation of that context, which are then scored in batches from the branched states.
  Multiple-choice questions thus read the question once, whatever the number of choices. The
  same holds for the Transformer (its state is the KV cache), whose context is cut from the left
  to fit ``max_seq_len``.
* ``loglikelihood_rolling``: :func:`lm.evaluation.ppl.score_documents` (state carried across the
  whole text for the recurrent families; sliding windows with stride ``max_length / 2`` for the
  Transformer), the summed log-likelihood per text.
* ``generate_until``: :func:`lm.evaluation.generate.greedy_until`, batched as ``lm generate``.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from lm.errors import LMError
from lm.evaluation.common import Checkpoint, open_checkpoint, select_state

MODEL_NAME = "rnn-lm"


@register_model(MODEL_NAME)
class RecurrentLM(LM):
    """Any ``lm`` checkpoint (export, checkpoint or run directory) as an lm-eval model.

    Args (also as ``--model_args checkpoint=...,batch_size=...``): checkpoint (or pretrained),
    device, batch_size, max_length (default: unbounded for recurrent families, ``max_seq_len``
    for the Transformer), max_gen_toks.
    """

    def __init__(
        self,
        checkpoint: Optional[str] = None,
        pretrained: Optional[str] = None,
        device: str = "cpu",
        batch_size: Any = 8,
        max_length: Optional[int] = None,
        max_gen_toks: int = 256,
        **_: Any,
    ):
        super().__init__()
        path = checkpoint or pretrained
        if not path:
            raise LMError("rnn-lm: pass checkpoint=<export, checkpoint or run directory>")
        self.ckpt: Checkpoint = path if isinstance(path, Checkpoint) else open_checkpoint(str(path), device or "cpu")
        self.tokenizer = self.ckpt.tokenizer()
        self.eod = self.ckpt.eod_id(self.tokenizer)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() and int(batch_size) > 0 else 8
        self.max_gen_toks = int(max_gen_toks)
        limit = self.ckpt.max_seq_len if not self.ckpt.recurrent else None
        self.max_length = int(max_length) if max_length else limit
        if limit is not None and self.max_length > limit:
            raise LMError(f"rnn-lm: max_length {self.max_length} exceeds the Transformer's max_seq_len ({limit})")
        self._device = next(self.ckpt.model.parameters()).device
        self.stats = {"contexts_read": 0, "continuations": 0}

    # --------------------------------------------------------------------------- tokenization
    @property
    def eot_token_id(self) -> int:
        return self.eod

    @property
    def prefix_token_id(self) -> int:
        return self.eod

    @property
    def tokenizer_name(self) -> str:
        return f"rnn-lm:{self.ckpt.loaded.tokenizer_sha256}"

    def tok_encode(self, text: str) -> List[int]:
        return self.tokenizer.encode(text).ids

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def encode_pair(self, context: str, continuation: str) -> Tuple[List[int], List[int]]:
        """Context ids (starting with the end-of-document id) and continuation ids. Trailing spaces
        of the context move to the continuation; both are cut from one encoding of the whole."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        if not context:
            return [self.eod], self.tok_encode(continuation)
        whole = self.tok_encode(context + continuation)
        n = len(self.tok_encode(context))
        return [self.eod] + whole[:n], whole[n:]

    # ----------------------------------------------------------------------------- scoring
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> List[Tuple[float, bool]]:
        pairs = [self.encode_pair(*req.args) for req in requests]
        results = self.score_pairs(pairs)
        for req, res in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", req.args, res)
        return results

    def _fit(self, ctx: List[int], cont: List[int]) -> List[int]:
        """The context cut from the left so that context + continuation fit ``max_length``."""
        if self.max_length is None or len(ctx) + len(cont) <= self.max_length:
            return ctx
        room = self.max_length - len(cont)
        if room < 1:
            raise LMError(f"rnn-lm: a continuation of {len(cont)} tokens does not fit max_length {self.max_length}")
        return ctx[-room:]

    @torch.no_grad()
    def score_pairs(self, pairs: List[Tuple[List[int], List[int]]]) -> List[Tuple[float, bool]]:
        """(log p(continuation | context), greedy) per pair, reading each distinct context once."""
        model = self.ckpt.model
        fitted = [(tuple(self._fit(c, x)), x) for c, x in pairs]
        groups: Dict[Tuple[int, ...], List[int]] = {}
        for i, (ctx, _) in enumerate(fitted):
            groups.setdefault(ctx, []).append(i)
        contexts = sorted(groups, key=len, reverse=True)
        results: List[Optional[Tuple[float, bool]]] = [None] * len(pairs)
        k = 0
        while k < len(contexts):
            batch = [contexts[k]]
            while (
                k + len(batch) < len(contexts)
                and len(batch) < self.batch_size
                and len(contexts[k + len(batch)]) == len(batch[0])
            ):
                batch.append(contexts[k + len(batch)])
            k += len(batch)
            tokens = torch.tensor(batch, dtype=torch.long, device=self.device)
            h, state = model.hidden_states(tokens, return_state=True)
            first = F.log_softmax(model.logits(h[:, -1]).float(), -1)  # [G, V]
            self.stats["contexts_read"] += len(batch)
            rows = [(g, i) for g, ctx in enumerate(batch) for i in groups[ctx]]
            for s in range(0, len(rows), self.batch_size):
                chunk = rows[s : s + self.batch_size]
                self._score_continuations(chunk, fitted, first, state, results)
        return results  # type: ignore[return-value]

    def _score_continuations(self, chunk, fitted, first, state, results) -> None:
        model = self.ckpt.model
        self.stats["continuations"] += len(chunk)
        conts = [fitted[i][1] for _, i in chunk]
        width = max(len(c) for c in conts) - 1
        rest = None
        if width > 0:
            inputs = torch.full((len(chunk), width), self.eod, dtype=torch.long, device=self.device)
            for r, c in enumerate(conts):
                if len(c) > 1:
                    inputs[r, : len(c) - 1] = torch.tensor(c[:-1], dtype=torch.long)
            branch = select_state(state, torch.tensor([g for g, _ in chunk], dtype=torch.long))
            logits, _ = model(inputs, branch, return_state=True)
            rest = F.log_softmax(logits.float(), -1)
        for r, ((g, i), cont) in enumerate(zip(chunk, conts)):
            if not cont:
                results[i] = (0.0, True)
                continue
            logp = [first[g]] + ([rest[r, j] for j in range(len(cont) - 1)] if rest is not None else [])
            total = sum(float(lp[t]) for lp, t in zip(logp, cont))
            greedy = all(int(lp.argmax()) == t for lp, t in zip(logp, cont))
            results[i] = (total, greedy)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        from lm.evaluation.ppl import score_documents

        docs = [np.array(self.tok_encode(req.args[0]), dtype=np.int64) for req in requests]
        window = self.max_length if not self.ckpt.recurrent else None
        stats, _ = score_documents(self.ckpt, docs, self.eod, seq_len=window, batch_size=self.batch_size)
        results = [-float(x) for x in stats.doc_loss]
        for req, res in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, res)
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        from lm.evaluation.generate import greedy_until

        by_kwargs: Dict[str, List[int]] = {}
        for i, req in enumerate(requests):
            by_kwargs.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        results: List[Optional[str]] = [None] * len(requests)
        for key, idx in by_kwargs.items():
            kwargs = dict(requests[idx[0]].args[1])
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            contexts = []
            for i in idx:
                ctx = [self.eod] + self.tok_encode(requests[i].args[0])
                if self.max_length is not None:
                    ctx = ctx[-max(1, self.max_length - max_new) :]
                contexts.append(ctx)
            outs = greedy_until(self.ckpt, self.tokenizer, contexts, max_new, until, self.batch_size, temperature)
            for i, text in zip(idx, outs):
                results[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return results  # type: ignore[return-value]


def task_manager_for(tasks: Sequence[str], include_path: Optional[str]):
    """A TaskManager that knows ``tasks``: only the ``include_path`` YAMLs when they define every
    requested task (indexing lm-eval's thousands of built-in tasks takes long), else everything."""
    from lm_eval.tasks import TaskManager

    if include_path:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(t in set(local.all_tasks) for t in tasks):
            return local
        return TaskManager(include_path=include_path)
    return TaskManager()


def list_task_names(include_path: Optional[str] = None) -> List[str]:
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    return sorted(manager.all_tasks)


def run_harness(
    checkpoint: str,
    tasks: Sequence[str],
    include_path: Optional[str] = None,
    limit: Optional[float] = None,
    num_fewshot: Optional[int] = None,
    batch_size: int = 8,
    device: str = "cpu",
    bootstrap_iters: int = 0,
) -> Dict[str, Any]:
    """``lm_eval.simple_evaluate`` with :class:`RecurrentLM` on ``tasks`` (unknown names: error
    listing the closest known ones). Returns ``summary`` (JSON-able), ``raw`` and ``out_dir``."""
    import difflib

    from lm_eval import simple_evaluate

    model = RecurrentLM(checkpoint, device=device, batch_size=batch_size)
    task_manager = task_manager_for(tasks, include_path)
    known = set(task_manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        close = sorted({c for t in unknown for c in difflib.get_close_matches(t, known, n=5, cutoff=0.6)})
        raise LMError(
            f"--tasks: unknown lm-eval task(s) {', '.join(unknown)}"
            + (f"; closest known: {', '.join(close)}" if close else "")
            + " (`lm eval harness <checkpoint> --list-tasks [--include-path DIR]` lists all)"
        )
    out = simple_evaluate(
        model=model,
        tasks=list(tasks),
        task_manager=task_manager,
        limit=limit,
        num_fewshot=num_fewshot,
        bootstrap_iters=bootstrap_iters,
        log_samples=False,
    )
    summary = {
        "checkpoint": checkpoint,
        "step": model.ckpt.loaded.step,
        "model": model.ckpt.name,
        "tasks": list(tasks),
        "limit": limit,
        "num_fewshot": num_fewshot,
        "results": out["results"],
        "versions": out.get("versions"),
        "n_samples": out.get("n-samples"),
        "adapter_stats": model.stats,
    }
    return {"summary": summary, "raw": out, "out_dir": model.ckpt.default_out_dir("harness")}
