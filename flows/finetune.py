"""finetune flow: each method's rows of the round (tasks/finetune/training.py METHOD_TABLES) -> a
checkpoint folder, registered in `checkpoints`, with per-step `train_metrics`. The next round's engine
loads the folder; with `train_ppm`, the process preference model is trained and registered beside it."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from prefect import flow

from evoforge.data import schemas
from evoforge.data.ids import fingerprint_table, stable_hash
from evoforge.data.lake import lake
from evoforge.data.storage import LakePath, is_remote, upload_tree
from evoforge.flows.config import RoundConfig, config_hash
from evoforge.flows.inputs import (MissingInput, problem_pool, problems_with_experts, round_table, stage_config,
                                   stage_output)
from evoforge.flows.stage_runner import StageResult, execute_stage
from evoforge.models import checkpoint_store
from evoforge.models.loader import release_engines
from evoforge.models.registry import ResolvedModel, base_record, folder_hash, resolve
from evoforge.tasks.critic import raro_training_rows
from evoforge.tasks.finetune.adapters import is_adapter
from evoforge.tasks.finetune.launch import train_policy, train_ppm
from evoforge.tasks.finetune.training import METHOD_TABLES, TrackerRun, TrainingContext
from evoforge.tasks.progress import flow_run_logger


def training_data(run: str, round: int, methods: list[str], config: RoundConfig | None = None) -> dict[str, pa.Table]:
    """Each method's rows for this round, from its table (METHOD_TABLES): sft -> sft_examples, traces ->
    the MCTS traces, dpo -> solution pairs, grpo -> problems (the round's learnable ones, or all with
    `grpo_problems: all`, and the variants it kept, each with the answer the reward checks), raro ->
    both roles' rows (see `raro_rows`)."""
    config = config or RoundConfig()
    data: dict[str, pa.Table] = {}
    for method in methods:
        table = METHOD_TABLES[method]
        if method == "sft":
            data[method] = round_table(run, round, table, "pairs")
        elif method == "traces":
            data[method] = stage_output(run, round, table, "mcts")
        elif method == "dpo":
            pairs = round_table(run, round, table, "pairs")
            data[method] = pairs.filter(pc.equal(pairs["kind"], "solution"))
        elif method == "raro":
            data[method] = raro_rows(run, round, config)
        elif method in ("grpo", "svs"):  # svs: the same problems, solved and synthesized from online
            pool = problem_pool(run, round).select(["problem_id", "question", "answer"])
            pool = pool.filter(pc.invert(pc.is_null(pool["answer"])))
            if config.finetune.grpo_problems == "learnable":
                stats = round_table(run, round, "problem_stats", "filter")
                pool = pool.filter(pc.is_in(pool["problem_id"], stats.filter(pc.equal(stats["bucket"], "learnable"))["problem_id"]))
            kept = stage_output(run, round, table, "synthesize").select(["problem_id", "question", "answer"])
            data[method] = pa.concat_tables([pool, kept])
    return data


def compared_answers(run: str, rounds: list[int], problems: pa.Table) -> pa.Table:
    """The comparisons the critic judged in `rounds`: problem_id, question, expert_answer, policy_answer,
    order, round, newest round first. `problems`: a pool holding those rounds' problems."""
    store = lake()
    in_rounds = lambda table: table.filter(pc.is_in(table["round"], pa.array(rounds, pa.int32())))  # noqa: E731
    judgments = in_rounds(store.read(run, "judgments", stage="critic")).select(["problem_id", "rollout_id", "order", "round"])
    # a policy that did not change between rounds writes the same rollout ids again: join within a round
    rollouts = in_rounds(store.read(run, "rollouts", stage="generate")).select(["rollout_id", "round", "text"])
    joined = judgments.join(rollouts, ["rollout_id", "round"]).join(
        problems.select(["problem_id", "question", "expert_answer"]), "problem_id")
    joined = joined.rename_columns(["policy_answer" if name == "text" else name for name in joined.column_names])
    return joined.sort_by([("round", "descending"), ("rollout_id", "ascending")])


