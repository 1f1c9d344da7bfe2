"""The Prefect server's database on PostgreSQL: `evoforge ui --database postgres`.

SQLite (the default) needs no setup but serves one user on one machine. PostgreSQL is what Prefect
recommends beyond that (a team whose rounds, workers and UI share one API; several API servers on
one database). evoforge manages its own PostgreSQL 15 (Debian's `postgresql` package) for a project:

- the cluster lives in `<EVOFORGE_HOME>/.postgres/data` (initdb once), its unix socket in
  `<EVOFORGE_HOME>/.postgres/run`, its log in `<EVOFORGE_HOME>/logs/postgres/postgres.log`; nothing
  in ~, /tmp or /var/run, and it is started with `pg_ctl` (never a system service);
- it listens on 127.0.0.1 only (port 5433 by default, not the 5432 of a system PostgreSQL);
- authentication is scram-sha-256 for every connection, with a password evoforge generates once
  and keeps in `<EVOFORGE_HOME>/.postgres/password` (mode 0600, in a 0700 folder). Not `trust`:
  on 127.0.0.1 trust would make every local user and process (another project's code, another
  account on a shared machine) a superuser of the project's database; a generated password costs
  the user nothing, since evoforge builds the URL with it;
- the superuser is `evoforge`; the database `prefect` is created once; Prefect migrates it itself
  when its server starts (PREFECT_API_DATABASE_MIGRATE_ON_START, on by default).

PostgreSQL refuses to run as root (`"root" execution of the PostgreSQL server is not permitted.`,
`pg_ctl: cannot be run as root`). Run as root (as in a container), evoforge runs initdb and pg_ctl as
the unprivileged owner of an existing data folder, else as the `postgres` account that Debian's
package creates, and gives that account the project's `.postgres` folder and log folder; without
such an account it stops with one line saying what to do.

The server evoforge starts is recorded in `.postgres/server.json` with the evoforge processes that
use it (its holders): a second `evoforge ui` of the same project reuses it and becomes a holder, and
the last holder to exit stops it. A server whose holders all died (a killed `evoforge ui`) is adopted
by the next one; a server started by hand on the same data folder is used and never stopped.
"""
from __future__ import annotations

import fcntl
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

DEFAULT_PORT = 5433
HOST = "127.0.0.1"
SUPERUSER = "evoforge"
DATABASE = "prefect"
SERVICE_ACCOUNT = "postgres"  # the account Debian's postgresql package creates
VERSION_BIN = Path("/usr/lib/postgresql/15/bin")
SOCKET_PATH_MAX = 107  # sun_path; PostgreSQL: "Unix-domain socket path ... is too long"
CHOICES = "sqlite, postgres, or a postgresql+asyncpg://USER:PASSWORD@HOST:PORT/DATABASE URL"


class PostgresError(ValueError):
    """What the user can fix, said in one line (a ValueError: the CLI prints it as `error: ...`)."""


def hide_password(url: str) -> str:
    """`url` with its password replaced by *** (for banners and logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _binary(name: str) -> str:
    for folder in (VERSION_BIN, *sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)):
        if (folder / name).is_file():
            return str(folder / name)
    found = shutil.which(name)
    if found is None:
        raise PostgresError(f"PostgreSQL is not installed (no {name} in {VERSION_BIN} or on PATH): on Debian "
                            f"`apt-get install postgresql-15`, or use an existing server with --database postgresql+asyncpg://...")
    return found


def _process_start(pid: int) -> int | None:
    """The start time (clock ticks since boot) of a live process, None if it is gone or a zombie: a pid
    plus its start time names one process even after the pid is reused."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else int(fields[19])


