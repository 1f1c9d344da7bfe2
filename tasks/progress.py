"""Progress of long stages: a rich bar on a terminal, and log lines (done, rate, ETA) in Prefect.

Inside a Prefect flow or task run the lines go to its logger, so the UI shows them; outside, to the
`evoforge` logger. Log lines are throttled to one every `every_s` seconds plus the last one.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

# evoforge's own code: a record logged from these folders is evoforge's, whatever logger carries it
_OWN_CODE = tuple(str(Path(__file__).resolve().parent.parent / folder) + os.sep for folder in ("app", "data", "flows", "models", "tasks"))


def flow_run_logger() -> logging.Logger | logging.LoggerAdapter:
    """The active Prefect run's logger, else the `evoforge` logger. Prefect is imported here, not at
    module level, because inside a flow run the lines go to the Prefect UI; tasks/ stays plain functions
    that tests, benches and training processes call without Prefect (tests/test_structure.py checks it)."""
    if "prefect" not in sys.modules:
        # no Prefect run can be active in a process that never imported Prefect (a training process, a
        # bench); importing it here would also replace the logging that process set up for itself
        return logging.getLogger("evoforge")
    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:  # no active Prefect flow or task run: a plain call from a test, a benchmark
        return logging.getLogger("evoforge")


class TerminalFilter(logging.Filter):
    """What the terminal shows of the log (deploy/logging.yml puts this on Prefect's console handler):
    evoforge's own lines, progress and stage summaries, whichever logger carries them (inside a flow run
    Prefect's run logger, so the UI has them too), and errors of other libraries; not Prefect's engine
    chatter (server start, flow run begun and finished, the traceback of a failed stage: the command
    says that in one line) nor libraries' info and warnings. All of it still reaches the Prefect API
    and the command's log file. EVOFORGE_TRACEBACK=1 shows everything."""

    def filter(self, record: logging.LogRecord) -> bool:
        if os.environ.get("EVOFORGE_TRACEBACK") or record.name.startswith("evoforge"):
            return True
        if record.pathname.startswith(_OWN_CODE):
            return True
        if record.name.startswith(("prefect.flow_runs", "prefect.task_runs")):
            return False
        if record.name.startswith("prefect._internal"):  # background services that lost the API: the
            return False  # command says so in one line when it matters
        return record.levelno >= logging.ERROR


class Progress:
    def __init__(self, label: str, total: int, unit: str = "items", every_s: float = 10.0):
        self.label, self.total, self.unit, self.every_s = label, total, unit, every_s
        self.logger = flow_run_logger()
        self.started = time.monotonic()
        self.last_log = 0.0
        self.done = 0
        self._bar = None
        if sys.stderr.isatty() and total:
            from rich.progress import BarColumn, MofNCompleteColumn
            from rich.progress import Progress as Bar
            from rich.progress import TimeRemainingColumn

            self._bar = Bar("[bold]" + label, BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), transient=True)
            self._bar.start()
            self._task = self._bar.add_task(label, total=total)

    def update(self, done: int, extra: str = "") -> None:
        self.done = done
        if self._bar is not None:
            self._bar.update(self._task, completed=done)
        now = time.monotonic()
        if now - self.last_log >= self.every_s or done >= self.total:
            self.last_log = now
            elapsed = now - self.started
            rate = done / elapsed if elapsed > 0 else 0.0
            eta = f"ETA {(self.total - done) / rate:.0f} s" if rate > 0 else "ETA unknown"
            self.logger.info(f"{self.label}: {done}/{self.total} {self.unit} ({rate:.1f}/s, {eta}){extra}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
