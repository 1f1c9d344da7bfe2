"""verify: extract each rollout's final answer and grade it against the gold with math-verify -> `verdicts`."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from evoforge.data import schemas
from evoforge.data.chunks import NO_CHUNKS, Chunks
from evoforge.data.ids import stable_hash_of_column
from evoforge.data.lake import in_key_ranges, key_boundaries
from evoforge.data.section import Section
from evoforge.models.engine import RayConfig
from evoforge.tasks import summary
from evoforge.tasks.grading.answer_columns import BoxesOfColumn, all_boxes_of_column
from evoforge.tasks.grading.answers import EMPTY_BOX, NO_BOX, WHITESPACE, WHOLE_NUMBER, all_boxes, exact_gold_verdict
from evoforge.tasks.grading.pool import GraderPool, Result, shared_pool
from evoforge.tasks.progress import Progress


class VerifyConfig(Section):
    workers: int = Field(2, ge=1, description="grader processes")
    deadline_seconds: float = Field(10.0, gt=0, description="hard limit per item; the worker is killed past it")
    memory_mb: int = Field(2048, ge=256, description="address-space limit of each grader process")
    chunk_size: int = Field(32, ge=1, description="items sent to a worker at once")
    backend: Literal["local", "ray"] = Field(
        "local", description="local: grader processes here; ray: grader actors on a Ray cluster (`workers` of them)")
    ray: RayConfig = Field(default_factory=RayConfig, description="ray: the cluster (only `address` applies here)")

    def grading_settings(self) -> dict:
        """The settings that can change a verdict (which items time out); workers and chunking cannot."""
        return self.model_dump(mode="json", include={"deadline_seconds", "memory_mb"})

    def pool(self) -> GraderPool:
        """Where to grade. Local: this process's grader pool for these settings, shared by every stage
        and GRPO's reward in the process (`shared_pool`): the first call launches its forkserver, which
        imports math-verify in its own process while the caller reads its input; leaving a `with`
        keeps the workers.
        Ray: actors per run (tasks/grading/on_ray.py)."""
        if self.backend == "ray":
            from evoforge.tasks.grading.on_ray import RayGraderPool

            return RayGraderPool(self.workers, self.deadline_seconds, self.memory_mb, self.chunk_size,
                                 address=self.ray.address)
        return shared_pool(self.workers, self.deadline_seconds, self.memory_mb, self.chunk_size)


def grade_pairs(pairs: list[tuple[str, str]], config: VerifyConfig, label: str = "verify") -> list[tuple]:
    """(gold, response) pairs -> (verdict, extracted, detail, seconds), exactly as the verify stage grades."""
    with config.pool() as pool, Progress(label, len(pairs), "answers") as progress:
        return pool.run([("grade", gold, response) for gold, response in pairs], progress.update)


def check_golds(answers: list[str], config: VerifyConfig) -> list[bool]:
    """Which gold answers math-verify can parse (ingest quarantines the rest)."""
    with config.pool() as pool, Progress("check answers", len(answers), "answers") as progress:
        return [r[0] == "ok" for r in pool.run([("gold", a, "") for a in answers], progress.update)]


# verdicts per resumable chunk: ~2 s of math-verify on two workers, what a kill can lose; each chunk costs ~3 ms to
# store and read back (at 1,024 a chunk, ~3 s per 1M rollouts)
CHUNK_ROLLOUTS = 4096
# a chunk graded faster is not stored: one decided on its columns (whole numbers, no math-verify) takes ~5 ms, and
# storing it (its IPC write, an fsync and a rename; on object storage a request) cost more than computing it again
# after a kill would (at 10M rollouts, ~2,400 chunks: ~17% of verify's CPU in a profile)
STORE_CHUNKS_FROM_SECONDS = 0.05


def verify(rollouts: pa.Table, problems: pa.Table, config: VerifyConfig, chunks: Chunks = NO_CHUNKS) -> pa.Table:
    """Verdicts of a table of rollouts, whole (synthesize, evaluate); the verify stage streams them
    (`verify_batches`): the same chunks, the same verdicts."""
    parts = list(verify_batches(rollouts.select(["rollout_id", "problem_id", "text"]).to_batches(), problems, config,
                                chunks, total=rollouts.num_rows))
    return pa.concat_tables(parts) if parts else schemas.VERDICTS.empty_table()


def verify_batches(rollouts: Iterable[pa.RecordBatch], problems: pa.Table, config: VerifyConfig,
                   chunks: Chunks = NO_CHUNKS, total: int | None = None) -> Iterator[pa.Table]:
    """Verdicts chunk by chunk as they are graded; `rollouts` (rollout_id, problem_id, text): a stream read
    once, of `total` rows; `problems`: the golds (problem_id, answer), taken range by range with the
    rollouts (a pool of millions of problems is an Arrow column, never one dict).

    The rollouts are graded sorted by (problem_id, rollout_id) and cut every CHUNK_ROLLOUTS rows, as a
    whole table always was: a problem's samples are together (each distinct answer graded once, the
    worker's gold-parse cache hits), and the chunks, their keys and the verdicts do not depend on the
    input's order. A large round is sorted range of problem ids by range (`in_key_ranges`: one range
    in memory, the rest spilled to local disk), so memory does not grow with it; what is sorted and
    spilled is each rollout's boxes, not its text (`boxed_rollouts`)."""
    graders = config.pool()  # their start-up overlaps reading and sorting the input
    golds = problems.select(["problem_id", "answer"])
    # a reader, not a bare generator: with no rollouts at all, the ranges still know their columns
    boxed = pa.RecordBatchReader.from_batches(BOXED_ROLLOUTS, (boxed_rollouts(batch) for batch in rollouts))
    # the golds go range by range with the rollouts: a pool of millions of problems is never one dict
    ranges = in_key_ranges({"rollouts": boxed, "golds": golds}, "problem_id", verify_boundaries(golds, total or 0))
    with graders as pool, Progress("verify", total or 0, "rollouts") as progress:
        yield from _graded_chunks(_in_chunks(ranges, CHUNK_ROLLOUTS), pool, chunks, progress.update)


