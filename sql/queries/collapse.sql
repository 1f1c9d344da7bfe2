-- Collapse signals per model, on the round's pool (the samples the policy drew in generate) and on each held-out
-- set: entropy (mean negative log-probability of the sampled tokens), the distinct-answer rate (distinct final
-- answers / samples, per problem, averaged) and pass@n for the largest n drawn (share of problems with a correct
-- sample). Collapse shows as all three falling together.
-- The pool's signals are counted per problem on each side before the two meet: the verdicts carry their
-- problem, so a round's millions of rollouts are never joined row by row (memory grows with the problems).
WITH pool_samples AS (
    SELECT round, model_id, problem_id, count(*) AS n, sum(-mean_logprob) AS minus_logprob
    FROM rollouts
    WHERE stage = 'generate'
    GROUP BY ALL
),
pool_answers AS (
    SELECT round, problem_id, count(*) FILTER (verdict = 'correct') AS correct,
           count(DISTINCT extracted_answer) AS distinct_answers
    FROM verdicts
    WHERE stage = 'verify' AND verdict <> 'no_reference'  -- a problem without a reference answer is left out
    GROUP BY ALL
),
pool_problems AS (
    SELECT s.round, s.model_id, s.problem_id, s.n, a.correct, a.distinct_answers, s.minus_logprob
    FROM pool_samples s JOIN pool_answers a USING (round, problem_id)
),
held_out AS (
    SELECT * FROM eval_results WHERE search = 'none'  -- the samples themselves, not a PPM's picks among them
    QUALIFY dense_rank() OVER (PARTITION BY model_id, eval_set ORDER BY round DESC) = 1
),
model_rounds AS (SELECT DISTINCT model_id, model_round FROM eval_results)
SELECT m.model_round, 'pool' AS scope, p.round, count(*) AS problems, max(p.n) AS n,
       sum(p.minus_logprob) / sum(p.n) AS entropy,
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
