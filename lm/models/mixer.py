"""The token-mixer interface every family implements.

A mixer maps ``x [B, T, D] -> y [B, T, D]`` causally. It has two equivalent forms:

* the whole-sequence (training) form ``forward(x, state=None, return_state=False, segments=None)``,
  built on the fast kernels, which can start from and return a state, and
* the recurrent form ``step(x_t [B, D], state) -> (y_t [B, D], state)``.

States are dicts of tensors (or None entries) so that a sequence can be processed in pieces,
generated token by token, or probed. ``init_state(batch)`` gives the state before any token.

Besides its forms, a mixer declares the facts the rest of the code needs about its family, so that
nothing outside the family switches on its name: :meth:`TokenMixer.forward_flops` (the cost along the
sequence that its parameters do not count, for MFU), its training recipe -- :meth:`TokenMixer.no_weight_decay`
(its parameters kept out of weight decay), :meth:`TokenMixer.lr_multipliers` (parameters trained at a
multiple of the learning rate) and :meth:`TokenMixer.reset_around` (initialisation of the block and model
parts around it, where the family's reference design prescribes one) --, :meth:`TokenMixer.state_size`
(bytes of its state) and :attr:`TokenMixer.constant_state` (whether that size is independent of the
context). :class:`ParamGroup` is one optimizer group built from those declarations
(``LanguageModel.weight_decay_groups``).

Document boundaries (``data.packing: reset``): ``segments`` (:class:`lm.models.segments.Segments`,
one per forward pass, shared by all layers) marks where documents start inside the rows of x. The
whole-sequence form then equals running every document alone: a row's first segment continues the
row's ``state`` unless the row begins with a document start, every other segment starts from the
state before any token, and the returned state is each row's state after its last segment. Every
family implements it (recurrent ones through the kernels' ``cu_seqlens``, see :func:`packed_scan`;
token shifts and short convolutions mask inputs from other documents; the Transformer attends within
each document). With ``segments=None`` nothing changes (the ``stream`` behaviour); the step form never
takes segments.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

import torch
import torch.nn as nn

from lm.models.layers import HeadNorm
from lm.models.registry import head_dim

State = Optional[Dict[str, Any]]


@dataclass
class ImplicitAttention:
    """The linear map a token mixer applies along time: ``output = weights @ values`` per head.

    weights: [B, H, T, T] (causal); values: [B, T, H, V]; output: [B, T, H, V], what the mixer
    actually computed at that point (before per-token post-processing such as norms and gates).
    """

    weights: torch.Tensor
    values: torch.Tensor
    output: torch.Tensor

    def reconstruction_error(self) -> float:
        """max |weights @ values - output| / max |output| (0 when the closed form is exact)."""
        rebuilt = torch.einsum("bhts,bshv->bthv", self.weights.double(), self.values.double())
        scale = self.output.double().abs().max().clamp_min(1e-12)
        return float((rebuilt - self.output.double()).abs().max() / scale)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a mixer hands its kernels: autocast's where autocast is on for x's device (in
    ``bf16-mixed`` training the projections come out in bf16 while the residual stream x and the
    parameters stay fp32, and the kernels take q, k, v and their weights in one dtype), else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def onehot_values(B: int, T: int, H: int, device) -> torch.Tensor:
    """Identity values [B, T, H, T]: a kernel linear in v, run on them, returns its weights."""
    eye = torch.eye(T, device=device)
    return eye[None, :, None, :].expand(B, T, H, T).contiguous()


class TokenMixer(nn.Module, abc.ABC):
    #: True for mixers whose ``forward``/``step``/``implicit_attention`` take ``shared``: a dict of
    #: per-token tensors [B, T, ...] written by earlier layers of the same pass (RWKV-7's value
    #: residual: layer 0's values). The skeleton passes one dict through all layers of a pass.
    uses_shared = False
    #: True when the state has the same size whatever the context length (every recurrent family);
    #: False for a state that grows with it (the Transformer's KV cache)
    constant_state = True

    def __init__(self, cfg: Any, options: Any, layer_idx: int):
        super().__init__()
        self.cfg = cfg
        self.options = options
        self.layer_idx = layer_idx
        self.d_model = int(cfg.d_model)
        self.n_heads = int(cfg.n_heads)
        self.head_dim = head_dim(cfg)
        self.backend = None if cfg.kernel_backend in (None, "auto") else cfg.kernel_backend  # None: by device
        self.check_config(cfg, options)  # also when built without a validated experiment config

    @abc.abstractmethod
    def forward(
        self, x: torch.Tensor, state: State = None, return_state: bool = False, segments: Any = None
    ) -> Tuple[torch.Tensor, State]:
        """The whole-sequence form: x [B, T, D] from ``state`` -> (y [B, T, D], the state after x or None).

        ``segments``: the pass's document boundaries (see the module docstring), or None; a mixer
        that cannot reset at them must raise, never ignore them."""

    def step(self, x_t: torch.Tensor, state: State, **kwargs: Any) -> Tuple[torch.Tensor, State]:
        """One token: the whole-sequence form on a length-1 sequence with the carried state
        (``kwargs``: ``shared=`` this token's cross-layer inputs [B, 1, ...], for ``uses_shared`` mixers)."""
        y, state = self.forward(x_t[:, None], state, return_state=True, **kwargs)
        return y[:, 0], state

    @abc.abstractmethod
    def init_state(self, batch_size: int, device=None, dtype=None) -> Dict[str, Any]:
        """The state before any token."""

    def implicit_attention(self, x: torch.Tensor) -> Optional[ImplicitAttention]:
        """The attention matrix this mixer applies to x [B, T, D] in closed form, or None for
        mixers that have none (the fast weight programmers with recurrent feedback)."""
        return None

    @staticmethod
    def check_config(cfg: Any, options: Any) -> None:
        """Raise ConfigError for option combinations the family cannot build (default: none)."""

    # ------------------------------------------------------------------- per-family facts
    def forward_flops(self, seq_len: int) -> float:
        """Forward FLOPs per token of this layer's mixing along the sequence, beyond the matrix
        products of its parameters (which :func:`lm.models.flops.matmul_parameters` counts): the
        attention or scan term at training length ``seq_len``. Default 0: elementwise scans."""
        return 0.0

    def no_weight_decay(self) -> Set[str]:
        """Names (relative to this mixer, as ``named_parameters`` gives them) of the parameters kept
        out of weight decay (``train.weight_decay_groups: family``). Default: those with fewer than 2
        dimensions (biases, gains, decay rates, per-channel mixing coefficients) and every parameter of
        a norm layer (:func:`norm_parameter_names`: per-head norms hold ``[H, K]`` gains); a family whose
        reference recipe exempts more (RWKV-7) overrides it."""
        vectors = {name for name, p in self.named_parameters() if p.dim() < 2}
        return vectors | norm_parameter_names(self)

    def lr_multipliers(self) -> Dict[str, float]:
        """Names (as in :meth:`no_weight_decay`) -> learning-rate multiplier of the family recipe
        (``train.lr_multipliers: true``); parameters not named train at the base rate. Default: none."""
        return {}

    def reset_around(self, block: nn.Module, model: nn.Module) -> None:
        """Initialise what the family's recipe prescribes outside this mixer: its ``block`` (the channel
        mixer, norms) and, for the model's first block, the ``model``'s embedding and head. Called by
        ``LanguageModel.reset_parameters`` once per layer after every module's own initialisation.
        Default: nothing (the skeleton's normal(init_std) init stays)."""

    def state_size(self, batch_size: int = 1, context: int = 0, dtype: Optional[torch.dtype] = None) -> int:
        """Bytes of this mixer's state for ``batch_size`` sequences after ``context`` tokens (``dtype``:
        of the activations, default the mixer's parameters'). Default: the tensors of
        :meth:`init_state` (built on the meta device, nothing allocated), which is the size at any
        context for a ``constant_state`` mixer; a mixer whose state grows overrides it."""
        state = self.init_state(batch_size, device="meta", dtype=dtype or self.parameter_dtype())
        return state_bytes(state)

    def parameter_dtype(self) -> torch.dtype:
        """The dtype of the mixer's first parameter (float32 without any)."""
        return next((p.dtype for p in self.parameters()), torch.float32)


#: norm layers whose parameters (gains, biases) never decay under the family recipes; a module class
#: can also declare ``is_norm = True``
NORM_TYPES: Tuple[type, ...] = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, HeadNorm)


