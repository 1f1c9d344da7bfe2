"""A pool of grader processes with a hard per-item deadline, and the one pool a process shares.

Why not `ProcessPoolExecutor`: it cannot kill the one worker that is stuck on a power tower, and a
worker killed from outside breaks the whole executor. Here each worker publishes, in shared memory,
which item of its chunk it is on and since when, and sends the chunk's results in one message (a
message per item woke the parent thousands of times a second, stealing one of two cores). Past the
deadline the parent kills that worker, records the item as `timeout`, starts a fresh worker and
hands it the chunk's other items.

Workers come from a forkserver that has already imported math-verify, so a replacement costs
milliseconds, and they never fork the (threaded, vLLM-holding) parent itself. The forkserver is this
process's own and its workers do not re-import the parent's main module (`_GraderPopen`).

Starting a pool costs ~0.7-1.5 s on 2 cores (the forkserver imports math-verify and sympy and warms
their parsers); grading a distinct answer costs ~1-3 ms. So a process keeps one pool per settings
(`shared_pool`, what `VerifyConfig.pool()` hands out): every stage and GRPO's reward in the process
grade on the same workers. The first call launches the forkserver (`warm`), which gets ready in its
own process while the caller reads its input; the workers stop at exit (or `stop_shared_pools`). A
worker's start-up never counts against an item's deadline: a chunk's clock starts when its worker is
ready.
"""
from __future__ import annotations

import atexit
import io
import multiprocessing as mp
import os
import resource
import signal
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from multiprocessing import forkserver, popen_forkserver, reduction, spawn, util
from multiprocessing.connection import Connection, Pipe, wait
from multiprocessing.context import set_spawning_popen
from multiprocessing.sharedctypes import RawArray
from typing import Callable

Item = tuple[str, str, str]  # (kind: "grade" | "gold", gold, response)
Result = tuple[str, str | None, str | None, float]  # (verdict, extracted, detail, seconds)

STARTUP_LIMIT_S = 60.0  # a worker not ready by then is broken: its chunk's first item fails as "did not start"


def _worker_main(conn: Connection, state, memory_mb: int) -> None:
    """state[0]: position in the chunk of the item being graded; state[1]: when it started
    (0: chunk received, no item begun yet; -1: chunk finished, results on their way); state[2]: when
    this worker became ready to grade (0: still starting)."""
    # the parent ends a grader (None, or a kill at the deadline; EOF when the parent is gone): a Ctrl-C at
    # the terminal, sent to the whole process group, must not kill a process's shared pool or print from it
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if memory_mb:
        limit = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    from evoforge.tasks.grading.answers import run_item

    state[2] = time.monotonic()  # CLOCK_MONOTONIC: one clock for all processes
    while True:
        try:
            chunk = conn.recv()
        except EOFError:
            return
        if chunk is None:
            return
        results = []
        for position, (kind, gold, response) in enumerate(chunk):
            state[0], state[1] = position, time.monotonic()
            results.append(run_item(kind, gold, response))
        state[1] = -1.0
        conn.send(results)


# Each process has its own forkserver, keyed by pid. The stdlib's one is a process-wide singleton:
# a forked child inherits its parent's and fails on it (os.waitpid on a process that is not its
# child: ChildProcessError), so a forked child could not grade at all; and its preload list is
# global to every user of the forkserver context.
_SERVERS: dict[int, forkserver.ForkServer] = {}
_SERVERS_LOCK = threading.Lock()


def _fork_server() -> forkserver.ForkServer:
    with _SERVERS_LOCK:
        server = _SERVERS.get(os.getpid())
        if server is None:
            server = _SERVERS[os.getpid()] = forkserver.ForkServer()
            server.set_forkserver_preload(["evoforge.tasks.grading.preload"])
        return server


