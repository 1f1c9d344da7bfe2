"""evaluate flow: the round's trained checkpoint and its baseline (the round's policy, the last
promoted model) on the held-out sets -> `eval_results`, `evals`, `score_intervals`, the held-out
`rollouts` and `verdicts`, and the gate's decision on the checkpoint (`promotions`).

The baseline is measured once: a later round reuses its `eval_results` from the round that measured
it (same sampling seed, same problems), and measures it again only when the sets or the sampling
changed. Round 0 always measures the starting model, so every later round has a baseline.

With `evaluate.search: ppm_best_of_n` the run's newest PPM (trained in this round or before) also picks one
of each problem's samples, for both models: a baseline measured in an earlier round is picked again from its
stored samples by the same PPM, so the paired change compares picks by one judge. The gate reads plain
sampling.
"""
from __future__ import annotations

from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc
from prefect import flow

from evoforge.data import schemas
from evoforge.data.ids import fingerprint_tables
from evoforge.data.lake import lake
from evoforge.flows.config import RoundConfig, config_hash, resolve_path
from evoforge.flows.inputs import MissingInput, checkpoint, round_policy, saved_config, with_policy
from evoforge.flows.prefect_tasks import evaluate
from evoforge.flows.stage_runner import StageResult, execute_stage
from evoforge.models.loader import load_engine, model_id_for
from evoforge.models.ppm import ppm_scorer
from evoforge.tasks.evaluate import (PLAIN, EvaluateConfig, held_out_entropy, plain_sampling, ppm_picks,
                                    score_intervals)
from evoforge.tasks.ingest import load_eval_set
from evoforge.tasks.progress import flow_run_logger
from evoforge.tasks.promotion import decide, gate_metric


def measured_before(run: str, round: int, model_id: str, sets: dict[str, pa.Table], settings_hash: str) -> pa.Table | None:
    """`model_id`'s `eval_results` from an earlier round's evaluate, when they cover exactly these sets'
    problems under the same sampling and grading (the newest such round); else None: measure it again."""
    if round == 0:
        return None
    earlier = lake().read(run, "eval_results", stage="evaluate")
    earlier = earlier.filter(pc.and_(pc.equal(earlier["model_id"], model_id), pc.less(earlier["round"], round)))
    earlier = earlier.filter(pc.equal(earlier["settings_hash"], settings_hash))  # a row from before the hash: null, never equal
    earlier = plain_sampling(earlier)  # picks are redone by today's PPM
    found = []
    for name, problems in sets.items():
        rows = earlier.filter(pc.equal(earlier["eval_set"], name))
        if rows.num_rows == 0:
            return None
        rows = rows.filter(pc.equal(rows["round"], pc.max(rows["round"])))
        if sorted(rows["problem_id"].to_pylist()) != sorted(problems["problem_id"].to_pylist()):
            return None
        found.append(rows.drop_columns(["round", "stage"]))
    return pa.concat_tables(found)


def promotion_row(config: EvaluateConfig, trained: dict, model_round: int, intervals: pa.Table,
                  baseline: pa.Table, new: pa.Table) -> dict:
    """The gate's decision on the round's checkpoint, from its paired intervals against the baseline."""
    metric = gate_metric(config.gate, config.pass_k)
    changes = [r for r in intervals.to_pylist() if r["metric"] == metric and (r["search"] or PLAIN) == PLAIN]
    baseline, new = plain_sampling(baseline), plain_sampling(new)
    entropies = {}
    for name in set(new["eval_set"].to_pylist()):
        before = baseline.filter(pc.equal(baseline["eval_set"], name))
        after = new.filter(pc.equal(new["eval_set"], name))
        if before.num_rows and after.num_rows:
            entropies[name] = (held_out_entropy(before), held_out_entropy(after))
    decision, why = decide(config.gate, changes, entropies, sorted(set(new["eval_set"].to_pylist())))
    return dict(checkpoint_id=trained["checkpoint_id"], model_id=trained["model_id"], model_round=model_round,
                decision=decision, why=why, decided_by="gate", rule=config.gate.describe(max(config.pass_k)),
                baseline_model_id=baseline["model_id"][0].as_py() if baseline.num_rows else None,
                decided_at=datetime.now(timezone.utc))


def newest_ppm(run: str, round: int) -> dict | None:
    """The PPM registered by this round's finetune, else by the latest round before it that trained one."""
    return next((found for r in range(round, -1, -1) if (found := checkpoint(run, r, "ppm")) is not None), None)


def repicked_baseline(run: str, baseline: pa.Table, sets: dict[str, pa.Table], scorer) -> pa.Table:
    """A baseline measured in an earlier round, picked again from its stored held-out samples by `scorer`."""
    store, picks = lake(), []
    for name, problems in sets.items():
        rows = baseline.filter(pc.equal(baseline["eval_set"], name))
        first = rows.slice(0, 1).to_pylist()[0]
        measured_in = _measured_round(run, first["model_id"], first["settings_hash"], name)
        rollouts = store.read(run, "rollouts", measured_in, "evaluate")
        rollouts = rollouts.filter(pc.and_(pc.equal(rollouts["model_id"], first["model_id"]),
                                           pc.is_in(rollouts["problem_id"], problems["problem_id"])))
        verdicts = store.read(run, "verdicts", measured_in, "evaluate")
        verdicts = verdicts.filter(pc.is_in(verdicts["rollout_id"], rollouts["rollout_id"]))
        picks.append(ppm_picks(problems, rollouts, verdicts, scorer, first["model_id"], first["model_round"], name,
                               first["settings_hash"]))
    return pa.concat_tables([baseline, *picks])


