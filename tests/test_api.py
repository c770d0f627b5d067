"""The Python API (sake.api): the README example runs as written, `editing` restores the model exactly, and a
method added from a temporary module + YAML goes through run -> score -> report without touching another file."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

from _editor_helpers import run_config, state_copy, changed_tensors
from sake import RunConfig, editing, report, run, score
from editors.registry import METHODS_PATH_ENV

REPO = Path(__file__).resolve().parent.parent


def readme_example() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    match = re.search(r"<!-- api-example:start -->\n```python\n(.*?)```\n<!-- api-example:end -->", text, re.S)
    assert match, "README.md: the Python API example block is missing"
    return match.group(1)


def test_readme_example_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SAKE_CACHE", str(tmp_path / "cache"))
    namespace: dict = {}
    exec(compile(readme_example(), "README.md (Python API example)", "exec"), namespace)  # noqa: S102
    results, path = namespace["results"], namespace["path"]
    assert path.is_file() and path.parent == Path("runs")
    assert results["method"] == "ft_audio" and results["n_rows"] > 0
    assert 0.0 <= results["metrics"]["overall"]["reliability"] <= 100.0
    assert any(p.suffix == ".md" for p in namespace["written"])
    assert isinstance(namespace["edited"], list) and len(namespace["edited"]) == 1
    # the block restored the adapter: its weights equal a freshly loaded one's
    fresh = namespace["load_adapter"]("tiny-qwen2-audio")
    assert all(torch.equal(a, b) for a, b in zip(namespace["adapter"].model.state_dict().values(),
                                                 fresh.model.state_dict().values()))


def test_editing_applies_then_restores_even_on_error(demo_dataset):
    from datasets import load_dataset

    from editors.models import load_adapter

    adapter = load_adapter("tiny-qwen2-audio")
    row = load_dataset(str(demo_dataset), "emotion", split="test")[0]
    before = state_copy(adapter.model)
    with editing(adapter, "ft_audio", row, {"max_steps": 20}) as model:
        changed = changed_tensors(adapter.model, before)
        assert changed and all(name in adapter.parameter_names(adapter.connector()) for name in changed)
        assert model.stats["steps"] >= 1
    assert changed_tensors(adapter.model, before) == []
    with pytest.raises(RuntimeError, match="inside"):
        with editing(adapter, "ft_llm", row, {"max_steps": 2}):
            assert changed_tensors(adapter.model, before)
            raise RuntimeError("inside the block")
    assert changed_tensors(adapter.model, before) == []
    with pytest.raises(ValueError, match="unknown key"):
        with editing(adapter, "ft_audio", row, {"learning_rate": 1.0}):
            pass


def test_editing_gives_a_runs_outputs_for_a_method_that_reads_the_dataset(demo_dataset, tmp_path):
    """UnKE preserves train items of the release: `editing(..., dataset=)` gives a run's post-edit outputs; without
    the dataset it refuses (it would otherwise train on the very items its locality is scored on)."""
    import json

    from datasets import load_dataset

    from editors.data import eval_items
    from editors.models import load_adapter
    from sake.api import RunConfig, run
    from sake_core.errors import ConfigError

    path = run(RunConfig(model="tiny-qwen2-audio", method="unke", dataset=str(demo_dataset), configs=("emotion",),
                         limit=1, out=str(tmp_path / "runs"), cache_dir=str(tmp_path / "cache"), progress=False))
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()[1:]]
    adapter = load_adapter("tiny-qwen2-audio")
    row = load_dataset(str(demo_dataset), "emotion", split="test")[0]
    items = eval_items(row)
    with editing(adapter, "unke", row, dataset=demo_dataset) as model:
        answers = [str(g) for g in model.generate([item.prompt() for item in items])]
    post_edit = {r["item_id"]: r["post_edit"] for r in rows}
    assert answers == [post_edit[item.item_id] for item in items]
    with pytest.raises(ConfigError, match="pass dataset= to sake.editing"):
        with editing(adapter, "unke", row):
            pass


def test_run_config_checks_its_fields():
    with pytest.raises(ValueError, match="mode"):
        RunConfig(model="m", method="x", dataset="d", mode="batch")
    with pytest.raises(ValueError, match="--mode sequential"):
        RunConfig(model="m", method="x", dataset="d", configs=("sequential",))
    with pytest.raises(ValueError, match="max_gap"):
        RunConfig(model="m", method="x", dataset="d", mode="sequential", max_gap=-1)
    config = RunConfig(model="org/model", method="ft_llm", dataset="d", out="runs")
    assert config.configs == ("animal", "emotion", "gender", "language")
    assert config.output_path() == Path("runs/org--model__ft_llm__single__test.jsonl")
    # runs of some attributes into one folder each get their own file (a second would be another run's file)
    assert config.replace(configs=("gender", "emotion")).output_path() == \
        Path("runs/org--model__ft_llm__single__test__emotion+gender.jsonl")
    assert config.replace(configs=("language", "gender", "emotion", "animal")).output_path() == config.output_path()


TOY_MODULE = '''"""A toy editing method living outside the checkout: scales the connector's weights."""
from dataclasses import dataclass

import torch

from editors.base import Editor
from editors.registry import register
from editors.hparams import Hparams


@dataclass
class ToyHparams(Hparams):
    scale: float


@register("toy_scale")
class ToyScale(Editor):
    display_name = "Toy (scale)"
    display_order = 100.0
    hparams_class = ToyHparams

    def touched_parameters(self):
        return [n for n in self.adapter.parameter_names(self.adapter.connector()) if n.endswith("weight")]

    def apply(self, edit):
        params = dict(self.adapter.model.named_parameters())
        with torch.no_grad():
            for name in self.touched_parameters():
                params[name].mul_(self.hparams.scale)
        return {"steps": 1}
'''

TOY_YAML = "defaults:\n  scale: 1.5\nqwen2_audio: {}\naudio_flamingo3: {}\ndesta25: {}\ntiny: {}\n"


def _tracked_and_untracked() -> str:
    return subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=REPO, capture_output=True,
                          text=True, check=True).stdout


def test_toy_method_from_a_temporary_module_runs_scores_and_reports(demo_dataset, tmp_path, monkeypatch):
    methods = tmp_path / "methods"
    (methods / "hparams").mkdir(parents=True)
    (methods / "toy_scale.py").write_text(TOY_MODULE)
    (methods / "hparams" / "toy_scale.yaml").write_text(TOY_YAML)
    monkeypatch.setenv(METHODS_PATH_ENV, str(methods))
    repo_before = _tracked_and_untracked()

    path = run(run_config(demo_dataset, tmp_path / "runs", tmp_path / "cache", method="toy_scale",
                          configs=("gender",), limit=1))
    lines = path.read_text().splitlines()
    assert '"method": "toy_scale"' in lines[0] and '"scale": 1.5' in lines[0] and len(lines) > 2
    results = score(path, judge="offline", out=tmp_path / "runs" / "toy.results.json")
    assert results["method"] == "toy_scale" and results["n_rows"] == len(lines) - 1
    written = report([tmp_path / "runs"], tmp_path / "report")
    table = next(p for p in written if p.name.startswith("table2")).read_text()
    assert "Toy (scale)" in table

    assert _tracked_and_untracked() == repo_before  # nothing in the checkout was added or changed
    assert os.environ[METHODS_PATH_ENV] == str(methods)
