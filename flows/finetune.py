"""finetune flow: each method's rows of the round (its module's `training_rows`) -> a
checkpoint folder, registered in `checkpoints`, with per-step `train_metrics`. The next round's engine
loads the folder; with `train_ppm`, the process preference model is trained and registered beside it."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
from prefect import flow

from evoforge.data import schemas
from evoforge.data.ids import fingerprint_table, stable_hash
from evoforge.data.lake import lake
from evoforge.data.storage import LakePath, is_remote, upload_tree
from evoforge.flows.config import RoundConfig, config_hash
from evoforge.flows.inputs import problem_pool, problems_with_experts, round_table, stage_config, stage_output
from evoforge.flows.prefect_tasks import train_policy, train_ppm
from evoforge.flows.stage_runner import StageResult, execute_stage
from evoforge.models import checkpoint_store
from evoforge.models.loader import release_engines
from evoforge.models.registry import ResolvedModel, base_record, folder_hash, resolve
from evoforge.tasks.finetune import ppm
from evoforge.tasks.finetune.adapters import is_adapter
from evoforge.tasks.finetune.training import METHOD_MODULES, TrackerRun, TrainingContext
from evoforge.tasks.progress import flow_run_logger


@dataclass(frozen=True)
class LakeRoundInputs:
    """What a method's `training_rows` reads (tasks/finetune/rows.py `RoundInputs`), from the lake: a
    missing input names the command that makes it (MissingInput)."""
    run: str
    round: int

    def round_table(self, table: str, made_by: str) -> pa.Table:
        return round_table(self.run, self.round, table, made_by)

    def stage_output(self, table: str, made_by: str) -> pa.Table:
        return stage_output(self.run, self.round, table, made_by)

    def problem_pool(self) -> pa.Table:
        return problem_pool(self.run, self.round)

    def problems_with_experts(self) -> pa.Table:
        return problems_with_experts(self.run, self.round)

    def every_round(self, table: str, made_by: str) -> pa.Table:
        return lake().read(self.run, table, stage=made_by)


def training_data(run: str, round: int, methods: list[str], config: RoundConfig | None = None) -> dict[str, pa.Table]:
    """Each method's rows for this round, as its module selects them (`training_rows`: sft the
    sft_examples, traces the MCTS traces, dpo the solution pairs, grpo and svs the problems, raro both
    roles' rows)."""
    config = config or RoundConfig()
    inputs = LakeRoundInputs(run, round)
    return {method: METHOD_MODULES[method].training_rows(inputs, config.finetune) for method in methods}


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

    step_pairs = ppm.training_rows(LakeRoundInputs(run, round), config.finetune) if config.finetune.train_ppm else None
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
