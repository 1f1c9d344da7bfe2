"""The stage registry: every stage evoforge knows, in the order a round runs them, each once.

An entry says what a stage is: its Prefect flow, its section of the round config, the tables it
reads and writes, and the summary its Prefect artifact shows. The round flow, the round config,
the CLI, the deployments and the artifacts all read this list, so adding a stage is its task
module, its flow module, its SQL view, one entry here, and its tests.
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
    flow_path: str  # "module:function" of its Prefect flow
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

    @property
    def flow(self):
        return _load(self.flow_path)


REGISTRY: tuple[Stage, ...] = (
    Stage("ingest", "evoforge.tasks.ingest", None, "evoforge.flows.ingest:ingest_flow",
          reads=(), writes=("problems", "quarantine"), in_round=False),
    Stage("generate", "evoforge.tasks.generate", "GenerateConfig", "evoforge.flows.generate:generate_flow",
          reads=("problems",), writes=("rollouts",)),
    Stage("verify", "evoforge.tasks.verify", "VerifyConfig", "evoforge.flows.verify:verify_flow",
          reads=("problems", "rollouts"), writes=("verdicts",)),
    Stage("filter", "evoforge.tasks.filter", "FilterConfig", "evoforge.flows.filter:filter_flow",
          reads=("rollouts", "verdicts"), writes=("problem_stats",)),
    Stage("synthesize", "evoforge.tasks.synthesize", "SynthesizeConfig", "evoforge.flows.synthesize:synthesize_flow",
          reads=("problems", "problem_stats", "rollouts", "verdicts"), writes=("variants", "rollouts", "verdicts", "problems")),
    Stage("mcts", "evoforge.tasks.mcts", "MCTSConfig", "evoforge.flows.mcts:mcts_flow",
          reads=("problems", "problem_stats", "checkpoints"), writes=("mcts_nodes", "traces")),
    Stage("critic", "evoforge.tasks.critic", "CriticConfig", "evoforge.flows.critic:critic_flow",
          reads=("problems", "rollouts"), writes=("judgments",)),
    Stage("pairs", "evoforge.tasks.pairs", "PairsConfig", "evoforge.flows.pairs:pairs_flow",
          reads=("problems", "problem_stats", "rollouts", "verdicts", "mcts_nodes"), writes=("pairs", "sft_examples")),
    Stage("finetune", "evoforge.tasks.finetune.config", "FinetuneConfig", "evoforge.flows.finetune:finetune_flow",
          reads=("sft_examples", "pairs", "traces", "problems", "problem_stats", "judgments", "rollouts", "checkpoints"),
          writes=("checkpoints", "train_metrics", "variants")),
    Stage("evaluate", "evoforge.tasks.evaluate", "EvaluateConfig", "evoforge.flows.evaluate:evaluate_flow",
          reads=("checkpoints", "eval_results", "promotions"),
          writes=("rollouts", "verdicts", "eval_results", "evals", "score_intervals", "promotions")),
)

STAGES: dict[str, Stage] = {stage.name: stage for stage in REGISTRY}
ROUND_STAGES: tuple[str, ...] = tuple(stage.name for stage in REGISTRY if stage.in_round)
# the stages of an SvS round, the default
SVS_STAGES: tuple[str, ...] = ("generate", "verify", "filter", "synthesize", "pairs", "finetune", "evaluate")
RoundStage = Literal[ROUND_STAGES]  # type: ignore[valid-type]
StageName = Literal[tuple(STAGES)]  # type: ignore[valid-type]
