"""What a round produced, in the figures a user checks first: buckets, pass@k, verdicts."""
from __future__ import annotations

from data import catalog
from flows.generate import problem_pool
from flows.stage_runner import lake


def round_summary(run: str, round_: int) -> dict:
    con = catalog.connect(lake().run_dir(run))
    buckets = dict(con.execute("SELECT bucket, count(*) FROM problem_stats WHERE round = ? GROUP BY bucket", [round_]).fetchall())
    verdicts = dict(con.execute("SELECT verdict, count(*) FROM verdicts WHERE round = ? AND stage = 'verify' GROUP BY verdict", [round_]).fetchall())
    pass_at = con.execute(
        """SELECT k, avg(v), count(*) FROM (SELECT unnest(map_keys(pass_at_k)) AS k, unnest(map_values(pass_at_k)) AS v
           FROM problem_stats WHERE round = ?) GROUP BY k ORDER BY k""",
        [round_],
    ).fetchall()
    tokens = con.execute(
        "SELECT count(*), sum(completion_tokens), avg((finish_reason = 'length')::INT) FROM rollouts WHERE round = ? AND stage = 'generate'",
        [round_],
    ).fetchone()
    pool = problem_pool(run, round_).num_rows
    quarantined = dict(con.execute("SELECT reason, count(*) FROM quarantine GROUP BY reason").fetchall())
    return {
        "run": run, "round": round_, "pool": pool,
        "buckets": {b: buckets.get(b, 0) for b in ("unsolved", "underperforming", "learnable", "solved")},
        "verdicts": verdicts,
        "pass_at_k": {int(k): float(v) for k, v, _ in pass_at},
        "rollouts": tokens[0], "tokens": tokens[1] or 0, "length_capped": float(tokens[2] or 0.0),
        "quarantine": quarantined,
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
