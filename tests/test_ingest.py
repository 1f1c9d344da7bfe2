"""Ingest presets, every quarantine reason, format errors and decontamination."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from evoforge.data.ids import problem_id
from evoforge.tasks.decontam import Decontaminator
from evoforge.tasks.grading.answers import normalize_answer
from evoforge.tasks.ingest import IngestError, SourceConfig, ingest
from evoforge.tasks.verify import VerifyConfig, check_golds

pytestmark = pytest.mark.unit

VERIFY = VerifyConfig(workers=1, deadline_seconds=10)


def run_ingest(path, known=frozenset(), decontaminator=None, **config):
    return ingest(path, SourceConfig(path=str(path), **config),
                  check_golds=lambda answers: check_golds(answers, VERIFY),
                  known_ids=set(known), decontaminator=decontaminator)


def test_gsm8k_preset_reads_the_answer_after_the_marker_without_commas(write_jsonl, scratch):
    path = write_jsonl(scratch / "gsm.jsonl", [
        {"question": "How many?", "answer": "2 + 2 = 4\n#### 1,204"},
        {"question": "And now?", "answer": "so #### 7"},
    ])
    result = run_ingest(path, preset="gsm8k")
    assert result.problems["answer"].to_pylist() == ["1204", "7"]
    assert result.problems["source_row"].to_pylist() == [1, 2]
    assert result.quarantine.num_rows == 0


def test_math_preset_takes_the_last_box_or_an_answer_field(write_jsonl, scratch):
    path = write_jsonl(scratch / "math.jsonl", [
        {"problem": "Find x.", "solution": "First \\boxed{3}, no wait: \\boxed{\\frac{1}{2}}."},
        {"question": "Polar?", "answer": "so $\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}.$The answer is: x"},
    ])
    result = run_ingest(path, preset="math")
    assert result.problems["answer"].to_pylist() == ["\\frac{1}{2}", "\\left( 3, \\frac{\\pi}{2} \\right)"]


def test_plain_preset_uses_named_fields_and_normalises_numbers(write_jsonl, scratch):
    path = write_jsonl(scratch / "plain.jsonl", [{"q": "Twenty seven?", "a": "27.0"}, {"q": "Neg?", "a": -3}])
    result = run_ingest(path, preset="plain", question_field="q", answer_field="a")
    assert result.problems["answer"].to_pylist() == ["27", "-3"]
    assert normalize_answer("1,000.50") == "1000.5" and normalize_answer("x+1") == "x+1"


def test_every_bad_row_is_quarantined_with_file_row_and_reason(write_jsonl, scratch):
    path = write_jsonl(scratch / "bad.jsonl", [
        {"question": "Good one?", "answer": "5"},                     # 1
        "this is not json",                                          # 2
        b"{\"question\": \"caf\xe9\", \"answer\": \"1\"}",             # 3 latin-1 byte
        {"answer": "3"},                                             # 4 no question
        {"question": "   ", "answer": "3"},                          # 5 empty question
        {"question": "Answer unparseable?", "answer": "\\frac{"},    # 6
        {"question": "x" * 5000, "answer": "1"},                     # 7 too long
        {"question": "good   ONE?", "answer": "5"},                  # 8 duplicate of row 1 after normalising
        "[1, 2]",                                                    # 9 not an object
    ])
    result = run_ingest(path)
    assert result.rows_read == 9
    assert result.problems.num_rows + result.quarantine.num_rows == 9
    by_row = {r["source_row"]: r for r in result.quarantine.to_pylist()}
    assert {row: r["reason"] for row, r in by_row.items()} == {
        2: "not_json", 3: "not_utf8", 4: "missing_field", 5: "empty_field", 6: "unparseable_answer",
        7: "too_long", 8: "duplicate", 9: "not_object",
    }
    assert by_row[4]["field"] == "question" and by_row[6]["field"] == "answer"
    assert by_row[8]["matched_id"] == problem_id("Good one?")
    assert all(r["source_file"] == str(path) for r in by_row.values())
    assert "this is not json" in by_row[2]["raw"]


def test_a_file_that_is_not_jsonl_at_all_is_one_clear_error(scratch):
    path = scratch / "notes.jsonl"
    path.write_text("hello\nworld\n")
    with pytest.raises(IngestError, match="notes.jsonl: not a JSONL file"):
        run_ingest(path)
    bogus = scratch / "table.parquet"
    bogus.write_text("not parquet")
    with pytest.raises(IngestError, match="table.parquet: not a Parquet file"):
        run_ingest(bogus)
    with pytest.raises(IngestError, match="no such file"):
        run_ingest(scratch / "missing.jsonl")


def test_parquet_and_datasets_sources(scratch):
    import datasets

    rows = {"question": ["One plus one?", "Two plus two?"], "answer": ["2", "4"]}
    pq.write_table(pa.table(rows), scratch / "p.parquet")
    assert run_ingest(scratch / "p.parquet").problems["answer"].to_pylist() == ["2", "4"]
    datasets.Dataset.from_dict(rows).save_to_disk(str(scratch / "ds"))
    result = run_ingest(scratch / "ds")
    assert result.problems["question"].to_pylist() == rows["question"]


def test_duplicates_across_sources_and_ids_are_content_hashes(write_jsonl, scratch):
    path = write_jsonl(scratch / "a.jsonl", [{"question": "What is 2 + 2?", "answer": "4"}])
    first = run_ingest(path)
    again = run_ingest(path, known=first.problems["problem_id"].to_pylist())
    assert again.problems.num_rows == 0 and again.quarantine["reason"].to_pylist() == ["duplicate"]
    assert problem_id("What is 2 + 2?") == problem_id("  what IS 2 +   2? ")


def test_decontamination_quarantines_8_gram_overlap_with_the_matching_eval_problem(write_jsonl, scratch):
    decon = Decontaminator()
    decon.add_set("gsm8k-test", [("e1", "Janet has three ducks that lay sixteen eggs every single day of the week")])
    path = write_jsonl(scratch / "train.jsonl", [
        {"question": "Bob says: Janet has three ducks that lay sixteen eggs every single day. How many?", "answer": "16"},
        {"question": "Janet has three ducks. How many legs?", "answer": "6"},
    ])
    result = run_ingest(path, decontaminator=decon)
    assert result.problems["question"].to_pylist() == ["Janet has three ducks. How many legs?"]
    (row,) = result.quarantine.to_pylist()
    assert (row["reason"], row["matched_set"], row["matched_id"]) == ("contaminated", "gsm8k-test", "e1")


def test_shipped_sets_ingest_cleanly(scratch):
    from evoforge.data.home import PROJECT_ROOT

    sets = PROJECT_ROOT / "data" / "sets"
    gsm = run_ingest(sets / "gsm8k" / "test.jsonl", preset="gsm8k", limit=50)
    assert gsm.problems.num_rows == 50
    math = run_ingest(sets / "math500" / "test.jsonl", preset="math", limit=50)
    assert math.problems.num_rows + math.quarantine.num_rows == 50 and math.problems.num_rows >= 45


def test_arithmetic_generator_reproduces_the_shipped_files(scratch):
    from evoforge.data.home import PROJECT_ROOT
    from evoforge.tasks.sets.arithmetic import write_splits

    written = write_splits(scratch / "arith")
    shipped = PROJECT_ROOT / "data" / "sets" / "easy_arithmetic"
    for split, path in written.items():
        assert path.read_bytes() == (shipped / f"{split}.jsonl").read_bytes()
    import json

    questions = {split: [json.loads(line)["question"] for line in (shipped / f"{split}.jsonl").open()]
                 for split in ("train", "test")}
    decon = Decontaminator()
    decon.add_set("test", list(enumerate(questions["test"])))
    assert [q for q in questions["train"] if decon.match(q)] == []
    assert {1, 2} == {json.loads(line)["steps"] for line in (shipped / "train.jsonl").open()}


def test_demonstrations_keep_free_text_answers_and_quarantine_only_what_is_broken(write_jsonl, scratch):
    path = write_jsonl(scratch / "demos.jsonl", [
        {"question": "Why is the sky blue?", "answer": "Rayleigh scattering: short wavelengths scatter more."},
        {"question": "What is 6 * 7?", "answer": "6 * 7 = 42.\nThe answer is \\boxed{42}."},
        {"question": "No expert here"},
        {"question": "   ", "answer": "an answer to nothing"},
        {"question": "Too long an answer", "answer": "x" * 9000},
    ])
    result = run_ingest(path, preset="demonstrations")
    rows = result.problems.to_pylist()
    assert [r["expert_answer"] for r in rows] == ["Rayleigh scattering: short wavelengths scatter more.",
                                                  "6 * 7 = 42.\nThe answer is \\boxed{42}."]
    assert all(r["answer"] is None and r["task"] == "demonstration" for r in rows)  # nothing to grade, nothing graded
    assert [(q["source_row"], q["field"], q["reason"]) for q in result.quarantine.to_pylist()] == [
        (3, "answer", "missing_field"), (4, "question", "empty_field"), (5, "answer", "too_long")]
    assert result.rows_read == result.problems.num_rows + result.quarantine.num_rows


def test_demonstrations_with_a_reference_field_are_graded_too(write_jsonl, scratch):
    path = write_jsonl(scratch / "demos.jsonl", [
        {"q": "What is 6 * 7?", "a": "It is 42.", "ref": "42"},
        {"q": "What is 1 + 1?", "a": "Two.", "ref": "\\frac{"},
        {"q": "What is 2 + 2?", "a": "Four."},
    ])
    result = run_ingest(path, preset="demonstrations", question_field="q", answer_field="a", reference_field="ref",
                        task="arithmetic-demos")
    assert [(r["answer"], r["expert_answer"], r["task"]) for r in result.problems.to_pylist()] == [
        ("42", "It is 42.", "arithmetic-demos")]
    assert [(q["source_row"], q["field"], q["reason"]) for q in result.quarantine.to_pylist()] == [
        (2, "ref", "unparseable_answer"), (3, "ref", "missing_field")]


def test_graded_presets_keep_the_worked_solution_as_the_expert_answer(write_jsonl, scratch):
    path = write_jsonl(scratch / "gsm.jsonl", [{"question": "How many?", "answer": "48/2 = <<48/2=24>>24\n#### 24"}])
    (row,) = run_ingest(path, preset="gsm8k").problems.to_pylist()
    assert row["answer"] == "24" and row["task"] == "math"
    assert row["expert_answer"] == "48/2 = 24\nThe answer is \\boxed{24}."  # the policy's format, no calculator marks


def test_the_shipped_demonstrations_are_reproducible_and_ingest_cleanly(scratch):
    import json

    from evoforge.data.home import PROJECT_ROOT
    from evoforge.tasks.sets.demonstrations import build

    shipped = PROJECT_ROOT / "data" / "sets" / "gsm8k_demonstrations" / "train.jsonl"
    assert [json.loads(line) for line in shipped.open()] == build(200)
    result = run_ingest(shipped, preset="demonstrations", reference_field="reference")
    assert result.problems.num_rows == 200 and result.quarantine.num_rows == 0
    assert all(r["expert_answer"].endswith(f"\\boxed{{{r['answer']}}}.") for r in result.problems.to_pylist())
