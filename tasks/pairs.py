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

from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from evoforge.data import schemas
from evoforge.data.ids import normalize_question, stable_hash, stable_hash_of_rows
from evoforge.data.lake import in_key_ranges, key_boundaries
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


def solution_pairs_of_range(graded: pa.Table, pairs_per_problem: int) -> pa.Table:
    """A range's solution pairs, without their texts: each side of a problem ranked (correct rollouts shortest
    first; rejectable ones wrong before no_answer, most confident first; ties by rollout id; nulls last, as
    DuckDB's window query ordered them), and a problem's i-th rejectable rollout (i < `pairs_per_problem`)
    paired with its i-th correct one, cycling through its correct ones; by problem, then rank. `graded` is the
    range's rollouts with their verdicts and row numbers (`_graded`): the texts of the rows paired are taken by
    row number afterwards. The pair id is `stable_hash("pair", chosen, rejected)`. Ranked by Arrow's sort and
    NumPy over the groups (DuckDB's window query was ~3x the CPU)."""
    columns = ["problem_id", "rollout_id", "row", "completion_tokens", "mean_logprob", "verdict"]
    verdict = graded["verdict"]
    correct = _ranked_by_problem(graded.select(columns).filter(pc.equal(verdict, "correct")),
                                 [("completion_tokens", "ascending", "at_end")])
    rejectable = graded.select(columns).filter(pc.is_in(verdict, value_set=pa.array(REJECTABLE, pa.string())))
    rejectable = rejectable.append_column("not_wrong", pc.not_equal(rejectable["verdict"], "wrong"))
    # DuckDB orders NaN above every number: first, descending; Arrow places it with the nulls
    rejectable = rejectable.append_column("nan_first", pc.is_nan(rejectable["mean_logprob"]))
    rejectable = _ranked_by_problem(rejectable, [("not_wrong", "ascending", "at_end"), ("nan_first", "descending", "at_end"),
                                                 ("mean_logprob", "descending", "at_end")])
    rejected = rejectable.filter(pc.less_equal(rejectable["rank"], pairs_per_problem))
    # each rejected rollout's problem among the correct side's groups (sorted, one per problem)
    firsts = np.flatnonzero(correct["rank"].to_numpy() == 1)
    group = pc.index_in(rejected["problem_id"], value_set=correct["problem_id"].take(pa.array(firsts, pa.int64())))
    rejected, group = rejected.filter(pc.is_valid(group)), group.drop_null().to_numpy()
    sizes = correct["side_rows"].to_numpy()[firsts][group]
    chosen = correct.take(pa.array(firsts[group] + (rejected["rank"].to_numpy() - 1) % sizes, pa.int64()))
    return pa.table({
        "pair_id": stable_hash_of_rows("pair", chosen["rollout_id"], rejected["rollout_id"]),
        "kind": pa.array(["solution"] * rejected.num_rows, pa.string()), "problem_id": rejected["problem_id"],
        "prefix": pa.nulls(rejected.num_rows, pa.string()), "chosen_row": chosen["row"], "rejected_row": rejected["row"],
        "chosen_rollout_id": chosen["rollout_id"], "rejected_rollout_id": rejected["rollout_id"],
        "chosen_score": pc.negate(pc.cast(chosen["completion_tokens"], pa.float64())),
        "rejected_score": pc.cast(rejected["mean_logprob"], pa.float64())})


def _ranked_by_problem(side: pa.Table, keys: list[tuple[str, str, str]]) -> pa.Table:
    """`side` sorted by problem, then `keys`, then rollout id, with each row's `rank` in its problem (from 1) and
    its problem's `side_rows`."""
    side = side.take(pc.sort_indices(side, sort_keys=[("problem_id", "ascending", "at_end"), *keys,
                                                      ("rollout_id", "ascending", "at_end")]))
    problem_ids = schemas.one_array(side["problem_id"])
    starts = np.ones(side.num_rows, dtype=bool)
    if side.num_rows > 1:
        starts[1:] = pc.not_equal(problem_ids.slice(1), problem_ids.slice(0, side.num_rows - 1)).to_numpy(
            zero_copy_only=False)
    rows = np.arange(side.num_rows)
    group = np.cumsum(starts) - 1
    rank = rows - np.flatnonzero(starts)[group] + 1
    return side.append_column("rank", pa.array(rank, pa.int64())).append_column(
        "side_rows", pa.array(np.bincount(group)[group] if side.num_rows else [], pa.int64()))


