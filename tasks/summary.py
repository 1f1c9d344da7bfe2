"""The lines of a stage's summary: the figures a user checks first, as markdown, from the stage's
output tables. Each stage's module has a `summarize(tables) -> list[str]` built from these; the
Prefect artifacts show them (flows/artifacts.py)."""
from __future__ import annotations

from collections import Counter

import pyarrow as pa


def column(tables: dict[str, pa.Table], table: str, name: str) -> pa.ChunkedArray | None:
    """`table`.`name`, or None when the stage wrote no rows of `table`."""
    return tables[table][name] if table in tables and tables[table].num_rows else None


def rows(tables: dict[str, pa.Table], table: str) -> int:
    return tables[table].num_rows if table in tables else 0


def counts(values: pa.ChunkedArray | None) -> dict:
    """Value -> count, in a stable order (None sorts as 'None')."""
    return dict(sorted(Counter(values.to_pylist()).items(), key=lambda kv: str(kv[0]))) if values is not None else {}


def line(label: str, values: dict) -> str:
    return f"- **{label}**: " + (", ".join(f"{k} {v}" for k, v in values.items()) if values else "none")