def raro_rows(run: str, round: int, config: RoundConfig) -> pa.Table:
    """RARO's two roles: every problem with an expert answer asks the policy; the critic role gets this
    round's judged comparisons (fresh) and, from the replay buffer, the latest `critic.replay_size` of
    earlier rounds', half and half."""
    problems = problems_with_experts(run, round)
    fresh = compared_answers(run, [round], problems)
    if fresh.num_rows == 0:
        raise MissingInput(f"run {run!r} round {round} has no judgments: run `evoforge stage critic --run {run} "
                           f"--round {round}` before RARO training")
    replay = compared_answers(run, list(range(round)), problems).slice(0, config.critic.replay_size)
    return raro_training_rows(problems, fresh, replay, config.critic, seed=config.finetune.seed + round)


def _registry_row(checkpoint_id: str, parent_model_id: str, role: str, method: str, folder: LakePath, trained: Path,
                  data_fp: str, rows: int, result: dict, tracking: LakePath | None) -> dict:
    """`path` is where every machine finds it (a folder, or an s3:// prefix); the id hashes the weights
    (an adapter's: the adapter's)."""
    base = base_record(trained)
    return dict(checkpoint_id=checkpoint_id, parent_model_id=parent_model_id, role=role, method=method,
                path=str(folder), model_id=f"{checkpoint_id}@{folder_hash(trained)}", data_fingerprint=data_fp,
                train_rows=rows, steps=result["steps"], final_loss=result["final_loss"],
                wall_seconds=result["wall_seconds"], stopped_early=result.get("stopped_early"),
                base_model_id=base["model_id"] if base else None, adapter=is_adapter(trained),
                processes=result["processes"], tracking=str(tracking) if tracking is not None else None)


def _base_model(reference: str, parent: ResolvedModel) -> dict:
    """What an adapter checkpoint records of the model it loads on: a continued adapter keeps its base; a
    fresh one names the round's policy as the config names it ('default', a hub id, an s3:// checkpoint), or
    by its absolute folder."""
    if parent.adapter is not None:
        return base_record(parent.adapter)
    local = Path(reference).expanduser()
    return {"reference": parent.path if local.is_dir() else reference, "model_id": parent.model_id}


def _tracker(config: RoundConfig, run: str, checkpoint_id: str) -> tuple[TrackerRun | None, LakePath | None]:
    """The tracker run of one checkpoint and where its TensorBoard files end up (None: no local tracker)."""
    if not config.finetune.report_to:
        return None, None
    params = config.model_dump(mode="json")
    if "tensorboard" not in config.finetune.report_to:
        return TrackerRun(checkpoint_id, None, params), None
    home_of_files = lake().run_dir(run) / "tracking" / checkpoint_id
    local = checkpoint_store.training_folder(home_of_files)  # on object storage: written here, uploaded after
    return TrackerRun(checkpoint_id, str(local), params), home_of_files


def _publish_tracking(tracker: TrackerRun | None, target: LakePath | None) -> None:
    if tracker is not None and target is not None and is_remote(target) and Path(tracker.folder).exists():
        upload_tree(Path(tracker.folder), target)


def _metric_rows(checkpoint_id: str, result: dict, by_method: bool) -> list[dict]:
    """One row per logged number; a chain names them by method, so sft loss and grpo loss stay apart."""
    return [dict(checkpoint_id=checkpoint_id, step=m["step"], metric=f"{m['method']}/{k}" if by_method else k, value=v)
            for m in result["metrics"] for k, v in m.items() if k not in ("step", "method")]


