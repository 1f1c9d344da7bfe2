"""The benchmarks' A/B runs: each side in a fresh process, so neither inherits the other's warm caches."""
from __future__ import annotations

import json
import subprocess
import sys


def in_fresh_process(script: str, side: str, args, env: dict | None = None) -> dict:
    """Run `script --side SIDE` with the same options as `args`; the side prints its result as JSON on
    its last line of output."""
    options = [f"--{name.replace('_', '-')}={value}" for name, value in vars(args).items() if name != "side"]
    out = subprocess.run([sys.executable, script, "--side", side, *options], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{script} --side {side} exited with status {out.returncode}:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
