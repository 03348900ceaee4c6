import pytest

from scan.config import ConfigError, builtin_config_names
from scan.pipeline import load_config


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
    ("mine.num_neighbors=-1", "mine.num_neighbors must be >= 0"),
    ("cluster.optimizer=lamb", "cluster.optimizer must be one of sgd, adam, adamw"),
    ("cluster.epochs=ten", "cluster.epochs must be an integer"),
    (f"seed={2 ** 70}", "seed must be <= 4294967295"),       # torch and scikit-learn cannot take it
    ("seed=-1", "seed must be >= 0"),
    ("model.blocks=[]", "model.blocks must hold at least 1 value"),
    ("model.blocks=[1, 0]", "model.blocks must be >= 1, got 0"),
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


def _ranged_fields(cls, prefix=""):
    """(dotted key, metadata) of every field declaring a range or choices, recursively."""
    import dataclasses
    from typing import get_type_hints
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _ranged_fields(hints[f.name], f"{prefix}{f.name}.")
        elif any(f.metadata.get(k) is not None for k in ("lo", "hi", "choices")):
            yield prefix + f.name, dict(f.metadata)


def _violations(meta):
    """Values just outside the declared range (or not among the choices)."""
    if meta["choices"] is not None:
        yield "definitely_not_a_choice"
    if meta["lo"] is not None:
        yield meta["lo"] if meta["lo_open"] else meta["lo"] - 1
    if meta["hi"] is not None:
        yield meta["hi"] if meta["hi_open"] else meta["hi"] + 1


def test_every_ranged_field_rejects_out_of_range_values_naming_the_key():
    from scan.config import Config
    fields = list(_ranged_fields(Config))
    assert len(fields) >= 20  # the walk really found the config's ranges
    for key, meta in fields:
        for value in _violations(meta):
            with pytest.raises(ConfigError, match=rf"^{key.replace('.', chr(92) + '.')} must be"):
                load_config(None, {key.split(".")[0]: _nest(key.split(".")[1:], value)} if "." in key
                            else {key: value})


def _nest(parts, value):
    return {parts[0]: value} if len(parts) == 1 else {parts[0]: _nest(parts[1:], value)}


def test_a_config_can_start_from_a_base_and_cycles_are_refused(tmp_path):
    (tmp_path / "variant.yaml").write_text("base: cifar10\ncluster:\n  epochs: 3\n")
    cfg = load_config(str(tmp_path / "variant.yaml"))
    assert cfg.cluster.epochs == 3 and cfg.pretext.lr == 0.4 and cfg.data.dataset == "cifar10"
    assert load_config("cifar100-20").data.dataset == "cifar100-20"
    (tmp_path / "a.yaml").write_text(f"base: {tmp_path / 'b.yaml'}\n")
    (tmp_path / "b.yaml").write_text(f"base: {tmp_path / 'a.yaml'}\n")
    with pytest.raises(ConfigError, match="refers back to itself"):
        load_config(str(tmp_path / "a.yaml"))


def test_exponent_numbers_without_a_dot_are_numbers():
    """YAML 1.1 reads 1e-3 as a string (it wants 1.0e-3); every user writes it without the dot."""
    cfg = load_config(None, ["cluster.lr=1e-3", "selflabel.lr=2E-5", "pretext.epochs=1e2"])
    assert cfg.cluster.lr == 0.001 and cfg.selflabel.lr == 2e-5 and cfg.pretext.epochs == 100
    with pytest.raises(ConfigError, match="cluster.lr must be a number, got '1e-3x'"):
        load_config(None, ["cluster.lr=1e-3x"])
