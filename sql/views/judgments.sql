-- judgments: RARO's relativistic critic (the policy model under the critic system prompt) comparing
-- each policy answer with the expert's answer to the same question. One row per judged rollout.
CREATE OR REPLACE VIEW judgments AS
SELECT
    judgment_id,
    problem_id,
    rollout_id,         -- the policy answer judged (rollouts.text)
    "order",            -- policy_first | expert_first: which answer the critic saw as Answer 1 (a seeded coin per rollout)
    critic_output,      -- the critic's whole output
    said,               -- the LAST label in critic_output: '1', '2' or 'tie'; NULL when it named none
    label,              -- said with the shuffle undone: policy | expert | tie; NULL when unparseable
    parsed_ok,          -- said IS NOT NULL
    critic_reward,      -- 1[label = expert] + tau_critic * 1[tie]; NULL when unparseable (no reward)
    policy_reward,      -- 1[label = policy] + tau_policy * 1[tie]; NULL when unparseable (no reward)
    critic_model_id,    -- the model that judged (the round's policy)
    round,
    regexp_extract(filename, '/round=[0-9]+/([^/]+)/[^/]+/[^/]+$', 1) AS stage,  -- the stage that wrote the row (from the lake path)
    regexp_extract(filename, '/([^/]+)/round=[0-9]+/[^/]+/[^/]+/[^/]+$', 1) AS run  -- the run (from the lake path; `evoforge sql --all-runs` reads them all)
FROM read_parquet(${parts:judgments}, hive_partitioning = true, union_by_name = true, filename = true);
