"""The round config: plain data, one section per stage, loaded from YAML or JSON.

Relative paths in a config resolve against the project root, so a config means the same thing
from any working directory.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, Field, ValidationError

from data.home import PROJECT_ROOT
from data.ingest import EvalSetConfig, SourceConfig
from models.engine import EngineConfig
from tasks.critic import CriticConfig
from tasks.evaluate import EvaluateConfig
from tasks.filter import FilterConfig
from tasks.finetune import FinetuneConfig
from tasks.generate import GenerateConfig
from tasks.mcts import MCTSConfig
from tasks.pairs import PairsConfig
from tasks.synthesize import SynthesizeConfig
from tasks.verify import VerifyConfig

ROUND_STAGES = ("generate", "verify", "filter", "synthesize", "mcts", "critic", "pairs", "finetune", "evaluate")
SVS_STAGES = ("generate", "verify", "filter", "synthesize", "pairs", "finetune", "evaluate")  # the default round

DEFAULT_CONFIG = PROJECT_ROOT / "deploy" / "configs" / "demo.yaml"


class ConfigError(ValueError):
    pass


class RoundConfig(BaseModel):
    engine: EngineConfig = Field(default_factory=EngineConfig)
    sources: list[SourceConfig] = Field(default_factory=list, description="problem sources ingested in round 0")
    eval_sets: list[EvalSetConfig] = Field(
        default_factory=list, description="held-out sets: training pools are decontaminated against them"
    )
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    verify: VerifyConfig = Field(default_factory=VerifyConfig)
    filter: FilterConfig = Field(default_factory=FilterConfig)
    synthesize: SynthesizeConfig = Field(default_factory=SynthesizeConfig)
    mcts: MCTSConfig = Field(default_factory=MCTSConfig)
    critic: CriticConfig = Field(default_factory=CriticConfig)
    pairs: PairsConfig = Field(default_factory=PairsConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    stages: list[Literal[ROUND_STAGES]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: list(SVS_STAGES), description="the stages a round runs, in this order (add mcts for rStar-Math, critic for RARO)"
    )


def resolve_path(path: str | Path) -> Path:
    path = Path(path).expanduser()
    return path if path.is_absolute() else (PROJECT_ROOT / path)


def load_config(path: str | Path) -> RoundConfig:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config {path}: not valid YAML/JSON ({err})") from None
    try:
        return RoundConfig.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"config {path}: {where}: {first['msg']} ({err.error_count()} error(s) in all)") from None


def config_hash(section: BaseModel | dict | None) -> str:
    data = section.model_dump(mode="json") if isinstance(section, BaseModel) else section
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def save_config(config: RoundConfig, path: Path) -> None:
    import os
    import uuid

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex}"
    tmp.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    os.replace(tmp, path)
