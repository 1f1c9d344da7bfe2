"""TRL fine-tuning on a tiny model: SFT and DPO write a checkpoint folder that the engine loads."""
from __future__ import annotations

import math
from pathlib import Path

import pyarrow as pa
import pytest

from evoforge.models.engine import EngineConfig, GenerationRequest, SamplingConfig
from evoforge.models.loader import load_engine
from evoforge.models.prompts import solve_messages
from evoforge.tasks.finetune import grpo
from evoforge.tasks.finetune.config import FinetuneConfig
from evoforge.tasks.finetune.grpo import VerifierReward
from evoforge.tasks.finetune.launch import train_policy
from evoforge.tasks.finetune.training import train_in_process
from evoforge.tasks.pairs import PairsConfig, build_pairs
from evoforge.tasks.verify import VerifyConfig


@pytest.mark.model
@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_trl_training_writes_a_checkpoint_the_engine_loads(graded_round, tiny_model, scratch, method):
    tables = build_pairs(*graded_round, PairsConfig(sft_per_problem=5))
    data = {method: tables["sft_examples"] if method == "sft" else tables["pairs"]}
    folder = scratch / f"ckpt-{method}"
    result = train_policy(str(tiny_model), data, FinetuneConfig(method=method, max_steps=2, batch_size=2,
                                                               learning_rate=1e-3), folder)
    assert result["steps"] == 2 and math.isfinite(result["final_loss"])
    assert [m["step"] for m in result["metrics"]] == [1, 2]
    assert (folder / "model.safetensors").exists() and (folder / "tokenizer.json").exists()
    assert not list(scratch.glob(".*staging*"))
    engine = load_engine(EngineConfig(model=str(folder), backend="transformers"))
    (completions,) = engine.generate([GenerationRequest(solve_messages("1 + 1?"), 0)], SamplingConfig(n=1, max_tokens=4))
    assert completions[0].token_count >= 1 and engine.model_id.startswith(f"ckpt-{method}@")


@pytest.mark.model
def test_finetune_refuses_an_empty_training_set(graded_round, tiny_model, scratch):
    tables = build_pairs(*graded_round, PairsConfig(pairs_per_problem=0))
    with pytest.raises(ValueError, match="no training rows"):
        train_policy(str(tiny_model), {"dpo": tables["pairs"]}, FinetuneConfig(method="dpo"), scratch / "x")


@pytest.mark.unit
def test_verifier_reward_grades_completions_against_each_rows_answer():
    with VerifyConfig().pool() as pool:
        reward = VerifierReward(pool)
        completions = [[{"role": "assistant", "content": "so \\boxed{4}"}],
                       [{"role": "assistant", "content": "I think \\boxed{5}"}],
                       [{"role": "assistant", "content": "no box here, 4"}],
                       [{"role": "assistant", "content": "\\boxed{\\frac{1}{2}}"}]]
        assert reward(prompts=[None] * 4, completions=completions, answer=["4", "4", "4", "0.5"]) == [1.0, 0.0, 0.0, 1.0]


@pytest.mark.model
def test_grpo_then_sft_chain_trains_with_the_verifier_reward(graded_round, tiny_model, scratch):
    tables = build_pairs(*graded_round, PairsConfig(sft_per_problem=5))
    prompts = pa.Table.from_pylist([{"problem_id": "p1", "question": "What is 2 + 2?", "answer": "4"},
                                    {"problem_id": "p2", "question": "What is 3 + 4?", "answer": "7"}])
    folder = scratch / "ckpt-grpo"
    config = FinetuneConfig(method="grpo+sft", max_steps=2, batch_size=4, grpo={"generations": 4, "max_completion_tokens": 8},
                            generation="hf", learning_rate=1e-3, few_shot=False)
    result = train_in_process(str(tiny_model), {"grpo": prompts, "sft": tables["sft_examples"]}, config, folder)
    assert result["steps"] == 4
    assert [(m["step"], m["method"]) for m in result["metrics"]] == [(1, "grpo"), (2, "grpo"), (3, "sft"), (4, "sft")]
    grpo = [m for m in result["metrics"] if m["method"] == "grpo"]
    # a random tiny model never boxes the right answer: the verifier's reward is logged, and it is 0
    assert all("rewards/verifier_correct/mean" in m and m["reward"] == 0.0 for m in grpo)
    engine = load_engine(EngineConfig(model=str(folder), backend="transformers"))
    assert engine.model_id.startswith("ckpt-grpo@")


