-- checkpoints: the registry of trained models. One row per fine-tuning stage execution, with the
-- promotion decision on it (a manual one, evoforge promote, wins over the gate's).
CREATE OR REPLACE VIEW checkpoints AS
SELECT
    c.checkpoint_id,    -- folder name under runs/<run>/models/
    c.parent_model_id,  -- the model it was trained from (name@weights-hash): the round's policy
    c.role,             -- 'policy' (a later round's engine may load it) or 'ppm' (process preference model, scores steps)
    c.method,           -- sft | dpo | grpo | traces, or the chain that trained it in order (sft+grpo); ppm
    c.path,             -- absolute folder of the saved model: set engine.model to it to load it
    c.model_id,         -- its own id (name@weights-hash), as rollouts and evals record it
    c.data_fingerprint, -- content hash of the training rows
    c.train_rows,       -- the rows of its training table (the collapse guard's held-out rows among them)
    c.steps,            -- optimizer steps taken (fewer than max_steps when the collapse guard stopped it)
    c.final_loss,
    c.wall_seconds,
    c.stopped_early,    -- why the collapse guard stopped training (held-out entropy floor, held-out loss rise); NULL: it did not
    c.base_model_id,    -- an adapter's base model (name@weights-hash), which engines load it on; NULL: full weights
    c.adapter,          -- true: a LoRA adapter alone (finetune.lora.merge: false); false: full weights (a full fine-tune, or LoRA merged)
    c.processes,        -- training processes that made it (finetune.processes: DDP/FSDP/ZeRO ranks)
    c.tracking,         -- the tracker's files for it (tensorboard --logdir <this>); NULL: no local tracker
    d.decision,         -- 'promoted': it became the next round's policy; 'rejected': the next round started from the last promoted one; NULL: not decided (a ppm, or not evaluated yet)
    d.why,              -- the paired changes the gate read, or the reason given by hand
    d.decided_by,       -- 'gate' or 'manual'
    c.round,            -- the round whose data trained it: if promoted, the policy of round + 1
    regexp_extract(c.filename, '/round=[0-9]+/([^/]+)/[^/]+/[^/]+$', 1) AS stage,  -- the stage that wrote the row (from the lake path)
    regexp_extract(c.filename, '/([^/]+)/round=[0-9]+/[^/]+/[^/]+/[^/]+$', 1) AS run  -- the run (from the lake path; `evoforge sql --all-runs` reads them all)
FROM read_parquet(${parts:checkpoints}, hive_partitioning = true, union_by_name = true, filename = true) AS c
LEFT JOIN (
    -- the decision in force: by hand (stage 'promote') over the gate's, then the newest; on these very weights
    SELECT checkpoint_id, model_id, decision, why, decided_by
    FROM read_parquet(${parts:promotions}, hive_partitioning = true, union_by_name = true, filename = true)
    QUALIFY row_number() OVER (
        PARTITION BY checkpoint_id, model_id
        ORDER BY regexp_extract(filename, '/round=[0-9]+/([^/]+)/[^/]+/[^/]+$', 1) = 'promote' DESC, decided_at DESC) = 1
) AS d ON d.checkpoint_id = c.checkpoint_id AND d.model_id = c.model_id;
