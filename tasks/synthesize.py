"""synthesize (SvS, arXiv 2508.14029): variational problems from the policy's own correct solutions.

For each under-performing problem (accuracy in the SvS band) and each of its correct rollouts, the
policy writes a new problem that the same solution would answer. Outputs with no extractable problem,
a leaked answer, or text that duplicates the parent or the pool are recorded with the reason and not
solved. Each valid variant is solved G_v times and graded against the PARENT's answer; a variant whose
accuracy lies in the keep band is kept (synthesis reward 1) and joins the next round's pool.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import pyarrow as pa
from pydantic import Field

from evoforge.data import schemas
from evoforge.data.chunks import NO_CHUNKS, Chunks
from evoforge.data.ids import normalize_question, problem_id, problem_seed, stable_hash
from evoforge.data.section import Section
from evoforge.models.engine import Engine, GenerationRequest, SamplingConfig
from evoforge.models.prompts import extract_problem, synthesis_messages
from evoforge.tasks import summary
from evoforge.tasks.decontam import Decontaminator, ngrams
from evoforge.tasks.filter import EPS, correct_counts
from evoforge.tasks.generate import GenerateConfig, generate
from evoforge.tasks.verify import VerifyConfig, verify


class SynthesizeConfig(Section):
    solutions_per_problem: int = Field(2, ge=1, description="correct rollouts of a problem used as synthesis seeds")
    samples_per_variant: int = Field(8, ge=1, description="G_v: solving samples per variant")
    keep_band: tuple[float, float] = Field((0.125, 0.625), description="variant accuracy band that is kept, inclusive")
    synthesis: SamplingConfig = Field(
        default_factory=lambda: SamplingConfig(n=1, temperature=0.8, top_p=0.95, max_tokens=200, seed=1)
    )
    max_variant_chars: int = 2000


@dataclass
class Candidate:
    parent_problem_id: str
    source_rollout_id: str
    answer: str
    raw_output: str
    text: str | None
    reject_reason: str | None


def leaks_answer(text: str, answer: str) -> bool:
    """The answer stated in the problem: as a number not part of a longer number, else verbatim."""
    answer = answer.strip()
    if not answer:
        return False
    if re.fullmatch(r"-?\d+(\.\d+)?", answer):
        return re.search(rf"(?<![\d.]){re.escape(answer)}(?![\d]|\.\d)", text) is not None
    return len(answer) >= 2 and answer in text


def synthesis_reward(accuracy: float, solved: int, band: tuple[float, float], rejected: bool = False) -> float:
    """SvS's reward of one synthesis: 1 when its variant was valid (not rejected by the screens), solved at
    least once, and its accuracy against the ORIGINAL answer lies in `band` (inclusive); else 0. The offline
    stage keeps such a variant; the online method (tasks/finetune/svs.py) trains the synthesis on it."""
    lo, hi = band
    return 1.0 if not rejected and solved > 0 and lo - EPS <= accuracy <= hi + EPS else 0.0


def seeds_for_synthesis(stats: pa.Table, rollouts: pa.Table, verdicts: pa.Table, per_problem: int) -> list[dict]:
    """(problem, correct rollout) pairs of the under-performing problems, the first `per_problem` samples each."""
    under = {p for p, b in zip(stats["problem_id"].to_pylist(), stats["bucket"].to_pylist()) if b == "underperforming"}
    correct = {r for r, v in zip(verdicts["rollout_id"].to_pylist(), verdicts["verdict"].to_pylist()) if v == "correct"}
    chosen: dict[str, list[dict]] = {}
    for row in sorted(rollouts.select(["rollout_id", "problem_id", "sample_index", "text"]).to_pylist(),
                      key=lambda r: (r["problem_id"], r["sample_index"])):
        if row["problem_id"] in under and row["rollout_id"] in correct:
            bucket = chosen.setdefault(row["problem_id"], [])
            if len(bucket) < per_problem:
                bucket.append(row)
    return [row for rows in chosen.values() for row in rows]


def screen(candidates: list[Candidate], questions: dict[str, str], pool: list[str], max_chars: int) -> None:
    """Set reject_reason on candidates that must not be solved (in place, in order, so the first of
    two near-identical variants is kept and the second is the duplicate)."""
    seen = Decontaminator()
    seen.add_set("pool", [(str(i), q) for i, q in enumerate(pool)])
    for c in candidates:
        if c.reject_reason:
            continue
        parent = questions[c.parent_problem_id]
        if c.text is None:
            c.reject_reason = "no_problem"
        elif len(c.text) > max_chars:
            c.reject_reason = "too_long"
        elif leaks_answer(c.text, c.answer):
            c.reject_reason = "answer_leak"
        elif normalize_question(c.text) == normalize_question(parent):
            c.reject_reason = "duplicate_of_parent"
        elif ngrams(c.text) & ngrams(parent):
            c.reject_reason = "near_duplicate_of_parent"
        elif seen.match(c.text):
            c.reject_reason = "near_duplicate_of_pool"
        else:
            seen.add_set("variant", [(c.source_rollout_id, c.text)])


def synthesize(
    problems: pa.Table,
    stats: pa.Table,
    rollouts: pa.Table,
    verdicts: pa.Table,
    engine: Engine,
    config: SynthesizeConfig,
    generate_config: GenerateConfig,
    verify_config: VerifyConfig,
    chunks: Chunks = NO_CHUNKS,
) -> dict[str, pa.Table]:
    """-> {"variants", "rollouts", "verdicts" (the variant-solving ones), "problems" (kept variants)}.

    Its three batched steps (writing variants, solving them, grading) each keep resumable chunks."""
    questions = dict(zip(problems["problem_id"].to_pylist(), problems["question"].to_pylist()))
    answers = dict(zip(problems["problem_id"].to_pylist(), problems["answer"].to_pylist()))
    seeds = seeds_for_synthesis(stats, rollouts, verdicts, config.solutions_per_problem)
    requests = [
        GenerationRequest(synthesis_messages(questions[s["problem_id"]], s["text"]),
                          problem_seed(config.synthesis.seed, s["rollout_id"]))
        for s in seeds
    ]
    def write_variants() -> pa.Table:
        outputs = engine.generate(requests, config.synthesis.model_copy(update={"n": 1}))
        return pa.table({"raw_output": pa.array([out[0].text for out in outputs], pa.string())})

    key = stable_hash("synthesis", engine.model_id, *(s["rollout_id"] for s in seeds))
    raw = chunks.sub("write").get_or_compute(key, write_variants)["raw_output"].to_pylist() if requests else []
    candidates = [
        Candidate(s["problem_id"], s["rollout_id"], answers[s["problem_id"]], text, extract_problem(text), None)
        for s, text in zip(seeds, raw)
    ]
    screen(candidates, questions, list(questions.values()), config.max_variant_chars)

    valid = [c for c in candidates if c.reject_reason is None]
    # a valid variant's id is the problem_id it has once it joins the pool (screening keeps valid texts
    # distinct); a rejected one may repeat a valid one's text, so its id comes from its own seed and output
    ids = {id(c): problem_id(c.text) if c.reject_reason is None else stable_hash("variant", c.source_rollout_id, c.raw_output)
           for c in candidates}
    solve_config = generate_config.model_copy(deep=True)
    solve_config.sampling.n = config.samples_per_variant
    variant_problems = pa.table({"problem_id": [ids[id(c)] for c in valid], "question": [c.text for c in valid]})
    solved = generate(variant_problems, engine, solve_config, chunks.sub("solve")) if valid else schemas.ROLLOUTS.empty_table()
    golds = pa.table({"problem_id": [ids[id(c)] for c in valid], "answer": [c.answer for c in valid]})
    graded = verify(solved, golds, verify_config, chunks.sub("grade")) if valid else schemas.VERDICTS.empty_table()

    tally = correct_counts(graded)
    rows, kept_problems = [], []
    for c in candidates:
        vid = ids[id(c)]
        n, correct = tally.get(vid, (0, 0)) if c.reject_reason is None else (0, 0)
        accuracy = correct / n if n else 0.0
        reward = synthesis_reward(accuracy, n, config.keep_band, c.reject_reason is not None)
        kept = reward == 1.0
        reason = c.reject_reason or (None if kept else "outside_band")
        rows.append(dict(variant_id=vid, parent_problem_id=c.parent_problem_id, source_rollout_id=c.source_rollout_id,
                         text=c.text, answer=c.answer, raw_output=c.raw_output, n=n, correct=correct,
                         accuracy=accuracy, kept=kept, reward=reward, reject_reason=reason, origin="offline"))
        if kept:
            kept_problems.append(dict(problem_id=vid, question=c.text, answer=c.answer, source="svs",
                                      source_file=None, source_row=None, origin="synthetic",
                                      parent_problem_id=c.parent_problem_id))
    return {
        "variants": pa.Table.from_pylist(rows, schema=schemas.VARIANTS),
        "rollouts": solved,
        "verdicts": graded,
        "problems": pa.Table.from_pylist(kept_problems, schema=schemas.PROBLEMS),
    }


def summarize(tables: dict[str, pa.Table]) -> list[str]:
    reasons = summary.counts(summary.column(tables, "variants", "reject_reason"))
    synthesized = summary.rows(tables, "variants")
    kept = sum(summary.column(tables, "variants", "kept").to_pylist()) if synthesized else 0
    valid = synthesized - sum(v for k, v in reasons.items() if k not in (None, "outside_band"))
    ratio = f"{kept / synthesized:.1%}" if synthesized else "n/a"
    return [f"- **synthesized** {synthesized}, **valid** {valid}, **kept** {kept} (kept ratio {ratio})",
            summary.line("rejected by reason", {k: v for k, v in reasons.items() if k is not None})]
