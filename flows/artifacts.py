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
from pathlib import Path

import pyarrow as pa

from evoforge.data import schemas
from evoforge.data.lake import Lake
from evoforge.flows.report import collect, format_report, plot
from evoforge.flows.stages import STAGES
from evoforge.tasks.progress import flow_run_logger


def artifact_key(run: str, *parts: str) -> str:
    """Prefect keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", "-".join((run, *parts)).lower())).strip("-")


# A summary reads at most this many rows of each output table (the first ones): a round of any size
# is summarised in the same memory; the markdown says when its figures come from a sample.
SUMMARY_SAMPLE_ROWS = 20_000


def summary_tables(store: Lake, run: str, round: int, stage: str, held: dict[str, pa.Table]
                   ) -> tuple[dict[str, pa.Table], dict[str, int]]:
    """What a stage's summary is computed over: the outputs it returned whole as they are, the others
    (streamed, or a skipped stage's) as their first SUMMARY_SAMPLE_ROWS committed rows; and every
    output table's committed rows, from the manifest."""
    committed = store.table_rows(run, round, stage)
    tables = {}
    for name in STAGES[stage].writes:
        if name in held:
            tables[name] = held[name]
            continue
        schema = schemas.ROUND_TABLES[name]
        sample, taken = [], 0
        for batch in store.read_batches(run, name, round, stage, columns=schema.names):
            sample.append(batch.slice(0, SUMMARY_SAMPLE_ROWS - taken))
            taken += sample[-1].num_rows
            if taken >= SUMMARY_SAMPLE_ROWS:
                break
        tables[name] = pa.Table.from_batches(sample, schema)
    return tables, {name: committed.get(name, 0) for name in STAGES[stage].writes}


def stage_markdown(stage: str, round: int, status: str, tables: dict[str, pa.Table],
                   rows: dict[str, int] | None = None) -> str:
    """The figures a user checks first for `stage` (its registry entry's summary of its output tables);
    `rows`: the committed rows of each, where `tables` may hold only the first of them."""
    sampled = [f"- *figures from the first {tables[name].num_rows:,} of {total:,} {name} rows*"
               for name, total in sorted((rows or {}).items()) if name in tables and total > tables[name].num_rows]
    return "\n".join([f"### {stage}, round {round} ({status})", "", *STAGES[stage].summarize(tables), *sampled])


def publish_stage_artifacts(run: str, round: int, stage: str, status: str, counts: dict,
                            tables: dict[str, pa.Table], rows: dict[str, int] | None = None) -> None:
    """`rows`: the committed rows per output table (else `tables`' own counts; see `summary_tables`)."""
    rows = rows if rows is not None else {name: t.num_rows for name, t in tables.items()}
    try:
        from prefect.artifacts import create_markdown_artifact, create_table_artifact

        create_table_artifact(
            key=artifact_key(run, stage, "counts"),
            table=[{"run": run, "round": round, "stage": stage, "status": status, **counts,
                    **{f"{name} rows": n for name, n in sorted(rows.items())}}],
            description=f"{stage} of run {run}, round {round}: rows in, out and quarantined",
        )
        create_markdown_artifact(
            key=artifact_key(run, stage, "summary"),
            markdown=stage_markdown(stage, round, status, tables, rows),
            description=f"{stage} of run {run}, round {round}",
        )
    except Exception as err:  # the UI is a view of the lake: never fail a stage over it
        flow_run_logger().warning(f"{stage}: could not publish Prefect artifacts ({type(err).__name__}: {err})")


def publish_round_report(run: str, round: int, plot_dir: Path) -> str:
    """The round's closing markdown: `evoforge report` as text plus the pass@k-by-round plot inline."""
    data = collect(run)
    markdown = [f"## evoforge run {run} after round {round}", "", "```", format_report(run, data), "```"]
    png = plot(run, data, plot_dir / "report.png")
    if png is not None:
        encoded = base64.b64encode(png.read_bytes()).decode()
        markdown += ["", f"![pass@k by round](data:image/png;base64,{encoded})", "", f"(plot file: `{png}`)"]
    text = "\n".join(markdown)
    try:
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(key=artifact_key(run, "report"), markdown=text,
                                 description=f"run {run}: pass@k by round after round {round}")
    except Exception as err:
        flow_run_logger().warning(f"round report: could not publish the Prefect artifact ({type(err).__name__}: {err})")
    return text
