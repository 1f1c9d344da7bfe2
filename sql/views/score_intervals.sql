-- score_intervals: pass@k of each model on each held-out set with its 95% interval, and the paired
-- change from its baseline (the policy it was trained from) with its interval.
-- Method: percentile bootstrap over problems, each problem's samples redrawn inside it (binomial on its
-- observed accuracy), seeded; the change resamples the same problems for both models (tasks/intervals.py).
CREATE OR REPLACE VIEW score_intervals AS
SELECT
    model_id,
    model_round,        -- 0: the starting model; r + 1: the model trained in round r
    eval_set,
    metric,             -- 'pass@1', 'pass@4', ...
    k,
    problems,           -- problems with at least one graded sample
    n,                  -- samples per problem
    estimate,           -- the mean unbiased pass@k over the problems
    low,                -- the interval's bounds, at the row's level
    high,
    baseline_model_id,  -- the model it is compared with: the round's policy, the last promoted model (NULL: none)
    baseline_model_round,
    paired_problems,    -- problems both models answered with at least k samples: the paired comparison's sample
    change,             -- estimate minus the baseline's on the paired problems
    change_low,         -- the paired interval of the change: wholly below 0 is "significantly worse"
    change_high,
    level,              -- interval coverage (0.95)
    resamples,          -- bootstrap resamples
    seed,               -- bootstrap seed
    coalesce(search, 'none') AS search,  -- 'none': plain sampling; 'ppm_best_of_n': the PPM's pick among the samples (compared with the baseline's pick by the same PPM)
    round,
    regexp_extract(filename, '/round=[0-9]+/([^/]+)/[^/]+/[^/]+$', 1) AS stage,  -- the stage that wrote the row (from the lake path)
    regexp_extract(filename, '/([^/]+)/round=[0-9]+/[^/]+/[^/]+/[^/]+$', 1) AS run  -- the run (from the lake path; `evoforge sql --all-runs` reads them all)
FROM read_parquet(${parts:score_intervals}, hive_partitioning = true, union_by_name = true, filename = true);
