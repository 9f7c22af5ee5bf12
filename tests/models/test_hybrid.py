"""Hybrid layer layouts (``model.layers``): every recurrent family mixed with softmax attention has
a whole-sequence form equal to token-by-token stepping (with and without document starts);
generation keeps constant states for recurrent layers and a KV cache preallocated once for attention
layers; counting adds up per layer; configs round-trip; a tiny hybrid trains, evaluates, generates
and exports end to end; bad layouts are one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from lm.config import load_experiment
from lm.config.resolve import resolve, to_dict
from lm.errors import ConfigError
from lm.models import FAMILIES, all_variants, build_model
from lm.models.counting import count_parameters
from lm.models.flops import matmul_parameters, mixer_forward_flops, training_flops_per_token
from lm.models.lm import LanguageModel
from lm.models.mixer import state_bytes
from lm.models.registry import model_name

REPO = Path(__file__).resolve().parents[2]
RECURRENT = [(f, v) for f, v in all_variants() if FAMILIES[f].mixer.constant_state]
IDS = [f"{f}/{v}" for f, v in RECURRENT]
V = 48


def hybrid(family, variant, layers, n_layers=4, **kw):
    cfg = dict(
        family=family,
        variant=variant,
        vocab_size=V,
        d_model=32,
        n_layers=n_layers,
        n_heads=2,
        layers=layers,
        mlp="rwkv_cmix" if family == "rwkv" else "swiglu",
        norm="layernorm" if family == "rwkv" else "rmsnorm",
    )
    if family == "rwkv":  # the reference init zeroes RWKV-7's output maps: form checks would compare zeros
        cfg["mixer"] = {"init": "simple"}
    cfg.update(kw)
    torch.manual_seed(0)
    return build_model(cfg).eval()


def stepped(model, tokens, doc_starts=None):
    """Logits [B, T, V] from one ``step`` per token; at a document start the row's state restarts."""
    B, T = tokens.shape
    rows = []
    for b in range(B):
        state, out = model.init_state(1), []
        for t in range(T):
            if doc_starts is not None and doc_starts[b, t]:
                state = model.init_state(1)
            logits, state = model.step(tokens[b : b + 1, t], state)
            out.append(logits)
        rows.append(torch.stack(out, 1))
    return torch.cat(rows, 0)


@pytest.mark.parametrize("family,variant", RECURRENT, ids=IDS)
def test_hybrid_forward_equals_stepping(family, variant):
    """T R R T (attention first and last): the whole-sequence form equals stepping, and the state a
    forward returns continues a sequence exactly like the stepped one."""
    model = hybrid(family, variant, {"every": 3, "offset": 0, "mixer": "transformer"})
    assert [b.layer.family for b in model.blocks] == ["transformer", family, family, "transformer"]
    tokens = torch.randint(0, V, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full, _ = model(tokens)
        step = stepped(model, tokens)
        first, carried = model(tokens[:, :7], return_state=True)
        second, _ = model(tokens[:, 7:], state=carried)
    scale = full.abs().max()
    assert (step - full).abs().max() <= 1e-5 * scale, "stepping differs from the whole-sequence form"
    assert (torch.cat([first, second], 1) - full).abs().max() <= 1e-5 * scale, "prefix + carried state differs"


@pytest.mark.parametrize("family,variant", RECURRENT, ids=IDS)
def test_hybrid_forward_with_document_starts_equals_stepping_each_document(family, variant):
    model = hybrid(family, variant, [variant, "transformer", variant, "transformer"])
    tokens = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(2))
    starts = torch.zeros(2, 16, dtype=torch.bool)
    starts[0, [0, 5, 11]] = True
    starts[1, [0, 9]] = True
    with torch.no_grad():
        full, _ = model(tokens, doc_starts=starts)
        step = stepped(model, tokens, starts)
        stream, _ = model(tokens)
    scale = full.abs().max()
    assert (step - full).abs().max() <= 1e-5 * scale, "packed hybrid differs from stepping each document"
    assert (stream - full).abs().max() > 1e-3 * scale, "document starts changed nothing (the check cannot fail)"


def test_rwkv7_value_residual_is_shared_among_rwkv_layers_only():
    """RWKV-7 layers of a hybrid take the first RWKV-7 layer's values, wherever attention sits; the
    first RWKV layer is the family's layer 0 (no value-residual parameters of its own)."""
    model = hybrid("rwkv", "rwkv7", ["transformer", "rwkv7", "transformer", "rwkv7"])
    rwkv = [b.mixer for b in model.blocks if b.layer.family == "rwkv"]
    assert [m.layer_idx for m in rwkv] == [0, 1] and [m.cfg.n_layers for m in rwkv] == [2, 2]
    assert not any(n.startswith("v0") or ".v0" in n for n, _ in rwkv[0].named_parameters())
    assert any("v0" in n for n, _ in rwkv[1].named_parameters())
    assert model.blocks[0].norm0 is None  # ln0 belongs to the model's block 0 only when it is RWKV-7