@pytest.mark.unit
def test_grpo_batch_must_hold_whole_groups():
    with pytest.raises(ValueError, match="multiple of grpo.generations"):
        grpo.arguments(FinetuneConfig(method="grpo", batch_size=3, grpo={"generations": 4}), Path("unused"))
    with pytest.raises(ValueError, match="unknown finetune method"):
        FinetuneConfig(method="sft+ppo")


@pytest.mark.unit
def test_grpo_trains_on_the_rounds_learnable_problems_and_kept_variants(runs_root):
    from evoforge.data import schemas
    from evoforge.data.lake import lake
    from evoforge.flows.finetune import training_data

    def problem(pid, answer):
        return dict(problem_id=pid, question=f"question {pid}", answer=answer, source="s", origin="seed")

    store = lake()
    store.publish_stage("r", 0, "ingest", {"problems": pa.Table.from_pylist(
        [problem(p, "1") for p in ("learn", "under", "solved")], schema=schemas.PROBLEMS)})
    store.publish_stage("r", 0, "filter", {"problem_stats": pa.Table.from_pylist([
        dict(problem_id="learn", n=8, correct=6, accuracy=0.75, bucket="learnable"),
        dict(problem_id="under", n=8, correct=2, accuracy=0.25, bucket="underperforming"),
        dict(problem_id="solved", n=8, correct=8, accuracy=1.0, bucket="solved")], schema=schemas.PROBLEM_STATS)})
    store.publish_stage("r", 0, "synthesize", {"problems": pa.Table.from_pylist(
        [problem("variant-of-under", "1")], schema=schemas.PROBLEMS)})
    grpo = training_data("r", 0, ["grpo"])["grpo"]
    assert sorted(grpo["problem_id"].to_pylist()) == ["learn", "variant-of-under"]
    assert grpo.column_names == ["problem_id", "question", "answer"]


@pytest.mark.model
def test_a_killed_training_resumes_from_its_saved_state_without_redoing_steps(graded_round, tiny_model, scratch, monkeypatch):
    import trl

    tables = build_pairs(*graded_round, PairsConfig(sft_per_problem=5))
    config = FinetuneConfig(method="sft", max_steps=3, batch_size=2, checkpoint_steps=1, learning_rate=1e-3)
    folder = scratch / "ckpt-resume"
    original = trl.SFTTrainer.training_step
    steps_run = []

    def crash_after_two_steps(self, *args, **kwargs):
        if self.state.global_step >= 2:
            raise RuntimeError("simulated crash")
        steps_run.append(self.state.global_step)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(trl.SFTTrainer, "training_step", crash_after_two_steps)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_in_process(str(tiny_model), {"sft": tables["sft_examples"]}, config, folder)
    assert not folder.exists() and (scratch / ".ckpt-resume.staging" / "trainer-0-sft" / "checkpoint-2").is_dir()

    def count_steps(self, *args, **kwargs):
        steps_run.append(self.state.global_step)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(trl.SFTTrainer, "training_step", count_steps)
    result = train_in_process(str(tiny_model), {"sft": tables["sft_examples"]}, config, folder)
    assert steps_run == [0, 1, 2]  # the second run trained only step 3
    assert result["steps"] == 3 and [m["step"] for m in result["metrics"]] == [1, 2, 3]
    assert (folder / "model.safetensors").exists()
    assert not [p.name for p in folder.iterdir() if p.name.startswith(("trainer-", "finished-", "checkpoint-"))]
    assert not (scratch / ".ckpt-resume.staging").exists()


