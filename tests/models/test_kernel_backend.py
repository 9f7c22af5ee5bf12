"""``model.kernel_backend`` reaches every mixer's kernel calls: the chunked PyTorch kernels and the
reference loops give the same logits and gradients for every family; the key's values are checked
at config time; the FLOP count uses the kernels' own chunk length (no ``model.chunk_size``)."""

import pytest
import torch

import kernels
from lm.config import load_experiment
from lm.errors import ConfigError
from lm.models import all_variants, build_model
from lm.models.flops import kernel_chunk, mixer_forward_flops

VARIANTS = all_variants()
IDS = [f"{f}/{v}" for f, v in VARIANTS]


def tiny(family, variant, backend):
    cfg = dict(
        family=family,
        variant=variant,
        vocab_size=48,
        d_model=32,
        n_layers=2,
        n_heads=2,
        mlp="rwkv_cmix" if family == "rwkv" else "swiglu",
        norm="layernorm" if family == "rwkv" else "rmsnorm",
        kernel_backend=backend,
    )
    torch.manual_seed(0)
    return build_model(cfg)


def logits_and_grads(model, tokens, doc_starts=None):
    logits, _ = model(tokens, doc_starts=doc_starts)
    logits.float().square().mean().backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family,variant", VARIANTS, ids=IDS)
def test_torch_and_reference_backends_give_the_same_model(family, variant, monkeypatch):
    monkeypatch.delenv("LM_KERNEL_BACKEND", raising=False)
    tokens = torch.randint(0, 48, (2, 70), generator=torch.Generator().manual_seed(3))  # > one 64-step chunk
    calls = []
    for name in ("linear_scan", "gla", "delta_rule", "dplr", "softmax_scan", "recurrent_delta", "srwm"):
        op = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _op=op, **kw: calls.append(kw.get("backend")) or _op(*a, **kw))
    ref_logits, ref_grads = logits_and_grads(tiny(family, variant, "reference"), tokens)
    seen_ref, calls[:] = list(calls), []
    logits, grads = logits_and_grads(tiny(family, variant, "torch"), tokens)
    if family not in ("transformer", "lstm"):  # the families without a scan op (lstm: torch.nn.LSTM)
        assert seen_ref and set(seen_ref) == {"reference"} and set(calls) == {"torch"}, (seen_ref, calls)
    scale = ref_logits.abs().max()
    assert (logits - ref_logits).abs().max() <= 1e-5 * scale, "logits differ between backends"
    for name, g in ref_grads.items():
        err = (grads[name] - g).abs().max() / g.abs().max().clamp_min(1e-12)
        assert err <= 1e-4, f"grad {name}: relative error {err:.2e}"


def test_auto_means_by_device():
    model = tiny("linear_attention", "gla", "auto")
    assert all(block.mixer.backend is None for block in model.blocks)


def test_kernel_backend_values_checked_at_config_time():
    for value in ("auto", "reference", "torch", "triton", "fla"):
        assert load_experiment(None, [f"model.kernel_backend={value}"]).model.kernel_backend == value
    with pytest.raises(ConfigError, match="model.kernel_backend: invalid value 'flash'"):
        load_experiment(None, ["model.kernel_backend=flash"])


def test_chunk_size_key_is_gone_and_flops_use_the_kernel_chunk():
    with pytest.raises(ConfigError, match="chunk_size"):
        load_experiment(None, ["model.chunk_size=64"])
    assert kernel_chunk("gla", 128, 128) == 64
    assert kernel_chunk("delta_rule", 64, 64) == 64
    model = tiny("linear_attention", "gla", "auto")
    mixer = model.blocks[0].mixer
    K, V, C = mixer.key_dim, mixer.value_dim, 64
    assert mixer_forward_flops(model, 512) == 2 * 2 * (2 * C * (K + V) + 4 * K * V)  # layers * heads * per head
