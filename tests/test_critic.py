"""RARO's critic: label parsing, the recorded shuffle, the reward table, the training rows, and the
critic stage and RARO training end to end on the tiny model."""
from __future__ import annotations

import math

import pyarrow as pa
import pytest

from evoforge.tasks.critic import ORDERS, CriticConfig, arrange, order_for, parse_label, rewards, winner
from evoforge.tasks.finetune.raro import RaroConfig, build_rows


@pytest.mark.unit
@pytest.mark.parametrize("output, label", [
    ("Answer 1 looks right at first, but its sum is off. Answer 2 is correct.\nVerdict: Answer 2", "2"),
    ("Answer 2 forgets the tax; Answer 1 does not.\nVerdict: Answer 1", "1"),
    ("Both reach 12 the same way, so Answer 1 and Answer 2 tie.\nVerdict: Tie.", "tie"),
    ("VERDICT: ANSWER 2", "2"),
    ("The better one is **Answer 1**", "1"),
    ("Verdict: [Answer 2]", "2"),
    ("(answer #1)", "1"),
    ("Answer2 wins", "2"),
    ("Answer 1 is wrong. It's a TIE? No.", "tie"),
    ("Everything tied up: the answer 12 is fine and answer 1.5 too", None),
    ("I cannot tell which is better.", None),
    ("", None),
    (None, None),
])
def test_the_last_label_wins_and_case_brackets_and_prose_are_handled(output, label):
    assert parse_label(output) == label


@pytest.mark.unit
@pytest.mark.parametrize("order", ORDERS)
def test_the_shuffle_is_recorded_and_undone(order):
    first, second = arrange(order, "POLICY", "EXPERT")
    assert {first, second} == {"POLICY", "EXPERT"}
    expert_position = "1" if first == "EXPERT" else "2"
    policy_position = "2" if expert_position == "1" else "1"
    assert winner(expert_position, order) == "expert"
    assert winner(policy_position, order) == "policy"
    assert winner("tie", order) == "tie" and winner(None, order) is None


@pytest.mark.unit
def test_the_order_is_a_fair_seeded_coin_per_judgment():
    orders = [order_for(0, f"rollout-{i}") for i in range(2000)]
    assert orders == [order_for(0, f"rollout-{i}") for i in range(2000)]  # reproducible
    assert 900 < orders.count("policy_first") < 1100
    assert orders != [order_for(1, f"rollout-{i}") for i in range(2000)]  # the seed changes it


@pytest.mark.unit
def test_reward_table_for_every_label():
    table = {label: rewards(label, tau_critic=0.55, tau_policy=0.6) for label in ("expert", "policy", "tie", None)}
    assert table == {"expert": (1.0, 0.0), "policy": (0.0, 1.0), "tie": (0.55, 0.6), None: (None, None)}


def _compared(n: int, tag: str) -> pa.Table:
    return pa.Table.from_pylist([dict(problem_id=f"p{i % 3}", question=f"q{i % 3}", expert_answer=f"e{i % 3}",
                                      policy_answer=f"{tag}-answer-{i}", order=ORDERS[i % 2]) for i in range(n)])


@pytest.mark.unit
def test_raro_rows_mix_fresh_and_replayed_answers_half_and_half():
    problems = pa.Table.from_pylist([dict(problem_id=f"p{i}", question=f"q{i}", expert_answer=f"e{i}") for i in range(3)]
                                    + [dict(problem_id="p9", question="q9", expert_answer=None)])
    config = RaroConfig(critic_share=0.5)
    rows = build_rows(problems, _compared(10, "fresh"), _compared(10, "old"), config).to_pylist()
    policy = [r for r in rows if r["role"] == "policy"]
    critic = [r for r in rows if r["role"] == "critic"]
    assert sorted(r["problem_id"] for r in policy) == ["p0", "p1", "p2"]  # no expert answer, no policy row
    assert len(critic) == 3 and {r["replayed"] for r in critic} == {False, True}
    assert sum(r["replayed"] for r in critic) == 1  # 3 critic rows: 1 from the buffer, 2 fresh
    assert all(r["policy_answer"].startswith("old" if r["replayed"] else "fresh") for r in critic)

    more = build_rows(problems, _compared(10, "fresh"), _compared(10, "old"), RaroConfig(critic_share=0.8)).to_pylist()
    critic = [r for r in more if r["role"] == "critic"]
    assert len(critic) == 12 and sum(r["replayed"] for r in critic) == 6
    # round 0 has no buffer: the critic rows are all fresh
    first = build_rows(problems, _compared(10, "fresh"), _compared(0, "old"), config).to_pylist()
    assert [r["replayed"] for r in first if r["role"] == "critic"] == [False] * 3