class _GraderPopen(popen_forkserver.Popen):
    """Starts a grader from this process's forkserver. The stdlib's `_launch` (the same in CPython
    3.11-3.13), with two changes, marked: the forkserver is `_fork_server()`, and the child is not
    told to re-run the parent's main module. spawn would have every worker import it again as
    `__mp_main__` (a bench script, the `evoforge` command line, Prefect's engine: 0.6 s and more per
    worker on 2 cores, paid by every replacement too); a grader needs nothing from it."""

    def _launch(self, process_obj):
        prep_data = {key: value for key, value in spawn.get_preparation_data(process_obj._name).items()
                     if key not in ("init_main_from_name", "init_main_from_path")}  # changed
        buf = io.BytesIO()
        set_spawning_popen(self)
        try:
            reduction.dump(prep_data, buf)
            reduction.dump(process_obj, buf)
        finally:
            set_spawning_popen(None)
        self.sentinel, w = _fork_server().connect_to_new_process(self._fds)  # changed
        # a duplicate of the data pipe's write end: the child's sentinel of this parent
        _parent_w = os.dup(w)
        self.finalizer = util.Finalize(self, util.close_fds, (_parent_w, self.sentinel))
        with open(w, "wb", closefd=True) as f:
            f.write(buf.getbuffer())
        self.pid = forkserver.read_signed(self.sentinel)


class _GraderProcess(mp.process.BaseProcess):
    _start_method = "forkserver"

    @staticmethod
    def _Popen(process_obj):
        return _GraderPopen(process_obj)


@dataclass
class _Worker:
    process: mp.process.BaseProcess
    conn: Connection
    state: object  # shared [position, started, ready] (see _worker_main)
    started_at: float = 0.0  # when its process was started (this process's clock)
    chunk: list[int] = field(default_factory=list)  # item indices sent and not yet answered
    sent_at: float = 0.0

    def clock(self) -> tuple[int, float | None]:
        """(position in chunk, since when it counts) of the item being graded. Before the chunk's
        first item begins, the time counts from sending it or from the worker becoming ready, whichever
        is later: a worker's start-up is not an item's time; once the chunk is done, nothing counts."""
        started = float(self.state[1])
        if not self.chunk or started < 0:
            return int(self.state[0]), None
        if started:
            return int(self.state[0]), started
        ready = float(self.state[2])
        return int(self.state[0]), (max(self.sent_at, ready) if ready else None)

    def overdue(self, now: float, deadline_s: float) -> bool:
        since = self.clock()[1]
        return since is not None and now - since > deadline_s

    def never_started(self, now: float) -> bool:
        return bool(self.chunk) and not float(self.state[2]) and now - self.started_at > STARTUP_LIMIT_S


