"""Every training method from the installed `evoforge` command, run from a folder outside the checkout with
PYTHONSAFEPATH set (no working directory or script folder on sys.path, in evoforge or in the training
processes it starts): a module that imports `tasks.critic` instead of `evoforge.tasks.critic` works under
pytest, whose root is the checkout, and fails here with ModuleNotFoundError."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from seeds import seed_every_methods_rows

pytestmark = [pytest.mark.model, pytest.mark.server]  # the stage's own Prefect server


def test_every_method_and_the_ppm_train_from_the_installed_command_outside_the_checkout(runs_root, tiny_model, scratch):
    from evoforge.data.lake import lake

    run = "installed"
    seed_every_methods_rows(run)
    methods = "sft+dpo+traces+grpo+raro+svs"
    config = {"engine": {"model": str(tiny_model), "max_model_len": 1024},
              "critic": {"sampling": {"n": 1, "max_tokens": 8, "temperature": 1.0}},
              "finetune": {"method": methods, "train_ppm": True, "max_steps": 1, "batch_size": 4, "learning_rate": 1e-3,
                           "grpo": {"generations": 4, "max_completion_tokens": 8, "problems": "all"},
                           "few_shot": False, "report_to": [], "guard": {"held_out_rows": 0}},
              "stages": ["finetune"]}
    path = scratch / "round.json"
    path.write_text(json.dumps(config))
    outside = scratch / "elsewhere"  # not the checkout's root: nothing of the checkout is importable from here
    outside.mkdir()
    command = Path(sys.executable).with_name("evoforge")
    env = {**os.environ, "EVOFORGE_RUNS": str(runs_root), "PYTHONSAFEPATH": "1"}
    env.pop("PYTHONPATH", None)
    done = subprocess.run([str(command), "stage", "finetune", "--run", run, "--round", "0", "--config", str(path)],
                          cwd=outside, env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = {r["role"]: r for r in lake().read(run, "checkpoints", 0, "finetune").to_pylist()}
    assert rows["policy"]["method"] == methods and rows["policy"]["steps"] == 6  # one step of each method, in order
    assert rows["ppm"]["steps"] == 1
    metrics = lake().read(run, "train_metrics", 0, "finetune").to_pylist()
    policy = [m for m in metrics if m["checkpoint_id"] == rows["policy"]["checkpoint_id"]]
    losses = sorted((m["step"], m["metric"]) for m in policy if m["metric"].endswith("/loss"))
    assert losses == [(i + 1, f"{method}/loss") for i, method in enumerate(methods.split("+"))]  # a metric per method
    # RARO's step: rewarded by the model's own critic, which the broken import never reached from this command
    assert {m["metric"] for m in policy if m["step"] == 5} >= {"raro/rewards/raro/mean", "raro/raro/critic_rows_unparseable"}
