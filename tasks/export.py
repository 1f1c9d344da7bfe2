"""Export: a run's tables as a Hugging Face dataset, the library behind `evoforge export`.

Each table becomes one config (the hub's "subset") holding one split, `train`. The caller (the command
line) reads the tables and gathers their lineage from the lake; nothing here reads storage
(docs/ARCHITECTURE.md, "Layers"). The steps:

- `dataset_configs(tables)`: each Arrow table as a `datasets.DatasetDict` with the split `train`, wrapping
  the table's Arrow buffers without copying them (`arrow_dataset`). Columns the `datasets` library has no
  type for are converted first (`hub_compatible`: a map becomes a list of key/value structs).
- `dataset_card(configs, lineage, ...)`: README.md, the hub's YAML metadata (configs and their data files,
  features, license, task categories, tags, size category, pretty name) and the lineage in prose.
- `write_export(configs, card, to, format)`: the export folder, whole or not at all (data/atomic.py).
- `hub_commit_operations(folder)`, `push_to_hub(folder, repo_id, ...)`: a Parquet export as one commit to a
  dataset repository.

An export folder:

    README.md                                       the card; `configs:` names each config's files
    <config>/train-00000-of-00002.parquet           --format parquet: the hub's own layout of configs,
    <config>/train-00001-of-00002.parquet             shards of at most `max_shard_bytes` of Arrow data
    <config>/data-00000-of-00001.arrow              --format arrow: `Dataset.save_to_disk` of the
    <config>/dataset_info.json, state.json            split, one folder per config

Loading it back: `datasets.load_dataset(folder, "<config>", split="train")` reads either format through the
card's `configs:` (the hub's code path); an Arrow export also loads with `datasets.load_from_disk(folder /
"<config>")`, a `Dataset` (split `train`) memory-mapped from its files.
"""
from __future__ import annotations

import math
import re
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
from pydantic import Field

from evoforge.data.atomic import atomic_path
from evoforge.data.section import Section
from evoforge.tasks.arrow_datasets import arrow_dataset, hub_compatible, hub_type

if TYPE_CHECKING:
    import datasets
    from huggingface_hub import CommitOperationAdd, HfApi

SPLIT = "train"
FORMATS = ("arrow", "parquet")
MAX_SHARD_BYTES = 500 * 1024 * 1024  # what `datasets` puts in one Parquet shard when it pushes to the hub
CARD = "README.md"
CONFIG_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")
HUB_PREFIX = "hub:"
# the hub's size categories, by the number of rows (huggingface_hub's dataset card metadata)
SIZE_CATEGORIES = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                   (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B"),
                   (10_000_000_000, "1B<n<10B"), (100_000_000_000, "10B<n<100B"), (1_000_000_000_000, "100B<n<1T")]


class ExportConfig(Section):
    """What a dataset card says besides the lineage (`evoforge export`); --license and --tag add to it."""
    license: str | None = Field(None, description="the card's license (an SPDX id or a hub license name, e.g. apache-2.0)")
    task_categories: list[str] = Field(default_factory=lambda: ["text-generation"], description="the hub's task categories")
    tags: list[str] = Field(default_factory=lambda: ["math", "synthetic", "evoforge"], description="the card's tags")
    pretty_name: str | None = Field(None, description="the card's title (default: evoforge run <run>)")


class ExportError(ValueError):
    """A user's error in an export, said in one line (the command line prints it as it is)."""


