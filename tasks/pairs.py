"""pairs: solution-level preference pairs (DPO) and the SFT selection (rejection-sampling fine-tuning).

- A problem with both correct and wrong rollouts gives up to `pairs_per_problem` pairs: chosen runs
  through its correct rollouts shortest first, rejected through its wrong ones most confident first
  (highest mean log-probability: the mistakes the policy is surest of are the ones worth unlearning).
- SFT: correct rollouts of learnable and under-performing problems (solved ones teach nothing new,
  unsolved ones have none), at most `sft_per_problem` each, shortest first, duplicates collapsed.
Both export to `datasets.Dataset` in TRL's conversational format. The stage makes both from one pass
over the round's rollouts and verdicts (`pairs_and_sft`), a range of problems at a time.
"""
from __future__ import annotations

import itertools
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from evoforge.data import schemas
from evoforge.data.ids import normalize_question, stable_hash
from evoforge.data.lake import in_key_ranges, key_boundaries, sql_batches
from evoforge.data.section import Section
from evoforge.tasks import summary

REJECTABLE = ("wrong", "no_answer")


class PairsConfig(Section):
    pairs_per_problem: int = Field(2, ge=0)
    sft_per_problem: int = Field(2, ge=0)
    sft_buckets: list[str] = Field(default_factory=lambda: ["learnable", "underperforming"])
    step_min_q_margin: float = Field(0.5, ge=0, description="step pairs: Q(chosen) - Q(rejected) at least this")
    step_min_edit_distance: float = Field(0.2, ge=0, le=1,
                                          description="step pairs: 1 - difflib ratio of the two steps at least this")


OUT_ROWS = 4_096  # output rows per yielded table

# Each side of a problem ranked as the selection walks it: correct rollouts shortest first, rejectable
# ones wrong before no_answer, most confident first; ties by rollout id. Only the first
# `pairs_per_problem` of each side can be paired; `side_rows` is the side's full count.
PAIR_CANDIDATES = """
WITH graded AS (
    SELECT r.rollout_id, r.problem_id, r.text, r.completion_tokens, r.mean_logprob, v.verdict,
           v.verdict = 'correct' AS is_correct
    FROM rollouts r JOIN verdicts v ON v.rollout_id = r.rollout_id
    WHERE v.verdict = 'correct' OR v.verdict IN {rejectable}
)
SELECT problem_id, is_correct, rollout_id, text, completion_tokens, mean_logprob, verdict,
       row_number() OVER side AS rank, count(*) OVER (PARTITION BY problem_id, is_correct) AS side_rows
FROM graded
WINDOW side AS (PARTITION BY problem_id, is_correct ORDER BY
    CASE WHEN is_correct THEN completion_tokens END,
    CASE WHEN NOT is_correct THEN verdict <> 'wrong' END,
    CASE WHEN NOT is_correct THEN mean_logprob END DESC,
    rollout_id)
QUALIFY rank <= {pairs_per_problem}
ORDER BY problem_id, is_correct DESC, rank
"""

# The correct rollouts of the problems whose bucket takes SFT examples, in the order they are taken.
SFT_CANDIDATES = """
SELECT r.problem_id, r.rollout_id, r.text
FROM rollouts r JOIN verdicts v ON v.rollout_id = r.rollout_id
WHERE v.verdict = 'correct' AND r.problem_id IN (SELECT problem_id FROM sft_problems)
ORDER BY r.problem_id, r.completion_tokens, r.rollout_id
"""


def _by_problem(batches: Iterator[pa.RecordBatch]) -> Iterator[tuple[str, list[dict]]]:
    rows = (row for batch in batches for row in batch.to_pylist())
    for pid, group in itertools.groupby(rows, key=lambda r: r["problem_id"]):
        yield pid, list(group)


