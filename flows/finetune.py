"""finetune flow: the round's SFT selection (or DPO pairs) -> a checkpoint folder, registered in
`checkpoints`, with per-step `train_metrics`. The next round's engine loads the folder."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
from prefect import flow

from data import schemas
from data.lake import fingerprint_table
from flows.config import RoundConfig, config_hash
from flows.stage_runner import StageResult, execute_stage, lake
from flows.verify import round_table
from models.engine import release_engines
from models.registry import folder_hash, resolve
from tasks.finetune import finetune
from tasks.generate import stable_hash
from tasks.progress import run_logger


def trained_checkpoint(run: str, round_: int) -> dict | None:
    rows = lake().read(run, "checkpoints", round_, "finetune").to_pylist()
    return rows[0] if rows else None


@flow(name="finetune", flow_run_name="{run}/round-{round}/finetune")
def finetune_flow(run: str, round: int, config: RoundConfig, force: bool = False) -> StageResult:
    method = config.finetune.method
    if method == "dpo":
        data = round_table(run, round, "pairs", "pairs")
        data = data.filter(pc.equal(data["kind"], "solution"))
    else:
        data = round_table(run, round, "sft_examples", "pairs")
    parent = resolve(config.engine.model)
    data_fp = fingerprint_table(data)
    settings = config_hash(config.finetune)
    checkpoint_id = f"r{round}-{method}-{stable_hash(parent.model_id, data_fp, settings, length=8)}"
    folder = lake().run_dir(run) / "models" / checkpoint_id

    def compute() -> dict[str, pa.Table]:
        if data.num_rows == 0:  # nothing learnable this round: no checkpoint, the policy carries over
            run_logger().warning(f"finetune (run {run}, round {round}): no {method} rows; the policy is unchanged")
            return {"checkpoints": schemas.CHECKPOINTS.empty_table(), "train_metrics": schemas.TRAIN_METRICS.empty_table()}
        release_engines()  # the policy is about to change, and training wants the memory
        result = finetune(parent.path, data, config.finetune, folder)
        checkpoint = dict(
            checkpoint_id=checkpoint_id, parent_model_id=parent.model_id, role="policy", method=method,
            path=str(folder), model_id=f"{checkpoint_id}@{folder_hash(folder)}", data_fingerprint=data_fp,
            train_rows=data.num_rows, steps=result["steps"], final_loss=result["final_loss"],
            wall_seconds=result["wall_seconds"],
        )
        metrics = [dict(checkpoint_id=checkpoint_id, step=m["step"], metric=k, value=v)
                   for m in result["metrics"] for k, v in m.items() if k != "step"]
        return {"checkpoints": pa.Table.from_pylist([checkpoint]), "train_metrics": pa.Table.from_pylist(metrics)}

    if data.num_rows and not folder.exists():
        force = True  # the registry row alone is not a checkpoint
    return execute_stage(
        run, round, "finetune", config_hash=settings, model_id=parent.model_id, input_fingerprint=data_fp,
        rows_in=data.num_rows, compute=compute, force=force,
    )
