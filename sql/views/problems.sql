-- problems: the problem pool. One row per problem and the round it entered the pool.
CREATE OR REPLACE VIEW problems AS
SELECT
    problem_id,         -- sha256 (16 hex) of the question after NFKC, lower-casing and whitespace collapsing
    question,
    answer,             -- gold answer as math-verify parses it: GSM8K after '####' without commas, MATH's last \boxed{}, '27.0' -> '27'; for demonstrations the reference field, else NULL (no verifier)
    source,             -- dataset name (the ingest config's name, else the folder or file name)
    source_file,        -- file the row was read from, as given to ingest
    source_row,         -- 1-based line (JSONL) or row (Parquet, datasets) in source_file
    origin,             -- 'seed' (ingested) or 'synthetic' (written by the policy in a later round)
    parent_problem_id,  -- for synthetic problems: the problem they were derived from
    task,               -- tag of the source: 'math' (graded presets), 'demonstration', or the ingest's --task
    expert_answer,      -- the expert's worked answer the RARO critic compares with: a demonstration, a GSM8K/MATH solution; NULL if none
    round,              -- round the problem entered the pool (from the lake path round=<r>)
    regexp_extract(filename, '/round=[0-9]+/([^/]+)/[^/]+/[^/]+$', 1) AS stage,  -- the stage that wrote the row (from the lake path)
    regexp_extract(filename, '/([^/]+)/round=[0-9]+/[^/]+/[^/]+/[^/]+$', 1) AS run  -- the run (from the lake path; `evoforge sql --all-runs` reads them all)
FROM read_parquet(${parts:problems}, hive_partitioning = true, union_by_name = true, filename = true);
