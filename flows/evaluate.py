"""evaluate flow: held-out pass@k of the round's policy -> `evals`. Round 0 also measures the
starting model, so every later round has a baseline."""
from __future__ import annotations

import pyarrow as pa
from prefect import flow

from evoforge.data.ids import fingerprint_tables
from evoforge.flows.config import RoundConfig, config_hash, resolve_path
from evoforge.flows.inputs import MissingInput, checkpoint, stage_config
from evoforge.flows.stage_runner import StageResult, execute_stage
from evoforge.models.loader import load_engine, model_id_for
from evoforge.tasks.evaluate import evaluate
from evoforge.tasks.ingest import load_eval_set


@flow(name="evaluate", flow_run_name="{run}/round-{round}/evaluate")
def evaluate_flow(run: str, round: int, config: RoundConfig | None = None, force: bool = False) -> StageResult:
    """Rerunnable alone: with no config, the run's saved one; the round's policy either way."""
    config = stage_config(run, round, config)
    if not config.evaluate.sets:
        raise MissingInput("evaluate: the config names no evaluation sets (evaluate.sets)")
    sets = {s.name: load_eval_set(s, resolve_path("."), s.limit) for s in config.evaluate.sets}
    models = []  # (engine config, model_round)
    if round == 0:
        models.append((config.engine, 0))
    trained = checkpoint(run, round, "policy")
    if trained is not None:
        models.append((config.engine.model_copy(update={"model": trained["path"]}), round + 1))
    elif round > 0:
        models.append((config.engine, round))

    def compute(chunks) -> dict[str, pa.Table]:
        tables = []
        for engine_config, model_round in models:
            tables.append(evaluate(sets, load_engine(engine_config), config.evaluate, config.verify, model_round,
                                   chunks.sub(f"model-{model_round}")))
        return {"evals": pa.concat_tables(tables)}

    return execute_stage(
        run, round, "evaluate",
        config_hash=config_hash({"evaluate": config.evaluate.model_dump(mode="json"),
                                 "models": [m.model_dump(mode="json") for m, _ in models]}),
        model_id=",".join(model_id_for(m) for m, _ in models),
        input_fingerprint=fingerprint_tables(*sets.values()),
        rows_in=sum(t.num_rows for t in sets.values()),
        compute=compute,
        force=force,
    )