# a rollout as verify sorts, spills and splits it (`boxed_rollouts`): its boxes; its text only where Arrow could
# not read them
BOXED_ROLLOUTS = pa.schema([
    ("rollout_id", pa.string()),
    ("problem_id", pa.string()),
    ("box_count", pa.int32()),  # `len(all_boxes(text))`
    ("last_box", pa.string()),  # `all_boxes(text)[-1]`, null with no box
    ("text", pa.string()),  # null unless its boxes are nested, open or several (`BoxesOfColumn.by_python`)
])


def boxed_rollouts(rollouts: pa.RecordBatch) -> pa.RecordBatch:
    """(rollout_id, problem_id, text) -> `BOXED_ROLLOUTS`: what verify needs of a rollout, read where its part is
    read. A text holding one flat box or no box opening is dropped: its boxes are (`last_box`,) or (), and
    `grade` reads a response only through its boxes, so a grader given `\\boxed{last_box}` (`_grader_text`)
    gives it its verdict. A text Arrow could not read is kept, for `_grade_batch` and the graders. Texts are
    ~97% of a rollout's bytes: at 10M rollouts verify sorted and split ~3 GB of them."""
    texts = schemas.one_array(rollouts["text"])
    boxes = all_boxes_of_column(texts)
    kept = np.zeros(len(texts), dtype=bool)
    kept[boxes.by_python] = True
    return pa.record_batch([rollouts["rollout_id"], rollouts["problem_id"], pa.array(boxes.count, pa.int32()),
                            boxes.last, pc.if_else(pa.array(kept), texts, pa.scalar(None, pa.string()))],
                           schema=BOXED_ROLLOUTS)


def verify_boundaries(golds: pa.Table, total: int) -> list[str]:
    """Where verify splits `total` rollouts into ranges of problems (by the pool's ids)."""
    return key_boundaries(golds["problem_id"], total)


