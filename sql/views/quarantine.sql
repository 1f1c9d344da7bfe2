-- quarantine: every input row that did not become a problem, with the reason. Nothing is dropped silently:
-- for one ingest, rows read = problems + quarantine rows.
CREATE OR REPLACE VIEW quarantine AS
SELECT
    source_file,
    source_row,         -- 1-based line (JSONL) or row (Parquet, datasets)
    field,              -- the field at fault, NULL when the row itself could not be read
    reason,             -- not_utf8 | not_json | not_object | missing_field | empty_field | unparseable_answer | too_long | duplicate | contaminated
    detail,             -- a human sentence: what exactly was wrong
    raw,                -- the row as read, first 500 characters
    matched_set,        -- contaminated: the evaluation set that shares an 8-word run
    matched_id,         -- contaminated: that set's problem_id; duplicate: the problem_id already in the run
    round,
    regexp_extract(filename, '/round=[0-9]+/([^/]+)/[^/]+/[^/]+$', 1) AS stage,  -- the stage that wrote the row (from the lake path)
    regexp_extract(filename, '/([^/]+)/round=[0-9]+/[^/]+/[^/]+/[^/]+$', 1) AS run  -- the run (from the lake path; `evoforge sql --all-runs` reads them all)
FROM read_parquet(${parts:quarantine}, hive_partitioning = true, union_by_name = true, filename = true);
