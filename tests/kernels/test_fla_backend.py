"""``backend="fla"`` (flash-linear-attention's Triton kernels) against our references on the CPU.

fla's kernels run here on the Triton interpreter (``TRITON_INTERPRET=1``) with two test-only
shims for interpreter gaps (not fla bugs; compiled Triton needs neither):

* its autotuners would time every config through a GPU driver: each takes its first config;
* its kernels call ``.to()`` on ``for i in range(n)`` loop indices, which the interpreter leaves as
  Python ints (and ``tl.gather`` aliased at import time bypasses the interpreter's patching): the
  fla kernel modules get a ``range`` that yields interpreter scalars and a late-bound ``gather``;

The interpreter stores bf16 as raw uint16 bits and its ``tl.dot`` multiplies those bits (our
kernels cast to fp32 before every dot, fla's do not), so on the CPU the half-precision cases run in
fp16, which numpy computes natively; on a GPU they run in bf16.

Skipped, with the reason, when flash-linear-attention (``pip install 'rnn-lm[fla]'``) is absent.
"""

from __future__ import annotations

import builtins
import sys

import pytest
import torch

from kernels._dispatch import choose_backend, fla_available, resolve, triton_interpret
from tests.kernels import harness

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(not fla_available(), reason="flash-linear-attention not installed (pip install 'rnn-lm[fla]')"),
    pytest.mark.skipif(
        not (torch.cuda.is_available() or triton_interpret()),
        reason="fla runs Triton kernels: needs CUDA or TRITON_INTERPRET=1",
    ),
]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPE = dict(B=1, H=2, K=16, V=16)
#: half precision: bf16 on a GPU, fp16 on the interpreter (see the module docstring)
HALF = torch.bfloat16 if torch.cuda.is_available() else torch.float16


def _interpreter_range(*args):
    import triton.language as tl
    from triton.runtime.interpreter import _implicit_cvt

    if not any(isinstance(a, tl.tensor) for a in args):
        return builtins.range(*args)
    bounds = [int(a.handle.data.item()) if isinstance(a, tl.tensor) else int(a) for a in args]
    return (_implicit_cvt(i) for i in builtins.range(*bounds))


def _late_gather(src, index, axis):
    import triton.language as tl

    return tl.gather(src, index, axis)


@pytest.fixture(autouse=True, scope="module")
def fla_on_interpreter():
    """Import fla's ops and, on the interpreter only, apply the shims above (undone afterwards)."""
    import fla.ops.delta_rule  # noqa: F401  (imports every kernel module the adapters use)
    import fla.ops.generalized_delta_rule  # noqa: F401
    import fla.ops.gated_delta_rule  # noqa: F401
    import fla.ops.gla  # noqa: F401
    import fla.ops.simple_gla  # noqa: F401
    import triton.language as tl
    import triton.runtime.autotuner as autotuner

    if not triton_interpret():
        yield
        return
    mp = pytest.MonkeyPatch()
    mp.setattr(autotuner.Autotuner, "_bench", lambda self, *a, config, **kw: [0.0, 0.0, 0.0])
    for name, module in list(sys.modules.items()):
        if name.startswith("fla.ops") and module is not None:
            mp.setattr(module, "range", _interpreter_range, raising=False)
            if getattr(module, "gather", None) is tl.gather:
                mp.setattr(module, "gather", _late_gather)
    yield
    mp.undo()


@pytest.mark.parametrize("T", [1, 37, 100])
@pytest.mark.parametrize("per_head_gate", [False, True])
def test_gla(T, per_head_gate):
    harness.compare_backends(
        "gla", "fla", T=T, per_head_gate=per_head_gate, with_state=True, seed=T, device=DEVICE, **SHAPE
    )


@pytest.mark.parametrize("T", [1, 37, 100])
@pytest.mark.parametrize("decay", ["moderate", "strong"])
def test_gated_delta_rule(T, decay):
    harness.compare_backends("delta_rule", "fla", T=T, decay=decay, with_state=True, seed=T, device=DEVICE, **SHAPE)


def test_ungated_delta_rule_fp32_and_half():
    """g=None: fp32 takes fla's gated kernel with g = 0, half precision its ungated chunk kernel."""
    for dtype in (torch.float32, HALF):
        args, state = harness.make_inputs("delta_rule", T=45, with_state=True, dtype=dtype, device=DEVICE, **SHAPE)
        args.pop("g")
        ref = {n: x.detach().float() for n, x in args.items()}
        o_ref, s_ref, g_ref = harness.forward_backward("delta_rule", ref, state, "reference")
        o, s, g = harness.forward_backward("delta_rule", args, state, "fla")
        tol = harness.TOL[dtype]
        assert o.dtype == dtype and s.dtype == torch.float32
        harness.assert_close(f"output ({dtype})", o, o_ref, tol)
        harness.assert_close(f"final_state ({dtype})", s, s_ref, tol)
        for name in g:
            harness.assert_close(f"grad {name} ({dtype})", g[name], g_ref[name], tol)


@pytest.mark.parametrize("T", [1, 37])  # fla's dplr kernels are the slowest on the interpreter
def test_dplr(T):
    harness.compare_backends("dplr", "fla", T=T, with_state=True, seed=T, device=DEVICE, **SHAPE)


@pytest.mark.parametrize("op", ["gla", "delta_rule", "dplr"])
def test_half_precision(op):
    harness.compare_backends(op, "fla", dtype=HALF, T=30, with_state=True, device=DEVICE, **SHAPE)


@pytest.mark.parametrize("op", ["gla", "delta_rule", "dplr"])
def test_split_equals_one_pass_and_empty(op):
    harness.check_split(op, "fla", 20, T=45, with_state=True, device=DEVICE, **SHAPE)
    args, state = harness.make_inputs(op, T=0, with_state=True, device=DEVICE, **SHAPE)
    out, final = harness.run(op, args, state, "fla")
    assert out.shape[1] == 0 and torch.equal(final, state.float())


def test_ops_without_fla_backend_are_named():
    """linear_scan has no fla counterpart (fla's hgrn needs positive decays); asking is a clear error."""
    with pytest.raises(ValueError, match="op 'linear_scan' has no 'fla' backend"):
        resolve("linear_scan", choose_backend("fla", torch.device(DEVICE)), torch.device(DEVICE), 10)