def verdicts_of_range(config: VerifyConfig, chunks: Chunks, ranged: dict[str, pa.Table]) -> Iterator[tuple[str, pa.Table]]:
    """("verdicts", rows) of one range's `rollouts` (`BOXED_ROLLOUTS`: the spread stage's split takes them
    through `boxed_rollouts`) and `golds`, a resumable chunk of CHUNK_ROLLOUTS at a time
    (cut within the range: the workers of a spread stage grade ranges apart, data/spread.py), on this
    process's graders; then ("verify_chunks", how many chunks were reused and computed)."""
    reused, computed = chunks.reused, chunks.computed
    with GradersWhenNeeded(config) as pool:
        for verdicts in _graded_chunks(_in_chunks(iter([ranged]), CHUNK_ROLLOUTS), pool, chunks):
            yield "verdicts", verdicts
    yield "verify_chunks", pa.table({"reused": [chunks.reused - reused], "computed": [chunks.computed - computed]})


class GradersWhenNeeded:
    """`config.pool()`, entered at the first answer that needs math-verify: a worker of a spread stage whose
    ranges hold only exact-number golds answered with an exact number or with none (`exact_gold_verdict`) starts no
    graders of its own (a forkserver importing
    math-verify: ~1.5 CPU-seconds each). The stage's own process warms its pool at once instead, while it reads."""

    def __init__(self, config: VerifyConfig):
        self.config = config
        self._pool: GraderPool | None = None

    def __enter__(self) -> "GradersWhenNeeded":
        return self

    def run(self, items: list, on_progress=None) -> list[Result]:
        if not items:
            return []
        if self._pool is None:
            self._pool = self.config.pool().__enter__()
        return self._pool.run(items, on_progress)

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.__exit__(*exc)


def _graded_chunks(chunked: Iterator[pa.Table], pool: GraderPool, chunks: Chunks,
                   on_progress=lambda done: None) -> Iterator[pa.Table]:
    """The verdicts of each chunk of rollouts (with their golds), stored as a resumable chunk when grading it took
    STORE_CHUNKS_FROM_SECONDS or more."""
    done = 0
    for rows in chunked:
        key = stable_hash_of_column("verify", rows["rollout_id"])

        def grade(rows=rows, done=done) -> pa.Table:
            return _grade_batch(rows, pool, lambda n: on_progress(done + n))

        # a chunk an older evoforge stored lacks the newer columns: they read as nulls
        yield schemas.conform(chunks.get_or_compute(key, grade, STORE_CHUNKS_FROM_SECONDS), schemas.VERDICTS,
                              where="verify chunk", missing_as_null=True)
        done += rows.num_rows
        on_progress(done)


def _in_chunks(ranges: Iterator[dict[str, pa.Table]], size: int) -> Iterator[pa.Table]:
    """The rollouts (`BOXED_ROLLOUTS`) of every range sorted by (problem_id, rollout_id), each with its problem's
    `gold` (null: a problem without a reference), as tables of exactly `size` rows (the last may be shorter). A
    chunk may straddle two ranges: the rows carried over keep their golds, and nothing else of an earlier range
    is kept."""
    pending = None
    for ranged in ranges:
        table = ranged["rollouts"].select(BOXED_ROLLOUTS.names).sort_by(
            [("problem_id", "ascending"), ("rollout_id", "ascending")])
        golds = ranged["golds"]
        of_problem = pc.index_in(table["problem_id"], value_set=schemas.one_array(golds["problem_id"]))
        if of_problem.null_count:
            missing = sorted(set(pc.filter(table["problem_id"], pc.is_null(of_problem)).to_pylist()))
            raise ValueError(f"verify: rollouts of {len(missing)} problem(s) are not in the pool (e.g. {missing[:3]})")
        table = table.append_column("gold", schemas.one_array(golds["answer"]).take(of_problem))
        if pending is not None:
            table = pa.concat_tables([pending, table])
        while table.num_rows >= size:
            yield table.slice(0, size)
            table = table.slice(size)
        pending = table
    if pending is not None and pending.num_rows:
        yield pending


