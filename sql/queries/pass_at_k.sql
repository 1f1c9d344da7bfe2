-- Mean pass@k over the pool, by round (k with fewer samples than n are absent from pass_at_k).
SELECT round, k, avg(value) AS pass_at_k, count(*) AS problems
FROM (SELECT round, unnest(map_keys(pass_at_k)) AS k, unnest(map_values(pass_at_k)) AS value FROM problem_stats)
GROUP BY ALL
ORDER BY round, k;
