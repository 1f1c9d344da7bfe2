"""Ingest: JSONL, Parquet, a `datasets` dataset on disk or a hub dataset (`hub:ORG/NAME`) -> `problems` + `quarantine`.

Every input row ends as exactly one problem or one quarantine row (file, row, field, reason), so
`rows_read == problems + quarantined` always holds and nothing is dropped silently. Only a file that
is not of its format at all is an error (`IngestError`, naming the file), and so is a hub id that
cannot be loaded (one line: the id, and the subsets or splits it has, or how to get it into the cache).
"""
from __future__ import annotations

import codecs
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import pyarrow as pa
from pydantic import Field

from evoforge.data import schemas
from evoforge.data.ids import problem_id, stable_hash
from evoforge.data.section import Section
from evoforge.tasks import summary
from evoforge.tasks.decontam import Decontaminator
from evoforge.tasks.grading.answers import last_boxed, normalize_answer

Preset = Literal["gsm8k", "math", "plain", "demonstrations"]
GradedPreset = Literal["gsm8k", "math", "plain"]  # an eval set needs answers a verifier can grade
PRESET_FIELDS: dict[str, tuple[str, str]] = {
    "gsm8k": ("question", "answer"),
    "math": ("problem", "solution"),
    "plain": ("question", "answer"),
    "demonstrations": ("question", "answer"),  # answer: the expert's free-text answer (RARO)
}
RAW_CHARS = 500


class IngestError(ValueError):
    pass


class SourceConfig(Section):
    path: str = Field(description="a JSONL/Parquet file, a `datasets` folder, or `hub:ORG/NAME` (a hub dataset)")
    preset: Preset = "plain"
    question_field: str | None = None
    answer_field: str | None = None
    name: str | None = Field(
        None, description="source name recorded on each problem; default: folder/file name, or ORG/NAME for hub:")
    limit: int | None = Field(None, ge=1, description="read only the first N rows")
    split: str | None = Field(
        None, description="split of a datasets DatasetDict or a hub: dataset; default: train, or its only split")
    subset: str | None = Field(None, description="hub: sources: the subset (the hub's config name) to read")
    max_question_chars: int = 4000
    reference_field: str | None = Field(
        None, description="demonstrations: a field with a final answer math-verify can grade, when the data has one")
    task: str | None = Field(None, description="tag recorded on each problem; default 'math', or 'demonstration'")
    max_expert_chars: int = Field(8000, description="demonstrations: longer expert answers are quarantined")


class EvalSetConfig(Section):
    name: str
    path: str
    preset: GradedPreset = "plain"
    question_field: str | None = None
    answer_field: str | None = None
    limit: int | None = Field(None, ge=1, description="evaluate on the first N problems (decontamination uses all)")


@dataclass
class Record:
    row: int  # 1-based line (JSONL) or row (Parquet, datasets)
    value: dict | None
    raw: str
    error: tuple[str, str] | None = None  # (reason, detail) when the row could not even be read


@dataclass
class IngestResult:
    problems: pa.Table
    quarantine: pa.Table
    rows_read: int
    reasons: dict[str, int] = field(default_factory=dict)


# -- reading ------------------------------------------------------------------------------------
def read_records(path: Path | HubSource, limit: int | None = None, split: str | None = None) -> Iterator[Record]:
    if isinstance(path, HubSource):  # already loaded: split and subset were chosen by open_hub_source
        yield from _dataset_records(path.dataset, limit)
        return
    if not path.exists():
        raise IngestError(f"{path}: no such file or folder")
    if path.is_dir():
        yield from _read_dataset(path, limit, split)
    elif path.suffix == ".parquet":
        yield from _read_parquet(path, limit)
    elif path.suffix in (".jsonl", ".json", ".ndjson"):
        yield from _read_jsonl(path, limit)
    else:
        raise IngestError(f"{path}: unknown format; expected .jsonl, .parquet or a `datasets` folder")


class OversizedNumber(str):
    """A JSON integer with more digits than Python turns into an int (sys.get_int_max_str_digits()):
    kept as its digits, so the row, not the whole file, is quarantined if a field that is used holds it."""


def _json_int(digits: str) -> int | OversizedNumber:
    try:
        return int(digits)
    except ValueError:
        return OversizedNumber(digits)


