"""The secrets evoforge makes for the servers it starts (the Prefect API's auth string, the `vllm serve` key):
each kept in one file, mode 0600 in a folder only its owner enters, passed to processes by environment and
never on a command line (readable by every user in `ps`), never in a config, the lake or a log."""
from __future__ import annotations

import ipaddress
import os
import secrets
from pathlib import Path

from evoforge.data import atomic


def is_loopback(host: str) -> bool:
    """Whether a server bound to `host` answers this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve to any interface


def read_secret(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None


def make_secret(path: Path, prefix: str = "") -> str:
    """A new random secret written to `path` (mode 0600 from its creation on; its folder 0700 when made here)."""
    if not path.parent.exists():
        path.parent.mkdir(mode=0o700, parents=True)
    value = prefix + secrets.token_urlsafe(32)
    atomic.write_text(path, value + "\n", mode=0o600)
    return value


def server_secret(host: str, variable: str, path: Path, what: str, prefix: str = "") -> str | None:
    """The secret a server on `host` asks its clients for: the user's (the environment's `variable`), else the
    one kept in `path`, else, for any host but loopback, a new one kept there. A server others can reach never
    starts without one (an empty `variable` there is refused); on loopback none is made up."""
    given = os.environ.get(variable)
    if given is not None:
        if not given.strip() and not is_loopback(host):
            raise ValueError(f"{what} on {host} would answer anyone ({variable} is empty): set it, or unset it and "
                             f"evoforge keeps one in {path}")
        return given.strip() or None
    kept = read_secret(path)
    if kept is not None or is_loopback(host):
        return kept
    return make_secret(path, prefix)
