"""The grader: last-box extraction, math-verify gold-first, verdicts, and the hard deadline."""
from __future__ import annotations

import json

import pyarrow as pa
import pytest

from evoforge.tasks.grading.pool import GraderPool
from evoforge.tasks.grading.answers import last_boxed
from evoforge.tasks.verify import VerifyConfig, grade_pairs, verify


def verdicts(pairs, **config):
    return [r[0] for r in grade_pairs(pairs, VerifyConfig(**config))]


@pytest.mark.unit
def test_last_boxed_takes_the_last_complete_box_and_never_concatenates():
    assert last_boxed("\\boxed{3} then \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{5} and an unclosed \\boxed{6") == "5"
    assert last_boxed("nested \\boxed{\\sqrt{\\frac{1}{4}}}") == "\\sqrt{\\frac{1}{4}}"
    assert last_boxed("no answer here") is None


@pytest.mark.unit
def test_verdicts_for_each_kind_of_response():
    pairs = [
        ("72", "48 + 24 = 72, so \\boxed{72}"),                # correct
        ("72", "\\boxed{71}"),                                 # wrong
        ("0.5", "\\boxed{\\frac{1}{2}}"),                      # correct: equivalent forms
        ("5", "first \\boxed{3}, finally \\boxed{5}"),         # correct: the LAST box counts
        ("3", "first \\boxed{3}, finally \\boxed{5}"),         # wrong for the same reason
        ("35", "\\boxed{3}\\boxed{5}"),                        # wrong: boxes are not concatenated
        ("5", "The answer is 5."),                             # no_answer: no box
        ("", "\\boxed{5}"),                                    # bad_gold
        ("\\frac{", "\\boxed{5}"),                              # bad_gold
    ]
    assert verdicts(pairs, workers=2) == [
        "correct", "wrong", "correct", "correct", "wrong", "wrong", "no_answer", "bad_gold", "bad_gold",
    ]


@pytest.mark.slow
def test_adversarial_answers_end_as_timeouts_at_the_deadline_and_the_rest_still_grade():
    pairs = [
        ("5", "\\boxed{123456789^{123456789}}"),   # a power tower sympy would evaluate for minutes
        ("5", "\\boxed{2^{10^{10}}}"),             # a memory blow-up
        ("5", "\\boxed{(10^{7})!}"),               # a huge factorial
        ("4", "\\boxed{4}"),
    ]
    with GraderPool(workers=2, deadline_s=2.0) as pool:
        results = pool.run([("grade", g, r) for g, r in pairs])
        restarts = pool.restarts
    assert [r[0] for r in results[:3]] == ["timeout"] * 3
    assert results[3][0] == "correct"
    assert all(r[3] < 2.0 + 1.5 for r in results), [r[3] for r in results]  # killed at the deadline, not later
    assert restarts >= 1


@pytest.mark.unit
def test_verify_task_returns_one_verdict_per_rollout_with_gold_and_answer():
    problems = pa.table({"problem_id": ["p1", "p2"], "answer": ["4", "10"]})
    rollouts = pa.table({
        "rollout_id": ["r1", "r2", "r3"], "problem_id": ["p1", "p1", "p2"],
        "text": ["\\boxed{4}", "\\boxed{5}", "I think ten"],
    })
    out = verify(rollouts, problems, VerifyConfig(workers=1))
    rows = {r["rollout_id"]: r for r in out.to_pylist()}
    assert {k: v["verdict"] for k, v in rows.items()} == {"r1": "correct", "r2": "wrong", "r3": "no_answer"}
    assert rows["r2"]["extracted_answer"] == "5" and rows["r2"]["gold"] == "4"


