-- Held-out scores of every model a run evaluated (model 0 = the start, r + 1 = the model trained in round r),
-- pass@1 with its 95% interval (bootstrap over problems, samples nested inside them: score_intervals).
-- search 'none': plain sampling over n samples; 'ppm_best_of_n': the PPM's pick among them (n = 1), beside it.
SELECT e.model_round, e.eval_set, e.search, e.pass_at_1, e.pass_at_1_low, e.pass_at_1_high,
       map_entries(e.pass_at_k) AS pass_at_k,   -- [{key: k, value: pass@k}]
       e.entropy, e.distinct_answer_rate, e.problems, e.n, e.model_id
FROM evals e
-- a model measured again in a later round (its sets or sampling changed) shows its newest measurement
QUALIFY row_number() OVER (PARTITION BY e.model_id, e.eval_set, e.search ORDER BY e.round DESC) = 1
ORDER BY e.model_round, e.eval_set, e.search;