def _read_jsonl(path: Path, limit: int | None) -> Iterator[Record]:
    parsed_any = False
    count = 0
    with open(path, "rb") as fh:
        for number, line in enumerate(fh, start=1):
            if number == 1 and line.startswith(codecs.BOM_UTF8):  # editors on Windows write one
                line = line[len(codecs.BOM_UTF8):]
            if not line.strip():
                continue
            if limit is not None and count >= limit:
                break
            count += 1
            raw = line.decode("utf-8", errors="replace").rstrip("\n")[:RAW_CHARS]
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as err:
                yield Record(number, None, raw, ("not_utf8", f"byte {err.start} is not UTF-8"))
                continue
            try:
                value = json.loads(text, parse_int=_json_int)
            except json.JSONDecodeError as err:
                yield Record(number, None, raw, ("not_json", err.msg))
                continue
            if not isinstance(value, dict):
                yield Record(number, None, raw, ("not_object", f"a JSON {type(value).__name__}, not an object"))
                continue
            parsed_any = True
            yield Record(number, value, raw)
    if count and not parsed_any:
        raise IngestError(f"{path}: not a JSONL file (no line is a JSON object)")


def _read_parquet(path: Path, limit: int | None) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise IngestError(f"{path}: not a Parquet file ({err})") from None
    if limit is not None:
        table = table.slice(0, limit)
    for number, value in enumerate(table.to_pylist(), start=1):
        yield Record(number, value, json.dumps(value, default=str)[:RAW_CHARS])


def _read_dataset(path: Path, limit: int | None, split: str | None) -> Iterator[Record]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as err:
        raise IngestError(f"{path}: not a `datasets` folder saved with save_to_disk ({err})") from None
    if isinstance(loaded, datasets.DatasetDict):
        names = list(loaded.keys())
        chosen = split or ("train" if "train" in names else names[0] if len(names) == 1 else None)
        if chosen not in loaded:
            raise IngestError(f"{path}: holds splits {names}; name one with split")
        loaded = loaded[chosen]
    yield from _dataset_records(loaded, limit)


def _dataset_records(dataset, limit: int | None) -> Iterator[Record]:
    """The rows of a `datasets.Dataset` one at a time (it is memory-mapped: never read whole)."""
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    for number, value in enumerate(dataset, start=1):
        yield Record(number, dict(value), json.dumps(value, default=str)[:RAW_CHARS])


# -- hub datasets (`hub:ORG/NAME`) ----------------------------------------------------------------
HUB_PREFIX = "hub:"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def is_hub(path: object) -> bool:
    return isinstance(path, str) and path.startswith(HUB_PREFIX)


@dataclass
class HubSource:
    """A split of a hub dataset, loaded by `open_hub_source`."""
    repo_id: str
    subset: str | None
    split: str
    revision: str | None  # the cached snapshot's commit; None when online, or when datasets' own cache answered
    dataset: Any  # datasets.Dataset

    @property
    def label(self) -> str:
        """What its rows record as `source_file`, and what a re-ingest of the same split replaces."""
        subset = f"subset={self.subset}&" if self.subset else ""
        return f"{HUB_PREFIX}{self.repo_id}?{subset}split={self.split}"

    @property
    def fingerprint(self) -> str:
        """Changes with the dataset's revision, subset and split: the dataset's own fingerprint is
        the hash of its cache folder (revision, subset) and split."""
        return stable_hash(self.label, self.revision, self.dataset._fingerprint)


def open_hub_source(config: SourceConfig) -> HubSource:
    """`datasets.load_dataset(ORG/NAME, subset, split=...)`, from the user's Hugging Face cache
    (HF_HOME, HF_HUB_CACHE, HF_DATASETS_CACHE). Offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE, evoforge's
    default) datasets does not look in the hub cache for an ORG/NAME, only in its own processed cache; so
    the snapshot the hub cache holds for the revision `refs/main` names is loaded as the folder it is
    (its README's `configs:` are the subsets, as on the hub), and datasets' own cache answers otherwise."""
    import datasets
    import huggingface_hub
    from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError

    repo_id = config.path[len(HUB_PREFIX):].strip().strip("/")
    if not _HUB_ID.fullmatch(repo_id):
        raise IngestError(f"{config.path}: not a hub dataset id; expected hub:ORG/NAME")
    offline = datasets.config.HF_HUB_OFFLINE or huggingface_hub.constants.is_offline_mode()
    target, revision = repo_id, None
    if offline:
        try:
            target = huggingface_hub.snapshot_download(repo_id, repo_type="dataset", local_files_only=True)
        except IncompleteSnapshotError as err:  # files of other subsets missing: this one's may be there
            target = err.snapshot_path
        except LocalEntryNotFoundError:
            pass
        if target != repo_id:
            revision = Path(target).name
    where = f"{HUB_PREFIX}{repo_id}" + (f" subset {config.subset!r}" if config.subset else "")
    quiet = not datasets.utils.are_progress_bars_disabled()
    if quiet:  # the terminal shows evoforge's lines, not datasets' bars
        datasets.disable_progress_bars()
    try:
        split = config.split or _default_split(datasets.get_dataset_split_names(target, config.subset), where)
        dataset = datasets.load_dataset(target, config.subset, split=split)
    except IngestError:
        raise
    except Exception as err:  # datasets, huggingface_hub and their HTTP client raise many kinds: one line for all
        raise IngestError(_hub_problem(repo_id, target, config, offline, err)) from err
    finally:
        if quiet:
            datasets.enable_progress_bars()
    # the subset datasets chose when the dataset has one (or none: "default"), so naming it or not is the same source
    return HubSource(repo_id, config.subset or dataset.info.config_name, split, revision, dataset)


