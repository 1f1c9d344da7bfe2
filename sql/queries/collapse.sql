-- Collapse signals per model, on the round's pool (the samples the policy drew in generate) and on each held-out
-- set: entropy (mean negative log-probability of the sampled tokens), the distinct-answer rate (distinct final
-- answers / samples, per problem, averaged) and pass@n for the largest n drawn (share of problems with a correct
-- sample). Collapse shows as all three falling together.
-- The pool's signals per problem are filter's (problem_stats: graded samples, correct ones, distinct answers, mean
-- log-probability), counted as filter groups the round: a 10M-rollout round's verdicts are not read again (at 10M,
-- counting distinct answers over them here was two thirds of the named queries' time, and spilled 0.6 GB).
-- A round filter has not counted so (not filtered yet, or filtered before problem_stats held the two columns) is
-- counted here from its samples and verdicts, each side per problem before they meet (never joined row by row).
WITH counted AS (  -- the problems of rounds whose filter counted the signals
    SELECT run, round, problem_id, n, correct, distinct_answers, mean_logprob
    FROM problem_stats
    WHERE stage = 'filter' AND distinct_answers IS NOT NULL
),
uncounted_rounds AS (  -- the verify stages' rounds (from their files' paths: no row is read) not counted so
    SELECT DISTINCT run, round FROM verdicts WHERE stage = 'verify'
    EXCEPT
    SELECT DISTINCT run, round FROM counted
),
round_models AS (  -- the policy that sampled a round's pool: the model of its generate stage's latest run
    SELECT run, round, model_id FROM stage_runs
    WHERE stage = 'generate' AND status IN ('completed', 'skipped')
    QUALIFY row_number() OVER (PARTITION BY run, round ORDER BY finished_at DESC) = 1
),
uncounted_samples AS (
    SELECT run, round, model_id, problem_id, avg(mean_logprob) AS mean_logprob
    FROM rollouts
    WHERE stage = 'generate' AND (run, round) IN (SELECT (run, round) FROM uncounted_rounds)
    GROUP BY ALL
),
-- no_reference is left out in the counts, not in WHERE: with that filter in WHERE, DuckDB hashed every verdict to
-- meet an empty round list (0.1 s per million verdicts), where now it reads none when every round is counted
uncounted_answers AS (
    SELECT run, round, problem_id, count(*) FILTER (verdict <> 'no_reference') AS n,
           count(*) FILTER (verdict = 'correct') AS correct,
           count(DISTINCT extracted_answer) FILTER (verdict <> 'no_reference') AS distinct_answers
    FROM verdicts
    WHERE stage = 'verify' AND (run, round) IN (SELECT (run, round) FROM uncounted_rounds)
    GROUP BY ALL
    HAVING n > 0  -- a problem without a reference answer is left out
),
pool_problems AS (
    SELECT c.round, m.model_id, c.n, c.correct, c.distinct_answers, c.mean_logprob
    FROM counted c LEFT JOIN round_models m USING (run, round)
    UNION ALL
    SELECT s.round, s.model_id, a.n, a.correct, a.distinct_answers, s.mean_logprob
    FROM uncounted_samples s JOIN uncounted_answers a USING (run, round, problem_id)
),
held_out AS (
    SELECT * FROM eval_results WHERE search = 'none'  -- the samples themselves, not a PPM's picks among them
    QUALIFY dense_rank() OVER (PARTITION BY model_id, eval_set ORDER BY round DESC) = 1
),
model_rounds AS (SELECT DISTINCT model_id, model_round FROM eval_results)
SELECT m.model_round, 'pool' AS scope, p.round, count(*) AS problems, max(p.n) AS n,
       -sum(p.mean_logprob * p.n) / sum(p.n) AS entropy,
       avg(p.distinct_answers / p.n) AS distinct_answer_rate,
       avg(CASE WHEN p.correct > 0 THEN 1.0 ELSE 0.0 END) AS pass_at_n,
       p.model_id
FROM pool_problems p LEFT JOIN model_rounds m USING (model_id)
GROUP BY m.model_round, p.round, p.model_id
UNION ALL
SELECT model_round, eval_set AS scope, NULL AS round, count(*) AS problems, max(n) AS n,
       -sum(mean_logprob * n) / sum(n) AS entropy,
       avg(distinct_answers / n) AS distinct_answer_rate,
       avg(CASE WHEN correct > 0 THEN 1.0 ELSE 0.0 END) AS pass_at_n,
       model_id
FROM held_out WHERE n > 0
GROUP BY model_round, eval_set, model_id
ORDER BY model_round NULLS FIRST, scope;
