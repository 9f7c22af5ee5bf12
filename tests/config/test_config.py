"""The config system: composition, overrides, typed schema errors with full key paths and
suggestions, and `lm config show`."""

import pytest
import yaml

from lm.cli.main import main
from lm.config import load_experiment
from lm.config.loader import compose, parse_overrides
from lm.errors import ConfigError


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def config_dir(tmp_path, monkeypatch):
    root = tmp_path / "configs"
    write(root / "data" / "d1.yaml", "name: d1\nsource: {kind: text, paths: [a.txt]}\n")
    write(root / "model" / "m" / "small.yaml", "family: transformer\nd_model: 64\nn_heads: 4\nn_layers: 2\n")
    write(root / "model" / "other.yaml", "family: linear_attention\nvariant: gla\nd_model: 32\nn_heads: 2\n")
    write(root / "train" / "t.yaml", "max_steps: 7\nlr: 0.01\n")
    write(root / "experiment" / "exp.yaml", "defaults: {data: d1, model: m/small, train: t}\ntrain: {max_steps: 9}\n")
    monkeypatch.setenv("LM_CONFIG_DIR", str(root))
    return root


def test_composition_order(config_dir):
    cfg = load_experiment("exp")
    assert cfg.name == "exp"  # from the file name
    assert cfg.data.name == "d1" and cfg.data.out_dir == "artifacts/data/d1"
    assert cfg.model.d_model == 64 and cfg.train.lr == 0.01
    assert cfg.train.max_steps == 9  # the experiment body beats the group file
    cfg = load_experiment("exp", ["train.max_steps=11", "model=other", "name=x"])
    assert cfg.train.max_steps == 11 and cfg.model.family == "linear_attention" and cfg.name == "x"
    assert cfg.run_dir == "runs/x"
    assert yaml.safe_load(__import__("lm.config", fromlist=["to_yaml"]).to_yaml(cfg))["run_dir"] == "runs/x"


def test_unknown_key_suggests(config_dir):
    with pytest.raises(ConfigError) as e:
        load_experiment("exp", ["train.max_stpes=3"])
    msg = str(e.value)
    assert "train.max_stpes" in msg and "did you mean 'max_steps'" in msg and "command line" in msg


def test_unknown_key_in_file_names_file(config_dir):
    write(config_dir / "train" / "t.yaml", "max_steps: 7\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_experiment("exp")
    assert "t.yaml" in str(e.value) and "train.learning_rate" in str(e.value)


def test_wrong_type_names_key(config_dir):
    with pytest.raises(ConfigError) as e:
        load_experiment("exp", ["train.max_steps=many"])
    assert "train.max_steps" in str(e.value) and "many" in str(e.value)


def test_enumerated_value_suggests(config_dir):
    with pytest.raises(ConfigError) as e:
        load_experiment("exp", ["train.strategy=deepspeeed"])
    assert "train.strategy" in str(e.value) and "did you mean 'deepspeed'" in str(e.value)


def test_unknown_group_config_lists_known(config_dir):
    with pytest.raises(ConfigError) as e:
        load_experiment("exp", ["model=m/smal"])
    assert "m/small" in str(e.value) and "unknown model config" in str(e.value)


def test_ranges(config_dir):
    with pytest.raises(ConfigError, match="train.seq_len: must be > 0"):
        load_experiment("exp", ["train.seq_len=0"])
    with pytest.raises(ConfigError, match="data.validation_fraction"):
        load_experiment("exp", ["data.validation_fraction=1.5"])


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["train.lr"])


def test_invalid_yaml_names_line(config_dir):
    write(config_dir / "experiment" / "bad.yaml", "train:\n  lr: [1, 2\n")
    with pytest.raises(ConfigError) as e:
        compose("bad")
    assert "bad.yaml" in str(e.value) and "invalid YAML" in str(e.value)


