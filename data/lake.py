"""The Parquet lake: the source of truth for every artifact.

Layout (DESIGN.md):
    runs/<run>/round=<r>/<stage>/<table>/part-*.parquet   artifacts of one stage of one round
    runs/<run>/stage_runs/part-*.parquet                  one file per stage_runs event
    runs/<run>/round=0/_schema/<table>/part-schema.parquet  zero-row file per table, so that the views'
    runs/<run>/stage_runs/part-schema.parquet               globs match (and type) before any stage ran

Writes are atomic: a file is written under a hidden temporary name in the same folder and renamed,
and a stage's whole output is built in a hidden staging folder and swapped in, so a reader never
sees half an artifact and a crash leaves nothing visible behind (hidden names match no glob).
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from data import schemas

RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class LakeError(ValueError):
    pass


def write_parquet_atomic(table: pa.Table, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex}"
    try:
        pq.write_table(table, tmp, compression="zstd")
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fingerprint_files(paths: list[Path]) -> str:
    """Content hash of a set of files, independent of their order on disk."""
    digest = hashlib.sha256()
    for path in sorted(paths, key=lambda p: (p.parent.name, p.name)):
        digest.update(f"{path.parent.name}/{path.name}".encode())
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def fingerprint_table(table: pa.Table) -> str:
    """Content hash of a table's rows, independent of row order (ids are content hashes, DESIGN)."""
    digest = hashlib.sha256()
    digest.update(str(table.schema.names).encode())
    sink = pa.BufferOutputStream()
    if table.num_rows:
        order = pa.compute.sort_indices(table, sort_keys=[(n, "ascending") for n in _sortable(table)])
        table = table.take(order)
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    digest.update(sink.getvalue().to_pybytes())
    return digest.hexdigest()[:16]


def _sortable(table: pa.Table) -> list[str]:
    return [f.name for f in table.schema if not pa.types.is_nested(f.type)]


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

    def stage_dir(self, run: str, round_: int, stage: str) -> Path:
        return self.run_dir(run) / f"round={int(round_)}" / stage

    def table_files(self, run: str, table: str, round_: int | None = None, stage: str | None = None) -> list[Path]:
        run_dir = self.run_dir(run)
        if table in schemas.RUN_TABLES:
            return sorted((run_dir / table).glob("part-*.parquet"))
        rounds = f"round={int(round_)}" if round_ is not None else "round=*"
        return sorted(run_dir.glob(f"{rounds}/{stage or '*'}/{table}/part-*.parquet"))

    def ensure_run(self, run: str) -> Path:
        """Create the run folder with a zero-row schema file per table (see module doc)."""
        run_dir = self.run_dir(run)
        for name, schema in {**schemas.ROUND_TABLES, **schemas.RUN_TABLES}.items():
            folder = run_dir / name if name in schemas.RUN_TABLES else run_dir / "round=0" / "_schema" / name
            path = folder / "part-schema.parquet"
            if not path.exists() or pq.read_schema(path) != schema:
                write_parquet_atomic(schema.empty_table(), path)
        return run_dir

    # -- reads ---------------------------------------------------------------------------------
    def read(self, run: str, table: str, round_: int | None = None, stage: str | None = None) -> pa.Table:
        """All rows of `table` in the run (optionally one round / stage), with `round` and `stage`
        (the stage that wrote them) from the path, as the DuckDB views have them."""
        schema = self._schema(table)
        parts = []
        for path in self.table_files(run, table, round_, stage):
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
    def write_part(self, run: str, round_: int, stage: str, table: str, rows: pa.Table, part: str) -> Path:
        """Add (or atomically replace) one named part of a table, leaving the stage's other parts alone."""
        rows = schemas.conform(rows, self._schema(table), where=f"{stage}/{table}")
        self.ensure_run(run)
        return write_parquet_atomic(rows, self.stage_dir(run, round_, stage) / table / f"part-{part}.parquet")

    def append_run_table(self, run: str, table: str, rows: pa.Table) -> Path:
        rows = schemas.conform(rows, self._schema(table), where=table)
        self.ensure_run(run)
        return write_parquet_atomic(rows, self.run_dir(run) / table / f"part-{uuid.uuid4().hex}.parquet")

    def publish_stage(self, run: str, round_: int, stage: str, tables: dict[str, pa.Table]) -> str:
        """Replace a stage's whole output with `tables`; returns the output fingerprint.

        Built in a hidden staging folder and swapped in by two renames, so readers see the old
        output or the new one, never a mix, and a crash before the swap leaves the old one intact.
        """
        self.ensure_run(run)
        target = self.stage_dir(run, round_, stage)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.parent / f".{stage}.staging-{uuid.uuid4().hex}"
        written: list[Path] = []
        try:
            for table, rows in tables.items():
                rows = schemas.conform(rows, self._schema(table), where=f"{stage}/{table}")
                written.append(write_parquet_atomic(rows, staging / table / "part-00000.parquet"))
            fingerprint = fingerprint_files(written)
            retired = target.parent / f".{stage}.retired-{uuid.uuid4().hex}"
            if target.exists():
                os.replace(target, retired)
            os.replace(staging, target)
            _fsync_dir(target.parent)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(retired, ignore_errors=True)
        return fingerprint

    def output_fingerprint(self, run: str, round_: int, stage: str) -> str | None:
        stage_dir = self.stage_dir(run, round_, stage)
        files = sorted(stage_dir.glob("*/part-*.parquet"))
        if not files:
            return None
        return fingerprint_files(files)

    def sweep(self, run: str) -> int:
        """Remove leftovers of crashed writes (hidden temp, staging and retired names); returns the count."""
        removed = 0
        for path in self.run_dir(run).rglob(".*"):
            if re.search(r"\.(tmp|staging|retired)-[0-9a-f]{32}$", path.name):
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
                removed += 1
        return removed
