"""Operating evoforge from Prefect: the local server, the deployments, and serving their schedules.

- `evoforge ui` starts the Prefect server (API and UI) with its database inside the project.
- `evoforge serve --config FILE [--cron EXPR]` registers a deployment of the round flow (its form is
  the round config, prefilled from FILE; a cron schedule if given) and one per stage flow (for
  reruns from the UI: run, round, force), then executes their flow runs from this process. It starts
  the server too when none answers. The work-pool path for a shared server is deploy/prefect.yaml.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 4200


def api_url(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> str:
    return f"http://{host}:{port}/api"


def server_healthy(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


def _prefect_home() -> Path:
    from evoforge.data import home

    return Path(os.environ.get("PREFECT_HOME", home.home() / ".prefect"))


def auth_file() -> Path:
    from evoforge.data.home import AUTH_FILE

    return _prefect_home() / AUTH_FILE


def server_auth_string(host: str) -> str | None:
    """The basic-auth string the Prefect server on `host` requires: PREFECT_SERVER_API_AUTH_STRING, else the Prefect
    home's `auth-string` file, else, for any host but loopback, a new one kept there (data/credentials.py)."""
    from evoforge.data.credentials import server_secret

    # user:password, as the UI's login asks for it
    return server_secret(host, "PREFECT_SERVER_API_AUTH_STRING", auth_file(), "the Prefect server", prefix="evoforge:")


def project_server_url() -> str | None:
    """The API of the server `evoforge ui` (or `serve`) started for this project's Prefect home, if it
    answers. A server some other project or user left on the port is never taken for it."""
    try:
        url = json.loads((_prefect_home() / "server.json").read_text())["url"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return url if server_healthy(url, timeout=0.5) else None


def start_server(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, log_path: Path | None = None,
                 wait_seconds: float = 120.0, database_url: str | None = None,
                 auth_string: str | None = None) -> subprocess.Popen:
    """`prefect server start` in a child process; returns once /api/health answers. It is recorded in
    the project's Prefect home (server.json), so this project's commands find it and no other server.
    `database_url` (e.g. the project's PostgreSQL, app/postgres.py) replaces the environment's
    database (SQLite in the Prefect home); the server migrates it as it starts. `auth_string`: every API
    request (HTTP and websocket) must carry it (Prefect's basic auth); passed by environment, never argv."""
    from evoforge.data import atomic

    url = api_url(host, port)
    if server_healthy(url, timeout=0.5):
        raise RuntimeError(f"another Prefect server already answers on {url}; choose another port (--port)")
    log_path = log_path or _prefect_home() / "server.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PREFECT_UI_API_URL": api_url(host, port)}
    env.pop("PREFECT_API_URL", None)  # the server itself must not look for another API
    if database_url is not None:  # both names: Prefect takes PREFECT_SERVER_... first when both are set
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = database_url
    env.pop("PREFECT_SERVER_API_AUTH_STRING", None)
    if auth_string:  # the server's own services call its API too: they send the client string
        env["PREFECT_SERVER_API_AUTH_STRING"] = env["PREFECT_API_AUTH_STRING"] = auth_string
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
    deadline = time.monotonic() + wait_seconds
    try:
        while time.monotonic() < deadline:
            if server_healthy(url):
                atomic.write_text(_prefect_home() / "server.json", json.dumps({"url": url, "pid": process.pid}))
                return process
            if process.poll() is not None:
                raise RuntimeError(f"the Prefect server exited with status {process.returncode}; see {log_path}")
            time.sleep(0.5)
        raise RuntimeError(f"the Prefect server did not answer on {api_url(host, port)} within {wait_seconds:.0f} s; see {log_path}")
    except BaseException:  # not up in time, or interrupted while starting: do not leave it behind
        stop_server(process)
        raise


def stop_server(process: subprocess.Popen) -> None:
    """Stop a child started in its own session (the server, a `serve`): SIGTERM, then SIGKILL after 20 s."""
    import signal

    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    marker = _prefect_home() / "server.json"
    try:
        if json.loads(marker.read_text()).get("pid") == process.pid:  # the record of this server, not another's
            marker.unlink()
    except (OSError, ValueError, AttributeError):
        pass


def deployments(run: str, config_file: str | Path, cron: str | None = None) -> list:
    """The round deployment (named after the run; config form prefilled from `config_file`; `cron`
    schedule) and one deployment per stage flow for reruns, all executed by the serving process.
    A config with `cluster.pools` makes the served round start those stages in their work pools
    instead, as deployments `stage/<pool>` of deploy/prefect.yaml (deploy/cluster/setup.sh) that the
    pools' workers run; this process then only orchestrates them and runs the other stages."""
    from evoforge.flows.config import load_config, resolve_path
    from evoforge.flows.round import STAGE_FLOWS, round_flow
    from evoforge.flows.stages import STAGES

    config = load_config(resolve_path(config_file))
    tags = ["evoforge", f"run:{run}"]
    schedule = {"cron": cron} if cron else {}
    out = [round_flow.to_deployment(
        name=run, tags=tags, parameters={"run": run, "config": config.model_dump(mode="json")},
        description=f"Self-evolution round of run {run!r} (config from {config_file}); with no round, the "
                    f"run's next unfinished round, so each scheduled flow run continues the evolution."
                    + (f" Stages in work pools (deployments stage/<pool>): "
                       f"{', '.join(f'{n} -> {p}' for n, p in config.cluster.pools.items())}." if config.cluster.pools else ""),
        **schedule,
    )]
    for name, stage in STAGES.items():
        if not stage.in_round:
            continue  # ingest runs in round 0 from the config's sources
        out.append(STAGE_FLOWS[name].to_deployment(
            name=run, tags=tags, parameters={"run": run, "round": 0, "force": False},
            description=f"Rerun {name} of one round of run {run!r} with the run's saved config "
                        f"(force: recompute even when nothing changed).",
        ))
    return out


def serve(run: str, config_file: str | Path, cron: str | None = None, limit: int = 1) -> None:
    """Serve the deployments until interrupted; starts a local server first when none answers."""
    from evoforge.data import home

    url = os.environ.get("PREFECT_API_URL") or project_server_url()
    server = None
    if url is None:
        url = api_url()
        print(f"starting the Prefect server on {url} (log: {_prefect_home() / 'server.log'})", flush=True)
        server = start_server(auth_string=server_auth_string(DEFAULT_HOST))
    elif not server_healthy(url):
        raise RuntimeError(f"PREFECT_API_URL={url} does not answer; start that server or unset the variable")
    os.environ["PREFECT_API_URL"] = url  # for the flow-run processes the runner starts
    os.chdir(home.PROJECT_ROOT)  # they import the flows from the project
    try:
        from prefect import serve as prefect_serve
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: url}):  # Prefect read its settings at import
            print(f"serving run {run!r} from {config_file}" + (f" on cron {cron!r}" if cron else "")
                  + f"; UI: {url.removesuffix('/api')}", flush=True)
            prefect_serve(*deployments(run, config_file, cron), limit=limit)
    finally:
        if server is not None:
            stop_server(server)
