-- traces: the best complete correct solutions the search found, at most traces_per_problem per problem.
CREATE OR REPLACE VIEW traces AS
SELECT
    trace_id,
    problem_id,
    tree_id,
    node_ids,           -- the path of mcts_nodes from the first step to the terminal one
    prompt,             -- the problem text
    completion,         -- the steps with their outputs, as the policy is trained to write them
    answer,
    mean_q,             -- mean Q of the steps: how reliably this path leads to a correct answer
    depth,
    round,
    regexp_extract(filename, '/round=[0-9]+/([^/]+)/[^/]+/[^/]+$', 1) AS stage,  -- the stage that wrote the row (from the lake path)
    regexp_extract(filename, '/([^/]+)/round=[0-9]+/[^/]+/[^/]+/[^/]+$', 1) AS run  -- the run (from the lake path; `evoforge sql --all-runs` reads them all)
FROM read_parquet(${parts:traces}, hive_partitioning = true, union_by_name = true, filename = true);
