"""An ``rnn-lm`` model as a Hugging Face causal LM: ``RnnLMForCausalLM`` wraps this project's
:class:`lm.models.lm.LanguageModel` (``self.model``, weights ``model.*``), so its logits are the
project model's, bit for bit.

This file and ``configuration_rnn_lm.py`` travel in every export directory (``auto_map``, loaded
with ``trust_remote_code=True``); they import the model code itself (``lm.models`` and
``kernels``) from the installed ``rnn-lm`` package, so that one implementation serves training
and transformers alike.

Generation: the cache is the model state (:class:`RnnLMCache`): a fixed-size recurrent state per
layer for the recurrent families (constant memory in the context length), the KV cache for the
Transformer. It records how many positions it has read, and ``prepare_inputs_for_generation``
feeds only the positions after those. Padding: a left-padded prompt batch (what generation
uses) is read row by row without its pad positions, so every row's state equals that of its
unpadded prompt; right padding without a cache needs nothing (the model is causal).
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, List, Optional

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from lm.models.lm import LanguageModel
from lm.models.mixer import TokenMixer

from .configuration_rnn_lm import RnnLMConfig

# transformers 5.x renamed the output's and generate()'s cache from past_key_values to cache
CACHE_NAME = "cache" if "cache" in {f.name for f in fields(CausalLMOutputWithPast)} else "past_key_values"


def _map(state: Any, fn) -> Any:
    """``fn`` applied to every tensor of a nested state (dicts, lists, tuples, None)."""
    if isinstance(state, torch.Tensor):
        return fn(state)
    if isinstance(state, dict):
        return {k: _map(v, fn) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_map(v, fn) for v in state)
    return state


def _cat_rows(states: List[Any]) -> Any:
    """One batched state from per-row states ([1, ...] tensors); raises ValueError when the rows'
    tensors differ in shape (KV caches of different lengths) or in kind (a row that read nothing)."""
    first = states[0]
    if any(type(s) is not type(first) for s in states):
        raise ValueError("rows of different kinds")
    if isinstance(first, torch.Tensor):
        if any(s.shape != first.shape for s in states):
            raise ValueError("rows of different shapes")
        return torch.cat(states, dim=0)
    if isinstance(first, dict):
        return {k: _cat_rows([s[k] for s in states]) for k in first}
    if isinstance(first, (list, tuple)):
        return type(first)(_cat_rows(list(items)) for items in zip(*states))
    return first


class RnnLMCache:
    """The model state as generate()'s cache.

    ``state``: the batched model state (one entry per layer, [B, ...] tensors), or None with
    ``rows`` set: one state per row (after a left-padded prompt whose rows' KV caches differ in
    length). ``seen``: positions read so far (pads included), the length of the input read.
    """

    is_compileable = False
    is_croppable = False

    def __init__(self, state: Any = None, seen: int = 0, rows: Optional[List[Any]] = None):
        self.state, self.seen, self.rows = state, seen, rows

    @property
    def is_linear(self) -> List[bool]:
        # generate() then leaves slicing the input to prepare_inputs_for_generation (by ``seen``)
        return [True]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Keep rows ``beam_idx`` (beam search)."""
        if self.rows is not None:
            self.rows = [self.rows[int(i)] for i in beam_idx]
        else:
            self.state = _map(self.state, lambda t: t.index_select(0, beam_idx.to(t.device)))

    def nbytes(self) -> int:
        """Bytes held by the state's tensors."""
        total = 0

        def count(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        _map(self.state if self.rows is None else self.rows, count)
        return total


def _span(row_mask: torch.Tensor) -> tuple:
    """(start, end) of the one run of ones in a row of the attention mask [T]."""
    idx = row_mask.nonzero().flatten()
    if idx.numel() == 0:
        return 0, 0
    start, end = int(idx[0]), int(idx[-1]) + 1
    if end - start != idx.numel():
        raise ValueError("attention_mask: a row's ones must be contiguous (left or right padding only)")
    return start, end


class RnnLMForCausalLM(PreTrainedModel, GenerationMixin):
    """input_ids [B, T] -> logits [B, T, V] of the wrapped :class:`LanguageModel`."""

    config_class = RnnLMConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]
    supports_gradient_checkpointing = False

    def __init__(self, config: RnnLMConfig):
        super().__init__(config)
        self.model = LanguageModel(config.lm_model)
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Only the non-persistent buffers (not in the weights file, e.g. RetNet's fixed decays):
        copied from a fresh instance of their token mixer. The LanguageModel initialises itself,
        and loading replaces every weight."""
        names = sorted(getattr(module, "_non_persistent_buffers_set", ()))
        if not names:
            return
        if not isinstance(module, TokenMixer):
            raise TypeError(
                f"{type(module).__name__}: non-persistent buffers {names} outside a token mixer "
                "cannot be rebuilt on load"
            )
        with torch.device("cpu"):
            fresh = type(module)(module.cfg, module.options, module.layer_idx)
        with torch.no_grad():
            for name in names:
                getattr(module, name).copy_(getattr(fresh, name))

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the cache is the model's own state (RnnLMCache)

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.embed

    def set_input_embeddings(self, value: torch.nn.Module) -> None:
        self.model.embed = value

    def get_output_embeddings(self) -> Optional[torch.nn.Module]:
        return self.model.head  # None when tied to the embedding (inside the model)

    # ------------------------------------------------------------------------------ forward
    def _read(self, input_ids: torch.Tensor, state: Any, use_cache: bool, keep: int):
        """The wrapped model on input_ids [B, T] from ``state``: (logits [B, keep or T, V], state)."""
        h, new_state = self.model.hidden_states(input_ids, state, return_state=use_cache)
        if keep:
            h = h[:, -keep:]
        return self.model.logits(h), new_state

    def _read_rows(
        self, input_ids: torch.Tensor, mask: Optional[torch.Tensor], states: List[Any], use_cache: bool, keep: int
    ):
        """Row by row, each row's masked-in positions only (left/right padding); pad positions get
        zero logits. Returns (logits, per-row states)."""
        B, T = input_ids.shape
        logits, out_states = None, []
        for b in range(B):
            start, end = _span(mask[b]) if mask is not None else (0, T)
            state = states[b]
            if end > start:
                row_logits, state = self._read(input_ids[b : b + 1, start:end], state, True, 0)
                if logits is None:
                    logits = row_logits.new_zeros(B, T, row_logits.shape[-1])
                logits[b, start:end] = row_logits[0]
            out_states.append(state)
        if logits is None:
            logits = torch.zeros(B, T, self.config.vocab_size, device=input_ids.device)
        return (logits[:, -keep:] if keep else logits), out_states

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        cache: Optional[RnnLMCache] = None,
        past_key_values: Optional[RnnLMCache] = None,
        use_cache: Optional[bool] = None,
        labels: Optional[torch.LongTensor] = None,
        logits_to_keep: int = 0,
        inputs_embeds: Optional[torch.Tensor] = None,
        return_dict: Optional[bool] = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """input_ids [B, T] continuing ``cache`` (or a fresh sequence); attention_mask [B, >= T]
        (1 = token, 0 = pad; its last T columns belong to input_ids). Returns logits [B, T, V]
        (the last ``logits_to_keep`` positions if > 0), the loss of ``labels`` (shifted inside,
        -100 ignored) and the cache when ``use_cache``."""
        if inputs_embeds is not None or input_ids is None:
            raise ValueError("RnnLMForCausalLM takes input_ids (inputs_embeds is not supported)")
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        B, T = input_ids.shape
        mask = None if attention_mask is None else attention_mask[:, -T:].to(input_ids.device)
        padded = mask is not None and not bool(mask.all())
        seen = 0 if cache is None else cache.seen
        if padded and seen > 0:
            raise ValueError("attention_mask: padding after the start of a cached sequence is not supported")
        keep = 0 if labels is not None else int(logits_to_keep or 0)
        new_cache = None
        if cache is not None and cache.rows is not None:
            logits, rows = self._read_rows(input_ids, None, cache.rows, True, keep)
            new_cache = RnnLMCache(rows=rows, seen=seen + T)
        elif padded and (use_cache or not _right_padded(mask)):
            logits, rows = self._read_rows(input_ids, mask, [None] * B, True, keep)
            if use_cache:
                try:
                    new_cache = RnnLMCache(state=_cat_rows([self._fresh_state(s) for s in rows]), seen=T)
                except ValueError:
                    new_cache = RnnLMCache(rows=[self._fresh_state(s) for s in rows], seen=T)
        else:
            logits, state = self._read(input_ids, None if cache is None else cache.state, use_cache, keep)
            if use_cache:
                new_cache = RnnLMCache(state=state, seen=seen + T)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_NAME: new_cache})

    def _fresh_state(self, state: Any) -> Any:
        """A row's state; an all-pad row (None) gets the state before any token."""
        if state is not None:
            return state
        p = next(self.parameters())
        return self.model.init_state(1, device=p.device, dtype=p.dtype)

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        cache: Optional[RnnLMCache] = None,
        past_key_values: Optional[RnnLMCache] = None,
        attention_mask: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        use_cache: bool = True,
        **kwargs: Any,
    ) -> dict:
        """The positions the cache has not read yet (all of them at the first call)."""
        if inputs_embeds is not None:
            raise ValueError("RnnLMForCausalLM.generate takes input_ids (inputs_embeds is not supported)")
        cache = cache if cache is not None else past_key_values
        seen = 0 if cache is None else cache.seen
        inputs = {"input_ids": input_ids[:, seen:].contiguous(), CACHE_NAME: cache, "use_cache": use_cache}
        if attention_mask is not None:
            inputs["attention_mask"] = attention_mask
        if "logits_to_keep" in kwargs:
            inputs["logits_to_keep"] = kwargs["logits_to_keep"]
        return inputs


def _right_padded(mask: torch.Tensor) -> bool:
    """Every row of mask [B, T] is ones then zeros (pads only at the end)."""
    return bool((mask[:, 1:] <= mask[:, :-1]).all())
