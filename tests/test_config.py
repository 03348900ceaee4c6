import pytest

from scan.config import ConfigError, builtin_config_names, load_config


def test_defaults_and_dotted_overrides():
    cfg = load_config(None, ["cluster.epochs=7", "model.blocks=[2, 2]", "seed=3"])
    assert cfg.cluster.epochs == 7 and cfg.model.blocks == (2, 2) and cfg.seed == 3
    assert cfg.cluster.entropy_weight == 5.0


def test_unknown_key_is_rejected_with_suggestion():
    with pytest.raises(ConfigError, match=r"unknown config key 'cluster.entropy_wieght'.*did you mean 'cluster.entropy_weight'"):
        load_config(None, ["cluster.entropy_wieght=2"])


@pytest.mark.parametrize("override, message", [
    ("cluster.entropy_weight=-1", "cluster.entropy_weight must be >= 0.0, got -1.0"),
    ("selflabel.threshold=1.0", "selflabel.threshold must be < 1.0"),
    ("pretext.lr=0", "pretext.lr must be > 0.0"),
    ("mine.num_neighbors=0", "mine.num_neighbors must be >= 1"),
    ("cluster.optimizer=lamb", "cluster.optimizer must be one of sgd, adam, adamw"),
    ("cluster.epochs=ten", "cluster.epochs must be an integer"),
])
def test_out_of_range_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load_config(None, [override])


def test_every_builtin_config_loads():
    names = builtin_config_names()
    assert "digits" in names
    for name in names:
        load_config(name)


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="neither a YAML file nor a built-in config"):
        load_config(str(tmp_path / "nope.yaml"))
