"""verify flow: the round's `rollouts` -> `verdicts`, streamed: rollouts are read part by part and
verdicts written as they are graded, so memory does not grow with the round."""
from __future__ import annotations

from functools import partial

from prefect import flow

from evoforge.data.chunks import Chunks
from evoforge.flows.config import RoundConfig, config_hash
from evoforge.flows.inputs import StageInputs, problem_pool, round_stream, stage_config
from evoforge.flows.spread import range_workers, spread_stage
from evoforge.flows.stage_runner import StageResult, execute_stage
from evoforge.tasks.verify import boxed_rollouts, verdicts_of_range, verify_batches, verify_boundaries


@flow(name="verify", flow_run_name="{run}/round-{round}/verify")
def verify_flow(run: str, round: int, config: RoundConfig | None = None, force: bool = False) -> StageResult:
    """Rerunnable alone: with no config, the run's saved one; the round's policy either way."""
    config = stage_config(run, round, config)
    rollouts = round_stream(run, round, "rollouts", "generate", ["rollout_id", "problem_id", "text"])
    # graders on Ray spread over the cluster already, from one process that holds the connection (a worker
    # of its own would each connect, or start a local cluster when no address is set)
    workers = 1 if config.verify.backend == "ray" else range_workers(config.cluster, rollouts.rows)
    if workers == 1:
        config.verify.pool()  # the process's graders start in the background while the input is found and read
    golds = problem_pool(run, round, ["problem_id", "answer"]).select(["problem_id", "answer"])
    inputs = StageInputs(rollouts, golds)

    def compute(chunks: Chunks) -> dict:
        if workers == 1:
            return {"verdicts": verify_batches(inputs.reader(rollouts), golds, config.verify, chunks, total=rollouts.rows)}
        # each worker grades its ranges on graders of its own: `verify.workers` shared among them, one each at least
        graders = config.verify.model_copy(update={"workers": max(1, -(-config.verify.workers // workers))})
        spread = spread_stage(run, round, "verify", inputs, {"rollouts": [rollouts], "golds": [golds]},
                              verify_boundaries(golds, rollouts.rows), partial(verdicts_of_range, graders, chunks),
                              ("verdicts",), workers, prepare={"rollouts": boxed_rollouts})
        counts = spread.returned.get("verify_chunks")
        if counts is not None:
            chunks.reused += sum(counts["reused"].to_pylist())
            chunks.computed += sum(counts["computed"].to_pylist())
        return {"verdicts": spread.parts["verdicts"]}

    return execute_stage(
        run, round, "verify",
        config_hash=config_hash(config.verify.grading_settings()),
        model_id=None,
        input_fingerprint=inputs,  # hashed as verify reads the rollouts: read once
        rows_in=rollouts.rows,
        compute=compute,
        force=force,
    )
