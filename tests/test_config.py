import pytest

from xmodal.config import ConfigError, TowerConfig, apply_overrides, load_config


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_yaml_types_and_defaults(tmp_path):
    p = write(tmp_path, """
output_dir: runs/x
model:
  embed_dim: 128
  towers:
    image: {kind: cnn, image_size: 64}
    text: {kind: lstm, context_length: 16, options: {hidden: 64}}
train: {lr: 1, betas: [0.9, 0.95]}
""")
    cfg = load_config(p)
    assert cfg.model.towers["image"] == TowerConfig(kind="cnn", image_size=64)
    assert cfg.model.towers["text"].options == {"hidden": 64}
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)  # YAML int accepted for a float field
    assert cfg.train.betas == (0.9, 0.95)
    assert cfg.train.batch_size == 64  # default kept


def test_dotted_overrides(tmp_path):
    p = write(tmp_path, "model: {towers: {image: {kind: cnn}, text: {kind: lstm}}}\n")
    cfg = load_config(p, ["train.lr=3e-4", "model.towers.image.freeze=true", "data.train=some/file.csv",
                          "train.max_steps=7"])
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.model.towers["image"].freeze is True
    assert cfg.data.train == "some/file.csv" and cfg.train.max_steps == 7


@pytest.mark.parametrize("text, overrides, expected", [
    ("train: {lrr: 1}\n", [], "unknown key train.lrr"),
    ("train: {lr: fast}\n", [], "train.lr: expected a number, got str 'fast'"),
    ("train: {batch_size: 2.5}\n", [], "train.batch_size: expected an integer"),
    ("train: {mixed_precision: fp8}\n", [], "train.mixed_precision: 'fp8' is not one of"),
    ("model: {towers: {image: {name: x}}}\n", [], "model.towers.image.kind: required"),
    ("model: {towers: {image: {kind: cnn, freeze: maybe}}}\n", [], "model.towers.image.freeze: expected true/false"),
    ("train: {batch_size: 0}\n", [], "train.batch_size: must be positive"),
    ("", ["train.epochs=-1"], "train.epochs: must be positive"),
    ("", ["train.lr"], "expected key.sub=value"),
    ("tasks: {s: {kind: regression, modalities: [image, text], fusion: late_prob}}\n"
     "model: {towers: {image: {kind: cnn}, text: {kind: lstm}}}\n", [], "tasks.s.fusion: late_prob averages"),
    ("- a\n- b\n", [], "top level must be a mapping"),
    ("train: [1, 2\n", [], "invalid YAML"),
])
def test_errors_name_file_and_field(tmp_path, text, overrides, expected):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(p, overrides)
    assert expected in str(e.value)
    assert str(p) in str(e.value)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_override_creates_nested_mapping():
    d = apply_overrides({}, ["model.towers.audio.kind=cnn"])
    assert d == {"model": {"towers": {"audio": {"kind": "cnn"}}}}


def test_every_shipped_config_loads():
    from pathlib import Path
    configs = sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.yaml"))
    assert configs, "configs/ is empty"
    for path in configs:
        load_config(path)


def test_a_key_typo_suggests_the_key_and_names_where_it_was_written(tmp_path):
    p = write(tmp_path, "train:\n  epoch: 5\n")
    with pytest.raises(ConfigError) as e:  # the typo is in the file: the file is named, not "+ overrides"
        load_config(p, ["train.lr=0.01", "output_dir=runs/x"])
    assert str(e.value).startswith(f"{p}: unknown key train.epoch (valid keys of train: ")
    assert str(e.value).endswith("; did you mean train.epochs?") and "overrides" not in str(e.value)
    ok = write(tmp_path, "train: {epochs: 5}\n")
    with pytest.raises(ConfigError) as e:  # the typo is in an override: that override is named
        load_config(ok, ["train.lr=0.01", "train.warmup_step=3"])
    assert str(e.value).startswith(f"{ok} + override train.warmup_step=3: unknown key train.warmup_step")
    assert str(e.value).endswith("; did you mean train.warmup_steps?")
    with pytest.raises(ConfigError) as e:  # a bad value from an override: that override
        load_config(ok, ["train.epochs=-1"])
    assert str(e.value) == f"{ok} + override train.epochs=-1: train.epochs: must be positive, got -1"
    with pytest.raises(ConfigError) as e:  # nothing close: no guess
        load_config(write(tmp_path, "train: {zzzz: 1}\n"))
    assert "did you mean" not in str(e.value)
