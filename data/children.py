"""What a process evoforge starts does first: die with its parent (Linux), so that a stage process killed
with SIGKILL leaves no trainer holding a GPU and no worker writing into the lake."""
from __future__ import annotations

import ctypes
import os
import signal
from functools import partial
from typing import Callable

_PR_SET_PDEATHSIG = 1


def _prctl():
    """libc's prctl, or None where there is none (not Linux)."""
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def die_with_parent(parent: int | None = None) -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux); exit now if it already has.
    `parent`: the pid of the process that started this one, when it may have died before this is called
    (a spawned worker calls it once its interpreter is up: by then it may belong to init)."""
    _die_with(os.getppid() if parent is None else parent, _prctl())


def dies_with_this_process() -> Callable[[], None]:
    """A `preexec_fn` for `subprocess.Popen` that makes the child die with this process (Linux), for a
    child that runs no evoforge code to call `die_with_parent` itself (a server of another library). The
    kernel signals when the *thread* that started the child ends: start it from one that lives as long as
    the process (the main thread). prctl is looked up here, before the fork: a forked child of a process
    with threads must not load a library."""
    return partial(_die_with, os.getpid(), _prctl())


def _die_with(parent: int, prctl) -> None:
    if prctl is None:
        return  # not Linux: the launcher's own cleanup still stops the children on every way out but SIGKILL
    prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)
