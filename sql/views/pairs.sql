-- pairs: preference pairs. kind = 'solution': a correct and a wrong rollout of the same problem, for DPO.
CREATE OR REPLACE VIEW pairs AS
SELECT
    pair_id,              -- hash of (chosen rollout, rejected rollout)
    kind,                 -- 'solution' (DPO) or 'step' (PPM: sibling steps of an MCTS node)
    problem_id,
    prompt,               -- the problem text
    prefix,               -- step pairs: the shared solution prefix; NULL for solution pairs
    chosen,               -- a correct response (shortest correct first)
    rejected,             -- a wrong response (most confident wrong first: highest mean log-probability)
    chosen_rollout_id,    -- step pairs: the chosen mcts_nodes.node_id
    rejected_rollout_id,  -- step pairs: the rejected mcts_nodes.node_id
    chosen_score,         -- solution pairs: minus the response's token count; step pairs: Q-value
    rejected_score,       -- solution pairs: the response's mean log-probability; step pairs: Q-value
    round,
    regexp_extract(filename, '/round=[0-9]+/([^/]+)/[^/]+/[^/]+$', 1) AS stage,  -- the stage that wrote the row (from the lake path)
    regexp_extract(filename, '/([^/]+)/round=[0-9]+/[^/]+/[^/]+/[^/]+$', 1) AS run  -- the run (from the lake path; `evoforge sql --all-runs` reads them all)
FROM read_parquet(${parts:pairs}, hive_partitioning = true, union_by_name = true, filename = true);