def test_generation_memory_grows_only_with_attention_layers_and_the_cache_is_preallocated():
    from lm.evaluation.sampling import generate_tokens

    model = hybrid("linear_attention", "gla", {"every": 2, "mixer": "transformer"})  # R T R T
    attention = [i for i, b in enumerate(model.blocks) if not b.mixer.constant_state]
    assert attention == [1, 3]
    prompt = [[3, 5, 7, 11, 13]]
    P = len(prompt[0])
    sizes = {}
    for n_new in (4, 12, 28):
        record = {"bytes": [], "ptrs": []}

        def step(token, state, record=record):
            logits, state = LanguageModel.step(model, token, state)
            record["bytes"].append([state_bytes(layer["mixer"]) for layer in state])
            record["ptrs"].append([state[i]["mixer"]["k"].data_ptr() for i in attention])
            return logits, state

        model.step = step
        greedy = [int(t) for t in generate_tokens(model, prompt, n_new, temperature=0)]
        del model.step
        # the same tokens as decoding with the cache grown by concatenation
        state, ref = None, []
        logits, state = model(torch.tensor(prompt), return_state=True)
        for _ in range(n_new):
            ref.append(int(logits[0, -1].argmax()))
            logits, state = model(torch.tensor([[ref[-1]]]), state=state)
        assert greedy == ref
        assert len({tuple(p) for p in record["ptrs"]}) == 1, "the KV cache moved (grown instead of preallocated)"
        assert len({tuple(b) for b in record["bytes"]}) == 1, "a state changed size during generation"
        sizes[n_new] = record["bytes"][0]
    per_layer = list(zip(*(sizes[n] for n in (4, 12, 28))))
    K, Hkv = model.blocks[1].mixer.head_dim, model.blocks[1].mixer.n_kv_heads
    for i, layer_sizes in enumerate(per_layer):
        if i in attention:  # keys and values for the prompt and every new token, fp32
            assert list(layer_sizes) == [2 * Hkv * (P + n) * K * 4 for n in (4, 12, 28)]
        else:
            assert len(set(layer_sizes)) == 1 and layer_sizes[0] > 0
    # the model's own accounting agrees: recurrent layers constant, attention layers linear in the context
    assert model.state_sizes(1, 100)[0] == model.state_sizes(1, 1000)[0]
    assert model.state_sizes(1, 1000)[1] == 10 * model.state_sizes(1, 100)[1]


def test_preallocated_cache_matches_the_grown_cache_and_refuses_overflow():
    model = hybrid("linear_attention", "gla", {"every": 2, "mixer": "transformer"})
    tokens = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full, _ = model(tokens)
        _, state = model(tokens[:, :4], return_state=True)
        state = model.reserve_state(state, 9)
        ptr = state[1]["mixer"]["k"].data_ptr()
        rest, state = model(tokens[:, 4:], state=state)
        assert state[1]["mixer"]["length"] == 9 and state[1]["mixer"]["k"].data_ptr() == ptr
        assert (rest - full[:, 4:]).abs().max() <= 1e-5 * full.abs().max()
        with pytest.raises(ValueError, match="preallocated KV cache holds 9 positions"):
            model(tokens[:, :1], state=state)


def test_parameters_and_flops_of_a_hybrid_add_up_per_layer():
    base = dict(vocab_size=V, d_model=32, n_layers=4, n_heads=2)
    gla = build_model(dict(base, family="linear_attention", variant="gla"))
    att = build_model(dict(base, family="transformer"))
    mix = build_model(dict(base, family="linear_attention", variant="gla", layers={"every": 4, "mixer": "transformer"}))

    def block(model, i):
        return sum(p.numel() for p in model.blocks[i].parameters())

    outside = gla.num_parameters() - sum(block(gla, i) for i in range(4))
    expected = outside + 3 * block(gla, 0) + block(att, 0)
    assert mix.num_parameters() == expected
    assert count_parameters(mix.cfg) == expected  # on the meta device
    assert [block(mix, i) for i in range(4)] == [block(gla, 0)] * 3 + [block(att, 0)]
    T = 256
    gla_flops, att_flops = gla.blocks[0].mixer.forward_flops(T), att.blocks[0].mixer.forward_flops(T)
    assert mixer_forward_flops(mix, T) == 3 * gla_flops + att_flops
    assert training_flops_per_token(mix, T) == 6 * matmul_parameters(mix) + 3 * mixer_forward_flops(mix, T)
    assert model_name(mix.cfg) == mix.name == "hybrid[linear_attention/gla:3,transformer/transformer:1]"


