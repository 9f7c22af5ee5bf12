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

import kernels
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
    import fla.ops.hgrn  # noqa: F401
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


@pytest.mark.parametrize("T", [1, 37, 100])
def test_linear_scan(T):
    """a in [0, 1) with exact zeros: a reset's gradient da_t = dh~_t h_{t-1} stays finite."""
    harness.compare_backends(
        "linear_scan", "fla", T=T, decay="nonnegative", with_state=True, seed=T, device=DEVICE, K=16
    )


def test_linear_scan_half_split_empty_and_packed():
    harness.compare_backends(
        "linear_scan", "fla", dtype=HALF, T=30, decay="nonnegative", with_state=True, device=DEVICE
    )
    harness.check_split("linear_scan", "fla", 20, T=45, decay="nonnegative", with_state=True, device=DEVICE)
    args, state = harness.make_inputs("linear_scan", T=0, with_state=True, device=DEVICE)
    out, final = harness.run("linear_scan", args, state, "fla")
    assert out.shape[1] == 0 and torch.equal(final, state.float())
    # packed sequences (an empty one too): the reset transformation around fla's kernel, with gradients
    args, _ = harness.make_inputs("linear_scan", B=1, T=40, decay="nonnegative", device=DEVICE)
    cu = torch.tensor([0, 7, 7, 25, 40], device=DEVICE)
    h0 = torch.randn(4, args["a"].shape[-1], device=DEVICE)
    o_ref, s_ref, g_ref = harness.forward_backward("linear_scan", args, h0, "reference", cu_seqlens=cu)
    o, s, g = harness.forward_backward("linear_scan", args, h0, "fla", cu_seqlens=cu)
    harness.assert_close("packed output", o, o_ref, 1e-5)
    harness.assert_close("packed final states", s, s_ref, 1e-5)
    for name in g_ref:
        harness.assert_close(f"packed grad {name}", g[name], g_ref[name], 1e-5)


def test_linear_scan_negative_coefficient_is_named_under_checks(monkeypatch):
    """fla's log-space gates cannot express a < 0: an error with LM_KERNEL_CHECKS=1 (not read otherwise)."""
    args, _ = harness.make_inputs("linear_scan", T=5, device=DEVICE)
    monkeypatch.setenv("LM_KERNEL_CHECKS", "1")
    with pytest.raises(ValueError, match="backend 'fla'.*needs a >= 0"):
        kernels.linear_scan(args["a"].detach(), args["b"].detach(), backend="fla")


def test_every_op_with_an_fla_counterpart_has_the_backend():
    """The ops fla has (gla, gated delta rule, dplr, hgrn) take backend='fla'; the others are a clear error."""
    for op in ("linear_scan", "gla", "delta_rule", "dplr"):
        resolve(op, choose_backend("fla", torch.device(DEVICE)), torch.device(DEVICE), 10)
    for op in ("softmax_scan", "recurrent_delta", "srwm"):
        with pytest.raises(ValueError, match=f"op '{op}' has no 'fla' backend"):
            resolve(op, choose_backend("fla", torch.device(DEVICE)), torch.device(DEVICE), 10)


@pytest.mark.parametrize("family,variant", [("gated_rnn", "input_dependent"), ("linear_attention", "gla")])
def test_model_kernel_backend_fla_equals_torch(family, variant, monkeypatch):
    """``model.kernel_backend: fla`` end to end: logits and gradients as the chunked PyTorch kernels
    give, on the stream and with document resets (``doc_starts``)."""
    from tests.models.test_kernel_backend import logits_and_grads, tiny

    monkeypatch.delenv("LM_KERNEL_BACKEND", raising=False)
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, 48, (2, 40), generator=gen)
    starts = torch.zeros(2, 40, dtype=torch.bool)
    starts[:, 0], starts[0, 13], starts[1, 29] = True, True, True
    for doc_starts in (None, starts):
        results = []
        for backend in ("torch", "fla"):
            model = tiny(family, variant, backend).to(DEVICE)
            results.append(
                logits_and_grads(model, tokens.to(DEVICE), None if doc_starts is None else doc_starts.to(DEVICE))
            )
        (ref, ref_grads), (out, grads) = results
        harness.assert_close(f"logits (doc_starts={doc_starts is not None})", out, ref, 1e-4)
        for name, g in ref_grads.items():
            harness.assert_close(f"grad {name}", grads[name], g, 1e-3)
