-- RARO's critic per round: how often it calls a tie, how often the policy beats the expert, how often
-- its output has no label, and (where the round also ran verify) its accuracy: the share of policy
-- answers the verifier graded wrong for which the critic preferred the expert.
SELECT j.round,
       count(*) AS judgments,
       round(avg(CASE WHEN j.parsed_ok THEN (j.label = 'tie')::INT END), 3) AS tie_rate,
       round(avg(CASE WHEN j.parsed_ok THEN (j.label = 'policy')::INT END), 3) AS policy_win_rate,
       round(avg((NOT j.parsed_ok)::INT), 3) AS unparseable_rate,
       count(*) FILTER (WHERE j.parsed_ok AND v.verdict IN ('wrong', 'no_answer')) AS judged_wrong_answers,
       round(avg(CASE WHEN j.parsed_ok AND v.verdict IN ('wrong', 'no_answer') THEN (j.label = 'expert')::INT END), 3) AS critic_accuracy,
       round(avg(CASE WHEN j.parsed_ok AND v.verdict = 'correct' THEN (j.label <> 'expert')::INT END), 3) AS correct_answers_not_rejected,
       round(avg(j.critic_reward), 3) AS mean_critic_reward,
       round(avg(j.policy_reward), 3) AS mean_policy_reward
FROM judgments j
LEFT JOIN verdicts v ON v.rollout_id = j.rollout_id AND v.round = j.round AND v.stage = 'verify'
GROUP BY j.round
ORDER BY j.round;
