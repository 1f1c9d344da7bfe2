"""evaluate: a model on held-out sets, per problem and per set, with intervals.

Per problem (`eval_results`): samples, correct ones, mean tokens, mean log-probability, distinct
final answers. Per set (`evals`): pass@1 with its 95% interval, unbiased pass@k, an entropy estimate
(mean negative log-probability of the sampled tokens), the distinct-answer rate. `score_intervals`:
pass@k for each configured k with its interval and, against a baseline model measured on the same
problems, the paired change with its interval (tasks/intervals.py). The held-out rollouts and
verdicts are outputs too, so every figure can be traced to its samples.

Test-time search (`search: ppm_best_of_n`, rStar-Math's "Pass@1 with N trajectories"): a process preference
model scores each of a problem's n samples and picks one; its rows (`search = 'ppm_best_of_n'`, n = 1 per
problem) sit beside plain sampling's (`search = 'none'`) in every table, with the same intervals, and compare
with the baseline's picks by the same PPM.
"""
from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
from typing import Literal

from pydantic import Field, model_validator

from evoforge.data import schemas
from evoforge.data.chunks import NO_CHUNKS, Chunks
from evoforge.data.section import Section
from evoforge.models.engine import Engine, SamplingConfig
from evoforge.tasks import intervals
from evoforge.tasks.generate import GenerateConfig, generate
from evoforge.tasks.ingest import EvalSetConfig
from evoforge.tasks.promotion import GateConfig
from evoforge.tasks.verify import VerifyConfig, verify


class IntervalConfig(Section):
    resamples: int = Field(intervals.RESAMPLES, ge=100, description="bootstrap resamples")
    level: float = Field(intervals.LEVEL, gt=0.5, lt=1.0, description="coverage of every interval")
    seed: int = Field(0, description="the bootstrap's seed: the same data gives the same intervals")


class EvaluateConfig(Section):
    sets: list[EvalSetConfig] = Field(default_factory=list, description="held-out sets; `limit` picks a fixed sample")
    sampling: SamplingConfig = Field(default_factory=lambda: SamplingConfig(n=4, max_tokens=200, seed=1234))
    pass_k: list[int] = Field(default_factory=lambda: [1, 4])
    few_shot: bool = True
    intervals: IntervalConfig = Field(default_factory=IntervalConfig)
    gate: GateConfig = Field(default_factory=GateConfig, description="which checkpoints become the next round's policy")
    entropy_drop_flag: float = Field(0.3, ge=0, le=1, description="the report flags a model whose held-out entropy "
                                                                   "fell by more than this fraction from its baseline")
    search: Literal["none", "ppm_best_of_n"] = Field(
        "none", description="none: plain sampling; ppm_best_of_n: also the PPM's pick among each problem's sampling.n "
                            "samples (the run's newest PPM), side by side with plain sampling")

    @model_validator(mode="after")
    def _gate_reads_what_is_measured(self):
        unknown = [name for name in self.gate.sets if name not in {s.name for s in self.sets}]
        if unknown and self.sets:
            raise ValueError(f"gate.sets names {unknown}, which evaluate.sets does not evaluate "
                             f"({', '.join(s.name for s in self.sets)})")
        if max(self.pass_k, default=1) > self.sampling.n:
            raise ValueError(f"pass_k {max(self.pass_k)} needs at least that many samples per problem; "
                             f"sampling.n is {self.sampling.n}")
        return self

    def settings_hash(self, verify: VerifyConfig) -> str:
        """What decides a model's held-out samples and verdicts besides the model: another model's
        `eval_results` are comparable only under the same hash."""
        from evoforge.data.ids import stable_hash

        return stable_hash(self.sampling.model_dump_json(), str(self.few_shot), str(sorted(verify.grading_settings().items())))


PLAIN, PPM_PICK = "none", "ppm_best_of_n"


