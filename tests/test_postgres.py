"""`evoforge ui --database postgres`: the Prefect server on the project's own PostgreSQL (app/postgres.py).

The server tests run the real command in a fresh EVOFORGE_HOME (and so a fresh PREFECT_HOME and
PostgreSQL data folder) on free ports, and clean up whatever they started even when they fail.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from waiting import wait_until as _wait

from evoforge.data import home
from evoforge.app.postgres import DATABASE, SUPERUSER, PostgresServer, _binary, database_choice, hide_password

EVOFORGE = Path(sys.executable).parent / "evoforge"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False




def _environment(root: Path, **extra: str) -> dict[str, str]:
    """The environment of an evoforge whose home is `root`: none of this session's home settings."""
    env = {k: v for k, v in os.environ.items()
           if k not in home.environment_defaults(home.home()) and k not in ("PREFECT_API_URL", "EVOFORGE_PREFECT_DATABASE")}
    env.update(home.environment_defaults(root))
    env.update(EVOFORGE_HOME=str(root), **extra)
    return env


def _postmasters(data: Path) -> list[int]:
    """Live processes (zombies excluded) whose command line names this data folder."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in ("Z", "X") and str(data).encode() in argv:
            found.append(int(entry.name))
    return found


def _psql(server: PostgresServer, sql: str) -> list[str]:
    done = subprocess.run([_binary("psql"), "-X", "-h", "127.0.0.1", "-p", str(server.port), "-U", SUPERUSER,
                           "-d", DATABASE, "-tA", "-F", "|", "-c", sql],
                          env={**os.environ, "PGPASSWORD": server.password()}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


class _Ui:
    """`evoforge ui ...` in a child process, its output collected as it comes."""

    def __init__(self, args: list[str], env: dict[str, str]):
        self.process = subprocess.Popen([str(EVOFORGE), "ui", *args], cwd=home.PROJECT_ROOT, env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        start_new_session=True)
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(self.process.stdout), daemon=True).start()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_up(self, timeout: float = 180) -> None:
        _wait("the UI's banner", lambda: "Prefect UI:" in self.output or self.process.poll() is not None, timeout)
        assert self.process.poll() is None, self.output

    def terminate(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=90)

    def clean_up(self, root: Path) -> None:
        """Whatever is left of this ui, its Prefect server and its PostgreSQL (a failed test)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        try:
            os.killpg(json.loads((root / ".prefect" / "server.json").read_text())["pid"], signal.SIGKILL)
        except (OSError, ValueError, KeyError):
            pass
        PostgresServer(root).shutdown()


@pytest.mark.unit
def test_database_choices_and_passwords_never_shown():
    assert database_choice("sqlite") == "sqlite" and database_choice("PostgreSQL") == "postgres"
    assert database_choice("postgres://u:p@db:5432/prefect") == "postgresql+asyncpg://u:p@db:5432/prefect"
    assert hide_password("postgresql+asyncpg://u:s%40cret@db:5432/prefect") == "postgresql+asyncpg://u:***@db:5432/prefect"
    assert hide_password("sqlite+aiosqlite:///x/prefect.db") == "sqlite+aiosqlite:///x/prefect.db"
    with pytest.raises(ValueError, match=r"sqlite, postgres, or a postgresql\+asyncpg://") as err:
        database_choice("mysql://u:secret@db/prefect")
    assert "secret" not in str(err.value)


