"""The promotion gate, per-problem evaluation rows and the policy a round starts from: decisions on
constructed evaluations, the walk back past rejected checkpoints, the manual override, and a rejected
round on the tiny model whose next round samples from the earlier model."""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pyarrow as pa
import pytest

from evoforge.data import schemas
from evoforge.tasks.evaluate import EvaluateConfig, problem_results, score_intervals, set_summary
from evoforge.tasks.promotion import PROMOTED, REJECTED, GateConfig, decide


def results(model_round: int, counts: list[tuple[int, int]], eval_set: str = "held", logprob: float = -0.5,
            search: str | None = None) -> pa.Table:
    """`eval_results` of one model: problem i has counts[i] = (n, correct). search None: a row written before
    the column existed."""
    return pa.Table.from_pylist([
        dict(model_id=f"m{model_round}@h", model_round=model_round, eval_set=eval_set, problem_id=f"p{i}", n=n,
             correct=c, mean_tokens=10.0, mean_logprob=logprob, distinct_answers=1, no_answer=0, settings_hash="s",
             search=search)
        for i, (n, c) in enumerate(counts)], schema=schemas.EVAL_RESULTS)


def gate_decision(gate: GateConfig, new: pa.Table, old: pa.Table) -> tuple[str, str]:
    from evoforge.flows.evaluate import promotion_row

    config = EvaluateConfig(pass_k=[1, 4], gate=gate)
    row = promotion_row(config, {"checkpoint_id": "r0-sft-x", "model_id": "m1@h"}, 1,
                        score_intervals(new, config, old), old, new)
    return row["decision"], row["why"]


@pytest.mark.unit
def test_the_gate_rejects_a_checkpoint_significantly_worse_on_held_out_pass_at_1():
    before = results(0, [(4, 3)] * 30)
    worse = results(1, [(4, 1)] * 30)            # 0.75 -> 0.25 on every one of 30 problems
    decision, why = gate_decision(GateConfig(), worse, before)
    assert decision == REJECTED
    assert "significantly worse on held" in why and "pass@1 change -0.500" in why


@pytest.mark.unit
def test_the_gate_promotes_a_checkpoint_not_significantly_worse_and_one_that_is_better():
    before = results(0, [(4, 2)] * 10)
    same_but_noisy = results(1, [(4, 1), (4, 3)] * 5)  # the same mean, spread over problems
    assert gate_decision(GateConfig(), same_but_noisy, before)[0] == PROMOTED
    better = results(1, [(4, 4)] * 10)
    decision, why = gate_decision(GateConfig(require="better"), better, before)
    assert decision == PROMOTED and why.startswith("significantly better on held")
    # `better` asks for evidence: a change the interval cannot tell from noise is rejected
    assert gate_decision(GateConfig(require="better"), same_but_noisy, before)[0] == REJECTED
    assert gate_decision(GateConfig(require="always"), results(1, [(4, 0)] * 10), before)[0] == PROMOTED


@pytest.mark.unit
def test_the_gate_reads_only_its_sets_and_its_metric_and_refuses_an_unmeasured_set():
    before = pa.concat_tables([results(0, [(4, 2)] * 20, "a"), results(0, [(4, 2)] * 20, "b")])
    new = pa.concat_tables([results(1, [(4, 2)] * 20, "a"), results(1, [(4, 0)] * 20, "b")])  # worse on b only
    assert gate_decision(GateConfig(sets=["a"]), new, before)[0] == PROMOTED
    assert gate_decision(GateConfig(sets=["a", "b"]), new, before)[0] == REJECTED
    decision, why = gate_decision(GateConfig(sets=["c"]), new, before)
    assert decision == REJECTED and "no paired comparison on c" in why
    # pass@4 of a model that is right once in 4 on every problem equals that of one right 4 times in 4
    once = results(1, [(4, 1)] * 20, "a")
    assert gate_decision(GateConfig(metric="pass@k", sets=["a"]), once, results(0, [(4, 4)] * 20, "a"))[0] == PROMOTED
    assert gate_decision(GateConfig(metric="pass@1", sets=["a"]), once, results(0, [(4, 4)] * 20, "a"))[0] == REJECTED


