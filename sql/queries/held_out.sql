-- Held-out scores of every model a run evaluated (model 0 = the start, r + 1 = the policy after round r).
SELECT model_round, eval_set, pass_at_1,
       map_entries(pass_at_k) AS pass_at_k,   -- [{key: k, value: pass@k}]
       entropy, problems, n
FROM evals
ORDER BY model_round, eval_set;