@dataclass(frozen=True)
class StreamedConfig:
    """A config too large to hold (a lake table of a 10M-rollout round): its schema, its row count (the lake's
    manifests know it before a row is read) and its rows as record batches, read once, in order, while its
    files are written. Memory holds one batch, whatever the table's size."""
    schema: pa.Schema
    rows: int
    batches: Callable[[], Iterable[pa.RecordBatch]]
    # the same rows as pieces, in order (a lake table: one per part), each a callable another process can be
    # sent: `write_export` given workers writes each piece's shards in one of them, all at once
    pieces: tuple[Callable[[], Iterable[pa.RecordBatch]], ...] = ()

    @classmethod
    def of_pieces(cls, schema: pa.Schema, rows: int, pieces: tuple[Callable[[], Iterable[pa.RecordBatch]], ...]
                  ) -> "StreamedConfig":
        """A config whose rows are its pieces' in order (read one after another when no workers write them)."""
        def batches() -> Iterator[pa.RecordBatch]:
            for piece in pieces:
                yield from piece()

        return cls(schema, rows, batches, pieces)


def dataset_configs(tables: Mapping[str, pa.Table]) -> dict[str, datasets.DatasetDict]:
    """Each table as one config of the export: a `DatasetDict` holding the split `train`, zero-copy."""
    import datasets

    out = {}
    for name, table in tables.items():
        _check_config_name(name)
        out[name] = datasets.DatasetDict({SPLIT: arrow_dataset(hub_compatible(table), split=SPLIT)})
    if not out:
        raise ExportError("export: no tables to export")
    return out


def _check_config_name(name: str) -> None:
    if not CONFIG_NAME.fullmatch(name or ""):
        raise ExportError(f"export: {name!r} cannot name a config (a folder of the export and the hub's subset): use "
                          f"letters, digits, '_', '-' and '.', starting with a letter or digit")


def _train_split(config: Any) -> datasets.Dataset:
    """The split `train` of a config given as a DatasetDict, a Dataset or an Arrow table."""
    import datasets

    if isinstance(config, pa.Table):
        return arrow_dataset(hub_compatible(config), split=SPLIT)
    if isinstance(config, datasets.DatasetDict):
        if set(config) != {SPLIT}:
            raise ExportError(f"export: a config holds the one split {SPLIT!r}, not {sorted(config)}")
        return config[SPLIT]
    if isinstance(config, datasets.Dataset):
        return config
    raise TypeError(f"export: a config is a DatasetDict, a Dataset or a pyarrow Table, not {type(config).__name__}")


# -- the dataset card ---------------------------------------------------------------------------------

def size_category(rows: int) -> str:
    """The hub's size category for `rows` rows ('n<1K', '1K<n<10K', ..., 'n>1T')."""
    for bound, name in SIZE_CATEGORIES:
        if rows < bound:
            return name
    return "n>1T"


def data_files_pattern(config: str, format: str) -> str:
    """The files of a config's split `train` in an export folder (and in the hub repository)."""
    _check_format(format)
    return f"{config}/{SPLIT}-*.parquet" if format == "parquet" else f"{config}/data-*.arrow"


def _check_format(format: str) -> None:
    if format not in FORMATS:
        raise ExportError(f"export: unknown format {format!r}; choose {' or '.join(FORMATS)}")


def _schema_and_rows(config: Any) -> tuple[pa.Schema, int, int]:
    """(hub-compatible schema, rows, Arrow bytes or 0 when unknown) of a config: a table, a dataset, a
    DatasetDict, or (schema, rows)."""
    if isinstance(config, StreamedConfig):
        config = (config.schema, config.rows)
    if isinstance(config, tuple):
        schema, rows = config
        return _hub_schema(schema), int(rows), 0
    if isinstance(config, pa.Table):
        table = hub_compatible(config)
        return table.schema.remove_metadata(), table.num_rows, table.nbytes
    dataset = _train_split(config)
    return dataset.features.arrow_schema, dataset.num_rows, dataset.data.nbytes


def _hub_schema(schema: pa.Schema) -> pa.Schema:
    return pa.schema([field.with_type(hub_type(field.type)) for field in schema]).remove_metadata()


