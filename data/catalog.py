"""DuckDB over the lake: the views of `sql/views/` and the per-run catalog file.

Queries never block a running stage: `connect()` is an in-memory connection over the Parquet parts
the run's manifests list (data/manifest.py) at that moment.
`refresh_catalog()` builds `runs/<run>/catalog.duckdb` in a temporary file and renames it into place,
so the writer is short-lived and never waits on (or locks out) someone who has the old catalog open.
"""
from __future__ import annotations

import os
import re
import uuid
from pathlib import Path
from typing import Callable

import duckdb

from evoforge.data.atomic import atomic_path
from evoforge.data.lake import Lake, LakeError, RunHealth, duckdb_spill_root
from evoforge.data.storage import LakePath, duckdb_filesystem, is_remote, location

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"
# A query session's memory: past it DuckDB spills its hash tables and sorts to the session's own folder, so a
# query over a 10M-rollout round holds what a 1M one does (bench/factory_scale.py); DuckDB's default is 80% of RAM
QUERY_MEMORY_LIMIT = "256MB"


def _list_literal(paths: list[LakePath]) -> str:
    return "[" + ", ".join("'" + str(p).replace("'", "''") + "'" for p in paths) + "]"


def view_statements(files: dict[str, list[LakePath]]) -> list[tuple[str, str]]:
    """The views of `sql/views/`, each over exactly the files given for its table (`${parts:<table>}`)."""
    statements = []
    for path in sorted((SQL_DIR / "views").glob("*.sql")):
        text = path.read_text()
        for table in set(re.findall(r"\$\{parts:(\w+)\}", text)):
            text = text.replace(f"${{parts:{table}}}", _list_literal(files[table]))
        statements.append((path.stem, text))
    return statements


def named_queries() -> dict[str, Path]:
    return {path.stem: path for path in sorted((SQL_DIR / "queries").glob("*.sql"))}


def run_health(run_dir: LakePath) -> RunHealth:
    """What `create_views` builds on: the run's committed parts, checked cheaply (Lake.inspect)."""
    run_dir = location(run_dir)
    lake = Lake(run_dir.parent)
    try:  # the zero-row schema files type the views: a run written before a column was added needs them renewed
        lake.ensure_run(run_dir.name)
    except OSError:  # a lake this user may only read: the views keep the columns the run was written with
        pass
    return lake.inspect(run_dir.name)


def all_runs_health(root: LakePath) -> RunHealth:
    """`run_health` of every run under the lake's `root`, as one: the views then read every run, their
    `run` column telling them apart (`evoforge sql --all-runs`)."""
    lake = Lake(root)
    merged = RunHealth()
    for run in lake.runs():
        health = run_health(lake.run_dir(run))
        for table, files in health.files.items():
            merged.files.setdefault(table, []).extend(files)
        merged.damaged += health.damaged
    if not merged.files:
        raise LakeError(f"no runs under {lake.root}")
    return merged


def use_object_storage(con: duckdb.DuckDBPyConnection) -> None:
    """Let `con` read s3:// paths: DuckDB 2.0 cannot install httpfs here, so an fsspec filesystem
    (s3fs, from the AWS variables) is registered instead; what a notebook does too (README)."""
    if "s3" not in con.list_filesystems():
        con.register_filesystem(duckdb_filesystem())


def create_views(con: duckdb.DuckDBPyConnection, run_dir: LakePath, report: Callable[[str], None] | None = None,
                 health: RunHealth | None = None) -> None:
    """Views over the parts the run's manifests list; damaged parts are left out, each named in one
    line to `report` (a query over the rest of the run still answers)."""
    run_dir = location(run_dir)
    if is_remote(run_dir):
        use_object_storage(con)
    health = health or run_health(run_dir)
    if report is not None:
        for damage in health.damaged:
            report(damage.line())
    for name, statement in view_statements(health.files):
        try:
            con.execute(statement)
        except duckdb.Error as err:
            raise RuntimeError(f"sql/views/{name}.sql: {err}") from err