class GraderPool:
    """`workers` grader processes. `warm()` launches this process's forkserver, which imports and
    warms math-verify in its own process while the caller goes on (no thread here); the workers fork
    from it, milliseconds each, when the first `run` needs them. As a context manager: entering warms,
    leaving stops the workers, unless the pool is a process's shared one (`shared_pool`), which only
    exit or `stop_shared_pools` stops. One `run` at a time (others wait). A pool used in a forked
    child starts that child's own workers."""

    def __init__(self, workers: int = 2, deadline_s: float = 10.0, memory_mb: int = 2048, chunk_size: int = 32,
                 shared: bool = False):
        self.size = max(1, workers)
        self.deadline_s = deadline_s
        self.memory_mb = memory_mb
        self.chunk_size = max(1, chunk_size)
        self.shared = shared
        self.restarts = 0
        self._here()

    def _here(self) -> None:
        """This process's state: no workers yet. Also what a forked child does with the parent's pool:
        the workers, their pipes and the locks it inherited belong to the parent."""
        self.workers: list[_Worker] = []
        self._pid = os.getpid()
        self._lock = threading.Lock()  # guards starting and stopping
        self._run_lock = threading.Lock()

    def _adopt(self) -> None:
        if self._pid != os.getpid():
            for worker in self.workers:
                worker.conn.close()  # this process's copy only; the parent's workers go on
            self._here()

    def __enter__(self) -> "GraderPool":
        return self.warm()

    def __exit__(self, *exc) -> None:
        if not self.shared:
            self.stop()

    def warm(self) -> "GraderPool":
        """Begin starting, and return at once: the forkserver (a fresh interpreter: ~0.7-1.5 s of
        imports and warm-up on 2 cores) is launched now and gets ready while the caller reads its input."""
        self._adopt()
        if not self.workers:
            _fork_server().ensure_running()  # spawns the server; waits for nothing
        if self.shared:
            _remember(self)
        return self

    def start(self) -> "GraderPool":
        """The workers, started (forked once the forkserver is ready) if they are not running."""
        self.warm()
        with self._lock:
            if not self.workers:
                started: list[_Worker] = []
                try:
                    for _ in range(self.size):
                        started.append(self._start())
                except BaseException:
                    for worker in started:
                        worker.process.kill()
                        worker.process.join()
                        worker.conn.close()
                    raise
                self.workers = started
        return self

    def stop(self) -> None:
        """Ask the workers to exit (killed after 2 s); the next `run` starts fresh ones."""
        self._adopt()
        with self._lock:
            workers, self.workers = self.workers, []
        for worker in workers:
            try:
                worker.conn.send(None)
            except OSError:
                pass
        for worker in workers:
            worker.process.join(timeout=2)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            worker.conn.close()

    def _start(self) -> _Worker:
        parent, child = Pipe(duplex=True)
        state = RawArray("d", 3)
        process = _GraderProcess(target=_worker_main, args=(child, state, self.memory_mb), daemon=True)
        started_at = time.monotonic()
        process.start()
        child.close()
        return _Worker(process, parent, state, started_at)

    def _replace(self, worker: _Worker) -> _Worker:
        worker.process.kill()
        worker.process.join()
        worker.conn.close()
        self.restarts += 1
        fresh = self._start()
        self.workers[self.workers.index(worker)] = fresh
        return fresh

    def run(self, items: list[Item], on_progress: Callable[[int], None] | None = None) -> list[Result]:
        """Results in the order of `items`. `on_progress(done)` is called as results arrive."""
        if not items:
            return []
        self._adopt()
        with self._run_lock:
            self.start()
            for worker in list(self.workers):
                if not worker.process.is_alive():  # died while idle (killed from outside, OOM)
                    self._replace(worker)
            try:
                return self._run(items, on_progress)
            finally:
                # a run cut short (an exception, Ctrl-C) leaves chunks in flight: their answers must not
                # reach the next run, so those workers go
                for worker in list(self.workers):
                    if worker.chunk:
                        worker.chunk = []
                        self._replace(worker)

    def _run(self, items: list[Item], on_progress: Callable[[int], None] | None) -> list[Result]:
        results: list[Result | None] = [None] * len(items)
        # same gold -> same chunk -> one worker parses it (gold parsing is most of math-verify's cost)
        queue: deque = deque(sorted(range(len(items)), key=lambda i: items[i][1]))
        done = 0

        def dispatch(worker: _Worker, indices: list[int] | None = None) -> None:
            if indices is None:
                indices = [queue.popleft() for _ in range(min(self.chunk_size, len(queue)))]
            worker.chunk = indices
            if indices:
                worker.state[0], worker.state[1] = 0, 0.0
                worker.sent_at = time.monotonic()
                try:
                    worker.conn.send([items[i] for i in indices])
                except OSError:  # it died since it was last seen alive: a fresh worker takes the chunk
                    worker.chunk = []
                    dispatch(self._replace(worker), indices)

        def fail_current(worker: _Worker, detail: str) -> None:
            """Record the item the worker is stuck on as a timeout; its chunk-mates go to a fresh worker."""
            nonlocal done
            position, since = worker.clock()
            stuck = worker.chunk[position]
            results[stuck] = ("timeout", None, detail, time.monotonic() - (since or worker.sent_at))
            done += 1
            rest = [i for i in worker.chunk if i != stuck]
            worker.chunk = []
            dispatch(self._replace(worker), rest or None)

        for worker in self.workers:
            dispatch(worker)
        while done < len(items):
            busy = [w for w in self.workers if w.chunk]
            now = time.monotonic()
            clocks = [since for w in busy if (since := w.clock()[1]) is not None]
            next_deadline = min(clocks, default=now) + self.deadline_s
            ready = wait([w.conn for w in busy], timeout=min(1.0, max(0.0, next_deadline - now)))
            for conn in ready:
                worker = next(w for w in self.workers if w.conn is conn)
                try:
                    answers = conn.recv()
                except (EOFError, OSError):  # killed by the kernel (OOM) or crashed hard
                    fail_current(worker, "grader process died")
                    continue
                for index, result in zip(worker.chunk, answers):
                    results[index] = result
                done += len(answers)
                worker.chunk = []
                dispatch(worker)
            now = time.monotonic()
            for worker in list(self.workers):
                if worker.overdue(now, self.deadline_s):
                    fail_current(worker, f"grading exceeded the {self.deadline_s:g} s deadline")
                elif worker.never_started(now):
                    fail_current(worker, f"grader process did not start within {STARTUP_LIMIT_S:g} s")
            if on_progress:
                on_progress(done)
        return results  # type: ignore[return-value]