def dataset_card(configs: Mapping[str, Any], lineage: Mapping[str, Any], *, license: str | None = None,
                 task_categories: Sequence[str] = (), tags: Sequence[str] = (), pretty_name: str | None = None,
                 format: str = "parquet", location: str | None = None) -> str:
    """README.md of an export: the hub's YAML metadata, then the lineage as prose and tables.

    `configs`: config name -> its data (a pa.Table, a DatasetDict from `dataset_configs`, a Dataset) or
    (pa.Schema, rows). `lineage`: what the command line gathered from the lake (run, rounds,
    evoforge_version, exported_at, lake, tables: {config: {table, rows, sql, sources: [...]}}, grader,
    decontamination); every key is optional, a missing one reads "not recorded". `format`: the export's
    format, which names the files each config's `data_files` lists. `location`: where it will be loaded
    from ('ORG/NAME' on the hub, or a folder), for the loading example; a placeholder when None."""
    from datasets import DatasetInfo, Features, SplitDict, SplitInfo
    from datasets.info import DatasetInfosDict
    from datasets.utils.metadata import MetadataConfigs
    from huggingface_hub import DatasetCardData

    _check_format(format)
    if not configs:
        raise ExportError("export: no tables to export")
    shapes = {}
    for name, config in configs.items():
        _check_config_name(name)
        shapes[name] = _schema_and_rows(config)
    infos, files = {}, {}
    for name, (schema, rows, nbytes) in shapes.items():
        splits = SplitDict()
        splits.add(SplitInfo(name=SPLIT, num_bytes=nbytes, num_examples=rows))
        infos[name] = DatasetInfo(config_name=name, features=Features.from_arrow_schema(schema), splits=splits,
                                  dataset_size=nbytes)
        files[name] = {"data_files": [{"split": SPLIT, "path": data_files_pattern(name, format)}]}
    data = DatasetCardData(license=license, task_categories=list(task_categories) or None, tags=list(tags) or None,
                           size_categories=[size_category(sum(rows for _, rows, _ in shapes.values()))],
                           pretty_name=pretty_name)
    # `datasets`' own writers of the two keys, as its push_to_hub writes them
    MetadataConfigs(files).to_dataset_card_data(data)
    DatasetInfosDict(infos).to_dataset_card_data(data)
    body = _card_body({name: (schema, rows) for name, (schema, rows, _) in shapes.items()}, lineage, pretty_name, format,
                      location)
    return f"---\n{data.to_yaml()}\n---\n\n{body}"


def _cell(value: Any) -> str:
    """A value as one markdown table cell."""
    if value is None or value == "":
        return "–"
    text = ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else _cell(value)


SOURCE_COLUMNS = [("round", "round"), ("stage", "stage"), ("version", "version"), ("commit", "commit"),
                  ("committed_at", "committed at"), ("config_hash", "config hash"), ("model", "model"),
                  ("checkpoint", "checkpoint")]


