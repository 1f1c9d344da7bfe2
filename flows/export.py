"""export: a run's tables and each method's training rows as a Hugging Face dataset with its card
(`evoforge export`). This module reads the lake and gathers the lineage; tasks/export.py builds the
datasets, writes the card and the folder, and pushes to the hub.

A config is either a lake table (every round chosen, with `round` and `stage` as the views have them) or
a finetune method's rows exactly as its trainer receives them (the method module's `training_rows`, then
its `dataset`), one round after another with a `round` column. Its lineage names the stage versions the
rows came from (data/history.py), the model that generated them and the checkpoint it was, the SQL that
reads the same rows back from the lake at this version, the grader's settings and the decontamination
sets.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import pyarrow as pa

from evoforge import __version__
from evoforge.data import home, schemas
from evoforge.data.history import Version, run_history, state_as_of
from evoforge.data.lake import LakeError, lake
from evoforge.data.manifest import Part
from evoforge.data.spread import LakeWorkers, part_shares
from evoforge.flows.config import RoundConfig, resolve_path
from evoforge.flows.inputs import run_config, saved_config_path
from evoforge.flows.spread import range_workers
from evoforge.tasks import export as building
from evoforge.tasks.finetune.training import METHOD_MODULES, TrainingContext

# the view columns a lake table's config has: its schema, then where it came from
PROVENANCE_COLUMNS = ("round", "stage")
METHOD_SLICE_ROWS = 8_192  # rows of a row-wise method's table made into trainer rows at a time


@dataclass(frozen=True)
class ExportResult:
    target: str  # the folder, or hub:ORG/NAME
    rows: dict[str, int]  # config -> rows
    version: int  # the run's version the export read (`evoforge sql --as-of`)
    folder: Path  # what was written (for the hub: the Parquet folder that was pushed)
    empty: list[str]  # tables asked for that have no rows in those rounds: left out (no config)


def exportable() -> list[str]:
    """What `--table` accepts: every lake table of a round, and each finetune method's training rows."""
    return sorted(schemas.ROUND_TABLES) + sorted(METHOD_MODULES)