def _graded(rollouts: pa.Table, verdicts: pa.Table) -> pa.Table:
    """A range's rollouts with their verdict (null: none) and their row number, the verdicts joined by Arrow's
    hash of the ids (a rollout's one verdict: the verify stage writes one)."""
    found = pc.index_in(rollouts["rollout_id"], value_set=schemas.one_array(verdicts["rollout_id"]))
    return rollouts.append_column("verdict", verdicts["verdict"].take(found)).append_column(
        "row", pa.array(np.arange(rollouts.num_rows, dtype=np.int64)))


def sft_candidates(graded: pa.Table, sft_problems: pa.Array, per_problem: int) -> pa.Table:
    """The correct rollouts of `sft_problems` in the order they are taken (by problem, shortest first, ties by
    rollout id; `completion_tokens` null last), as `_Selection` takes them: a problem's first `per_problem`, keyed
    (`ascii_key`, `normalize_question`'s for an ASCII text; null for another text) with their `example_id`; where
    those are not distinct ASCII keys (a repeat, a text that is not ASCII), the problem is `python_key` and comes
    with all its candidates, for Python to key and walk. The ranking and the walk's choice are Arrow's over the
    range's columns; Python sees only the first candidates' texts (it was DuckDB's query, at ~2x the CPU)."""
    sft_problems = schemas.one_array(sft_problems)
    correct = _ranked_by_problem(graded.filter(pc.and_(pc.equal(graded["verdict"], "correct"),
                                                       pc.is_in(graded["problem_id"], value_set=sft_problems))),
                                 [("completion_tokens", "ascending", "at_end")])  # as DuckDB orders: nulls last
    problem_ids, place = schemas.one_array(correct["problem_id"]), correct["rank"].to_numpy()
    first = place <= per_problem
    firsts = correct.filter(pa.array(first))
    # an ASCII text's key: `normalize_question`'s (NFKC leaves ASCII as it is; `str.split()` splits an ASCII text
    # where `\s+` does), in Python: Arrow's replaces of the whitespace cost ~3x more over these texts
    keys = [" ".join(text.split()).lower() if text.isascii() else None for text in firsts["text"].to_pylist()]
    key = pa.array(keys, pa.string())
    # a problem is walked in Python when a first candidate has no ASCII key, or two share one
    keyed = pa.table({"problem_id": firsts["problem_id"], "key": key})
    shared = keyed.group_by(["problem_id", "key"]).aggregate([([], "count_all")])
    walked = pc.unique(pa.chunked_array([keyed["problem_id"].filter(pc.is_null(key)),
                                         shared["problem_id"].filter(pc.greater(shared["count_all"], 1))], pa.string()))
    later = ~first & pc.is_in(problem_ids, value_set=walked).to_numpy(zero_copy_only=False)
    taken = pa.concat_tables([
        firsts.select(["problem_id", "rollout_id", "text"]).append_column("ascii_key", key).append_column(
            "place", pa.array(place[first])),
        correct.filter(pa.array(later)).select(["problem_id", "rollout_id", "text"]).append_column(
            "ascii_key", pa.nulls(int(later.sum()), pa.string())).append_column("place", pa.array(place[later]))])
    example_ids = stable_hash_of_rows("sft", firsts["problem_id"], key)  # null where the key is
    taken = taken.append_column("example_id", pa.concat_arrays([example_ids, pa.nulls(int(later.sum()), pa.string())]))
    taken = taken.take(pc.sort_indices(taken, sort_keys=[("problem_id", "ascending"), ("place", "ascending")]))
    return taken.drop_columns(["place"]).append_column("python_key", pc.is_in(taken["problem_id"], value_set=walked))


def _ranges(problems: pa.Table | Iterable[pa.RecordBatch], stats: pa.Table, rollouts, verdicts,
            variant_problem_ids: frozenset[str], total: int | None) -> Iterator[dict[str, pa.Table]]:
    """`rollouts`, `verdicts` and the per-problem `problems` and `stats` over ranges of problem ids
    (`in_key_ranges`): only one range is in memory at a time, the lookups a range needs (questions,
    buckets) included, so a pool of millions of problems is never held. A streamed pool is split
    where the problems with rollouts are (the round's stats and its kept variants): the pool is read once."""
    total = rollouts.num_rows if isinstance(rollouts, pa.Table) else total
    boundaries = (key_boundaries(problems["problem_id"], total or 0) if isinstance(problems, pa.Table) else
                  pairs_boundaries(stats, variant_problem_ids, total or 0))
    return in_key_ranges({"rollouts": rollouts, "verdicts": verdicts, "problems": problems, "stats": stats},
                         "problem_id", boundaries)