def _card_body(shapes: Mapping[str, tuple[pa.Schema, int]], lineage: Mapping[str, Any], pretty_name: str | None,
               format: str, location: str | None) -> str:
    run = lineage.get("run")
    rounds = lineage.get("rounds") or []
    tables = lineage.get("tables") or {}
    title = pretty_name or (f"evoforge run {run}" if run else "evoforge export")
    made = [f"Exported by evoforge {lineage.get('evoforge_version') or '(version not recorded)'}"]
    made.append(f"from run `{run}`" if run else "from a run not recorded")
    if rounds:
        made.append(f"(round{'s' if len(rounds) > 1 else ''} {', '.join(map(str, rounds))})")
    if lineage.get("exported_at"):
        made.append(f"on {lineage['exported_at']}")
    lake = f" The lake: `{lineage['lake']}`." if lineage.get("lake") else ""
    parts = [f"# {title}", " ".join(made) + "." + lake,
             "Each config (subset) is one table of the run, with one split, `train`."]

    parts += ["## Configs", _table(["config", "rows", "from", "columns"], [
        (f"`{name}`", _count(rows), (tables.get(name) or {}).get("table"), ", ".join(schema.names))
        for name, (schema, rows) in shapes.items()])]

    first = next(iter(shapes))
    if format == "parquet":
        where = location or "<ORG/NAME or folder>"
        load = (f"```python\nimport datasets\n\n# from the hub, or from the export's folder\n"
                f"rows = datasets.load_dataset({where!r}, {first!r}, split=\"train\")\n```")
    else:
        where = location or "<folder>"
        load = (f"```python\nimport datasets\n\n# each config is a saved Dataset (split train), memory-mapped on load\n"
                f"rows = datasets.load_from_disk({f'{where}/{first}'!r})\n"
                f"# or through this card's configs\n"
                f"rows = datasets.load_dataset({where!r}, {first!r}, split=\"train\")\n```")
    parts += ["## Loading", load]

    parts.append("## Lineage")
    for name in shapes:
        entry = tables.get(name)
        parts.append(f"### `{name}`")
        if not entry:
            parts.append("Lineage not recorded.")
            continue
        said = [f"From `{entry['table']}`" if entry.get("table") else "From a table not recorded"]
        if entry.get("rows") is not None:
            said.append(f"{_count(entry['rows'])} rows")
        parts.append(", ".join(said) + ".")
        if entry.get("sql"):
            where = f" (`evoforge sql --run {run} \"...\"`)" if run else ""
            parts += [f"Reproduced from the lake by this query, DuckDB over the run's views{where}:",
                      f"```sql\n{str(entry['sql']).strip()}\n```"]
        sources = entry.get("sources") or []
        if sources:
            parts += ["The lake's commits it was read from:",
                      _table([title for _, title in SOURCE_COLUMNS],
                             [[source.get(key) for key, _ in SOURCE_COLUMNS] for source in sources])]

    grader = lineage.get("grader")
    parts.append("## Grading")
    if grader:
        parts.append(_table(["setting", "value"], [(key, value) for key, value in grader.items()]))
    else:
        parts.append("Not recorded.")

    decontamination = lineage.get("decontamination")
    parts.append("## Decontamination")
    if decontamination:
        parts += ["At ingest, a problem sharing a run of 8 words with one of these evaluation sets was quarantined "
                  "instead of entering the pool:",
                  _table(["set", "path", "problems"], [(d.get("name"), d.get("path"), _count(d.get("problems")))
                                                      for d in decontamination])]
    else:
        parts.append("No decontamination against evaluation sets was recorded.")
    return "\n\n".join(parts) + "\n"


# -- the export folder ---------------------------------------------------------------------------------

def write_export(configs: Mapping[str, Any], card_text: str, to: Path | str, format: str = "arrow", *,
                 overwrite: bool = False, max_shard_bytes: int = MAX_SHARD_BYTES, workers=None) -> Path:
    """Write the export folder `to` (layout: this module's docstring): built in a hidden temporary sibling
    and renamed into place (data/atomic.py), so a failure leaves no half-written export and the old one, if
    any, stays whole. An existing non-empty `to` is refused unless `overwrite`. `configs`: name -> a
    DatasetDict from `dataset_configs` (or a Dataset, or a pyarrow Table, or a `StreamedConfig`). `workers`:
    processes with a `map(function, calls)` (data/spread.py `LakeWorkers`) that write a streamed config's
    pieces at once. Returns `to`."""
    _check_format(format)
    if not configs:
        raise ExportError("export: no tables to export")
    if max_shard_bytes < 1:
        raise ExportError(f"export: max_shard_bytes must be positive, not {max_shard_bytes}")
    to = Path(to)
    if to.exists() and not to.is_dir():
        raise ExportError(f"export: {to} is a file; export to a folder")
    if to.is_dir() and any(to.iterdir()) and not overwrite:
        raise ExportError(f"export: {to} exists and is not empty; choose another folder or overwrite it (--overwrite)")
    splits = {}
    for name, config in configs.items():
        _check_config_name(name)
        splits[name] = config if isinstance(config, StreamedConfig) else _train_split(config)
    from datasets.utils.logging import disable_progress_bar, enable_progress_bar, is_progress_bar_enabled

    bars = is_progress_bar_enabled()
    disable_progress_bar()  # the command prints one line per export; `datasets` would print one bar per config
    try:
        with atomic_path(to) as building:
            building.mkdir()
            for name, dataset in splits.items():
                if isinstance(dataset, StreamedConfig):
                    _write_streamed(dataset, building, name, format, max_shard_bytes, workers)
                elif format == "parquet":
                    _write_parquet_shards(dataset, building / name, max_shard_bytes)
                else:
                    dataset.save_to_disk(str(building / name), max_shard_size=max_shard_bytes)
            (building / CARD).write_text(card_text, encoding="utf-8")
    finally:
        if bars:
            enable_progress_bar()
    return to