def export_run(run: str, tables: list[str], to: str, *, rounds: list[int] | None = None, format: str | None = None,
               private: bool = False, overwrite: bool = False, config: RoundConfig | None = None,
               license: str | None = None, tags: list[str] | None = None, api=None) -> ExportResult:
    """Export `tables` of `run` (all its rounds, or `rounds`) to the folder or hub repository `to`."""
    store = lake()
    store.existing_run_dir(run)
    unknown = [t for t in tables if t not in exportable()]
    if unknown:
        raise LakeError(f"export: no table {unknown[0]!r}; choose from {', '.join(exportable())}")
    repo_id = building.hub_repo_id(to)
    if repo_id and format == "arrow":
        raise LakeError("export: the hub gets the Parquet layout; drop --format arrow for a hub:ORG/NAME target")
    format = format or ("parquet" if repo_id else "arrow")  # a folder: save_to_disk, what load_from_disk reads
    if config is None:  # the run's saved settings; a run only `evoforge ingest` started has none: the defaults
        config = run_config(run) if saved_config_path(run).exists() else RoundConfig()
    versions = run_history(store, run)
    state = state_as_of(versions, len(versions)) if versions else []
    chosen = sorted({v.round for v in state}) if rounds is None else sorted(set(rounds))
    missing = sorted(set(chosen) - {v.round for v in state})
    if missing:
        raise LakeError(f"export: run {run} has no round {missing[0]} (rounds: {sorted({v.round for v in state})})")

    sources: dict[str, list[Version]] = {}
    lake_rows = []  # of each table exported or made into a method's rows
    for name in tables:
        table = METHOD_MODULES[name].TABLE if name in METHOD_MODULES else name
        sources[name] = [v for v in state if v.round in chosen and any(p.table == table for p in v.manifest.parts)]
        lake_rows.append(sum(p.rows for v in sources[name] for p in v.manifest.parts if p.table == table))
    # a lake table's parts, and a row-wise method's, are written a part per worker (and the method's counted so)
    workers = range_workers(config.cluster, max(lake_rows, default=0))
    with (LakeWorkers(workers, str(store.root)) if workers > 1 else nullcontext()) as pool:
        data: dict[str, pa.Table | building.StreamedConfig] = {}
        for name in tables:
            data[name] = _method_rows(run, name, chosen, config, sources[name], pool) if name in METHOD_MODULES else \
                _lake_rows(run, name, sources[name])
        empty = [name for name, rows in data.items() if _rows(rows) == 0]
        data = {name: rows for name, rows in data.items() if _rows(rows)}  # `datasets` cannot load a saved empty split
        if not data:
            raise LakeError(f"export: run {run} has no rows of {', '.join(tables)} in round(s) {chosen}")
        lineage = _lineage(run, chosen, data, sources, len(versions), config)
        settings = config.export
        configs = {name: rows if isinstance(rows, building.StreamedConfig) else building.dataset_configs({name: rows})[name]
                   for name, rows in data.items()}
        card = building.dataset_card(configs, lineage, license=license or settings.license,
                                     task_categories=settings.task_categories, tags=[*settings.tags, *(tags or [])],
                                     pretty_name=settings.pretty_name or f"evoforge run {run}", format=format)
        if repo_id is None:
            folder = building.write_export(configs, card, Path(to), format, overwrite=overwrite, workers=pool)
        else:
            folder = home.home() / ".tmp" / "exports" / f"{run}-{repo_id.replace('/', '--')}"
            building.write_export(configs, card, folder, "parquet", overwrite=True, workers=pool)
    if repo_id is not None:
        building.push_to_hub(folder, repo_id, private=private, api=api,
                             commit_message=f"evoforge export of run {run}, version {len(versions)}")
    return ExportResult(to, {name: _rows(rows) for name, rows in data.items()}, len(versions), folder, empty)


def _rows(data: pa.Table | building.StreamedConfig) -> int:
    return data.rows if isinstance(data, building.StreamedConfig) else data.num_rows


def _lake_rows(run: str, table: str, versions: list[Version]) -> building.StreamedConfig:
    """A lake table streamed from exactly the versions the card names (not whatever is current when a
    part is read), part by part: an export of a 10M-rollout round holds one batch at a time. Its pieces
    are slices of its parts' row groups (`part_shares`, as a spread stage reads them), which a
    spread export's workers read and write at once: a round of one part of a million rollouts is four
    pieces, not one that its own process writes while the workers wait."""
    rows = sum(p.rows for v in versions for p in v.manifest.parts if p.table == table)
    pieces = tuple(partial(part_rows, run, v.round, v.stage, part, share)
                   for v in versions for part in v.manifest.parts if part.table == table for share in part_shares(part))
    return building.StreamedConfig.of_pieces(lake().read_schema(table), rows, pieces)


def part_rows(run: str, round: int, stage: str, part: Part, share: tuple[int, int] = (0, 1)) -> Iterator[pa.RecordBatch]:
    """One part's rows (`share`: the k-th of n slices of its row groups), with `round` and `stage`, the part
    checked against its checksum by the reader of its first slice (`Lake.part_batches`): a piece of a lake
    table's export."""
    store = lake()
    return store.part_batches(run, round, stage, part, store.read_schema(part.table).names, share)


