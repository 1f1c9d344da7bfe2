-- Accuracy and buckets per source dataset and round.
SELECT s.round, p.source, count(*) AS problems, round(avg(s.accuracy), 3) AS mean_accuracy,
       count(*) FILTER (WHERE s.bucket = 'underperforming') AS underperforming,
       count(*) FILTER (WHERE s.bucket = 'solved') AS solved
FROM problem_stats s JOIN problems p USING (problem_id)
GROUP BY ALL
ORDER BY s.round, p.source;
