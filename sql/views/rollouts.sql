-- rollouts: one row per sampled completion.
CREATE OR REPLACE VIEW rollouts AS
SELECT
    rollout_id,         -- sha256 of (problem_id, model_id, seed, sample_index): stable across reruns
    problem_id,
    model_id,           -- model name @ hash of its weights and config
    seed,               -- the problem's own sampling seed (derived from the config seed and problem_id)
    sample_index,       -- 0 .. n-1 among the problem's samples
    text,
    completion_tokens,
    finish_reason,      -- 'stop' (end of sequence or stop string) or 'length' (hit max_tokens)
    mean_logprob,       -- mean log-probability of the sampled tokens (before temperature); its negative estimates entropy
    round,
    regexp_extract(filename, '/round=[0-9]+/([^/]+)/[^/]+/[^/]+$', 1) AS stage,  -- the stage that wrote the row (from the lake path)
    regexp_extract(filename, '/([^/]+)/round=[0-9]+/[^/]+/[^/]+/[^/]+$', 1) AS run  -- the run (from the lake path; `evoforge sql --all-runs` reads them all)
FROM read_parquet(${parts:rollouts}, hive_partitioning = true, union_by_name = true, filename = true);
