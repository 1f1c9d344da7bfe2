"""The round config: plain data, one section per stage of the registry (flows/stages.py), loaded
from YAML or JSON. Declared field by field, so a reader (or an IDE) goes from `finetune.max_steps` to
FinetuneConfig in one step; tests/test_structure.py keeps the sections in step with the registry.
A key no section declares is an error: one line naming the file, the key and the closest valid one.

Relative paths in a config resolve against the project root, so a config means the same thing
from any working directory.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import re
from pathlib import Path

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from evoforge.data import atomic
from evoforge.data.home import PROJECT_ROOT
from evoforge.data.section import Section
from evoforge.data.storage import is_remote
from evoforge.flows.stages import SVS_STAGES, RoundStage, StageName
from evoforge.models.engine import EngineConfig
from evoforge.tasks.critic import CriticConfig
from evoforge.tasks.evaluate import EvaluateConfig
from evoforge.tasks.export import ExportConfig
from evoforge.tasks.filter import FilterConfig
from evoforge.tasks.finetune.config import FinetuneConfig, say_once
from evoforge.tasks.generate import GenerateConfig
from evoforge.tasks.ingest import EvalSetConfig, SourceConfig
from evoforge.tasks.mcts import MCTSConfig
from evoforge.tasks.pairs import PairsConfig
from evoforge.tasks.synthesize import SynthesizeConfig
from evoforge.tasks.verify import VerifyConfig

DEFAULT_CONFIG = PROJECT_ROOT / "deploy" / "configs" / "demo.yaml"


class ConfigError(ValueError):
    pass


class ClusterConfig(Section):
    """Where each stage runs (deploy/prefect.yaml, deploy/cluster/). A stage named in `pools` is started
    as a flow run of the deployment `stage/<pool>` in that Prefect work pool, on whichever machine's
    worker takes it; the round waits for it and passes nothing but the lake. No pools (the default):
    every stage runs in the round's own process."""
    pools: dict[StageName, str] = Field(  # type: ignore[valid-type]
        default_factory=dict,
        description="stage -> work pool, e.g. {generate: gpu, verify: cpu}; a stage not named runs in the round's process")
    retries: int = Field(2, ge=0, description="how many times a stage run whose worker or machine was lost is started again")
    heartbeat_seconds: int = Field(
        30, ge=30, description="how often a dispatched stage run reports that it is alive (Prefect's flow-run heartbeat; 30 at least)")
    lost_after_seconds: float = Field(
        90, ge=40, description="a dispatched stage run that reported nothing for this long is lost: marked Crashed and started again")
    poll_seconds: float = Field(2.0, gt=0, le=60, description="how often the round looks at a dispatched stage run")
    range_workers: int = Field(
        0, ge=0, le=256,
        description="processes verify, filter and pairs spread their ranges of problems over, on the machine they run "
                    "on (data/spread.py; verify shares `verify.workers` graders among them, at least one each); 1: the "
                    "stage's own process; 0: one per core (and per 262,144 rows read) for a stage that reads a million rows "
                    "or more, else 1. "
                    "The same rows either way")

    @field_validator("pools")
    @classmethod
    def _pool_names(cls, pools: dict) -> dict:
        for stage, pool in pools.items():
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", pool or ""):
                raise ValueError(f"{stage}: work pool {pool!r} is not a pool name (letters, digits, '_', '.', '-')")
        return pools

    @model_validator(mode="after")
    def _lost_after_a_heartbeat(self) -> "ClusterConfig":
        if self.lost_after_seconds < self.heartbeat_seconds + 10:
            raise ValueError(f"lost_after_seconds ({self.lost_after_seconds:g}) must exceed heartbeat_seconds "
                             f"({self.heartbeat_seconds}) by 10 s at least, or a live stage run would be taken for lost")
        return self


class RoundConfig(Section):
    """engine, sources, eval_sets, then one section per stage in round order (the registry's), then the
    stages to run, then where the stages run, then what an export's card says."""
    lake: str | None = Field(
        None, description="where the runs live when EVOFORGE_RUNS is not set: a folder, file:// or s3://bucket/prefix")
    engine: EngineConfig = Field(default_factory=EngineConfig)
    sources: list[SourceConfig] = Field(default_factory=list, description="problem sources ingested in round 0")
    eval_sets: list[EvalSetConfig] = Field(
        default_factory=list, description="held-out sets: training pools are decontaminated against them")
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    verify: VerifyConfig = Field(default_factory=VerifyConfig)
    filter: FilterConfig = Field(default_factory=FilterConfig)
    synthesize: SynthesizeConfig = Field(default_factory=SynthesizeConfig)
    mcts: MCTSConfig = Field(default_factory=MCTSConfig)
    critic: CriticConfig = Field(default_factory=CriticConfig)
    pairs: PairsConfig = Field(default_factory=PairsConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    stages: list[RoundStage] = Field(  # type: ignore[valid-type]
        default_factory=lambda: list(SVS_STAGES),
        description="the stages a round runs, in this order (add mcts for rStar-Math, critic for RARO)")
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    export: ExportConfig = Field(default_factory=ExportConfig, description="the dataset card `evoforge export` writes")

    @model_validator(mode="before")
    @classmethod
    def _read_moved_keys(cls, data):
        """RARO's row mix moved from `critic` to `finetune.raro` (it is training's, not the critic stage's):
        a config written before (a run's saved one among them) reads as it always did."""
        critic = data.get("critic") if isinstance(data, dict) else None
        moved = {key: critic[key] for key in ("replay_size", "critic_share") if isinstance(critic, dict) and key in critic}
        if not moved:
            return data
        for key in moved:
            say_once(f"config: critic.{key} is finetune.raro.{key} now; read as that")
        finetune = dict(data.get("finetune") or {})
        finetune["raro"] = {**moved, **(finetune.get("raro") or {})}
        return {**data, "critic": {k: v for k, v in critic.items() if k not in moved}, "finetune": finetune}


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
        if first["type"] == "extra_forbidden":
            message = unknown_key(RoundConfig, first["loc"])
        else:
            message = first["msg"].removeprefix("Value error, ")
        raise ConfigError(f"config {path}: {where}: {message} ({err.error_count()} error(s) in all)") from None


def unknown_key(model: type[BaseModel], loc: tuple) -> str:
    """'unknown key' and the closest key valid at that place (`loc`: the key's path in the config)."""
    for step in loc[:-1]:  # down the sections to the one holding the key (a list's index is skipped)
        if isinstance(step, int):
            continue
        field = model.model_fields.get(step)
        nested = _model_of(field.annotation) if field is not None else None
        if nested is None:
            return "unknown key"
        model = nested
    valid = list(model.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.6)
    return "unknown key" + (f"; did you mean {close[0]!r}?" if close else f" (valid: {', '.join(valid)})")


def _model_of(annotation) -> type[BaseModel] | None:
    """The section class a field holds: itself, or inside Optional[...] or list[...]."""
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def config_hash(section: BaseModel | dict | None) -> str:
    data = section.model_dump(mode="json") if isinstance(section, BaseModel) else section
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def save_config(config: RoundConfig, path: Path) -> None:
    atomic.write_text(path, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
