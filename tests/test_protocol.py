"""The protocol module is the one source of the SAKE constants: its evaluate-module copy, the submission schema,
the dataset schema and the registries agree with it."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import sake_core.protocol as protocol

REPO = Path(__file__).resolve().parent.parent


def test_metric_copy_is_byte_identical():
    """eval/sake_metric must stay self-contained for the Hub, so it carries a copy; the copy must not drift."""
    original = (REPO / "sake_core" / "protocol.py").read_bytes()
    copy = (REPO / "eval" / "sake_metric" / "protocol.py").read_bytes()
    assert copy == original, "eval/sake_metric/protocol.py differs from sake_core/protocol.py: copy it again"


def test_protocol_imports_only_the_standard_library():
    tree = ast.parse((REPO / "sake_core" / "protocol.py").read_text())
    modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    modules |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert modules <= {"__future__"}


def test_kinds_dimensions_and_types_are_consistent():
    assert tuple(protocol.KIND_DIMENSION_TYPE) == protocol.ITEM_KINDS
    assert set(protocol.DIMENSION_OF_KIND.values()) == set(protocol.DIMENSIONS)
    assert set(protocol.CORRECTNESS_DIMENSIONS) | set(protocol.CONSISTENCY_DIMENSIONS) == set(protocol.DIMENSIONS)
    assert not set(protocol.CORRECTNESS_DIMENSIONS) & set(protocol.CONSISTENCY_DIMENSIONS)
    assert protocol.TYPES["generality"] == (1, 2, 3) and protocol.TYPES["locality_audio"] == (1, 2, 3, 4)
    type_keys = [f"{d}_type{t}" for d in ("generality", "locality_audio") for t in protocol.TYPES[d]]
    assert set(protocol.METRIC_KEYS) == set(protocol.DIMENSIONS) | set(type_keys)
    assert "eval_edits" in protocol.RUN_HEADER_FIELDS and "max_gap" in protocol.RUN_HEADER_FIELDS


def test_header_fields_are_listed_once():
    names = [name for name, _, _ in protocol.RUN_HEADER]
    assert len(names) == len(set(names)) and tuple(names) == protocol.RUN_HEADER_FIELDS
    assert set(protocol.HEADER_FIELDS) < set(names) and set(protocol.RESUME_FIELDS) < set(names)
    assert {"model_key", "hparams", "max_gap"} <= set(protocol.RESUME_FIELDS)
    assert not {"date", "versions", "expected_rows"} & set(protocol.RESUME_FIELDS)


def test_sequential_rule():
    # paper: the first 5 edits at gaps 0..5
    assert protocol.sequential_evaluated(1, 10) == [1]
    assert protocol.sequential_evaluated(7, 10) == [2, 3, 4, 5]
    assert protocol.sequential_evaluated(10, 10) == [5]
    assert protocol.sequential_evaluated(11, 10) == []  # beyond the sequence
    assert protocol.sequential_evaluated(4, 10, eval_edits=2, max_gap=1) == []
    assert protocol.sequential_evaluated(3, 10, eval_edits=2, max_gap=1) == [2]


def test_submission_schema_enumerates_the_protocol():
    schema = json.loads((REPO / "eval" / "leaderboard" / "submission.schema.json").read_text())
    header = schema["$defs"]["header"]
    assert tuple(header["properties"]["configs"]["items"]["enum"]) == protocol.CONFIGS
    assert tuple(header["properties"]["mode"]["enum"]) == protocol.MODES
    assert tuple(header["required"]) == protocol.HEADER_FIELDS
    assert {"eval_edits", "max_gap"} <= set(header["properties"])
    assert tuple(header["properties"]["pre_edit_items"]["enum"]) == protocol.PRE_EDIT_ITEMS
    prediction = schema["$defs"]["prediction"]
    assert tuple(prediction["properties"]["dimension"]["enum"]) == protocol.DIMENSIONS
    assert tuple(prediction["required"]) == protocol.ROW_FIELDS


def test_dataset_features_hold_the_protocol_columns():
    from sake_dataset import features

    assert tuple(features().keys())[:len(protocol.INSTANCE_COLUMNS) + 1] != ()
    assert set(protocol.INSTANCE_COLUMNS) <= set(features())
    assert set(protocol.SEQUENTIAL_COLUMNS) <= set(features(sequential=True))
    assert set(protocol.ITEM_FIELDS) <= set(features()["generality"].feature)


def test_method_names_and_order():
    assert protocol.METHOD_ORDER[:2] == ("ft_llm", "ft_audio") and protocol.METHOD_ORDER[-1] == "wise"
    assert protocol.method_key("FT (LLM)") == "ft_llm"
    assert protocol.method_key("IE-IKE") == "ie_ike"
    assert protocol.method_key("My-Method") == "my_method"


def test_resume_takes_a_path_spelled_another_way(tmp_path, monkeypatch):
    """A rerun naming the same folder by another path (relative or absolute; in hparams too) resumes; a model or
    dataset named another way resumes when its content key agrees; anything else that differs is named."""
    from sake_core.run_header import resume_differences

    (tmp_path / "runs" / "ke").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    old = {"model": "models/m", "model_key": "k1", "dataset": "data", "dataset_fingerprint": "f1",
           "hparams": {"hypernetwork_path": "runs/ke", "lr": 1.0, "layers": [1, 2]}}
    new = dict(old, model="/elsewhere/m", dataset=str(tmp_path / "data"),
               hparams={"hypernetwork_path": str(tmp_path / "runs" / "ke"), "lr": 1.0, "layers": [1, 2]})
    assert resume_differences(old, new) == []
    assert resume_differences(old, dict(new, hparams=dict(new["hparams"], lr=2.0))) == ["hparams"]
    assert resume_differences(old, dict(new, hparams=dict(new["hparams"], hypernetwork_path="runs/other"))) \
        == ["hparams"]
    assert resume_differences(old, dict(new, model_key="k2")) == ["model", "model_key"]
    assert resume_differences(old, dict(new, dataset_fingerprint="f2")) == ["dataset", "dataset_fingerprint"]
