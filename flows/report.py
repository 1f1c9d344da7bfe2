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
    """Per round: the pool, its buckets and the SvS variants; the RARO critic's rates; held-out scores."""
    con = catalog.connect(lake().run_dir(run))
    buckets: dict[int, dict[str, int]] = {}
    for row in catalog.query(con, "buckets"):
        buckets.setdefault(row["round"], {})[row["bucket"]] = row["problems"]
    variants = {row["round"]: row for row in catalog.query(con, "variant_counts")}
    per_round = {
        r: {"pool": sum(counts.values()), "buckets": counts,
            **{k: variants.get(r, {}).get(k, 0) for k in ("synthesized", "valid", "kept")}}
        for r, counts in sorted(buckets.items())
    }
    evals = [{"model_round": e["model_round"], "set": e["eval_set"], "pass_at_1": e["pass_at_1"],
              "pass_at_k": {entry["key"]: entry["value"] for entry in e["pass_at_k"]}, "entropy": e["entropy"],
              "problems": e["problems"], "n": e["n"]} for e in catalog.query(con, "held_out")]
    return {"rounds": per_round, "critic": catalog.query(con, "critic_report"), "evals": evals}


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
        lines.append("model (0 = start, r+1 = after round r)  set  pass@1  pass@k  entropy  [problems x n]")
        for e in data["evals"]:
            ks = ", ".join(f"pass@{k} {v:.3f}" for k, v in sorted(e["pass_at_k"].items()))
            lines.append(f"  model {e['model_round']}  {e['set']:<22} {e['pass_at_1']:.3f}  {ks}  "
                         f"{e['entropy']:.3f}  [{e['problems']} x {e['n']}]")
    return "\n".join(lines)


def plot(run: str, data: dict, out: Path) -> Path | None:
    if not data["evals"]:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name in sorted({e["set"] for e in data["evals"]}):
        rows = [e for e in data["evals"] if e["set"] == name]
        x = [e["model_round"] for e in rows]
        ax.plot(x, [e["pass_at_1"] for e in rows], marker="o", label=f"{name} pass@1")
        k = max(rows[0]["pass_at_k"]) if rows[0]["pass_at_k"] else None
        if k and k > 1:
            ax.plot(x, [e["pass_at_k"].get(k, float("nan")) for e in rows], marker="s", linestyle="--",
                    label=f"{name} pass@{k}")
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
