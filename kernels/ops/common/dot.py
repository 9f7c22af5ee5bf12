"""Small Triton helpers shared by this package's kernels (and softmax_scan's)."""

from __future__ import annotations

import os

import triton
import triton.language as tl

from kernels import _triton_compat as interpreter_compat

interpreter_compat.install()

#: the CPU interpreter multiplies bf16 ``tl.dot`` operands wrongly: there they are rounded to bf16
#: and multiplied in fp32 (the same values; on a GPU the tensor cores take bf16 operands directly)
INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))


@triton.jit
def dot(a, b, LOWP: tl.constexpr):
    """fp32-accumulated matmul: bf16 operands for low-precision inputs, exact fp32 otherwise."""
    if LOWP:
        if INTERPRETED:
            return tl.dot(a.to(tl.bfloat16).to(tl.float32), b.to(tl.bfloat16).to(tl.float32), input_precision="ieee")
        else:
            return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    else:
        return tl.dot(a, b, input_precision="ieee")


@triton.jit
def masked_exp(x, keep):
    """exp(x) where ``keep``, 0 elsewhere (the exponent is replaced by -inf before the exp)."""
    return tl.exp(tl.where(keep, x, float("-inf")))
