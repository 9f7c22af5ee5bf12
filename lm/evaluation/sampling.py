"""Sampling from a model that carries a state: the prompt is read in one whole-sequence pass,
then each new token is one ``step`` (constant memory per token for the recurrent layers; attention
layers write into a KV cache preallocated to the prompt plus ``max_new_tokens`` positions,
``LanguageModel.reserve_state``, instead of growing it token by token)."""

from __future__ import annotations

from typing import Callable, Iterator, List, Optional, Tuple

import torch

from lm.models.lm import LanguageModel


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature, then top-k, then nucleus (top-p) filtering. logits: [B, V]."""
    logits = logits.float() / max(temperature, 1e-6)
    if top_k and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, -1)
        remove = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix with mass >= top_p
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


@torch.no_grad()
def prefill(model: LanguageModel, tokens: torch.Tensor, chunk: Optional[int] = None, state=None):
    """Read prompts tokens [B, T] (in pieces of ``chunk`` tokens when set, carrying the state) and
    return the next-token logits [B, V] of the last position and the state.

    Only the last position goes through the LM head, so reading a long prompt in pieces holds
    one piece's activations at a time (constant memory for the recurrent families).
    """
    T = tokens.shape[1]
    if T == 0:
        raise ValueError("prefill needs at least one token per prompt")
    size = int(chunk) if chunk and chunk > 0 else T
    h = None
    for start in range(0, T, size):
        h, state = model.hidden_states(tokens[:, start : start + size], state, return_state=True)
    return model.logits(h[:, -1]), state


@torch.no_grad()
def generate_tokens(
    model: LanguageModel,
    prompts: List[List[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: Optional[int] = None,
    stop_token: Optional[int] = None,
    prefill_chunk: Optional[int] = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every sequence [B] at each step (streaming).

    Prompts of different lengths are read one by one (each its own state, in pieces of
    ``prefill_chunk`` tokens when set), then decoded together. Temperature 0 means greedy
    decoding. A sequence that produced ``stop_token`` keeps emitting it.
    """
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    if seed is not None:
        generator.manual_seed(seed)
    states, last_logits = [], []
    for prompt in prompts:
        tokens = torch.tensor([prompt], dtype=torch.long, device=device)
        logits, state = prefill(model, tokens, prefill_chunk)
        states.append(state)
        last_logits.append(logits)
    state = merge_states(states)
    reserve = getattr(model, "reserve_state", None)
    if reserve is not None:  # attention layers: room for every new token up front (no torch.cat per step)
        state = reserve(state, max(len(p) for p in prompts) + max_new_tokens)
    logits = torch.cat(last_logits, 0)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        if temperature <= 0:
            token = logits.argmax(-1)
        else:
            probs = torch.softmax(filter_logits(logits, temperature, top_k, top_p), -1)
            token = torch.multinomial(probs, 1, generator=generator)[:, 0]
        if stop_token is not None:
            token = torch.where(done, torch.full_like(token, stop_token), token)
            done |= token == stop_token
        yield token
        if stop_token is not None and bool(done.all()):
            return
        logits, state = model.step(token, state)


def merge_states(states: list):
    """Concatenate per-sequence model states along the batch dimension.

    KV caches of different lengths (Transformer prompts of different lengths) cannot be batched:
    then an error names the problem.
    """
    if len(states) == 1:
        return states[0]

    def cat(items):
        first = items[0]
        if first is None:
            return None
        if isinstance(first, dict):
            return {k: cat([it[k] for it in items]) for k in first}
        if isinstance(first, (tuple, list)):
            return type(first)(cat(list(group)) for group in zip(*items))
        if isinstance(first, torch.Tensor):
            shapes = {tuple(t.shape[1:]) for t in items}
            if len(shapes) > 1:
                raise ValueError("prompts of different lengths cannot share a KV cache; generate them separately")
            return torch.cat(items, 0)
        return first

    return cat(states)


def sample_text(
    model: LanguageModel,
    encode: Callable[[str], List[int]],
    decode: Callable[[List[int]], str],
    prompt: str,
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int = 50,
    seed: int = 0,
    stop_token: Optional[int] = None,
) -> str:
    """The prompt followed by the sampled continuation, as text."""
    return sample_with_reason(model, encode, decode, prompt, max_new_tokens, temperature, top_k, seed, stop_token)[0]


def sample_with_reason(
    model: LanguageModel,
    encode: Callable[[str], List[int]],
    decode: Callable[[List[int]], str],
    prompt: str,
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int = 50,
    seed: int = 0,
    stop_token: Optional[int] = None,
) -> Tuple[str, str]:
    """(prompt + sampled continuation, why sampling stopped: the end-of-document token or the length limit)."""
    ids = encode(prompt) or ([stop_token] if stop_token is not None else [0])
    out: List[int] = []
    reason = f"length limit ({max_new_tokens} tokens)"
    for token in generate_tokens(model, [ids], max_new_tokens, temperature, top_k, 1.0, seed, stop_token):
        if stop_token is not None and int(token[0]) == stop_token:
            reason = f"end-of-document token after {len(out)} tokens"
            break
        out.append(int(token[0]))
    return prompt + decode(out), reason
