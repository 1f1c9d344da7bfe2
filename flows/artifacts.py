"""Prefect artifacts: what a user sees of each stage in the UI.

Every stage execution (completed or skipped) publishes, under keys stable per run and stage, a
table of its counts (`<run>-<stage>-counts`) and a markdown summary with the figures that matter
for that stage (`<run>-<stage>-summary`); Prefect keeps each key's history, so the rounds of a run
line up under one key. A round ends with `<run>-report`: the per-round report and the pass@k plot.
Artifacts are a view: failing to publish one logs a warning and never fails a stage.
"""
from __future__ import annotations

import base64
import re
from collections import Counter
from pathlib import Path

import pyarrow as pa

from tasks.progress import run_logger


def artifact_key(run: str, *parts: str) -> str:
    """Prefect keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", "-".join((run, *parts)).lower())).strip("-")


def _counts(column: pa.ChunkedArray | None) -> dict:
    return dict(sorted(Counter(column.to_pylist()).items(), key=lambda kv: str(kv[0]))) if column is not None else {}


def _line(label: str, values: dict) -> str:
    return f"- **{label}**: " + (", ".join(f"{k} {v}" for k, v in values.items()) if values else "none")


def stage_markdown(stage: str, round_: int, status: str, tables: dict[str, pa.Table]) -> str:
    """The figures a user checks first for `stage`, from the stage's output tables."""
    col = lambda table, name: tables[table][name] if table in tables and tables[table].num_rows else None  # noqa: E731
    lines = [f"### {stage}, round {round_} ({status})", ""]
    if stage == "ingest":
        lines.append(f"- **problems**: {tables.get('problems', pa.table({})).num_rows}")
        lines.append(_line("quarantined by reason", _counts(col("quarantine", "reason"))))
    elif stage == "generate":
        tokens = col("rollouts", "completion_tokens")
        n = tables["rollouts"].num_rows if "rollouts" in tables else 0
        lines.append(f"- **rollouts**: {n}, **tokens**: {sum(tokens.to_pylist()) if tokens else 0}")
        lines.append(_line("finish reasons", _counts(col("rollouts", "finish_reason"))))
    elif stage == "verify":
        verdicts = _counts(col("verdicts", "verdict"))
        lines.append(_line("verdicts", verdicts))
        lines.append(f"- **timeouts**: {verdicts.get('timeout', 0)}")
    elif stage == "filter":
        lines.append(_line("buckets", _counts(col("problem_stats", "bucket"))))
        pass_at = col("problem_stats", "pass_at_k")
        if pass_at is not None:
            sums: Counter = Counter()
            for row in pass_at.to_pylist():
                sums.update(dict(row))
            count = len(pass_at)
            lines.append(_line("mean pass@k", {f"pass@{k}": f"{v / count:.3f}" for k, v in sorted(sums.items())}))
    elif stage == "synthesize":
        reasons = _counts(col("variants", "reject_reason"))
        synthesized = tables["variants"].num_rows if "variants" in tables else 0
        kept = sum(col("variants", "kept").to_pylist()) if synthesized else 0
        valid = synthesized - sum(v for k, v in reasons.items() if k not in (None, "outside_band"))
        ratio = f"{kept / synthesized:.1%}" if synthesized else "n/a"
        lines.append(f"- **synthesized** {synthesized}, **valid** {valid}, **kept** {kept} (kept ratio {ratio})")
        lines.append(_line("rejected by reason", {k: v for k, v in reasons.items() if k is not None}))
    elif stage == "mcts":
        nodes = tables.get("mcts_nodes")
        if nodes is not None and nodes.num_rows:
            rows = nodes.to_pylist()
            terminal = [r for r in rows if r["is_terminal"]]
            steps = [r for r in rows if r["depth"] > 0]
            trees = len({r["tree_id"] for r in rows})
            lines.append(f"- **trees** {trees}, **nodes** {len(rows)}, **steps** {len(steps)}")
            lines.append(_line("steps by status", _counts(nodes.filter(pa.compute.greater(nodes["depth"], 0))["exec_status"])))
            correct = sum(1 for r in terminal if r["correct"])
            lines.append(f"- **terminal leaves** {len(terminal)}, correct {correct}"
                         + (f" ({correct / len(terminal):.1%})" if terminal else ""))
        lines.append(f"- **traces**: {tables['traces'].num_rows if 'traces' in tables else 0}")
    elif stage == "critic":
        judgments = tables.get("judgments")
        n = judgments.num_rows if judgments is not None else 0
        labels = _counts(col("judgments", "label"))
        parsed = n - labels.get(None, 0)
        lines.append(f"- **judgments** {n}, with a label {parsed}" + (f" ({parsed / n:.1%})" if n else ""))
        lines.append(_line("winner", {k: v for k, v in labels.items() if k is not None}))
        if parsed:
            lines.append(f"- **tie rate** {labels.get('tie', 0) / parsed:.3f}, **policy win rate** "
                         f"{labels.get('policy', 0) / parsed:.3f} (of judgments with a label)")
    elif stage == "pairs":
        lines.append(_line("pairs by kind", _counts(col("pairs", "kind"))))
        lines.append(f"- **sft examples**: {tables['sft_examples'].num_rows if 'sft_examples' in tables else 0}")
    elif stage == "finetune":
        rows = tables["checkpoints"].to_pylist() if "checkpoints" in tables else []
        if not rows:
            lines.append("- no checkpoint: nothing to train on; the policy carries over")
        for c in rows:
            lines.append(f"- **{c['checkpoint_id']}** ({c['method']}): {c['train_rows']} rows, {c['steps']} steps, "
                         f"final loss {c['final_loss']:.4f}, {c['wall_seconds']:.0f} s")
    elif stage == "evaluate":
        lines += ["| model | set | pass@1 | pass@k | entropy | problems x n |", "|---|---|---|---|---|---|"]
        for e in tables["evals"].to_pylist() if "evals" in tables else []:
            ks = ", ".join(f"@{k} {v:.3f}" for k, v in sorted(dict(e["pass_at_k"]).items()))
            lines.append(f"| {e['model_round']} | {e['eval_set']} | {e['pass_at_1']:.3f} | {ks} | {e['entropy']:.3f} "
                         f"| {e['problems']} x {e['n']} |")
    return "\n".join(lines)


