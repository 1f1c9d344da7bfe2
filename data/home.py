"""Where everything a run writes lives, set in one place for the CLI, flows, tests and benchmarks.

Prefect, vLLM, torch, Hugging Face and the temp directory all default to `~` or `/tmp`.
`configure()` points each of them under EVOFORGE_HOME *before* any of those libraries is imported,
because several read their environment at import. EVOFORGE_HOME defaults to the project folder of a
source checkout (an editable install); installed as a regular package, to the user's data folder
(`$XDG_DATA_HOME/evoforge`, else `~/.local/share/evoforge`): never site-packages, and never the working
folder, where anyone who could write a file (a `.prefect/server.json`, a replica's pid record) would
choose the API a command talks to or the process group it stops.
"""
from __future__ import annotations

import os
from pathlib import Path

# the root of the evoforge package: a source checkout, or site-packages/evoforge; the SQL, shipped
# configs and shipped data sets are found under it either way
PROJECT_ROOT = Path(__file__).resolve().parent.parent
SHIPPED_SETS = PROJECT_ROOT / "data" / "sets"  # the data sets evoforge ships (data/sets/README.md)
SOURCE_CHECKOUT = (PROJECT_ROOT / "pyproject.toml").exists()


def home() -> Path:
    if os.environ.get("EVOFORGE_HOME"):
        return Path(os.environ["EVOFORGE_HOME"]).resolve()
    return PROJECT_ROOT if SOURCE_CHECKOUT else installed_home()


def installed_home() -> Path:
    """An installed evoforge's home when EVOFORGE_HOME is not set: the user's own data folder."""
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return (Path(data) / "evoforge").resolve()


def runs_root() -> str:
    """Where the runs live: a folder, or an object-storage prefix such as s3://bucket/runs (EVOFORGE_RUNS)."""
    return os.environ.get("EVOFORGE_RUNS") or str(home() / "runs")


AUTH_FILE = "auth-string"  # in the Prefect home, mode 0600: the Prefect API's basic-auth string


def cache_dir() -> Path:
    return home() / ".cache"


def environment_defaults(root: Path) -> dict[str, str]:
    prefect = root / ".prefect"
    cache = root / ".cache"
    tmp = root / ".tmp"
    return {
        "PREFECT_HOME": str(prefect),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{prefect / 'prefect.db'}",
        "PREFECT_LOCAL_STORAGE_PATH": str(prefect / "storage"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
        # the temporary server migrates a fresh database in ~22 s on 2 cores; Prefect's default is 20 s
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
        "PREFECT_LOGGING_LEVEL": "INFO",
        # Prefect's logging with evoforge's terminal filter (what the terminal shows: tasks/progress.py)
        "PREFECT_LOGGING_SETTINGS_PATH": str(PROJECT_ROOT / "deploy" / "logging.yml"),
        "VLLM_CACHE_ROOT": str(cache / "vllm"),
        "VLLM_CONFIG_ROOT": str(cache / "vllm-config"),
        "VLLM_RPC_BASE_PATH": str(tmp),
        "VLLM_NO_USAGE_STATS": "1",
        # vLLM's records go through the root logger (deploy/logging.yml): the command's log file keeps
        # them, the terminal filter keeps them off the terminal; its own handler printed them to stdout
        "VLLM_CONFIGURE_LOGGING": "0",
        "TORCH_CPP_LOG_LEVEL": "ERROR",  # torch's C++ warnings (NUMA binding) bypass Python logging
        "DO_NOT_TRACK": "1",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        # one process: ready in 3-6 s instead of 32-48 s, and faster on 2 cores (NOTES)
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "TORCHINDUCTOR_CACHE_DIR": str(cache / "torchinductor"),
        "TRITON_CACHE_DIR": str(cache / "triton"),
        "HF_HOME": str(cache / "huggingface"),
        "HF_DATASETS_CACHE": str(cache / "huggingface" / "datasets"),
        # no hub is reachable here; offline mode also removes a 35 s stall in vLLM start-up
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "XDG_CACHE_HOME": str(cache),
        "MPLCONFIGDIR": str(cache / "matplotlib"),
        "TMPDIR": str(tmp),
    }


def configure() -> Path:
    """Point every library's writes under EVOFORGE_HOME. Idempotent; explicit user settings win."""
    root = home()
    defaults = environment_defaults(root)
    if "HF_HOME" in os.environ:  # the user's Hugging Face home: its datasets cache too, as `datasets` itself would
        defaults.pop("HF_DATASETS_CACHE")
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    for key in ("PREFECT_HOME", "TMPDIR", "VLLM_CACHE_ROOT", "HF_HOME", "MPLCONFIGDIR"):
        Path(os.environ[key]).mkdir(parents=True, exist_ok=True)
    # the Prefect API's auth string `evoforge ui` keeps in the Prefect home (app/prefect_server.py): every command,
    # worker and flow run of this home sends it (Prefect's client reads PREFECT_API_AUTH_STRING)
    if "PREFECT_API_AUTH_STRING" not in os.environ:
        try:
            os.environ["PREFECT_API_AUTH_STRING"] = (Path(os.environ["PREFECT_HOME"]) / AUTH_FILE).read_text().strip()
        except OSError:
            pass
    import tempfile

    tempfile.tempdir = None  # re-read TMPDIR if tempfile was imported before us
    return root
