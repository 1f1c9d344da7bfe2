"""SvS synthesis: extraction, every reject reason, the keep band, grading against the parent's answer.

The policy's text is scripted here (`scripted_policy`, on the scripted engine of conftest) because what is
under test is what the stage does with given outputs; the real engine runs in the round tests."""
from __future__ import annotations

import pyarrow as pa
import pytest

from evoforge.data import schemas
from evoforge.data.ids import problem_id
from evoforge.models.engine import Completion
from evoforge.models.prompts import SYNTHESIS_SYSTEM, extract_problem
from evoforge.tasks.generate import GenerateConfig
from evoforge.tasks.synthesize import SynthesizeConfig, leaks_answer, synthesize
from evoforge.tasks.verify import VerifyConfig

pytestmark = pytest.mark.unit

PARENT = "Ann has 3 bags with 4 apples in each. How many apples does Ann have?"
SYNTHESIS_OUTPUTS = {  # by the solution text the policy was shown
    "sol-a": "```problem\nA shelf has 2 rows of 6 cups each. How many cups are on the shelf?\n```",
    "sol-b": "```problem\nA farm has 12 goats in 1 pen. How many goats are there?\n```",   # answer leak
    "sol-c": "I cannot think of one.",                                                      # no problem
    "sol-d": f"```problem\n{PARENT}\n```",                                                  # the parent again
    "sol-e": "```problem\nBo has 3 bags with 4 apples in each. How many apples does Ann have now?\n```",  # 8-gram overlap
    "sol-f": "New problem: Six boxes hold two pens each. How many pens are in the boxes?\n\nSolution: 12",
    "sol-g": "```problem\nA shelf has 2 rows of 6 cups each. How many cups are on the shelf?\n```",  # same as sol-a
}
SOLVE_CORRECT = {  # correct samples out of 8, by variant text
    "A shelf has 2 rows of 6 cups each. How many cups are on the shelf?": 3,
    "Six boxes hold two pens each. How many pens are in the boxes?": 8,
}


def scripted_policy(request, n):
    """Writes the variant of each solution it is shown, then solves each variant `SOLVE_CORRECT` times in 8."""
    if request.messages[0]["content"] == SYNTHESIS_SYSTEM:
        solution = request.messages[-1]["content"].split("Correct solution:\n")[1].split("\n")[0]
        return [Completion(SYNTHESIS_OUTPUTS[solution], 20, "stop", -1.0)] * n
    good = SOLVE_CORRECT[request.messages[-1]["content"]]
    # "12" is the PARENT's answer; a variant is right only if it keeps it
    return [Completion(f"\\boxed{{{12 if i < good else 13}}}", 5, "stop", -0.5) for i in range(n)]


def inputs():
    pid = problem_id(PARENT)
    problems = pa.Table.from_pylist([dict(problem_id=pid, question=PARENT, answer="12", source="t", source_file="f",
                                          source_row=1, origin="seed", parent_problem_id=None)], schema=schemas.PROBLEMS)
    solutions = list(SYNTHESIS_OUTPUTS)
    rollouts = pa.table({"rollout_id": [f"r-{s}" for s in solutions], "problem_id": [pid] * len(solutions),
                         "sample_index": list(range(len(solutions))), "text": solutions})
    verdicts = pa.table({"rollout_id": [f"r-{s}" for s in solutions], "verdict": ["correct"] * len(solutions)})
    stats = pa.table({"problem_id": [pid], "bucket": ["underperforming"]})
    return problems, stats, rollouts, verdicts


def test_extraction_prefers_the_problem_block_then_any_block_then_a_labelled_paragraph():
    assert extract_problem("x\n```\nother\n```\n```problem\nmine?\n```") == "mine?"
    assert extract_problem("```\nonly block?\n```") == "only block?"
    assert extract_problem("Problem: Two and two?\n\nSolution: 4") == "Two and two?"
    assert extract_problem("no problem at all") is None


def test_answer_leak_is_a_whole_number_not_a_digit_inside_another():
    assert leaks_answer("There are 12 goats.", "12") and not leaks_answer("There are 120 goats.", "12")
    assert not leaks_answer("Cost 3.12 each", "12") and leaks_answer("x = \\frac{1}{2}", "\\frac{1}{2}")


def test_variants_are_screened_solved_against_the_parent_answer_and_kept_in_band(scripted_engine):
    problems, stats, rollouts, verdicts = inputs()
    config = SynthesizeConfig(solutions_per_problem=10, samples_per_variant=8)
    out = synthesize(problems, stats, rollouts, verdicts, scripted_engine(scripted_policy), config,
                        GenerateConfig(), VerifyConfig(workers=1))
    by_source = {r["source_rollout_id"]: r for r in out["variants"].to_pylist()}
    assert {k[2:]: v["reject_reason"] for k, v in by_source.items()} == {
        "sol-a": None, "sol-b": "answer_leak", "sol-c": "no_problem", "sol-d": "duplicate_of_parent",
        "sol-e": "near_duplicate_of_parent", "sol-f": "outside_band", "sol-g": "near_duplicate_of_pool",
    }
    kept = by_source["r-sol-a"]
    assert (kept["n"], kept["correct"], kept["kept"], kept["reward"]) == (8, 3, True, 1.0)
    assert by_source["r-sol-f"]["accuracy"] == 1.0 and by_source["r-sol-f"]["reward"] == 0.0
    assert by_source["r-sol-b"]["n"] == 0  # rejected variants are never solved
    # sol-g repeats sol-a's text: it is the duplicate, with its own id and no share of sol-a's solving
    assert by_source["r-sol-g"]["n"] == 0 and by_source["r-sol-g"]["variant_id"] != kept["variant_id"]
    assert out["variants"]["variant_id"].unique().__len__() == out["variants"].num_rows
    # graded against the parent's answer "12": the variant-solving verdicts say so
    assert set(out["verdicts"]["gold"].to_pylist()) == {"12"}
    assert out["rollouts"].num_rows == 16 and out["verdicts"].num_rows == 16
    (pool_row,) = out["problems"].to_pylist()
    assert pool_row["origin"] == "synthetic" and pool_row["parent_problem_id"] == problem_id(PARENT)
    assert pool_row["problem_id"] == kept["variant_id"] == problem_id(kept["text"])


def test_keep_band_is_config(scripted_engine):
    problems, stats, rollouts, verdicts = inputs()
    config = SynthesizeConfig(solutions_per_problem=10, keep_band=(0.5, 1.0))
    out = synthesize(problems, stats, rollouts, verdicts, scripted_engine(scripted_policy), config, GenerateConfig(), VerifyConfig(workers=1))
    kept = {r["text"] for r in out["variants"].to_pylist() if r["kept"]}
    assert kept == {"Six boxes hold two pens each. How many pens are in the boxes?"}


def test_nothing_to_synthesize_without_underperforming_problems(scripted_engine):
    problems, stats, rollouts, verdicts = inputs()
    stats = pa.table({"problem_id": stats["problem_id"], "bucket": ["solved"]})
    out = synthesize(problems, stats, rollouts, verdicts, scripted_engine(scripted_policy), SynthesizeConfig(), GenerateConfig(), VerifyConfig())
    assert all(t.num_rows == 0 for t in out.values())