@pytest.mark.slow
def test_ui_says_in_one_line_when_the_database_is_wrong_or_does_not_answer(scratch):
    env = _environment(scratch, EVOFORGE_PREFECT_DATABASE="nonsense")
    done = subprocess.run([str(EVOFORGE), "ui", "--port", str(_free_port())], cwd=home.PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "error: --database (or EVOFORGE_PREFECT_DATABASE): sqlite, postgres, or a "
        "postgresql+asyncpg://USER:PASSWORD@HOST:PORT/DATABASE URL, not 'nonsense'"], done.stderr
    url = f"postgresql+asyncpg://someone:hunter2@127.0.0.1:{_free_port()}/prefect"
    done = subprocess.run([str(EVOFORGE), "ui", "--port", str(_free_port()), "--database", url], cwd=home.PROJECT_ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    # a password in argv is readable in `ps` by every user: refused before anything starts
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "a password on the command line" in done.stderr and "hunter2" not in done.stderr
    done = subprocess.run([str(EVOFORGE), "ui", "--port", str(_free_port())], cwd=home.PROJECT_ROOT,
                          env={**env, "EVOFORGE_PREFECT_DATABASE": url}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "does not answer" in done.stderr and "someone:***@" in done.stderr and "hunter2" not in done.stderr


@pytest.mark.server
def test_ui_on_postgres_keeps_flow_runs_in_postgres_and_stops_both_servers(scratch):
    """`evoforge ui --database postgres` in a fresh home: initdb, PostgreSQL and the Prefect server (which
    migrates the database) start; a flow run lands in PostgreSQL's flow_run table; SIGTERM stops the
    Prefect server and the PostgreSQL it started, and frees both ports."""
    ui_port, pg_port = _free_port(), _free_port()
    server = PostgresServer(scratch, pg_port)
    ui = _Ui(["--database", "postgres", "--port", str(ui_port), "--postgres-port", str(pg_port)], _environment(scratch))
    try:
        ui.wait_up()
        banner = ui.output
        assert f"PostgreSQL on 127.0.0.1:{pg_port} started by evoforge" in banner
        assert f"database: PostgreSQL postgresql+asyncpg://evoforge:***@127.0.0.1:{pg_port}/prefect" in banner
        assert server.password() not in banner
        assert server.data == scratch / ".postgres" / "data" and server.running()
        assert (scratch / "logs" / "postgres" / "postgres.log").is_file()
        postmaster = _postmasters(server.data)
        assert len(postmaster) == 1

        # a second evoforge on the same project uses that server (its port) and holds it too: the first to
        # leave does not stop it under the other
        other = PostgresServer(scratch, _free_port())
        assert other.start() is True and not other.started and other.port == pg_port
        assert other.stop() is False and server.running()

        # a tiny flow against the API: its run is a row of PostgreSQL's flow_run table, not of a SQLite file
        script = ("from prefect import flow\nfrom prefect.runtime import flow_run\n"
                  "@flow(name='pg-probe')\ndef probe(x: int) -> int:\n    print('RUN', flow_run.id)\n    return x + 1\n"
                  "assert probe(41) == 42\n")
        done = subprocess.run([sys.executable, "-c", script], cwd=scratch, capture_output=True, text=True, timeout=300,
                              env=_environment(scratch, PREFECT_API_URL=f"http://127.0.0.1:{ui_port}/api"))
        assert done.returncode == 0, done.stderr[-3000:]
        run_id = next(line.split()[1] for line in done.stdout.splitlines() if line.startswith("RUN "))
        rows = _psql(server, f"SELECT f.name, r.state_type FROM flow_run r JOIN flow f ON f.id = r.flow_id "
                             f"WHERE r.id = '{run_id}'")
        assert rows == ["pg-probe|COMPLETED"]
        assert not (scratch / ".prefect" / "prefect.db").exists()

        assert ui.terminate() == 0, ui.output
        assert f"stopped PostgreSQL on 127.0.0.1:{pg_port}" in ui.output
        _wait("both ports to be free", lambda: not _answers(ui_port) and not _answers(pg_port), 30)
        assert _postmasters(server.data) == [] and not server.running()
        assert not (server.data / "postmaster.pid").exists() and not server.record.exists()
    finally:
        ui.clean_up(scratch)


@pytest.mark.server
def test_ui_on_an_existing_postgres_url_leaves_that_server_running(scratch):
    """EVOFORGE_PREFECT_DATABASE=<URL>: the Prefect server uses (and migrates) that database; evoforge did
    not start it, so stopping the UI leaves it running."""
    ui_port = _free_port()
    server = PostgresServer(scratch / "elsewhere", _free_port())
    ui = None
    try:
        server.start()
        ui = _Ui(["--port", str(ui_port)], _environment(scratch / "project", EVOFORGE_PREFECT_DATABASE=server.url()))
        ui.wait_up()
        assert f"database: PostgreSQL {server.url(hide=True)} (external: left running)" in ui.output
        assert server.password() not in ui.output
        assert "flow_run" in _psql(server, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")  # migrated
        assert ui.terminate() == 0, ui.output
        _wait("the Prefect server to stop", lambda: not _answers(ui_port), 30)
        assert server.running() and _psql(server, "SELECT 1") == ["1"]
        assert not (scratch / "project" / ".postgres").exists()
    finally:
        if ui is not None:
            ui.clean_up(scratch / "project")
        server.shutdown()
        assert not server.running()
