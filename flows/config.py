"""The round config: plain data, one section per stage of the registry (flows/stages.py), loaded
from YAML or JSON.

Relative paths in a config resolve against the project root, so a config means the same thing
from any working directory.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import yaml
from pydantic import BaseModel, Field, ValidationError, create_model

from evoforge.data import atomic
from evoforge.data.home import PROJECT_ROOT
from evoforge.data.storage import is_remote
from evoforge.flows.stages import REGISTRY, SVS_STAGES, RoundStage
from evoforge.models.engine import EngineConfig
from evoforge.tasks.ingest import EvalSetConfig, SourceConfig

DEFAULT_CONFIG = PROJECT_ROOT / "deploy" / "configs" / "demo.yaml"


class ConfigError(ValueError):
    pass


class _RoundConfigBase(BaseModel):
    lake: str | None = Field(
        None, description="where the runs live when EVOFORGE_RUNS is not set: a folder, file:// or s3://bucket/prefix")
    engine: EngineConfig = Field(default_factory=EngineConfig)
    sources: list[SourceConfig] = Field(default_factory=list, description="problem sources ingested in round 0")
    eval_sets: list[EvalSetConfig] = Field(
        default_factory=list, description="held-out sets: training pools are decontaminated against them"
    )


# engine, sources, eval_sets, then one section per stage in round order, then the stages to run
RoundConfig = create_model(
    "RoundConfig",
    __base__=_RoundConfigBase,
    **{stage.name: (stage.section, Field(default_factory=stage.section)) for stage in REGISTRY if stage.section_name},
    stages=(list[RoundStage], Field(  # type: ignore[valid-type]
        default_factory=lambda: list(SVS_STAGES),
        description="the stages a round runs, in this order (add mcts for rStar-Math, critic for RARO)")),
)


def resolve_path(path: str | Path) -> Path:
    path = Path(path).expanduser()
    return path if path.is_absolute() else (PROJECT_ROOT / path)


def load_config(path: str | Path) -> RoundConfig:
    path = path if is_remote(path) else Path(path)  # a run's saved config may be on object storage
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config {path}: no such file") from None
    try:
        data = yaml.safe_load(text) or {}
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
    atomic.write_text(path, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
