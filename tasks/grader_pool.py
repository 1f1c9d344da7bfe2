"""A pool of grader processes with a hard per-item deadline.

Why not `ProcessPoolExecutor`: it cannot kill the one worker that is stuck on a power tower, and a
worker killed from outside breaks the whole executor. Here each worker streams one result per item
back, so the parent knows which item a worker is on and since when; past the deadline it kills that
worker, records the item as `timeout`, starts a fresh worker and hands it the rest of the chunk.

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
from typing import Callable, Iterable

Item = tuple[str, str, str]  # (kind: "grade" | "gold", gold, response)
Result = tuple[str, str | None, str | None, float]  # (verdict, extracted, detail, seconds)


def _worker_main(conn: Connection, memory_mb: int) -> None:
    if memory_mb:
        limit = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    from tasks.grading import run_item

    while True:
        try:
            chunk = conn.recv()
        except EOFError:
            return
        if chunk is None:
            return
        for index, (kind, gold, response) in chunk:
            conn.send((index, run_item(kind, gold, response)))


_CONTEXT: mp.context.BaseContext | None = None


def _context() -> mp.context.BaseContext:
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = mp.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(["tasks.grading"])
    return _CONTEXT


@dataclass
class _Worker:
    process: mp.process.BaseProcess
    conn: Connection
    inflight: deque = field(default_factory=deque)
    since: float = 0.0  # when the item at the head of `inflight` started


class GraderPool:
    def __init__(self, workers: int = 2, deadline_s: float = 10.0, memory_mb: int = 2048, chunk_size: int = 16):
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
        process = _context().Process(target=_worker_main, args=(child, self.memory_mb), daemon=True)
        process.start()
        child.close()
        return _Worker(process, parent)

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
        queue: deque = deque(range(len(items)))
        done = 0

        def dispatch(worker: _Worker, indices: Iterable[int] | None = None) -> None:
            if indices is None:
                indices = [queue.popleft() for _ in range(min(self.chunk_size, len(queue)))]
            indices = list(indices)
            if indices:
                worker.inflight = deque(indices)
                worker.since = time.monotonic()
                worker.conn.send([(i, items[i]) for i in indices])

        def fail_head(worker: _Worker, detail: str) -> None:
            nonlocal done
            head = worker.inflight.popleft()
            results[head] = ("timeout", None, detail, time.monotonic() - worker.since)
            done += 1
            rest = list(worker.inflight)
            dispatch(self._replace(worker), rest if rest else None)

        for worker in self.workers:
            dispatch(worker)
        while done < len(items):
            busy = [w for w in self.workers if w.inflight]
            now = time.monotonic()
            next_deadline = min(w.since + self.deadline_s for w in busy)
            ready = wait([w.conn for w in busy], timeout=max(0.0, next_deadline - now))
            for conn in ready:
                worker = next(w for w in self.workers if w.conn is conn)
                try:
                    index, result = conn.recv()
                except (EOFError, OSError):  # killed by the kernel (OOM) or crashed hard
                    fail_head(worker, "grader process died")
                    continue
                results[index] = result
                done += 1
                worker.inflight.popleft()
                worker.since = time.monotonic()
                if not worker.inflight:
                    dispatch(worker)
            now = time.monotonic()
            for worker in list(self.workers):
                if worker.inflight and now - worker.since > self.deadline_s:
                    fail_head(worker, f"grading exceeded the {self.deadline_s:g} s deadline")
            if on_progress:
                on_progress(done)
        return results  # type: ignore[return-value]