@pytest.mark.unit
def test_the_gate_can_reject_on_an_entropy_drop():
    before = results(0, [(4, 2)] * 10, logprob=-0.50)
    collapsed = results(1, [(4, 2)] * 10, logprob=-0.10)  # entropy 0.50 -> 0.10: an 80% drop
    assert gate_decision(GateConfig(), collapsed, before)[0] == PROMOTED
    decision, why = gate_decision(GateConfig(max_entropy_drop=0.5), collapsed, before)
    assert decision == REJECTED and "entropy 0.500 -> 0.100" in why


@pytest.mark.unit
def test_decide_names_each_sets_change_with_its_interval():
    change = dict(eval_set="s", metric="pass@1", change=-0.1, change_low=-0.3, change_high=0.05)
    decision, why = decide(GateConfig(), [change], {}, ["s"])
    assert decision == PROMOTED and "s: pass@1 change -0.100 [-0.300, +0.050]" in why
    # a set measured without a paired comparison (no baseline rows) is not a pass
    assert decide(GateConfig(), [], {}, ["s"]) == (REJECTED, "no paired comparison on s")
    assert decide(GateConfig(), [], {}, [])[0] == REJECTED


@pytest.mark.unit
def test_eval_results_count_each_problems_samples_answers_and_log_probabilities():
    problems = pa.table({"problem_id": ["a", "b", "unseen"]})
    rollouts = pa.table({"problem_id": ["a", "a", "a", "b"], "completion_tokens": [10, 20, 30, 5],
                         "mean_logprob": [-1.0, -2.0, -3.0, -0.5]})
    verdicts = pa.table({"problem_id": ["a", "a", "a", "b"], "verdict": ["correct", "wrong", "no_answer", "correct"],
                         "extracted_answer": ["4", "5", None, "7"]})
    rows = {r["problem_id"]: r for r in problem_results(problems, rollouts, verdicts, "m@h", 2, "s", "cfg").to_pylist()}
    assert rows["a"] == dict(model_id="m@h", model_round=2, eval_set="s", problem_id="a", n=3, correct=1,
                             mean_tokens=20.0, mean_logprob=-2.0, distinct_answers=2, no_answer=1, settings_hash="cfg",
                             search="none")
    assert rows["unseen"]["n"] == 0  # kept, so a problem the engine never answered is visible, not dropped
    summary = set_summary(problem_results(problems, rollouts, verdicts, "m@h", 2, "s"), EvaluateConfig(pass_k=[1]))
    assert summary["problems"] == 2 and summary["pass_at_1"] == pytest.approx((1 / 3 + 1) / 2)
    assert summary["pass_at_1_low"] <= summary["pass_at_1"] <= summary["pass_at_1_high"]
    assert summary["entropy"] == pytest.approx((3 * 2.0 + 1 * 0.5) / 4)  # per sample, as before
    assert summary["distinct_answer_rate"] == pytest.approx((2 / 3 + 1) / 2)


@pytest.mark.unit
def test_score_intervals_pair_problems_by_id_not_by_position():
    config = EvaluateConfig(pass_k=[1])
    old = results(0, [(4, 0), (4, 4)])                          # p0 wrong, p1 right
    new = results(1, [(4, 4), (4, 0)]).take([1, 0])              # p1 wrong, p0 right; listed p1 first
    row = score_intervals(new, config, old).to_pylist()[0]
    # by id the changes are +1 (p0) and -1 (p1): a wide interval; paired by position they would be 0 and 0
    assert row["paired_problems"] == 2 and row["change"] == pytest.approx(0.0)
    assert row["change_low"] < -0.5 and row["change_high"] > 0.5
    assert row["baseline_model_round"] == 0 and row["low"] <= row["estimate"] <= row["high"]


# -- the policy of a round ------------------------------------------------------------------------
def _checkpoint(round: int, parent: str = "base@h", weights: str = "h") -> pa.Table:
    return pa.Table.from_pylist([dict(
        checkpoint_id=f"r{round}-sft-x", parent_model_id=parent, role="policy", method="sft", path=f"/models/r{round}",
        model_id=f"r{round}-sft-x@{weights}", data_fingerprint="d", train_rows=4, steps=2, final_loss=1.0,
        wall_seconds=1.0, stopped_early=None)], schema=schemas.CHECKPOINTS)