def _measured_round(run: str, model_id: str, settings_hash: str, eval_set: str) -> int:
    earlier = lake().read(run, "eval_results", stage="evaluate")
    mask = pc.and_(pc.and_(pc.equal(earlier["model_id"], model_id), pc.equal(earlier["settings_hash"], settings_hash)),
                   pc.equal(earlier["eval_set"], eval_set))
    return pc.max(earlier.filter(mask)["round"]).as_py()


@flow(name="evaluate", flow_run_name="{run}/round-{round}/evaluate")
def evaluate_flow(run: str, round: int, config: RoundConfig | None = None, force: bool = False) -> StageResult:
    """Rerunnable alone: with no config, the run's saved one; the round's policy either way."""
    run_wide = config if config is not None else saved_config(run)
    policy = round_policy(run, run_wide, round)
    config = with_policy(run_wide, policy)
    if not config.evaluate.sets:
        raise MissingInput("evaluate: the config names no evaluation sets (evaluate.sets)")
    sets = {s.name: load_eval_set(s, resolve_path("."), s.limit) for s in config.evaluate.sets}
    empty = [name for name, problems in sets.items() if problems.num_rows == 0]
    if empty:
        raise MissingInput(f"evaluate: held-out set(s) {', '.join(empty)} have no problems (check path and limit)")
    policy_id = model_id_for(config.engine)
    settings = config.evaluate.settings_hash(config.verify)
    baseline = measured_before(run, round, policy_id, sets, settings)
    trained = checkpoint(run, round, "policy")
    if trained is not None and trained["parent_model_id"] != policy_id:
        raise MissingInput(f"run {run!r} round {round}: the checkpoint {trained['checkpoint_id']} was trained from "
                           f"{trained['parent_model_id']}, but the round's policy is now {policy_id} (a promotion decision "
                           f"changed since): train it again, `evoforge stage finetune --run {run} --round {round}`")
    models = []  # (engine config, model_round)
    if baseline is None:
        models.append((config.engine, policy.model_round))
    if trained is not None:
        models.append((config.engine.model_copy(update={"model": trained["path"]}), round + 1))

    ppm = None
    if config.evaluate.search == "ppm_best_of_n":
        ppm = newest_ppm(run, round)
        if ppm is None:
            flow_run_logger().warning(f"evaluate (run {run}, round {round}): search is ppm_best_of_n but no round up to "
                                      f"{round} trained a PPM; plain sampling only")

    def compute(chunks) -> dict[str, pa.Table]:
        scorer = ppm_scorer(ppm)
        outputs = {model_round: evaluate(sets, load_engine(engine_config), config.evaluate, config.verify, model_round,
                                         chunks.sub(f"model-{model_round}"), ppm_scorer=scorer)
                   for engine_config, model_round in models}
        reference = baseline if baseline is not None else outputs[policy.model_round]["eval_results"]
        if baseline is not None and scorer is not None:
            reference = repicked_baseline(run, baseline, sets, scorer)
        intervals, promotions = [], []
        for model_round, tables in outputs.items():
            compared = reference if model_round == round + 1 else None
            intervals.append(score_intervals(tables["eval_results"], config.evaluate, compared))
        if trained is not None:
            new = outputs[round + 1]["eval_results"]
            promotions.append(promotion_row(config.evaluate, trained, round + 1, intervals[-1], reference, new))
            decided = promotions[-1]
            flow_run_logger().info(f"run {run}, round {round}: model {round + 1} ({trained['checkpoint_id']}) "
                                   f"{decided['decision'].upper()} against model {policy.model_round}: {decided['why']}")
        joined = {name: pa.concat_tables([t[name] for t in outputs.values()]) if outputs
                  else schemas.ROUND_TABLES[name].empty_table()
                  for name in ("rollouts", "verdicts", "eval_results", "evals")}
        return {**joined, "score_intervals": pa.concat_tables(intervals) if intervals else schemas.SCORE_INTERVALS.empty_table(),
                "promotions": pa.Table.from_pylist(promotions, schema=schemas.PROMOTIONS)}

    return execute_stage(
        run, round, "evaluate",
        config_hash=config_hash({"evaluate": config.evaluate.model_dump(mode="json"), "grading": settings,
                                 "models": [m.model_dump(mode="json") for m, _ in models],
                                 **({"ppm": ppm["model_id"]} if ppm else {})}),
        model_id=",".join(model_id_for(m) for m, _ in models) + (f"+{ppm['model_id']}" if ppm else ""),
        input_fingerprint=fingerprint_tables(*sets.values(), *([baseline] if baseline is not None else [])),
        rows_in=sum(t.num_rows for t in sets.values()),
        compute=compute,
        force=force,
    )
