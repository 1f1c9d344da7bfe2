-- checkpoints: the registry of trained models. One row per fine-tuning stage execution.
CREATE OR REPLACE VIEW checkpoints AS
SELECT
    checkpoint_id,      -- folder name under runs/<run>/models/
    parent_model_id,    -- the model it was trained from (name@weights-hash)
    role,               -- 'policy' (the next round's engine loads it) or 'ppm' (process preference model, scores steps)
    method,             -- sft | dpo | grpo | traces, or the chain that trained it in order (sft+grpo); ppm
    path,               -- absolute folder of the saved model: set engine.model to it to load it
    model_id,           -- its own id (name@weights-hash), as rollouts and evals record it
    data_fingerprint,   -- content hash of the training rows
    train_rows,
    steps,
    final_loss,
    wall_seconds,
    round,              -- the round whose data trained it: it is the policy of round + 1
    regexp_extract(filename, '/round=[0-9]+/([^/]+)/[^/]+/[^/]+$', 1) AS stage  -- the stage that wrote the row (from the lake path)
FROM read_parquet(${parts:checkpoints}, hive_partitioning = true, union_by_name = true, filename = true);
