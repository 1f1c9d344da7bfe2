-- verdicts: the grade of each rollout against its problem's gold answer.
CREATE OR REPLACE VIEW verdicts AS
SELECT
    rollout_id,
    problem_id,
    verdict,            -- correct | wrong | no_answer (no \boxed{}) | bad_gold (gold unparseable) | timeout (past the deadline or the memory limit) | no_reference (a demonstration with no answer to grade against)
    extracted_answer,   -- the graded answer: the content of the LAST \boxed{}, or of the last k boxes joined when the gold has k parts and the response boxed each
    gold,
    detail,             -- why, for anything but a plain correct/wrong
    seconds,            -- grader time of this item; 0 when it shared another row's grading or needed no grader (an exact number against an exact number)
    graded_with,        -- the rollout whose grading this row shares: same gold, same boxed answers (itself when graded); NULL if not graded
    round,
    regexp_extract(filename, '/round=[0-9]+/([^/]+)/[^/]+/[^/]+$', 1) AS stage,  -- the stage that wrote the row (from the lake path)
    regexp_extract(filename, '/([^/]+)/round=[0-9]+/[^/]+/[^/]+/[^/]+$', 1) AS run  -- the run (from the lake path; `evoforge sql --all-runs` reads them all)
FROM read_parquet(${parts:verdicts}, hive_partitioning = true, union_by_name = true, filename = true);
