-- Every stage execution of the run, oldest first: `evoforge status`.
SELECT round, stage, status, rows_in, rows_out, rows_quarantined,
       strftime(started_at, '%Y-%m-%d %H:%M:%S') AS started,
       round(epoch(finished_at) - epoch(started_at), 1) AS seconds,
       left(error, 80) AS error
FROM stage_runs
ORDER BY started_at;