def _default_split(splits: list[str], where: str) -> str:
    if "train" in splits or len(splits) == 1:
        return "train" if "train" in splits else splits[0]
    raise IngestError(f"{where} has splits {', '.join(splits)}: choose one with --split (`split:` in a config)")


def _hub_problem(repo_id: str, target: str, config: SourceConfig, offline: bool, err: BaseException) -> str:
    """One line: what is wrong with a hub source that would not load, and what to do."""
    import datasets
    import huggingface_hub

    name = f"{HUB_PREFIX}{repo_id}"
    if offline and target == repo_id and isinstance(err, ConnectionError):  # in neither the hub's cache nor datasets'
        return (f"{name}: not in the Hugging Face cache (HF_HUB_CACHE={huggingface_hub.constants.HF_HUB_CACHE}) "
                f"and offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE): download it once where the hub is reachable "
                f"(`hf download {repo_id} --repo-type dataset`, or this command with HF_HUB_OFFLINE=0 "
                f"HF_DATASETS_OFFLINE=0), or point HF_HOME / HF_HUB_CACHE at a cache that holds it")
    try:
        subsets = datasets.get_dataset_config_names(target)
    except Exception:
        subsets = []
    if config.subset is None and len(subsets) > 1:
        return f"{name} has subsets {', '.join(subsets)}: choose one with --subset (`subset:` in a config)"
    if config.subset is not None and subsets and config.subset not in subsets:
        return (f"{name} has no subset {config.subset!r}; its subsets: {', '.join(subsets)} "
                f"(--subset, `subset:` in a config)")
    where = name + (f" subset {config.subset!r}" if config.subset else "")
    try:
        splits = datasets.get_dataset_split_names(target, config.subset)
    except Exception:
        splits = []
    if config.split is not None and splits and config.split not in splits:
        return f"{where} has no split {config.split!r}; its splits: {', '.join(splits)} (--split, `split:` in a config)"
    detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if offline:
        cached = f"the cached snapshot {target}" if target != repo_id else "the Hugging Face cache"
        return (f"{where}: cannot be read from {cached} ({detail}); download its files once where the hub is "
                f"reachable (`hf download {repo_id} --repo-type dataset`)")
    unreachable = isinstance(err, (ConnectionError, TimeoutError)) or "connect" in type(err).__name__.lower()
    hint = "; offline (HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1) reads the Hugging Face cache alone" if unreachable else ""
    return f"{where}: cannot be loaded from the hub ({type(err).__name__}: {detail}){hint}"


# -- interpreting -------------------------------------------------------------------------------
class RowProblem(Exception):
    def __init__(self, reason: str, field_name: str | None, detail: str):
        super().__init__(detail)
        self.reason, self.field_name, self.detail = reason, field_name, detail


def _text_field(value: dict, name: str) -> str:
    if name not in value or value[name] is None:
        raise RowProblem("missing_field", name, f"no field {name!r} (fields: {sorted(value)[:10]})")
    text = value[name]
    if isinstance(text, OversizedNumber):
        raise RowProblem("unusable_number", name, f"field {name!r} is an integer of {len(text)} digits; "
                                                  f"at most {sys.get_int_max_str_digits()} can be read")
    if not isinstance(text, (str, int, float)) or isinstance(text, bool):
        raise RowProblem("missing_field", name, f"field {name!r} is a {type(text).__name__}, not text")
    text = str(text)
    if not text.strip():
        raise RowProblem("empty_field", name, f"field {name!r} is empty")
    return text


def fields_for(config: SourceConfig | EvalSetConfig) -> tuple[str, str]:
    default_q, default_a = PRESET_FIELDS[config.preset]
    return config.question_field or default_q, config.answer_field or default_a