def test_per_layer_options_and_names():
    model = hybrid(
        "linear_attention",
        "gla",
        ["gla", {"family": "transformer", "mixer": {"n_kv_heads": 1}}, "linear_attention/deltanet", "transformer"],
        mixer={"conv_size": 2},
    )
    names = [b.layer.name for b in model.blocks]
    assert names == [
        "linear_attention/gla",
        "transformer/transformer",
        "linear_attention/deltanet",
        "transformer/transformer",
    ]
    assert [b.mixer.n_kv_heads for b in model.blocks if b.layer.family == "transformer"] == [1, 2]
    # model.mixer applies to the layers of model.family only (both linear-attention variants)
    assert [b.layer.mixer.get("conv_size") for b in model.blocks] == [2, None, 2, None]


def test_single_family_model_is_built_as_before():
    """``layers: null``: one options object for all layers and the model's own config in every mixer."""
    model = build_model(dict(family="linear_attention", variant="gla", vocab_size=V, d_model=32, n_layers=3))
    assert model.name == "linear_attention/gla"
    assert all(b.mixer.cfg is model.cfg for b in model.blocks)
    assert [b.mixer.layer_idx for b in model.blocks] == [0, 1, 2]
    assert len({id(b.mixer.options) for b in model.blocks}) == 1


def test_resolved_config_round_trips(tmp_path):
    cfg = load_experiment(None, ["model=hybrid-gla/tiny", "model.vocab_size=64"])
    plain = to_dict(resolve(cfg))
    assert plain["model"]["layers"] == {"every": 4, "mixer": "transformer"}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(plain))
    again = resolve(yaml.safe_load(path.read_text()))
    torch.manual_seed(0)
    a = build_model(plain["model"])
    torch.manual_seed(0)
    b = build_model(to_dict(again.model))
    assert a.layers == b.layers
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize(
    "layers,message",
    [
        (
            {"every": 4, "mixer": "transfomer"},
            "model.layers.mixer: unknown family or variant 'transfomer' (did you mean 'transformer'?)",
        ),
        ({"evry": 4, "mixer": "transformer"}, "unknown key 'model.layers.evry' (did you mean 'every'?)"),
        ({"every": 8, "mixer": "transformer"}, "places no 'transformer' layer among model.n_layers=4"),
        ({"every": 0, "mixer": "transformer"}, "model.layers.every: must be >= 1"),
        ({"every": 4, "offset": 4, "mixer": "transformer"}, "model.layers.offset: must be in 0..every-1"),
        ({"mixer": "transformer"}, "model.layers.every: missing"),
        (["gla", "transformer"], "the list has 2 entries but model.n_layers is 4"),
        (
            ["gla", "gla", {"family": "transformer", "varient": "x"}, "gla"],
            "'model.layers[2].varient' (did you mean 'variant'?)",
        ),
        (
            ["gla", "gla", "rwkv/rwkv8", "gla"],
            "model.layers[2]: unknown variant 'rwkv8' of family 'rwkv' (did you mean 'rwkv7'?)",
        ),
        (
            ["gla", "gla", {"family": "transformer", "mixer": {"n_kv_head": 1}}, "gla"],
            "model.layers (layer 2, transformer/transformer): model.mixer: unknown key 'model.mixer.n_kv_head'",
        ),
        (7, "model.layers: expected a pattern"),
    ],
)
def test_bad_layouts_are_one_line_config_errors(layers, message):
    overrides = ["model=gla/tiny", "model.n_layers=4", f"model.layers={json.dumps(layers)}"]
    with pytest.raises(ConfigError) as err:
        load_experiment(None, overrides)
    text = str(err.value)
    assert message in text and "\n" not in text


def test_state_passing_is_refused_for_a_hybrid_with_attention():
    with pytest.raises(ConfigError, match="train.state_passing: model hybrid.*KV cache"):
        load_experiment(None, ["model=hybrid-gla/tiny", "train.state_passing=true"])


def test_hybrid_configs_have_one_attention_layer_in_four():
    for name in ("hybrid-gla", "hybrid-gated_deltanet"):
        for size in ("tiny", "small", "125m"):
            cfg = yaml.safe_load((REPO / "configs" / "model" / name / f"{size}.yaml").read_text())
            model = build_model_on_meta(cfg)
            kinds = [b.layer.family for b in model.blocks]
            assert len(kinds) % 4 == 0 and kinds.count("transformer") * 4 == len(kinds), (name, size, kinds)
            assert all(k == "transformer" for k in kinds[3::4])