NO_REFERENCE = ("no_reference", None, "the problem has no reference answer (demonstrations only)", 0.0)


def grade_each_answer_once(pool: GraderPool, pairs: list[tuple[str, str]]) -> list[Result]:
    """(gold, response) pairs -> their results, each distinct (gold, boxed answers) graded once and its
    result given to every pair that shares it, as the stage's `_grade_batch` does: GRPO's reward on a
    group of G samples that agree grades one. `grade` reads a response only through its boxes
    (`all_boxes`), so the verdicts are those of grading every pair."""
    first_of: dict[tuple, int] = {}
    shared = [first_of.setdefault((gold, all_boxes(text or "")), i) for i, (gold, text) in enumerate(pairs)]
    results: dict[int, Result] = {}
    for (gold, boxes), i in first_of.items():
        if (decided := exact_gold_verdict(gold, boxes)) is not None:
            results[i] = (*decided, 0.0)
    graded = [i for i in first_of.values() if i not in results]  # in the pairs' order: a dict keeps insertion order
    results.update(zip(graded, pool.run([("grade", *pairs[i]) for i in graded])))
    return [results[i] for i in shared]


def _grade_batch(rows: pa.Table, pool: GraderPool, on_progress) -> pa.Table:
    """Verdicts of a batch of rollouts (`BOXED_ROLLOUTS` and their `gold`), as `grade_each_answer_once` gives
    them, column by column. A problem's samples repeat their final answers: each distinct (gold, boxed answers)
    is graded once and its verdict fanned out to the rows that share it (`graded_with` names the row that was
    graded; `seconds` is 0 on the others). A row without a gold (a demonstration) is not graded.

    The rows' boxes were read by Arrow (`boxed_rollouts`), the distinct (gold, boxes) are found by a dictionary
    over one key string per row, and the exact-number verdicts of whole-number answers (most of GSM8K's, AIME's,
    DAPO's) decided by Arrow on each distinct pair; Python sees only the pairs left (`exact_gold_verdict`, then
    the graders): at 10M rollouts, ~2 CPU-µs a rollout less."""
    ids, golds, texts, last = (schemas.one_array(rows[name]) for name in ("rollout_id", "gold", "text", "last_box"))
    count = rows["box_count"].to_numpy()
    with_gold = np.flatnonzero(golds.is_valid().to_numpy(zero_copy_only=False))
    if len(with_gold) < rows.num_rows:  # demonstrations among them
        taken = pa.array(with_gold)
        golds_graded, texts, last, count = golds.take(taken), texts.take(taken), last.take(taken), count[with_gold]
    else:
        golds_graded = golds
    boxes = _boxes_of_rows(count, last, texts)
    pair_of_row, first = _first_of_each_key(golds_graded, boxes)
    first_taken = pa.array(first, pa.int64())
    verdict, extracted, detail, seconds = _pair_results(golds_graded.take(first_taken), texts, boxes, first, pool,
                                                        on_progress)
    # one more "pair" after the graded ones, NO_REFERENCE, for the rows without a gold
    pair = np.full(rows.num_rows, len(first))
    pair[with_gold] = pair_of_row
    taken = pa.array(pair)
    graded_row = with_gold[first]
    is_graded = np.zeros(rows.num_rows, dtype=bool)
    is_graded[graded_row] = True

    def each_row(of_pairs: pa.Array, no_reference) -> pa.Array:
        return pa.concat_arrays([of_pairs, pa.array([no_reference], pa.string())]).take(taken)

    return pa.table({
        "rollout_id": ids, "problem_id": rows["problem_id"], "verdict": each_row(verdict, NO_REFERENCE[0]),
        "extracted_answer": each_row(extracted, NO_REFERENCE[1]), "gold": golds,
        "detail": each_row(detail, NO_REFERENCE[2]),
        "seconds": np.where(is_graded, np.append(seconds, NO_REFERENCE[3])[pair], 0.0),
        "graded_with": each_row(ids.take(pa.array(graded_row, pa.int64())), None)}, schema=schemas.VERDICTS)


