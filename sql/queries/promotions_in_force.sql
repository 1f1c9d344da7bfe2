-- Each round's policy checkpoint and the decision in force on it: whether it became the next round's policy.
SELECT round, checkpoint_id, model_id, steps, stopped_early, decision, decided_by, why
FROM checkpoints
WHERE role = 'policy'
ORDER BY round;
