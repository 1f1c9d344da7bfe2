"""Joining a Ray cluster, or starting one on this machine, with evoforge's environment on every worker.

`connect(address)` is the one door to Ray for the engine (models/ray_engine.py) and the graders
(tasks/grading/on_ray.py); it is idempotent, so each of them calls it before use.

- `address=None`: the cluster this process is already connected to, else a fresh local cluster
  (`ray.init(address="local")`: a bare `ray.init()` would join any Ray it finds running on the
  machine, such as a test cluster). Its temp and session folder (sockets, logs, spilled objects) is
  `<home>/.tmp/ray`, kept short because Unix socket paths are limited to 107 bytes; no dashboard.
- an address (`"auto"`, `"host:6379"`, `"ray://host:10001"`): join that cluster.

Either way the job's `runtime_env` carries evoforge's environment (data/home.py: the vLLM, Hugging
Face and torch caches inside the project home, HF_HUB_OFFLINE, ...), EVOFORGE_HOME and, when set,
PREFECT_API_URL: a Ray worker that runs Prefect code must reach the server the driver uses rather
than each start a temporary one on the same SQLite file ("database is locked"). On another machine
those paths must exist too: run evoforge from the same checkout path, or set EVOFORGE_HOME there.

Ray's own output stays off the terminal: workers' stdout and stderr stay in the session's log folder
(`log_to_driver=False`), Ray Data's progress bars are off, and the driver's Ray loggers print errors
only (Ray Data's `ray-data.log` in the session folder keeps its records). One line escapes: the
driver's C++ core worker writes an ERROR line to stderr for each Ray Data actor it creates ("has
constructor arguments in the object store and max_restarts > 0", ray-project/ray#53727); only
giving up actor restarts (`max_restarts=0`, a deprecated map_batches argument) would silence it.

Authentication: Ray 2.60 turns token authentication on for a new local cluster and, with no token,
writes one to `~/.ray/auth_token`. Here the token lives in `<home>/.cache/ray/auth_token` instead
(RAY_AUTH_TOKEN_PATH, inherited by the cluster's processes), unless the user gave a token
(RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH) or RAY_AUTH_MODE=disabled. Joining a cluster that wants a token
needs the user's own. `ray.cluster_utils.Cluster` (tests, benchmarks) starts without authentication
unless RAY_AUTH_MODE=token is set.
"""
from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

from evoforge.data import home

# Unix socket paths (<temp>/session_<date>_<time>_<micros>_<pid>/sockets/plasma_store) hold 107
# bytes; the session part takes up to ~64 of them
MAX_TEMP_DIR_LENGTH = 40

_connected_address: str | None = None  # what this module passed to ray.init, for the clash check


def temp_dir() -> Path:
    return Path(os.environ.get("RAY_TMPDIR") or home.home() / ".tmp" / "ray")


def worker_env() -> dict[str, str]:
    """Environment variables every Ray worker of evoforge's jobs gets. The driver's effective values,
    so a user's explicit setting (which `home.configure()` never overrides) reaches the workers too."""
    root = home.home()
    env = {key: os.environ.get(key, value) for key, value in home.environment_defaults(root).items()}
    env["EVOFORGE_HOME"] = str(root)
    for key in ("PREFECT_API_URL", "EVOFORGE_RUNS"):
        if os.environ.get(key):
            env[key] = os.environ[key]
    return env


def runtime_env() -> dict:
    return {"env_vars": worker_env()}


def use_project_token() -> None:
    """Token authentication with the token inside the project (see the module docstring)."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return
    path = home.cache_dir() / "ray" / "auth_token"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as fh:
            fh.write(secrets.token_hex(32))  # what `ray get-auth-token --generate` writes
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(path)


def connect(address: str | None = None, log_to_driver: bool = False) -> None:
    """Connect this process to Ray (see the module docstring); a no-op when already connected to it.
    Raises RuntimeError when this process is already connected to a different cluster. `log_to_driver`:
    the workers' output comes to this process's (a driver whose output is a log file: ray_train.py)."""
    global _connected_address
    import ray

    if ray.is_initialized():
        current = ray.get_runtime_context().gcs_address
        if address not in (None, "auto", _connected_address, current):
            raise RuntimeError(
                f"Ray is already connected to the cluster at {current} in this process; it cannot also "
                f"join {address!r}. Use one ray.address for every stage of a run.")
        quiet_driver()
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no reporting from an offline machine
    if address is None:
        folder = temp_dir()
        if len(str(folder)) > MAX_TEMP_DIR_LENGTH:
            raise RuntimeError(
                f"Ray's temp folder {folder} is too long for its Unix sockets (at most "
                f"{MAX_TEMP_DIR_LENGTH} characters): set RAY_TMPDIR to a shorter folder of your own")
        folder.mkdir(parents=True, exist_ok=True)
        use_project_token()
        ray.init(address="local", _temp_dir=str(folder), include_dashboard=False, log_to_driver=log_to_driver,
                 logging_level=logging.ERROR, runtime_env=runtime_env())
    else:
        ray.init(address=address, log_to_driver=log_to_driver, logging_level=logging.ERROR, runtime_env=runtime_env())
    _connected_address = address
    quiet_driver()


def quiet_driver() -> None:
    """Ray's INFO and warnings off the driver's terminal (see the module docstring); errors still show."""
    from ray._private.log import PlainRayHandler
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.enable_operator_progress_bars = False
    # a handler's level, not the logger's: every ray.init() (Ray Data LLM calls it again) resets the
    # "ray" logger's level to INFO
    for name in ("ray", "ray.data"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, PlainRayHandler):
                handler.setLevel(logging.ERROR)
    # Ray's LLM modules give each of their loggers a stderr handler of its own, unless "ray.llm" has one:
    # with this one they pass their records up to the "ray" logger's handler instead
    llm = logging.getLogger("ray.llm")
    if not llm.handlers:
        llm.addHandler(logging.NullHandler())
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if name.startswith("ray.llm.") and isinstance(logger, logging.Logger):
            for handler in [h for h in logger.handlers if type(h) is logging.StreamHandler]:
                logger.removeHandler(handler)
            logger.propagate = True
