"""What a run will do, known without a model (:class:`RunPlan`): the instance rows of each config, every unit of work
in the one-process order, this process's share of them, the unit a prediction row belongs to, how many rows each
unit has, and where the predictions go. The runner (``editors/run.py``) executes a plan on a loaded model;
``python -m editors.run --merge-only`` needs nothing but the plan.

A unit is an instance (single mode) or a step of a sequence (sequential mode: after step t, edits s <= ``eval_edits``
with gap t - s <= ``max_gap`` are evaluated; a step that evaluates nothing is no unit).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Hashable

from editors.config import RunConfig
from editors.data import group_sequences, load_instances
from editors.shard import MergeResult, Shard, merge
from sake_core.protocol import ITEM_COLUMNS, sequential_evaluated

#: ``(dataset, config, split) -> rows`` (a ``datasets.Dataset`` or any sequence of instance rows with ``.data``)
RowsLoader = Callable[[str, str, str], Any]


@dataclass
class Unit:
    """One unit of work: an instance (single) or a step of a sequence (sequential)."""

    key: Hashable
    expected_rows: int
    config: str
    index: int  # row index (single) / sequence number (sequential)
    step: int = 0


def item_counts(table: Any) -> list[int]:
    """Items per instance (reliability + linked items) from the Arrow table, without decoding audio."""
    import pyarrow.compute as pc

    counts = [1] * table.num_rows
    for column in ITEM_COLUMNS:
        lengths = pc.fill_null(pc.list_value_length(table.column(column)), 0).to_pylist()
        counts = [c + n for c, n in zip(counts, lengths)]
    return counts


class RunPlan:
    """The units of ``config`` over its dataset (rows from ``rows_loader``, default
    :func:`editors.data.load_instances`) and this process's share under ``shard`` (default: one process)."""

    def __init__(self, config: RunConfig, rows_loader: RowsLoader | None = None, shard: Shard | None = None) -> None:
        self.config = config
        self.mode = config.mode
        self.configs = list(config.configs)
        self.rows_loader: RowsLoader = rows_loader or load_instances
        self.shard = shard or Shard()
        self._other_rows: dict[tuple[str, str], Any] = {}
        self.datasets = {c: self.rows_loader(config.dataset, c, config.split) for c in self.configs}
        #: (sequence id, row indices in step order) of each planned sequence (sequential mode)
        self.sequences: list[tuple[str, list[int]]] = []
        self._instance_pos: dict[str, tuple[str, int]] = {}
        #: every unit of the run, in the one-process order
        self.all_units = self._single_units() if self.mode == "single" else self._sequential_units()
        groups = list(range(len(self.all_units))) if self.mode == "single" else [u.index for u in self.all_units]
        #: this process's units (all of them with one process)
        self.units: list[Unit] = self.shard.select(self.all_units, groups)
        self.path = config.output_path()
        #: this process's file (``path`` itself with one process)
        self.part_path = self.shard.part_path(self.path)

    # ---- units --------------------------------------------------------------------------------------------------

    def _single_units(self) -> list[Unit]:
        limit = self.config.limit
        units: list[Unit] = []
        for config in self.configs:
            table = self.datasets[config].data
            ids = table.column("id").to_pylist()
            counts = item_counts(table)
            n = len(ids) if limit is None else min(limit, len(ids))
            units.extend(Unit(key=ids[i], expected_rows=counts[i], config=config, index=i) for i in range(n))
        return units

    def _sequential_units(self) -> list[Unit]:
        config = self.configs[0]
        ds = self.datasets[config]
        ids = ds.data.column("id").to_pylist()
        counts = item_counts(ds.data)
        sequences = group_sequences(ds.select_columns(["sequence_id", "step"]))
        if self.config.limit is not None:
            sequences = sequences[:self.config.limit]
        self.sequences = sequences
        units: list[Unit] = []
        for seq_no, (seq_id, rows) in enumerate(sequences):
            for step, row_index in enumerate(rows, start=1):
                self._instance_pos[ids[row_index]] = (seq_id, step)
            for t in range(1, len(rows) + 1):
                evaluated = self.evaluated(t, len(rows))
                if evaluated:
                    units.append(Unit(key=f"{seq_id}/step{t:02d}", config=config, index=seq_no, step=t,
                                      expected_rows=sum(counts[rows[s - 1]] for s in evaluated)))
        return units

    def evaluated(self, t: int, length: int) -> list[int]:
        """Edits s evaluated after step t of a sequence of ``length``: s <= eval_edits, 0 <= t - s <= max_gap."""
        return sequential_evaluated(t, length, self.config.eval_edits, self.config.max_gap)

    def unit_of(self, row: dict[str, Any]) -> Hashable:
        """The unit a prediction row belongs to (single: its instance; sequential: the step it was written at)."""
        if self.mode == "single":
            return row["instance_id"]
        seq_id, step = self._instance_pos[row["instance_id"]]
        return f"{seq_id}/step{step + int(row['gap']):02d}"

    def expected_rows(self, units: list[Unit] | None = None) -> dict[Hashable, int]:
        """Rows of each complete unit (of ``units``, default every unit of the run)."""
        return {u.key: u.expected_rows for u in (self.all_units if units is None else units)}

    # ---- data and output ----------------------------------------------------------------------------------------

    def load_rows(self, config: str, split: str) -> Any:
        """Instance rows of another config or split of the same dataset (e.g. the train split for IE-IKE), loaded
        once."""
        key = (config, split)
        if key not in self._other_rows:
            self._other_rows[key] = self.rows_loader(self.config.dataset, config, split)
        return self._other_rows[key]

    def merge(self) -> MergeResult:
        """Merge the part files of a multi-process run into :attr:`path` when every unit is there."""
        c = self.config
        sequential = c.mode == "sequential"
        expect = {"method": c.method, "mode": c.mode, "split": c.split, "seed": c.seed, "limit": c.limit,
                  "configs": list(c.configs), "eval_edits": c.eval_edits if sequential else None,
                  "max_gap": c.max_gap if sequential else None}
        return merge(self.path, [u.key for u in self.all_units], self.unit_of, self.expected_rows(), expect=expect)

