"""The finetune stage trains in processes of its own, started by accelerate (or Ray Train across machines):
two processes (DDP over gloo here, one core each) reach the loss one process reaches with the same global
batch, every method trains under them, nothing is left running afterwards, and a stage killed with
kill -9 takes its trainers with it and resumes from their last saved state."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from evoforge.data import home, schemas
from waiting import wait_until

WORKER = "evoforge.tasks.finetune.worker"


def trainers(marker: str = WORKER, but: str | None = None) -> list[int]:
    """The pids of processes whose command line holds `marker` (a training process, a job's path), and not `but`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if marker in command and (but is None or but not in command):
                found.append(int(entry.name))
    return found


def seed_round(run: str, problems: int = 8, examples: int = 16) -> None:
    """A round's tables as the stages before finetune leave them: problems, their stats (all learnable), no
    kept variants, and SFT examples."""
    from evoforge.data.lake import lake

    store = lake()
    store.publish_stage(run, 0, "ingest", {"problems": pa.Table.from_pylist([
        dict(problem_id=f"p{i}", question=f"What is {i} + 4?", answer=str(i + 4), source="t", source_file="f",
             source_row=i, origin="seed") for i in range(problems)], schema=schemas.PROBLEMS)})
    store.publish_stage(run, 0, "filter", {"problem_stats": pa.Table.from_pylist([
        dict(problem_id=f"p{i}", n=8, correct=4, accuracy=0.5, bucket="learnable") for i in range(problems)],
        schema=schemas.PROBLEM_STATS)})
    store.publish_stage(run, 0, "synthesize", {"problems": schemas.PROBLEMS.empty_table()})
    store.publish_stage(run, 0, "pairs", {"sft_examples": pa.Table.from_pylist([
        dict(example_id=f"e{i}", problem_id=f"p{i % problems}", rollout_id=f"r{i}", prompt=f"What is {i} + {i + 3}?",
             completion=f"{i} + {i + 3} = {2 * i + 3}.\n\\boxed{{{2 * i + 3}}}", bucket="learnable", origin="seed")
        for i in range(examples)], schema=schemas.SFT_EXAMPLES)})


def round_config(tiny_model, **finetune):
    from evoforge.flows.config import RoundConfig

    return RoundConfig.model_validate({"engine": {"model": str(tiny_model), "max_model_len": 1024},
                                       "finetune": {"learning_rate": 1e-3, "few_shot": False, "guard": {"held_out_rows": 0},
                                                    **finetune}})


def finetune(run: str, config) -> tuple[dict, list[dict]]:
    """Run the finetune stage; its checkpoint row and its train_metrics rows."""
    from evoforge.data.lake import lake
    from evoforge.flows.finetune import finetune_flow

    result = finetune_flow(run, 0, config)
    assert result.status == "completed"
    (row,) = lake().read(run, "checkpoints", 0, "finetune").to_pylist()
    return row, lake().read(run, "train_metrics", 0, "finetune").to_pylist()


def last_loss(metrics: list[dict]) -> float:
    return max((m for m in metrics if m["metric"].endswith("loss") and "guard" not in m["metric"]),
               key=lambda m: m["step"])["value"]


@pytest.mark.model
@pytest.mark.server
@pytest.mark.parametrize("method", ["sft", "grpo"])
def test_two_processes_train_what_one_does_with_the_same_global_batch(prefect_server, runs_root, tiny_model, method):
    # grpo samples through vLLM, an engine in each training process
    per_step = dict(sft={"batch_size": 4}, grpo={"batch_size": 8, "grpo": {"generations": 4, "max_completion_tokens": 8}})[method]
    rows = {}
    for processes in (1, 2):
        run = f"{method}-{processes}"
        seed_round(run)
        batch = {**per_step, "batch_size": per_step["batch_size"] // processes}  # the same global batch
        config = round_config(tiny_model, method=method, max_steps=3, processes=processes, **batch)
        row, metrics = finetune(run, config)
        assert row["processes"] == processes and row["adapter"] is False and row["base_model_id"] is None
        assert (Path(row["path"]) / "model.safetensors").exists() and row["steps"] == 3
        assert sorted({m["step"] for m in metrics if m["metric"] == "loss"}) == [1, 2, 3]
        if method == "grpo":
            assert {m["value"] for m in metrics if m["metric"] == "vllm/staleness_steps"} == {0.0}
        assert not trainers(f".{Path(row['path']).name}.job")  # every training process is gone
        rows[processes] = last_loss(metrics)
        tracked(row, metrics)
    assert math.isfinite(rows[1]) and abs(rows[2] - rows[1]) <= 0.02 * abs(rows[1]) + 1e-6, rows
    assert not trainers()


def tracked(row: dict, metrics: list[dict]) -> None:
    """The checkpoint's TensorBoard run (the default tracker): under the run, named by the checkpoint id, the
    losses train_metrics has, and the round config as the run's parameters."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder = Path(row["tracking"])
    assert folder.name == row["checkpoint_id"] and folder.parent.name == "tracking"
    events = EventAccumulator(str(folder)).Reload()
    losses = {e.step: e.value for e in events.Scalars("train/loss")}
    assert losses == pytest.approx({m["step"]: m["value"] for m in metrics if m["metric"] == "loss"}, rel=1e-5)
    config = events.Tensors("round_config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "finetune:" in config and f"processes: {row['processes']}" in config


@pytest.mark.model
def test_a_trainer_that_fails_is_one_line_naming_its_log(tiny_model, scratch):
    from evoforge.tasks.finetune.config import FinetuneConfig
    from evoforge.tasks.finetune.launch import LAUNCHER_ERRORS, TrainingFailed, train_policy

    broken = scratch / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    rows = pa.Table.from_pylist([dict(prompt="1 + 1?", completion="\\boxed{2}")] * 4)
    output = scratch / f"ckpt-{scratch.name[-8:]}"  # the log is named by the checkpoint: one of this test's own
    with pytest.raises(TrainingFailed) as caught:
        train_policy(str(broken), {"sft": rows}, FinetuneConfig(report_to=[]), output)
    message = str(caught.value)
    log = home.home() / "logs" / "finetune" / f"{output.name}.log"
    assert "\n" not in message and message.startswith("finetune: the training processes failed (exit 1): ")
    assert message.endswith(f"; log: {log}") and "Error" in message.split(": ", 2)[2]
    assert not any(name in message for name in LAUNCHER_ERRORS)  # the trainer's own error, not accelerate's report of it
    assert "Traceback" in log.read_text() and not output.exists() and not trainers()
    log.unlink()


@pytest.mark.model
def test_every_method_and_the_ppm_train_under_two_processes(tiny_model, scratch):
    """A chain of every policy method with the collapse guard on, and the PPM, each launched as two processes."""
    from evoforge.tasks.critic import CriticConfig
    from evoforge.tasks.finetune.config import FinetuneConfig
    from evoforge.tasks.finetune.launch import train_policy, train_ppm
    from evoforge.tasks.finetune.raro import RaroConfig, build_rows
    from evoforge.tasks.finetune.training import TrainingContext

    solution = lambda i: f"{i} + 4 = {i + 4}. The answer is \\boxed{{{i + 4}}}."  # noqa: E731
    sft = pa.Table.from_pylist([dict(prompt=f"What is {i} + 4?", completion=solution(i)) for i in range(8)])
    pairs = pa.Table.from_pylist([
        dict(pair_id=str(i), kind=kind, problem_id=f"p{i}", prompt=f"What is {i} + 4?", prefix="x = 1\n" if kind == "step" else None,
             chosen=solution(i), rejected=f"The answer is \\boxed{{{i}}}.", chosen_rollout_id="a", rejected_rollout_id="b",
             chosen_score=1.0, rejected_score=-1.0) for i in range(8) for kind in ("solution", "step")], schema=schemas.PAIRS)
    traces = pa.Table.from_pylist([dict(trace_id=str(i), problem_id=f"p{i}", tree_id="t", node_ids=["a"], prompt=f"What is {i} + 4?",
                                        completion=f"x = {i} + 4\nprint(x)\n<end_of_step>\n<output>{i + 4}</output>\n"
                                                   f"The answer is \\boxed{{{i + 4}}}", answer=str(i + 4), mean_q=1.0, depth=1)
                                   for i in range(8)], schema=schemas.TRACES)
    problems = pa.Table.from_pylist([dict(problem_id=f"p{i}", question=f"What is {i} + 4?", answer=str(i + 4),
                                          expert_answer=solution(i)) for i in range(4)])
    compared = pa.Table.from_pylist([dict(problem_id=f"p{i}", question=f"What is {i} + 4?", expert_answer=solution(i),
                                          policy_answer="\\boxed{1}", order="policy_first") for i in range(4)])
    critic = CriticConfig(sampling={"n": 1, "max_tokens": 8, "temperature": 1.0})
    raro = build_rows(problems, compared, compared.slice(0, 0), RaroConfig())
    config = FinetuneConfig(method="sft+dpo+traces+grpo+raro", max_steps=2, batch_size=4, learning_rate=1e-3,
                            grpo={"generations": 4, "max_completion_tokens": 8}, few_shot=False, processes=2, generation="hf",
                            report_to=[], guard={"eval_steps": 1, "held_out_rows": 1, "held_out_share": 0.25, "max_loss_rise": 1e6})
    data = {"sft": sft, "dpo": pairs, "traces": traces, "grpo": problems, "raro": raro}
    result = train_policy(str(tiny_model), data, config, scratch / "chain", TrainingContext(critic=critic))
    assert result["processes"] == 2 and result["steps"] == 10 and result["stopped_early"] is None
    assert [m["method"] for m in result["metrics"] if "loss" in m] == [m for m in config.methods for _ in range(2)]
    assert [m["step"] for m in result["metrics"] if "guard_loss" in m] == [0, 1, 2, 2, 3, 4, 4, 5, 6]  # sft, dpo, traces: each a baseline, then every step
    assert (scratch / "chain" / "model.safetensors").exists()
    ppm = train_ppm(str(scratch / "chain"), pairs, config.model_copy(update={"method": "sft"}), scratch / "ppm")
    assert ppm["processes"] == 2 and ppm["steps"] == 2 and math.isfinite(ppm["final_loss"])
    from transformers import AutoModelForSequenceClassification

    assert AutoModelForSequenceClassification.from_pretrained(scratch / "ppm").config.num_labels == 1
    assert not trainers()


def finetune_stage_until_saved(run: str, config: dict, runs_root: Path, scratch: Path, phase: str):
    """`evoforge stage finetune` of `run` with `config`, started in a process of its own and returned once its
    trainer folder `phase` (e.g. trainer-0-sft) has saved step 2 or a later one: the process, the step saved,
    and the command and environment that run the stage again."""
    path = scratch / "round.json"
    path.write_text(json.dumps(config))
    command = [sys.executable, "-m", "evoforge", "stage", "finetune", "--run", run, "--round", "0", "--config", str(path)]
    env = {**os.environ, "EVOFORGE_RUNS": str(runs_root)}
    with open(scratch / "first.log", "wb") as out:
        first = subprocess.Popen(command, cwd=home.PROJECT_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    log = lambda: (scratch / "first.log").read_text()[-3000:]  # noqa: E731

    def saved_step() -> int | None:
        # The trainer keeps one checkpoint (save_total_limit=1): checkpoint-2 is gone once checkpoint-3 is saved,
        # which on a fast machine is a fraction of a second later, so any step from 2 on will do.
        steps = [int(found.name.removeprefix("checkpoint-"))
                 for found in (runs_root / run / "models").glob(f".*.staging/{phase}/checkpoint-*")
                 if found.name.removeprefix("checkpoint-").isdigit()]
        if max(steps, default=0) >= 2:
            return max(steps)
        if first.poll() is not None:
            raise AssertionError(f"the stage ended (exit {first.returncode}) before {phase} saved step 2\n{log()}")
        return None

    saved = wait_until(f"{phase} to save step 2", saved_step, timeout=600, every=0.05, explain=log)
    return first, saved, command, env


@pytest.mark.model
@pytest.mark.server
def test_a_stage_killed_mid_training_takes_its_trainers_with_it_and_resumes(runs_root, tiny_model, scratch):
    from evoforge.data.lake import lake

    run = "crash"
    seed_round(run, examples=48)
    # 24 steps: a CI machine has trained these at 3.2 a second, and the kill must land before the last one
    config = round_config(tiny_model, method="sft", max_steps=24, batch_size=1, processes=2, checkpoint_steps=1,
                          report_to=[])
    first, saved, command, env = finetune_stage_until_saved(
        run, {**config.model_dump(mode="json"), "stages": ["finetune"]}, runs_root, scratch, "trainer-0-sft")
    models = runs_root / run / "models"
    assert len(trainers(WORKER, but="accelerate.commands.launch")) == 2  # two training processes, under accelerate
    os.kill(first.pid, signal.SIGKILL)  # the stage's own process only: its trainers must follow it by themselves
    first.wait()
    wait_until("the trainers died with their stage", lambda: not trainers(WORKER) and not trainers("accelerate.commands.launch"),
               timeout=60)

    done = subprocess.run(command, cwd=home.PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (row,) = lake().read(run, "checkpoints", 0, "finetune").to_pylist()
    assert saved < 24 and row["steps"] == 24 and row["processes"] == 2 and (Path(row["path"]) / "model.safetensors").exists()
    assert [p.name for p in models.iterdir()] == [Path(row["path"]).name]  # one checkpoint, no staging left
    log = (lake().log_dir(run) / f"finetune-{row['checkpoint_id']}.log").read_text()
    assert "resuming from the trainer state saved at checkpoint-" in log
    steps = [m["step"] for m in lake().read(run, "train_metrics", 0, "finetune").to_pylist() if m["metric"] == "loss"]
    assert sorted(steps) == list(range(1, 25))  # the steps before the kill kept, none twice
    statuses = [e["status"] for e in lake().read(run, "stage_runs").to_pylist() if e["stage"] == "finetune"]
    assert statuses.count("interrupted") == 1 and statuses.count("completed") == 1
    assert not trainers()


@pytest.mark.model
def test_finetune_spans_two_ray_nodes_with_ray_train(tiny_model, scratch):
    """`launcher: ray`: Ray Train's workers on a two-node cluster (one CPU each) train as two DDP processes."""
    import ray
    from ray.cluster_utils import Cluster

    from evoforge.tasks.finetune.config import FinetuneConfig
    from evoforge.tasks.finetune.launch import train_policy

    if ray.is_initialized():
        ray.shutdown()
    temp = home.home() / ".tmp" / "ray"
    temp.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "temp_dir": str(temp)})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        rows = pa.Table.from_pylist([dict(prompt=f"What is {i} + 3?", completion=f"\\boxed{{{i + 3}}}") for i in range(8)])
        config = FinetuneConfig(method="sft", max_steps=3, batch_size=2, learning_rate=1e-3, few_shot=False, processes=2,
                                launcher="ray", ray_address=cluster.address, report_to=[], guard={"held_out_rows": 0})
        result = train_policy(str(tiny_model), {"sft": rows}, config, scratch / "ray")
        local = train_policy(str(tiny_model), {"sft": rows}, config.model_copy(update={"launcher": "accelerate"}),
                                scratch / "accelerate")
    finally:
        cluster.shutdown()
    assert result["processes"] == 2 and [m["step"] for m in result["metrics"]] == [1, 2, 3]
    assert (scratch / "ray" / "model.safetensors").exists()
    assert abs(result["final_loss"] - local["final_loss"]) <= 1e-3 * abs(local["final_loss"])  # the same DDP training
