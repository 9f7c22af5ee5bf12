"""``lm generate``: continue one or several text prompts, streaming the new text.

Every prompt is a new document: it starts after the end-of-document id, and generation of a
sequence stops at the end-of-document id or after ``max_new_tokens``. Prompts are read in pieces
(constant memory for the recurrent families), then all sequences of a batch decode together, one
``step`` per token: recurrent layers carry a fixed-size state, attention layers (the Transformer's,
a hybrid's) a KV cache preallocated to the prompt plus ``max_new_tokens`` positions and filled one
position per token. Batches: the recurrent families take any prompts together; a model with
attention layers batches prompts of equal token length only (a KV cache cannot be padded), others
run one after another, and refuses a prompt whose length plus ``max_new_tokens`` exceeds its
``max_seq_len``.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

from lm.errors import LMError
from lm.evaluation.common import Checkpoint
from lm.evaluation.sampling import generate_tokens

PREFILL_CHUNK = 1024


@dataclass
class Completion:
    prompt: str
    prompt_tokens: int
    tokens: List[int] = field(default_factory=list)
    text: str = ""
    stop: str = "max_new_tokens"  # max_new_tokens | end_of_document | stop_string


def encode_prompts(ckpt: Checkpoint, tokenizer, prompts: Sequence[str], max_new_tokens: int) -> List[List[int]]:
    """Token ids ``[eod] + encode(prompt)`` per prompt; the length limit of a model with attention
    layers is checked."""
    eod = ckpt.eod_id(tokenizer)
    ids = [[eod] + tokenizer.encode(p).ids for p in prompts]
    if not ckpt.recurrent:
        for i, p in enumerate(ids):
            if len(p) + max_new_tokens > ckpt.max_seq_len:
                raise LMError(
                    f"--prompt {i + 1}: {len(p)} tokens (with the start-of-document token) plus "
                    f"--max-new-tokens {max_new_tokens} = {len(p) + max_new_tokens} exceeds the "
                    f"max_seq_len ({ckpt.max_seq_len}) of {ckpt.name} (its attention layers' positions); shorten the "
                    "prompt or generate fewer tokens"
                )
    return ids


def batches(ckpt: Checkpoint, prompt_ids: List[List[int]], batch_size: int) -> List[List[int]]:
    """Indices of the prompts that decode together (see the module docstring)."""
    if batch_size <= 0:
        raise LMError(f"--batch-size: must be > 0, got {batch_size}")
    if ckpt.recurrent:
        order = list(range(len(prompt_ids)))
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    by_len: Dict[int, List[int]] = {}
    for i, p in enumerate(prompt_ids):
        by_len.setdefault(len(p), []).append(i)
    out = []
    for group in by_len.values():
        out += [group[i : i + batch_size] for i in range(0, len(group), batch_size)]
    return sorted(out, key=lambda g: g[0])


def decode_batch(
    model,
    prompt_ids: List[List[int]],
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    seed: Optional[int],
    eod_id: Optional[int],
    on_token: Optional[Callable[[int, int], None]] = None,
    should_stop: Optional[Callable[[int, List[int]], bool]] = None,
) -> List[Completion]:
    """Decode one batch. ``on_token(row, id)`` sees every new token; ``should_stop(row, ids)``
    may end a row early (a stop string)."""
    out = [Completion("", len(p)) for p in prompt_ids]
    done = [False] * len(prompt_ids)
    if max_new_tokens <= 0:
        return out
    for step in generate_tokens(
        model, prompt_ids, max_new_tokens, temperature, top_k, top_p, seed, prefill_chunk=PREFILL_CHUNK
    ):
        for r, t in enumerate(step.tolist()):
            if done[r]:
                continue
            if eod_id is not None and t == eod_id:
                done[r], out[r].stop = True, "end_of_document"
                continue
            out[r].tokens.append(t)
            if on_token is not None:
                on_token(r, t)
            if should_stop is not None and should_stop(r, out[r].tokens):
                done[r], out[r].stop = True, "stop_string"
        if all(done):
            break
    return out


class StreamPrinter:
    """Prints new text as it is decoded: inline for one sequence, line by line as ``[k] line`` for
    several. Decoding waits while the text ends in an incomplete UTF-8 character."""

    def __init__(self, tokenizer, labels: List[str], write=None):
        self.tokenizer = tokenizer
        self.labels = labels
        self.write = write or (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
        self.ids: Dict[int, List[int]] = {i: [] for i in range(len(labels))}
        self.shown: Dict[int, int] = {i: 0 for i in range(len(labels))}
        self.pending: Dict[int, str] = {i: "" for i in range(len(labels))}

    def start(self, row: int, prompt: str) -> None:
        if len(self.labels) == 1:
            self.write(prompt)
        else:
            self.pending[row] = prompt

    def token(self, row: int, token: int) -> None:
        self.ids[row].append(token)
        text = self.tokenizer.decode(self.ids[row])
        if text.endswith("\ufffd"):
            return
        new, self.shown[row] = text[self.shown[row] :], len(text)
        if len(self.labels) == 1:
            self.write(new)
            return
        self.pending[row] += new
        *lines, self.pending[row] = self.pending[row].split("\n")
        for line in lines:
            self.write(f"{self.labels[row]} {line}\n")

    def finish(self, row: int) -> None:
        text = self.tokenizer.decode(self.ids[row])
        rest = text[self.shown[row] :]
        if len(self.labels) == 1:
            self.write(rest + "\n")
            return
        tail = self.pending[row] + rest
        for line in tail.split("\n"):
            if line:
                self.write(f"{self.labels[row]} {line}\n")
        self.write(f"{self.labels[row]} <end>\n")


def generate(
    ckpt: Checkpoint,
    prompts: Sequence[str],
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_k: int = 50,
    top_p: float = 1.0,
    seed: Optional[int] = 0,
    batch_size: int = 8,
    printer: Optional[StreamPrinter] = None,
) -> Dict:
    """Generate for every prompt; returns completions and timing (tokens/s excludes prompt reading)."""
    if not prompts:
        raise LMError("--prompt: give at least one prompt")
    if max_new_tokens < 0:
        raise LMError(f"--max-new-tokens: must be >= 0, got {max_new_tokens}")
    if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise LMError(
            f"--temperature >= 0, --top-k >= 0 and 0 < --top-p <= 1 expected; got {temperature}, {top_k}, {top_p}"
        )
    tokenizer = ckpt.tokenizer()
    eod = ckpt.eod_id(tokenizer)
    ids = encode_prompts(ckpt, tokenizer, prompts, max_new_tokens)
    completions: List[Optional[Completion]] = [None] * len(prompts)
    t0 = time.perf_counter()
    for k, group in enumerate(batches(ckpt, ids, batch_size)):
        if printer is not None:
            for r, i in enumerate(group):
                printer.start(i, prompts[i])
        on_token = (lambda r, t, g=group: printer.token(g[r], t)) if printer is not None else None
        out = decode_batch(
            ckpt.model,
            [ids[i] for i in group],
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            None if seed is None else seed + k,
            eod,
            on_token,
        )
        for r, i in enumerate(group):
            out[r].prompt = prompts[i]
            out[r].text = tokenizer.decode(out[r].tokens)
            completions[i] = out[r]
            if printer is not None:
                printer.finish(i)
    wall = time.perf_counter() - t0
    new = sum(len(c.tokens) for c in completions)
    return {
        "model": ckpt.name,
        "checkpoint": ckpt.path,
        "step": ckpt.loaded.step,
        "settings": {
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "top_k": top_k,
            "top_p": top_p,
            "seed": seed,
        },
        "completions": [c.__dict__ for c in completions],
        "new_tokens": new,
        "wall_s": wall,
        "tokens_per_s": new / max(wall, 1e-9),
    }


@torch.no_grad()
def greedy_until(
    ckpt: Checkpoint,
    tokenizer,
    contexts: List[List[int]],
    max_new_tokens: int,
    until: List[str],
    batch_size: int,
    temperature: float = 0.0,
    seed: int = 0,
) -> List[str]:
    """Continuations of token contexts, cut at the first stop string (lm-eval ``generate_until``)."""
    eod = ckpt.eod_id(tokenizer)

    def cut(text: str) -> str:
        ends = [text.find(u) for u in until if u and u in text]
        return text[: min(ends)] if ends else text

    def should_stop(row: int, tokens: List[int]) -> bool:
        text = tokenizer.decode(tokens)
        return any(u in text for u in until if u)

    results: List[Optional[str]] = [None] * len(contexts)
    for group in batches(ckpt, contexts, batch_size):
        out = decode_batch(
            ckpt.model,
            [contexts[i] for i in group],
            max_new_tokens,
            temperature,
            0,
            1.0,
            seed,
            eod,
            should_stop=should_stop,
        )
        for r, i in enumerate(group):
            results[i] = cut(tokenizer.decode(out[r].tokens))
    return results