def problem_results(problems: pa.Table, rollouts: pa.Table, verdicts: pa.Table, model_id: str, model_round: int,
                    eval_set: str, settings_hash: str | None = None, search: str = PLAIN) -> pa.Table:
    """One `eval_results` row per problem of the set, in the set's order."""
    per_problem: dict[str, dict] = {pid: dict(n=0, correct=0, answers=set(), no_answer=0, tokens=[], logprobs=[])
                                    for pid in problems["problem_id"].to_pylist()}
    for v in verdicts.select(["problem_id", "verdict", "extracted_answer"]).to_pylist():
        row = per_problem.get(v["problem_id"])
        if row is None or v["verdict"] == "no_reference":
            continue
        row["n"] += 1
        row["correct"] += v["verdict"] == "correct"
        row["no_answer"] += v["verdict"] == "no_answer"
        if v["extracted_answer"] is not None:
            row["answers"].add(v["extracted_answer"])
    for r in rollouts.select(["problem_id", "completion_tokens", "mean_logprob"]).to_pylist():
        row = per_problem.get(r["problem_id"])
        if row is not None:
            row["tokens"].append(r["completion_tokens"])
            row["logprobs"].append(r["mean_logprob"])
    mean = lambda values: sum(values) / len(values) if values else None  # noqa: E731
    return pa.Table.from_pylist([
        dict(model_id=model_id, model_round=model_round, eval_set=eval_set, problem_id=pid, n=row["n"],
             correct=row["correct"], mean_tokens=mean(row["tokens"]),
             mean_logprob=mean([lp for lp in row["logprobs"] if lp is not None]),
             distinct_answers=len(row["answers"]), no_answer=row["no_answer"], settings_hash=settings_hash,
             search=search)
        for pid, row in per_problem.items()
    ], schema=schemas.EVAL_RESULTS)


def plain_sampling(results: pa.Table) -> pa.Table:
    """The rows of the samples themselves (search 'none', or written before the column), not a PPM's picks."""
    return results.filter(pc.equal(pc.fill_null(results["search"], PLAIN), PLAIN))


def solution_text(question: str, completion: str) -> str:
    """What the PPM scores for a whole solution: the problem, then the solution, as it scores a step after the
    steps before it (tasks/mcts.py `ppm_text`)."""
    return f"{question}\n\n{completion}"


def ppm_picks(problems: pa.Table, rollouts: pa.Table, verdicts: pa.Table, scorer, model_id: str, model_round: int,
              eval_set: str, settings_hash: str | None = None) -> pa.Table:
    """Best-of-n by the PPM: `eval_results` rows (search 'ppm_best_of_n') whose one sample per problem is the
    one `scorer(texts) -> scores` rates highest among that problem's samples (ties: the lowest sample index)."""
    question = dict(zip(problems["problem_id"].to_pylist(), problems["question"].to_pylist()))
    candidates = [r for r in rollouts.select(["rollout_id", "problem_id", "sample_index", "text"]).to_pylist()
                  if r["problem_id"] in question]
    scores = scorer([solution_text(question[r["problem_id"]], r["text"]) for r in candidates]) if candidates else []
    best: dict[str, tuple] = {}
    for row, score in zip(candidates, scores):
        key = (float(score), -row["sample_index"])
        if row["problem_id"] not in best or key > best[row["problem_id"]][0]:
            best[row["problem_id"]] = (key, row["rollout_id"])
    picked = pa.array([rollout_id for _, rollout_id in best.values()], pa.string())
    return problem_results(problems, rollouts.filter(pc.is_in(rollouts["rollout_id"], picked)),
                           verdicts.filter(pc.is_in(verdicts["rollout_id"], picked)), model_id, model_round, eval_set,
                           settings_hash, PPM_PICK)


def _counts(results: pa.Table) -> tuple[list[int], list[int]]:
    graded = results.filter(pc.greater(results["n"], 0))
    return graded["n"].to_pylist(), graded["correct"].to_pylist()


def _per_sample(rows: list[dict], column: str) -> float:
    """A per-problem mean of `column` as a mean over the samples (each problem weighs its n)."""
    rows = [r for r in rows if r["n"] and r[column] is not None]
    return sum(r[column] * r["n"] for r in rows) / max(1, sum(r["n"] for r in rows))