def _port_answers(port: int, host: str = HOST) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class PostgresServer:
    """The project's PostgreSQL: `start()` (or reuse), `url()`, `stop()`."""

    def __init__(self, home: Path | str | None = None, port: int = DEFAULT_PORT):
        from evoforge.data import home as project

        self.home = Path(home).resolve() if home is not None else project.home()
        self.port = port
        self.folder = self.home / ".postgres"
        self.data = self.folder / "data"
        self.socket_dir = self.folder / "run"
        self.password_file = self.folder / "password"
        self.record = self.folder / "server.json"
        self.log_path = self.home / "logs" / "postgres" / "postgres.log"
        self.holder = False  # this process holds the server (started or adopted it): stop() may stop it
        self.started = False  # this process ran pg_ctl start
        self.adopted = False  # this process took over a server whose evoforge processes are all gone
        self.left_for: list[int] = []  # after stop(): the evoforge processes it was left running for
        self.timings: dict[str, float] = {}  # seconds: initdb, start, createdb (what this process did)

    # -- who runs it ---------------------------------------------------------------------------------
    def account(self) -> pwd.struct_passwd | None:
        """The account PostgreSQL runs as when evoforge runs as root (None: as this process's user)."""
        try:
            owner = self.data.stat().st_uid
        except OSError:
            owner = None
        if os.geteuid() != 0:
            if owner is not None and owner != os.geteuid():
                raise PostgresError(f"the project's PostgreSQL ({self.data}) belongs to user {_user_name(owner)!r}: "
                                    f"run evoforge as that user (or as root)")
            return None
        if owner not in (None, 0):
            return pwd.getpwuid(owner)
        try:
            return pwd.getpwnam(SERVICE_ACCOUNT)
        except KeyError:
            raise PostgresError(
                f"PostgreSQL refuses to run as root and this machine has no {SERVICE_ACCOUNT!r} account to run it as: "
                f"run evoforge as a non-root user, create the account (`useradd --system {SERVICE_ACCOUNT}`), or use an "
                f"existing server (--database postgresql+asyncpg://...)") from None

    def _as_account(self, command: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
        """Run a PostgreSQL program as the account of `account()`, in a process group of its own: if
        evoforge is interrupted meanwhile, the whole group goes (initdb's bootstrap backend included)."""
        account = self.account()
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "HOME": str(self.folder),
               "TMPDIR": os.environ.get("TMPDIR", str(self.home / ".tmp"))}
        kwargs = {}
        if account is not None:
            kwargs = dict(user=account.pw_uid, group=account.pw_gid,
                          extra_groups=os.getgrouplist(account.pw_name, account.pw_gid))
        process = subprocess.Popen(command, env=env, cwd=self.folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, start_new_session=True, **kwargs)
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except BaseException as err:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except OSError:
                pass
            process.communicate()
            if isinstance(err, subprocess.TimeoutExpired):
                raise PostgresError(f"{Path(command[0]).name} did not finish within {timeout:.0f} s "
                                    f"(log: {self.log_path})") from None
            raise
        return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)

    def _own(self, path: Path) -> None:
        account = self.account()
        if account is not None:
            os.chown(path, account.pw_uid, account.pw_gid)

    def _give(self, path: Path, mode: int) -> None:
        """Create `path` (a folder) for the account PostgreSQL runs as."""
        path.mkdir(parents=True, exist_ok=True)
        self._own(path)
        os.chmod(path, mode)

    def _prepare_folders(self) -> None:
        self._give(self.folder, 0o700)
        self._give(self.socket_dir, 0o700)
        self._give(self.log_path.parent, 0o700)
        account = self.account()
        if account is not None:  # the account must reach the project through the folders above it
            probe = self._as_account(["test", "-w", str(self.folder)])
            if probe.returncode != 0:
                raise PostgresError(
                    f"PostgreSQL runs as {account.pw_name!r} here (it refuses root), and that account cannot reach "
                    f"{self.folder}: let it through the folders above (chmod o+x), or run evoforge as a non-root user")

    # -- state ---------------------------------------------------------------------------------------
    def _postmaster(self) -> tuple[int, int] | None:
        """(pid, port) of the postmaster running on this data folder, from its postmaster.pid."""
        try:
            lines = (self.data / "postmaster.pid").read_text().splitlines()
            pid, port = int(lines[0]), int(lines[3])
        except (OSError, ValueError, IndexError):
            return None
        if _process_start(pid) is None:
            return None
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return None
        if not argv or not argv[0].endswith(b"postgres"):
            return None  # a stale file whose pid now belongs to another program
        return pid, port

    def running(self) -> bool:
        return self._postmaster() is not None

    def _read_record(self) -> dict:
        try:
            record = json.loads(self.record.read_text())
            return record if isinstance(record, dict) else {}
        except (OSError, ValueError):
            return {}

    def _write_record(self, record: dict) -> None:
        from evoforge.data import atomic

        atomic.write_text(self.record, json.dumps(record))

    @staticmethod
    def _me() -> dict:
        return {"pid": os.getpid(), "start": _process_start(os.getpid())}

    @staticmethod
    def _live_holders(record: dict) -> list[dict]:
        return [h for h in record.get("holders", []) if isinstance(h, dict) and h.get("pid") is not None
                and _process_start(h["pid"]) == h.get("start")]

    @contextmanager
    def _lock(self):
        """One evoforge at a time starts, adopts or stops this project's server (flock: freed on death)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def password(self) -> str:
        return self.password_file.read_text().strip()

    def _ensure_password(self) -> None:
        from evoforge.data import atomic

        if self.password_file.exists():
            return
        with atomic.atomic_path(self.password_file) as tmp:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_urlsafe(24) + "\n")
            self._own(tmp)  # initdb reads it as that account

    # -- life ----------------------------------------------------------------------------------------
    def url(self, hide: bool = False) -> str:
        password = "***" if hide else quote(self.password(), safe="")
        return f"postgresql+asyncpg://{SUPERUSER}:{password}@{HOST}:{self.port}/{DATABASE}"

    def start(self) -> bool:
        """Start the project's server, or use the one running on its data folder (on that server's port).
        True when this process now holds it (it started it, or adopted one whose evoforge is gone), so
        `stop()` will stop it once no other holder remains."""
        with self._lock():
            running = self._postmaster()
            if running is not None:
                self.port = running[1]
                record = self._read_record()
                if record.get("pid") == running[0]:  # evoforge started it: join its holders (or adopt it)
                    me = self._me()
                    others = [h for h in self._live_holders(record) if h != me]
                    self.adopted = not others
                    record["holders"] = others + [me]
                    self._write_record(record)
                    self.holder = True
                self._ensure_database()
                return self.holder
            self._prepare_folders()
            self._ensure_password()
            if not (self.data / "PG_VERSION").exists():
                self._initdb()
            self._configure()
            try:
                self._pg_ctl_start()
                self._ensure_database()
            except BaseException as err:  # failed or interrupted while starting: do not leave it behind
                if not isinstance(err, PostgresError):  # interrupted: the postmaster may not have written its pid yet
                    _wait_for(lambda: self._postmaster() is not None, 5)
                self._pg_ctl_stop()
                raise
            self.holder = True
            self._write_record({"pid": self._postmaster()[0], "port": self.port, "holders": [self._me()]})
            return True

    def _initdb(self) -> None:
        from evoforge.data import atomic

        if self.data.exists():  # a data folder without PG_VERSION was never initialised
            shutil.rmtree(self.data)
        atomic.remove_leftovers(self.folder)  # an initdb whose evoforge was killed (we hold the lock)
        began = time.monotonic()
        with atomic.atomic_path(self.data) as tmp:  # whole or not at all: an interrupted initdb leaves nothing
            done = self._as_account([
                _binary("initdb"), "-D", str(tmp), f"--username={SUPERUSER}", f"--pwfile={self.password_file}",
                "--auth=scram-sha-256", "--encoding=UTF8", "--locale=C.UTF-8", "--no-instructions", "--no-sync",
            ], timeout=300)
            if done.returncode != 0:
                raise PostgresError(f"initdb failed: {_last_line(done)} (in {self.folder})")
        self.timings["initdb"] = time.monotonic() - began

    def _configure(self) -> None:
        """Settings of every start, in data/evoforge.conf (included by postgresql.conf), so a start by
        hand (`pg_ctl start -D ...`) gets the same address, port and socket folder."""
        from evoforge.data import atomic

        socket_dir = str(self.socket_dir)
        if len(f"{socket_dir}/.s.PGSQL.{self.port}") > SOCKET_PATH_MAX:
            socket_dir = ""  # too deep a home for a unix socket: TCP only (evoforge connects over TCP)
        settings = {"listen_addresses": HOST, "port": self.port, "unix_socket_directories": socket_dir,
                    "password_encryption": "scram-sha-256"}
        text = "# written by evoforge (app/postgres.py) before each start\n" + "".join(
            f"{key} = {value}\n" if isinstance(value, int) else f"{key} = '{value.replace(chr(39), chr(39) * 2)}'\n"
            for key, value in settings.items())
        conf = self.data / "evoforge.conf"
        atomic.write_text(conf, text)
        self._own(conf)
        main = self.data / "postgresql.conf"
        include = "include_if_exists = 'evoforge.conf'"
        if include not in main.read_text():
            atomic.write_text(main, main.read_text() + f"\n{include}  # evoforge's settings\n")
            self._own(main)

    def _pg_ctl_start(self) -> None:
        if _port_answers(self.port):
            raise PostgresError(f"port {self.port} on {HOST} is taken by another program: choose another with "
                                f"--postgres-port, or stop that program")
        stale = self.data / "postmaster.pid"
        if stale.exists():  # its postmaster is gone (a crash, or a zombie nobody reaped): it would block the start
            stale.unlink()
        began = time.monotonic()
        done = self._as_account([_binary("pg_ctl"), "start", "-D", str(self.data), "-l", str(self.log_path),
                                 "-w", "-t", "60"], timeout=120)
        if done.returncode != 0:
            raise PostgresError(f"PostgreSQL did not start: {_last_error(self.log_path) or _last_line(done)} "
                                f"(log: {self.log_path})")
        self.started = True
        self.timings["start"] = time.monotonic() - began

    def _psql(self, sql: str, database: str = "postgres") -> subprocess.CompletedProcess:
        env = {**os.environ, "PGPASSWORD": self.password(), "PGCONNECT_TIMEOUT": "10"}
        return subprocess.run([_binary("psql"), "-X", "-v", "ON_ERROR_STOP=1", "-h", HOST, "-p", str(self.port),
                               "-U", SUPERUSER, "-d", database, "-tAc", sql],
                              env=env, capture_output=True, text=True, timeout=60)

    def _ensure_database(self) -> None:
        began = time.monotonic()
        found = self._psql(f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'")
        if found.returncode != 0:
            raise PostgresError(f"the project's PostgreSQL on port {self.port} does not take evoforge's password: "
                                f"{_last_line(found)} (password: {self.password_file})")
        if found.stdout.strip() != "1":
            created = self._psql(f"CREATE DATABASE {DATABASE}")
            if created.returncode != 0:
                raise PostgresError(f"could not create the database {DATABASE!r}: {_last_line(created)}")
            self.timings["createdb"] = time.monotonic() - began

    def stop(self) -> bool:
        """Leave the server if this process does not hold it, or other evoforge processes still do;
        otherwise stop it (fast shutdown). True when it was stopped."""
        if not self.holder:
            return False
        with self._lock():
            self.holder = False
            running = self._postmaster()
            record = self._read_record()
            if running is None or record.get("pid") != running[0]:
                return False  # gone already, or no longer the server this process held
            me = self._me()
            others = [h for h in self._live_holders(record) if h != me]
            if others:
                self._write_record({**record, "holders": others})
                self.left_for = [h["pid"] for h in others]
                return False
            self._pg_ctl_stop()
            self.record.unlink(missing_ok=True)
            return True

    def shutdown(self) -> None:
        """Stop the server on this data folder whoever started it (tests, a stuck server)."""
        with self._lock():
            self._pg_ctl_stop()
            self.record.unlink(missing_ok=True)
            self.holder = False

    def _pg_ctl_stop(self) -> None:
        running = self._postmaster()
        if running is None:
            return
        done = self._as_account([_binary("pg_ctl"), "stop", "-D", str(self.data), "-m", "fast", "-w", "-t", "60"],
                                timeout=90)
        if done.returncode != 0 and self._postmaster() is not None:
            os.kill(running[0], signal.SIGQUIT)  # immediate shutdown, as `pg_ctl stop -m immediate` does
            _wait_for(lambda: self._postmaster() is None, 10)


def _wait_for(check, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not check() and time.monotonic() < deadline:
        time.sleep(0.1)


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _last_line(done: subprocess.CompletedProcess) -> str:
    lines = [line.strip() for line in (done.stderr or done.stdout or "").splitlines() if line.strip()]
    return lines[-1] if lines else f"exit status {done.returncode}"


def _last_error(log: Path) -> str | None:
    try:
        lines = log.read_text(errors="replace").splitlines()[-50:]
    except OSError:
        return None
    errors = [line.split(":  ", 1)[-1] for line in lines if "FATAL:" in line or "ERROR:" in line]
    return errors[-1] if errors else None


# -- the database a Prefect server runs on ------------------------------------------------------------
@dataclass
class PrefectDatabase:
    url: str | None  # None: the default of the environment (SQLite in the project's Prefect home)
    shown: str  # for the banner, without a password
    server: PostgresServer | None = None  # the project's PostgreSQL, when used


def refuse_password_in_argv(argument: str | None) -> None:
    """--database takes no password: a command line is readable by every user of the machine (ps)."""
    if argument and "://" in argument and urlsplit(argument.strip()).password is not None:
        raise PostgresError("--database: a password on the command line is readable by every user of this machine "
                            "(ps); give the URL in EVOFORGE_PREFECT_DATABASE, or leave the password out and set "
                            "PGPASSWORD or a ~/.pgpass (mode 0600) entry")


def database_choice(value: str | None) -> str:
    """--database / EVOFORGE_PREFECT_DATABASE: 'sqlite' (the default), 'postgres', or a URL."""
    value = (value or os.environ.get("EVOFORGE_PREFECT_DATABASE") or "sqlite").strip()
    if value.lower() in ("sqlite", "postgres", "postgresql"):
        return "postgres" if value.lower().startswith("postgres") else "sqlite"
    scheme = value.split("://", 1)[0].lower() if "://" in value else ""
    if scheme in ("postgresql", "postgres"):
        return "postgresql+asyncpg://" + value.split("://", 1)[1]  # Prefect needs the async driver
    if scheme == "postgresql+asyncpg":
        return value
    raise PostgresError(f"--database (or EVOFORGE_PREFECT_DATABASE): {CHOICES}, not {hide_password(value)!r}")


def _check_external(url: str) -> None:
    """An external database must answer before a Prefect server is started on it."""
    import asyncio

    import asyncpg

    async def probe():
        connection = await asyncpg.connect("postgresql://" + url.split("://", 1)[1], timeout=10)
        await connection.close()

    try:
        asyncio.run(probe())
    except Exception as err:
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PostgresError(f"the database {hide_password(url)} does not answer: {detail}") from None


@contextmanager
def prefect_database(choice: str | None = None, postgres_port: int = DEFAULT_PORT, announce=print):
    """The database for `evoforge ui`'s Prefect server. With 'postgres', the project's PostgreSQL is
    started (or reused) and, on leaving, stopped if this process started it (and no other evoforge
    still uses it); an external URL is checked and left alone."""
    choice = database_choice(choice)
    if choice == "sqlite":
        current = os.environ.get("PREFECT_API_DATABASE_CONNECTION_URL", "")
        yield PrefectDatabase(None, f"SQLite {current.split(':///', 1)[-1]}" if current.startswith("sqlite")
                              else hide_password(current))
        return
    if choice != "postgres":
        _check_external(choice)
        yield PrefectDatabase(choice, f"PostgreSQL {hide_password(choice)} (external: left running)")
        return
    server = PostgresServer(port=postgres_port)
    try:
        held = server.start()
        what = ("started by evoforge" if server.started else
                "adopted (the evoforge that started it is gone)" if server.adopted else
                "reused; the last evoforge using it stops it" if held else
                "reused (not started by evoforge: left running)")
        announce(f"PostgreSQL on {HOST}:{server.port} {what} (data: {server.data}, log: {server.log_path})", flush=True)
        yield PrefectDatabase(server.url(), f"PostgreSQL {server.url(hide=True)}", server)
    finally:
        if server.stop():
            announce(f"stopped PostgreSQL on {HOST}:{server.port}", flush=True)
        elif server.left_for:
            announce(f"left PostgreSQL on {HOST}:{server.port} running: evoforge (pid "
                     f"{', '.join(map(str, server.left_for))}) still uses it", flush=True)