class _RangeProblems:
    """A range's problems as columns to take from (question, origin, bucket by problem id), never a dict of
    the pool: a problem listed twice keeps its last row (a later variant over an earlier one)."""

    def __init__(self, problems: pa.Table, stats: pa.Table, variant_problem_ids: frozenset[str]):
        self.problems = problems.take(pa.array(range(problems.num_rows - 1, -1, -1), pa.int64()))
        self.stats = stats
        self.variants = pa.array(sorted(variant_problem_ids), pa.string())

    def rows_of(self, problem_ids: pa.Array, column: str) -> pa.Array:
        return self.problems[column].take(pc.index_in(problem_ids, value_set=self.problems["problem_id"]))

    def known(self, problem_ids: pa.Array) -> pa.Array:
        return pc.is_in(problem_ids, value_set=self.problems["problem_id"])

    def buckets(self, problem_ids: pa.Array) -> pa.Array:
        """The problem's bucket this round, or 'variant' for a kept variant of the range."""
        stats = self.stats["bucket"].take(pc.index_in(problem_ids, value_set=self.stats["problem_id"]))
        return pc.if_else(pc.is_in(problem_ids, value_set=self.variants), "variant", stats)

    def sft_problems(self, config: PairsConfig) -> pa.Table:
        """The range's problems whose bucket takes SFT examples, and its kept variants."""
        ids = pa.chunked_array([self.stats["problem_id"], self.variants], pa.string())
        ids = pc.unique(ids.filter(self.known(ids)))
        taken = pc.is_in(self.buckets(ids), value_set=pa.array([*config.sft_buckets, "variant"], pa.string()))
        return pa.table({"problem_id": ids.filter(taken)})


def _pairs_table(batch: pa.Table, problems: _RangeProblems) -> pa.Table:
    """`solution_pairs_of_range`'s rows with their texts and prompt: those of a problem outside the pool are dropped."""
    batch = batch.filter(problems.known(batch["problem_id"]))
    columns = {name: batch[name] for name in batch.schema.names}
    columns["prompt"] = problems.rows_of(batch["problem_id"], "question")
    return pa.table([columns[name] for name in schemas.PAIRS.names], schema=schemas.PAIRS)


class _Selection:
    """`sft_candidates` -> `sft_examples`: a problem whose first candidates were keyed there is taken as it comes;
    one with a repeat or a text that is not ASCII is walked here (keyed by `normalize_question`, up to
    `sft_per_problem` distinct), across the candidates' batches."""

    def __init__(self, problems: _RangeProblems, config: PairsConfig):
        self.problems, self.config = problems, config
        self.problem_id: str | None = None
        self.seen: set[str] = set()

    def examples(self, batch: pa.RecordBatch) -> pa.Table:
        batch = batch.filter(self.problems.known(batch["problem_id"]))
        example_ids = batch["example_id"].to_pylist()
        keep = list(range(batch.num_rows))
        if pc.any(batch["python_key"]).as_py():
            keep = []
            for i, (pid, walk) in enumerate(zip(batch["problem_id"].to_pylist(), batch["python_key"].to_pylist())):
                if not walk:
                    keep.append(i)
                    continue
                if pid != self.problem_id:
                    self.problem_id, self.seen = pid, set()
                if len(self.seen) >= self.config.sft_per_problem:
                    continue  # the rest would be skipped: not normalized at all
                key = batch["ascii_key"][i].as_py()
                key = key if key is not None else normalize_question(batch["text"][i].as_py())
                if key in self.seen:
                    continue
                self.seen.add(key)
                example_ids[i] = stable_hash("sft", pid, key)
                keep.append(i)
        taken = batch.take(pa.array(keep, pa.int64()))
        ids = taken["problem_id"]
        return pa.table({
            "example_id": pa.array([example_ids[i] for i in keep], pa.string()), "problem_id": ids,
            "rollout_id": taken["rollout_id"], "prompt": self.problems.rows_of(ids, "question"),
            "completion": taken["text"], "bucket": self.problems.buckets(ids),
            "origin": pc.fill_null(self.problems.rows_of(ids, "origin"), "seed"),
        }, schema=schemas.SFT_EXAMPLES)


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