_CALCULATOR = re.compile(r"<<[^<>]*>>")


def gsm8k_worked_solution(solution: str) -> str:
    """A GSM8K solution as an expert answer in the policy's own format: the calculator annotations
    (`<<48/2=24>>`) dropped and `#### 72` written as `\\boxed{72}`. A critic shown the raw format
    would tell expert from policy by its markup, not by its reasoning."""
    body, marker, final = _CALCULATOR.sub("", solution).rpartition("####")
    if not marker:
        return solution.strip()
    return f"{body.strip()}\nThe answer is \\boxed{{{normalize_answer(final)}}}."


def expert_answer_of(value: dict, config: SourceConfig) -> str | None:
    """The expert's worked answer, for the RARO critic: the demonstration itself, a GSM8K or MATH
    solution, or None when the source holds only final answers."""
    _, answer_field = fields_for(config)
    if config.preset == "demonstrations":
        return _text_field(value, answer_field).strip()
    text = value.get(answer_field)
    if not isinstance(text, str):
        return None
    if config.preset == "gsm8k":
        return gsm8k_worked_solution(text)
    if config.preset == "math" and last_boxed(text) is not None:
        return text.strip()
    return None


def _finite(answer: str, field_name: str) -> str:
    """A gold answer that reads as NaN or an infinity (`NaN`, `inf`, `1e999`) can never be matched: unusable."""
    try:
        number = float(answer)
    except (ValueError, OverflowError):
        return answer
    if not math.isfinite(number):
        raise RowProblem("unusable_answer", field_name, f"the answer {answer[:40]!r} is not a finite number")
    return answer


def extract_answer(value: dict, config: SourceConfig | EvalSetConfig) -> str | None:
    """The gold answer a verifier grades against; for demonstrations only if `reference_field` names one."""
    answer = _extract_answer(value, config)
    if answer is None:
        return None
    return _finite(answer, config.reference_field if config.preset == "demonstrations" else fields_for(config)[1])


def _extract_answer(value: dict, config: SourceConfig | EvalSetConfig) -> str | None:
    question_field, answer_field = fields_for(config)
    if config.preset == "demonstrations":
        if config.reference_field is None:
            return None
        return normalize_answer(_text_field(value, config.reference_field))
    if config.preset == "gsm8k":
        text = _text_field(value, answer_field)
        if "####" not in text:
            raise RowProblem("unparseable_answer", answer_field, "no '#### <answer>' marker in the solution")
        return normalize_answer(text.rsplit("####", 1)[1])
    if config.preset == "math":
        if config.answer_field is None and answer_field not in value and "answer" in value:
            answer_field = "answer"
        text = _text_field(value, answer_field)
        boxed = last_boxed(text)
        if boxed is not None:
            if not boxed:
                raise RowProblem("unparseable_answer", answer_field, "the last \\boxed{} is empty")
            return boxed
        if "\\boxed" in text or len(text) > 200:
            raise RowProblem("unparseable_answer", answer_field, "no complete \\boxed{} answer in the solution")
        return normalize_answer(text)
    return normalize_answer(_text_field(value, answer_field))


def question_of(value: dict, config: SourceConfig | EvalSetConfig) -> str:
    question_field, _ = fields_for(config)
    if config.preset == "math" and config.question_field is None and question_field not in value:
        question_field = "question"
    return _text_field(value, question_field).strip()


