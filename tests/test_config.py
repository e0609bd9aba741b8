from dataclasses import dataclass, field

import pytest

from benchmark.config import ConfigError, bounds, build_config, load_config_file, merge_layers, parse_set_option


@dataclass
class ExampleConfig:
    lr: float = field(default=0.01, metadata=bounds(min=0))
    k: int = field(default=3, metadata=bounds(min=1, max=75))
    loss: str = field(default="l2", metadata=bounds(choices=("l1", "l2")))
    fast: bool = False
    layers: tuple[str, ...] = ("attn2",)


def test_defaults():
    config = build_config(ExampleConfig, {}, "attack")
    assert config == ExampleConfig()


def test_unknown_key_names_key_and_valid_keys():
    with pytest.raises(ConfigError) as error:
        build_config(ExampleConfig, {"lr_rate": 0.1}, "attack")
    message = str(error.value)
    assert "attack.lr_rate" in message
    assert "fast, k, layers, loss, lr" in message
    assert "Did you mean attack.lr" in message


@pytest.mark.parametrize("values, fragment", [
    ({"k": "five"}, "attack.k: expected an integer"),
    ({"k": 2.5}, "attack.k: expected an integer"),
    ({"k": 0}, "below the minimum 1"),
    ({"k": 76}, "above the maximum 75"),
    ({"lr": -1.0}, "below the minimum 0"),
    ({"loss": "l3"}, "valid: l1, l2"),
    ({"fast": "yes"}, "expected true or false"),
    ({"lr": True}, "expected a number"),
])
def test_invalid_values(values, fragment):
    with pytest.raises(ConfigError, match=fragment):
        build_config(ExampleConfig, values, "attack")


def test_coercions():
    config = build_config(ExampleConfig, {"lr": 1, "layers": "attn1, attn2"}, "attack")
    assert config.lr == 1.0 and isinstance(config.lr, float)
    assert config.layers == ("attn1", "attn2")


@pytest.mark.parametrize("option, expected", [
    ("attack.k=5", ("attack", "k", 5)),
    ("defense.lr=1e-5", ("defense", "lr", 1e-5)),
    ("defense.fast=true", ("defense", "fast", True)),
    ("run.device=cpu", ("run", "device", "cpu")),
    ("attack.layers=[a, b]", ("attack", "layers", ["a", "b"])),
])
def test_parse_set_option(option, expected):
    assert parse_set_option(option) == expected


@pytest.mark.parametrize("option", ["attack.k", "k=5"])
def test_parse_set_option_rejects_malformed(option):
    with pytest.raises(ConfigError):
        parse_set_option(option)


def test_config_files(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("attack:\n  k: 5\nrun:\n  seed: 3\n")
    toml_file = tmp_path / "c.toml"
    toml_file.write_text("[attack]\nk = 5\n[run]\nseed = 3\n")
    assert load_config_file(yaml_file) == load_config_file(toml_file) == {"attack": {"k": 5}, "run": {"seed": 3}}

    bad = tmp_path / "bad.yaml"
    bad.write_text("k: 5\n")
    with pytest.raises(ConfigError, match="sections"):
        load_config_file(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config_file(tmp_path / "missing.yaml")


def test_merge_layers_later_wins():
    merged = merge_layers({"attack": {"k": 3, "lr": 1}}, None, {"attack": {"k": 5}})
    assert merged == {"attack": {"k": 5, "lr": 1}}
