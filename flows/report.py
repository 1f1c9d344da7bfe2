"""What a run produced, from the named queries of `sql/queries/`: the summary printed after a round,
and `evoforge report` (per round the pool, buckets, kept variants, the RARO critic's rates and
held-out pass@k, plus a PNG plot)."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from evoforge.data import atomic, catalog, schemas
from evoforge.data.lake import lake
from evoforge.flows.inputs import problem_pool


def collect(run: str) -> dict:
    """Per round: the pool, its buckets and the SvS variants; the RARO critic's rates; held-out scores
    with their intervals, the paired change of each model from its baseline, the promotion decisions
    and the collapse signals (a model whose held-out entropy fell by more than `evaluate.entropy_drop_flag`
    from its baseline is flagged)."""
    con = catalog.connect(lake().run_dir(run))
    buckets: dict[int, dict[str, int]] = {}
    for row in catalog.query(con, "buckets"):
        buckets.setdefault(row["round"], {})[row["bucket"]] = row["problems"]
    # the pool's story: the synthesize stage's variants (the online ones, method svs, are training's own)
    variants = {row["round"]: row for row in catalog.query(con, "variant_counts") if row["origin"] == "offline"}
    per_round = {
        r: {"pool": sum(counts.values()), "buckets": counts,
            **{k: variants.get(r, {}).get(k, 0) for k in ("synthesized", "valid", "kept")}}
        for r, counts in sorted(buckets.items())
    }
    intervals = catalog.query(con, "intervals")
    by_score = {(i["model_round"], i["eval_set"], i["search"], i["metric"]): i for i in intervals}
    evals = []
    for e in catalog.query(con, "held_out"):
        pass_at_k = {entry["key"]: entry["value"] for entry in e["pass_at_k"]}
        evals.append({
            "model_round": e["model_round"], "set": e["eval_set"], "search": e["search"], "pass_at_1": e["pass_at_1"],
            "pass_at_1_interval": (e["pass_at_1_low"], e["pass_at_1_high"]), "pass_at_k": pass_at_k,
            "pass_at_k_interval": {k: (by_score[key]["low"], by_score[key]["high"]) for k in pass_at_k
                                   if (key := (e["model_round"], e["eval_set"], e["search"], f"pass@{k}")) in by_score},
            "change": by_score.get((e["model_round"], e["eval_set"], e["search"], "pass@1")),
            "entropy": e["entropy"], "distinct_answer_rate": e["distinct_answer_rate"],
            "problems": e["problems"], "n": e["n"]})
    return {"rounds": per_round, "critic": catalog.query(con, "critic_report"), "evals": evals,
            "intervals": intervals, "decisions": catalog.query(con, "promotions_in_force"),
            "collapse": catalog.query(con, "collapse"), "collapse_flags": collapse_flags(evals, _entropy_drop_flag(run))}


def pin_report(run: str) -> int:
    """Record that a report was made from the run as it is now (a `stage_runs` event of stage `report`),
    so `evoforge vacuum` keeps the parts it read (data/history.py); returns the run's version it showed."""
    import uuid
    from datetime import datetime, timezone

    import pyarrow as pa

    from evoforge.data.history import run_history

    versions = run_history(lake(), run)
    now = datetime.now(timezone.utc)
    event = {name: None for name in schemas.STAGE_RUNS.names} | {
        "stage_run_id": uuid.uuid4().hex, "run": run, "round": max((v.round for v in versions), default=0),
        "stage": "report", "started_at": now, "finished_at": now, "status": "completed"}
    lake().append_run_table(run, "stage_runs", pa.Table.from_pylist([event], schema=schemas.STAGE_RUNS))
    return len(versions)


def _entropy_drop_flag(run: str) -> float:
    from evoforge.flows.config import ConfigError
    from evoforge.flows.inputs import saved_config

    try:
        return saved_config(run).evaluate.entropy_drop_flag
    except ConfigError:
        from evoforge.tasks.evaluate import EvaluateConfig

        return EvaluateConfig().entropy_drop_flag


