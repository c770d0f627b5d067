"""Methods (editors.registry) and model families (editors.models.registry) are discovered from their files, with
nothing imported."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from editors import registry
from editors.models import registry as family_registry
from sake_core.errors import ConfigError, SakeError
from sake_core.protocol import FAMILY_ORDER, METHOD_ORDER

REPO = Path(__file__).resolve().parent.parent


def test_every_paper_method_is_discovered_in_paper_order():
    found = registry.methods()
    assert tuple(found)[:len(METHOD_ORDER)] == METHOD_ORDER
    for info in found.values():
        assert info.path == registry.EDITORS_DIR / f"{info.name}.py"
        assert info.hparams_path.is_file()


def test_discovery_imports_nothing():
    """In a fresh interpreter (this test process has long imported torch and the methods): discovering methods
    and families imports no method module, no adapter module and no torch."""
    code = ("import sys\nfrom editors import registry\nfrom editors.models import registry as fr\n"
            "assert registry.methods() and fr.families()\n"
            "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')\n"
            "             or (m.startswith('editors.') and m not in ('editors.registry', 'editors.hparams',\n"
            "                                                        'editors.models', 'editors.models.registry')))\n"
            "print(','.join(bad))\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == ""


def test_families_from_adapter_modules():
    fams = family_registry.families()
    assert tuple(fams) == FAMILY_ORDER
    assert fams["qwen2_audio"].tiny_name == "tiny-qwen2-audio"
    assert "audioflamingo3" in fams["audio_flamingo3"].model_types
    from editors.models import adapter_class, family_of

    assert family_of("Qwen/Qwen2-Audio-7B-Instruct") == "qwen2_audio"
    assert family_of("tiny-desta25") == "desta25"
    assert family_of("someone/unnamed-model", offline=True) is None
    assert adapter_class("qwen2_audio").__name__ == fams["qwen2_audio"].adapter_class


def _write_method(folder: Path, name: str, body: str = "", yaml_text: str = "defaults: {}\n") -> None:
    (folder / "hparams").mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.py").write_text(
        "from editors.base import Editor\nfrom editors.registry import register\n\n\n"
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
    assert registry.get_editor_class("toy_reg").__name__ == "Toy"


def test_method_without_yaml_is_an_error_naming_the_file(tmp_path, monkeypatch):
    _write_method(tmp_path, "toy_noyaml")
    (tmp_path / "hparams" / "toy_noyaml.yaml").unlink()
    monkeypatch.setenv(registry.METHODS_PATH_ENV, str(tmp_path))
    with pytest.raises(ConfigError, match=r"toy_noyaml\.py: method 'toy_noyaml' has no hyperparameter file"):
        registry.methods()


def test_unknown_method_error_lists_known_ones():
    with pytest.raises(SakeError, match="unknown editing method 'nope'.*ft_llm"):
        registry.get_editor_class("nope")
