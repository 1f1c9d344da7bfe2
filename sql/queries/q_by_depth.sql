-- Distribution of Q-values by depth over visited non-root nodes: how value concentrates as solutions grow.
SELECT round, depth,
       count(*) AS nodes,
       round(avg(q_value), 3) AS mean_q,
       round(quantile_cont(q_value, 0.25), 3) AS q25,
       round(quantile_cont(q_value, 0.5), 3) AS median_q,
       round(quantile_cont(q_value, 0.75), 3) AS q75,
       count(*) FILTER (WHERE q_value > 0) AS positive
FROM mcts_nodes
WHERE depth > 0 AND visits > 0
GROUP BY round, depth
ORDER BY round, depth;
