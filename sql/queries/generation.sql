-- What the generate stage sampled per round: rollouts, completion tokens, and the share that hit max_tokens.
SELECT round,
       count(*) AS rollouts,
       coalesce(sum(completion_tokens), 0) AS tokens,
       coalesce(avg((finish_reason = 'length')::INT), 0.0) AS length_capped_share
FROM rollouts
WHERE stage = 'generate'
GROUP BY round
ORDER BY round;