def _shard_count(dataset: datasets.Dataset, max_shard_bytes: int) -> int:
    """As `datasets` shards a push to the hub: enough shards that each holds at most `max_shard_bytes` of
    Arrow data, never more shards than rows, at least one (an empty split is one empty file)."""
    return max(1, min(dataset.num_rows, math.ceil(dataset.data.nbytes / max_shard_bytes)))


def _write_parquet_shards(dataset: datasets.Dataset, folder: Path, max_shard_bytes: int) -> None:
    folder.mkdir()
    shards = _shard_count(dataset, max_shard_bytes)
    for index in range(shards):
        shard = dataset if shards == 1 else dataset.shard(num_shards=shards, index=index, contiguous=True)
        shard.to_parquet(str(folder / f"{SPLIT}-{index:05d}-of-{shards:05d}.parquet"))


def _write_streamed(config: StreamedConfig, building: Path, name: str, format: str, max_shard_bytes: int,
                    workers=None) -> None:
    """A streamed config's files, one batch in memory at a time. Parquet: shards of at most `max_shard_bytes`
    of Arrow data, as `datasets` cuts a push, named once their count is known (with `workers`, each piece's
    shards are written by a worker: a shard holds one piece's rows). Arrow: those shards read by `datasets`
    into its memory-mapped cache (beside, removed after) and saved with `save_to_disk`."""
    import pyarrow.parquet as pq

    folder = building / name if format == "parquet" else building / f".{name}.parquet"
    folder.mkdir()
    schema = _hub_schema(config.schema)
    if workers is not None and len(config.pieces) > 1:
        written = workers.map(_write_shards, [(piece, str(folder / f".piece-{index:06d}"), schema, max_shard_bytes)
                                              for index, piece in enumerate(config.pieces)])
        shards = [Path(path) for paths in written for path in paths]
    else:
        shards = [Path(path) for path in _write_shards(config.batches, str(folder / ".shard"), schema, max_shard_bytes)]
    if not shards:  # no rows: one empty file, as `datasets` writes an empty split
        shards.append(folder / ".shard-00000.parquet")
        pq.write_table(schema.empty_table(), shards[-1])
    named = [shard.with_name(f"{SPLIT}-{index:05d}-of-{len(shards):05d}.parquet") for index, shard in enumerate(shards)]
    for shard, target in zip(shards, named):
        shard.rename(target)
    if format == "arrow":
        import datasets

        cache = building / f".{name}.cache"
        loaded = datasets.Dataset.from_parquet([str(p) for p in named], split=SPLIT, cache_dir=str(cache),
                                               keep_in_memory=False)
        loaded.save_to_disk(str(building / name), max_shard_size=max_shard_bytes)
        del loaded
        shutil.rmtree(folder)
        shutil.rmtree(cache)


