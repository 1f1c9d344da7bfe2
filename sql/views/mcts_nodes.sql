-- mcts_nodes: every node of the rStar-Math search trees, one row per node: a tree is a query on parent_id.
CREATE OR REPLACE VIEW mcts_nodes AS
SELECT
    node_id,
    tree_id,            -- one tree per (problem, policy, seed, round)
    problem_id,
    parent_id,          -- NULL for the root (the bare problem)
    depth,              -- 0 for the root; a step's position in its solution
    step_text,          -- the step as the policy wrote it (reasoning as Python comments, then code)
    code,               -- the code run for this step (NULL for a final answer or a step with no code)
    exec_output,        -- what it printed (stdout when it ran, else the end of stderr)
    exec_status,        -- root | ok | terminal (gave \boxed{}) | cut (depth limit) | error | timeout | unparsed
    visits,             -- rollouts through this node; an expanded node has the sum of its children's
    q_value,            -- mean backed-up reward in [-1, 1]: +1 correct terminal, -1 wrong, failed or cut
    is_terminal,
    answer,             -- the boxed answer of a terminal step
    correct,            -- terminal steps: graded against the problem's answer with the verify grader
    round,
    regexp_extract(filename, '/round=[0-9]+/([^/]+)/[^/]+/[^/]+$', 1) AS stage,  -- the stage that wrote the row (from the lake path)
    regexp_extract(filename, '/([^/]+)/round=[0-9]+/[^/]+/[^/]+/[^/]+$', 1) AS run  -- the run (from the lake path; `evoforge sql --all-runs` reads them all)
FROM read_parquet(${parts:mcts_nodes}, hive_partitioning = true, union_by_name = true, filename = true);
