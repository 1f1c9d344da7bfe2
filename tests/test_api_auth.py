"""The Prefect API others can reach asks for its auth string (app/prefect_server.py `server_auth_string`): `evoforge ui`
on any host but loopback makes one (mode 0600) or takes the user's, refuses to serve without one, and every
HTTP and websocket endpoint refuses a request without it; evoforge's own clients send it, and the UI asks for it
once and then works. (The split cluster round in tests/test_cluster.py runs with it on.)"""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from browser import Browser, chromium
from evoforge.data import home
from evoforge.data.local_s3 import free_port
from exposure import on_command_lines, post_status
from waiting import wait_until

WEBSOCKETS = ("/events/in", "/events/out", "/logs/out", "/task_runs/subscriptions/scheduled")


def _environment(root: Path, **extra: str) -> dict[str, str]:
    """An evoforge whose home is `root`: none of this session's home, Prefect or auth settings."""
    drop = set(home.environment_defaults(home.home())) | {
        "PREFECT_API_URL", "PREFECT_API_AUTH_STRING", "PREFECT_SERVER_API_AUTH_STRING", "EVOFORGE_PREFECT_DATABASE"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(home.environment_defaults(root), EVOFORGE_HOME=str(root), **extra)
    return env


def _websocket(url: str, token: str | None) -> str:
    """How a websocket endpoint answers: refused at the handshake, closed after the auth message, or accepted."""
    from websockets.exceptions import ConnectionClosed, InvalidStatus
    from websockets.sync.client import connect

    try:
        with connect(url, subprotocols=["prefect"] if token is not None else None, open_timeout=20) as ws:
            ws.send(json.dumps({"type": "auth", "token": token}))
            return json.loads(ws.recv(timeout=20)).get("type", "?")
    except InvalidStatus as err:
        return f"refused {err.response.status_code}"
    except ConnectionClosed as err:
        return f"closed {err.rcvd.code if err.rcvd else '?'}"


@pytest.mark.unit
def test_ui_refuses_to_serve_other_machines_without_an_auth_string(scratch):
    env = _environment(scratch, PREFECT_SERVER_API_AUTH_STRING="")
    done = subprocess.run([sys.executable, "-m", "evoforge", "ui", "--host", "0.0.0.0", "--port", str(free_port())],
                          cwd=home.PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "would answer anyone" in done.stderr and not (scratch / ".prefect" / "server.json").exists()


@pytest.mark.server
def test_a_server_others_can_reach_answers_only_with_its_auth_string(scratch):
    port = free_port()
    env = _environment(scratch)
    log = scratch / "ui.log"
    with open(log, "w") as out:
        ui = subprocess.Popen([sys.executable, "-m", "evoforge", "ui", "--host", "0.0.0.0", "--port", str(port)],
                              cwd=home.PROJECT_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until("the UI's banner", lambda: "Ctrl-C stops it" in log.read_text(), timeout=180,
                   explain=lambda: log.read_text()[-3000:])
        secret_file = scratch / ".prefect" / "auth-string"
        auth = secret_file.read_text().strip()
        assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600 and auth.startswith("evoforge:") and len(auth) > 40
        banner = log.read_text()
        assert f"API auth: on, the string in {secret_file} (mode 0600)" in banner and auth not in banner
        assert "PREFECT_API_AUTH_STRING" in banner  # how the other machines get it

        api = f"http://127.0.0.1:{port}/api"
        # HTTP: the call that creates a deployment (whose pull step would run a script on every worker) included
        for path in ("/flows/filter", "/deployments/", "/flow_runs/filter"):
            assert post_status(api + path, None) == 401 and post_status(api + path, "evoforge:wrong") == 401
        assert post_status(api + "/flows/filter", auth) == 200
        with urllib.request.urlopen(api + "/health", timeout=10) as answer:
            assert answer.status == 200  # the probe a load balancer uses stays open
        for path in WEBSOCKETS:
            ws = f"ws://127.0.0.1:{port}/api{path}"
            assert _websocket(ws, None) == "refused 403"
            assert _websocket(ws, "wrong") == "closed 1008"
            assert _websocket(ws, auth) == "auth_success"

        # an evoforge process of this home sends it (configure reads the file); one of another home is refused
        client = ("from evoforge.data import home; home.configure()\n"
                  "import asyncio\n"
                  "from prefect.client.orchestration import get_client\n"
                  "async def main():\n"
                  "    async with get_client() as c:\n"
                  "        print(len(await c.read_flows()))\n"
                  "asyncio.run(main())")
        own = subprocess.run([sys.executable, "-c", client], cwd=home.PROJECT_ROOT, capture_output=True, text=True,
                             timeout=120, env={**env, "PREFECT_API_URL": api})
        assert own.returncode == 0 and own.stdout.strip() == "0", own.stderr[-2000:]
        stranger = subprocess.run([sys.executable, "-c", client], cwd=home.PROJECT_ROOT, capture_output=True, text=True,
                                  timeout=120, env={**_environment(scratch / "elsewhere"), "PREFECT_API_URL": api})
        assert stranger.returncode != 0 and "401" in stranger.stderr

        if chromium() is not None:  # the UI asks for the string, then works
            with Browser(scratch / "chromium") as page:
                page.open(f"http://127.0.0.1:{port}/deployments")
                page.wait_for_text(lambda text: "Login" in text)
                page.type_into("input[type=password]", auth)
                page.click_button("Login")
                wait_until("the UI to keep the string", lambda: page.evaluate(
                    "localStorage.getItem('prefect-password') !== null"), timeout=30)
                page.open(f"http://127.0.0.1:{port}/deployments")
                shown = page.wait_for_text(lambda text: "Create a deployment" in text or "Work Pools" in text)
                assert "Login" not in shown and "Authentication failed" not in shown

        # the string is on no command line of this machine (only in the file and in environments)
        assert on_command_lines({"the auth string": auth}) == []
    finally:
        if ui.poll() is None:
            os.killpg(ui.pid, 15)
        ui.wait(timeout=60)
