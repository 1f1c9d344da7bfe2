-- sft_examples: correct rollouts selected for supervised fine-tuning (rejection sampling).
CREATE OR REPLACE VIEW sft_examples AS
SELECT
    example_id,           -- hash of (problem, normalised completion): duplicates collapse
    problem_id,
    rollout_id,
    prompt,               -- the problem text
    completion,           -- the correct response
    bucket,               -- the problem's bucket when selected (learnable, underperforming; 'variant' for kept SvS variants)
    origin,               -- 'seed' or 'synthetic'
    round,
    regexp_extract(filename, '/round=[0-9]+/([^/]+)/[^/]+/[^/]+$', 1) AS stage,  -- the stage that wrote the row (from the lake path)
    regexp_extract(filename, '/([^/]+)/round=[0-9]+/[^/]+/[^/]+/[^/]+$', 1) AS run  -- the run (from the lake path; `evoforge sql --all-runs` reads them all)
FROM read_parquet(${parts:sft_examples}, hive_partitioning = true, union_by_name = true, filename = true);
