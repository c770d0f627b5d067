"""Hyperparameters as data: ``editors/hparams/<method>.yaml``, read into the method's typed dataclass.

Each file has a ``defaults`` mapping, one mapping per model family (the ``FAMILY`` keys of the adapter modules:
``qwen2_audio``, ``audio_flamingo3``, ``desta25``; paper Table 6) and a ``tiny`` mapping applied on top for tiny
random-init models (tests, CI). :func:`merged_hparams` merges ``defaults`` <- family <- ``tiny`` (tiny models only)
<- overrides (``--hparam key=value``, the value parsed as YAML, e.g. ``lr=1e-3``, ``layer=-1``,
``optimizer=sgd``); :func:`build_hparams` then builds a :class:`Hparams` dataclass from it: a key the dataclass
does not declare (in any section), a missing one or a value of the wrong type is an error naming the file.

Defaults live in the YAML only: a method's dataclass declares its fields without default values, and methods read
them as attributes (``self.hparams.lr``). This module works on files and classes; which file and class belong to a
method name is :mod:`editors.registry`'s business (``editors.registry.load_hparams``), so it imports nothing else
of the project besides the errors.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence, TypeVar

import yaml

from sake_core.errors import ConfigError

HPARAMS_DIR = Path(__file__).resolve().parent / "hparams"
#: The sections of a hyperparameter file that are not model families.
DEFAULTS, TINY = "defaults", "tiny"

H = TypeVar("H", bound="Hparams")


@dataclasses.dataclass
class Hparams:
    """Base of every method's hyperparameter dataclass: typed fields (no defaults: those are the YAML's),
    built with :meth:`from_mapping` and read as attributes."""

    #: Value ranges a method's dataclass declares, key -> one of :data:`BOUNDS` (``positive``: > 0,
    #: ``non_negative``: >= 0, ``fraction``: in [0, 1]); every number must also be finite. A value outside is a
    #: ConfigError before anything runs (no run header written, no edit half applied).
    bounds: ClassVar[Mapping[str, str]] = {}

    @classmethod
    def from_mapping(cls: type[H], data: Mapping[str, Any], where: str = "hparams") -> H:
        """Build from a plain mapping; ConfigError naming ``where`` for unknown or missing keys, wrong types and
        values out of range (:attr:`bounds`)."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown} for {cls.__name__} (known: {sorted(fields)})")
        missing = sorted(name for name, f in fields.items() if name not in data
                         and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
        if missing:
            raise ConfigError(f"{where}: missing key(s) {missing} for {cls.__name__}")
        hints = typing.get_type_hints(cls)
        values = {name: _coerce(value, hints[name], f"{where}: key {name!r}") for name, value in data.items()}
        for name, value in values.items():
            _check_bound(value, cls.bounds.get(name), f"{where}: key {name!r}")
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (field order)."""
        return dataclasses.asdict(self)

    def replace(self: H, **changes: Any) -> H:
        """A copy with ``changes`` applied (checked like :meth:`from_mapping`)."""
        return type(self).from_mapping({**self.as_dict(), **changes}, where=type(self).__name__)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The keys a hyperparameter file must give (the dataclass fields, in order)."""
        return tuple(f.name for f in dataclasses.fields(cls))


#: The ranges :attr:`Hparams.bounds` may name, with what a message says they expect.
BOUNDS: dict[str, tuple[Callable[[float], bool], str]] = {
    "positive": (lambda v: v > 0, "a number > 0"),
    "non_negative": (lambda v: v >= 0, "a number >= 0"),
    "fraction": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
}


def _check_bound(value: Any, bound: str | None, where: str) -> None:
    """ConfigError when a number is not finite or outside ``bound`` (None and non-numbers pass)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if not math.isfinite(value):
        raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    if bound is not None:
        check, expected = BOUNDS[bound]
        if not check(value):
            raise ConfigError(f"{where}: expected {expected}, got {value!r}")


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """``value`` checked against the annotation ``hint`` (ints widen to float; numeric strings become floats)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: unexpected value {value!r}")
    if hint is Any:
        return value
    if hint is float:
        if isinstance(value, str) and _looks_numeric(value):
            return float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if origin in (list, tuple, Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint)[:1] or (Any,)
        return [_coerce(v, item, where) for v in value]
    if origin in (dict, Mapping):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        key_hint, value_hint = typing.get_args(hint) or (Any, Any)
        return {_coerce(k, key_hint, where): _coerce(v, value_hint, where) for k, v in value.items()}
    return value


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """``["lr=1e-3", "layer=-1"]`` -> ``{"lr": 0.001, "layer": -1}`` (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--hparam {item!r}: expected key=value")
        key, value = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"--hparam {item!r}: empty key")
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str) and _looks_numeric(parsed):
            parsed = float(parsed)  # YAML 1.1 reads "1e-3" as a string
        out[key] = parsed
    return out


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _numeric(mapping: dict[str, Any]) -> dict[str, Any]:
    return {k: (float(v) if isinstance(v, str) and _looks_numeric(v) else v) for k, v in mapping.items()}


def hparams_path(name: str | Path) -> Path:
    """``name`` as a file: a path as given, a bare name as ``editors/hparams/<name>.yaml`` (e.g. ``generation``)."""
    return Path(name) if isinstance(name, Path) else HPARAMS_DIR / f"{name}.yaml"


def read_sections(path: Path) -> dict[str, Any]:
    """The top-level mapping of a hyperparameter file (ConfigError naming the file when missing or malformed)."""
    if not path.is_file():
        raise ConfigError(f"no hyperparameter file {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at top level")
    return data


def section_keys(path: str | Path, family: str | None = None) -> set[str]:
    """The keys a file defines for ``family`` (``defaults`` + the family's section + ``tiny``; every section when
    ``family`` is None): what ``--hparam`` may override. Reads the file only."""
    data = read_sections(hparams_path(path))
    sections = list(data) if family is None else [DEFAULTS, family, TINY]
    return {key for section in sections if isinstance(data.get(section), dict) for key in data[section]}


#: How an error names a value given over the file's (``--hparam KEY=VALUE``, or ``hparams=`` in Python).
OVERRIDE = "hyperparameter override (--hparam / hparams=)"


def merged_hparams(path: str | Path, family: str, *, tiny: bool = False,
                   overrides: Sequence[str] | Mapping[str, Any] = ()) -> tuple[dict[str, Any], Path]:
    """The merged plain mapping of a file (``path``, or a name in ``editors/hparams/``) for ``family`` and the file
    it came from (no type checks): ``defaults`` <- family <- ``tiny`` (when ``tiny``) <- ``overrides``."""
    path = hparams_path(path)
    data = read_sections(path)
    if family not in data:
        raise ConfigError(f"{path}: no entry for model family {family!r} (has {sorted(k for k in data)})")
    merged: dict[str, Any] = {}
    for section in (DEFAULTS, family) + ((TINY,) if tiny else ()):
        value = data.get(section) or {}
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: section {section!r} must be a mapping")
        merged.update(_numeric(value))
    extra = dict(overrides) if isinstance(overrides, Mapping) else parse_overrides(overrides)
    unknown = sorted(set(extra) - set(merged))
    if unknown:
        raise ConfigError(f"{OVERRIDE}: unknown key(s) {unknown} for {path.stem} (known: {sorted(merged)}; {path})")
    merged.update(extra)
    return merged, path


def build_hparams(cls: type[H], path: str | Path, family: str, *, tiny: bool = False,
                  overrides: Sequence[str] | Mapping[str, Any] = ()) -> H:
    """``cls`` built from the file's entry for ``family`` (see the module docstring).

    Raises ConfigError naming the file when it is missing, malformed, has no entry for the family, has a key the
    dataclass does not declare (in any section), misses one, or has a value of the wrong type, and when an
    override names a key the file does not define."""
    path = hparams_path(path)
    known = set(cls.field_names())
    for section, value in read_sections(path).items():  # every section, not only the ones merged here
        if isinstance(value, dict) and set(value) - known:
            raise ConfigError(f"{path}: section {section!r}: unknown key(s) {sorted(set(value) - known)} for "
                              f"{cls.__name__} (known: {sorted(known)})")
    merged, path = merged_hparams(path, family, tiny=tiny)
    checked = cls.from_mapping(merged, where=f"{path} [{family}{' + tiny' if tiny else ''}]")  # the file's values
    if not overrides:
        return checked
    merged, path = merged_hparams(path, family, tiny=tiny, overrides=overrides)
    return cls.from_mapping(merged, where=f"{OVERRIDE} of {path.stem}")  # the file's values passed: an override's