@pytest.mark.unit
def test_verify_file_cli_grades_exactly_like_the_stage(scratch, capsys):
    from evoforge.app.cli import main

    source = scratch / "in.jsonl"
    source.write_text("\n".join(json.dumps(r) for r in [
        {"gold": "12", "pred": "so \\boxed{12}", "id": 1},
        {"gold": "12", "pred": "\\boxed{13}", "id": 2},
        {"gold": "12", "pred": "twelve", "id": 3},
    ]) + "\n")
    out = scratch / "out.jsonl"
    assert main(["verify-file", str(source), "--out", str(out)]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(line["id"], line["verdict"]) for line in lines] == [(1, "correct"), (2, "wrong"), (3, "no_answer")]
    assert all(isinstance(line["seconds"], float) for line in lines)
    assert "3 lines" in capsys.readouterr().out


@pytest.mark.unit
def test_a_demonstration_without_a_reference_is_marked_not_graded_and_filter_leaves_it_out():
    from evoforge.tasks.filter import FilterConfig, filter_problems

    problems = pa.table({"problem_id": ["p1", "demo"], "answer": ["4", None]})
    rollouts = pa.table({"rollout_id": ["r1", "r2", "r3"], "problem_id": ["p1", "demo", "demo"],
                         "text": ["\\boxed{4}", "\\boxed{4}", "a free-text answer"], "completion_tokens": [3, 3, 4]})
    out = {r["rollout_id"]: r for r in verify(rollouts, problems, VerifyConfig(workers=1)).to_pylist()}
    assert {k: v["verdict"] for k, v in out.items()} == {"r1": "correct", "r2": "no_reference", "r3": "no_reference"}
    assert out["r2"]["gold"] is None and "no reference answer" in out["r2"]["detail"]
    stats = filter_problems(pa.Table.from_pylist(list(out.values())), rollouts, FilterConfig())
    assert stats["problem_id"].to_pylist() == ["p1"]  # no accuracy, no bucket for the ungraded demonstration


@pytest.mark.unit
def test_a_spread_verify_worker_starts_graders_only_for_an_answer_that_needs_math_verify(monkeypatch):
    """A worker of a spread verify stage grades its ranges on graders of its own (a forkserver importing
    math-verify, ~1.5 CPU-seconds): whole-number golds answered with whole numbers, with an empty box or
    with none need none of them; a radical does."""
    from evoforge.data.chunks import NO_CHUNKS
    from evoforge.tasks.verify import boxed_rollouts, verdicts_of_range

    started = []
    real_pool = VerifyConfig.pool
    monkeypatch.setattr(VerifyConfig, "pool", lambda self: started.append(self) or real_pool(self))
    config = VerifyConfig(workers=1, deadline_seconds=30)

    def ranged(texts: list[str], gold: str) -> dict[str, pa.Table]:
        rollouts = pa.record_batch({"rollout_id": [f"r{i}" for i in range(len(texts))], "problem_id": ["p"] * len(texts),
                                    "text": texts})
        # as the spread stage's split gives a range its rollouts
        return {"rollouts": pa.Table.from_batches([boxed_rollouts(rollouts)]),
                "golds": pa.table({"problem_id": ["p"], "answer": [gold]})}

    made = dict(verdicts_of_range(config, NO_CHUNKS, ranged(["\\boxed{12}", "\\boxed{13}", "no idea", "\\boxed{ }"], "12")))
    assert made["verdicts"]["verdict"].to_pylist() == ["correct", "wrong", "no_answer", "no_answer"] and started == []
    made = dict(verdicts_of_range(config, NO_CHUNKS, ranged(["\\boxed{\\sqrt{12}}", "no idea"], "2\\sqrt{3}")))
    assert made["verdicts"]["verdict"].to_pylist() == ["correct", "no_answer"] and len(started) == 1


@pytest.mark.unit
def test_a_round_without_rollouts_verifies_to_no_verdicts_whole_or_streamed():
    """No rollouts (a synthesize step whose variants all failed, an empty part): no verdicts, and no error, from a
    table as from a stream with no batch."""
    from evoforge.data import schemas
    from evoforge.tasks.verify import verify_batches

    problems = pa.table({"problem_id": ["p"], "answer": ["1"]})
    config = VerifyConfig(workers=1, deadline_seconds=30)
    assert verify(schemas.ROLLOUTS.empty_table(), problems, config).equals(schemas.VERDICTS.empty_table())
    columns = schemas.ROLLOUTS.empty_table().select(["rollout_id", "problem_id", "text"])
    assert list(verify_batches(pa.RecordBatchReader.from_batches(columns.schema, []), problems, config, total=0)) == []