def test_cli_config_show(config_dir, capsys):
    main(["config", "show", "exp", "train.lr=0.5"])
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["train"]["lr"] == 0.5 and out["model"]["family"] == "transformer"


def test_cli_error_is_one_line_exit_2(config_dir, capsys):
    with pytest.raises(SystemExit) as e:
        main(["config", "show", "exp", "model.d_modle=3"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "d_model" in err


def test_repository_experiments_validate():
    for name in ("default",):
        cfg = load_experiment(name)
        assert cfg.model.family


def test_choices_live_on_the_schema():
    """Every enumerated key's allowed values come from its schema field; the loader checks them all."""
    import dataclasses

    from lm.config.loader import CHOICES
    from lm.config.schema import ModelConfig, TrainConfig, choices

    assert CHOICES == choices()
    assert CHOICES["train.strategy"] == ("auto", "single", "ddp", "deepspeed")
    assert {f.name: f.metadata["choices"] for f in dataclasses.fields(ModelConfig) if "choices" in f.metadata}[
        "norm"
    ] == ("rmsnorm", "layernorm", "none")
    for key, options in CHOICES.items():
        section, _, leaf = key.rpartition(".")
        default = {"train": TrainConfig(), "model": ModelConfig()}.get(section)
        if default is not None and getattr(default, leaf) is not None:
            assert getattr(default, leaf) in options, key


def test_did_you_mean_is_shared():
    from lm.errors import did_you_mean

    assert did_you_mean("deepspeeed", ["ddp", "deepspeed"]) == " (did you mean 'deepspeed'?)"
    assert did_you_mean("zzz", ["ddp", "deepspeed"]) == ""
    with pytest.raises(ConfigError, match="did you mean 'induction'"):
        from data.tasks import build_task

        build_task("inducton")


def test_resolve_fills_data_fields_once_and_freezes():
    """resolve(): vocabulary from a corpus (rounded up to 64), shapes and task_output from a task; the
    result is typed and frozen; the DictConfig it came from is unchanged."""
    import dataclasses
    from types import SimpleNamespace

    from lm.config import resolve, to_dict, to_yaml
    from lm.config.schema import ExperimentConfig

    cfg = load_experiment(None, ["model=gla/tiny"])
    exp = resolve(cfg, SimpleNamespace(vocab_size=1000))
    assert isinstance(exp, ExperimentConfig) and exp.model.vocab_size == 1024 and cfg.model.vocab_size == 0
    assert isinstance(exp.train.lr, float) and isinstance(exp.train.max_steps, int)
    with pytest.raises(dataclasses.FrozenInstanceError):
        exp.train.lr = 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        exp.model = None
    assert dataclasses.replace(exp.train, lr=1.0).lr == 1.0
    # the typed config writes the same config.yaml and reads back from a checkpoint's plain dict
    assert yaml.safe_load(to_yaml(exp))["model"]["vocab_size"] == 1024
    assert resolve(to_dict(exp)) == exp
    with pytest.raises(ConfigError, match="smaller than the tokenizer"):
        resolve(load_experiment(None, ["model=gla/tiny", "model.vocab_size=64"]), SimpleNamespace(vocab_size=1000))

    task = load_experiment(None, ["model=gla/tiny", "data.source.kind=task", "data.task.name=icl_regression"])
    from data.tasks import task_from_config

    spec = task_from_config(task.data).spec
    exp = resolve(task, SimpleNamespace(task=SimpleNamespace(spec=spec)))
    assert exp.data.task_output == "vectors" and exp.model.input_dim == spec.input_dim
    assert exp.model.output_dim == spec.output_dim and exp.model.vocab_size == 0
    wrong = load_experiment(
        None, ["model=gla/tiny", "data.source.kind=task", "data.task.name=icl_regression", "data.task_output=classes"]
    )
    with pytest.raises(ConfigError, match="data.task_output"):
        resolve(wrong, SimpleNamespace(task=SimpleNamespace(spec=spec)))
