"""The sandbox: model-written code never runs in the factory's process.

Each execution runs in a child process forked by a warm worker (models/sandbox_worker.py), with a
wall-clock deadline, one memory budget for all its processes and files, CPU-time, process-count,
file-size and open-file limits, a fresh scratch folder as its working directory, an environment with
nothing inherited, and output cut at a configured size. Every process it started dies with it.

Isolation (`isolation`), and it fails closed: where namespaces cannot be made, no model code runs
unless the config names `rlimits`.
- `namespaces` (the default; `auto` is its old name): the worker runs under bubblewrap (Debian
  `bubblewrap`) in new user, PID, network, mount, IPC and UTS namespaces. It sees /usr read-only, the
  project's site-packages read-only (so the code may import sympy), a read-only /dev with a /dev/shm,
  /tmp and /scratch of `scratch_mb` each (tmpfs, counted in its memory budget, emptied between
  executions): nothing else of the machine. The network namespace has no interfaces but a down
  loopback: nothing connects. No nested user namespace (`--disable-userns`), and a seccomp filter
  refuses the system calls a step never needs (models/seccomp.py). Run as root, the worker drops to
  `nobody` first, because root is exempt from the process-count limit.
- `rlimits`, only when named: the same limits and the clean environment in the project's scratch
  folder, but the code runs as evoforge's user with NO filesystem or network isolation; every start
  of a sandbox says so in a warning.

A pool of workers (one per configured worker) keeps the per-execution cost at a fork, not an
interpreter start: `bench`-style figures are in the sandbox test's output.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import struct
import subprocess
import sys
import sysconfig
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from evoforge.data.section import Section
from evoforge.models import seccomp

log = logging.getLogger("evoforge.sandbox")
NOBODY = 65534
FOLDERS = 3  # /scratch, /tmp, /dev/shm: each scratch_mb, each out of memory_mb
RLIMITS_WARNING = ("sandbox isolation is rlimits (as configured): model-written code runs as {user} with time, memory, "
                   "process and file-size limits but NO filesystem or network isolation: it can read and write what "
                   "{user} can (this project, the lake, the venv, ~/.aws) and reach the network and the Prefect API; "
                   "use isolation: namespaces (bubblewrap) for code you do not trust")
WORKER_SOURCE = (Path(__file__).parent / "sandbox_worker.py").read_text()


class SandboxConfig(Section):
    wall_seconds: float = Field(5.0, gt=0, description="deadline per execution; the process is killed past it")
    cpu_seconds: int = Field(5, ge=1)
    memory_mb: int = Field(512, ge=32, description="one budget for the execution: all its processes' memory and "
                                                   "its folders' contents; past it, it is killed")
    max_processes: int = Field(16, ge=1, description="processes and threads the code may have at once")
    max_file_mb: int = Field(8, ge=1, description="largest file it may write")
    scratch_mb: int = Field(32, ge=1, description="size of its /scratch, /tmp and /dev/shm (namespaces: each a tmpfs, "
                                                  "all counted in memory_mb), emptied before every execution")
    max_output_chars: int = Field(4000, ge=64, description="stdout and stderr are each cut to this")
    workers: int = Field(2, ge=1, description="warm workers: executions that run at once")
    isolation: Literal["namespaces", "rlimits", "auto"] = Field(
        "namespaces", description="namespaces (auto: the same), or rlimits: resource limits only, no filesystem or "
                                  "network isolation; never chosen for you")
    seccomp: bool = Field(True, description="refuse the system calls a step never needs (models/seccomp.py); off only "
                                            "on a machine without its system call table")

    @model_validator(mode="after")
    def _room_beside_the_folders(self) -> "SandboxConfig":
        if self.memory_mb < FOLDERS * self.scratch_mb + 64:
            raise ValueError(f"sandbox memory_mb ({self.memory_mb}) must leave at least 64 MB beside /scratch, /tmp and "
                             f"/dev/shm ({FOLDERS} x scratch_mb = {FOLDERS * self.scratch_mb})")
        return self


@dataclass
class ExecResult:
    status: str  # ok | error | timeout | memory | killed
    exit_code: int | None
    stdout: str
    stderr: str
    seconds: float
    truncated: bool


class SandboxError(RuntimeError):
    pass


def _bwrap() -> str | None:
    return shutil.which("bwrap")


def _interpreter() -> str:
    """An interpreter the sandbox user can run, of our Python version (the site-packages are ours)."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    system = Path("/usr/bin") / version
    return str(system) if system.exists() else str(Path(sys.base_prefix) / "bin" / version)


