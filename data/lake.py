"""The Parquet lake: the source of truth for every artifact.

Layout (DESIGN.md):
    runs/<run>/round=<r>/<stage>/<table>/part-*.parquet   artifacts of one stage of one round
    runs/<run>/stage_runs/part-*.parquet                  one file per stage_runs event
    runs/<run>/round=0/_schema/<table>/part-schema.parquet  zero-row file per table, so that the views'
    runs/<run>/stage_runs/part-schema.parquet               globs match (and type) before any stage ran

Writes are atomic (data/atomic.py): a file is written under a hidden temporary name and renamed, and
a stage's whole output is built in a hidden temporary folder and swapped in, so a reader never sees
half an artifact and a crash leaves nothing visible behind (hidden names match no glob).
"""
from __future__ import annotations

import re
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from evoforge.data import home, schemas
from evoforge.data.atomic import atomic_path, remove_leftovers
from evoforge.data.ids import fingerprint_files

RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class LakeError(ValueError):
    pass


def write_parquet(table: pa.Table, path: Path) -> Path:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return path


class Lake:
    def __init__(self, root: Path):
        self.root = Path(root).resolve()

    # -- paths ---------------------------------------------------------------------------------
    def run_dir(self, run: str) -> Path:
        if not RUN_NAME.match(run or ""):
            raise LakeError(
                f"run name {run!r} is not valid: use letters, digits, '-', '_' or '.', at most 64 characters"
            )
        return self.root / run

    def existing_run_dir(self, run: str) -> Path:
        """The run's folder; LakeError listing the runs there when it does not exist."""
        run_dir = self.run_dir(run)
        if not run_dir.is_dir():
            runs = sorted(p.name for p in self.root.iterdir() if p.is_dir() and RUN_NAME.match(p.name)) \
                if self.root.is_dir() else []
            raise LakeError(f"run {run!r} does not exist under {self.root}; runs there: {', '.join(runs) or 'none'}")
        return run_dir

    def stage_dir(self, run: str, round: int, stage: str) -> Path:
        return self.run_dir(run) / f"round={int(round)}" / stage

    def table_files(self, run: str, table: str, round: int | None = None, stage: str | None = None) -> list[Path]:
        run_dir = self.run_dir(run)
        if table in schemas.RUN_TABLES:
            return sorted((run_dir / table).glob("part-*.parquet"))
        rounds = f"round={int(round)}" if round is not None else "round=*"
        return sorted(run_dir.glob(f"{rounds}/{stage or '*'}/{table}/part-*.parquet"))

    def ensure_run(self, run: str) -> Path:
        """Create the run folder with a zero-row schema file per table (see module doc)."""
        run_dir = self.run_dir(run)
        for name, schema in {**schemas.ROUND_TABLES, **schemas.RUN_TABLES}.items():
            folder = run_dir / name if name in schemas.RUN_TABLES else run_dir / "round=0" / "_schema" / name
            path = folder / "part-schema.parquet"
            if not path.exists() or pq.read_schema(path) != schema:
                write_parquet(schema.empty_table(), path)
        return run_dir

    # -- reads ---------------------------------------------------------------------------------
    def read(self, run: str, table: str, round: int | None = None, stage: str | None = None) -> pa.Table:
        """All rows of `table` in the run (optionally one round / stage), with `round` and `stage`
        (the stage that wrote them) from the path, as the DuckDB views have them."""
        schema = self._schema(table)
        parts = []
        for path in self.table_files(run, table, round, stage):
            part = schemas.conform(pq.read_table(path), schema, where=str(path), missing_as_null=True)
            if table in schemas.ROUND_TABLES:
                r = int(path.parent.parent.parent.name.split("=", 1)[1])
                part = part.append_column("round", pa.array([r] * part.num_rows, pa.int32()))
                part = part.append_column("stage", pa.array([path.parent.parent.name] * part.num_rows, pa.string()))
            parts.append(part)
        if not parts:
            empty = schema.empty_table()
            if table in schemas.ROUND_TABLES:
                empty = empty.append_column("round", pa.array([], pa.int32()))
                empty = empty.append_column("stage", pa.array([], pa.string()))
            return empty
        return pa.concat_tables(parts)

    @staticmethod
    def _schema(table: str) -> pa.Schema:
        try:
            return {**schemas.ROUND_TABLES, **schemas.RUN_TABLES}[table]
        except KeyError:
            raise LakeError(f"unknown table {table!r}") from None

    # -- writes --------------------------------------------------------------------------------
    def write_part(self, run: str, round: int, stage: str, table: str, rows: pa.Table, part: str) -> Path:
        """Add (or atomically replace) one named part of a table, leaving the stage's other parts alone."""
        rows = schemas.conform(rows, self._schema(table), where=f"{stage}/{table}")
        self.ensure_run(run)
        return write_parquet(rows, self.stage_dir(run, round, stage) / table / f"part-{part}.parquet")

    def append_run_table(self, run: str, table: str, rows: pa.Table) -> Path:
        rows = schemas.conform(rows, self._schema(table), where=table)
        self.ensure_run(run)
        return write_parquet(rows, self.run_dir(run) / table / f"part-{uuid.uuid4().hex}.parquet")

    def publish_stage(self, run: str, round: int, stage: str, tables: dict[str, pa.Table]) -> str:
        """Replace a stage's whole output with `tables`; returns the output fingerprint.

        Built in a temporary folder and committed by renames (data/atomic.py), so readers see the old
        output or the new one, never a mix, and a crash before the commit leaves the old one intact.
        """
        self.ensure_run(run)
        with atomic_path(self.stage_dir(run, round, stage)) as building:
            written = []
            for table, rows in tables.items():
                rows = schemas.conform(rows, self._schema(table), where=f"{stage}/{table}")
                written.append(write_parquet(rows, building / table / "part-00000.parquet"))
            fingerprint = fingerprint_files(written)
        return fingerprint

    def sweep(self, run: str) -> int:
        """Remove what writers that died left behind (data/atomic.py); returns the count."""
        return remove_leftovers(self.run_dir(run))


_lake: Lake | None = None


def lake() -> Lake:
    """This process's lake, built once from the home settings (EVOFORGE_RUNS, EVOFORGE_HOME)."""
    global _lake
    if _lake is None:
        _lake = Lake(home.runs_root())
    return _lake


def use_lake(root: Path | None) -> Lake | None:
    """Point this process at the lake under `root` (None: back to the home settings), e.g. for a test."""
    global _lake
    _lake = Lake(root) if root is not None else None
    return _lake