@pytest.mark.unit
def test_each_distinct_answer_is_graded_once_and_its_verdict_fanned_out_identically():
    """A problem's samples repeat their final answers: the stage grades each distinct (gold, boxed
    answers) once; every row's verdict is what grading it alone gives, and `graded_with` says whose."""
    texts = ["so \\boxed{4}", "I get \\boxed{4}", "\\boxed{5}", "no box", "none either", "\\boxed{2} then \\boxed{4}",
             "\\boxed{1}, \\boxed{2}"]
    rollouts = pa.Table.from_pylist(
        [dict(rollout_id=f"r{i}", problem_id="p", text=t) for i, t in enumerate(texts)]
        + [dict(rollout_id="q0", problem_id="q", text="\\boxed{1}, \\boxed{2}")])
    problems = pa.Table.from_pylist([dict(problem_id="p", answer="4"), dict(problem_id="q", answer="1, 2")])
    config = VerifyConfig(workers=1, deadline_seconds=30)
    rows = {r["rollout_id"]: r for r in verify(rollouts, problems, config).to_pylist()}
    alone = grade_pairs([("4", t) for t in texts] + [("1, 2", "\\boxed{1}, \\boxed{2}")], config)
    for rollout_id, (verdict, extracted, detail, _) in zip([f"r{i}" for i in range(len(texts))] + ["q0"], alone):
        assert (rows[rollout_id]["verdict"], rows[rollout_id]["extracted_answer"], rows[rollout_id]["detail"]) == (
            verdict, extracted, detail)
    graded_with = {k: r["graded_with"] for k, r in rows.items()}
    # same boxes, same gold: shared; a different gold never shares, even with the same boxes
    assert graded_with == {"r0": "r0", "r1": "r0", "r2": "r2", "r3": "r3", "r4": "r3", "r5": "r5", "r6": "r6",
                           "q0": "q0"}
    assert rows["r1"]["seconds"] == 0.0 and rows["r4"]["seconds"] == 0.0 and rows["q0"]["seconds"] > 0.0
    # a whole number boxed, or no box, against a whole number: decided without a grader
    assert rows["r0"]["seconds"] == 0.0 and rows["r3"]["seconds"] == 0.0


class RecordingPool:
    """A deterministic stand-in grader (no processes) that keeps what it was sent: as `grade`, a function of the gold
    and the text's boxes only (a verdict, an answer naming them, a time), so that a row given another row's result
    would show."""

    def __init__(self):
        self.items = []

    def run(self, items, on_progress=None):
        from evoforge.tasks.grading.answers import all_boxes

        self.items += items
        results = []
        for _, gold, text in items:
            read = f"{gold}|{'|'.join(all_boxes(text or ''))}"
            results.append((("correct", "wrong", "no_answer")[len(read) % 3], f"answer {read}",
                            None if len(read) % 2 else "odd", len(read) / 1000))
        return results