class _Worker:
    def __init__(self, sandbox: "Sandbox", index: int):
        self.sandbox, self.index = sandbox, index
        self.scratch = sandbox.root / f"worker-{index}"
        self.process: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        if self.scratch.exists():
            shutil.rmtree(self.scratch, ignore_errors=True)
        self.scratch.mkdir(parents=True)
        self.process = self.sandbox._spawn(self.scratch)
        hello = self._read(timeout=60)
        if not hello or not hello.get("ready"):
            raise SandboxError(f"sandbox worker did not start: {self._stderr_tail()}")
        self.uid = hello["uid"]

    def _stderr_tail(self) -> str:
        try:
            self.process.kill()
            return self.process.stderr.read().decode(errors="replace")[-2000:]
        except Exception:
            return ""

    def _read(self, timeout: float) -> dict | None:
        result: list = []

        def read():
            header = self.process.stdout.read(4)
            if len(header) == 4:
                (size,) = struct.unpack(">I", header)
                result.append(json.loads(self.process.stdout.read(size)))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout)
        return result[0] if result else None

    def execute(self, code: str) -> ExecResult:
        config = self.sandbox.config
        request = json.dumps({
            "code": code, "wall": config.wall_seconds, "cpu": config.cpu_seconds, "memory_mb": config.memory_mb,
            "processes": config.max_processes, "file_mb": config.max_file_mb, "output_chars": config.max_output_chars,
            "scratch_mb": config.scratch_mb,
        }).encode()
        try:
            self.process.stdin.write(struct.pack(">I", len(request)) + request)
            self.process.stdin.flush()
            answer = self._read(timeout=config.wall_seconds + 30)
        except (BrokenPipeError, OSError):
            answer = None
        if answer is None:  # the worker itself died or hung: replace it, the execution counts as killed
            self.stop()
            self.start()
            return ExecResult("killed", None, "", "sandbox worker lost", 0.0, False)
        return ExecResult(**answer)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.scratch, ignore_errors=True)


