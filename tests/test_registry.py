import sys
import textwrap

import pytest

from benchmark.registry import (
    ATTACKS, DEFENSES, MODELS, PluginLoadError, Registry, UnknownPluginError, import_object,
)


def test_builtins_are_listed():
    assert "none" in ATTACKS.names()
    assert "none" in DEFENSES.names()
    assert "world" in MODELS.names()


def test_unknown_name_lists_valid_names():
    with pytest.raises(UnknownPluginError) as error:
        DEFENSES.get("advunlern")
    message = str(error.value)
    assert "unknown defense 'advunlern'" in message
    assert "none" in message


def test_close_name_is_suggested():
    registry = Registry("attack", {"unlearndiffatk": "attacks.no_attack:NoAttack"})
    with pytest.raises(UnknownPluginError, match="Did you mean 'unlearndiffatk'"):
        registry.get("unlearndifatk")


def test_family_expands_to_members():
    assert DEFENSES.expand(["esd", "advunlearn"]) == ("esd-x", "esd-u", "advunlearn")
    assert ATTACKS.expand(["none", "p4d"]) == ("none", "p4d-n", "p4d-k")


def test_family_expansion_keeps_repeats():
    assert DEFENSES.expand(["esd-u", "esd"]) == ("esd-u", "esd-x", "esd-u")


def test_registered_name_shadows_family():
    registry = Registry("attack", {"p4d": "attacks.no_attack:NoAttack"}, families={"p4d": ("p4d-n", "p4d-k")})
    assert registry.expand(["p4d"]) == ("p4d",)


def test_family_name_alone_is_explained():
    with pytest.raises(UnknownPluginError, match=r"'esd' is a family name \(esd-x, esd-u\): pass one of them"):
        DEFENSES.get("esd")


def test_import_failure_names_plugin_and_error():
    registry = Registry("defense", {"broken": "no_such_module_anywhere:Thing"})
    with pytest.raises(PluginLoadError) as error:
        registry.get("broken")
    assert "'broken'" in str(error.value)
    assert "ModuleNotFoundError" in str(error.value)


def test_lazy_import(tmp_path, monkeypatch):
    (tmp_path / "lazy_plugin_module.py").write_text("LOADED = True\nclass Thing:\n    '''A thing.'''\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = Registry("attack", {"thing": "lazy_plugin_module:Thing"})
    assert "lazy_plugin_module" not in sys.modules
    assert registry.describe("thing") == "A thing."
    assert "lazy_plugin_module" in sys.modules


def test_decorator_registration():
    registry = Registry("attack")

    @registry.register("mine")
    class Mine:
        """Mine."""

    assert registry.get("mine") is Mine
    with pytest.raises(Exception, match="already registered"):
        registry.register("mine", Mine)


def _install_fake_distribution(root, group, name, value):
    """Write a real .dist-info folder with entry_points.txt, as pip would."""
    dist = root / "fake_erasure_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-erasure-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[{group}]\n{name} = {value}\n")


def test_entry_point_plugin(tmp_path, monkeypatch):
    (tmp_path / "fake_erasure_plugin.py").write_text(textwrap.dedent('''
        from benchmark.plugins import Defense

        class FakeDefense(Defense):
            """A defense from another package."""
            name = "fake-defense"

            def erase(self, model, context):
                return {}
    '''))
    _install_fake_distribution(tmp_path, "robust_erasure_bench.defenses", "fake-defense",
                               "fake_erasure_plugin:FakeDefense")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = Registry("defense", {"none": "defenses.no_defense:NoDefense"})

    assert registry.names() == ["fake-defense", "none"]
    assert registry.get("fake-defense").__name__ == "FakeDefense"
    assert registry.describe("fake-defense") == "A defense from another package."


def test_broken_entry_point_fails_loudly(tmp_path, monkeypatch):
    _install_fake_distribution(tmp_path, "robust_erasure_bench.attacks", "broken-attack",
                               "fake_missing_module:Attack")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = Registry("attack")
    assert "broken-attack" in registry.names()
    with pytest.raises(PluginLoadError, match="broken-attack.*fake-erasure-plugin"):
        registry.get("broken-attack")


def test_import_object_rejects_bad_path():
    with pytest.raises(ValueError, match="module:object"):
        import_object("no_colon_here")
