-- eval_results: one row per model, held-out set and problem; every interval of score_intervals is computed from these.
CREATE OR REPLACE VIEW eval_results AS
SELECT
    model_id,
    model_round,        -- 0: the starting model; r + 1: the model trained in round r
    eval_set,
    problem_id,         -- the held-out problem (its samples: rollouts and verdicts with stage = 'evaluate')
    n,                  -- graded samples
    correct,            -- correct samples among them
    mean_tokens,        -- mean completion tokens of its samples
    mean_logprob,       -- mean over its samples of the mean token log-probability (minus it: the entropy estimate)
    distinct_answers,   -- distinct extracted final answers among its samples (collapse: it falls towards 1)
    no_answer,          -- samples without a \boxed{} answer
    settings_hash,      -- hash of the sampling, few-shot and grading settings: rows compare only under the same one
    coalesce(search, 'none') AS search,  -- 'none': the problem's n samples; 'ppm_best_of_n': the one sample the PPM picked among them (n = 1)
    round,              -- the round whose evaluate stage measured it
    regexp_extract(filename, '/round=[0-9]+/([^/]+)/[^/]+/[^/]+$', 1) AS stage,  -- the stage that wrote the row (from the lake path)
    regexp_extract(filename, '/([^/]+)/round=[0-9]+/[^/]+/[^/]+/[^/]+$', 1) AS run  -- the run (from the lake path; `evoforge sql --all-runs` reads them all)
FROM read_parquet(${parts:eval_results}, hive_partitioning = true, union_by_name = true, filename = true);