def _ranges(problems: pa.Table, stats: pa.Table, rollouts, verdicts, total: int | None) -> Iterator[dict[str, pa.Table]]:
    """`rollouts`, `verdicts` and the per-problem `problems` and `stats` over ranges of problem ids
    (`in_key_ranges`): only one range is in memory at a time, the lookups a range needs (questions,
    buckets) included, so a pool of millions of problems is never one dict."""
    total = rollouts.num_rows if isinstance(rollouts, pa.Table) else total
    boundaries = key_boundaries(problems["problem_id"], total or 0)
    return in_key_ranges({"rollouts": rollouts, "verdicts": verdicts, "problems": problems, "stats": stats},
                         "problem_id", boundaries)


class _Pairing:
    """DPO pairs of one problem's ranked rollouts (PAIR_CANDIDATES): its i-th correct one (cycling) with
    its i-th rejectable one, i < `pairs_per_problem`."""

    def __init__(self, problems: pa.Table, config: PairsConfig):
        self.question = dict(zip(problems["problem_id"].to_pylist(), problems["question"].to_pylist()))
        self.query = PAIR_CANDIDATES.format(rejectable=str(REJECTABLE), pairs_per_problem=int(config.pairs_per_problem))

    def rows(self, pid: str, rows: list[dict]) -> Iterator[dict]:
        if pid not in self.question:
            return
        correct = [r for r in rows if r["is_correct"]]
        wrong = [r for r in rows if not r["is_correct"]]
        for i in range(len(wrong) if correct else 0):
            chosen, rejected = correct[i % correct[0]["side_rows"]], wrong[i]
            yield dict(
                pair_id=stable_hash("pair", chosen["rollout_id"], rejected["rollout_id"]), kind="solution",
                problem_id=pid, prompt=self.question[pid], prefix=None, chosen=chosen["text"], rejected=rejected["text"],
                chosen_rollout_id=chosen["rollout_id"], rejected_rollout_id=rejected["rollout_id"],
                chosen_score=-float(chosen["completion_tokens"]), rejected_score=rejected["mean_logprob"],
            )


class _Selection:
    """SFT examples of one problem's correct rollouts in the order they are taken (SFT_CANDIDATES): up to
    `sft_per_problem` distinct ones, for the problems in `sft_buckets` and the kept variants (`chosen`)."""

    def __init__(self, problems: pa.Table, stats: pa.Table, config: PairsConfig, variant_problem_ids: frozenset[str]):
        self.config = config
        self.question = dict(zip(problems["problem_id"].to_pylist(), problems["question"].to_pylist()))
        self.origin = dict(zip(problems["problem_id"].to_pylist(), problems["origin"].to_pylist()))
        self.bucket = dict(zip(stats["problem_id"].to_pylist(), stats["bucket"].to_pylist()))
        self.bucket.update({pid: "variant" for pid in variant_problem_ids if pid in self.question})  # this range's
        self.chosen = pa.table({"problem_id": pa.array(
            sorted(pid for pid, b in self.bucket.items() if b in (*config.sft_buckets, "variant")), pa.string())})

    def rows(self, pid: str, rows: list[dict]) -> Iterator[dict]:
        if pid not in self.question:
            return
        seen: set[str] = set()
        for r in rows:
            if len(seen) >= self.config.sft_per_problem:
                break  # the rest would be skipped: not normalized at all (most of a problem's correct rollouts)
            key = normalize_question(r["text"])
            if key in seen:
                continue
            seen.add(key)
            yield dict(
                example_id=stable_hash("sft", pid, key), problem_id=pid, rollout_id=r["rollout_id"],
                prompt=self.question[pid], completion=r["text"], bucket=self.bucket[pid],
                origin=self.origin.get(pid, "seed"),
            )


NO_STATS = pa.schema([("problem_id", pa.string()), ("bucket", pa.string())]).empty_table()


def solution_pairs(problems: pa.Table, rollouts: pa.Table | Iterable[pa.RecordBatch],
                   verdicts: pa.Table | Iterable[pa.RecordBatch], config: PairsConfig,
                   total: int | None = None) -> Iterator[pa.Table]:
    """DPO `pairs` in batches, by problem id: a problem with both correct and rejectable rollouts
    pairs its i-th correct one (cycling) with its i-th rejectable one, i < `pairs_per_problem`.
    `rollouts` (rollout_id, problem_id, text, completion_tokens, mean_logprob) and `verdicts`
    (rollout_id, verdict, and problem_id when `total` rows need more than one range) may be
    streams, read once."""
    return (rows for _, rows in _made(problems, NO_STATS, rollouts, verdicts, config, frozenset(), total, ("pairs",)))