def _method_rows(run: str, method: str, rounds: list[int], config: RoundConfig, versions: list[Version], workers=None
                 ) -> pa.Table | building.StreamedConfig:
    """The method's rows as its trainer receives them (`training_rows`, then `dataset`), per round. A
    row-wise method (`ROW_WISE`: both act on each row of its `TABLE` alone) is streamed part by part
    from exactly `versions` (counted by `workers` when given); the others are built whole, as their
    trainer builds them."""
    from evoforge.flows.finetune import LakeRoundInputs  # imports Prefect: only when a method is exported

    module = METHOD_MODULES[method]
    if getattr(module, "ROW_WISE", False):
        return _row_wise_method_rows(run, method, rounds, config, versions, workers)
    context = TrainingContext(verify=config.verify, critic=config.critic)
    pieces = []
    for round in rounds:
        rows = module.training_rows(LakeRoundInputs(run, round), config.finetune)
        pieces.append(_with_round(module.dataset(rows, config.finetune, context).data.table, round))
    return pa.concat_tables(pieces)


def _with_round(table: pa.Table, round: int) -> pa.Table:
    return table.append_column("round", pa.array([round] * table.num_rows, pa.int32()))


class _OneSlice:
    """A `RoundInputs` whose table is one slice of the method's table: a row-wise method's `training_rows`
    selects from it exactly the rows it selects from the whole."""

    def __init__(self, rows: pa.Table):
        self.rows = rows

    def round_table(self, table: str, made_by: str) -> pa.Table:
        return self.rows

    stage_output = round_table


def _row_wise_method_rows(run: str, method: str, rounds: list[int], config: RoundConfig, versions: list[Version],
                          workers=None) -> building.StreamedConfig:
    """A row-wise method's rows, a slice of METHOD_SLICE_ROWS of its table at a time: the export of a
    10M-rollout round holds one slice's prompts (few-shot messages repeat per row) and never the round.
    The rows it keeps are counted first from the columns `training_rows` chooses them by (`ROWS_CHOSEN_BY`;
    none: every row of a part, which its manifest counts), a part per worker when `workers` are given; each
    part is then a piece the workers write at once."""
    from evoforge.flows.finetune import LakeRoundInputs

    module = METHOD_MODULES[method]
    parts = []  # (round, stage, part) in the order the trainer reads them
    for round in rounds:
        if not any(v.round == round for v in versions):  # as the trainer: a required input that is missing is named
            module.training_rows(LakeRoundInputs(run, round), config.finetune)
            continue
        parts += [(v.round, v.stage, part) for v in versions if v.round == round for part in v.manifest.parts
                  if part.table == module.TABLE]
    calls = [(run, method, config, round, stage, part) for round, stage, part in parts]
    counted = workers.map(method_part_count, calls) if workers is not None and len(calls) > 1 and \
        module.ROWS_CHOSEN_BY else [method_part_count(*call) for call in calls]
    pieces = tuple(partial(method_part_rows, *call) for call in calls)
    return building.StreamedConfig.of_pieces(_method_schema(method, config), sum(counted), pieces)


def _part_slices(run: str, round: int, stage: str, part: Part, columns: tuple[str, ...] | None = None
                 ) -> Iterator[pa.Table]:
    """A part's rows (`columns` only, when given) a slice of METHOD_SLICE_ROWS at a time, the part checked against
    its checksum first."""
    store = lake()
    batches = store.version_batches(run, round, stage, [part], part.table) if columns is None else \
        store.part_batches(run, round, stage, part, list(columns))
    for batch in batches:
        for start in range(0, batch.num_rows, METHOD_SLICE_ROWS):
            yield pa.Table.from_batches([batch.slice(start, METHOD_SLICE_ROWS)])


def method_part_count(run: str, method: str, config: RoundConfig, round: int, stage: str, part: Part) -> int:
    """How many of a part's rows a row-wise method keeps: `training_rows` over the columns it chooses them by
    (`ROWS_CHOSEN_BY`), read alone; a method that keeps every row reads none (the export of 2.4M SFT rows read
    them twice, ~2.4 CPU-s of ~30)."""
    module = METHOD_MODULES[method]
    if not module.ROWS_CHOSEN_BY:
        return part.rows
    return sum(module.training_rows(_OneSlice(piece), config.finetune).num_rows
               for piece in _part_slices(run, round, stage, part, module.ROWS_CHOSEN_BY))