def _decision(round: int, decision: str, by: str = "gate", minutes: int = 0, weights: str = "h") -> pa.Table:
    return pa.Table.from_pylist([dict(
        checkpoint_id=f"r{round}-sft-x", model_id=f"r{round}-sft-x@{weights}", model_round=round + 1, decision=decision,
        why=f"{by} said {decision}", decided_by=by, rule="r", baseline_model_id="b",
        decided_at=datetime(2026, 1, 1, tzinfo=timezone.utc) + timedelta(minutes=minutes))], schema=schemas.PROMOTIONS)


@pytest.mark.unit
def test_a_round_starts_from_the_last_promoted_checkpoint_and_a_manual_decision_wins(runs_root):
    from evoforge.data.lake import lake
    from evoforge.flows.config import RoundConfig
    from evoforge.flows.inputs import MissingInput, policy_for_round, round_policy

    store = lake()
    config = RoundConfig.model_validate({"evaluate": {"sets": [{"name": "s", "path": "x.jsonl"}]}})
    # round 0 promoted; round 1 (from round 0's model) rejected; round 2 trained nothing; round 3 (from round
    # 0's model again) waits for its gate
    for round, parent in ((0, "base@h"), (1, "r0-sft-x@h"), (3, "r0-sft-x@h")):
        store.publish_stage("r", round, "finetune", {"checkpoints": _checkpoint(round, parent)})
    store.publish_stage("r", 0, "evaluate", {"promotions": _decision(0, PROMOTED)})
    store.publish_stage("r", 1, "evaluate", {"promotions": _decision(1, REJECTED)})
    assert round_policy("r", config, 1).model_round == 1
    policy = round_policy("r", config, 3)
    assert policy.model_round == 1 and policy.checkpoint["checkpoint_id"] == "r0-sft-x"
    assert policy.passed_over == ("r1-sft-x (gate said rejected)",)
    assert policy_for_round("r", config, 3).engine.model == "/models/r0"
    with pytest.raises(MissingInput, match="round 3's checkpoint r3-sft-x has no promotion decision yet"):
        round_policy("r", config, 4)
    ungated = config.model_copy(update={"evaluate": config.evaluate.model_copy(update={"gate": GateConfig(require="always")})})
    assert round_policy("r", ungated, 4).model_round == 4  # no gate: a trained checkpoint is the next policy

    # by hand wins, even over a later gate decision; round 3 was trained from a model no longer in force
    store.publish_stage("r", 1, "promote", {"promotions": _decision(1, PROMOTED, by="manual", minutes=-5)})
    assert round_policy("r", config, 3).model_round == 2
    with pytest.raises(MissingInput, match=r"round 3's checkpoint r3-sft-x was trained from r0-sft-x@h, but round 3's "
                                           r"policy is now r1-sft-x@h .*evoforge round --run r --round 3"):
        round_policy("r", config, 4)
    # rejecting round 0 by hand leaves round 1's checkpoint, trained from it, without a parent in force
    store.publish_stage("r", 0, "promote", {"promotions": _decision(0, REJECTED, by="manual")})
    assert round_policy("r", config, 1) == round_policy("r", config, 1).__class__(0, None, ("r0-sft-x (manual said rejected)",))
    with pytest.raises(MissingInput, match="round 1's checkpoint r1-sft-x was trained from r0-sft-x@h, but round 1's "
                                           "policy is now the config model"):
        round_policy("r", config, 2)


@pytest.mark.unit
def test_a_decision_on_other_weights_of_the_same_checkpoint_id_does_not_count(runs_root):
    """finetune --force may write new weights under the same id (training is not bit-exact on a GPU):
    the gate's or a user's decision on the old weights must not pass the new ones."""
    from evoforge.data.lake import lake
    from evoforge.flows.config import RoundConfig
    from evoforge.flows.inputs import MissingInput, round_policy

    store = lake()
    config = RoundConfig.model_validate({"evaluate": {"sets": [{"name": "s", "path": "x.jsonl"}]}})
    store.publish_stage("r", 0, "finetune", {"checkpoints": _checkpoint(0, weights="new")})
    store.publish_stage("r", 0, "promote", {"promotions": _decision(0, PROMOTED, by="manual", weights="old")})
    with pytest.raises(MissingInput, match="has no promotion decision yet"):
        round_policy("r", config, 1)
    store.publish_stage("r", 0, "evaluate", {"promotions": _decision(0, REJECTED, weights="new")})
    assert round_policy("r", config, 1).model_round == 0