def _boxes_of_rows(count: np.ndarray, last: pa.Array, texts: pa.Array) -> BoxesOfColumn:
    """The rows' `all_boxes` from `boxed_rollouts`' columns: a kept text is one whose boxes Python read, and of
    those holding several, every box but the last is read again."""
    kept = np.flatnonzero(texts.is_valid().to_numpy(zero_copy_only=False))
    earlier = {i: all_boxes(text)[:-1] for i, text in zip(kept.tolist(), texts.take(pa.array(kept)).to_pylist())
               if count[i] > 1}
    return BoxesOfColumn(count, last, earlier, kept)


def _grader_text(texts: pa.Array, boxes: BoxesOfColumn, row: int) -> str:
    """What a grader is sent of row `row`: its text where `boxed_rollouts` kept it, else a text with its boxes
    (its one flat box, or none), which `grade` reads as it read the rollout's own."""
    if texts[row].is_valid:
        return texts[row].as_py()
    return "\\boxed{" + boxes.last[row].as_py() + "}" if boxes.count[row] else ""


def _first_of_each_key(gold: pa.Array, boxes: BoxesOfColumn) -> tuple[np.ndarray, np.ndarray]:
    """(each row's distinct (gold, boxes) pair, numbered in order of first appearance; the first row of each
    pair). The key string is `<gold's length>:<gold>:<box count>:<boxes>`, `<boxes>` the last box for one box and
    each box as `<length>:<box>` for several: one string per distinct pair, no two pairs sharing one."""
    count = pa.array(boxes.count)
    several = {i: "".join(f"{len(box)}:{box}" for box in (*earlier, boxes.last[i].as_py()))
               for i, earlier in boxes.earlier.items()}
    written = boxes.last
    if several:
        mask = np.zeros(len(gold), dtype=bool)
        mask[list(several)] = True
        written = pc.replace_with_mask(written, pa.array(mask), pa.array([several[i] for i in sorted(several)], pa.string()))
    key = pc.binary_join_element_wise(pc.cast(pc.utf8_length(gold), pa.string()), gold, pc.cast(count, pa.string()),
                                      pc.fill_null(written, ""), ":")
    group = pc.dictionary_encode(key).indices.to_numpy(zero_copy_only=False)
    # pairs are numbered as they first appear: a row is the first of its pair where the numbering climbs
    seen = np.maximum.accumulate(group)
    first = np.flatnonzero(np.diff(seen, prepend=-1) > 0)
    return group, first


def _pair_results(gold: pa.Array, texts: pa.Array, boxes: BoxesOfColumn, first: np.ndarray, pool: GraderPool,
                   on_progress) -> tuple[pa.Array, pa.Array, pa.Array, np.ndarray]:
    """(verdict, extracted answer, detail, seconds) of each distinct pair, whose first row is `first[g]` (of
    `texts`, as `boxed_rollouts` kept them, and `boxes`; `gold[g]` its gold): where the gold is a whole number
    and the last box one too, or there is no box or an empty one, decided here on the columns as
    `exact_gold_verdict` decides (a whole number has one spelling: equal values are equal strings); the rest by
    `exact_gold_verdict`, then the graders."""
    def flags(mask: pa.Array) -> np.ndarray:
        return pc.fill_null(mask, False).to_numpy(zero_copy_only=False)

    count, last = boxes.count[first], boxes.last.take(pa.array(first, pa.int64()))
    stripped_gold = pc.utf8_trim(gold, WHITESPACE)
    no_box, empty = count == 0, flags(pc.equal(last, ""))
    right = flags(pc.equal(last, stripped_gold))
    decided = flags(pc.match_substring_regex(stripped_gold, WHOLE_NUMBER)) & (
        no_box | empty | flags(pc.match_substring_regex(last, WHOLE_NUMBER)))
    verdict = np.where(no_box | empty, "no_answer", np.where(right, "correct", "wrong")).astype(object)
    extracted = np.array(last.to_pylist() if len(first) else [], dtype=object)
    detail = np.full(len(first), None, dtype=object)
    detail[no_box], detail[empty & ~no_box] = NO_BOX, EMPTY_BOX
    seconds = np.zeros(len(first))
    sent, items = [], []
    for g in np.flatnonzero(~decided).tolist():
        pair_gold, row = gold[g].as_py(), int(first[g])
        if (exact := exact_gold_verdict(pair_gold, boxes.boxes(row))) is not None:
            verdict[g], extracted[g], detail[g] = exact
        else:
            sent.append(g)
            items.append(("grade", pair_gold, _grader_text(texts, boxes, row)))
    for g, result in zip(sent, pool.run(items, on_progress)):
        verdict[g], extracted[g], detail[g], seconds[g] = result
    return pa.array(verdict, pa.string()), pa.array(extracted, pa.string()), pa.array(detail, pa.string()), seconds


