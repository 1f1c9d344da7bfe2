-- Verdicts by round, with grading time.
SELECT round, verdict, count(*) AS rollouts, round(sum(seconds), 2) AS seconds, round(max(seconds), 3) AS max_seconds
FROM verdicts
GROUP BY ALL
ORDER BY round, rollouts DESC;