@flow(name="finetune", flow_run_name="{run}/round-{round}/finetune")
def finetune_flow(run: str, round: int, config: RoundConfig | None = None, force: bool = False) -> StageResult:
    """Rerunnable alone: with no config, the run's saved one; the round's policy either way."""
    config = stage_config(run, round, config)
    data = training_data(run, round, config.finetune.methods, config)
    empty = [m for m, t in data.items() if t.num_rows == 0]
    data = {m: t for m, t in data.items() if t.num_rows}  # a chain trains with the methods that have rows
    method = "+".join(data)
    train_config = config.finetune.model_copy(update={"method": method}) if data else config.finetune
    rows_in = sum(t.num_rows for t in data.values())
    parent = resolve(config.engine.model)
    data_fp = stable_hash(*(f"{m}:{fingerprint_table(t)}" for m, t in data.items()))
    # the grader's settings decide GRPO's rewards, so they are part of what a grpo checkpoint depends on
    settings = config_hash({"finetune": config.finetune.model_dump(mode="json"),
                            **({"verify": config.verify.grading_settings()} if {"grpo", "svs"} & set(data) else {}),
                            **({"critic": config.critic.model_dump(mode="json")} if "raro" in data else {})})
    models = lake().run_dir(run) / "models"
    logs = lake().log_dir(run)
    checkpoint_id = f"r{round}-{method.replace('+', '-')}-{stable_hash(parent.model_id, data_fp, settings, length=8)}"
    folder = models / checkpoint_id

    step_pairs = None
    if config.finetune.train_ppm:
        pairs = stage_output(run, round, "pairs", "pairs")
        step_pairs = pairs.filter(pc.equal(pairs["kind"], "step"))
    input_fp = data_fp if step_pairs is None else stable_hash(data_fp, "ppm", fingerprint_table(step_pairs))
    ppm_id = f"r{round}-ppm-{stable_hash(parent.model_id, input_fp, settings, length=8)}"
    ppm_folder = models / ppm_id
    trains_ppm = step_pairs is not None and step_pairs.num_rows > 0

    def compute(_chunks) -> dict[str, pa.Table]:  # the trainer resumes from its own staging folder
        if empty:
            flow_run_logger().warning(f"finetune (run {run}, round {round}): no rows for {', '.join(empty)}"
                                 + (f"; training with {method} only" if data else "; the policy is unchanged"))
        checkpoints, metrics, variants = [], [], []
        if data or trains_ppm:
            release_engines()  # the policy is about to change, and training wants the memory
        starting_weights = parent.adapter or parent.path  # an adapter checkpoint trains on with its base
        if data:
            context = TrainingContext(verify=config.verify, critic=config.critic)
            trained = checkpoint_store.training_folder(folder)
            tracker, tracking = _tracker(config, run, checkpoint_id)
            result = train_policy(starting_weights, data, train_config, trained, context, resume=not force_retrain,
                                  tracker=tracker, base_model=_base_model(config.engine.model, parent),
                                  log_path=logs / f"finetune-{checkpoint_id}.log")
            checkpoint_store.publish(trained, folder)  # on object storage: uploaded, its manifest last
            _publish_tracking(tracker, tracking)
            checkpoints.append(_registry_row(checkpoint_id, parent.model_id, "policy", method, folder, trained,
                                             data_fp, rows_in, result, tracking))
            metrics += _metric_rows(checkpoint_id, result, by_method=len(data) > 1)
            variants += result.get("tables", {}).get("variants", [])  # svs: the variants the policy wrote while training
        if step_pairs is not None and not trains_ppm:
            flow_run_logger().warning(f"finetune (run {run}, round {round}): no step pairs; no PPM this round")
        if trains_ppm:  # the PPM starts from the round's policy, as in rStar-Math
            trained = checkpoint_store.training_folder(ppm_folder)
            tracker, tracking = _tracker(config, run, ppm_id)
            result = train_ppm(starting_weights, step_pairs, config.finetune, trained, resume=not force_retrain,
                               tracker=tracker, log_path=logs / f"finetune-{ppm_id}.log")
            checkpoint_store.publish(trained, ppm_folder)
            _publish_tracking(tracker, tracking)
            checkpoints.append(_registry_row(ppm_id, parent.model_id, "ppm", "ppm", ppm_folder, trained,
                                             fingerprint_table(step_pairs), step_pairs.num_rows, result, tracking))
            metrics += _metric_rows(ppm_id, result, by_method=False)
        return {"checkpoints": pa.Table.from_pylist(checkpoints, schema=schemas.CHECKPOINTS),
                "train_metrics": pa.Table.from_pylist(metrics, schema=schemas.TRAIN_METRICS),
                "variants": pa.Table.from_pylist(variants, schema=schemas.VARIANTS)}

    force_retrain = force  # --force trains from scratch; otherwise an interrupted training resumes from its state
    if (data and not checkpoint_store.is_published(folder)) or (trains_ppm and not checkpoint_store.is_published(ppm_folder)):
        force = True  # the registry row alone is not a checkpoint: the stage runs again (and its trainer resumes)
    return execute_stage(
        run, round, "finetune", config_hash=settings, model_id=parent.model_id, input_fingerprint=input_fp,
        rows_in=rows_in + (step_pairs.num_rows if step_pairs is not None else 0), compute=compute, force=force,
    )
