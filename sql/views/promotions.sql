-- promotions: every decision on whether a round's checkpoint becomes the next round's policy, the gate's
-- (stage 'evaluate') and the ones made by hand (stage 'promote', evoforge promote); a manual one wins.
CREATE OR REPLACE VIEW promotions AS
SELECT
    checkpoint_id,
    model_id,
    model_round,        -- the checkpoint's model number: r + 1 for round r's
    decision,           -- 'promoted' or 'rejected'
    why,                -- the paired changes the rule read, or the reason given by hand
    decided_by,         -- 'gate' or 'manual'
    rule,               -- the gate's rule (evaluate.gate), e.g. 'not_worse on pass@1 over every held-out set'
    baseline_model_id,  -- the model it was compared with
    decided_at,
    round,              -- the round that trained the checkpoint
    regexp_extract(filename, '/round=[0-9]+/([^/]+)/[^/]+/[^/]+$', 1) AS stage,  -- the stage that wrote the row (from the lake path)
    regexp_extract(filename, '/([^/]+)/round=[0-9]+/[^/]+/[^/]+/[^/]+$', 1) AS run  -- the run (from the lake path; `evoforge sql --all-runs` reads them all)
FROM read_parquet(${parts:promotions}, hive_partitioning = true, union_by_name = true, filename = true);