def publish_stage_artifacts(run: str, round_: int, stage: str, status: str, counts: dict,
                            tables: dict[str, pa.Table]) -> None:
    try:
        from prefect.artifacts import create_markdown_artifact, create_table_artifact

        create_table_artifact(
            key=artifact_key(run, stage, "counts"),
            table=[{"run": run, "round": round_, "stage": stage, "status": status, **counts,
                    **{f"{name} rows": t.num_rows for name, t in sorted(tables.items())}}],
            description=f"{stage} of run {run}, round {round_}: rows in, out and quarantined",
        )
        create_markdown_artifact(
            key=artifact_key(run, stage, "summary"),
            markdown=stage_markdown(stage, round_, status, tables),
            description=f"{stage} of run {run}, round {round_}",
        )
    except Exception as err:  # the UI is a view of the lake: never fail a stage over it
        run_logger().warning(f"{stage}: could not publish Prefect artifacts ({type(err).__name__}: {err})")


def publish_round_report(run: str, round_: int, plot_dir: Path) -> str:
    """The round's closing markdown: `evoforge report` as text plus the pass@k-by-round plot inline."""
    from flows.report import collect, format_report, plot

    data = collect(run)
    markdown = [f"## evoforge run {run} after round {round_}", "", "```", format_report(run, data), "```"]
    png = plot(run, data, plot_dir / "report.png")
    if png is not None:
        encoded = base64.b64encode(png.read_bytes()).decode()
        markdown += ["", f"![pass@k by round](data:image/png;base64,{encoded})", "", f"(plot file: `{png}`)"]
    text = "\n".join(markdown)
    try:
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(key=artifact_key(run, "report"), markdown=text,
                                 description=f"run {run}: pass@k by round after round {round_}")
    except Exception as err:
        run_logger().warning(f"round report: could not publish the Prefect artifact ({type(err).__name__}: {err})")
    return text
