"""A pool of grader processes with a hard per-item deadline.

Why not `ProcessPoolExecutor`: it cannot kill the one worker that is stuck on a power tower, and a
worker killed from outside breaks the whole executor. Here each worker publishes, in shared memory,
which item of its chunk it is on and since when, and sends the chunk's results in one message (a
message per item woke the parent thousands of times a second, stealing one of two cores). Past the
deadline the parent kills that worker, records the item as `timeout`, starts a fresh worker and
hands it the chunk's other items.

Workers come from a forkserver that has already imported math-verify, so a replacement costs
milliseconds, and they never fork the (threaded, vLLM-holding) parent itself.
"""
from __future__ import annotations

import multiprocessing as mp
import resource
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Callable

Item = tuple[str, str, str]  # (kind: "grade" | "gold", gold, response)
Result = tuple[str, str | None, str | None, float]  # (verdict, extracted, detail, seconds)


def _worker_main(conn: Connection, state, memory_mb: int) -> None:
    """state[0]: position in the chunk of the item being graded; state[1]: when it started
    (0: chunk received, no item begun yet; -1: chunk finished, results on their way)."""
    if memory_mb:
        limit = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    from evoforge.tasks.grading.answers import run_item

    while True:
        try:
            chunk = conn.recv()
        except EOFError:
            return
        if chunk is None:
            return
        results = []
        for position, (kind, gold, response) in enumerate(chunk):
            state[0], state[1] = position, time.monotonic()  # CLOCK_MONOTONIC: one clock for all processes
            results.append(run_item(kind, gold, response))
        state[1] = -1.0
        conn.send(results)


_CONTEXT: mp.context.BaseContext | None = None


def _context() -> mp.context.BaseContext:
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = mp.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(["evoforge.tasks.grading.preload"])
    return _CONTEXT


@dataclass
class _Worker:
    process: mp.process.BaseProcess
    conn: Connection
    state: object  # shared [position, started] (see _worker_main)
    chunk: list[int] = field(default_factory=list)  # item indices sent and not yet answered
    sent_at: float = 0.0

    def clock(self) -> tuple[int, float | None]:
        """(position in chunk, since when it counts) of the item being graded. Before the chunk's
        first item begins, the time counts from sending it; once the chunk is done, nothing counts."""
        started = float(self.state[1])
        if not self.chunk or started < 0:
            return int(self.state[0]), None
        return int(self.state[0]), started or self.sent_at

    def overdue(self, now: float, deadline_s: float) -> bool:
        since = self.clock()[1]
        return since is not None and now - since > deadline_s


class GraderPool:
    def __init__(self, workers: int = 2, deadline_s: float = 10.0, memory_mb: int = 2048, chunk_size: int = 32):
        self.size = max(1, workers)
        self.deadline_s = deadline_s
        self.memory_mb = memory_mb
        self.chunk_size = max(1, chunk_size)
        self.workers: list[_Worker] = []
        self.restarts = 0

    def __enter__(self) -> "GraderPool":
        self.workers = [self._start() for _ in range(self.size)]
        return self

    def __exit__(self, *exc) -> None:
        for worker in self.workers:
            try:
                worker.conn.send(None)
            except OSError:
                pass
        for worker in self.workers:
            worker.process.join(timeout=2)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
        self.workers = []

    def _start(self) -> _Worker:
        parent, child = _context().Pipe(duplex=True)
        state = _context().Array("d", 2, lock=False)
        process = _context().Process(target=_worker_main, args=(child, state, self.memory_mb), daemon=True)
        process.start()
        child.close()
        return _Worker(process, parent, state)

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
                worker.conn.send([items[i] for i in indices])

        def fail_current(worker: _Worker, detail: str) -> None:
            """Record the item the worker is stuck on as a timeout; its chunk-mates go to a fresh worker."""
            nonlocal done
            position, since = worker.clock()
            stuck = worker.chunk[position]
            results[stuck] = ("timeout", None, detail, time.monotonic() - (since or worker.sent_at))
            done += 1
            dispatch(self._replace(worker), [i for i in worker.chunk if i != stuck] or None)

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
                dispatch(worker)
            now = time.monotonic()
            for worker in list(self.workers):
                if worker.overdue(now, self.deadline_s):
                    fail_current(worker, f"grading exceeded the {self.deadline_s:g} s deadline")
            if on_progress:
                on_progress(done)
        return results  # type: ignore[return-value]