def sft_selection(problems: pa.Table, stats: pa.Table, rollouts: pa.Table | Iterable[pa.RecordBatch],
                  verdicts: pa.Table | Iterable[pa.RecordBatch], config: PairsConfig,
                  variant_problem_ids: frozenset[str] = frozenset(), total: int | None = None) -> Iterator[pa.Table]:
    """`sft_examples` in batches, by problem id: up to `sft_per_problem` distinct correct rollouts,
    shortest first, of each problem in `sft_buckets` and of each kept variant. Inputs as `solution_pairs`."""
    return (rows for _, rows in _made(problems, stats, rollouts, verdicts, config, variant_problem_ids, total,
                                      ("sft_examples",)))


def pairs_and_sft(problems: pa.Table, stats: pa.Table, rollouts: pa.Table | Iterable[pa.RecordBatch],
                  verdicts: pa.Table | Iterable[pa.RecordBatch], config: PairsConfig,
                  variant_problem_ids: frozenset[str] = frozenset(), total: int | None = None
                  ) -> Iterator[tuple[str, pa.Table]]:
    """`solution_pairs` and `sft_selection` in one pass over `rollouts` and `verdicts` (streams read once):
    ("pairs", rows) and ("sft_examples", rows) as each range of problems gives them, each table's rows in
    the order the two functions give them."""
    return _made(problems, stats, rollouts, verdicts, config, variant_problem_ids, total, ("pairs", "sft_examples"))


def _made(problems: pa.Table, stats: pa.Table, rollouts, verdicts, config: PairsConfig,
          variant_problem_ids: frozenset[str], total: int | None, names: tuple[str, ...]
          ) -> Iterator[tuple[str, pa.Table]]:
    """The tables `names` ("pairs", "sft_examples") in one pass, a range of problems at a time."""
    out: dict[str, list[dict]] = {name: [] for name in names}
    table_schemas = {"pairs": schemas.PAIRS, "sft_examples": schemas.SFT_EXAMPLES}
    for ranged in _ranges(problems, stats, rollouts, verdicts, total):
        found = {}
        if "pairs" in names:
            pairing = _Pairing(ranged["problems"], config)
            found["pairs"] = (pairing.query, pairing.rows, {})
        if "sft_examples" in names:
            selection = _Selection(ranged["problems"], ranged["stats"], config, variant_problem_ids)
            found["sft_examples"] = (SFT_CANDIDATES, selection.rows, {"sft_problems": selection.chosen})
        for name, (query, make, small) in found.items():
            for pid, ranked in _by_problem(sql_batches(query, rollouts=ranged["rollouts"], verdicts=ranged["verdicts"],
                                                       **small)):
                out[name].extend(make(pid, ranked))
                while len(out[name]) >= OUT_ROWS:
                    yield name, pa.Table.from_pylist(out[name][:OUT_ROWS], schema=table_schemas[name])
                    del out[name][:OUT_ROWS]
    for name, rows in out.items():
        if rows:
            yield name, pa.Table.from_pylist(rows, schema=table_schemas[name])


def build_pairs(
    problems: pa.Table, stats: pa.Table, rollouts: pa.Table, verdicts: pa.Table, config: PairsConfig,
    variant_problem_ids: frozenset[str] = frozenset(),
) -> dict[str, pa.Table]:
    """`variant_problem_ids`: kept SvS variants among `problems`; their correct rollouts join the SFT set.
    Whole tables in and out; the pairs stage streams (`pairs_and_sft`)."""
    out: dict[str, list[pa.RecordBatch]] = {"pairs": [], "sft_examples": []}
    for name, rows in pairs_and_sft(problems, stats, rollouts, verdicts, config, variant_problem_ids):
        out[name] += rows.to_batches()
    return {"pairs": pa.Table.from_batches(out["pairs"], schemas.PAIRS),
            "sft_examples": pa.Table.from_batches(out["sft_examples"], schemas.SFT_EXAMPLES)}


