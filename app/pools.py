"""The machines of a cluster: the work pools and deployments on the shared Prefect server, and one
machine's worker of a pool (`evoforge pools setup`, `evoforge worker POOL`; deploy/cluster/*.sh call
them). What a round does with the pools, starting and watching its stages there, is flows/dispatch.py.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys

from evoforge.data import home
from evoforge.flows.dispatch import POOLS


def create_pools(pools=POOLS) -> list[str]:
    """The process work pools (existing ones are left as they are); returns those it created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.workers.process import ProcessWorker

    created = []
    with get_client(sync_client=True) as client:
        for pool in pools:
            try:
                client.create_work_pool(WorkPoolCreate(name=pool, type="process",
                                                       base_job_template=ProcessWorker.get_default_base_job_template()))
                created.append(pool)
            except ObjectAlreadyExists:
                pass
    return created


def setup(deploy_args: list[str]) -> int:
    """deploy/cluster/setup.sh: the work pools, then `prefect deploy` of deploy/prefect.yaml (all its
    deployments, or the `--name flow/deployment` options given)."""
    if not os.environ.get("PREFECT_API_URL"):
        print("error: set PREFECT_API_URL to the shared Prefect server (http://SERVER:4200/api)", file=sys.stderr)
        return 2
    os.environ.setdefault("EVOFORGE_PROJECT_ROOT", str(home.PROJECT_ROOT))
    created = create_pools()
    print(f"work pools {', '.join(POOLS)}" + (f" (created {', '.join(created)})" if created else " (existing)"), flush=True)
    command = [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--prefect-file",
               str(home.PROJECT_ROOT / "deploy" / "prefect.yaml"), *(deploy_args or ["--all"])]
    return subprocess.run(command, cwd=home.PROJECT_ROOT).returncode


def worker_command(pool: str, name: str | None, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process",
            "--name", name or f"{pool}-{socket.gethostname()}", *extra]


def worker(pool: str, name: str | None, extra: list[str]) -> int:
    """deploy/cluster/worker.sh: this machine's worker of `pool`, with evoforge's home settings
    (EVOFORGE_HOME: caches, Prefect home, temp) in its environment and its flow runs'."""
    missing = [k for k in ("PREFECT_API_URL", "EVOFORGE_RUNS") if not os.environ.get(k)]
    if missing:
        print(f"error: set {' and '.join(missing)} (the shared Prefect server's API; the lake every machine "
              f"reads, s3://bucket/prefix)", file=sys.stderr)
        return 2
    if not os.environ["EVOFORGE_RUNS"].startswith("s3://"):
        print(f"warning: EVOFORGE_RUNS={os.environ['EVOFORGE_RUNS']} is not on object storage: every machine "
              f"must see the same folder", file=sys.stderr, flush=True)
    os.environ.setdefault("EVOFORGE_PROJECT_ROOT", str(home.PROJECT_ROOT))  # the deployments' pull step
    command = worker_command(pool, name, extra)
    os.execv(command[0], command)  # the worker is this process: a signal to it reaches the worker