def build_model_on_meta(cfg):
    from lm.models.counting import build_on_meta

    return build_on_meta({**cfg, "vocab_size": 512})


def test_probes_run_per_layer_on_a_hybrid():
    from lm.probes.runner import run_probes

    model = hybrid("rwkv", "rwkv7", ["rwkv7", "transformer", "rwkv7", "transformer"])
    tokens = torch.randint(0, V, (4, 16), generator=torch.Generator().manual_seed(4))
    result = run_probes(model, tokens, period=8)
    rows = {row["layer"]: row for row in result.per_layer}
    assert [rows[i]["mixer"] for i in range(4)] == ["rwkv/rwkv7", "transformer/transformer"] * 2
    for row in rows.values():
        assert row["form_out_rel"] < 1e-4  # whole-sequence == stepped, attention layers included
        assert row["attn_recon_error"] < 1e-4  # attention layers: the exact softmax matrix
    assert "probe/form_out_rel/max" in result.scalars


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_tiny_hybrid_trains_evaluates_generates_and_exports(tmp_path, tiny_data):
    from lm.training.checkpoint import latest_complete, read_manifest
    from lm.training.export import load_model
    from lm.training.trainer import train
    from tests.evaluation.conftest import run_lm
    from tests.helpers import experiment

    path = experiment(
        tmp_path,
        tiny_data,
        name="hybrid",
        defaults={"model": "hybrid-gla/tiny", "train": "cpu-test"},
        model={"d_model": 32, "n_heads": 2, "n_layers": 4, "max_seq_len": 128},
        train={"max_steps": 6, "val_every_n_steps": 0, "sample_tokens": 0},
        checkpoint={"every_n_steps": 6},
        logging={"tensorboard": False},
    )
    cfg = load_experiment(str(path))
    lines = []
    train(cfg, echo=lines.append)
    run = Path(cfg.run_dir)
    assert any("model: hybrid[linear_attention/gla:3,transformer/transformer:1]" in line for line in lines)
    ckpt = latest_complete(run / "checkpoints")
    assert read_manifest(ckpt)["config"]["model"]["layers"] == {"every": 4, "mixer": "transformer"}
    loaded = load_model(str(run))
    assert [b.layer.family for b in loaded.model.blocks] == ["linear_attention"] * 3 + ["transformer"]
    # ppl
    out = tmp_path / "ppl"
    proc = run_lm("eval", "ppl", str(run), "--max-docs", "2", "--max-tokens", "200", "--out", str(out))
    res = json.loads((out / "ppl.json").read_text())
    assert res["tokens"] > 0 and res["ppl"] > 1 and "bits/byte" in proc.stdout
    # generate
    gen = tmp_path / "gen.json"
    run_lm("generate", str(run), "--prompt", "def ", "-n", "8", "--temperature", "0", "--out", str(gen))
    completions = json.loads(gen.read_text())
    assert completions["model"] == "hybrid[linear_attention/gla:3,transformer/transformer:1]"
    assert completions["completions"][0]["prompt_tokens"] > 1
    # probes: one row per layer, named by its mixer
    report = tmp_path / "probes"
    run_lm("probe", str(run), "--out", str(report), "--batch-size", "4", "--seq-len", "16")
    table = (report / "report.md").read_text()
    assert table.count("| linear_attention/gla |") == 3 and table.count("| transformer/transformer |") == 1
    # export and load back: the same model and logits
    export = tmp_path / "export"
    run_lm("export", str(run), str(export))
    exported = load_model(str(export))
    assert exported.model.layers == loaded.model.layers
    tokens = torch.randint(0, 256, (1, 16))
    assert torch.equal(exported.model(tokens)[0], loaded.model(tokens)[0])


def test_bad_layout_on_the_command_line_is_one_error_line_and_exit_2():
    from tests.evaluation.conftest import error_line, run_lm

    proc = run_lm("config", "show", "default", "model=hybrid-gla/tiny", "model.layers.mixer=transfomer", check=False)
    assert "model.layers.mixer: unknown family or variant 'transfomer' (did you mean 'transformer'?)" in error_line(
        proc
    )


def test_activation_checkpointing_gives_the_same_gradients_in_a_hybrid():
    """Each checkpointed block recomputes with its own family's cross-layer dict (RWKV-7's values)."""
    model = hybrid("rwkv", "rwkv7", ["rwkv7", "transformer", "rwkv7", "transformer"]).train()
    tokens = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(5))
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = ckpt
        logits, _ = model(tokens)
        torch.nn.functional.cross_entropy(logits.reshape(-1, V), tokens.roll(-1, 1).reshape(-1)).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)
