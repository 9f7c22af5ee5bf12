"""Training recipes (#16): the warmup-stable-decay schedule (cosine unchanged), the optimizer choice
(the default is exactly torch.optim.AdamW on the model's groups), gradient-norm logging and the share of
clipped steps, and warm start (init_from) from an export and from a run's checkpoint."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lm.config import load_experiment, resolve
from lm.errors import ConfigError
from lm.models import build_model
from lm.training.checkpoint import latest_complete, read_manifest
from lm.training.export import checkpoint_state_dict, load_model
from lm.training.module import LMModule
from lm.training.resume_policy import classify, legacy_overrides
from lm.training.schedule import lr_multiplier
from lm.training.trainer import ResumePlan, build_module, train
from tests.training.conftest import experiment, run_lm


def quiet(msg):
    pass


def module(*overrides):
    cfg = load_experiment(
        None, ["model=gla/tiny", "model.vocab_size=64", "model.d_model=32", "model.n_heads=2", *overrides]
    )
    torch.manual_seed(0)
    return LMModule(resolve(cfg))


# ------------------------------------------------------------------------------------ schedule
def test_wsd_schedule_values():
    # warmup 10, max 100, decay_fraction 0.2: constant over [10, 80), linear to min_lr_ratio at 100
    def f(step):
        return lr_multiplier(step, 10, 100, 0.1, "wsd", 0.2)

    assert f(0) == pytest.approx(0.1) and f(4) == pytest.approx(0.5) and f(9) == pytest.approx(1.0)
    assert [f(s) for s in (10, 40, 79, 80)] == [1.0, 1.0, 1.0, 1.0]
    assert f(90) == pytest.approx(0.55)
    assert f(99) == pytest.approx(1.0 - 0.9 * 19 / 20)
    assert f(100) == pytest.approx(0.1) and f(150) == pytest.approx(0.1)
    # decay_fraction 0: constant to the end; 1: the decay starts right after warmup
    assert lr_multiplier(99, 10, 100, 0.1, "wsd", 0.0) == 1.0
    assert lr_multiplier(10, 10, 100, 0.1, "wsd", 1.0) == 1.0
    assert lr_multiplier(55, 10, 100, 0.1, "wsd", 1.0) == pytest.approx(0.55)


def test_cosine_schedule_unchanged():
    def cosine(step, warmup, total, floor):
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if total <= warmup:
            return 1.0
        p = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * p))

    for args in [(10, 100, 0.1), (0, 50, 0.0), (5, 5, 0.2)]:
        for step in range(0, args[1] + 10):
            assert lr_multiplier(step, *args) == cosine(step, *args)  # bit-identical
            assert lr_multiplier(step, *args, "cosine", 0.5) == cosine(step, *args)


def test_module_scheduler_follows_train_schedule():
    m = module("train.schedule=wsd", "train.max_steps=20", "train.warmup_steps=2", "train.decay_fraction=0.5")
    sched = m.configure_optimizers()["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(20):
        lrs.append(sched.get_last_lr()[0] / m.train_cfg.lr)
        sched.optimizer.step()
        sched.step()
    assert lrs == pytest.approx([lr_multiplier(s, 2, 20, m.train_cfg.min_lr_ratio, "wsd", 0.5) for s in range(20)])
    assert lrs[2:10] == [1.0] * 8 and lrs[11] < 1.0


def test_decay_fraction_range_and_schedule_choices():
    with pytest.raises(ConfigError, match="train.decay_fraction"):
        load_experiment(None, ["model=gla/tiny", "train.decay_fraction=1.5"])
    with pytest.raises(ConfigError, match="train.schedule"):
        load_experiment(None, ["model=gla/tiny", "train.schedule=linear"])


# ----------------------------------------------------------------------------------- optimizer
def test_default_optimizer_is_plain_adamw_on_the_model_groups():
    m = module()
    opt = m.configure_optimizers()["optimizer"]
    assert type(opt) is torch.optim.AdamW
    assert opt.defaults["foreach"] is None and opt.defaults["fused"] is None
    decay, no_decay = (g.params for g in m.model.weight_decay_groups())  # GLA: no lr multipliers
    assert [g["weight_decay"] for g in opt.param_groups] == [m.train_cfg.weight_decay, 0.0]
    assert [id(p) for p in opt.param_groups[0]["params"]] == [id(p) for p in decay]
    assert [id(p) for p in opt.param_groups[1]["params"]] == [id(p) for p in no_decay]
    cfg = m.train_cfg
    assert opt.defaults["lr"] == cfg.lr and opt.defaults["betas"] == (cfg.beta1, cfg.beta2)
    assert opt.defaults["eps"] == cfg.eps


@pytest.mark.parametrize("name", ["adamw_foreach", "adamw_fused"])
def test_optimizer_variants_build_and_match_adamw(name):
    tokens = torch.randint(0, 64, (2, 17))
    weights = {}
    for choice in ("adamw", name):
        m = module(f"train.optimizer={choice}")
        try:
            opt = m.configure_optimizers()["optimizer"]
        except ConfigError as e:  # a torch without fused AdamW on CPU: a clear one-line error
            assert name == "adamw_fused" and "train.optimizer=adamw_fused" in str(e) and "\n" not in str(e)
            return
        flag = {"adamw_foreach": "foreach", "adamw_fused": "fused"}.get(choice)
        if flag:
            assert opt.defaults[flag] is True
        for _ in range(3):
            opt.zero_grad()
            total, count = m.loss_sum(tokens)
            (total / count).backward()
            opt.step()
        weights[choice] = [p.detach().clone() for p in m.parameters()]
    for a, b in zip(weights["adamw"], weights[name]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------- grad norm
def test_grad_norm_and_clipped_share_in_metrics(tmp_path, tiny_data):
    path = experiment(tmp_path, tiny_data, train={"max_steps": 6, "grad_clip": 1e-3, "val_every_n_steps": 0})
    cfg = load_experiment(str(path))
    train(cfg, echo=quiet)
    rows = list(csv.DictReader(open(Path(cfg.run_dir) / "logs" / "metrics.csv")))
    norms = [float(r["train/grad_norm"]) for r in rows if r.get("train/grad_norm")]
    shares = [float(r["train/clipped_share"]) for r in rows if r.get("train/clipped_share")]
    assert len(norms) == 6 and all(n > 1e-3 for n in norms)
    assert shares == [1.0] * 6  # every norm exceeded grad_clip=1e-3

    path = experiment(
        tmp_path, tiny_data, name="loose", train={"max_steps": 4, "grad_clip": 1e6, "val_every_n_steps": 0}
    )
    cfg = load_experiment(str(path))
    train(cfg, echo=quiet)
    rows = list(csv.DictReader(open(Path(cfg.run_dir) / "logs" / "metrics.csv")))
    assert [float(r["train/clipped_share"]) for r in rows if r.get("train/clipped_share")] == [0.0] * 4


# -------------------------------------------------------------------------------- warm start
def _losses(run_dir: Path):
    rows = csv.DictReader(open(run_dir / "logs" / "metrics.csv"))
    return [float(r["train/loss"]) for r in rows if r.get("train/loss")]


def test_warm_start_from_export_and_checkpoint(tmp_path, tiny_data):
    base = experiment(tmp_path, tiny_data, name="base", train={"max_steps": 30, "lr": 1e-2, "val_every_n_steps": 0})
    base_cfg = load_experiment(str(base))
    train(base_cfg, echo=quiet)
    base_run = Path(base_cfg.run_dir)
    ckpt = latest_complete(base_run / "checkpoints")
    trained = checkpoint_state_dict(ckpt)
    export = tmp_path / "export"
    run_lm("export", str(base_run), str(export))

    # the module of a warm start holds the trained weights and a fresh optimizer
    vocab = load_model(str(export)).config["model"]["vocab_size"]
    for source in (export, base_run, ckpt):
        path = experiment(tmp_path, tiny_data, name="probe", init_from=str(source))
        exp = resolve(load_experiment(str(path), [f"model.vocab_size={vocab}"]))
        m = build_module(exp, SimpleNamespace(bytes_per_token=0.0), ResumePlan())
        for name, value in m.model.state_dict().items():
            assert torch.equal(value, trained[name]), name
        opt = m.configure_optimizers()["optimizer"]
        assert not opt.state

    # a whole run: step count from 0, and its first loss is the trained model's, not a fresh one's
    for name, source in (("from_export", export), ("from_ckpt", base_run)):
        path = experiment(
            tmp_path, tiny_data, name=name, init_from=str(source), train={"max_steps": 5, "val_every_n_steps": 0}
        )
        cfg = load_experiment(str(path))
        result = train(cfg, echo=quiet)
        assert result.global_step == 5
        assert read_manifest(latest_complete(Path(cfg.run_dir) / "checkpoints"))["step"] == 5
        base_losses = _losses(base_run)
        warm = _losses(Path(cfg.run_dir))
        assert warm[0] < base_losses[0] - 0.5 and abs(warm[0] - base_losses[-1]) < 0.5


def test_warm_start_shape_mismatch_is_one_line(tmp_path, tiny_data):
    base = experiment(tmp_path, tiny_data, name="base", train={"max_steps": 2, "val_every_n_steps": 0})
    base_cfg = load_experiment(str(base))
    train(base_cfg, echo=quiet)
    path = experiment(
        tmp_path,
        tiny_data,
        name="wide",
        init_from=str(base_cfg.run_dir),
        model={"d_model": 48, "n_heads": 2, "n_layers": 2},
    )
    cfg = load_experiment(str(path))
    with pytest.raises(ConfigError) as e:
        train(cfg, echo=quiet)
    msg = str(e.value)
    assert "\n" not in msg and "init_from=" in msg
    assert "32" in msg and "48" in msg and "parameter " in msg
    assert not Path(cfg.run_dir).exists()  # nothing written

    path = experiment(
        tmp_path,
        tiny_data,
        name="deep",
        init_from=str(base_cfg.run_dir),
        model={"d_model": 32, "n_heads": 2, "n_layers": 3},
    )
    with pytest.raises(ConfigError, match=r"parameter blocks\.2\.\S+ \(shape .*\) is missing"):
        train(load_experiment(str(path)), echo=quiet)


def test_init_from_and_resume_conflict(tmp_path):
    with pytest.raises(ConfigError, match="set only one of them"):
        load_experiment(None, ["model=gla/tiny", f"init_from={tmp_path}", f"resume={tmp_path}/ckpt"])
    load_experiment(None, ["model=gla/tiny", f"init_from={tmp_path}", "resume=auto"])  # lm submit's requeues


# ------------------------------------------------------------------------ family parameter groups
def rwkv_module(*overrides):
    return module("model=rwkv7/tiny", "model.d_model=32", "model.n_heads=2", *overrides)


def _group_names(model, groups):
    names = {id(p): n for n, p in model.named_parameters()}
    return [sorted(names[id(p)] for p in g["params"]) for g in groups]


def test_optimizer_uses_the_family_groups_and_multipliers():
    m = rwkv_module("train.lr=1e-3", "train.weight_decay=0.05")
    out = m.configure_optimizers()
    opt, sched = out["optimizer"], out["lr_scheduler"]["scheduler"]
    assert [g["name"] for g in opt.param_groups] == ["decay", "no_decay", "no_decay_lr2x"]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0, 0.0]
    assert [g["lr_multiplier"] for g in opt.param_groups] == [1.0, 1.0, 2.0]
    assert [g["initial_lr"] for g in opt.param_groups] == [1e-3, 1e-3, 2e-3]
    decay, no_decay, fast = _group_names(m.model, opt.param_groups)
    assert fast == ["blocks.0.mixer.w0", "blocks.1.mixer.w0"]
    assert "blocks.0.mixer.receptance.weight" in decay and "blocks.0.mixer.w_up.weight" in no_decay
    assert "blocks.0.mixer.o_norm.weight" in no_decay and "blocks.0.mixer.mu" in no_decay
    # the schedule scales each group's own base: the 2x group stays at twice the rate at every step
    cfg = m.train_cfg
    for step in range(12):
        factor = lr_multiplier(
            step, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio, cfg.schedule, cfg.decay_fraction
        )
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3 * factor, 1e-3 * factor, 2e-3 * factor])
        opt.step()
        sched.step()


def test_opting_out_gives_the_groups_of_before():
    m = rwkv_module("train.lr_multipliers=false", "train.weight_decay_groups=matrices")
    opt = m.configure_optimizers()["optimizer"]
    assert [g["name"] for g in opt.param_groups] == ["decay", "no_decay"]
    trainable = [p for p in m.model.parameters() if p.requires_grad]
    assert [id(p) for p in opt.param_groups[0]["params"]] == [id(p) for p in trainable if p.dim() >= 2]
    assert [id(p) for p in opt.param_groups[1]["params"]] == [id(p) for p in trainable if p.dim() < 2]
    assert {g["initial_lr"] for g in opt.param_groups} == {m.train_cfg.lr}
    with pytest.raises(ConfigError, match="train.weight_decay_groups"):
        load_experiment(None, ["model=gla/tiny", "train.weight_decay_groups=all"])


def _optimizer_groups(run_dir: Path):
    ckpt = latest_complete(run_dir / "checkpoints")
    state = torch.load(ckpt / "model.ckpt", map_location="cpu", weights_only=False)
    return state["optimizer_states"][0]["param_groups"]


def rwkv_experiment(tmp_path, tiny_data, name, **train_keys):
    return experiment(
        tmp_path,
        tiny_data,
        name=name,
        defaults={"model": "rwkv7/tiny", "train": "cpu-test"},
        train={"max_steps": 4, "val_every_n_steps": 0, **train_keys},
        checkpoint={"every_n_steps": 2, "keep_last": 5},
    )


def test_a_training_run_trains_with_the_groups(tmp_path, tiny_data):
    """The optimizer a real run steps (saved in its checkpoint) has the recipe's groups and rates, and
    w0 moved (its 2x group was stepped)."""
    cfg = load_experiment(str(rwkv_experiment(tmp_path, tiny_data, "groups", lr=1e-2, weight_decay=0.1)))
    torch.manual_seed(0)
    train(cfg, echo=quiet)
    groups = _optimizer_groups(Path(cfg.run_dir))
    assert [g["name"] for g in groups] == ["decay", "no_decay", "no_decay_lr2x"]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0, 0.0]
    assert groups[2]["lr"] == pytest.approx(2 * groups[0]["lr"]) and groups[0]["lr"] == pytest.approx(groups[1]["lr"])
    assert len(groups[2]["params"]) == 2  # w0 of both layers
    weights = checkpoint_state_dict(latest_complete(Path(cfg.run_dir) / "checkpoints"))
    fresh = build_model(dict(family="rwkv", variant="rwkv7", vocab_size=64, d_model=32, n_layers=2, n_heads=2))
    assert not torch.equal(weights["blocks.0.mixer.w0"], fresh.blocks[0].mixer.w0.detach())  # init: no randomness


def test_a_run_from_before_the_recipes_resumes_with_its_groups(tmp_path, tiny_data):
    """A checkpoint whose config has no train.weight_decay_groups / train.lr_multipliers (made before
    them) resumes with the two groups it was trained with; a run that has the keys cannot change them."""
    path = rwkv_experiment(tmp_path, tiny_data, "old", weight_decay_groups="matrices", lr_multipliers=False)
    cfg = load_experiment(str(path), ["train.max_steps=2"])
    train(cfg, echo=quiet)
    run_dir = Path(cfg.run_dir)
    ckpt = latest_complete(run_dir / "checkpoints")
    manifest_path = ckpt / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for key in ("weight_decay_groups", "lr_multipliers"):
        del manifest["config"]["train"][key]
    manifest_path.write_text(json.dumps(manifest))
    assert [g["name"] for g in _optimizer_groups(run_dir)] == ["decay", "no_decay"]

    # the defaults (family groups, multipliers) on the command line: the old layout is kept
    resumed = rwkv_experiment(tmp_path, tiny_data, "old")
    result = train(load_experiment(str(resumed), ["resume=auto"]), echo=quiet)
    assert result.global_step == 4
    assert [g["name"] for g in _optimizer_groups(run_dir)] == ["decay", "no_decay"]

    # a run made with the keys: changing them on resume is refused in one line
    path = rwkv_experiment(tmp_path, tiny_data, "new")
    cfg = load_experiment(str(path), ["train.max_steps=2"])
    train(cfg, echo=quiet)
    with pytest.raises(ConfigError, match=r"train.lr_multipliers \(True -> False\)") as e:
        train(load_experiment(str(path), ["resume=auto", "train.lr_multipliers=false"]), echo=quiet)
    assert "\n" not in str(e.value)


def test_legacy_overrides():
    assert legacy_overrides({"train": {"lr": 1.0}}) == {
        "train": {"weight_decay_groups": "matrices", "lr_multipliers": False}
    }
    assert legacy_overrides({"train": {"weight_decay_groups": "family", "lr_multipliers": True}}) == {}
    assert classify("train.weight_decay_groups") == classify("train.lr_multipliers") == "forbidden"


def test_resume_with_a_new_lr_keeps_the_multipliers():
    """A resume that changes train.lr (a notice) rescales every group's base by its multiplier."""
    m = rwkv_module("train.lr=1e-3")
    out = m.configure_optimizers()
    opt, sched = out["optimizer"], out["lr_scheduler"]["scheduler"]
    m.train_cfg = dataclasses.replace(m.train_cfg, lr=4e-3)
    m._trainer = SimpleNamespace(
        lr_scheduler_configs=[SimpleNamespace(scheduler=sched)], optimizers=[opt]
    )  # what _apply_optimizer_settings reads
    m._apply_optimizer_settings()
    assert sched.base_lrs == [4e-3, 4e-3, 8e-3]
    assert [g["initial_lr"] for g in opt.param_groups] == [4e-3, 4e-3, 8e-3]