@pytest.mark.unit
def test_the_report_flags_a_model_whose_held_out_entropy_fell_too_far():
    from evoforge.flows.report import collapse_flags

    def row(model, entropy, baseline, search="none"):
        return {"model_round": model, "set": "s", "entropy": entropy, "search": search,
                "change": None if baseline is None else {"baseline_model_round": baseline}}

    # a PPM's picks are low-entropy by design: they are not the policy's samples and raise no flag
    evals = [row(0, 0.50, None), row(1, 0.45, 0), row(1, 0.20, 0, "ppm_best_of_n"), row(2, 0.17, 1),
             row(2, 0.01, 1, "ppm_best_of_n")]
    flags = collapse_flags(evals, 0.3)
    assert len(flags) == 1 and flags[0].startswith("model 2 on s: held-out entropy 0.450 -> 0.170 (-62%")
    assert collapse_flags(evals, 0.7) == []


# -- on the tiny model ----------------------------------------------------------------------------
@pytest.mark.model
@pytest.mark.server
def test_a_rejected_round_is_followed_by_a_round_on_the_earlier_model_and_promote_overrides_it(
        prefect_server, runs_root, tiny_model, scratch, capsys):
    """The tiny random model answers nothing, so its GRPO checkpoint cannot be significantly better:
    `require: better` rejects it, and round 1 samples from the starting model again. Promoting it by
    hand makes round 1, run again, sample from it."""
    from evoforge.data import catalog
    from evoforge.data.lake import lake
    from evoforge.app.cli import main

    config = scratch / "gated.yaml"
    config.write_text(f"""
engine: {{model: {tiny_model}, backend: vllm, max_model_len: 1024}}
sources: [{{path: data/sets/easy_arithmetic/train.jsonl, preset: plain, name: easy, limit: 4}}]
generate: {{sampling: {{n: 2, max_tokens: 16, seed: 0}}}}
finetune: {{method: grpo, max_steps: 1, batch_size: 2,
            grpo: {{problems: all, generations: 2, max_completion_tokens: 8}}}}
evaluate:
  sets: [{{name: easy-test, path: data/sets/easy_arithmetic/test.jsonl, preset: plain, limit: 3}}]
  sampling: {{n: 2, max_tokens: 16, seed: 7}}
  pass_k: [1, 2]
  gate: {{require: better}}
stages: [generate, verify, filter, finetune, evaluate]
""")
    assert main(["evolve", "--run", "gated", "--rounds", "2", "--config", str(config)]) == 0
    printed = capsys.readouterr().out
    store = lake()
    checkpoints = store.read("gated", "checkpoints").to_pylist()
    base = checkpoints[0]["parent_model_id"]
    assert [c["round"] for c in checkpoints] == [0, 1]
    assert checkpoints[1]["parent_model_id"] == base  # round 1 trained from the start again
    assert set(store.read("gated", "rollouts", 1, "generate")["model_id"].to_pylist()) == {base}
    assert "REJECTED (gate): not significantly better on any set" in printed

    con = catalog.connect(store.run_dir("gated"))
    decided = con.execute("SELECT round, decision, decided_by FROM checkpoints ORDER BY round").fetchall()
    assert decided == [(0, "rejected", "gate"), (1, "rejected", "gate")]
    held_out = con.execute("SELECT model_round, count(*), sum(n) FROM eval_results GROUP BY ALL ORDER BY 1").fetchall()
    assert held_out == [(0, 3, 6), (1, 3, 6), (2, 3, 6)]  # per problem, n samples each; model 0 measured once
    assert con.execute("SELECT count(*) FROM rollouts WHERE stage = 'evaluate'").fetchone()[0] == 3 * 3 * 2
    intervals = catalog.query(con, "intervals")
    changes = [(i["model_round"], i["metric"], i["baseline_model_round"]) for i in intervals if i["change"] is not None]
    assert changes == [(1, "pass@1", 0), (1, "pass@2", 0), (2, "pass@1", 0), (2, "pass@2", 0)]

    assert main(["promote", "--run", "gated", "--round", "0", "--why", "I checked it"]) == 0
    assert "r0-grpo" in capsys.readouterr().out
    assert main(["round", "--run", "gated", "--round", "1"]) == 0
    promoted = checkpoints[0]["model_id"]
    assert set(store.read("gated", "rollouts", 1, "generate")["model_id"].to_pylist()) == {promoted}
    assert store.read("gated", "checkpoints", 1)["parent_model_id"].to_pylist() == [promoted]
    assert main(["promote", "--run", "gated"]) == 0
    listed = capsys.readouterr().out
    assert "round 0: model 1 r0-grpo" in listed and "promoted (manual): I checked it" in listed
    assert json.loads(json.dumps(intervals, default=str))  # what `evoforge sql intervals --csv` serialises