def connect(run_dir: LakePath, report: Callable[[str], None] | None = None,
            health: RunHealth | None = None, read_only: bool = False) -> duckdb.DuckDBPyConnection:
    """An in-memory session with the run's views; `read_only`: DuckDB itself keeps it to them (`lock_to_parts`)."""
    run_dir = location(run_dir)
    health = health or run_health(run_dir)
    con = duckdb.connect(":memory:", config={"memory_limit": QUERY_MEMORY_LIMIT, "temp_directory": str(session_spill())})
    create_views(con, run_dir, report, health)
    if read_only:
        lock_to_parts(con, [part for parts in health.files.values() for part in parts])
    return con


def session_spill() -> Path:
    """A folder of its own for one session's spill, under the project's scratch: DuckDB creates it at the first
    spill and removes it when the session closes (a killed process leaves it to `.tmp`'s cleaning)."""
    return duckdb_spill_root() / f"session-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def lock_to_parts(con: duckdb.DuckDBPyConnection, parts: list[LakePath]) -> None:
    """DuckDB's own guard on a query session: the files it may open are the parts the views read and nothing
    else (so `read_text('/etc/passwd')`, `glob('/root/**')`, ATTACH, INSTALL, EXPORT and COPY to any other
    path fail inside DuckDB, whatever the statement), extensions neither installed nor loaded on their own,
    and the configuration locked so no statement can undo it. One write this leaves open, COPY over one of
    those very parts, is what `check_read_only` refuses."""
    # DuckDB always lets a session open its spill folder besides these: `connect` gave it one of its own
    con.execute("SET allowed_paths = " + _list_literal(parts))
    con.execute("SET autoinstall_known_extensions = false")
    con.execute("SET autoload_known_extensions = false")
    con.execute("SET allow_community_extensions = false")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")


def refresh_catalog(run_dir: LakePath) -> LakePath:
    """`catalog.duckdb`: the views over the parts committed now, for a data engineer's own session
    (on object storage its views name s3:// paths: the session registers the filesystem, README)."""
    target = location(run_dir) / "catalog.duckdb"
    with atomic_path(target) as tmp:
        try:
            con = duckdb.connect(str(tmp))
            try:
                create_views(con, run_dir)
                con.execute("CHECKPOINT")
            finally:
                con.close()
        finally:
            Path(f"{tmp}.wal").unlink(missing_ok=True)
    return target


def resolve_query(text: str) -> str:
    """A named query of `sql/queries/` (by file stem), or the text itself."""
    queries = named_queries()
    return queries[text].read_text() if text in queries else text


def query(con: duckdb.DuckDBPyConnection, name: str, **parameters) -> list[dict]:
    """The rows of the named query `sql/queries/<name>.sql` as dicts; `parameters` are bound to its
    `$name` placeholders, never pasted into the text."""
    queries = named_queries()
    if name not in queries:
        raise KeyError(f"no query sql/queries/{name}.sql")
    cursor = con.execute(queries[name].read_text(), parameters or None)
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row)) for row in cursor.fetchall()]


class ReadOnlyError(ValueError):
    pass


READ_ONLY_STATEMENTS = ("SELECT", "EXPLAIN")  # DESCRIBE, SHOW, SUMMARIZE and FROM-first queries parse as SELECT
EXPLAINED = re.compile(r"^\s*EXPLAIN\s+(?:ANALY[SZ]E\s+)?(?:\((?:[^()]|\([^()]*\))*\)\s*)?", re.IGNORECASE)


def _kind(statement) -> str:
    return str(statement.type).rsplit(".", 1)[-1]


def check_read_only(sql: str) -> None:
    """Refuse any statement but a query, by DuckDB's own parse of the text; an EXPLAIN (ANALYZE runs what it
    explains) is judged by the statement it explains. `lock_to_parts` is the guard on what a query can open;
    this one keeps a session from writing over the parts it may read (COPY ... TO one of them)."""
    for number, statement in enumerate(duckdb.extract_statements(sql), start=1):
        kind = _kind(statement)
        if kind == "EXPLAIN":
            try:
                explained = duckdb.extract_statements(EXPLAINED.sub("", statement.query, count=1))
            except duckdb.ParserException:
                explained = []
            kind = "EXPLAIN" if [_kind(e) for e in explained] == ["SELECT"] else \
                f"EXPLAIN of {_kind(explained[0]) if len(explained) == 1 else 'a statement it cannot tell'}"
        if kind not in READ_ONLY_STATEMENTS:
            raise ReadOnlyError(f"statement {number} is {kind}: evoforge sql only reads (SELECT, EXPLAIN); "
                                "--allow-writes to run it anyway")