def pairs_and_sft(problems: pa.Table | Iterable[pa.RecordBatch], stats: pa.Table, rollouts: pa.Table | Iterable[pa.RecordBatch],
                  verdicts: pa.Table | Iterable[pa.RecordBatch], config: PairsConfig,
                  variant_problem_ids: frozenset[str] = frozenset(), total: int | None = None
                  ) -> Iterator[tuple[str, pa.Table]]:
    """`solution_pairs` and `sft_selection` in one pass over `problems`, `rollouts` and `verdicts` (streams
    read once; a streamed pool is split at the ids of `stats` and `variant_problem_ids`):
    ("pairs", rows) and ("sft_examples", rows) as each range of problems gives them, each table's rows in
    the order the two functions give them."""
    return _made(problems, stats, rollouts, verdicts, config, variant_problem_ids, total, ("pairs", "sft_examples"))


def _made(problems: pa.Table | Iterable[pa.RecordBatch], stats: pa.Table, rollouts, verdicts, config: PairsConfig,
          variant_problem_ids: frozenset[str], total: int | None, names: tuple[str, ...]
          ) -> Iterator[tuple[str, pa.Table]]:
    """The tables `names` ("pairs", "sft_examples") in one pass, a range of problems at a time (`made_of_range`):
    DuckDB pairs each range's rows, Arrow ranks its SFT candidates, the range's problems give them their prompts,
    buckets and origins."""
    for ranged in _ranges(problems, stats, rollouts, verdicts, variant_problem_ids, total):
        yield from made_of_range(config, variant_problem_ids, names, ranged)


def pairs_boundaries(stats: pa.Table, variant_problem_ids: frozenset[str], total: int) -> list[str]:
    """Where pairs splits a streamed pool and `total` rollouts into ranges of problems: at the ids of the
    problems with rollouts (the round's stats, its kept variants), as `pairs_and_sft` does."""
    # the stats' own chunks: a ChunkedArray inside the list would be converted through 1.25M Python strings
    return key_boundaries(pa.chunked_array([*stats["problem_id"].chunks, pa.array(sorted(variant_problem_ids), pa.string())],
                                           pa.string()), total)


def made_of_range(config: PairsConfig, variant_problem_ids: frozenset[str], names: tuple[str, ...],
                  ranged: dict[str, pa.Table], searched: pa.Array | None = None) -> Iterator[tuple[str, pa.Table]]:
    """The tables `names` of one range's `problems` (and `variants`: kept variants, after the pool's),
    `stats`, `rollouts` and `verdicts`: what the stage does per range, in its own process or in a worker of
    a spread one (data/spread.py). `searched`: the problems of the round's search trees, whose questions the
    range gives as ("searched_questions", rows) for the step pairs."""
    problems = ranged["problems"]
    if searched is not None and len(searched):
        found = questions_of(problems, pa.table({"problem_id": searched}))
        yield "searched_questions", pa.table({"problem_id": pa.array(list(found), pa.string()),
                                              "question": pa.array(list(found.values()), pa.string())})
    if "variants" in ranged:
        problems = pa.concat_tables([problems, ranged["variants"].cast(problems.schema)])
    in_range = _RangeProblems(problems, ranged["stats"], variant_problem_ids)
    graded = _graded(ranged["rollouts"], ranged["verdicts"])
    if "pairs" in names:
        texts = graded["text"]
        paired = solution_pairs_of_range(graded.drop_columns(["text"]), int(config.pairs_per_problem))
        paired = paired.append_column("chosen", texts.take(paired["chosen_row"])).append_column(
            "rejected", texts.take(paired["rejected_row"]))
        if (table := _pairs_table(paired, in_range)).num_rows:
            yield "pairs", table
    if "sft_examples" in names:
        selection = _Selection(in_range, config)
        candidates = sft_candidates(graded, in_range.sft_problems(config)["problem_id"], int(config.sft_per_problem))
        for batch in candidates.to_batches():
            if (table := selection.examples(batch)).num_rows:
                yield "sft_examples", table


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


def questions_of(problems: pa.Table | pa.RecordBatch, nodes: pa.Table) -> dict[str, str]:
    """The questions of the problems the search trees are of (a few), not of the whole pool (or batch)."""
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
