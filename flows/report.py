"""`evoforge report`: per round, the pool, buckets, kept variants, the RARO critic's rates and held-out
pass@k, plus a PNG plot."""
from __future__ import annotations

from pathlib import Path

from data import catalog
from flows.stage_runner import lake


def collect(run: str) -> dict:
    con = catalog.connect(lake().run_dir(run))
    q = lambda sql: con.execute(sql).fetchall()  # noqa: E731
    rounds = [r for (r,) in q("SELECT DISTINCT round FROM problem_stats ORDER BY round")]
    per_round = {}
    for r in rounds:
        buckets = dict(q(f"SELECT bucket, count(*) FROM problem_stats WHERE round = {r} AND stage = 'filter' GROUP BY bucket"))
        variants = q(f"SELECT count(*), count(*) FILTER (WHERE reject_reason IS NULL OR reject_reason = 'outside_band'), "
                     f"count(*) FILTER (WHERE kept) FROM variants WHERE round = {r}")[0]
        per_round[r] = {
            "pool": q(f"SELECT count(*) FROM problem_stats WHERE round = {r} AND stage = 'filter'")[0][0],
            "buckets": buckets,
            "synthesized": variants[0], "valid": variants[1], "kept": variants[2],
        }
    evals = q("SELECT model_round, eval_set, pass_at_1, map_entries(pass_at_k), entropy, problems, n FROM evals "
              "ORDER BY model_round, eval_set")
    cursor = con.execute(catalog.resolve_query("critic_report"))
    names = [d[0] for d in cursor.description]
    critic = [dict(zip(names, row)) for row in cursor.fetchall()]
    return {"rounds": per_round, "critic": critic, "evals": [
        {"model_round": m, "set": s, "pass_at_1": p1, "pass_at_k": {e["key"]: e["value"] for e in pk},
         "entropy": ent, "problems": probs, "n": n} for m, s, p1, pk, ent, probs, n in evals]}


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
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(out)
    return out
