"""What a process evoforge starts does first: die with its parent (Linux), so that a stage process killed
with SIGKILL leaves no trainer holding a GPU and no worker writing into the lake."""
from __future__ import annotations

import ctypes
import os
import signal

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int | None = None) -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux); exit now if it already has.
    `parent`: the pid of the process that started this one, when it may have died before this is called
    (a spawned worker calls it once its interpreter is up: by then it may belong to init)."""
    parent = os.getppid() if parent is None else parent
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return  # not Linux: the launcher's own cleanup still stops the children on every way out but SIGKILL
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)
