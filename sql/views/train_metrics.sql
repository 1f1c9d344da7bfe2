-- train_metrics: what the trainer logged at each step, one row per (checkpoint, step, metric).
CREATE OR REPLACE VIEW train_metrics AS
SELECT
    checkpoint_id,
    step,
    metric,             -- loss, learning_rate, grad_norm; DPO rewards/margins, ...; GRPO reward (mean verifier reward), reward_std, entropy, ...; prefixed by method (grpo/loss) when a round chains methods
    value,
    round,
    regexp_extract(filename, '/round=[0-9]+/([^/]+)/[^/]+/[^/]+$', 1) AS stage,  -- the stage that wrote the row (from the lake path)
    regexp_extract(filename, '/([^/]+)/round=[0-9]+/[^/]+/[^/]+/[^/]+$', 1) AS run  -- the run (from the lake path; `evoforge sql --all-runs` reads them all)
FROM read_parquet(${parts:train_metrics}, hive_partitioning = true, union_by_name = true, filename = true);