def _method_schema(method: str, config: RoundConfig) -> pa.Schema:
    """The schema of a row-wise method's rows, with their round: its `dataset` of no rows (the types are its
    code's, whatever the rows: tests/test_export.py checks them against a row's)."""
    module, context = METHOD_MODULES[method], TrainingContext(verify=config.verify, critic=config.critic)
    kept = module.training_rows(_OneSlice(lake().read_schema(module.TABLE).empty_table()), config.finetune)
    return _with_round(module.dataset(kept, config.finetune, context).data.table, 0).schema


def method_part_rows(run: str, method: str, config: RoundConfig, round: int, stage: str, part: Part
                     ) -> Iterator[pa.RecordBatch]:
    """A row-wise method's rows of one part, as its trainer receives them, with their round: a piece of its export."""
    module, context = METHOD_MODULES[method], TrainingContext(verify=config.verify, critic=config.critic)
    for piece in _part_slices(run, round, stage, part):
        kept = module.training_rows(_OneSlice(piece), config.finetune)
        if kept.num_rows:
            yield from _with_round(module.dataset(kept, config.finetune, context).data.table, round).to_batches()


def _lineage(run: str, rounds: list[int], data: dict[str, pa.Table | building.StreamedConfig], sources: dict[str, list[Version]],
             version: int, config: RoundConfig) -> dict:
    events = lake().read(run, "stage_runs").to_pylist()
    checkpoints = {row["model_id"]: row for row in lake().read(run, "checkpoints").to_pylist()}

    def described(v: Version) -> dict:
        made_by = next((e for e in sorted(events, key=lambda e: e["started_at"], reverse=True)
                        if e["round"] == v.round and e["stage"] == v.stage and e["status"] == "completed"
                        and e["output_fingerprint"] == v.manifest.fingerprint()), None)
        model = made_by["model_id"] if made_by else None
        trained = checkpoints.get(model) if model else None
        return {"round": v.round, "stage": v.stage, "version": v.manifest.version, "commit": v.manifest.commit,
                "committed_at": v.manifest.committed_at, "config_hash": v.manifest.config_hash, "model": model,
                "checkpoint": trained["checkpoint_id"] if trained else (model and "the run's starting model")}

    return {
        "run": run, "rounds": rounds, "evoforge_version": __version__, "lake": str(lake().run_dir(run)),
        "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "run_version": version,
        "tables": {name: {"table": METHOD_MODULES[name].TABLE if name in METHOD_MODULES else name, "rows": _rows(table), "sql": _sql(run, name, rounds, version),
                          "sources": [described(v) for v in sources[name]]} for name, table in data.items()},
        "grader": {"name": "math-verify", **config.verify.grading_settings()},
        "decontamination": [_eval_set(s) for s in config.eval_sets],
    }


def _eval_set(eval_set) -> dict:
    """What the card says of a set the pool was decontaminated against: its name, file and size (None when
    the file cannot be read here any more)."""
    from evoforge.tasks.ingest import IngestError, load_eval_set

    try:
        problems = load_eval_set(eval_set, resolve_path(".")).num_rows
    except (IngestError, OSError):
        problems = None
    return {"name": eval_set.name, "path": eval_set.path, "problems": problems}


def _sql(run: str, name: str, rounds: list[int], version: int) -> str:
    where = f"round IN ({', '.join(map(str, rounds))})"
    if name in METHOD_MODULES:
        module = METHOD_MODULES[name]
        return (f"-- built by evoforge.tasks.finetune.{name}.training_rows, then .dataset, from:\n"
                f"-- evoforge sql --run {run} --as-of {version} \"...\"\nSELECT * FROM {module.TABLE} WHERE {where}")
    columns = ", ".join([*schemas.ROUND_TABLES[name].names, *PROVENANCE_COLUMNS])
    return f"-- evoforge sql --run {run} --as-of {version} \"...\"\nSELECT {columns} FROM {name} WHERE {where}"
