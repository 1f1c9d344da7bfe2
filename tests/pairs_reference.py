"""The pairs stage's two DuckDB queries as they were before its SFT selection moved to Arrow and Python and its
pairs query stopped joining the texts (tasks/pairs.py): the reference `made_of_range` is tested against, nulls
(which the Python reference cannot order) included."""
from __future__ import annotations

import pyarrow as pa

from evoforge.data.lake import sql_batches

OLD_PAIRS_OF_RANGE = """
WITH graded AS (
    SELECT r.rollout_id, r.problem_id, r.completion_tokens, r.mean_logprob, v.verdict,
           v.verdict = 'correct' AS is_correct
    FROM rollouts r JOIN verdicts v ON v.rollout_id = r.rollout_id
    WHERE v.verdict = 'correct' OR v.verdict IN {rejectable}
), ranked AS (
    SELECT problem_id, is_correct, rollout_id, completion_tokens, mean_logprob,
           row_number() OVER side AS rank, count(*) OVER (PARTITION BY problem_id, is_correct) AS side_rows
    FROM graded
    WINDOW side AS (PARTITION BY problem_id, is_correct ORDER BY
        CASE WHEN is_correct THEN completion_tokens END,
        CASE WHEN NOT is_correct THEN verdict <> 'wrong' END,
        CASE WHEN NOT is_correct THEN mean_logprob END DESC,
        rollout_id)
    QUALIFY rank <= {pairs_per_problem}
), paired AS (
    SELECT w.problem_id, w.rank, c.rollout_id AS chosen_rollout_id, w.rollout_id AS rejected_rollout_id,
           -(c.completion_tokens::DOUBLE) AS chosen_score, w.mean_logprob::DOUBLE AS rejected_score
    FROM ranked w JOIN ranked c
      ON c.problem_id = w.problem_id AND c.is_correct AND NOT w.is_correct AND c.rank = (w.rank - 1) % c.side_rows + 1
)
-- the texts join the few rows paired, not the ranking of every rollout
SELECT left(sha256('pair' || chr(31) || chosen_rollout_id || chr(31) || rejected_rollout_id), 16) AS pair_id,
       'solution' AS kind, p.problem_id, NULL::VARCHAR AS prefix, c.text AS chosen, w.text AS rejected,
       chosen_rollout_id, rejected_rollout_id, chosen_score, rejected_score
FROM paired p JOIN rollouts c ON c.rollout_id = chosen_rollout_id JOIN rollouts w ON w.rollout_id = rejected_rollout_id
ORDER BY p.problem_id, p.rank
"""


def _spaced(text: str, folds: int = 4) -> str:
    """SQL for `text` with each ASCII whitespace character Python's `\\s` matches (tab to carriage return, the
    separators 0x1c-0x1f) made a space, and runs of up to 2**`folds` spaces made one."""
    for code in (9, 10, 11, 12, 13, 28, 29, 30, 31):
        text = f"replace({text}, chr({code}), ' ')"
    for _ in range(folds):  # each pass halves a run
        text = f"replace({text}, '  ', ' ')"
    return text


SPACED = _spaced("r.text")


# The correct rollouts of the problems whose bucket takes SFT examples, in the order they are taken (shortest
# first, ties by rollout id): a problem's first `sft_per_problem` distinct ones. Distinct is
# `normalize_question`'s key, which DuckDB computes exactly for an ASCII text (NFKC leaves it as it is; the
# whitespace is Python's `\s` over ASCII), and only for a problem's first `sft_per_problem` candidates: where
# those are distinct ASCII texts they are the selection; a problem where they are not (a repeat, a text that is
# not ASCII) comes with all its candidates (`python_key`) for Python to key and walk. An ASCII text is one whose bytes
# are its characters; its whitespace becomes one space through `SPACED` (plain replaces: a third of what one
# regexp_replace costs), and through the regex only where a run of spaces is longer than SPACED folds.
# `spaced` has a CTE of its own, joined back: used twice in one SELECT, DuckDB expanded it into each use and
# ran the replaces again (a third of the query's time). The first candidates carry their text to the output;
# only a walked problem's later ones are joined to theirs.
OLD_SFT_OF_RANGE = r"""
WITH candidates AS (
    SELECT r.problem_id, r.rollout_id,
           row_number() OVER (PARTITION BY r.problem_id ORDER BY r.completion_tokens, r.rollout_id) AS place
    FROM rollouts r JOIN verdicts v ON v.rollout_id = r.rollout_id
    WHERE v.verdict = 'correct' AND r.problem_id IN (SELECT problem_id FROM sft_problems)
), ascii_firsts AS (
    SELECT c.rollout_id, {spaced} AS spaced
    FROM candidates c JOIN rollouts r ON r.rollout_id = c.rollout_id
    WHERE c.place <= {sft_per_problem} AND strlen(r.text) = length(r.text)
), firsts AS (
    SELECT c.rollout_id, c.problem_id, c.place, r.text,
           lower(trim(CASE WHEN contains(a.spaced, '  ') THEN regexp_replace(r.text, '[\t-\r\x1c-\x20]+', ' ', 'g')
                           ELSE a.spaced END)) AS ascii_key
    FROM candidates c JOIN rollouts r ON r.rollout_id = c.rollout_id LEFT JOIN ascii_firsts a ON a.rollout_id = c.rollout_id
    WHERE c.place <= {sft_per_problem}
), walked AS (
    SELECT problem_id FROM firsts GROUP BY problem_id
    HAVING count(ascii_key) < count(*) OR count(DISTINCT ascii_key) < count(*)
), taken AS (
    SELECT problem_id, rollout_id, text, ascii_key, place FROM firsts
    UNION ALL
    SELECT c.problem_id, c.rollout_id, r.text, NULL AS ascii_key, c.place
    FROM candidates c JOIN walked w ON w.problem_id = c.problem_id JOIN rollouts r ON r.rollout_id = c.rollout_id
    WHERE c.place > {sft_per_problem}
)
SELECT t.problem_id, t.rollout_id, t.text, t.ascii_key, w.problem_id IS NOT NULL AS python_key,
       left(sha256('sft' || chr(31) || t.problem_id || chr(31) || t.ascii_key), 16) AS example_id
FROM taken t LEFT JOIN walked w ON w.problem_id = t.problem_id
ORDER BY t.problem_id, t.place
"""


def old_pairs(rollouts: pa.Table, verdicts: pa.Table, rejectable: tuple[str, ...], pairs_per_problem: int) -> pa.Table:
    query = OLD_PAIRS_OF_RANGE.format(rejectable=str(rejectable), pairs_per_problem=pairs_per_problem)
    return pa.Table.from_batches(list(sql_batches(query, rollouts=rollouts, verdicts=verdicts)))


def old_sft_candidates(rollouts: pa.Table, verdicts: pa.Table, sft_problems: pa.Table, sft_per_problem: int) -> pa.Table:
    query = OLD_SFT_OF_RANGE.format(sft_per_problem=sft_per_problem, spaced=SPACED)
    return pa.Table.from_batches(list(sql_batches(query, rollouts=rollouts, verdicts=verdicts, sft_problems=sft_problems)))