@pytest.mark.unit
def test_the_report_and_the_named_queries_show_intervals_changes_decisions_and_collapse(runs_root):
    """What `evoforge report` and `evoforge sql intervals|collapse|promotions_in_force` read, over an
    evaluate stage's outputs built from constructed per-problem rows."""
    from evoforge.data import catalog
    from evoforge.data.lake import lake
    from evoforge.flows.evaluate import measured_before
    from evoforge.flows.report import collect, format_report

    store = lake()
    config = EvaluateConfig(pass_k=[1, 4])
    start = results(0, [(4, 2)] * 20, logprob=-0.5)
    trained = results(1, [(4, 4)] * 20, logprob=-0.2)  # better, and its entropy fell by 60%
    store.publish_stage("r", 0, "finetune", {"checkpoints": _checkpoint(0, parent="m0@h")})
    store.publish_stage("r", 0, "evaluate", {
        "eval_results": pa.concat_tables([start, trained]),
        "evals": pa.Table.from_pylist([set_summary(start, config), set_summary(trained, config)], schema=schemas.EVALS),
        "score_intervals": pa.concat_tables([score_intervals(start, config), score_intervals(trained, config, start)]),
        "promotions": _decision(0, PROMOTED)})
    data = collect("r")
    text = format_report("r", data)
    assert "model 1  held" in text and "pass@1 [95%]" in text
    assert "vs model 0: +0.500 [" in text and "better" in text
    assert "round 0: model 1 r0-sft-x PROMOTED (gate): gate said promoted" in text
    assert "COLLAPSE? model 1 on held: held-out entropy 0.500 -> 0.200 (-60%" in text
    con = catalog.connect(store.run_dir("r"))
    held = [c for c in catalog.query(con, "collapse") if c["scope"] == "held"]
    assert [(c["model_round"], round(c["entropy"], 3), c["distinct_answer_rate"], c["pass_at_n"]) for c in held] == \
        [(0, 0.5, 0.25, 1.0), (1, 0.2, 0.25, 1.0)]
    change = next(i for i in catalog.query(con, "intervals") if i["model_round"] == 1 and i["metric"] == "pass@1")
    assert change["significance"] == "better" and change["paired_problems"] == 20
    # a later round reuses model 0's rows only under the same sampling and grading
    sets = {"held": pa.table({"problem_id": [f"p{i}" for i in range(20)]})}
    assert measured_before("r", 1, "m0@h", sets, "s").num_rows == 20
    assert measured_before("r", 1, "m0@h", sets, "other sampling") is None
    assert measured_before("r", 1, "m0@h", {"held": sets["held"].slice(0, 5)}, "s") is None  # other problems


