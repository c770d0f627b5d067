"""Shares of identical prediction rows between two runs of the same instances (issue 18's batch-invariance figures
and issue 24's graph-vs-eager engine figures)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _rows(path: Path) -> dict[str, dict[str, Any]]:
    out = {}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            if row.get("kind") == "prediction":
                out[f"{row['item_id']}|{row.get('gap')}"] = row
    return out


def identical_share(a: Path, b: Path) -> dict[str, Any]:
    """Over the items both files hold: the share whose ``pre_edit`` and ``post_edit`` are both identical, and
    each field's own share (``pre_edit`` over the rows that carry one: the locality items by default)."""
    ra, rb = _rows(a), _rows(b)
    common = sorted(ra.keys() & rb.keys())
    if not common:
        return {"rows": 0, "identical": None, "pre_edit": None, "post_edit": None}
    with_pre = [k for k in common if ra[k]["pre_edit"] is not None or rb[k]["pre_edit"] is not None]

    def share(field: str, keys: list[str]) -> float | None:
        return round(sum(ra[k][field] == rb[k][field] for k in keys) / len(keys), 4) if keys else None

    both = sum(ra[k]["pre_edit"] == rb[k]["pre_edit"] and ra[k]["post_edit"] == rb[k]["post_edit"]
               for k in common) / len(common)
    return {"rows": len(common), "identical": round(both, 4), "pre_edit": share("pre_edit", with_pre),
            "post_edit": share("post_edit", common)}