def held_out_entropy(results: pa.Table) -> float:
    """Mean negative log-probability of the sampled tokens, over every sample of `eval_results` rows."""
    return -_per_sample(results.select(["n", "mean_logprob"]).to_pylist(), "mean_logprob")


def set_summary(results: pa.Table, config: EvaluateConfig) -> dict:
    """The `evals` row of one model on one set and search, from its `eval_results` rows."""
    n, correct = _counts(results)
    first = results.slice(0, 1).to_pylist()[0]
    pass_at_1 = intervals.score_interval(n, correct, 1, **config.intervals.model_dump())
    pass_at = {}
    for k in sorted(set(config.pass_k)):  # over the problems with at least k samples, as score_intervals
        enough = [(a, b) for a, b in zip(n, correct) if a >= k]
        if enough:
            pass_at[k] = sum(intervals.pass_at_k(a, b, k) for a, b in enough) / len(enough)
    graded = [r for r in results.to_pylist() if r["n"]]
    return dict(
        model_id=first["model_id"], model_round=first["model_round"], eval_set=first["eval_set"],
        problems=len(graded), n=max(n, default=0), pass_at_1=pass_at_1.estimate, pass_at_k=list(pass_at.items()),
        entropy=held_out_entropy(results), mean_tokens=_per_sample(graded, "mean_tokens"),
        no_answer_rate=sum(r["no_answer"] for r in graded) / max(1, sum(r["n"] for r in graded)),
        pass_at_1_low=pass_at_1.low, pass_at_1_high=pass_at_1.high,
        distinct_answer_rate=sum(r["distinct_answers"] / r["n"] for r in graded) / max(1, len(graded)),
        search=first["search"] or PLAIN,
    )


def score_intervals(results: pa.Table, config: EvaluateConfig, baseline: pa.Table | None = None) -> pa.Table:
    """pass@k of one model (its `eval_results`) for each configured k, per set and search, with its interval;
    with `baseline` (another model's `eval_results`), the paired change over the problems both measured with
    at least k samples under the same search."""
    rows = []
    settings = config.intervals.model_dump()
    searched = lambda table: pc.fill_null(table["search"], PLAIN)  # noqa: E731 (rows written before the column)
    for eval_set, search in sorted(set(zip(results["eval_set"].to_pylist(), searched(results).to_pylist()))):
        mine = results.filter(pc.and_(pc.equal(results["eval_set"], eval_set), pc.equal(searched(results), search)))
        theirs = None
        if baseline is not None:
            theirs = {r["problem_id"]: r for r in baseline.filter(pc.and_(
                pc.equal(baseline["eval_set"], eval_set), pc.equal(searched(baseline), search))).to_pylist()}
        mine_rows = mine.to_pylist()
        first = mine_rows[0]
        for k in sorted(set(config.pass_k)):
            n, correct = _counts(mine.filter(pc.greater_equal(mine["n"], k)))  # a problem with fewer samples cannot say
            if not n:
                continue
            score = intervals.score_interval(n, correct, k, **settings)
            row = dict(model_id=first["model_id"], model_round=first["model_round"], eval_set=eval_set,
                       metric=f"pass@{k}", k=k, problems=len(n), n=max(n), estimate=score.estimate, low=score.low,
                       high=score.high, baseline_model_id=None, baseline_model_round=None, paired_problems=None,
                       change=None, change_low=None, change_high=None, search=search, **settings)
            if theirs:
                pairs = [(r, theirs[r["problem_id"]]) for r in mine_rows
                         if r["problem_id"] in theirs and r["n"] >= k and theirs[r["problem_id"]]["n"] >= k]
                if pairs:
                    change = intervals.change_interval([a["n"] for a, _ in pairs], [a["correct"] for a, _ in pairs],
                                                       [b["n"] for _, b in pairs], [b["correct"] for _, b in pairs],
                                                       k, **settings)
                    base = pairs[0][1]
                    row.update(baseline_model_id=base["model_id"], baseline_model_round=base["model_round"],
                               paired_problems=len(pairs), change=change.estimate, change_low=change.low,
                               change_high=change.high)
            rows.append(row)
    return pa.Table.from_pylist(rows, schema=schemas.SCORE_INTERVALS)


