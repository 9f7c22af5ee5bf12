"""Training FLOPs per token (forward + backward), for model-FLOPs utilisation (MFU).

``6 * (matmul parameters, LM head included)`` plus three times each token mixer's forward cost
along the sequence (the part parameters do not count), which every mixer declares in
:meth:`~lm.models.mixer.TokenMixer.forward_flops`:

* softmax attention (causal): ``2 * 2 * d * T/2`` per layer (scores and weighted sum);
* chunked linear attention / GLA / RetNet (chunk C, the kernels' own, :func:`kernel_chunk`): intra-chunk ``2 C (K + V)`` and state read and
  write ``4 K V`` per head; the delta rule adds the per-chunk WY transform ``2 C K + C^2``;
* DPLR (RWKV-7): like the delta rule with a per-key decay, ``2 C (2K + V) + C^2 + 6 K V``;
* fused recurrences (recurrent delta, SRWM): ``~12 K V`` (read, update and readout per step);
* scans (gated RNN, Aaren): elementwise, counted as 0 (the default).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.nn as nn

if TYPE_CHECKING:  # pragma: no cover
    from lm.models.lm import LanguageModel


def matmul_parameters(model: LanguageModel) -> int:
    """Weights used in matrix products per token: every Linear, plus the head (tied or not)."""
    n = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear) and m is not model.embed)
    if model.head is None and isinstance(model.embed, nn.Embedding):
        n += model.embed.weight.numel()
    return n


def kernel_chunk(op: str, K: int, V: int) -> int:
    """Chunk length of the kernel that trains ``op`` on a GPU (the Triton path: ``gla`` 64 steps,
    ``delta_rule``/``dplr`` 64, or 32 for heads wider than 64); the chunked PyTorch paths' 64 when
    Triton is not installed."""
    from kernels.ops.gla.torch_chunk import CHUNK

    if op == "gla":
        return CHUNK
    try:
        from kernels.ops.common.tiles import chunk_length
    except ImportError:
        return CHUNK
    return chunk_length(K, V)


def mixer_forward_flops(model: LanguageModel, seq_len: int) -> float:
    """Forward FLOPs per token of all token mixers along the sequence (each layer's own
    :meth:`~lm.models.mixer.TokenMixer.forward_flops`)."""
    return sum((block.mixer.forward_flops(seq_len) for block in model.blocks), 0.0)


def training_flops_per_token(model: LanguageModel, seq_len: int) -> float:
    return 6.0 * matmul_parameters(model) + 3.0 * mixer_forward_flops(model, seq_len)


#: dense bf16 peak FLOP/s by device-name fragment (for MFU on GPUs)
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40": 362e12, "A10": 125e12, "4090": 165e12}


def peak_flops(device_name: str) -> float:
    for key, value in PEAK_BF16.items():
        if key in device_name:
            return value
    return 0.0