class Sandbox:
    """`with Sandbox(config) as box: box.run(code)` or `box.run_many(codes)` (parallel over workers)."""

    def __init__(self, config: SandboxConfig | None = None, root: Path | None = None):
        from evoforge.data import home

        self.config = config or SandboxConfig()
        self.root = Path(root or home.home() / ".tmp" / "sandbox") / uuid.uuid4().hex[:12]
        self.isolation = self._choose_isolation()
        self._workers: queue.Queue[_Worker] = queue.Queue()
        self._all: list[_Worker] = []

    # -- isolation ---------------------------------------------------------------------------
    def _choose_isolation(self) -> str:
        if self.config.isolation == "rlimits":
            return "rlimits"
        problem = self._namespaces_problem()
        if problem is not None:  # fail closed: no silent step down to weaker isolation
            raise SandboxError(f"sandbox: namespace isolation is not available here ({problem}), and model-written "
                               f"code does not run without it; install bubblewrap and allow unprivileged user "
                               f"namespaces, or set the sandbox's isolation: rlimits to accept resource limits only")
        return "namespaces"

    def _namespaces_problem(self) -> str | None:
        if not sys.platform.startswith("linux"):
            return "not Linux"
        if _bwrap() is None:
            return "bubblewrap (bwrap) is not installed (Debian package `bubblewrap`)"
        try:
            with self._seccomp_fd() as fds:
                probe = subprocess.run(self._bwrap_command(Path("/"), [_interpreter(), "-c", "pass"], fds, probe=True),
                                       capture_output=True, timeout=30, pass_fds=fds, **self._drop_privileges())
        except seccomp.Unsupported as err:
            return f"{err} (the sandbox's seccomp: false runs without it)"
        if probe.returncode != 0:
            return f"bubblewrap cannot create namespaces here ({probe.stderr.decode(errors='replace').strip()[:200]})"
        return None

    @contextmanager
    def _seccomp_fd(self):
        """The filter for bubblewrap, in a pipe whose read end the child inherits (empty when seccomp is off)."""
        if not self.config.seccomp:
            yield ()
            return
        code = seccomp.program()
        read, write = os.pipe()
        try:
            os.write(write, code)  # a few hundred bytes: the pipe holds them all
            os.close(write)
            write = None
            yield (read,)
        finally:
            os.close(read)
            if write is not None:
                os.close(write)

    @staticmethod
    def _drop_privileges() -> dict:
        # root is exempt from RLIMIT_NPROC (a fork bomb would not be stopped) and could undo any limit
        return {"user": NOBODY, "group": NOBODY, "extra_groups": []} if os.geteuid() == 0 else {}

    def _site(self) -> str:
        return sysconfig.get_paths()["purelib"]

    def _bwrap_command(self, scratch: Path, argv: list[str], seccomp_fds: tuple = (), probe: bool = False) -> list[str]:
        size = str(self.config.scratch_mb << 20)
        command = [
            _bwrap(), "--ro-bind", "/usr", "/usr", "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64",
            "--symlink", "usr/bin", "/bin", "--proc", "/proc",
            # /dev: the device nodes, read-only; its /dev/shm, /tmp and /scratch live in memory, of a fixed size
            # each, counted in the execution's memory: no execution can fill the host's memory or disk
            "--dev", "/dev", "--size", size, "--tmpfs", "/dev/shm", "--remount-ro", "/dev",
            "--size", size, "--tmpfs", "/tmp",
            # no nested user namespace: inside one, the code would be uid 0 with every capability over it
            "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session", "--clearenv",
            "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "LANG", "C.UTF-8", "--setenv", "PYTHONDONTWRITEBYTECODE", "1",
        ]
        for fd in seccomp_fds:
            command += ["--seccomp", str(fd)]
        if not argv[0].startswith("/usr/"):
            command += ["--ro-bind", sys.base_prefix, sys.base_prefix]
        if not probe:
            command += ["--size", size, "--tmpfs", "/scratch", "--chdir", "/scratch",
                        "--ro-bind", self._site(), "/site", "--setenv", "EVOFORGE_SANDBOX_SITE", "/site",
                        "--setenv", "EVOFORGE_SANDBOX_NAMESPACED", "1"]
        return command + argv

    def _spawn(self, scratch: Path) -> subprocess.Popen:
        argv = [_interpreter(), "-u", "-c", WORKER_SOURCE]
        drop = self._drop_privileges()
        if drop:
            os.chown(scratch, NOBODY, NOBODY)
        if self.isolation != "namespaces":
            env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "EVOFORGE_SANDBOX_SITE": self._site()}
            return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    env=env, cwd=str(scratch), start_new_session=True, close_fds=True, **drop)
        with self._seccomp_fd() as fds:
            return subprocess.Popen(self._bwrap_command(scratch, argv, fds), stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={}, start_new_session=True,
                                    close_fds=True, pass_fds=fds, **drop)

    # -- use -----------------------------------------------------------------------------------
    def __enter__(self) -> "Sandbox":
        if self.isolation == "rlimits":  # every start of a sandbox (every stage that runs model code) says so
            import getpass

            log.warning(RLIMITS_WARNING.format(user="nobody" if self._drop_privileges() else getpass.getuser()))
        self.root.mkdir(parents=True, exist_ok=True)
        if self._drop_privileges():
            os.chmod(self.root, 0o755)
        for index in range(self.config.workers):
            worker = _Worker(self, index)
            self._all.append(worker)
            self._workers.put(worker)
        return self

    def __exit__(self, *exc) -> None:
        for worker in self._all:
            worker.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def run(self, code: str) -> ExecResult:
        worker = self._workers.get()
        try:
            return worker.execute(code)
        finally:
            self._workers.put(worker)

    def run_many(self, codes: list[str]) -> list[ExecResult]:
        """All `codes`, as many at once as there are workers; results in the order of `codes`."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=len(self._all)) as pool:
            return list(pool.map(self.run, codes))


def run_file(path: Path, config: SandboxConfig | None = None) -> ExecResult:
    """`evoforge sandbox run FILE.py`: one file, run the way the search runs a step."""
    with Sandbox((config or SandboxConfig()).model_copy(update={"workers": 1})) as box:
        started = time.monotonic()
        result = box.run(Path(path).read_text())
        log.info(f"sandbox ({box.isolation}): {result.status} in {time.monotonic() - started:.2f} s")
        return result
