-- problem_stats: per problem and round, how often the policy solved it, its difficulty bucket, and the collapse
-- signals of its samples (`evoforge sql collapse` reads them here, not from the round's verdicts).
CREATE OR REPLACE VIEW problem_stats AS
SELECT
    problem_id,
    n,                  -- graded samples
    correct,
    accuracy,           -- correct / n
    pass_at_k,          -- MAP(k -> unbiased pass@k = 1 - C(n-c,k)/C(n,k)) for the configured k <= n; pass_at_k[8]
    mean_tokens,
    bucket,             -- unsolved (0) | underperforming (SvS band, default 12.5%-50%) | learnable (other 0<acc<1) | solved (1)
    distinct_answers,   -- distinct extracted final answers among its graded samples (NULL: filtered before evoforge counted them)
    mean_logprob,       -- mean over those samples of the mean token log-probability (minus it: the entropy estimate)
    round,
    regexp_extract(filename, '/round=[0-9]+/([^/]+)/[^/]+/[^/]+$', 1) AS stage,  -- the stage that wrote the row (from the lake path)
    regexp_extract(filename, '/([^/]+)/round=[0-9]+/[^/]+/[^/]+/[^/]+$', 1) AS run  -- the run (from the lake path; `evoforge sql --all-runs` reads them all)
FROM read_parquet(${parts:problem_stats}, hive_partitioning = true, union_by_name = true, filename = true);
