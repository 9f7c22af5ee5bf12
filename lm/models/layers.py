"""Building blocks shared by every family: norms, channel mixers, token shift, short causal
convolution, per-head output norm, and initialisation helpers.

Shapes: ``x`` is ``[B, T, D]`` unless stated; states carry what a block needs to continue a
sequence token by token (the last inputs of a shift or a convolution).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

if TYPE_CHECKING:  # pragma: no cover
    from lm.models.segments import Segments


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    """``rmsnorm`` (``x / rms(x) * w``), ``layernorm``, or ``none`` (identity, for synthetic tasks)."""
    if kind == "none":
        return nn.Identity()
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=eps)
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps)
    raise ValueError(f"model.norm: unknown norm '{kind}'")


class HeadNorm(nn.Module):
    """RMS norm over the last dim of ``[..., H, Dh]`` with per-head weights (GroupNorm-like)."""

    def __init__(self, n_heads: int, head_dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n_heads, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / ||x||`` over the last dim."""
    return F.normalize(x, p=2.0, dim=-1, eps=eps)


def token_shift(
    x: torch.Tensor, last: Optional[torch.Tensor], segments: "Optional[Segments]" = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The previous token's input: ``shifted[:, t] = x[:, t-1]``, ``shifted[:, 0] = last`` (or 0).

    x: [B, T, D]; last: [B, D] or None. Returns (shifted [B, T, D], new last = x[:, -1]).
    With ``segments`` (document starts), the previous input counts only within the token's document
    (``segments.same_document(1)``): a document's first token sees zeros, as at a sequence start.
    """
    first = torch.zeros_like(x[:, :1]) if last is None else last[:, None].to(x.dtype)
    shifted = torch.cat([first, x[:, :-1]], dim=1)
    if segments is not None:
        shifted = torch.where(segments.same_document(1)[..., None], shifted, torch.zeros_like(shifted))
    return shifted, x[:, -1]


class ShortConv(nn.Module):
    """Depthwise causal convolution over time: ``y_t = sum_{j<K} w_j * x_{t-j}`` (+ SiLU).

    The state is the last ``K - 1`` inputs ``[B, K-1, D]`` so that stepping equals a whole pass.
    With ``segments`` (document starts) an input ``j`` steps back counts only within the token's
    document (``segments.same_document(j)``, else zero as at a sequence start), and the returned
    history zeroes the inputs before the row's last document start, so that a carried history
    never leaks across a boundary.
    """

    def __init__(self, dim: int, kernel_size: int = 4, activation: bool = True):
        super().__init__()
        self.kernel_size = kernel_size
        self.activation = activation
        self.weight = nn.Parameter(torch.empty(dim, kernel_size))
        self.bias = nn.Parameter(torch.zeros(dim))
        nn.init.uniform_(self.weight, -1 / math.sqrt(kernel_size), 1 / math.sqrt(kernel_size))

    def forward(self, x: torch.Tensor, state: Optional[torch.Tensor] = None, segments: "Optional[Segments]" = None):
        B, T, D = x.shape
        pad = self.kernel_size - 1
        history = x.new_zeros(B, pad, D) if state is None else state.to(x.dtype)
        xp = torch.cat([history, x], dim=1)  # [B, pad + T, D]
        if segments is not None:
            return self._forward_segments(xp, T, segments)
        y = F.conv1d(xp.transpose(1, 2), self.weight.unsqueeze(1).to(x.dtype), self.bias.to(x.dtype), groups=D)
        y = y.transpose(1, 2)
        if self.activation:
            y = F.silu(y)
        return y, xp[:, -pad:] if pad > 0 else xp[:, :0]

    def _forward_segments(self, xp: torch.Tensor, T: int, segments: "Segments"):
        """The convolution as K masked shifted products (lag j: weight column ``pad - j``)."""
        pad = self.kernel_size - 1
        w = self.weight.to(xp.dtype)
        y = self.bias.to(xp.dtype).expand(xp.shape[0], T, xp.shape[2])
        for j in range(self.kernel_size):
            xj = xp[:, pad - j : pad - j + T]
            if j > 0:
                xj = torch.where(segments.same_document(j)[..., None], xj, torch.zeros_like(xj))
            y = y + xj * w[:, pad - j]
        if self.activation:
            y = F.silu(y)
        if pad == 0:
            return y, xp[:, :0]
        history = xp[:, -pad:]
        keep = torch.stack([segments.same_document_after(pad - i) for i in range(pad)], dim=1)  # [B, pad]
        return y, torch.where(keep[..., None], history, torch.zeros_like(history))


class SwiGLU(nn.Module):
    """``W_down (silu(W_gate x) * W_up x)``; hidden = ``mlp_ratio * d * 2/3`` rounded up to 64."""

    def __init__(self, d_model: int, mlp_ratio: float):
        super().__init__()
        hidden = int(mlp_ratio * d_model * 2 / 3)
        hidden = 64 * ((hidden + 63) // 64)
        self.gate_up = nn.Linear(d_model, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)
        self.down.is_residual_out = True

    def forward(self, x: torch.Tensor, state=None, segments=None):
        """``segments`` is accepted and ignored: the map is per token."""
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up), None

    def init_state(self, batch_size: int, device=None, dtype=None):
        return None


class RWKVChannelMix(nn.Module):
    """RWKV-7 channel mixing: ``k = relu(W_k lerp(x, x_{t-1}, mu))^2``; ``y = W_v k``.

    State: the last input ``[B, D]`` (token shift); with ``segments`` the shift resets at document
    starts (:func:`token_shift`).
    """

    def __init__(self, d_model: int, mlp_ratio: float):
        super().__init__()
        hidden = 64 * ((int(mlp_ratio * d_model) + 63) // 64)
        self.mu = nn.Parameter(torch.full((d_model,), 0.5))
        self.key = nn.Linear(d_model, hidden, bias=False)
        self.value = nn.Linear(hidden, d_model, bias=False)
        self.value.is_residual_out = True

    def forward(self, x: torch.Tensor, state: Optional[torch.Tensor] = None, segments: "Optional[Segments]" = None):
        prev, last = token_shift(x, state, segments)
        xk = x + (prev - x) * self.mu.to(x.dtype)
        return self.value(torch.relu(self.key(xk)).square()), last

    def init_state(self, batch_size: int, device=None, dtype=None):
        return None  # token_shift treats None as zeros


def make_mlp(kind: str, d_model: int, mlp_ratio: float) -> Optional[nn.Module]:
    if kind == "swiglu":
        return SwiGLU(d_model, mlp_ratio)
    if kind == "rwkv_cmix":
        return RWKVChannelMix(d_model, mlp_ratio)
    if kind == "none":
        return None
    raise ValueError(f"model.mlp: unknown channel mixer '{kind}'")


def init_linear_(module: nn.Module, std: float, n_layers: int) -> None:
    """Normal(0, std) for Linear/Embedding weights, zero biases; residual outputs scaled by
    ``1/sqrt(2 n_layers)`` (GPT-2). Mixers re-initialise their special parameters afterwards."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            scale = 1 / math.sqrt(2 * n_layers) if getattr(m, "is_residual_out", False) else 1.0
            nn.init.normal_(m.weight, 0.0, std * scale)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, std)