def _subtree_outcome(node_id: str, children: dict[str, list[dict]], nodes: dict[str, dict], memo: dict) -> str | None:
    """'correct' when a correct terminal lies below (or at) the node, 'wrong' when only wrong or failed
    leaves do, None when nothing below was evaluated."""
    if node_id in memo:
        return memo[node_id]
    node = nodes[node_id]
    kids = children.get(node_id, [])
    if not kids:
        outcome = ("correct" if node["correct"] else "wrong") if node["visits"] else None
    else:
        below = {_subtree_outcome(k["node_id"], children, nodes, memo) for k in kids}
        outcome = "correct" if "correct" in below else ("wrong" if "wrong" in below else None)
    memo[node_id] = outcome
    return outcome


def questions_of(problems: pa.Table, nodes: pa.Table) -> dict[str, str]:
    """The questions of the problems the search trees are of (a few), not of the whole pool."""
    searched = problems.filter(pc.is_in(problems["problem_id"], pc.unique(nodes["problem_id"])))
    return dict(zip(searched["problem_id"].to_pylist(), searched["question"].to_pylist()))


def build_step_pairs(nodes: pa.Table, questions: dict[str, str], config: PairsConfig) -> pa.Table:
    """rStar-Math PPM pairs: at each node with children leading to a correct answer AND children leading
    only to wrong ones, the top-2 correct-leading children by Q against the bottom-2 wrong-leading ones,
    each pair kept only if its Q margin and the edit distance of its two steps pass the thresholds."""
    import difflib

    from evoforge.models.prompts import step_prefix

    rows = nodes.to_pylist()
    by_id = {n["node_id"]: n for n in rows}
    children: dict[str, list[dict]] = {}
    for n in rows:
        if n["parent_id"]:
            children.setdefault(n["parent_id"], []).append(n)
    memo: dict = {}
    out = []
    for parent_id, kids in sorted(children.items()):
        good = sorted((k for k in kids if _subtree_outcome(k["node_id"], children, by_id, memo) == "correct"),
                      key=lambda k: (-k["q_value"], k["node_id"]))[:2]
        bad = sorted((k for k in kids if _subtree_outcome(k["node_id"], children, by_id, memo) == "wrong"),
                     key=lambda k: (k["q_value"], k["node_id"]))[:2]
        if not good or not bad:
            continue
        path, node = [], by_id[parent_id]
        while node["parent_id"]:
            path.append((node["step_text"], node["exec_output"] or ""))
            node = by_id[node["parent_id"]]
        prefix = step_prefix(path[::-1])
        for chosen in good:
            for rejected in bad:
                margin = chosen["q_value"] - rejected["q_value"]
                distance = 1 - difflib.SequenceMatcher(None, chosen["step_text"], rejected["step_text"]).ratio()
                if margin < config.step_min_q_margin or distance < config.step_min_edit_distance:
                    continue
                out.append(dict(
                    pair_id=stable_hash("step-pair", chosen["node_id"], rejected["node_id"]), kind="step",
                    problem_id=chosen["problem_id"], prompt=questions.get(chosen["problem_id"], ""), prefix=prefix,
                    chosen=chosen["step_text"], rejected=rejected["step_text"], chosen_rollout_id=chosen["node_id"],
                    rejected_rollout_id=rejected["node_id"], chosen_score=chosen["q_value"],
                    rejected_score=rejected["q_value"],
                ))
    return pa.Table.from_pylist(out, schema=schemas.PAIRS)


def summarize(tables: dict[str, pa.Table]) -> list[str]:
    return [summary.line("pairs by kind", summary.counts(summary.column(tables, "pairs", "kind"))),
            f"- **sft examples**: {summary.rows(tables, 'sft_examples')}"]
