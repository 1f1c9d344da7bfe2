"""Arrow schemas of every artifact table: the contract between stages, the lake and `sql/views/`.

`round` is not a column of the round-partitioned tables: it comes from the lake path
(`round=<r>/`), which both pyarrow and DuckDB read as a hive partition.
"""
from __future__ import annotations

import pyarrow as pa

PROBLEMS = pa.schema(
    [
        ("problem_id", pa.string()),
        ("question", pa.string()),
        ("answer", pa.string()),
        ("source", pa.string()),
        ("source_file", pa.string()),
        ("source_row", pa.int64()),
        ("origin", pa.string()),
        ("parent_problem_id", pa.string()),
        ("task", pa.string()),
        ("expert_answer", pa.string()),
    ]
)

QUARANTINE = pa.schema(
    [
        ("source_file", pa.string()),
        ("source_row", pa.int64()),
        ("field", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("raw", pa.string()),
        ("matched_set", pa.string()),
        ("matched_id", pa.string()),
    ]
)

ROLLOUTS = pa.schema(
    [
        ("rollout_id", pa.string()),
        ("problem_id", pa.string()),
        ("model_id", pa.string()),
        ("seed", pa.int64()),
        ("sample_index", pa.int32()),
        ("text", pa.string()),
        ("completion_tokens", pa.int32()),
        ("finish_reason", pa.string()),
        ("mean_logprob", pa.float64()),
    ]
)

VERDICTS = pa.schema(
    [
        ("rollout_id", pa.string()),
        ("problem_id", pa.string()),
        ("verdict", pa.string()),
        ("extracted_answer", pa.string()),
        ("gold", pa.string()),
        ("detail", pa.string()),
        ("seconds", pa.float64()),
        ("graded_with", pa.string()),
    ]
)

PROBLEM_STATS = pa.schema(
    [
        ("problem_id", pa.string()),
        ("n", pa.int32()),
        ("correct", pa.int32()),
        ("accuracy", pa.float64()),
        ("pass_at_k", pa.map_(pa.int32(), pa.float64())),
        ("mean_tokens", pa.float64()),
        ("bucket", pa.string()),
        ("distinct_answers", pa.int32()),  # NULL: counted before filter wrote it (collapse then reads the verdicts)
        ("mean_logprob", pa.float64()),
    ]
)

STAGE_RUNS = pa.schema(
    [
        ("stage_run_id", pa.string()),
        ("run", pa.string()),
        ("round", pa.int32()),
        ("stage", pa.string()),
        ("flow_run_id", pa.string()),
        ("config_hash", pa.string()),
        ("model_id", pa.string()),
        ("input_fingerprint", pa.string()),
        ("input_parts", pa.string()),
        ("output_fingerprint", pa.string()),
        ("rows_in", pa.int64()),
        ("rows_out", pa.int64()),
        ("rows_quarantined", pa.int64()),
        ("started_at", pa.timestamp("us", tz="UTC")),
        ("finished_at", pa.timestamp("us", tz="UTC")),
        ("status", pa.string()),
        ("error", pa.string()),
    ]
)

VARIANTS = pa.schema(
    [
        ("variant_id", pa.string()),
        ("parent_problem_id", pa.string()),
        ("source_rollout_id", pa.string()),
        ("text", pa.string()),
        ("answer", pa.string()),
        ("raw_output", pa.string()),
        ("n", pa.int32()),
        ("correct", pa.int32()),
        ("accuracy", pa.float64()),
        ("kept", pa.bool_()),
        ("reward", pa.float64()),
        ("reject_reason", pa.string()),
        ("origin", pa.string()),
        ("step", pa.int32()),
    ]
)

PAIRS = pa.schema(
    [
        ("pair_id", pa.string()),
        ("kind", pa.string()),
        ("problem_id", pa.string()),
        ("prompt", pa.string()),
        ("prefix", pa.string()),
        ("chosen", pa.string()),
        ("rejected", pa.string()),
        ("chosen_rollout_id", pa.string()),
        ("rejected_rollout_id", pa.string()),
        ("chosen_score", pa.float64()),
        ("rejected_score", pa.float64()),
    ]
)

SFT_EXAMPLES = pa.schema(
    [
        ("example_id", pa.string()),
        ("problem_id", pa.string()),
        ("rollout_id", pa.string()),
        ("prompt", pa.string()),
        ("completion", pa.string()),
        ("bucket", pa.string()),
        ("origin", pa.string()),
    ]
)

CHECKPOINTS = pa.schema(
    [
        ("checkpoint_id", pa.string()),
        ("parent_model_id", pa.string()),
        ("role", pa.string()),
        ("method", pa.string()),
        ("path", pa.string()),
        ("model_id", pa.string()),
        ("data_fingerprint", pa.string()),
        ("train_rows", pa.int64()),
        ("steps", pa.int32()),
        ("final_loss", pa.float64()),
        ("wall_seconds", pa.float64()),
        ("stopped_early", pa.string()),
        ("base_model_id", pa.string()),
        ("adapter", pa.bool_()),
        ("processes", pa.int32()),
        ("tracking", pa.string()),
    ]
)

TRAIN_METRICS = pa.schema(
    [
        ("checkpoint_id", pa.string()),
        ("step", pa.int32()),
        ("metric", pa.string()),
        ("value", pa.float64()),
    ]
)

EVALS = pa.schema(
    [
        ("model_id", pa.string()),
        ("model_round", pa.int32()),
        ("eval_set", pa.string()),
        ("problems", pa.int32()),
        ("n", pa.int32()),
        ("pass_at_1", pa.float64()),
        ("pass_at_k", pa.map_(pa.int32(), pa.float64())),
        ("entropy", pa.float64()),
        ("mean_tokens", pa.float64()),
        ("no_answer_rate", pa.float64()),
        ("pass_at_1_low", pa.float64()),
        ("pass_at_1_high", pa.float64()),
        ("distinct_answer_rate", pa.float64()),
        ("search", pa.string()),
    ]
)

# one row per model, held-out set and problem: what every interval and paired comparison is computed from
EVAL_RESULTS = pa.schema(
    [
        ("model_id", pa.string()),
        ("model_round", pa.int32()),
        ("eval_set", pa.string()),
        ("problem_id", pa.string()),
        ("n", pa.int32()),
        ("correct", pa.int32()),
        ("mean_tokens", pa.float64()),
        ("mean_logprob", pa.float64()),
        ("distinct_answers", pa.int32()),
        ("no_answer", pa.int32()),
        ("settings_hash", pa.string()),
        ("search", pa.string()),
    ]
)

SCORE_INTERVALS = pa.schema(
    [
        ("model_id", pa.string()),
        ("model_round", pa.int32()),
        ("eval_set", pa.string()),
        ("metric", pa.string()),
        ("k", pa.int32()),
        ("problems", pa.int32()),
        ("n", pa.int32()),
        ("estimate", pa.float64()),
        ("low", pa.float64()),
        ("high", pa.float64()),
        ("baseline_model_id", pa.string()),
        ("baseline_model_round", pa.int32()),
        ("paired_problems", pa.int32()),
        ("change", pa.float64()),
        ("change_low", pa.float64()),
        ("change_high", pa.float64()),
        ("level", pa.float64()),
        ("resamples", pa.int32()),
        ("seed", pa.int64()),
        ("search", pa.string()),
    ]
)

PROMOTIONS = pa.schema(
    [
        ("checkpoint_id", pa.string()),
        ("model_id", pa.string()),
        ("model_round", pa.int32()),
        ("decision", pa.string()),
        ("why", pa.string()),
        ("decided_by", pa.string()),
        ("rule", pa.string()),
        ("baseline_model_id", pa.string()),
        ("decided_at", pa.timestamp("us", tz="UTC")),
    ]
)

MCTS_NODES = pa.schema(
    [
        ("node_id", pa.string()),
        ("tree_id", pa.string()),
        ("problem_id", pa.string()),
        ("parent_id", pa.string()),
        ("depth", pa.int32()),
        ("step_text", pa.string()),
        ("code", pa.string()),
        ("exec_output", pa.string()),
        ("exec_status", pa.string()),
        ("visits", pa.int32()),
        ("q_value", pa.float64()),
        ("is_terminal", pa.bool_()),
        ("answer", pa.string()),
        ("correct", pa.bool_()),
    ]
)

TRACES = pa.schema(
    [
        ("trace_id", pa.string()),
        ("problem_id", pa.string()),
        ("tree_id", pa.string()),
        ("node_ids", pa.list_(pa.string())),
        ("prompt", pa.string()),
        ("completion", pa.string()),
        ("answer", pa.string()),
        ("mean_q", pa.float64()),
        ("depth", pa.int32()),
    ]
)

JUDGMENTS = pa.schema(
    [
        ("judgment_id", pa.string()),
        ("problem_id", pa.string()),
        ("rollout_id", pa.string()),
        ("order", pa.string()),
        ("critic_output", pa.string()),
        ("said", pa.string()),
        ("label", pa.string()),
        ("parsed_ok", pa.bool_()),
        ("critic_reward", pa.float64()),
        ("policy_reward", pa.float64()),
        ("critic_model_id", pa.string()),
    ]
)

# the artifact tables stored under runs/<run>/round=<r>/<stage>/<table>/
ROUND_TABLES: dict[str, pa.Schema] = {
    "problems": PROBLEMS,
    "quarantine": QUARANTINE,
    "rollouts": ROLLOUTS,
    "verdicts": VERDICTS,
    "problem_stats": PROBLEM_STATS,
    "variants": VARIANTS,
    "pairs": PAIRS,
    "sft_examples": SFT_EXAMPLES,
    "checkpoints": CHECKPOINTS,
    "train_metrics": TRAIN_METRICS,
    "evals": EVALS,
    "eval_results": EVAL_RESULTS,
    "score_intervals": SCORE_INTERVALS,
    "promotions": PROMOTIONS,
    "mcts_nodes": MCTS_NODES,
    "traces": TRACES,
    "judgments": JUDGMENTS,
}
# tables of the whole run, stored under runs/<run>/<table>/
RUN_TABLES: dict[str, pa.Schema] = {"stage_runs": STAGE_RUNS}

# the values of problem_stats.bucket (tasks/filter.py: `bucket`)
BUCKETS = ("unsolved", "underperforming", "learnable", "solved")


def one_array(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    """A column as one array, without a copy when it is one chunk already (`combine_chunks` copies even one)."""
    if isinstance(column, pa.ChunkedArray):
        return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    return column


def conform(table: pa.Table, schema: pa.Schema, *, where: str, missing_as_null: bool = False) -> pa.Table:
    """Cast `table` to exactly `schema` (column order and types), naming what does not fit.
    `missing_as_null`: a column added to the schema after the file was written reads as NULLs."""
    missing = [f.name for f in schema if f.name not in table.column_names]
    if missing and missing_as_null:
        for name in missing:
            table = table.append_column(name, pa.nulls(table.num_rows, schema.field(name).type))
        missing = []
    if missing:
        raise ValueError(f"{where}: missing column(s) {missing}; expected {schema.names}")
    try:
        return table.select(schema.names).cast(schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
        raise ValueError(f"{where}: columns do not match the schema: {err}") from err
