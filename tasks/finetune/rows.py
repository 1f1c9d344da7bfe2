"""What a method's row selection may read of the round: each method module's `training_rows(inputs,
config)` picks its rows through this interface, and the finetune flow (flows/finetune.py) hands it one
backed by the lake. Tasks do not read the lake themselves (docs/ARCHITECTURE.md: flows wire stages to
storage); a test hands in tables of its own."""
from __future__ import annotations

from typing import Protocol

import pyarrow as pa


class RoundInputs(Protocol):
    round: int

    def round_table(self, table: str, made_by: str) -> pa.Table:
        """`table` as stage `made_by` wrote it this round, later stages' rows included; required."""

    def stage_output(self, table: str, made_by: str) -> pa.Table:
        """Only the rows stage `made_by` wrote this round; required."""

    def problem_pool(self) -> pa.Table:
        """P_r: the ingested problems and the variants kept in earlier rounds; required."""

    def problems_with_experts(self) -> pa.Table:
        """The pool's problems that have an expert answer (`expert_answer`)."""

    def every_round(self, table: str, made_by: str) -> pa.Table:
        """`table` as `made_by` wrote it in every round of the run so far (a `round` column tells them apart)."""