def norm_parameter_names(module: nn.Module) -> Set[str]:
    """Names (relative to ``module``) of the parameters held by its norm layers (:data:`NORM_TYPES` or a
    module with ``is_norm = True``), whatever their shape."""
    names: Set[str] = set()
    for prefix, sub in module.named_modules():
        if isinstance(sub, NORM_TYPES) or getattr(sub, "is_norm", False):
            names |= {f"{prefix}.{n}" if prefix else n for n, _ in sub.named_parameters()}
    return names


@dataclass
class ParamGroup:
    """One optimizer parameter group: the trainable parameters that share a weight-decay decision
    (``decay``: the run's ``train.weight_decay``, else 0) and a learning-rate multiplier."""

    decay: bool
    lr_multiplier: float
    params: List[nn.Parameter]

    @property
    def name(self) -> str:
        """``decay`` / ``no_decay``, with ``_lr<m>x`` for a multiplier other than 1 (``no_decay_lr2x``)."""
        base = "decay" if self.decay else "no_decay"
        return base if self.lr_multiplier == 1.0 else f"{base}_lr{self.lr_multiplier:g}x"


def state_bytes(state: Any) -> int:
    """Bytes held by the tensors of a state (nested dicts, lists and tuples; None entries hold none)."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(v) for v in state)
    return 0


def get(state: State, key: str):
    """``state[key]`` or None for a fresh sequence."""
    return None if state is None else state.get(key)


def packed_scan(
    op: Callable,
    segments: Any,
    steps: Sequence[Optional[torch.Tensor]],
    state: Any,
    fresh: Callable[[int], Any],
    return_state: bool,
    **params: Any,
):
    """A kernel op over the packed row of ``segments``: the per-step inputs ``steps`` ([B, T, ...] each,
    or None) are packed to [1, B*T, ...] and run with ``cu_seqlens``; the initial state per segment is
    row b's ``state`` where the row continues and ``fresh(n)`` elsewhere (``state=None``: the kernel's
    own fresh state for every segment). Returns (output [B, T, ...], each row's final state or None);
    ``params`` (scale, weights, backend, ...) go to ``op`` as keywords."""
    init = None if state is None else segments.initial_state(state, fresh)
    packed = [None if t is None else segments.pack(t) for t in steps]
    out, final = op(
        *packed, initial_state=init, output_final_state=return_state, cu_seqlens=segments.cu_seqlens, **params
    )
    return segments.unpack(out), (segments.final_state(final) if return_state else None)


def segments_kwargs(segments: Any) -> Dict[str, Any]:
    """``{"segments": segments}`` when there are document boundaries, else ``{}`` (the stream path's
    calls stay exactly as they were)."""
    return {} if segments is None else {"segments": segments}


def shared_kwargs(mixer: nn.Module, shared: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """``{"shared": shared}`` for a mixer with ``uses_shared``, else ``{}`` (the others' signature)."""
    return {"shared": shared} if getattr(mixer, "uses_shared", False) else {}
