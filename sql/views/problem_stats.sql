-- problem_stats: per problem and round, how often the policy solved it, and its difficulty bucket.
CREATE OR REPLACE VIEW problem_stats AS
SELECT
    problem_id,
    n,                  -- graded samples
    correct,
    accuracy,           -- correct / n
    pass_at_k,          -- MAP(k -> unbiased pass@k = 1 - C(n-c,k)/C(n,k)) for the configured k <= n; pass_at_k[8]
    mean_tokens,
    bucket,             -- unsolved (0) | underperforming (SvS band, default 12.5%-50%) | learnable (other 0<acc<1) | solved (1)
    round,
    regexp_extract(filename, '/round=[0-9]+/([^/]+)/[^/]+/[^/]+$', 1) AS stage,  -- the stage that wrote the row (from the lake path)
    regexp_extract(filename, '/([^/]+)/round=[0-9]+/[^/]+/[^/]+/[^/]+$', 1) AS run  -- the run (from the lake path; `evoforge sql --all-runs` reads them all)
FROM read_parquet(${parts:problem_stats}, hive_partitioning = true, union_by_name = true, filename = true);