def collapse_flags(evals: list[dict], max_drop: float) -> list[str]:
    """A model whose held-out entropy fell by more than `max_drop` (a fraction) from its baseline's."""
    evals = [e for e in evals if e["search"] == "none"]  # the samples' entropy, not a PPM's picks'
    entropy = {(e["model_round"], e["set"]): e["entropy"] for e in evals}
    flags = []
    for e in evals:
        base = e["change"]["baseline_model_round"] if e["change"] else None
        before = entropy.get((base, e["set"]))
        if base is None or not before or e["entropy"] is None:
            continue
        drop = (before - e["entropy"]) / before
        if drop > max_drop:
            flags.append(f"model {e['model_round']} on {e['set']}: held-out entropy {before:.3f} -> {e['entropy']:.3f} "
                         f"({-drop:+.0%}, more than the {max_drop:.0%} drop evaluate.entropy_drop_flag allows): "
                         f"a sign of collapse")
    return flags


def round_summary(run: str, round: int) -> dict:
    """What a round produced, in the figures a user checks first: buckets, pass@k, verdicts, tokens."""
    con = catalog.connect(lake().run_dir(run))
    buckets = {row["bucket"]: row["problems"] for row in catalog.query(con, "buckets") if row["round"] == round}
    verdicts = {row["verdict"]: row["rollouts"] for row in catalog.query(con, "verdict_counts")
                if row["round"] == round and row["stage"] == "verify"}
    pass_at_k = {int(row["k"]): float(row["pass_at_k"]) for row in catalog.query(con, "pass_at_k") if row["round"] == round}
    generation = next((row for row in catalog.query(con, "generation") if row["round"] == round),
                      {"rollouts": 0, "tokens": 0, "length_capped_share": 0.0})
    quarantined: Counter = Counter()
    for row in catalog.query(con, "quarantine_reasons"):
        quarantined[row["reason"]] += row["rows"]
    return {
        "run": run, "round": round, "pool": problem_pool(run, round).num_rows,
        "buckets": {b: buckets.get(b, 0) for b in schemas.BUCKETS},
        "verdicts": verdicts,
        "pass_at_k": pass_at_k,
        "rollouts": generation["rollouts"], "tokens": generation["tokens"],
        "length_capped": float(generation["length_capped_share"]),
        "quarantine": dict(quarantined),
    }


def format_summary(summary: dict) -> str:
    lines = [f"run {summary['run']}, round {summary['round']}: {summary['pool']} problems, "
             f"{summary['rollouts']} rollouts, {summary['tokens']} tokens ({summary['length_capped']:.0%} hit max_tokens)"]
    lines.append("  buckets:   " + ", ".join(f"{k} {v}" for k, v in summary["buckets"].items()))
    lines.append("  pass@k:    " + ", ".join(f"pass@{k} {v:.3f}" for k, v in summary["pass_at_k"].items()))
    lines.append("  verdicts:  " + ", ".join(f"{k} {v}" for k, v in sorted(summary["verdicts"].items())))
    if summary["quarantine"]:
        lines.append("  quarantine: " + ", ".join(f"{k} {v}" for k, v in sorted(summary["quarantine"].items())))
    return "\n".join(lines)


