"""The generation layer (editors/models/generation): settings resolved once from the family's defaults, one entry,
no environment variable; engines agree on the tiny fp32 models."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from editors.models.generation import GenerationSettings, family_defaults, resolve_settings
from sake_core.errors import ConfigError

GENERATION = Path(__file__).resolve().parents[1] / "editors" / "models" / "generation"


def test_settings_come_from_the_family_defaults():
    assert family_defaults("qwen2_audio")["max_new_tokens"] == 256
    assert family_defaults("desta25")["max_new_tokens"] == 512
    cpu = resolve_settings("qwen2_audio", tiny=True, device_type="cpu", dtype="torch.float32")
    assert cpu == GenerationSettings(max_new_tokens=32, engine="eager", dtype="float32", min_shared_prefix=256)
    full = resolve_settings("audio_flamingo3", tiny=False, device_type="cpu", dtype="bfloat16", max_new_tokens=7,
                            batch_size=4)
    assert (full.max_new_tokens, full.min_shared_prefix, full.batch_size) == (7, 0, 4)
    assert set(full.output_key()) == {"engine", "max_new_tokens", "dtype", "min_shared_prefix"}
    with pytest.raises(ConfigError, match="engine"):
        resolve_settings("qwen2_audio", tiny=True, device_type="cpu", dtype="float32", engine="fast")
    with pytest.raises(ConfigError, match="max_new_tokens"):
        GenerationSettings(max_new_tokens=0)


def test_a_method_limited_to_eager_gets_eager_everywhere():
    assert resolve_settings("qwen2_audio", tiny=False, device_type="cuda", dtype="bfloat16",
                            method_engines=("eager",), method="wise").engine == "eager"


def test_no_environment_variable_reaches_generation():
    """Outputs depend on the settings only: no module of the generation layer reads the environment."""
    for path in GENERATION.glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        assert not names & {"environ", "getenv"}, path.name


def test_editing_and_run_resolve_the_same_defaults(demo_dataset):
    from editors.data import load_instances
    from editors.models import load_adapter
    from sake import editing

    adapter = load_adapter("tiny-qwen2-audio", seed=0)
    row = load_instances(str(demo_dataset), "emotion", "test")[0]
    with editing(adapter, "i_ike", row) as model:
        assert model.settings == adapter.generation_settings()
        assert model.settings.max_new_tokens == family_defaults("qwen2_audio", tiny=True)["max_new_tokens"]
        assert len(model.generate([model.edit.prompt()], max_new_tokens=2)) == 1