def summarize(tables: dict[str, pa.Table]) -> list[str]:
    verdicts = summary.counts(summary.column(tables, "verdicts", "verdict"))
    rows = tables.get("verdicts")
    shared = "" if rows is None or rows.num_rows == 0 else (
        f"- **graded**: {len(set(v for v in rows['graded_with'].to_pylist() if v))} distinct answers for {rows.num_rows} rollouts")
    return [summary.line("verdicts", verdicts), f"- **timeouts**: {verdicts.get('timeout', 0)}", *([shared] if shared else [])]


def read_verify_lines(path: Path) -> list[dict]:
    """Each non-blank line of a verify-file input as {"input_line", "row"} or, when the line cannot be
    graded (not UTF-8, not JSON, no 'gold' or 'pred'), {"input_line", "invalid": reason, "raw"}."""
    lines = []
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            entry: dict = {"input_line": number}
            try:
                row = json.loads(raw.decode("utf-8"))
                if not isinstance(row, dict):
                    raise ValueError(f"a JSON {type(row).__name__}, not an object")
                missing = [key for key in ("gold", "pred") if row.get(key) is None]
                if missing:
                    raise ValueError(f"no field {missing[0]!r}")
                entry["row"] = row
            except UnicodeDecodeError as err:
                entry["invalid"] = f"not UTF-8 (byte {err.start})"
            except ValueError as err:  # json.JSONDecodeError is a ValueError too
                entry["invalid"] = f"not JSON: {err.msg}" if isinstance(err, json.JSONDecodeError) else str(err)
            if "invalid" in entry:
                entry["raw"] = raw.decode("utf-8", errors="replace").rstrip("\n")[:200]
            lines.append(entry)
    return lines


def grade_file(path: Path, config: VerifyConfig) -> list[dict]:
    """`evoforge verify-file`: grade a JSONL file of {gold, pred} lines exactly as the stage grades, one
    output row per non-blank input line, in order: the input's fields plus input_line, verdict,
    extracted_answer, detail and seconds; a line that cannot be graded gets verdict `invalid_input`,
    its file and line in `detail`, and the start of its text in `raw`."""
    lines = read_verify_lines(path)
    graded = [entry for entry in lines if "row" in entry]
    results = iter(grade_pairs([(str(e["row"]["gold"]), str(e["row"]["pred"])) for e in graded], config))
    written = []
    for entry in lines:
        if "row" in entry:
            verdict, extracted, detail, seconds = next(results)
            written.append({**entry["row"], "input_line": entry["input_line"], "verdict": verdict,
                            "extracted_answer": extracted, "detail": detail, "seconds": round(seconds, 4)})
        else:
            written.append({"input_line": entry["input_line"], "verdict": "invalid_input",
                            "detail": f"{path}:{entry['input_line']}: {entry['invalid']}", "raw": entry["raw"]})
    return written
