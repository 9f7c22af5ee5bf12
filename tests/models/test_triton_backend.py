"""``model.kernel_backend: triton`` end to end, the GPU path's glue on the Triton interpreter: each
family's logits and parameter gradients equal the chunked PyTorch kernels' (fp32, tight) on the stream
and with document resets. And mixed precision, what ``precision: bf16-mixed`` runs on a GPU: under bf16
autocast every family trains and decodes (the mixers hand the kernels one dtype, the kernels run with
autocast off), close to its fp32 self, with the Triton path matching the PyTorch one loosely."""

import pytest
import torch

from lm.models import all_variants
from tests.kernels.harness import assert_close
from tests.models.test_kernel_backend import logits_and_grads, tiny

#: one variant per distinct kernel path of the models (the rest share these calls); the step-loop
#: families (fwp: recurrent_delta, srwm) and rwkv7 (dplr) are the slowest on the interpreter
COVER = [
    ("aaren", "aaren"),  # softmax_scan
    ("gated_rnn", "input_dependent"),  # linear_scan
    ("linear_attention", "gla"),  # gla, per-key decay
    ("linear_attention", "retnet"),  # gla, per-head decay
    ("linear_attention", "linear_transformer"),  # gla, the normaliser's second call
    ("linear_attention", "deltanet"),  # delta_rule, ungated
    ("linear_attention", "gated_deltanet"),  # delta_rule, gated
    ("linear_attention", "mamba2"),  # gla with a short convolution and D skip
    pytest.param("fwp", "recurrent_delta", marks=pytest.mark.slow),
    pytest.param("fwp", "srwm", marks=pytest.mark.slow),
    pytest.param("rwkv", "rwkv7", marks=pytest.mark.slow),  # dplr
]


def _inputs(family):
    """Tokens [2, T] (T = 70 crosses a 64-step chunk; the step-loop kernels need no more than 24) and
    document starts inside both rows."""
    T = 24 if family == "fwp" else 70
    tokens = torch.randint(0, 48, (2, T), generator=torch.Generator().manual_seed(3))
    starts = torch.zeros(2, T, dtype=torch.bool)
    starts[:, 0], starts[0, T // 3], starts[1, T - 4] = True, True, True
    return tokens, starts


def _autocast_logits_and_grads(model, tokens, doc_starts=None):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = model(tokens, doc_starts=doc_starts)
    logits.float().square().mean().backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _compare(name, out, ref, tol):
    (logits, grads), (ref_logits, ref_grads) = out, ref
    assert_close(f"{name}: logits", logits.float(), ref_logits.float(), tol)
    assert set(grads) == set(ref_grads), f"{name}: different parameters got gradients"
    for n, g in ref_grads.items():
        assert_close(f"{name}: grad {n}", grads[n], g, tol)


@pytest.mark.triton
@pytest.mark.parametrize("family,variant", COVER)
def test_triton_equals_torch_fp32(family, variant, monkeypatch):
    monkeypatch.delenv("LM_KERNEL_BACKEND", raising=False)
    tokens, starts = _inputs(family)
    for doc_starts in (None, starts):
        ref = logits_and_grads(tiny(family, variant, "torch"), tokens, doc_starts)
        out = logits_and_grads(tiny(family, variant, "triton"), tokens, doc_starts)
        _compare(f"{family}/{variant} (documents: {doc_starts is not None})", out, ref, 1e-4)
    # decoding on the Triton path (short prompts take the fused-recurrent kernels, then one-token steps)
    model, ref_model = tiny(family, variant, "triton"), tiny(family, variant, "torch")
    with torch.no_grad():
        _, state = model(tokens[:, :9], return_state=True)
        stepped, _ = model.step(tokens[:, 9], state)
        assert_close(f"{family}/{variant}: decode step", stepped, ref_model(tokens[:, :10])[0][:, -1], 1e-4)


@pytest.mark.triton
@pytest.mark.parametrize("family,variant", COVER)
def test_triton_equals_torch_under_bf16_autocast(family, variant, monkeypatch):
    monkeypatch.delenv("LM_KERNEL_BACKEND", raising=False)
    tokens, starts = _inputs(family)
    ref = _autocast_logits_and_grads(tiny(family, variant, "torch"), tokens, starts)
    out = _autocast_logits_and_grads(tiny(family, variant, "triton"), tokens, starts)
    _compare(f"{family}/{variant} (bf16 autocast)", out, ref, 5e-2)


@pytest.mark.parametrize("family,variant", all_variants(), ids=[f"{f}/{v}" for f, v in all_variants()])
def test_every_family_trains_and_decodes_in_bf16(family, variant, monkeypatch):
    """bf16 autocast (fp32 weights, bf16-mixed training) and bf16 weights (generation in bf16): the
    forward, backward and a decode step run, close to the fp32 model."""
    monkeypatch.delenv("LM_KERNEL_BACKEND", raising=False)
    tokens, starts = _inputs(family)
    fp32_logits, _ = tiny(family, variant, "torch")(tokens, doc_starts=starts)
    logits, grads = _autocast_logits_and_grads(tiny(family, variant, "torch"), tokens, starts)
    assert logits.dtype == torch.bfloat16 and all(torch.isfinite(g).all() for g in grads.values())
    assert_close(f"{family}/{variant}: autocast logits vs fp32", logits.float(), fp32_logits.detach(), 5e-2)
    model = tiny(family, variant, "torch")
    with torch.no_grad():
        full, _ = model(tokens)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, state = model(tokens[:, :-1], return_state=True)
            stepped, _ = model.step(tokens[:, -1], state)
        assert_close(f"{family}/{variant}: autocast decode step", stepped.float(), full[:, -1], 5e-2)
        model = model.to(torch.bfloat16)
        _, state = model(tokens[:, :-1], return_state=True)
        stepped, _ = model.step(tokens[:, -1], state)
        assert stepped.dtype == torch.bfloat16
        assert_close(f"{family}/{variant}: bf16-weights decode step", stepped.float(), full[:, -1], 5e-2)
