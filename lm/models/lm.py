"""The one skeleton every family shares::

    h_0 = embed(tokens)                                  (or a linear map of continuous inputs)
    h   = h + mixer_l(norm(h));  h = h + mlp_l(norm(h))  for l = 1..n_layers
    logits = head(norm_f(h))                             (tied to the embedding, or not)

``forward(tokens, state=None) -> (logits, state)`` serves training, evaluation of long documents
in pieces, and generation alike; the state is one entry per layer (for the Transformer a KV cache).

``mixer_l`` is one family for every layer, or, with ``model.layers``, each layer's own
(:mod:`lm.models.hybrid`: a pattern such as one softmax-attention layer in four, or a list); the state
then mixes constant-size recurrent states and KV caches, and :meth:`LanguageModel.reserve_state`
preallocates the caches for generation.

``doc_starts`` (bool [B, T], True at a document's first token; ``data.packing: reset``) makes every
layer reset at document starts: the forward then equals running each document alone (a row's first
segment continues the row's ``state`` unless ``doc_starts[b, 0]``), and the returned state is each
row's state after its last document. One :class:`~lm.models.segments.Segments` per pass is shared by
all blocks. ``doc_starts=None`` is the ``stream`` behaviour, unchanged.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch.utils.checkpoint import checkpoint

from lm.config.schema import ModelConfig
from lm.models.hybrid import LayerSpec, layers_name, resolve_layers
from lm.models.layers import init_linear_, make_mlp, make_norm
from lm.models.mixer import ParamGroup, segments_kwargs, shared_kwargs
from lm.models.registry import get_family, resolve_options, resolve_variant
from lm.models.segments import Segments

ModelState = List[Dict[str, Any]]


def as_model_config(cfg: Any) -> ModelConfig:
    """A :class:`ModelConfig` from a dataclass, DictConfig or dict (validated by the schema)."""
    if isinstance(cfg, ModelConfig):
        return cfg
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    node = OmegaConf.merge(OmegaConf.structured(ModelConfig), cfg)
    return OmegaConf.to_object(node)


class Block(nn.Module):
    """Pre-norm residual block: token mixer then channel mixer. Block 0 of a family whose options
    set ``embed_norm`` (RWKV-7's ln0) first normalises the embedding: ``h_0 = norm0(embed(tokens))``.
    A family whose options set ``block_norm: residual`` (the official SRWM block) puts the token
    mixer's norm on the residual path instead: ``h = norm(h) + mixer(h)``.

    ``layer``: this block's token mixer (:class:`~lm.models.hybrid.LayerSpec`); the mixer is built as
    layer ``layer.index`` of its family's ``layer.count`` (the single-family model: ``layer_idx`` of
    ``n_layers``, with the model's config itself)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, layer: LayerSpec, options: Any = None):
        super().__init__()
        spec = get_family(layer.family)
        options = layer.options() if options is None else options
        self.layer = layer
        embed_norm = layer_idx == 0 and getattr(options, "embed_norm", False)
        self.norm0 = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps) if embed_norm else None
        self.norm1 = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        self.norm_on_residual = getattr(options, "block_norm", "input") == "residual"
        self.mixer = spec.mixer(layer.mixer_config(cfg), options, layer.index)
        self.mlp = make_mlp(cfg.mlp, cfg.d_model, cfg.mlp_ratio)
        self.norm2 = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps) if self.mlp is not None else None
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def forward(
        self,
        x: torch.Tensor,
        state: Optional[Dict[str, Any]] = None,
        return_state: bool = False,
        shared: Optional[Dict[str, Any]] = None,
        segments: Optional[Segments] = None,
    ):
        """``shared``: the pass's cross-layer dict (see ``TokenMixer.uses_shared``); ``segments``: the
        pass's document boundaries (see ``TokenMixer``), handed to the token and channel mixers."""
        mix_state = None if state is None else state.get("mixer")
        if self.norm0 is not None:
            x = self.norm0(x)
        mixer_in, x = self.mixer_inputs(x)
        h, mix_state = self.mixer(
            mixer_in,
            mix_state,
            return_state=return_state,
            **shared_kwargs(self.mixer, shared),
            **segments_kwargs(segments),
        )
        x, mlp_state = self.add_mixer_output(x, h, None if state is None else state.get("mlp"), segments)
        return x, ({"mixer": mix_state, "mlp": mlp_state} if return_state else None)

    def mixer_inputs(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(the token mixer's input, the residual path)`` for the block input ``x`` [B, T, D]:
        ``(norm(x), x)`` pre-norm, ``(x, norm(x))`` with ``block_norm: residual``."""
        normed = self.norm1(x)
        return (x, normed) if self.norm_on_residual else (normed, x)

    def add_mixer_output(
        self, x: torch.Tensor, h: torch.Tensor, mlp_state: Any = None, segments: Optional[Segments] = None
    ):
        """The block after its token mixer: the residual ``x + h``, then the channel mixer (if any).
        Returns the block output and the channel mixer's new state."""
        x = x + self.dropout(h)
        if self.mlp is None:
            return x, None
        m, mlp_state = self.mlp(self.norm2(x), mlp_state, **segments_kwargs(segments))
        return x + self.dropout(m), mlp_state

    def init_state(self, batch_size: int, device=None, dtype=None) -> Dict[str, Any]:
        mlp_state = self.mlp.init_state(batch_size, device, dtype) if self.mlp is not None else None
        return {"mixer": self.mixer.init_state(batch_size, device, dtype), "mlp": mlp_state}


def layer_shared(shareds: Dict[str, Dict[str, Any]], block: Block) -> Dict[str, Any]:
    """The cross-layer dict of ``block`` in a forward pass: one per family (``shareds``: family -> dict,
    filled as the pass goes), so that a ``uses_shared`` family (RWKV-7's value residual) reads values
    written by the layers of its own family only."""
    return shareds.setdefault(block.layer.family, {})


class TiedHead(nn.Module):
    """The LM head tied to the embedding: ``logits = h E^T``. A module of its own (holding no
    parameter) so that sharded strategies gather the embedding when it runs (ZeRO-3 registers
    the embedding weight as its external parameter)."""

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        self.__dict__["embedding"] = embedding  # a reference, not a sub-module (no duplicate keys)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.embedding.weight)


class LanguageModel(nn.Module):
    def __init__(self, cfg: Any):
        super().__init__()
        cfg = as_model_config(cfg)
        cfg.variant = resolve_variant(cfg.family, cfg.variant)
        if cfg.vocab_size <= 0 and cfg.input_dim is None:
            raise ValueError("model.vocab_size must be set (> 0) before building the model")
        self.cfg = cfg
        if cfg.input_dim:
            self.embed: nn.Module = nn.Linear(cfg.input_dim, cfg.d_model, bias=True)
        else:
            self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        #: one entry per layer: its token mixer's family, variant and options (lm/models/hybrid.py)
        self.layers = resolve_layers(cfg)
        if cfg.layers is None:  # one options object for all layers, as built before hybrids
            options = resolve_options(cfg.family, cfg.variant, cfg.mixer)
            self.blocks = nn.ModuleList(Block(cfg, i, layer, options) for i, layer in enumerate(self.layers))
        else:
            self.blocks = nn.ModuleList(Block(cfg, i, layer) for i, layer in enumerate(self.layers))
        self.norm_f = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        out_dim = cfg.output_dim or cfg.vocab_size
        tie = cfg.tie_embeddings and not cfg.input_dim and not cfg.output_dim
        self.head: Optional[nn.Linear] = None if tie else nn.Linear(cfg.d_model, out_dim, bias=bool(cfg.output_dim))
        self.tied_head = TiedHead(self.embed) if tie else None
        self.gradient_checkpointing = False  # set by the trainer (train.activation_checkpointing)
        self.reset_parameters()

    # ------------------------------------------------------------------------------ parameters
    def reset_parameters(self) -> None:
        init_linear_(self, self.cfg.init_std, self.cfg.n_layers)
        for block in self.blocks:
            reset = getattr(block.mixer, "reset_parameters", None)
            if reset is not None:
                reset()
        for block in self.blocks:  # the family recipes' parts outside the mixers (channel mixer, embedding)
            block.mixer.reset_around(block, self)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings and isinstance(self.embed, nn.Embedding):
            n -= self.embed.weight.numel()
        return n

    def weight_decay_groups(self, family: bool = True, lr_multipliers: bool = True) -> List[ParamGroup]:
        """The optimizer's parameter groups (:class:`~lm.models.mixer.ParamGroup`), each holding its
        trainable parameters in ``self.parameters()`` order.

        ``family`` (``train.weight_decay_groups: family``): a token mixer's parameters decay unless named
        in its :meth:`~lm.models.mixer.TokenMixer.no_weight_decay`; ``lr_multipliers``
        (``train.lr_multipliers``): a mixer's parameters named in its
        :meth:`~lm.models.mixer.TokenMixer.lr_multipliers` train at that multiple of the learning rate.
        The rest of the model (embedding, norms, channel mixers, head) follows the skeleton rule:
        matrices decay, vectors and scalars do not, multiplier 1. ``family=False``: the skeleton rule for
        every parameter (the split before issue 16's recipes).

        Order: the ``decay`` and ``no_decay`` groups at multiplier 1 first (always, possibly empty: the
        two groups of before), then one group per other (decay, multiplier), decayed first, by multiplier.
        """
        exempt: set = set()
        scaled: Dict[str, float] = {}
        in_mixer = {id(p) for block in self.blocks for p in block.mixer.parameters()}
        for i, block in enumerate(self.blocks):
            prefix = f"blocks.{i}.mixer."
            if family:
                exempt |= {prefix + name for name in block.mixer.no_weight_decay()}
            if lr_multipliers:
                scaled.update({prefix + name: float(m) for name, m in block.mixer.lr_multipliers().items()})
        groups: Dict[Tuple[bool, float], List[nn.Parameter]] = {(True, 1.0): [], (False, 1.0): []}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            decays = name not in exempt if family and id(p) in in_mixer else p.dim() >= 2
            groups.setdefault((decays, scaled.get(name, 1.0)), []).append(p)
        first = [(True, 1.0), (False, 1.0)]
        rest = sorted((k for k in groups if k not in first), key=lambda k: (not k[0], k[1]))
        return [ParamGroup(decay, mult, groups[(decay, mult)]) for decay, mult in first + rest]

    @property
    def name(self) -> str:
        """``family/variant``, or ``hybrid[family/variant:count,...]`` for a hybrid (as
        :func:`lm.models.registry.model_name` prints the config)."""
        return layers_name(self.layers)

    # --------------------------------------------------------------------------------- forward
    def init_state(self, batch_size: int, device=None, dtype=None) -> ModelState:
        """The state before any token: one entry per layer."""
        return [b.init_state(batch_size, device, dtype) for b in self.blocks]

    def reserve_state(self, state: ModelState, capacity: int) -> ModelState:
        """``state`` with room for ``capacity`` tokens in every layer whose state grows (a KV cache is
        moved into a buffer preallocated to ``capacity`` positions, then filled in place token by
        token, see ``Attention.reserve_state``); constant-state layers are returned as they are.
        Used by generation, which knows the final length; training and evaluation never call it."""
        out = []
        for block, layer in zip(self.blocks, state):
            reserve = getattr(block.mixer, "reserve_state", None)
            if reserve is None or layer is None:
                out.append(layer)
            else:
                out.append({**layer, "mixer": reserve(layer.get("mixer"), capacity)})
        return out

    def state_sizes(self, batch_size: int = 1, context: int = 0, dtype: Optional[torch.dtype] = None) -> List[int]:
        """Bytes of each layer's token-mixer state after ``context`` tokens
        (:meth:`~lm.models.mixer.TokenMixer.state_size`): constant for recurrent layers, linear in
        ``context`` for attention layers."""
        return [b.mixer.state_size(batch_size, context, dtype) for b in self.blocks]

    def hidden_states(
        self,
        tokens: torch.Tensor,
        state: Optional[ModelState] = None,
        return_state: bool = False,
        doc_starts: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, Optional[ModelState]]:
        """Final-norm hidden states [B, T, D] (before the head) and the new state.

        ``doc_starts``: bool [B, T], True at a document's first token, or None (see the module
        docstring)."""
        segments = None
        if doc_starts is not None:
            if tuple(doc_starts.shape) != tuple(tokens.shape[:2]):
                raise ValueError(
                    f"doc_starts: expected shape {tuple(tokens.shape[:2])} (the tokens' [B, T]), "
                    f"got {tuple(doc_starts.shape)}"
                )
            segments = Segments.from_starts(doc_starts.to(tokens.device))
        x = self.embed(tokens)
        new_state: List[Dict[str, Any]] = []
        shareds: Dict[str, Dict[str, Any]] = {}  # per family: per-token values later layers read (RWKV-7: v_1)
        for i, block in enumerate(self.blocks):
            shared = layer_shared(shareds, block)
            layer_state = None if state is None else state[i]
            if self.gradient_checkpointing and self.training and not return_state and layer_state is None:
                x = checkpoint(
                    lambda inp, b=block, sh=shared: b(inp, shared=sh, segments=segments)[0], x, use_reentrant=False
                )
                s = None
            else:
                x, s = block(x, layer_state, return_state=return_state, shared=shared, segments=segments)
            new_state.append(s)
        return self.norm_f(x), (new_state if return_state else None)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The LM head (tied to the embedding unless configured otherwise)."""
        if self.head is None:
            return self.tied_head(h)
        return self.head(h)

    def forward(
        self,
        tokens: torch.Tensor,
        state: Optional[ModelState] = None,
        return_state: Optional[bool] = None,
        doc_starts: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, Optional[ModelState]]:
        """tokens [B, T] (or [B, T, input_dim]) -> (logits [B, T, V], state).

        The state is returned when one was passed in or ``return_state=True``. ``doc_starts`` (bool
        [B, T]): reset every layer at document starts (see the module docstring); None: the stream.
        """
        if return_state is None:
            return_state = state is not None
        h, new_state = self.hidden_states(tokens, state, return_state, doc_starts=doc_starts)
        return self.logits(h), new_state

    @torch.no_grad()
    def step(self, token: torch.Tensor, state: ModelState) -> Tuple[torch.Tensor, ModelState]:
        """One token per sequence: token [B] -> (logits [B, V], state)."""
        logits, state = self.forward(token[:, None], state, return_state=True)
        return logits[:, 0], state