# The process's shared pools, one per settings, least recently used first; keyed by pid too, so a
# forked child never takes its parent's (and after a fork the child starts with none: `_forget`).
MAX_SHARED_POOLS = 4  # settings a process grades with at once; a long-lived process (a Prefect worker) may see more
_SHARED: OrderedDict[tuple, GraderPool] = OrderedDict()
_SHARED_LOCK = threading.Lock()
_EXIT_HOOK: list[int] = []  # the pids that registered `stop_shared_pools` at exit


def _settings(pool: GraderPool) -> tuple:
    return (os.getpid(), pool.size, float(pool.deadline_s), pool.memory_mb, pool.chunk_size)


def shared_pool(workers: int = 2, deadline_s: float = 10.0, memory_mb: int = 2048, chunk_size: int = 32) -> GraderPool:
    """This process's pool for these settings: the first call creates it and starts its workers in the
    background; every later call, in any stage or thread, gets the same pool and workers. Leaving its
    `with` does not stop it; exit (or `stop_shared_pools`) does."""
    key = (os.getpid(), max(1, workers), float(deadline_s), memory_mb, max(1, chunk_size))
    with _SHARED_LOCK:
        pool = _SHARED.get(key)
        if pool is None:
            pool = _SHARED[key] = GraderPool(workers, deadline_s, memory_mb, chunk_size, shared=True)
    return pool.warm()


def _remember(pool: GraderPool) -> None:
    """`pool` (warming or running) is its settings' shared pool, the most recently used; the least
    recently used idle pools past MAX_SHARED_POOLS stop. A pool stopped so and used again (a caller
    kept it) comes back."""
    key = _settings(pool)
    with _SHARED_LOCK:
        if os.getpid() not in _EXIT_HOOK:
            _EXIT_HOOK.append(os.getpid())
            atexit.register(stop_shared_pools)
        _SHARED.setdefault(key, pool)
        _SHARED.move_to_end(key)
        mine = [k for k in _SHARED if k[0] == os.getpid() and k != key]
        evicted = []
        for old in mine[:max(0, len(mine) + 1 - MAX_SHARED_POOLS)]:
            if _SHARED[old]._run_lock.acquire(blocking=False):  # never stop a pool in the middle of a run
                evicted.append(_SHARED.pop(old))
    for old_pool in evicted:
        try:
            old_pool.stop()
        finally:
            old_pool._run_lock.release()


def stop_shared_pools() -> None:
    """Stop this process's shared pools (their workers exit); a later `shared_pool` starts afresh.
    Runs at exit; tests call it too."""
    with _SHARED_LOCK:
        pools = [_SHARED.pop(key) for key in [k for k in _SHARED if k[0] == os.getpid()]]
    for pool in pools:
        pool.stop()


def _forget() -> None:
    """In a forked child: the parent's pools, forkserver and locks are not this process's."""
    global _SHARED_LOCK, _SERVERS_LOCK
    _SHARED_LOCK, _SERVERS_LOCK = threading.Lock(), threading.Lock()
    for pool in _SHARED.values():
        pool._adopt()  # closes the child's copies of the parent's pipes
    _SHARED.clear()


os.register_at_fork(after_in_child=_forget)
