"""RWKV-7's value residual and reference-layout options (ln0, GroupNorm ``ln_x``): layer 0's values
reach later layers in the whole-sequence form, in token-by-token stepping, under activation
checkpointing and in the probes' per-layer capture; a layer > 0 run on its own without them is
refused."""

import pytest
import torch

from lm.models import build_model
from lm.probes.capture import capture_layers
from lm.probes.runner import run_probes


def rwkv(n_layers=3, **mixer):
    cfg = dict(
        family="rwkv",
        variant="rwkv7",
        vocab_size=48,
        d_model=32,
        n_layers=n_layers,
        n_heads=2,
        mlp="rwkv_cmix",
        norm="layernorm",
        mixer=mixer,
    )
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():  # random, so that zero-initialised low-rank maps do not hide a missing path
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


TOKENS = torch.randint(0, 48, (2, 19), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    "mixer",
    [{}, {"value_residual": False}, {"head_norm": "rms", "embed_norm": False}],
    ids=["reference", "no-value-residual", "rms-no-ln0"],
)
def test_forward_equals_stepping(mixer):
    model = rwkv(**mixer)
    with torch.no_grad():
        full, _ = model(TOKENS, return_state=True)
        state, stepped = model.init_state(2), []
        for t in range(TOKENS.shape[1]):
            logits, state = model.step(TOKENS[:, t], state)
            stepped.append(logits)
    assert (torch.stack(stepped, 1) - full).abs().max() <= 1e-5 * full.abs().max()


def test_value_residual_carries_layer0_values():
    """With v0 -> +inf the residual gate is 1: every later layer's v is layer 0's v, so changing
    layer 0's value map changes the last layer's output at the same input; without the residual
    (or with the gate at 0) it does not."""
    model = rwkv()
    layers = capture_layers(model, TOKENS)
    mixer = model.blocks[2].mixer
    first = layers[2].shared["shared"]["v_first"]
    assert torch.equal(
        first,
        model.blocks[0].mixer.value(
            layers[0].x
            + (torch.cat([torch.zeros_like(layers[0].x[:, :1]), layers[0].x[:, :-1]], 1) - layers[0].x)
            * model.blocks[0].mixer.mu[3]
        ),
    )
    with torch.no_grad():
        mixer.v0.fill_(60.0)
        y_a, _ = mixer(layers[2].x, shared={"v_first": first})
        y_b, _ = mixer(layers[2].x, shared={"v_first": first * 2})
        mixer.v0.fill_(-60.0)
        y_c, _ = mixer(layers[2].x, shared={"v_first": first})
        y_d, _ = mixer(layers[2].x, shared={"v_first": first * 2})
    assert (y_a - y_b).abs().max() > 1e-3
    assert torch.allclose(y_c, y_d, atol=1e-6)
    with pytest.raises(ValueError, match="layer 2: the value residual needs layer 0's values"):
        mixer(layers[2].x)


def test_layer0_values_change_later_layers_in_the_model():
    model = rwkv()
    other = rwkv()
    with torch.no_grad():
        other.blocks[0].mixer.value.weight.mul_(3.0)
        # the same layer-2 mixer and input: only layer 0's v (through the residual) differs
        io_a, io_b = capture_layers(model, TOKENS)[2], capture_layers(other, TOKENS)[2]
        y_a, _ = model.blocks[2].mixer(io_a.x, **io_a.shared)
        y_b, _ = model.blocks[2].mixer(io_a.x, **io_b.shared)
    assert torch.allclose(y_a, io_a.y, atol=1e-6)
    assert (y_a - y_b).abs().max() > 1e-4


def test_checkpointing_gives_the_same_gradients():
    grads = []
    for ckpt in (False, True):
        model = rwkv().train()
        model.gradient_checkpointing = ckpt
        logits, _ = model(TOKENS)
        logits.square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and "blocks.0.mixer.value.weight" in grads[0]
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5), name


def test_probes_see_the_value_residual():
    model = rwkv()
    result = run_probes(model, TOKENS)
    for layer in (0, 1, 2):
        assert result.scalars[f"probe/form_out_rel/layer{layer}"] < 1e-4
        assert result.scalars[f"probe/attn_recon_error/layer{layer}"] < 1e-5
    layers = capture_layers(model, TOKENS)
    h = model.embed(TOKENS)
    for i, block in enumerate(model.blocks):  # the capture follows the model's own pass
        h, _ = block(h, shared=layers[i].shared.get("shared") if i else {})
    with torch.no_grad():
        want, _ = model(TOKENS)
    assert torch.allclose(model.logits(model.norm_f(h)), want, atol=1e-5)


def test_head_norm_is_a_per_head_group_norm():
    model = rwkv(n_layers=1)
    norm = model.blocks[0].mixer.o_norm
    with torch.no_grad():
        norm.weight.copy_(torch.randn_like(norm.weight))
        norm.bias.copy_(torch.randn_like(norm.bias))
        x = torch.randn(3, 5, 2, 16)
        want = torch.nn.functional.group_norm(
            x.reshape(15, 32), 2, norm.weight.reshape(-1), norm.bias.reshape(-1), eps=64e-5
        ).reshape(3, 5, 2, 16)
    assert torch.allclose(norm(x), want, atol=1e-5)


def test_bf16_close_to_fp32():
    model = rwkv()
    with torch.no_grad():
        want, _ = model(TOKENS)
        got, _ = model.to(torch.bfloat16)(TOKENS)
    assert got.dtype == torch.bfloat16
    assert (got.float() - want).abs().max() <= 3e-2 * want.abs().max()
