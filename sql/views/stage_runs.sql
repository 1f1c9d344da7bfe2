-- stage_runs: one row per stage execution (its latest event: running, then completed / skipped / failed,
-- or interrupted: stopped by Ctrl-C or SIGTERM, or its process died and a later command on the run found it still open).
CREATE OR REPLACE VIEW stage_runs AS
SELECT
    stage_run_id,
    run,
    round,
    stage,
    flow_run_id,        -- Prefect flow run that executed the stage (open it in the UI)
    config_hash,        -- hash of the stage's config section
    model_id,           -- engine model for stages that generate, else NULL
    input_fingerprint,  -- content hash of the stage's inputs (NULL while a stage that hashes them as it reads them runs)
    input_parts,        -- for stages that stream their inputs: hash of the parts they were read from (their manifests' checksums), so a rerun on the same parts is found unchanged without reading them
    output_fingerprint, -- content hash of the output files; an unchanged rerun is skipped when all three match
    rows_in,
    rows_out,
    rows_quarantined,
    started_at,
    finished_at,        -- NULL while running; for an attempt whose process died, when the death was noticed (the next command on the run)
    status,             -- running | completed | skipped | failed | interrupted
    error               -- failed: the one-line error; interrupted: what happened
FROM read_parquet(${parts:stage_runs}, union_by_name = true)
QUALIFY row_number() OVER (PARTITION BY stage_run_id ORDER BY finished_at IS NOT NULL DESC, finished_at DESC) = 1;