def format_report(run: str, data: dict) -> str:
    lines = [f"run {run}"]
    lines.append("round  pool  unsolved  underperf  learnable  solved  synthesized  valid  kept")
    for r, row in data["rounds"].items():
        b = row["buckets"]
        lines.append(f"{r:>5}  {row['pool']:>4}  {b.get('unsolved', 0):>8}  {b.get('underperforming', 0):>9}  "
                     f"{b.get('learnable', 0):>9}  {b.get('solved', 0):>6}  {row['synthesized']:>11}  "
                     f"{row['valid']:>5}  {row['kept']:>4}")
    if data.get("critic"):
        lines.append("critic (RARO)  round  judgments  tie  policy wins  unparseable  accuracy on wrong answers [n]")
        fmt = lambda v: "  n/a" if v is None else f"{v:.3f}"  # noqa: E731
        for c in data["critic"]:
            lines.append(f"{'':>13}  {c['round']:>5}  {c['judgments']:>9}  {fmt(c['tie_rate'])}  {fmt(c['policy_win_rate']):>11}  "
                         f"{fmt(c['unparseable_rate']):>11}  {fmt(c['critic_accuracy']):>24} [{c['judged_wrong_answers']}]")
    if data["evals"]:
        lines.append("held-out scores, 95% intervals (bootstrap over problems, samples nested); change: paired, "
                     "against the model it was trained from")
        lines.append("model (0 = start, r+1 = after round r)  set  pass@1 [95%]  pass@k [95%]  entropy  distinct  "
                     "[problems x n]  change in pass@1 [95%]")
        for e in data["evals"]:
            ks = ", ".join(f"pass@{k} {v:.3f}{_bounds(e['pass_at_k_interval'].get(k))}"
                           for k, v in sorted(e["pass_at_k"].items()) if k != 1)
            change = e["change"]
            versus = "" if not change or change["change"] is None else (
                f"  vs model {change['baseline_model_round']}: {change['change']:+.3f} "
                f"[{change['change_low']:+.3f}, {change['change_high']:+.3f}] {change['significance']}")
            distinct = "  n/a" if e["distinct_answer_rate"] is None else f"{e['distinct_answer_rate']:.2f}"
            set_and_search = e["set"] if e["search"] == "none" else f"{e['set']} (PPM best of n)"
            lines.append(f"  model {e['model_round']}  {set_and_search:<22} {e['pass_at_1']:.3f}{_bounds(e['pass_at_1_interval'])}"
                         f"  {ks}  {e['entropy']:.3f}  {distinct}  [{e['problems']} x {e['n']}]{versus}")
    if data.get("decisions"):
        lines.append("promotion (does round r's checkpoint become round r+1's policy?)")
        for d in data["decisions"]:
            stopped = f"; training stopped early: {d['stopped_early']}" if d["stopped_early"] else ""
            lines.append(f"  round {d['round']}: model {d['round'] + 1} {d['checkpoint_id']} "
                         f"{(d['decision'] or 'undecided').upper()}"
                         f"{' (' + d['decided_by'] + ')' if d['decided_by'] else ''}: {d['why'] or 'not evaluated yet'}{stopped}")
    if data.get("collapse"):
        lines.append("collapse signals  model  scope (pool: the round's samples)  entropy  distinct answers  pass@n [problems x n]")
        for c in data["collapse"]:
            where = f"pool of round {c['round']}" if c["scope"] == "pool" else c["scope"]
            model = "?" if c["model_round"] is None else c["model_round"]
            lines.append(f"{'':>16}  {model:>5}  {where:<32}  {c['entropy']:.3f}  {c['distinct_answer_rate']:.2f}  "
                         f"{c['pass_at_n']:.3f} [{c['problems']} x {c['n']}]")
    for flag in data.get("collapse_flags", []):
        lines.append(f"COLLAPSE? {flag}")
    return "\n".join(lines)


def _bounds(interval) -> str:
    return "" if not interval or interval[0] is None else f" [{interval[0]:.3f}, {interval[1]:.3f}]"


def plot(run: str, data: dict, out: Path) -> Path | None:
    if not data["evals"]:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name in sorted({e["set"] for e in data["evals"]}):
        rows = [e for e in data["evals"] if e["set"] == name and e["search"] == "none"]
        x = [e["model_round"] for e in rows]
        line, = ax.plot(x, [e["pass_at_1"] for e in rows], marker="o", label=f"{name} pass@1 (95% band)")
        band = [e["pass_at_1_interval"] for e in rows]
        if all(b[0] is not None for b in band):
            ax.fill_between(x, [b[0] for b in band], [b[1] for b in band], color=line.get_color(), alpha=0.15)
        k = max(rows[0]["pass_at_k"]) if rows[0]["pass_at_k"] else None
        if k and k > 1:
            line, = ax.plot(x, [e["pass_at_k"].get(k, float("nan")) for e in rows], marker="s", linestyle="--",
                            label=f"{name} pass@{k} (95% band)")
            band = [e["pass_at_k_interval"].get(k, (None, None)) for e in rows]
            if all(b[0] is not None for b in band):
                ax.fill_between(x, [b[0] for b in band], [b[1] for b in band], color=line.get_color(), alpha=0.08,
                                hatch="//")
    rejected = [d["round"] + 1 for d in data.get("decisions", []) if d["decision"] == "rejected"]
    for model_round in rejected:
        ax.axvline(model_round, color="grey", linestyle=":", alpha=0.6)
    if rejected:
        ax.plot([], [], color="grey", linestyle=":", label="rejected by the gate (or by hand)")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("model (0 = start, r + 1 = after round r)")
    ax.set_ylabel("held-out score")
    ax.set_title(f"evoforge run {run}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    with atomic.atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out
