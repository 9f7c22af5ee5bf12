"""``lm import`` of RWKV-7: a small random fla RWKV7ForCausalLM (fla on the Triton interpreter) and a
random state dict in BlinkDL's ``.pth`` layout, imported into this project's export format, give
the source's logits at 1e-4 in fp32. BlinkDL's forward is a small independent implementation below,
written from the reference equations (RWKV-LM ``RWKV-v7``), not this project's model."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from lm.errors import LMError

X = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(3))


# ------------------------------------------------------------------------------------ fla source
@pytest.mark.parametrize(
    "overrides",
    [{}, {"fuse_norm": False, "norm_bias": False, "num_hidden_layers": 3}],
    ids=["fused", "plain-nobias-3layers"],
)
def test_import_fla_rwkv7_matches_fla(tmp_path, fla_interpreter, overrides):
    from fla.models import RWKV7Config, RWKV7ForCausalLM

    from lm.hf.import_fla import import_fla
    from lm.training.export import load_model
    from tests.hf.test_import_fla import randomize

    args = dict(
        hidden_size=64,
        num_hidden_layers=2,
        head_dim=16,
        vocab_size=96,
        intermediate_size=128,
        decay_low_rank_dim=8,
        a_low_rank_dim=8,
        v_low_rank_dim=16,
        gate_low_rank_dim=16,
        fuse_cross_entropy=False,
    )
    fla_model = randomize(RWKV7ForCausalLM(RWKV7Config(**{**args, **overrides})))
    fla_model.save_pretrained(str(tmp_path / "fla"))
    loaded = load_model(str(import_fla(str(tmp_path / "fla"), str(tmp_path / "ours"))))
    assert loaded.config["model"]["family"] == "rwkv" and loaded.config["model"]["n_heads"] == 4
    with torch.no_grad():
        want = fla_model(X).logits.float()
        got, _ = loaded.model(X)
    assert (got - want).abs().max().item() <= 1e-4


def test_import_fla_rwkv7_refuses_missing_features(tmp_path):
    from lm.hf.import_fla import import_fla
    from lm.hf.import_rwkv7 import fla_import

    src = tmp_path / "fla"
    src.mkdir()
    base = {"model_type": "rwkv7", "hidden_size": 64, "num_hidden_layers": 1, "head_dim": 16, "vocab_size": 96}
    for extra, feature in [
        ({"attn": {"layers": [0]}}, "hybrid softmax-attention"),
        ({"hidden_act": "gelu"}, "squared ReLU"),
        ({"value_dim": [128]}, "value width"),
    ]:
        (src / "config.json").write_text(json.dumps({**base, **extra}))
        with pytest.raises(LMError, match=feature):
            import_fla(str(src), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    with pytest.raises(LMError, match="missing weight 'model.layers.0.attn.x_w'"):
        fla_import(base, {"model.layers.0.attn.x_r": torch.zeros(1, 1, 64)}, "src")


# -------------------------------------------------------------------------------- BlinkDL source
def blink_state(V=96, D=64, H=4, L=3, F_=128, r=(8, 8, 16, 16), seed=0):
    """A random state dict in BlinkDL's RWKV-7 key layout (shapes as in RWKV-LM's train_temp model)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=0.3):
        return torch.randn(*shape, generator=g) * s

    rw, ra, rv, rg = r
    sd = {
        "emb.weight": rnd(V, D, s=1.0),
        "blocks.0.ln0.weight": 1 + rnd(D),
        "blocks.0.ln0.bias": rnd(D),
        "ln_out.weight": 1 + rnd(D),
        "ln_out.bias": rnd(D),
        "head.weight": rnd(V, D),
    }
    for i in range(L):
        b = f"blocks.{i}"
        for n in ("ln1", "ln2"):
            sd[f"{b}.{n}.weight"], sd[f"{b}.{n}.bias"] = 1 + rnd(D), rnd(D)
        for c in "rwkvag":
            sd[f"{b}.att.x_{c}"] = torch.rand(1, 1, D, generator=g)
        for n, rank in (("w", rw), ("a", ra), ("v", rv)):  # block 0 has v0/v1/v2 too (never used)
            sd[f"{b}.att.{n}0"], sd[f"{b}.att.{n}1"], sd[f"{b}.att.{n}2"] = rnd(1, 1, D), rnd(D, rank), rnd(rank, D)
        sd[f"{b}.att.g1"], sd[f"{b}.att.g2"] = rnd(D, rg), rnd(rg, D)
        sd[f"{b}.att.k_k"], sd[f"{b}.att.k_a"] = 0.7 + rnd(1, 1, D), 1 + rnd(1, 1, D)
        sd[f"{b}.att.r_k"] = rnd(H, D // H)
        for n in ("receptance", "key", "value", "output"):
            sd[f"{b}.att.{n}.weight"] = rnd(D, D, s=D**-0.5)
        sd[f"{b}.att.ln_x.weight"], sd[f"{b}.att.ln_x.bias"] = 1 + rnd(D), rnd(D)
        sd[f"{b}.ffn.x_k"] = torch.rand(1, 1, D, generator=g)
        sd[f"{b}.ffn.key.weight"], sd[f"{b}.ffn.value.weight"] = rnd(F_, D, s=D**-0.5), rnd(D, F_, s=F_**-0.5)
    return sd


def blink_forward(sd, idx, H):
    """RWKV-7 as in the paper / RWKV-LM (x070), one token at a time, in float64:

    x = ln0(emb[idx]);  per block: x += att(ln1(x)), x += ffn(ln2(x));  logits = head(ln_out(x))
    att: xx = x_{t-1} - x_t;  x_c = x + xx * x_c  (c = r w k v a g)
         r, k, v = W x_r, W x_k, W x_v;  w = exp(-exp(-softplus(-(w0 + tanh(x_w w1) w2)) - 0.5))
         v += (v_first - v) sigmoid(v0 + x_v v1 v2)  (blocks > 0; v_first: block 0's v)
         a = sigmoid(a0 + x_a a1 a2);  g = sigmoid(x_g g1) g2
         kk = normalize_head(k * k_k);  k = k * (1 + (a - 1) k_a)
         S = S diag(w) + (S (-kk)) (kk a)^T + v k^T  (per head, S [N_v, N_k]);  y = S r
         y = GroupNorm_H(y, eps 64e-5) + sum_head(r k r_k) v;  out = W_o (y g)
    ffn: k = x + xx * x_k;  out = W_v relu(W_k k)^2
    """
    p = {k: v.double() for k, v in sd.items()}
    L = 1 + max(int(k.split(".")[1]) for k in p if k.startswith("blocks."))
    D = p["emb.weight"].shape[1]
    N = D // H

    def ln(x, n, eps=1e-5):
        return F.layer_norm(x, (D,), p[f"{n}.weight"], p[f"{n}.bias"], eps)

    B, T = idx.shape
    x = ln(p["emb.weight"][idx], "blocks.0.ln0")
    v_first = None
    for i in range(L):
        b, c = f"blocks.{i}.att", f"blocks.{i}.ffn"
        h = ln(x, f"blocks.{i}.ln1")
        xx = torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], 1) - h
        xs = {n: h + xx * p[f"{b}.x_{n}"].view(D) for n in "rwkvag"}
        r = xs["r"] @ p[f"{b}.receptance.weight"].T
        k = xs["k"] @ p[f"{b}.key.weight"].T
        v = xs["v"] @ p[f"{b}.value.weight"].T
        w_raw = -F.softplus(-(p[f"{b}.w0"].view(D) + torch.tanh(xs["w"] @ p[f"{b}.w1"]) @ p[f"{b}.w2"])) - 0.5
        w = torch.exp(-torch.exp(w_raw))
        if i == 0:
            v_first = v
        else:
            v = v + (v_first - v) * torch.sigmoid(p[f"{b}.v0"].view(D) + xs["v"] @ p[f"{b}.v1"] @ p[f"{b}.v2"])
        a = torch.sigmoid(p[f"{b}.a0"].view(D) + xs["a"] @ p[f"{b}.a1"] @ p[f"{b}.a2"])
        g = torch.sigmoid(xs["g"] @ p[f"{b}.g1"]) @ p[f"{b}.g2"]
        kk = F.normalize((k * p[f"{b}.k_k"].view(D)).view(B, T, H, N), dim=-1).view(B, T, D)
        k = k * (1 + (a - 1) * p[f"{b}.k_a"].view(D))
        ys = []
        S = torch.zeros(B, H, N, N, dtype=torch.float64)
        for t in range(T):
            hv = lambda z: z[:, t].view(B, H, N)  # noqa: E731
            ab = (-hv(kk))[..., :, None] * (hv(kk) * hv(a))[..., None, :]
            S = S * hv(w)[..., None, :] + S @ ab + hv(v)[..., :, None] * hv(k)[..., None, :]
            ys.append((S @ hv(r)[..., None])[..., 0])
        y = torch.stack(ys, 1).reshape(B * T, D)
        y = F.group_norm(y, H, p[f"{b}.ln_x.weight"], p[f"{b}.ln_x.bias"], eps=64e-5).view(B, T, D)
        bonus = (r.view(B, T, H, N) * k.view(B, T, H, N) * p[f"{b}.r_k"]).sum(-1, keepdim=True) * v.view(B, T, H, N)
        x = x + ((y + bonus.view(B, T, D)) * g) @ p[f"{b}.output.weight"].T
        h = ln(x, f"blocks.{i}.ln2")
        xx = torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], 1) - h
        kf = torch.relu((h + xx * p[f"{c}.x_k"].view(D)) @ p[f"{c}.key.weight"].T) ** 2
        x = x + kf @ p[f"{c}.value.weight"].T
    return ln(x, "ln_out") @ p["head.weight"].T


