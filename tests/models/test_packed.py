"""Document starts (``doc_starts``, ``data.packing: reset``) in every family and variant: a packed window
equals separate forwards of each of its documents (outputs, returned states, parameter gradients); a
row's first document continues the row's carried state unless the row begins with a start; no starts
at all is the stream path."""

import pytest
import torch

from lm.models import all_variants, build_model

VARIANTS = all_variants()
IDS = [f"{f}/{v}" for f, v in VARIANTS]
B, T, VOCAB = 2, 23, 48


def tiny(family, variant, **kw):
    cfg = dict(
        family=family,
        variant=variant,
        vocab_size=VOCAB,
        d_model=32,
        n_layers=2,
        n_heads=2,
        mlp="rwkv_cmix" if family == "rwkv" else "swiglu",
        norm="layernorm" if family == "rwkv" else "rmsnorm",
    )
    cfg.update(kw)
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():  # off the initialisation, so that zero-initialised maps do not hide a path
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def starts_of(positions):
    s = torch.zeros(B, T, dtype=torch.bool)
    for b, ts in enumerate(positions):
        s[b, ts] = True
    return s


LAYOUTS = {
    # row 0: starts at 0, a length-1 document [5, 6); row 1: no start (one continuing segment)
    "start0-len1-none": starts_of([[0, 5, 6, 14], []]),
    # row 0 continues, then documents incl. a length-1 one at the end; row 1 starts at 0 and at 11
    "continue-len1end": starts_of([[3, 4, 20, 22], [0, 11]]),
}
TOKENS = torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(1))
PREFIX = torch.randint(0, VOCAB, (B, 7), generator=torch.Generator().manual_seed(2))
WEIGHTS = torch.randn(B, T, VOCAB, generator=torch.Generator().manual_seed(3))


def documents(starts):
    """[(row, begin, end)] of every segment of the window."""
    out = []
    for b in range(B):
        cuts = [0] + [t for t in range(1, T) if starts[b, t]] + [T]
        out += [(b, a, e) for a, e in zip(cuts[:-1], cuts[1:])]
    return out


def row_state(state, b):
    """Row b of a model state (lists, dicts, tuples of tensors with a leading batch dim)."""
    if state is None:
        return None
    if isinstance(state, torch.Tensor):
        return state[b : b + 1]
    if isinstance(state, dict):
        return {k: row_state(v, b) for k, v in state.items()}
    return type(state)(row_state(v, b) for v in state)


def assert_states_close(got, want, where="state"):
    if want is None or got is None:
        assert got is None and want is None, where
        return
    if isinstance(want, torch.Tensor):
        assert got.shape == want.shape, f"{where}: {tuple(got.shape)} != {tuple(want.shape)}"
        finite = torch.isfinite(want)
        assert torch.equal(finite, torch.isfinite(got)) and torch.equal(got[~finite], want[~finite]), where
        scale = max(want[finite].abs().max().item(), 1.0) if finite.any() else 1.0
        assert (got[finite].float() - want[finite].float()).abs().max().item() <= 1e-5 * scale, where
        return
    if isinstance(want, dict):
        assert got.keys() == want.keys(), where
        for k in want:
            assert_states_close(got[k], want[k], f"{where}.{k}")
        return
    assert len(got) == len(want), where
    for i, (g, w) in enumerate(zip(got, want)):
        assert_states_close(g, w, f"{where}[{i}]")


def separate(model, starts, state):
    """Every document run alone (a row's continuing first document from the row's state): logits
    [B, T, V] in the window's layout and each row's state after its last document."""
    logits = torch.zeros(B, T, VOCAB)
    finals = [None] * B
    for b, a, e in documents(starts):
        carried = row_state(state, b) if a == 0 and not starts[b, 0] else None
        out, s = model(TOKENS[b : b + 1, a:e], state=carried, return_state=True)
        logits = logits.index_put((torch.tensor([b]), torch.arange(a, e)), out[0])
        finals[b] = s
    return logits, finals


def grads(model, loss):
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def carried_state(model):
    with torch.no_grad():
        _, state = model(PREFIX, return_state=True)
    return state


