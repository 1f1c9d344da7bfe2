"""Where a secret could show: an answer to a stranger, a command line (`ps`), a file. For the tests that check
the auth string, the API keys and the passwords stay where they belong."""
from __future__ import annotations

import urllib.error
import urllib.request
from base64 import b64encode
from pathlib import Path


def post_status(url: str, basic_auth: str | None = None) -> int:
    """The HTTP status a JSON POST of `{}` gets, with or without Prefect's basic auth."""
    request = urllib.request.Request(url, data=b"{}", method="POST", headers={"Content-Type": "application/json"})
    if basic_auth is not None:
        request.add_header("Authorization", "Basic " + b64encode(basic_auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status
    except urllib.error.HTTPError as err:
        return err.code


def on_command_lines(secrets: dict[str, str]) -> list[str]:
    """Each secret (name -> value) found on the command line of a process of this machine."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes() if entry.name.isdigit() else b""
        except OSError:
            continue
        found += [f"{name} on the command line of {entry.name}" for name, value in secrets.items()
                  if value.encode() in cmdline]
    return found


def in_files(files, secrets: dict[str, str]) -> list[str]:
    """Each secret found in one of `files` (local paths or lake objects)."""
    found = []
    for path in files:
        try:
            data = path.read_bytes()
        except OSError:
            continue
        found += [f"{name} in {path}" for name, value in secrets.items() if value.encode() in data]
    return found
