"""Shared fixtures of the editor tests: the demo dataset, a 10-step sequential variant, a malformed dataset,
synthetic audio and a runner factory (tiny models, CPU)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml

from editors.config import RunConfig
from sake_core.protocol import ITEM_COLUMNS

REPO = Path(__file__).resolve().parents[1]


_DEMO: list[Any] = []


def shared_demo_build() -> Any:
    """The offline demo build (seed 0) of the whole test session, built once on first use: a
    ``sake_dataset.builder.BuildResult`` (``.out`` is the dataset folder). Every test reads it, none writes it."""
    if not _DEMO:
        import atexit
        import tempfile

        from sake_dataset import build_demo

        root = Path(tempfile.mkdtemp(prefix="sake_test_demo_"))
        atexit.register(shutil.rmtree, root, True)
        _DEMO.append(build_demo(root / "sake", seed=0))
    return _DEMO[0]


def make_long_sequential(demo: Path, out: Path, length: int = 10) -> Path:
    """A copy of the demo whose sequential/test split is one sequence of ``length`` steps, made of demo test
    instances of all attributes (ids rewritten as ARCHITECTURE.md says; the runner needs no label rules)."""
    shutil.copytree(demo, out)
    seq_file = out / "sequential" / "test-00000-of-00001.parquet"
    schema = pq.read_schema(seq_file)
    rows: list[dict[str, Any]] = []
    for config in ("emotion", "animal", "gender", "language"):
        rows.extend(pq.read_table(demo / config / "test-00000-of-00001.parquet").to_pylist())
    picked = [rows[i] for i in range(0, len(rows), max(1, len(rows) // length))][:length]
    assert len(picked) == length, "demo too small for the long sequence"
    out_rows = []
    for step, row in enumerate(picked, start=1):
        new_id = f"sequential/test/seq01/step{step:02d}"
        new = dict(row, id=new_id, sequence_id="seq01", step=step, source_instance=row["id"])
        for column in ITEM_COLUMNS:
            new[column] = [dict(item, id=new_id + "/" + item["id"].rsplit("/", 1)[1]) for item in row[column]]
        out_rows.append(new)
    pq.write_table(pa.Table.from_pylist(out_rows, schema=schema), seq_file)
    (out / "sake_manifest.json").unlink(missing_ok=True)
    _drop_card_split_info(out / "README.md")
    return out


def _drop_card_split_info(readme: Path) -> None:
    """Remove `dataset_info` (recorded split sizes) from a card's YAML header after changing a split."""
    _, header, body = readme.read_text().split("---\n", 2)
    meta = yaml.safe_load(header)
    meta.pop("dataset_info", None)
    readme.write_text("---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n" + body)


def make_bad_dataset(demo: Path, out: Path, drop: str = "generality") -> Path:
    """A dataset folder with one config (emotion/test) whose rows lack column ``drop``."""
    (out / "emotion").mkdir(parents=True)
    table = pq.read_table(demo / "emotion" / "test-00000-of-00001.parquet").drop_columns([drop])
    table = table.replace_schema_metadata({})
    pq.write_table(table, out / "emotion" / "test.parquet")
    (out / "README.md").write_text("---\nconfigs:\n- config_name: emotion\n  data_files:\n  - split: test\n"
                                   "    path: emotion/test.parquet\n---\n")
    return out


def synthetic_audio(seed: int, seconds: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(16000 * seconds)) / 16000
    tone = np.sin(2 * np.pi * (200 + 100 * seed) * t)
    return (0.3 * tone + 0.05 * rng.standard_normal(t.shape)).astype(np.float32)


def count_host_reads(monkeypatch: Any, method: str = "tolist") -> list[tuple[int, ...]]:
    """Record the shape of every tensor read to the host through ``torch.Tensor.<method>`` (a host sync on a GPU);
    the returned list fills as the test runs (clear it between runs)."""
    reads: list[tuple[int, ...]] = []
    original = getattr(torch.Tensor, method)

    def counting(self: torch.Tensor) -> Any:
        reads.append(tuple(self.shape))
        return original(self)

    monkeypatch.setattr(torch.Tensor, method, counting)
    return reads


def state_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed_tensors(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> list[str]:
    """Names of state tensors that differ (bit-wise) from ``before``."""
    now = model.state_dict()
    return [k for k, v in before.items() if not torch.equal(v, now[k])]


def run_config(dataset: Path, out: Path, cache: Path, **fields: Any) -> RunConfig:
    """A small run on a tiny model (2 instances per config, 6 new tokens, I-IKE by default) as a
    :class:`editors.config.RunConfig`; ``fields`` override any of its fields."""
    defaults = {"model": "tiny-qwen2-audio", "method": "i_ike", "dataset": str(dataset), "out": str(out),
                "cache_dir": str(cache), "max_new_tokens": 6, "limit": 2, "progress": False}
    return RunConfig(**{**defaults, **fields})


def cli_args(config: RunConfig) -> list[str]:
    """The ``python -m editors.run`` arguments that give ``config`` (for the command-line tests)."""
    argv = ["--model", config.model, "--method", config.method, "--dataset", config.dataset, "--out", config.out,
            "--split", config.split, "--mode", config.mode, "--seed", str(config.seed),
            "--batch-size", str(config.batch_size), "--eval-edits", str(config.eval_edits),
            "--max-gap", str(config.max_gap)]
    for c in config.configs:
        argv += ["--config", c]
    for key, value in config.hparams.items():
        argv += ["--hparam", f"{key}={value}"]
    for flag, value in (("--limit", config.limit), ("--dtype", config.dtype), ("--device", config.device),
                        ("--revision", config.revision), ("--cache-dir", config.cache_dir),
                        ("--edits-per-pass", config.edits_per_pass), ("--max-new-tokens", config.max_new_tokens),
                        ("--max-batch-tokens", config.max_batch_tokens)):
        if value is not None:
            argv += [flag, str(value)]
    argv += ["--engine", config.engine, "--pre-edit-items", config.pre_edit_items]
    if not config.progress:
        argv.append("--no-progress")
    return argv