def test_import_blink_pth_matches_reference_equations(tmp_path):
    from lm.hf.import_rwkv7 import import_blink
    from lm.training.export import load_model

    sd = blink_state()
    torch.save({k: v.bfloat16() for k, v in sd.items()}, tmp_path / "rwkv7.pth")  # published files are bf16
    sd = {k: v.bfloat16().float() for k, v in sd.items()}
    loaded = load_model(str(import_blink(str(tmp_path / "rwkv7.pth"), str(tmp_path / "ours"))))
    cfg = loaded.config["model"]
    assert (cfg["d_model"], cfg["n_layers"], cfg["n_heads"], cfg["mixer"]["v_low_rank"]) == (64, 3, 4, 16)
    want = blink_forward(sd, X, H=4).float()
    with torch.no_grad():
        got, _ = loaded.model(X)
        state, stepped = loaded.model.init_state(2), []
        for t in range(X.shape[1]):
            logits, state = loaded.model.step(X[:, t], state)
            stepped.append(logits)
    assert want.abs().max() > 1.0 and math.isfinite(want.abs().max().item())
    assert (got - want).abs().max().item() <= 1e-4
    assert (torch.stack(stepped, 1) - want).abs().max().item() <= 1e-4


def test_blink_refuses_unknown_layouts(tmp_path):
    from lm.hf.import_rwkv7 import blink_import, import_blink

    sd = blink_state(L=1)
    with pytest.raises(LMError, match=r"weights this importer does not know \(blocks.0.att.k1\)"):
        blink_import({**sd, "blocks.0.att.k1": torch.zeros(64, 8)}, "x.pth")
    with pytest.raises(LMError, match="RWKV-4/5/6"):
        blink_import({"emb.weight": torch.zeros(4, 8), "blocks.0.att.time_decay": torch.zeros(8)}, "x.pth")
    with pytest.raises(LMError, match="not a multiple of 64"):
        blink_import(blink_state(L=1, F_=96), "x.pth")
    sd.pop("blocks.0.att.ln_x.bias")
    with pytest.raises(LMError, match="missing weight 'blocks.0.att.ln_x.bias'"):
        blink_import(sd, "x.pth")
    (tmp_path / "bad.pth").write_text("not a checkpoint")
    with pytest.raises(LMError, match="bad.pth: cannot read as a torch state dict"):
        import_blink(str(tmp_path / "bad.pth"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_cli_import_pth_then_generate_and_probe(tmp_path, tokenizer_file):
    from tests.evaluation.conftest import error_line, run_lm

    torch.save(blink_state(V=320, L=2), tmp_path / "rwkv7.pth")
    proc = run_lm(
        "import",
        str(tmp_path / "rwkv7.pth"),
        str(tmp_path / "ours"),
        "--tokenizer",
        str(tokenizer_file),
        "--eod-token",
        "<|endoftext|>",
    )
    assert "rwkv/rwkv7" in proc.stdout
    gen = run_lm("generate", str(tmp_path / "ours"), "-p", "def ", "-n", "4", "--temperature", "0")
    assert gen.returncode == 0
    probe = run_lm(
        "probe", str(tmp_path / "ours"), "--out", str(tmp_path / "probes"), "--batch-size", "4", "--seq-len", "16"
    )
    assert probe.returncode == 0 and any((tmp_path / "probes").iterdir())
    line = error_line(run_lm("import", str(tmp_path / "missing.pth"), str(tmp_path / "x"), check=False))
    assert "missing.pth: no config.json" in line
    torch.save({"emb.weight": torch.zeros(4, 8), "blocks.0.att.time_decay": torch.zeros(8)}, tmp_path / "old.pth")
    line = error_line(run_lm("import", str(tmp_path / "old.pth"), str(tmp_path / "y"), check=False))
    assert "old.pth: not an RWKV-7 state dict" in line


def test_fla_older_single_lerp_parameter(tmp_path):
    """fla's earlier RWKV7Attention kept the six lerps in one ``x_x`` [6, D]: the same import."""
    pytest.importorskip("fla.models", reason="flash-linear-attention (fla.models) is not installed")
    from fla.models import RWKV7Config, RWKV7ForCausalLM

    from lm.hf.import_rwkv7 import fla_import
    from tests.hf.test_import_fla import randomize

    fla_cfg = RWKV7Config(
        hidden_size=64,
        num_hidden_layers=2,
        head_dim=16,
        vocab_size=96,
        intermediate_size=128,
        decay_low_rank_dim=8,
        a_low_rank_dim=8,
        v_low_rank_dim=16,
        gate_low_rank_dim=16,
    )
    sd = randomize(RWKV7ForCausalLM(fla_cfg)).state_dict()
    old = dict(sd)
    for i in range(2):
        a = f"model.layers.{i}.attn"
        old[f"{a}.x_x"] = torch.cat([old.pop(f"{a}.x_{c}").reshape(1, -1) for c in "rwkvag"])
    cfg = fla_cfg.to_dict()
    new_cfg, new_state = fla_import(cfg, sd, "new")
    old_cfg, old_state = fla_import(cfg, old, "old")
    assert new_cfg == old_cfg and new_state.keys() == old_state.keys()
    assert all(torch.equal(new_state[k], old_state[k]) for k in new_state)
