-- What the generated steps were: share of code errors (and timeouts, unparseable steps) among steps,
-- and share of terminal-correct leaves among terminal ones, per round.
SELECT round,
       count(*) FILTER (WHERE depth > 0) AS steps,
       round(count(*) FILTER (WHERE exec_status IN ('error', 'timeout')) / count(*) FILTER (WHERE depth > 0), 3) AS code_error_share,
       round(count(*) FILTER (WHERE exec_status = 'unparsed') / count(*) FILTER (WHERE depth > 0), 3) AS unparsed_share,
       count(*) FILTER (WHERE is_terminal) AS terminal_leaves,
       round(count(*) FILTER (WHERE is_terminal AND correct) / nullif(count(*) FILTER (WHERE is_terminal), 0), 3) AS terminal_correct_share
FROM mcts_nodes
GROUP BY round
ORDER BY round;