def ingest(
    path: Path | HubSource,
    config: SourceConfig,
    *,
    check_golds: Callable[[list[str]], list[bool]],
    known_ids: set[str] = frozenset(),
    decontaminator: Decontaminator | None = None,
    source_label: str | None = None,
) -> IngestResult:
    """Read one source. `check_golds` says which answers math-verify can parse (the grader pool's job);
    `known_ids` are problems already in the run, so a duplicate across files is caught too."""
    if isinstance(path, HubSource):
        label, source = source_label or path.label, config.name or path.repo_id
    else:
        if config.subset is not None:
            raise IngestError(f"{path}: `subset` is for a hub dataset (hub:ORG/NAME), not a file or folder")
        label = source_label or str(path)
        source = config.name or (path.parent.name if path.stem in ("train", "test", "validation") else path.stem)
    candidates: list[dict] = []
    quarantined: list[dict] = []

    def reject(record: Record, reason: str, field_name: str | None, detail: str, matched=(None, None)) -> None:
        quarantined.append(
            dict(
                source_file=label, source_row=record.row, field=field_name, reason=reason, detail=detail,
                raw=record.raw, matched_set=matched[0], matched_id=matched[1],
            )
        )

    records = list(read_records(path, config.limit, config.split))
    seen: dict[str, int] = {}
    for record in records:
        if record.error:
            reject(record, record.error[0], None, record.error[1])
            continue
        try:
            question = question_of(record.value, config)
            answer = extract_answer(record.value, config)
            expert = expert_answer_of(record.value, config)
        except RowProblem as problem:
            reject(record, problem.reason, problem.field_name, problem.detail)
            continue
        if len(question) > config.max_question_chars:
            reject(record, "too_long", fields_for(config)[0],
                   f"question has {len(question)} characters; the limit is {config.max_question_chars}")
            continue
        if expert is not None and len(expert) > config.max_expert_chars:
            reject(record, "too_long", fields_for(config)[1],
                   f"expert answer has {len(expert)} characters; the limit is {config.max_expert_chars}")
            continue
        pid = problem_id(question)
        if pid in known_ids or pid in seen:
            where = f"row {seen[pid]} of this file" if pid in seen else "an earlier ingest of this run"
            reject(record, "duplicate", fields_for(config)[0], f"same normalised question as {where}", (None, pid))
            continue
        if decontaminator is not None:
            hit = decontaminator.match(question)
            if hit is not None:
                reject(record, "contaminated", fields_for(config)[0],
                       f"shares an 8-word run with {hit.set_name} problem {hit.problem_id}",
                       (hit.set_name, hit.problem_id))
                continue
        seen[pid] = record.row
        candidates.append(dict(problem_id=pid, question=question, answer=answer, expert=expert, record=record))

    # demonstrations without a reference answer have nothing for math-verify to parse
    graded = [c for c in candidates if c["answer"] is not None]
    parseable = dict(zip((id(c) for c in graded), check_golds([c["answer"] for c in graded]) if graded else []))
    answer_field = config.reference_field if config.preset == "demonstrations" else fields_for(config)[1]
    task = config.task or ("demonstration" if config.preset == "demonstrations" else "math")
    problems = []
    for candidate in candidates:
        if not parseable.get(id(candidate), True):
            reject(candidate["record"], "unparseable_answer", answer_field,
                   f"math-verify cannot parse the answer {candidate['answer'][:80]!r}")
            continue
        problems.append(
            dict(
                problem_id=candidate["problem_id"], question=candidate["question"], answer=candidate["answer"],
                source=source, source_file=label, source_row=candidate["record"].row, origin="seed",
                parent_problem_id=None, task=task, expert_answer=candidate["expert"],
            )
        )
    reasons: dict[str, int] = {}
    for row in quarantined:
        reasons[row["reason"]] = reasons.get(row["reason"], 0) + 1
    quarantined.sort(key=lambda r: r["source_row"])
    return IngestResult(
        problems=pa.Table.from_pylist(problems, schema=schemas.PROBLEMS),
        quarantine=pa.Table.from_pylist(quarantined, schema=schemas.QUARANTINE),
        rows_read=len(records),
        reasons=reasons,
    )


def load_eval_set(config: EvalSetConfig, root: Path, limit: int | None = None) -> pa.Table:
    """problem_id, question, answer of an evaluation set. Unreadable rows are skipped on purpose: an
    eval row we cannot read can neither leak into training through us nor be graded."""
    path = (root / config.path) if not Path(config.path).is_absolute() else Path(config.path)
    rows, seen = [], set()
    for record in read_records(path):
        if record.value is None:
            continue
        try:
            question, answer = question_of(record.value, config), extract_answer(record.value, config)
        except RowProblem:
            continue
        pid = problem_id(question)
        if pid not in seen:
            seen.add(pid)
            rows.append({"problem_id": pid, "question": question, "answer": answer})
        if limit is not None and len(rows) >= limit:
            break
    return pa.Table.from_pylist(rows, schema=pa.schema([("problem_id", pa.string()), ("question", pa.string()),
                                                        ("answer", pa.string())]))


def load_eval_questions(config: EvalSetConfig, root: Path) -> list[tuple[str, str]]:
    """(problem_id, question) of a whole evaluation set, for decontamination."""
    table = load_eval_set(config, root)
    return list(zip(table["problem_id"].to_pylist(), table["question"].to_pylist()))


def summarize(tables: dict[str, pa.Table]) -> list[str]:
    return [f"- **problems**: {summary.rows(tables, 'problems')}",
            summary.line("quarantined by reason", summary.counts(summary.column(tables, "quarantine", "reason")))]
