-- evals: held-out performance of each model of a run, per evaluation set (eval_results: per problem).
CREATE OR REPLACE VIEW evals AS
SELECT
    model_id,
    model_round,        -- 0: the starting model; r + 1: the model trained in round r
    eval_set,
    problems,
    n,                  -- samples per problem
    pass_at_1,          -- mean accuracy over the n samples
    pass_at_k,          -- MAP(k -> mean unbiased pass@k) for the configured k <= n
    entropy,            -- mean of minus the mean token log-probability: an entropy estimate of the policy
    mean_tokens,
    no_answer_rate,     -- share of samples without a \boxed{} answer
    pass_at_1_low,      -- pass@1's 95% interval (score_intervals has every k, and the change from the baseline)
    pass_at_1_high,
    distinct_answer_rate, -- distinct final answers / samples, per problem, averaged: collapse drives it towards 1/n
    coalesce(search, 'none') AS search,  -- 'none': plain sampling (pass@k over the n samples); 'ppm_best_of_n': the PPM picks one of the n samples per problem (n = 1)
    round,              -- the round whose evaluate stage measured it
    regexp_extract(filename, '/round=[0-9]+/([^/]+)/[^/]+/[^/]+$', 1) AS stage,  -- the stage that wrote the row (from the lake path)
    regexp_extract(filename, '/([^/]+)/round=[0-9]+/[^/]+/[^/]+/[^/]+$', 1) AS run  -- the run (from the lake path; `evoforge sql --all-runs` reads them all)
FROM read_parquet(${parts:evals}, hive_partitioning = true, union_by_name = true, filename = true);
