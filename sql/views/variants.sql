-- variants: SvS variational problems written by the policy from its own correct solutions of
-- under-performing problems, each solved G_v times and graded against the PARENT's answer: between rounds by
-- the synthesize stage (origin 'offline'), or during training by `finetune.method: svs` (origin 'online').
CREATE OR REPLACE VIEW variants AS
SELECT
    variant_id,         -- the problem_id the variant has in the pool (hash of its normalised text)
    parent_problem_id,  -- the under-performing problem the variant was derived from
    source_rollout_id,  -- the correct solution the policy was shown (online: NULL, the solution was sampled in the step)
    text,               -- the extracted variant problem; NULL when none could be extracted
    answer,             -- the parent's gold answer, which the variant must keep
    raw_output,         -- the policy's whole synthesis output
    n,                  -- solving samples (G_v); 0 for rejected variants
    correct,            -- samples graded correct against the parent's answer
    accuracy,
    kept,               -- accuracy inside the keep band (default 12.5%-62.5%): offline, joins the next round's pool; online, rewarded its synthesis
    reward,             -- synthesis reward: 1 when kept, else 0
    reject_reason,      -- no_problem | answer_leak | duplicate_of_parent | near_duplicate_of_parent | near_duplicate_of_pool | too_long | outside_band; NULL when kept
    coalesce(origin, 'offline') AS origin,  -- 'offline': the synthesize stage; 'online': written by the policy while training (svs)
    step,               -- online: the optimizer step whose update the synthesis took part in; offline: NULL
    round,
    regexp_extract(filename, '/round=[0-9]+/([^/]+)/[^/]+/[^/]+$', 1) AS stage,  -- the stage that wrote the row (from the lake path)
    regexp_extract(filename, '/([^/]+)/round=[0-9]+/[^/]+/[^/]+/[^/]+$', 1) AS run  -- the run (from the lake path; `evoforge sql --all-runs` reads them all)
FROM read_parquet(${parts:variants}, hive_partitioning = true, union_by_name = true, filename = true);