@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS))
@pytest.mark.parametrize("carry", [False, True], ids=["fresh", "carried"])
@pytest.mark.parametrize("family,variant", VARIANTS, ids=IDS)
def test_packed_equals_separate_documents(family, variant, carry, layout):
    model = tiny(family, variant)
    starts = LAYOUTS[layout]
    state = carried_state(model) if carry else None
    attention = family == "transformer"
    if attention and carry:
        with pytest.raises(ValueError, match="Transformer: document resets with a carried KV cache are not supported"):
            model(TOKENS, state=state, doc_starts=starts)
        return
    # the Transformer's cache is one tensor: rows whose last documents differ in length cannot return it
    return_state = not attention
    packed, packed_state = model(TOKENS, state=state, return_state=return_state, doc_starts=starts)
    g_packed = grads(model, (packed * WEIGHTS).sum())
    alone, finals = separate(model, starts, state)
    g_alone = grads(model, (alone * WEIGHTS).sum())

    scale = alone.abs().max()
    assert (packed - alone).abs().max() <= 1e-5 * scale, "packed window differs from separate documents"
    if return_state:
        for b in range(B):
            assert_states_close(row_state(packed_state, b), finals[b], f"row {b}")
    assert g_packed.keys() == g_alone.keys()
    for name, g in g_alone.items():
        err = (g_packed[name] - g).abs().max()
        assert err <= 1e-4 * g.abs().max() + 1e-7, f"gradient of {name}: {err:.3g}"


@pytest.mark.parametrize("family,variant", VARIANTS, ids=IDS)
def test_no_starts_is_the_stream(family, variant):
    """All-False doc_starts (one continuing segment per row) equals doc_starts=None, with and
    without a carried state, states included."""
    model = tiny(family, variant)
    none = torch.zeros(B, T, dtype=torch.bool)
    with torch.no_grad():
        for state in (None, carried_state(model)):
            want, want_state = model(TOKENS, state=state, return_state=True)
            got, got_state = model(TOKENS, state=state, return_state=True, doc_starts=none)
            assert (got - want).abs().max() <= 1e-6 * max(want.abs().max().item(), 1.0)
            for b in range(B):
                assert_states_close(row_state(got_state, b), row_state(want_state, b), f"row {b}")


def test_transformer_returns_the_cache_of_equal_last_documents():
    """The Transformer's returned state is the KV cache of each row's last document (rotated with the
    document's own positions), so it continues that document; unequal lengths are refused."""
    model = tiny("transformer", "transformer")
    starts = starts_of([[0, 9, 16], [3, 16]])  # both rows end in a 7-token document
    more = torch.randint(0, VOCAB, (B, 5), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        _, state = model(TOKENS, return_state=True, doc_starts=starts)
        assert state[0]["mixer"]["k"].shape[2] == 7
        # an empty cache (the state before any token) is no carried context: allowed
        from_empty, _ = model(TOKENS, state=model.init_state(B), doc_starts=starts)
        plain, _ = model(TOKENS, doc_starts=starts)
        assert torch.equal(from_empty, plain)
        got, _ = model(more, state=state)
        want, _ = model(torch.cat([TOKENS[:, 16:], more], 1))
        assert (got - want[:, 7:]).abs().max() <= 1e-5 * want.abs().max()
        with pytest.raises(ValueError, match="differ in length across rows"):
            model(TOKENS, return_state=True, doc_starts=LAYOUTS["start0-len1-none"])


@pytest.mark.parametrize(
    "family,variant", [("rwkv", "rwkv7"), ("linear_attention", "deltanet"), ("transformer", "transformer")]
)
def test_activation_checkpointing_passes_the_segments(family, variant):
    starts = LAYOUTS["continue-len1end"]
    results = []
    for ckpt in (False, True):
        model = tiny(family, variant).train()
        model.gradient_checkpointing = ckpt
        logits, _ = model(TOKENS, doc_starts=starts)
        results.append((logits.detach(), grads(model, (logits * WEIGHTS).sum())))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-6)
    for name, g in results[0][1].items():
        assert torch.allclose(g, results[1][1][name], atol=1e-6, rtol=1e-5), name


def test_doc_starts_shape_is_checked():
    model = tiny("gated_rnn", "static")
    with pytest.raises(ValueError, match=r"doc_starts: expected shape \(2, 23\)"):
        model(TOKENS, doc_starts=torch.zeros(2, 22, dtype=torch.bool))
    with pytest.raises(ValueError, match="document starts: expected a bool tensor"):
        model(TOKENS, doc_starts=torch.zeros(2, 23))


def test_step_form_is_unchanged_after_a_packed_window():
    """A packed window's returned state continues each row's last document token by token."""
    model = tiny("linear_attention", "gated_deltanet")
    starts = LAYOUTS["continue-len1end"]
    more = torch.randint(0, VOCAB, (B, 4), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        _, state = model(TOKENS, return_state=True, doc_starts=starts)
        stepped = []
        for t in range(more.shape[1]):
            logits, state = model.step(more[:, t], state)
            stepped.append(logits)
        # row 0's last document is the length-1 one at 22; row 1's starts at 11
        for b, a in ((0, 22), (1, 11)):
            want, _ = model(torch.cat([TOKENS[b : b + 1, a:], more[b : b + 1]], 1))
            got = torch.stack(stepped, 1)[b]
            assert (got - want[0, T - a :]).abs().max() <= 1e-5 * want.abs().max()
