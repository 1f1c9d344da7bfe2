-- Problems per difficulty bucket and round.
SELECT round, bucket, count(*) AS problems, round(avg(accuracy), 3) AS mean_accuracy
FROM problem_stats
GROUP BY round, bucket
ORDER BY round, list_position(['unsolved', 'underperforming', 'learnable', 'solved'], bucket);