@pytest.mark.slow
@pytest.mark.distributed
def test_deepspeed_trains_with_the_groups(tmp_path, tiny_data):
    """Under DeepSpeed ZeRO-2 (one CPU rank) the engine's optimizer holds the recipe's groups: names,
    weight decay, the 2x rate, and each group's flat partition holds exactly that group's parameters."""
    path = rwkv_experiment(tmp_path, tiny_data, "ds", max_steps=2)
    run_lm("train", str(path), "train.strategy=deepspeed", "train.zero_stage=2", "train.accelerator=cpu")
    ckpt = latest_complete(tmp_path / "ds" / "checkpoints")
    files = sorted((ckpt / "model.ckpt").rglob("*optim_states.pt"))
    state = torch.load(files[0], map_location="cpu", weights_only=False)["optimizer_state_dict"]
    groups = state["base_optimizer_state"]["param_groups"]
    assert [g["name"] for g in groups] == ["decay", "no_decay", "no_decay_lr2x"]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0, 0.0]  # configs/train/cpu-test: the schema's 0.1
    assert groups[2]["lr"] == pytest.approx(2 * groups[0]["lr"]) and groups[0]["lr"] > 0
    want = [sum(p.numel() for p in g.params) for g in load_model_groups(ckpt)]
    sizes = [t.numel() - pad for t, pad in zip(state["single_partition_of_fp32_groups"], state["group_paddings"])]
    assert sizes == want and want[2] == 2 * 32  # w0 of both layers


