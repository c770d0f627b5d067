"""editors.shard + the runner's multi-process mode: rank selection, part files, merge, resume after a dead rank
(torchrun on CPU, gloo), the pre-edit cache shared by processes, and model keys of local model directories."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _editor_helpers import REPO, cli_args, run_config
from editors.models import load_adapter, save_tiny
from editors.models.base import Prompt
from editors.predictions import read_predictions
from editors.preedit_cache import PreEditCache
from editors.run import Runner, main
from editors.shard import Shard, merge, part_files, scan

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="module")
def qwen():
    return load_adapter("tiny-qwen2-audio", seed=0)


@pytest.fixture(autouse=True)
def no_launch_env(monkeypatch):
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)


def as_rank(monkeypatch, rank: int, world: int) -> None:
    """The environment a launcher gives rank ``rank`` of ``world`` (no rendezvous: the merge is lazy)."""
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("LOCAL_RANK", str(rank))


def run(adapter, config) -> tuple[Runner, Path | None]:
    runner = Runner(config, adapter=adapter)
    return runner, runner.run()


def rows_of(path: Path) -> list[dict]:
    return read_predictions(path)[1]


# ---- the launch environment --------------------------------------------------------------------------------------


def test_shard_from_env_selection_device_and_part_path():
    shard = Shard.from_env({"RANK": "1", "WORLD_SIZE": "3", "LOCAL_RANK": "1"})
    assert shard == Shard(rank=1, world_size=3, local_rank=1) and shard.sharded
    assert Shard.from_env({}) == Shard() and not Shard().sharded
    assert shard.select(list("abcdefg"), list(range(7))) == ["b", "e"]
    assert shard.select(["s1a", "s1b", "s2a", "s3a"], [0, 0, 1, 2]) == ["s2a"]  # a sequence stays together
    assert shard.device(None, cuda_available=True) == "cuda:1" and shard.device(None, False) == "cpu"
    assert shard.device("cuda", False) == "cuda:1" and shard.device("cpu", True) == "cpu"
    assert Shard().device(None, True) == "cuda"
    final = Path("/x/m__ft__single__test.jsonl")
    assert shard.part_path(final) == Path("/x/m__ft__single__test.jsonl.rank1-of3.part")
    assert Shard().part_path(final) == final
    for env in ({"RANK": "2", "WORLD_SIZE": "2"}, {"WORLD_SIZE": "two"}):
        with pytest.raises(ValueError, match="RANK|WORLD_SIZE"):
            Shard.from_env(env)


# ---- merge on hand-made files ------------------------------------------------------------------------------------


def _write(path: Path, header: dict, units: list[tuple[str, int]], tail: bytes = b"") -> None:
    lines = [json.dumps(header)] + [json.dumps({"kind": "prediction", "instance_id": u, "n": i})
                                    for u, n in units for i in range(n)]
    path.write_bytes(("\n".join(lines) + "\n").encode() + tail)


def test_merge_orders_units_ignores_partial_ones_and_waits_for_missing(tmp_path):
    header = {"kind": "header", "method": "m", "seed": 0}
    final = tmp_path / "out.jsonl"
    order = ["a", "b", "c", "d"]
    expected = {"a": 2, "b": 1, "c": 3, "d": 1}
    unit_of = lambda row: row["instance_id"]  # noqa: E731
    _write(Path(f"{final}.rank0-of2.part"), {**header, "date": "0"}, [("a", 2), ("c", 3)])
    _write(Path(f"{final}.rank1-of2.part"), {**header, "date": "1"}, [("d", 1), ("b", 1)][:1] + [("b", 0)],
           tail=b'{"kind": "prediction", "instance_id": "b"')  # rank 1 died writing unit b
    scanned = scan(Path(f"{final}.rank1-of2.part"), header, unit_of, expected)
    assert list(scanned.units) == ["d"]
    result = merge(final, order, unit_of, expected)
    assert not result.merged and result.missing == ["b"] and not final.exists() and len(part_files(final)) == 2
    _write(Path(f"{final}.rank1-of2.part"), {**header, "date": "1"}, [("d", 1), ("b", 1)])  # rank 1 resumed
    result = merge(final, order, unit_of, expected)
    assert result.merged and part_files(final) == []
    merged_header, rows = read_predictions(final)
    assert merged_header["date"] == "0" and [r["instance_id"] for r in rows] == ["a", "a", "b", "c", "c", "c", "d"]
    _write(Path(f"{final}.rank0-of2.part"), {**header, "seed": 1}, [])
    with pytest.raises(ValueError, match="different run"):
        merge(final, order, unit_of, expected)


# ---- the pre-edit cache shared by processes ----------------------------------------------------------------------


def test_preedit_cache_survives_a_writer_killed_mid_line(tmp_path):
    prompt = Prompt(question="What is the gender of the speaker?")
    first = PreEditCache(tmp_path, "k", {"max_new_tokens": 4})
    first.put_many([("item/1", prompt, "male")])
    with open(first.path, "ab") as fh:  # another process died in the middle of its append
        fh.write(b'{"key": "dead", "item_id": "item/9", "out')
    PreEditCache(tmp_path, "k", {"max_new_tokens": 4}).put_many([("item/2", prompt, "female")])
    reloaded = PreEditCache(tmp_path, "k", {"max_new_tokens": 4})
    assert reloaded.get("item/1", prompt) == "male" and reloaded.get("item/2", prompt) == "female"


# ---- runs ------------------------------------------------------------------------------------------------------


def _torchrun(argv: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "editors.run", *argv]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_two_ranks_after_a_dead_rank_merge_into_the_one_process_rows(qwen, demo_dataset, tmp_path, monkeypatch,
                                                                     capsys):
    common = {"configs": ("emotion", "gender"), "limit": 3, "max_new_tokens": 4}
    _, one = run(qwen, run_config(demo_dataset, tmp_path / "one.jsonl", tmp_path / "cache1", **common))
    reference = rows_of(one)
    final = tmp_path / "two.jsonl"
    config = run_config(demo_dataset, final, tmp_path / "cache2", **common)
    argv = cli_args(config)

    # rank 1 dies after its first unit, in the middle of writing a row
    as_rank(monkeypatch, 1, 2)
    runner = Runner(config, adapter=qwen)
    original, calls = runner.adapter.generate, {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # pre-edit + post-edit of unit 1 done
            raise RuntimeError("rank 1 killed")
        return original(*args, **kwargs)

    monkeypatch.setattr(runner.adapter, "generate", dying)
    with pytest.raises(RuntimeError, match="killed"):
        runner.run()
    monkeypatch.setattr(runner.adapter, "generate", original)
    part1 = Path(f"{final}.rank1-of2.part")
    assert len({r["instance_id"] for r in rows_of(part1)}) == 1
    with open(part1, "ab") as fh:
        fh.write(b'{"kind": "prediction", "instance_id": "emo')

    # rank 0 finishes its share; the merge waits for rank 1
    as_rank(monkeypatch, 0, 2)
    _, path0 = run(qwen, config)
    assert path0 == Path(f"{final}.rank0-of2.part") and not final.exists()
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    assert main(argv + ["--merge-only"]) == 2 and "unit(s) missing" in capsys.readouterr().err
    # a merge named with other arguments (here --limit 1: its units are all there) refuses, merging and deleting
    # nothing: the parts were written by the --limit 3 run
    parts = {p: p.read_bytes() for p in part_files(final)}
    assert main(cli_args(config.replace(limit=1)) + ["--merge-only"]) == 2
    assert "was written with {'limit': 3}" in capsys.readouterr().err
    assert not final.exists() and {p: p.read_bytes() for p in part_files(final)} == parts

    # relaunch both ranks: rank 1 resumes its part, rank 0 has nothing left, rank 0 merges after the barrier
    proc = _torchrun(argv)
    assert proc.stdout.strip().splitlines() == [str(final)]
    assert "3 units, 1 done, 2 to run" in proc.stderr and "3 units, 3 done, 0 to run" in proc.stderr
    merged = rows_of(final)
    assert [r["item_id"] for r in merged] == [r["item_id"] for r in reference]  # no duplicate, none missing
    assert merged == reference
    assert part_files(final) == []
    assert read_predictions(final)[0]["method"] == "i_ike"
    # every unit timed once: rank 0's 3, and rank 1's 3 (1 by the session that died, which wrote its timing as it
    # stopped, 2 by its resume)
    timing = json.loads(Path(f"{final}.timing.json").read_text())
    assert timing["units"] == 6 and len(timing["per_rank"]) == 2 and len(timing["per_unit"]) == 6
    assert not list(tmp_path.glob("two.jsonl.rank*"))


def test_sequential_ranks_take_whole_sequences_and_merge_lazily(qwen, demo_dataset, tmp_path, monkeypatch):
    common = {"mode": "sequential", "method": "ft_llm", "limit": 2, "max_new_tokens": 3,
              "hparams": {"max_steps": 2}, "max_gap": 1, "eval_edits": 2}
    _, one = run(qwen, run_config(demo_dataset, tmp_path / "one.jsonl", tmp_path / "cache", **common))
    final = tmp_path / "seq.jsonl"
    config = run_config(demo_dataset, final, tmp_path / "cache", **common)
    owners = {}
    for rank in (1, 0):
        as_rank(monkeypatch, rank, 2)
        runner, path = run(qwen, config)
        owners[rank] = {u.key.split("/")[0] for u in runner.units}
    assert owners == {0: {"seq01"}, 1: {"seq02"}}
    assert path == final and part_files(final) == []  # the last rank to finish merged
    assert rows_of(final) == rows_of(one)


def test_one_process_finishes_what_a_sharded_run_left_and_merges(qwen, demo_dataset, tmp_path, monkeypatch):
    common = {"configs": ("emotion",), "limit": 3, "max_new_tokens": 3}
    _, one = run(qwen, run_config(demo_dataset, tmp_path / "one.jsonl", tmp_path / "cache", **common))
    final = tmp_path / "mixed.jsonl"
    config = run_config(demo_dataset, final, tmp_path / "cache", **common)
    as_rank(monkeypatch, 2, 3)  # only rank 2 of 3 ever ran
    runner, _ = run(qwen, config)
    assert [u.index for u in runner.units] == [2] and part_files(final)
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    runner, path = run(qwen, config)
    assert runner.stats.units == 2 and path == final and part_files(final) == []
    assert json.loads(Path(f"{final}.timing.json").read_text())["units"] == 3  # rank 2's unit + the 2 run here
    assert final.read_bytes().split(b"\n", 1)[1] == one.read_bytes().split(b"\n", 1)[1]


def test_timing_keeps_every_scalar_stat(qwen, demo_dataset, tmp_path, monkeypatch):
    runner = Runner(run_config(demo_dataset, tmp_path / "t.jsonl", tmp_path / "cache", limit=1,
                               configs=("animal",)), adapter=qwen)
    original = runner.editor.apply
    monkeypatch.setattr(runner.editor, "apply", lambda edit: {**original(edit), "gate_min": 0.25, "merged": True,
                                                              "norms": [1.0, 2.0], "tensor": torch.ones(2)})
    path = runner.run()
    per_unit = json.loads(Path(f"{path}.timing.json").read_text())["per_unit"]
    assert per_unit[0]["gate_min"] == 0.25 and per_unit[0]["merged"] is True and "steps" in per_unit[0]
    assert "norms" not in per_unit[0] and "tensor" not in per_unit[0]


# ---- model keys ----------------------------------------------------------------------------------------------


def test_model_key_of_a_local_directory_follows_its_weights(qwen, tmp_path, monkeypatch):
    monkeypatch.setenv("SAKE_CACHE", str(tmp_path / "cache"))
    directory = tmp_path / "model"
    save_tiny(qwen, directory)
    key = load_adapter(str(directory)).model_key()
    assert key == load_adapter(str(directory)).model_key() != qwen.model_key()  # stable (memoized digest)
    monkeypatch.chdir(tmp_path)
    assert load_adapter("model").model_key() == key  # the weights, not the path's spelling
    retrained = load_adapter(str(directory))
    with torch.no_grad():
        retrained.lm_head().weight[0, 0] += 1.0
    save_tiny(retrained, directory)
    assert load_adapter(str(directory)).model_key() != key
