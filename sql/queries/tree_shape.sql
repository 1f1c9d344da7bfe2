-- MCTS trees per problem: nodes, deepest step, and branching (children per expanded node).
WITH children AS (
    SELECT parent_id, count(*) AS n FROM mcts_nodes WHERE parent_id IS NOT NULL GROUP BY parent_id
)
SELECT n.round, n.problem_id,
       count(*) AS nodes,
       max(n.depth) AS max_depth,
       round(avg(c.n), 2) AS mean_branching,   -- over expanded nodes only
       max(c.n) AS max_branching
FROM mcts_nodes n LEFT JOIN children c ON c.parent_id = n.node_id
GROUP BY n.round, n.problem_id
ORDER BY n.round, n.problem_id;