@pytest.mark.unit
def test_ppm_best_of_n_takes_the_sample_the_ppm_rates_highest_and_is_compared_pick_with_pick():
    from evoforge.tasks.evaluate import ppm_picks, solution_text

    problems = pa.table({"problem_id": ["a", "b"], "question": ["1 + 1?", "2 + 2?"]})
    texts = {("a", 0): "so \\boxed{3}", ("a", 1): "careful: \\boxed{2}", ("a", 2): "\\boxed{5}",
             ("b", 0): "\\boxed{4}", ("b", 1): "\\boxed{4} too", ("b", 2): "\\boxed{1}"}
    rollouts = pa.Table.from_pylist([dict(rollout_id=f"{p}{i}", problem_id=p, sample_index=i, text=t, completion_tokens=10 + i,
                                          mean_logprob=-1.0 - i) for (p, i), t in texts.items()])
    verdicts = pa.Table.from_pylist([dict(rollout_id=f"{p}{i}", problem_id=p, extracted_answer=t.split("{")[1].split("}")[0],
                                          verdict="correct" if t.split("{")[1].startswith(("2", "4")) else "wrong")
                                     for (p, i), t in texts.items()])
    seen = []

    def scorer(batch):
        seen.extend(batch)
        return [0.9 if "careful" in t else (0.5 if "\\boxed{4}" in t else 0.1) for t in batch]

    picks = {r["problem_id"]: r for r in ppm_picks(problems, rollouts, verdicts, scorer, "m1@h", 1, "held", "s").to_pylist()}
    assert seen[0] == solution_text("1 + 1?", "so \\boxed{3}") == "1 + 1?\n\nso \\boxed{3}"  # question, then the solution
    assert picks["a"]["search"] == "ppm_best_of_n" and (picks["a"]["n"], picks["a"]["correct"]) == (1, 1)
    assert picks["a"]["mean_tokens"] == 11  # the picked sample's own figures
    assert picks["b"]["mean_tokens"] == 10  # a tie (0.5 twice): the lower sample index
    summary = set_summary(pa.Table.from_pylist(list(picks.values()), schema=schemas.EVAL_RESULTS),
                          EvaluateConfig(pass_k=[1, 2], sampling={"n": 3}))
    assert summary["search"] == "ppm_best_of_n" and summary["pass_at_1"] == 1.0 and summary["n"] == 1
    assert dict(summary["pass_at_k"]) == {1: 1.0}  # one pick per problem: no pass@2
    # against a baseline picked by the same PPM: pick with pick, plain sampling with plain sampling
    new = pa.concat_tables([results(1, [(3, 1), (3, 2)], search="none"), results(1, [(1, 1), (1, 1)], search="ppm_best_of_n")])
    old = pa.concat_tables([results(0, [(3, 0), (3, 3)]), results(0, [(1, 0), (1, 1)], search="ppm_best_of_n")])
    by_search = {r["search"]: r for r in score_intervals(new, EvaluateConfig(pass_k=[1], sampling={"n": 3}), old).to_pylist()}
    assert set(by_search) == {"none", "ppm_best_of_n"}
    assert by_search["ppm_best_of_n"]["estimate"] == 1.0 and by_search["ppm_best_of_n"]["change"] == pytest.approx(0.5)
    assert by_search["none"]["estimate"] == pytest.approx(0.5) and by_search["none"]["change"] == pytest.approx(0.0)


def graded_pool(round: int, shift: float = 0.0) -> tuple[list[dict], list[dict]]:
    """A round's rollouts and verdicts: p0 has a correct sample, repeated answers and one without; p1 three
    distinct wrong answers; p2 has no reference answer. `shift` moves every log-probability."""
    answers = {"p0": ["4", "4", "5", None], "p1": ["7", "8", "9", "7"], "p2": ["1", "1", "1", "1"]}
    verdicts = {"p0": ["correct", "correct", "wrong", "no_answer"], "p1": ["wrong"] * 4, "p2": ["no_reference"] * 4}
    rollouts, graded = [], []
    for p, (pid, given) in enumerate(answers.items()):
        for k, answer in enumerate(given):
            rid = f"{pid}-{k}-{round}"
            rollouts.append(dict(rollout_id=rid, problem_id=pid, model_id=f"m{round}", seed=0, sample_index=k, text="x",
                                 completion_tokens=1, finish_reason="stop", mean_logprob=-0.1 * (p + 1) * (k + 1) + shift))
            graded.append(dict(rollout_id=rid, problem_id=pid, verdict=verdicts[pid][k], extracted_answer=answer,
                               gold=None, detail=None, seconds=0.0, graded_with=rid))
    return rollouts, graded