def evaluate(
    sets: dict[str, pa.Table], engine: Engine, config: EvaluateConfig, verify_config: VerifyConfig, model_round: int,
    chunks: Chunks = NO_CHUNKS, ppm_scorer=None,
) -> dict[str, pa.Table]:
    """`sets`: name -> (problem_id, question, answer). Returns the held-out `rollouts` and `verdicts`,
    `eval_results` (per problem) and `evals` (per set and search) of the engine's model; with
    `ppm_scorer(texts) -> scores` (models/ppm.py), also the PPM's picks (`ppm_picks`)."""
    generate_config = GenerateConfig(sampling=config.sampling, few_shot=config.few_shot)
    rollouts, verdicts, results, summaries = [], [], [], []
    for name, problems in sets.items():
        solved = generate(problems.select(["problem_id", "question"]), engine, generate_config, chunks.sub(f"{name}-solve"))
        graded = verify(solved, problems.select(["problem_id", "answer"]), verify_config, chunks.sub(f"{name}-grade"))
        settings = config.settings_hash(verify_config)
        per_problem = [problem_results(problems, solved, graded, engine.model_id, model_round, name, settings)]
        if ppm_scorer is not None:
            per_problem.append(ppm_picks(problems, solved, graded, ppm_scorer, engine.model_id, model_round, name, settings))
        rollouts.append(solved)
        verdicts.append(graded)
        results += per_problem
        summaries += [set_summary(table, config) for table in per_problem]
    return {
        "rollouts": pa.concat_tables(rollouts) if rollouts else schemas.ROLLOUTS.empty_table(),
        "verdicts": pa.concat_tables(verdicts) if verdicts else schemas.VERDICTS.empty_table(),
        "eval_results": pa.concat_tables(results) if results else schemas.EVAL_RESULTS.empty_table(),
        "evals": pa.Table.from_pylist(summaries, schema=schemas.EVALS),
    }


def _interval(low, high) -> str:
    return "" if low is None else f" [{low:.3f}, {high:.3f}]"


def summarize(tables: dict[str, pa.Table]) -> list[str]:
    lines = ["| model | set | search | pass@1 [95%] | pass@k | entropy | distinct answers | problems x n |",
             "|---|---|---|---|---|---|---|---|"]
    for e in tables["evals"].to_pylist() if "evals" in tables else []:
        ks = ", ".join(f"@{k} {v:.3f}" for k, v in sorted(dict(e["pass_at_k"]).items()))
        lines.append(f"| {e['model_round']} | {e['eval_set']} | {e['search'] or PLAIN} | {e['pass_at_1']:.3f}"
                     f"{_interval(e['pass_at_1_low'], e['pass_at_1_high'])} | {ks} | {e['entropy']:.3f} "
                     f"| {e['distinct_answer_rate'] if e['distinct_answer_rate'] is not None else float('nan'):.2f} "
                     f"| {e['problems']} x {e['n']} |")
    changes = [r for r in tables["score_intervals"].to_pylist() if r["change"] is not None] \
        if "score_intervals" in tables else []
    if changes:
        lines += ["", "| model | vs | set | search | metric | change [95%, paired] | problems |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['model_round']} | {r['baseline_model_round']} | {r['eval_set']} | {r['search'] or PLAIN} | {r['metric']} | "
                  f"{r['change']:+.3f}{_interval(r['change_low'], r['change_high'])} | {r['paired_problems']} |"
                  for r in changes]
    for p in tables["promotions"].to_pylist() if "promotions" in tables else []:
        lines += ["", f"**model {p['model_round']} ({p['checkpoint_id']}): {p['decision']}** ({p['decided_by']}, "
                      f"rule {p['rule']}): {p['why']}"]
    return lines