@pytest.mark.unit
def test_the_stage_grades_a_chunk_on_columns_exactly_as_row_by_row_python_does():
    """`boxed_rollouts` reads boxes with Arrow's regex engine (where the spread stage reads a part) and keeps a text
    only where Python must read its boxes; `_grade_batch` finds the distinct (gold, boxes) by a dictionary of key
    strings and decides whole-number answers on the columns: every row's verdict, answer, detail, seconds and
    `graded_with` are those of the Python reference (a row at a time), and the graders are sent the same golds
    with texts of the same boxes, in order (its own text where Python read it), over golds whole, spaced,
    fractional, symbolic or missing and texts with flat, nested, open, empty, repeated and Unicode-spaced boxes."""
    import random
    import re

    from evoforge.tasks.grading.answers import WHITESPACE, all_boxes, last_boxes
    from evoforge.tasks.verify import _grade_batch, boxed_rollouts
    from tests.verify_reference import python_verdicts

    rng = random.Random(11)
    golds = ["12", " 12 ", "-3", "0", "7", "12\u3000", "\\frac{1}{2}", "-\\frac{3}{4}", "1, 2", "x^2", None, "1:2"]
    answers = ["12", "-3", "0", "007", "7", "+7", "-0", "", " ", "\\frac{1}{2}", "\\frac{2}{4}", "x^2", "1:2", "3:",
               "1, 2", "12.0", "é", "{1}", "\\boxed{12}"]
    pieces = ["Step: add. ", "\\boxed{", "\\fbox {", "}", "{", " ", "\n", "\\boxed", ":"] + list(WHITESPACE[:12])

    def text() -> str | None:
        if rng.random() < 0.02:
            return None
        parts = [rng.choice(pieces) for _ in range(rng.randint(0, 3))]
        for _ in range(rng.choice([0, 1, 1, 1, 2])):
            space = rng.choice(["", " ", rng.choice(WHITESPACE)])
            parts.append(f"\\boxed{space}{{{rng.choice(WHITESPACE[:3]) if rng.random() < 0.1 else ''}"
                         f"{rng.choice(answers)}}}")
        return "".join(parts)

    rows = [dict(rollout_id=f"r{i:05d}", problem_id=f"p{i // 8}", gold=golds[(i // 8) % len(golds)], text=text())
            for i in range(4000)]
    # two pairs whose key strings would be one without the gold's length in front: "7:1" + ":1:" + "x" and "7" + ":1:" + "1:x"
    rows += [dict(rollout_id="s0", problem_id="s0", gold="7:1", text="\\boxed{x}"),
             dict(rollout_id="s1", problem_id="s1", gold="7", text="\\boxed{1:x}")]
    ours, reference = RecordingPool(), RecordingPool()
    table = pa.Table.from_pylist(rows, schema=pa.schema([("rollout_id", pa.string()), ("problem_id", pa.string()),
                                                         ("gold", pa.string()), ("text", pa.string())]))
    boxed = boxed_rollouts(table.select(["rollout_id", "problem_id", "text"]).combine_chunks().to_batches()[0])
    # a text is dropped where it holds one flat box alone or no box opening (its boxes are in `last_box`), else kept
    openings, flat = re.compile(r"\\(?:boxed|fbox)\s*\{"), re.compile(r"\\(?:boxed|fbox)\s*\{[^{}]*\}")
    read_by_arrow = [len(openings.findall(t or "")) == 0 or len(openings.findall(t)) == len(flat.findall(t)) == 1
                     for t in table["text"].to_pylist()]
    assert boxed["text"].to_pylist() == [None if simple else row["text"] for simple, row in zip(read_by_arrow, rows)]
    assert 1000 < sum(read_by_arrow) < len(rows) - 1000
    graded = _grade_batch(pa.Table.from_batches([boxed]).append_column("gold", table["gold"]), ours, lambda n: None)
    expected = python_verdicts(rows, reference)
    assert graded.to_pylist() == expected.to_pylist() and graded.equals(expected)
    assert 0 < len(ours.items) < len(rows) // 4 and len(ours.items) == len(reference.items)
    for (kind, gold, text), (_, reference_gold, reference_text) in zip(ours.items, reference.items):
        assert (kind, gold) == ("grade", reference_gold)
        assert [last_boxes(text, k) for k in (1, 2, 3)] == [last_boxes(reference_text or "", k) for k in (1, 2, 3)]
        boxes = all_boxes(reference_text or "")
        assert text == reference_text or text == (f"\\boxed{{{boxes[-1]}}}" if boxes else "")
    verdicts = graded["verdict"].to_pylist()
    assert {verdict: verdicts.count(verdict) > 50 for verdict in ("correct", "wrong", "no_answer", "no_reference")} == {
        "correct": True, "wrong": True, "no_answer": True, "no_reference": True}
    assert len(set(graded["graded_with"].drop_null().to_pylist())) < len(rows) // 2  # gradings were shared