def _write_shards(batches: Callable[[], Iterable[pa.RecordBatch]], prefix: str, schema: pa.Schema,
                  max_shard_bytes: int) -> list[str]:
    """`batches()`' rows as Parquet files `<prefix>-00000.parquet`, ... of at most `max_shard_bytes` of Arrow
    data each (none for no rows): what one process writes of a streamed config, or one worker of one piece."""
    import pyarrow.parquet as pq

    shards, writer, held = [], None, 0
    try:
        for batch in batches():
            if not batch.num_rows:
                continue
            if writer is None or held >= max_shard_bytes:
                if writer is not None:
                    writer.close()
                shards.append(f"{prefix}-{len(shards):05d}.parquet")
                writer, held = pq.ParquetWriter(shards[-1], schema), 0
            rows = hub_compatible(pa.Table.from_batches([batch])).cast(schema)
            writer.write_table(rows)
            held += rows.nbytes
    finally:
        if writer is not None:
            writer.close()
    return shards


# -- the hub -------------------------------------------------------------------------------------------

def hub_repo_id(target: str) -> str | None:
    """The dataset repository a `--to` target names (`hub:ORG/NAME` -> 'ORG/NAME'), None for a folder."""
    if not target.startswith(HUB_PREFIX):
        return None
    repo_id = target[len(HUB_PREFIX):]
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        if repo_id.count("/") != 1:
            raise HFValidationError("ORG/NAME")
        validate_repo_id(repo_id)
    except HFValidationError:
        raise ExportError(f"export: {target!r} names no dataset repository; write hub:ORG/NAME") from None
    return repo_id


def hub_commit_operations(folder: Path | str) -> list[CommitOperationAdd]:
    """One file addition per file of a Parquet export `folder`, at the path the hub reads it from: every
    `<config>/train-*.parquet`, and README.md (the card, whose `configs:` point at them). An Arrow export, or
    a folder holding anything else, is refused: what is pushed is exactly what the card describes."""
    from huggingface_hub import CommitOperationAdd

    folder = Path(folder)
    if not (folder / CARD).is_file():
        raise ExportError(f"export: {folder} holds no {CARD}; push a folder `evoforge export --format parquet` wrote")
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    parquet = [p for p in files if len(p.relative_to(folder).parts) == 2 and p.name.startswith(f"{SPLIT}-")
               and p.suffix == ".parquet"]
    stray = [p for p in files if p not in parquet and p != folder / CARD]
    if stray:
        raise ExportError(f"export: {folder} is not a Parquet export ({stray[0].relative_to(folder)}); the hub gets "
                          f"the Parquet layout: export with --format parquet")
    if not parquet:
        raise ExportError(f"export: {folder} holds no Parquet files; export with --format parquet")
    return [CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=str(p))
            for p in [*parquet, folder / CARD]]


NO_TOKEN = ("export: no Hugging Face token: run `hf auth login` (`huggingface-cli login` before huggingface_hub 1.0) "
            "or set HF_TOKEN")


def push_to_hub(folder: Path | str, repo_id: str, *, private: bool, token: str | None = None,
                api: HfApi | None = None, commit_message: str | None = None):
    """Push a Parquet export `folder` to the dataset repository `repo_id` as one commit: the repository is
    created first if it does not exist (`private` applies to a new repository only; an existing one keeps its
    visibility). `token`: None takes HF_TOKEN or the user's login (huggingface_hub's `get_token`); with
    neither, one line says how to log in. `api`: an `HfApi` (tests pass a stand-in). Returns the commit's
    information (`create_commit`'s)."""
    from huggingface_hub import HfApi, get_token

    operations = hub_commit_operations(folder)  # the folder is checked before anything reaches the hub
    token = token or get_token()
    if not token:
        raise ExportError(NO_TOKEN)
    api = api if api is not None else HfApi(token=token)
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    configs = sorted({op.path_in_repo.split("/")[0] for op in operations if "/" in op.path_in_repo})
    message = commit_message or f"evoforge export: {', '.join(configs)}"
    return api.create_commit(repo_id, operations, repo_type="dataset", commit_message=message)
