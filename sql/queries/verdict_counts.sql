-- Verdicts by round and by the stage that graded them (verify: the round's rollouts; synthesize: the
-- solutions of its variants), with grading time.
SELECT round, stage, verdict, count(*) AS rollouts, round(sum(seconds), 2) AS seconds, round(max(seconds), 3) AS max_seconds
FROM verdicts
GROUP BY ALL
ORDER BY round, stage DESC, rollouts DESC;