def assert_pool_signals(pool: dict, rollouts: list[dict]) -> None:
    samples = [r for r in rollouts if r["problem_id"] != "p2"]  # p2 has no reference answer
    assert pool["problems"] == 2 and pool["n"] == 4
    assert pool["entropy"] == pytest.approx(sum(-r["mean_logprob"] for r in samples) / len(samples))
    assert pool["distinct_answer_rate"] == pytest.approx((2 / 4 + 3 / 4) / 2)  # p0: 4, 5 (None is no answer); p1: 7, 8, 9
    assert pool["pass_at_n"] == pytest.approx(0.5)  # p0 has a correct sample, p1 none


@pytest.mark.unit
def test_the_pool_collapse_signals_are_those_of_every_sample_and_its_verdict(runs_root):
    """`evoforge sql collapse`'s pool row of a round filter has not counted counts each side per problem before
    they meet (a 10M-rollout round is never joined row by row): its entropy, distinct-answer rate and pass@n
    are still those of each sample with its verdict, and a problem without a reference answer is left out."""
    from evoforge.data import catalog
    from evoforge.data.lake import lake

    rollouts, graded = graded_pool(0)
    store = lake()
    store.publish_stage("r", 0, "generate", {"rollouts": pa.Table.from_pylist(rollouts, schema=schemas.ROLLOUTS)})
    store.publish_stage("r", 0, "verify", {"verdicts": pa.Table.from_pylist(graded, schema=schemas.VERDICTS)})

    (pool,) = [c for c in catalog.query(catalog.connect(store.run_dir("r")), "collapse") if c["scope"] == "pool"]
    assert_pool_signals(pool, rollouts)
    assert pool["model_id"] == "m0"


@pytest.mark.unit
def test_a_filtered_round_has_its_collapse_signals_read_from_problem_stats(runs_root):
    """filter counts each problem's distinct answers and mean log-probability into `problem_stats`, and
    collapse reads them there (at 10M rollouts, not the verdicts again); the model is the one the round's
    generate stage recorded. A round filtered before those columns existed is still counted from its verdicts."""
    from datetime import datetime, timezone

    from evoforge.data import catalog
    from evoforge.data.lake import lake
    from evoforge.tasks.filter import FilterConfig, filter_problems

    store = lake()
    pools = {round: graded_pool(round, shift=-0.5 * round) for round in (0, 1)}
    for round, (rollouts, graded) in pools.items():
        rollouts_table = pa.Table.from_pylist(rollouts, schema=schemas.ROLLOUTS)
        verdicts_table = pa.Table.from_pylist(graded, schema=schemas.VERDICTS)
        store.publish_stage("r", round, "generate", {"rollouts": rollouts_table})
        stats = filter_problems(verdicts_table, rollouts_table, FilterConfig())
        if round == 1:  # as filter wrote it before it counted the collapse signals: the view reads NULLs
            for name in ("distinct_answers", "mean_logprob"):
                index = stats.schema.get_field_index(name)
                stats = stats.set_column(index, name, pa.nulls(stats.num_rows, stats.schema.field(name).type))
        store.publish_stage("r", round, "filter", {"problem_stats": stats})
        if round == 0:  # verdicts unlike those filter counted: the pool row must be filter's
            verdicts_table = pa.Table.from_pylist([dict(v, extracted_answer="0", verdict="wrong") for v in graded],
                                                  schema=schemas.VERDICTS)
        store.publish_stage("r", round, "verify", {"verdicts": verdicts_table})
        now = datetime.now(timezone.utc)
        store.append_run_table("r", "stage_runs", pa.Table.from_pylist([dict(
            stage_run_id=f"g{round}", run="r", round=round, stage="generate", model_id=f"m{round}", status="completed",
            started_at=now, finished_at=now)], schema=schemas.STAGE_RUNS))

    rows = {c["round"]: c for c in catalog.query(catalog.connect(store.run_dir("r")), "collapse") if c["scope"] == "pool"}
    assert set(rows) == {0, 1}  # each round once: from its stats, or from its verdicts
    for round, (rollouts, _) in pools.items():
        assert_pool_signals(rows[round], rollouts)
        assert rows[round]["model_id"] == f"m{round}"
    assert rows[1]["entropy"] > rows[0]["entropy"]
