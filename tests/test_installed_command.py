"""Every training method from the installed `evoforge` command, run from a folder outside the checkout with
PYTHONSAFEPATH set (no working directory or script folder on sys.path, in evoforge or in the training
processes it starts): a module that imports `tasks.critic` instead of `evoforge.tasks.critic` works under
pytest, whose root is the checkout, and fails here with ModuleNotFoundError."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from evoforge.data import schemas

pytestmark = [pytest.mark.model, pytest.mark.server]  # the stage's own Prefect server


def seed_every_methods_rows(run: str) -> None:
    """The tables each method reads, as the stages before finetune leave them (flows/finetune.py training_data)."""
    from evoforge.data.lake import lake

    store = lake()
    solution = lambda i: f"{i} + 4 = {i + 4}. The answer is \\boxed{{{i + 4}}}."  # noqa: E731
    ids = [f"p{i}" for i in range(4)]
    table = lambda rows, schema: pa.Table.from_pylist(rows, schema=schema)  # noqa: E731
    store.publish_stage(run, 0, "ingest", {"problems": table([
        dict(problem_id=p, question=f"What is {i} + 4?", answer=str(i + 4), source="t", source_file="f", source_row=i,
             origin="seed", expert_answer=solution(i)) for i, p in enumerate(ids)], schemas.PROBLEMS)})
    store.publish_stage(run, 0, "generate", {"rollouts": table([
        dict(rollout_id=f"r{i}", problem_id=p, model_id="m", seed=i, sample_index=0, text=f"\\boxed{{{i}}}",
             completion_tokens=4, finish_reason="stop", mean_logprob=-1.0) for i, p in enumerate(ids)], schemas.ROLLOUTS)})
    store.publish_stage(run, 0, "critic", {"judgments": table([
        dict(judgment_id=f"j{i}", problem_id=p, rollout_id=f"r{i}", order="policy_first", label="expert", parsed_ok=True,
             critic_reward=1.0, policy_reward=0.0, critic_model_id="m") for i, p in enumerate(ids)], schemas.JUDGMENTS)})
    store.publish_stage(run, 0, "synthesize", {"problems": schemas.PROBLEMS.empty_table()})
    store.publish_stage(run, 0, "pairs", {
        "sft_examples": table([dict(example_id=f"e{i}", problem_id=p, rollout_id=f"r{i}", prompt=f"What is {i} + 4?",
                                    completion=solution(i), bucket="learnable", origin="seed") for i, p in enumerate(ids)],
                              schemas.SFT_EXAMPLES),
        "pairs": table([dict(pair_id=f"{kind}{i}", kind=kind, problem_id=p, prompt=f"What is {i} + 4?",
                             prefix="x = 1\n" if kind == "step" else None, chosen=solution(i),
                             rejected=f"The answer is \\boxed{{{i}}}.", chosen_rollout_id="a", rejected_rollout_id="b",
                             chosen_score=1.0, rejected_score=-1.0) for i, p in enumerate(ids) for kind in ("solution", "step")],
                       schemas.PAIRS)})
    store.publish_stage(run, 0, "mcts", {"mcts_nodes": schemas.MCTS_NODES.empty_table(), "traces": table([
        dict(trace_id=f"t{i}", problem_id=p, tree_id="t", node_ids=["a"], prompt=f"What is {i} + 4?",
             completion=f"x = {i} + 4\nprint(x)\n<end_of_step>\n<output>{i + 4}</output>\nThe answer is \\boxed{{{i + 4}}}",
             answer=str(i + 4), mean_q=1.0, depth=1) for i, p in enumerate(ids)], schemas.TRACES)})


def test_every_method_and_the_ppm_train_from_the_installed_command_outside_the_checkout(runs_root, tiny_model, scratch):
    from evoforge.data.lake import lake

    run = "installed"
    seed_every_methods_rows(run)
    methods = "sft+dpo+traces+grpo+raro+svs"
    config = {"engine": {"model": str(tiny_model), "max_model_len": 1024},
              "critic": {"sampling": {"n": 1, "max_tokens": 8, "temperature": 1.0}},
              "finetune": {"method": methods, "train_ppm": True, "max_steps": 1, "batch_size": 4, "learning_rate": 1e-3,
                           "grpo": {"generations": 4, "max_completion_tokens": 8, "problems": "all"},
                           "few_shot": False, "report_to": [], "guard": {"held_out_rows": 0}},
              "stages": ["finetune"]}
    path = scratch / "round.json"
    path.write_text(json.dumps(config))
    outside = scratch / "elsewhere"  # not the checkout's root: nothing of the checkout is importable from here
    outside.mkdir()
    command = Path(sys.executable).with_name("evoforge")
    env = {**os.environ, "EVOFORGE_RUNS": str(runs_root), "PYTHONSAFEPATH": "1"}
    env.pop("PYTHONPATH", None)
    done = subprocess.run([str(command), "stage", "finetune", "--run", run, "--round", "0", "--config", str(path)],
                          cwd=outside, env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = {r["role"]: r for r in lake().read(run, "checkpoints", 0, "finetune").to_pylist()}
    assert rows["policy"]["method"] == methods and rows["policy"]["steps"] == 6  # one step of each method, in order
    assert rows["ppm"]["steps"] == 1
    metrics = lake().read(run, "train_metrics", 0, "finetune").to_pylist()
    policy = [m for m in metrics if m["checkpoint_id"] == rows["policy"]["checkpoint_id"]]
    losses = sorted((m["step"], m["metric"]) for m in policy if m["metric"].endswith("/loss"))
    assert losses == [(i + 1, f"{method}/loss") for i, method in enumerate(methods.split("+"))]  # a metric per method
    # RARO's step: rewarded by the model's own critic, which the broken import never reached from this command
    assert {m["metric"] for m in policy if m["step"] == 5} >= {"raro/rewards/raro/mean", "raro/raro/critic_rows_unparseable"}
