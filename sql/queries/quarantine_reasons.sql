-- Quarantined input rows by file and reason.
SELECT source_file, reason, count(*) AS rows, any_value(detail) AS example
FROM quarantine
GROUP BY ALL
ORDER BY source_file, rows DESC;
