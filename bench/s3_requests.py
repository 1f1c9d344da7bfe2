"""The HTTP requests a local S3 server (moto, data/local_s3.py) answered, read from its request log: what
the benches count per commit, per stage start and per step. No side effects on import."""
from __future__ import annotations

import re
import time
from collections import Counter
from pathlib import Path


class RequestLog:
    """HTTP requests the moto server answered, from its request log (one line per request)."""
    LINE = re.compile(r'"(GET|PUT|POST|HEAD|DELETE) (\S+) HTTP/[\d.]+" (\d+)')

    def __init__(self, path: Path):
        self.path = path

    def lines(self) -> list[str]:
        return self.path.read_text(errors="replace").splitlines() if self.path.exists() else []

    def mark(self) -> int:
        return len(self.lines())

    def entries(self, mark: int) -> list[tuple[str, str, str]]:
        """(method, path, status) of each request since `mark`."""
        time.sleep(0.05)  # the server logs right after answering
        return [hit.groups() for line in self.lines()[mark:] if (hit := self.LINE.search(line))]

    def since(self, mark: int) -> Counter:
        found = Counter()
        for method, target, status in self.entries(mark):
            if status == "412":
                found["412"] += 1
                continue
            if method == "GET" and ("list-type" in target or "delimiter=" in target or "prefix=" in target):
                method = "LIST"
            found[method] += 1
        return found
