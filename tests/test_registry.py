"""Methods and model families are discovered from their files (sake.registry), with nothing imported."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from sake import registry
from sake.protocol import FAMILY_ORDER, METHOD_ORDER


def test_every_paper_method_is_discovered_in_paper_order():
    found = registry.methods()
    assert tuple(found)[:len(METHOD_ORDER)] == METHOD_ORDER
    for info in found.values():
        assert info.path == registry.EDITORS_DIR / f"{info.name}.py"
        assert info.hparams_path.is_file()


def test_discovery_imports_nothing():
    before = set(sys.modules)
    registry._scan_methods.cache_clear()
    registry._scan_families.cache_clear()
    registry.methods()
    registry.families()
    assert not {m for m in set(sys.modules) - before if m.startswith(("editors", "torch"))}


def test_families_from_adapter_modules():
    fams = registry.families()
    assert tuple(fams) == FAMILY_ORDER
    assert fams["qwen2_audio"].tiny_name == "tiny-qwen2-audio"
    assert "audioflamingo3" in fams["audio_flamingo3"].model_types
    from editors.models import adapter_class, family_of

    assert family_of("Qwen/Qwen2-Audio-7B-Instruct") == "qwen2_audio"
    assert family_of("tiny-desta25") == "desta25"
    assert adapter_class("qwen2_audio").__name__ == fams["qwen2_audio"].adapter_class


def _write_method(folder: Path, name: str, body: str = "", yaml_text: str = "defaults: {}\n") -> None:
    (folder / "hparams").mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.py").write_text(
        "from editors.base import Editor, register\n\n\n"
        f"@register({name!r})\nclass Toy(Editor):\n    display_name = 'Toy method'\n    display_order = 6.5\n"
        "    def touched_parameters(self):\n        return []\n\n    def apply(self, edit):\n        return {}\n"
        + body)
    (folder / "hparams" / f"{name}.yaml").write_text(yaml_text)


def test_methods_path_adds_an_outside_method(tmp_path, monkeypatch):
    _write_method(tmp_path, "toy_reg")
    monkeypatch.setenv(registry.METHODS_PATH_ENV, str(tmp_path))
    info = registry.methods()["toy_reg"]
    assert info.display_name == "Toy method" and info.display_order == 6.5
    assert list(registry.methods()).index("toy_reg") == METHOD_ORDER.index("wise")  # between IE-IKE and WISE
    assert registry.method_display_name("toy_reg") == "Toy method"
    from editors.base import get_editor_class

    assert get_editor_class("toy_reg").__name__ == "Toy"


def test_method_without_yaml_is_an_error_naming_the_file(tmp_path, monkeypatch):
    _write_method(tmp_path, "toy_noyaml")
    (tmp_path / "hparams" / "toy_noyaml.yaml").unlink()
    monkeypatch.setenv(registry.METHODS_PATH_ENV, str(tmp_path))
    with pytest.raises(ValueError, match=r"toy_noyaml\.py: method 'toy_noyaml' has no hyperparameter file"):
        registry.methods()


def test_unknown_method_error_lists_known_ones():
    from editors.base import get_editor_class

    with pytest.raises(ValueError, match="unknown editing method 'nope'.*ft_llm"):
        get_editor_class("nope")
