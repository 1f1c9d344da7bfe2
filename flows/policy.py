"""Which config and policy a round runs with, and which round comes next.

A stage launched from the UI or `evoforge stage` names only the run and the round: its config is
the one saved in the run, and its engine loads the checkpoint trained in the round before.
"""
from __future__ import annotations

from flows.config import ConfigError, RoundConfig, load_config, save_config
from flows.stage_runner import lake


def trained_checkpoint(run: str, round_: int) -> dict | None:
    rows = [r for r in lake().read(run, "checkpoints", round_, "finetune").to_pylist() if r["role"] == "policy"]
    return rows[0] if rows else None


def policy_for_round(run: str, config: RoundConfig, round_: int) -> RoundConfig:
    """Round r's config: the engine loads the checkpoint trained in round r - 1, if there is one."""
    checkpoint = trained_checkpoint(run, round_ - 1) if round_ > 0 else None
    if checkpoint is None:
        return config
    return config.model_copy(update={"engine": config.engine.model_copy(update={"model": checkpoint["path"]})})


def saved_config(run: str) -> RoundConfig:
    path = lake().run_dir(run) / "config.yaml"
    if not path.exists():
        raise ConfigError(f"run {run!r} has no saved config: start it with a config (--config FILE)")
    return load_config(path)


def run_config(run: str, config: RoundConfig | None = None, config_file: str | None = None) -> RoundConfig:
    """The config given, else the file named, else the run's saved one. A given one is saved into the
    run, so later single-stage reruns use it."""
    if config is None and config_file:
        from flows.config import resolve_path

        config = load_config(resolve_path(config_file))
    if config is None:
        return saved_config(run)
    save_config(config, lake().ensure_run(run) / "config.yaml")
    return config


def stage_config(run: str, round_: int, config: RoundConfig | None) -> RoundConfig:
    """A stage's config: the one passed (the round's), else the run's saved one with round r's policy."""
    return policy_for_round(run, config if config is not None else saved_config(run), round_)


def next_round(run: str, config: RoundConfig) -> int:
    """The first round whose last configured stage has not finished: a scheduled round continues an
    interrupted one, or starts the one after the last finished."""
    events = lake().read(run, "stage_runs").to_pylist()
    last = config.stages[-1] if config.stages else "ingest"
    done = [e["round"] for e in events if e["stage"] == last and e["status"] in ("completed", "skipped")]
    return max(done) + 1 if done else 0
