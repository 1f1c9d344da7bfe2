"""The verify stage's verdicts of a chunk computed row by row in Python, as the stage computed them before it
worked on columns: the reference its Arrow path (`tasks/verify.py` `_grade_batch`) is tested against."""
from __future__ import annotations

import pyarrow as pa

from evoforge.data import schemas
from evoforge.tasks.grading.answers import all_boxes
from evoforge.tasks.verify import NO_REFERENCE, grade_each_answer_once


def python_verdicts(rows: list[dict], pool) -> pa.Table:
    """Verdicts of `rows` (rollout_id, problem_id, text, gold): each row with a gold graded through
    `grade_each_answer_once` (each distinct (gold, boxes) once, in the rows' order), `graded_with` the first row
    of its (gold, boxes), `seconds` on that row only; a row without a gold is not graded."""
    with_gold = [row for row in rows if row["gold"] is not None]
    results = grade_each_answer_once(pool, [(row["gold"], row["text"]) for row in with_gold])
    first: dict[tuple, str] = {}
    result_of = {}
    for row, result in zip(with_gold, results):
        graded_with = first.setdefault((row["gold"], all_boxes(row["text"] or "")), row["rollout_id"])
        result_of[row["rollout_id"]] = (result, graded_with)
    out = []
    for row in rows:
        (verdict, extracted, detail, seconds), graded_with = result_of.get(row["rollout_id"], (NO_REFERENCE, None))
        out.append(dict(rollout_id=row["rollout_id"], problem_id=row["problem_id"], verdict=verdict,
                        extracted_answer=extracted, gold=row["gold"], detail=detail,
                        seconds=seconds if graded_with == row["rollout_id"] else 0.0, graded_with=graded_with))
    return pa.Table.from_pylist(out, schema=schemas.VERDICTS)