def load_model_groups(ckpt: Path):
    """The recipe's groups of the model a checkpoint's config describes (built fresh)."""
    config = read_manifest(ckpt)["config"]["model"]
    return build_model(config).weight_decay_groups()


@pytest.mark.slow
@pytest.mark.distributed
def test_warm_start_from_a_zero3_checkpoint(tmp_path, tiny_data):
    """init_from= a DeepSpeed ZeRO-3 checkpoint (partitioned parameters, one CPU rank): the new run's
    module holds the consolidated trained weights, with a fresh optimizer."""
    base = experiment(tmp_path, tiny_data, name="z3", train={"max_steps": 3, "lr": 1e-2, "val_every_n_steps": 0})
    run_lm("train", str(base), "train.strategy=deepspeed", "train.zero_stage=3", "train.accelerator=cpu")
    ckpt = latest_complete(tmp_path / "z3" / "checkpoints")
    assert (ckpt / "model.ckpt").is_dir()  # a sharded DeepSpeed checkpoint, not one file
    trained = checkpoint_state_dict(ckpt)
    vocab = read_manifest(ckpt)["config"]["model"]["vocab_size"]
    path = experiment(tmp_path, tiny_data, name="warm", init_from=str(tmp_path / "z3"))
    exp = resolve(load_experiment(str(path), [f"model.vocab_size={vocab}"]))
    module = build_module(exp, SimpleNamespace(bytes_per_token=0.0), ResumePlan())
    fresh = build_module(
        resolve(load_experiment(str(experiment(tmp_path, tiny_data, name="fresh")), [f"model.vocab_size={vocab}"])),
        SimpleNamespace(bytes_per_token=0.0),
        ResumePlan(),
    )
    state = module.model.state_dict()
    assert state.keys() == trained.keys()
    for name, value in state.items():
        assert torch.equal(value, trained[name]), name
    assert any(not torch.equal(v, fresh.model.state_dict()[k]) for k, v in state.items()), "nothing was loaded"
    assert not module.configure_optimizers()["optimizer"].state
