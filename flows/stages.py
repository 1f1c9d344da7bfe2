"""The stage registry: every stage evoforge knows, in the order a round runs them, each once.

An entry says what a stage is: its task module, its section of the round config, the tables it
reads and writes, and the summary its Prefect artifact shows. The round config (flows/config.py
`RoundConfig`, one field per section) and the round's flows (flows/round.py `STAGE_FLOWS`) name each
stage in code, so a reader follows them without this list; tests/test_structure.py keeps both in step
with it. Adding a stage is its task module, its flow module, its SQL view, one entry here, its field
in RoundConfig, its flow in STAGE_FLOWS, and its tests (docs/ARCHITECTURE.md).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Literal

import pyarrow as pa
from pydantic import BaseModel


def _load(reference: str):
    module, name = reference.split(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Stage:
    """A stage, by reference: nothing is imported until it is used, so reading the registry (the
    CLI's argument parser) stays cheap."""
    name: str
    task: str  # its task module: the functions over Arrow tables, its config section and `summarize`
    section_name: str | None  # the class of its round-config section in `task`; ingest is configured by `sources`
    reads: tuple[str, ...]  # lake tables it reads (written by earlier stages)
    writes: tuple[str, ...]  # lake tables it writes, and nothing else
    in_round: bool = True  # False: ingest, which runs once per source in round 0

    @property
    def section(self) -> type[BaseModel] | None:
        return _load(f"{self.task}:{self.section_name}") if self.section_name else None

    @property
    def summarize(self) -> Callable[[dict[str, pa.Table]], list[str]]:
        """Its output tables -> the markdown lines of its Prefect artifact."""
        return _load(f"{self.task}:summarize")


REGISTRY: tuple[Stage, ...] = (
    Stage("ingest", "evoforge.tasks.ingest", None,
          reads=(), writes=("problems", "quarantine"), in_round=False),
    Stage("generate", "evoforge.tasks.generate", "GenerateConfig",
          reads=("problems",), writes=("rollouts",)),
    Stage("verify", "evoforge.tasks.verify", "VerifyConfig",
          reads=("problems", "rollouts"), writes=("verdicts",)),
    Stage("filter", "evoforge.tasks.filter", "FilterConfig",
          reads=("rollouts", "verdicts"), writes=("problem_stats",)),
    Stage("synthesize", "evoforge.tasks.synthesize", "SynthesizeConfig",
          reads=("problems", "problem_stats", "rollouts", "verdicts"), writes=("variants", "rollouts", "verdicts", "problems")),
    Stage("mcts", "evoforge.tasks.mcts", "MCTSConfig",
          reads=("problems", "problem_stats", "checkpoints"), writes=("mcts_nodes", "traces")),
    Stage("critic", "evoforge.tasks.critic", "CriticConfig",
          reads=("problems", "rollouts"), writes=("judgments",)),
    Stage("pairs", "evoforge.tasks.pairs", "PairsConfig",
          reads=("problems", "problem_stats", "rollouts", "verdicts", "mcts_nodes"), writes=("pairs", "sft_examples")),
    Stage("finetune", "evoforge.tasks.finetune.config", "FinetuneConfig",
          reads=("sft_examples", "pairs", "traces", "problems", "problem_stats", "judgments", "rollouts", "checkpoints"),
          writes=("checkpoints", "train_metrics", "variants")),
    Stage("evaluate", "evoforge.tasks.evaluate", "EvaluateConfig",
          reads=("checkpoints", "eval_results", "promotions"),
          writes=("rollouts", "verdicts", "eval_results", "evals", "score_intervals", "promotions")),
)

STAGES: dict[str, Stage] = {stage.name: stage for stage in REGISTRY}
ROUND_STAGES: tuple[str, ...] = tuple(stage.name for stage in REGISTRY if stage.in_round)
# the stages of an SvS round, the default
SVS_STAGES: tuple[str, ...] = ("generate", "verify", "filter", "synthesize", "pairs", "finetune", "evaluate")
RoundStage = Literal[ROUND_STAGES]  # type: ignore[valid-type]
StageName = Literal[tuple(STAGES)]  # type: ignore[valid-type]
