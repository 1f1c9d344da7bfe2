"""Polling with a deadline, for the tests that start servers and workers and wait on what they do."""
from __future__ import annotations

import time


def wait_until(what: str, check, timeout: float, every: float = 0.5, explain=lambda: ""):
    """check()'s first truthy value; AssertionError naming `what` (and `explain()`) past `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{explain()}".rstrip())
