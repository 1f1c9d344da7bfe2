-- Every held-out score with its 95% interval, and the change from the model's baseline (the policy it was
-- trained from) with its paired interval over the same problems. Method: percentile bootstrap over problems,
-- each problem's samples redrawn inside it (binomial on its accuracy), seeded (tasks/intervals.py).
SELECT model_round, eval_set, search, metric, round(estimate, 4) AS estimate, round(low, 4) AS low, round(high, 4) AS high,
       problems, n, baseline_model_round,
       round(change, 4) AS change, round(change_low, 4) AS change_low, round(change_high, 4) AS change_high,
       paired_problems,
       CASE WHEN change_high < 0 THEN 'worse' WHEN change_low > 0 THEN 'better'
            WHEN change IS NOT NULL THEN 'no significant change' END AS significance,
       model_id, round AS measured_in_round
FROM score_intervals
-- a model measured again later as a baseline keeps the measurement that compared it with its own baseline
QUALIFY row_number() OVER (PARTITION BY model_id, eval_set, search, metric ORDER BY change IS NOT NULL DESC, round DESC) = 1
ORDER BY model_round, eval_set, search, k;