@pytest.mark.model
@pytest.mark.server
def test_the_critic_stage_writes_judgments_the_catalog_reports(write_jsonl, prefect_server, runs_root, tiny_engine_config, scratch):
    from evoforge.data import catalog
    from evoforge.data.lake import lake
    from evoforge.app.cli import main
    from evoforge.flows.config import RoundConfig
    from evoforge.flows.round import round_flow
    from evoforge.models.engine import SamplingConfig
    from evoforge.tasks.generate import GenerateConfig
    from evoforge.tasks.ingest import SourceConfig

    source = write_jsonl(scratch / "demos.jsonl", [
        {"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}.\nThe answer is \\boxed{{{i + 1}}}.",
         "reference": str(i + 1)} for i in range(3)] + [{"question": "Name a colour.", "answer": "Blue."}])
    config = RoundConfig(
        engine=tiny_engine_config,
        sources=[SourceConfig(path=str(source), preset="demonstrations", reference_field="reference")],
        generate=GenerateConfig(sampling=SamplingConfig(n=2, max_tokens=12)),
        critic=CriticConfig(sampling=SamplingConfig(n=1, max_tokens=12, temperature=1.0)),
        stages=["generate", "verify", "critic"])
    results = {r.stage: r for r in round_flow("judged", config, round=0)}
    # with a reference field, a demonstration that lacks one is quarantined rather than left ungradable
    assert results["ingest"].rows_out == 3 and results["ingest"].rows_quarantined == 1
    assert results["critic"].status == "completed" and results["critic"].rows_out == 6

    judgments = lake().read("judged", "judgments", 0, "critic").to_pylist()
    rollouts = {r["rollout_id"]: r for r in lake().read("judged", "rollouts", 0, "generate").to_pylist()}
    assert sorted(j["rollout_id"] for j in judgments) == sorted(rollouts)  # one judgment per policy answer
    for j in judgments:
        assert j["order"] == order_for(0, j["rollout_id"])
        assert j["parsed_ok"] == (j["said"] is not None) and j["said"] == parse_label(j["critic_output"])
        assert j["label"] == winner(j["said"], j["order"])
        assert (j["critic_reward"], j["policy_reward"]) == rewards(j["label"], 0.55, 0.6)
        assert j["critic_model_id"] == rollouts[j["rollout_id"]]["model_id"]  # the policy judges its own answers

    con = catalog.connect(lake().run_dir("judged"))
    assert con.execute("SELECT count(*) FROM judgments WHERE stage = 'critic'").fetchone()[0] == 6
    (report,) = con.execute(catalog.resolve_query("critic_report")).fetchall()
    assert report[0] == 0 and report[1] == 6
    # the tiny model's noise rarely names a label: whatever it did, the rates are the table's own
    unparseable = sum(not j["parsed_ok"] for j in judgments) / 6
    assert report[4] == pytest.approx(round(unparseable, 3))

    # rerunnable alone from the command line, on the run's saved config: unchanged inputs are skipped
    assert main(["stage", "critic", "--run", "judged"]) == 0
    events = sorted((e for e in lake().read("judged", "stage_runs").to_pylist() if e["stage"] == "critic"),
                    key=lambda e: e["finished_at"] or e["started_at"])
    assert [e["status"] for e in events] == ["running", "completed", "skipped"]


@pytest.mark.model
def test_raro_grpo_trains_both_roles_of_one_model(tiny_model, scratch):
    from evoforge.models.engine import EngineConfig, SamplingConfig
    from evoforge.models.loader import load_engine
    from evoforge.tasks.finetune.config import FinetuneConfig
    from evoforge.tasks.finetune.launch import train_policy
    from evoforge.tasks.finetune.training import TrainingContext

    problems = pa.Table.from_pylist([dict(problem_id=f"p{i}", question=f"What is {i} + 2?",
                                          expert_answer=f"{i} + 2 = {i + 2}. The answer is \\boxed{{{i + 2}}}.")
                                     for i in range(2)])
    critic = CriticConfig(sampling=SamplingConfig(n=1, max_tokens=8, temperature=1.0))
    rows = build_rows(problems, _compared(4, "fresh"), _compared(0, "old"), RaroConfig(critic_share=0.5))
    assert sorted(rows["role"].to_pylist()) == ["critic", "critic", "policy", "policy"]
    folder = scratch / "ckpt-raro"
    config = FinetuneConfig(method="raro", max_steps=2, batch_size=8, grpo={"generations": 4, "max_completion_tokens": 8},
                            learning_rate=1e-3, few_shot=False, generation="hf")
    result = train_policy(str(tiny_model), {"raro": rows}, config, folder, TrainingContext(critic=critic))
    assert result["steps"] == 2 and all(math.isfinite(m["loss"]) for m in result["metrics"])
    logged = set().union(*result["metrics"])
    # each logged step reports the critic's verdicts on the policy's answers and on its own judgments
    assert {"rewards/raro/mean", "raro/policy_rows_unparseable", "raro/critic_rows_unparseable"} <= logged
    assert all(0.0 <= m["rewards/raro/mean"] <= 1.0 for m in result["metrics"])
    engine = load_engine(EngineConfig(model=str(folder), backend="transformers"))
    assert engine.model_id.startswith("ckpt-raro@")