@pytest.mark.model
def test_the_ppm_and_trace_sft_train_from_mcts_data(tiny_model, scratch):
    from evoforge.data import schemas

    prefix = "# three boxes\nx = 3\nprint(x)\n<end_of_step>\n<output>3</output>\n"
    step_pairs = pa.Table.from_pylist([
        dict(pair_id=str(i), kind="step", problem_id="p", prompt="3 boxes of 4 pens?", prefix=prefix,
             chosen="y = x * 4\nprint(y)", rejected="y = x + 4\nprint(y)", chosen_rollout_id="a",
             rejected_rollout_id="b", chosen_score=1.0, rejected_score=-1.0) for i in range(4)], schema=schemas.PAIRS)
    config = FinetuneConfig(max_steps=2, batch_size=2, learning_rate=1e-3)
    result = train_in_process(str(tiny_model), {"ppm": step_pairs}, config, scratch / "ppm", methods=["ppm"])
    assert result["steps"] == 2 and math.isfinite(result["final_loss"])
    from transformers import AutoModelForSequenceClassification

    assert AutoModelForSequenceClassification.from_pretrained(scratch / "ppm").config.num_labels == 1
    from evoforge.models.ppm import PPMScorer

    scores = PPMScorer(scratch / "ppm")(["3 boxes of 4 pens?\n\n" + prefix + "y = x * 4", "short"])
    assert len(scores) == 2 and all(-1 < s < 1 for s in scores)

    traces = pa.Table.from_pylist([dict(trace_id="t", problem_id="p", tree_id="x", node_ids=["a", "b"],
                                        prompt="3 boxes of 4 pens?", completion=prefix + "The answer is \\boxed{12}",
                                        answer="12", mean_q=1.0, depth=2)], schema=schemas.TRACES)
    policy = train_in_process(str(tiny_model), {"traces": traces}, FinetuneConfig(method="traces", max_steps=1, batch_size=1),
                              scratch / "traced")
    assert policy["steps"] == 1 and (scratch / "traced" / "model.safetensors").exists()


@pytest.mark.unit
def test_each_method_selects_its_own_rows_of_the_round():
    """Each method module's `training_rows`, on tables handed in as the flow hands in the lake's."""
    import pyarrow.compute as pc

    from evoforge.data import schemas
    from evoforge.tasks.finetune import dpo, ppm, raro, sft
    from evoforge.tasks.finetune.config import FinetuneConfig

    pairs = pa.Table.from_pylist([
        dict(pair_id=f"{kind}{i}", kind=kind, problem_id="p0", prompt="q", prefix=None, chosen="a", rejected="b",
             chosen_rollout_id="x", rejected_rollout_id="y", chosen_score=1.0, rejected_score=0.0)
        for i in range(2) for kind in ("solution", "step")], schema=schemas.PAIRS)
    problems = pa.table({"problem_id": ["p0", "p1"], "question": ["q0", "q1"], "expert_answer": ["e0", "e1"]})
    judgments = pa.table({"problem_id": ["p0", "p1", "p0"], "rollout_id": ["r0", "r1", "r2"],
                          "order": ["policy_first", "expert_first", "policy_first"], "round": pa.array([1, 1, 0], pa.int32())})
    rollouts = pa.table({"rollout_id": ["r0", "r1", "r2"], "round": pa.array([1, 1, 0], pa.int32()),
                         "text": ["fresh a", "fresh b", "old c"]})

    class Inputs:
        round = 1

        def round_table(self, table, made_by):
            return {("pairs", "pairs"): pairs, ("sft_examples", "pairs"): pa.table({"prompt": ["q"], "completion": ["a"]}),
                    ("judgments", "critic"): judgments.filter(pc.equal(judgments["round"], 1))}[(table, made_by)]

        def stage_output(self, table, made_by):
            return self.round_table(table, made_by)

        def problems_with_experts(self):
            return problems

        def every_round(self, table, made_by):
            return {"judgments": judgments, "rollouts": rollouts}[table]

    config = FinetuneConfig(raro={"critic_share": 0.5, "replay_size": 1})
    assert sft.training_rows(Inputs(), config).num_rows == 1
    assert dpo.training_rows(Inputs(), config)["pair_id"].to_pylist() == ["solution0", "solution1"]
    assert ppm.training_rows(Inputs(), config)["pair_id"].to_pylist() == ["step0", "step1"]
    rows = raro.training_rows(Inputs(), config).to_pylist()
    assert sorted(r["question"] for r in rows if r["role"] == "policy") == ["q0", "q1"]
    critic = sorted((r["policy_answer"], r["replayed"]) for r in rows if r["role"] == "critic")
    assert critic == [("fresh a", False), ("old c", True)]  # one fresh and one from the replay buffer of round 0
