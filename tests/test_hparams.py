"""Hyperparameters as types (editors/hparams.py): every method's dataclass declares exactly the keys its YAML gives
for every family (defaults live in the YAML only), methods read them as attributes, editors/hparams.py imports no
method code, and a RunConfig naming an unknown method, family or hparam key fails when it is built."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from editors import registry
from editors.config import RunConfig
from editors.hparams import HPARAMS_DIR, Hparams, build_hparams, merged_hparams
from editors.models.registry import families
from sake_core.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("method", registry.available_methods())
def test_dataclass_fields_equal_the_yaml_keys_of_every_family(method):
    cls = registry.get_editor_class(method).hparams_class
    fields = dataclasses.fields(cls)
    with_defaults = [f.name for f in fields
                     if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING]
    assert not with_defaults, f"{cls.__name__}: defaults belong in {registry.hparams_file(method)}"
    for family in families():
        for tiny in (False, True):
            keys, path = merged_hparams(registry.hparams_file(method), family, tiny=tiny)
            assert set(keys) == set(cls.field_names()), (path, family, tiny)
            hp = registry.load_hparams(method, family, tiny=tiny)
            assert isinstance(hp, cls) and hp.as_dict() == {n: getattr(hp, n) for n in cls.field_names()}


def test_hparams_are_read_as_attributes_not_as_a_mapping():
    hp = registry.load_hparams("ft_llm", "qwen2_audio")
    assert hp.layer == 31 and hp.lr == pytest.approx(1e-4) and hp.optimizer == "adam"
    with pytest.raises(TypeError):
        hp["lr"]  # type: ignore[index]
    assert not hasattr(hp, "get")
    assert hp.replace(layer=-1).layer == -1
    with pytest.raises(ConfigError, match="unknown key"):
        hp.replace(learning_rate=1.0)


def _string_key_reads(path: Path) -> list[str]:
    """``hparams[...]``, ``hp[...]``, ``hparams.get(...)``, ``hp.get(...)`` in a module's source."""
    def names_hparams(node: ast.AST) -> bool:
        return (isinstance(node, ast.Name) and node.id in ("hp", "hparams")) or \
            (isinstance(node, ast.Attribute) and node.attr in ("hp", "hparams"))

    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Subscript) and names_hparams(node.value):
            found.append(f"{path.name}:{node.lineno}")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
              and names_hparams(node.func.value)):
            found.append(f"{path.name}:{node.lineno}")
    return found


def test_methods_never_read_hparams_by_string_key():
    files = [info.path for info in registry.methods().values()]
    files += [REPO / "editors" / name for name in ("base.py", "hypernetwork.py", "train.py", "batching.py")]
    found = [hit for path in files for hit in _string_key_reads(path)]
    assert not found, f"hparams read by key (use attributes): {found}"
    assert _string_key_reads_probe()  # the scan itself finds such reads


def _string_key_reads_probe() -> list[str]:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe.py"
        probe.write_text("def f(self, hp):\n    return self.hparams['lr'] + hp.get('x', 1)\n")
        return _string_key_reads(probe)


def test_the_hparams_module_imports_no_method_code():
    tree = ast.parse((REPO / "editors" / "hparams.py").read_text(encoding="utf-8"))
    imported = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module]
    imported += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    assert not [m for m in imported if m.split(".")[0] == "editors"], imported


def test_a_file_with_a_key_the_dataclass_lacks_or_a_missing_key_is_an_error_naming_it(tmp_path):
    @dataclasses.dataclass
    class Two(Hparams):
        a: int
        b: float

    path = tmp_path / "two.yaml"
    path.write_text("defaults:\n  a: 1\nqwen2_audio:\n  b: 2\ntiny:\n  c: 3\n")
    with pytest.raises(ConfigError, match=r"two\.yaml: section 'tiny': unknown key\(s\) \['c'\]"):
        build_hparams(Two, path, "qwen2_audio")
    path.write_text("defaults:\n  a: 1\nqwen2_audio: {}\n")
    with pytest.raises(ConfigError, match=r"two\.yaml \[qwen2_audio\]: missing key\(s\) \['b'\]"):
        build_hparams(Two, path, "qwen2_audio")
    path.write_text("defaults:\n  a: one\nqwen2_audio:\n  b: 2\n")
    with pytest.raises(ConfigError, match="key 'a': expected an integer"):
        build_hparams(Two, path, "qwen2_audio")
    path.write_text("defaults:\n  a: 1\nqwen2_audio:\n  b: 2\n")
    assert build_hparams(Two, path, "qwen2_audio") == Two(a=1, b=2.0)
    assert merged_hparams("ft_llm", "desta25")[1] == HPARAMS_DIR / "ft_llm.yaml"  # a name: the file in HPARAMS_DIR


@pytest.mark.parametrize("fields,message", [
    ({"method": "rome"}, r"unknown editing method 'rome'; known: .*ft_llm"),
    ({"model": "tiny-llama"}, r"unknown model 'tiny-llama': expected one of \['tiny-audio-flamingo3'"),
    ({"hparams": {"learning_rate": 1e-3}}, r"unknown key\(s\) \['learning_rate'\] for method 'ft_llm' \(known: .*lr"),
    ({"limit": 0}, r"RunConfig.limit: expected an integer >= 1, got 0"),
])
def test_run_config_fails_when_built_naming_the_known_ones(fields, message):
    base = {"model": "tiny-qwen2-audio", "method": "ft_llm", "dataset": "d"}
    with pytest.raises(ConfigError, match=message):
        RunConfig(**{**base, **fields})
    assert RunConfig(**base, hparams={"lr": 1e-3}).hparams == {"lr": 1e-3}


@pytest.mark.parametrize("method, override, message", [
    ("ft_audio", "lr=-1", "key 'lr': expected a number > 0, got -1.0"),
    ("ft_llm", "lr=.nan", "key 'lr': expected a finite number, got nan"),
    ("ft_audio", "max_steps=0", "key 'max_steps': expected a number > 0, got 0"),
    ("lora", "rank=0", "key 'rank': expected a number > 0, got 0"),
    ("grace", "eps=-1", "key 'eps': expected a number > 0, got -1.0"),
    ("wise", "mask_ratio=1.5", "key 'mask_ratio': expected a number in [0, 1], got 1.5"),
    ("unke", "preserve_text=-2", "key 'preserve_text': expected a number >= 0, got -2"),
])
def test_a_value_out_of_its_range_is_refused_before_anything_runs(method, override, message):
    """The error names the override (the value a user gave), not the method's YAML file, which is fine."""
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")) as error:
        registry.load_hparams(method, "qwen2_audio", overrides=[override])
    assert str(error.value).startswith(f"hyperparameter override (--hparam / hparams=) of {method}: ")
    assert ".yaml" not in str(error.value)


@pytest.mark.parametrize("method", registry.available_methods())
def test_every_bound_names_a_field_of_its_method(method):
    """(The shipped values are within their bounds: test_dataclass_fields_equal_the_yaml_keys_of_every_family
    builds every section.)"""
    cls = registry.get_editor_class(method).hparams_class
    assert set(cls.bounds) <= set(cls.field_names()), method
