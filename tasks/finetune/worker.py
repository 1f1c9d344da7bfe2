"""One training process: `python -m evoforge.tasks.finetune.worker <job.json>`, as `accelerate launch`
starts it (launch.py writes the job). Every process of the job runs the same code (training.py
`train_in_process`); rank 0 writes the checkpoint and the result.

What reaches the terminal and the flow run: the lines evoforge's logger writes on rank 0, each printed
as one marked JSON line that the launcher forwards. Everything else (the trainers, torch, other ranks)
goes only to the log file the launcher writes.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path


class MarkedLines(logging.Handler):
    """evoforge's records as `@evoforge {"level", "message", "progress"}` lines on stdout, for the launcher."""

    def emit(self, record: logging.LogRecord) -> None:
        from evoforge.tasks.finetune.launch import MARKER

        try:
            payload = {"level": record.levelno, "message": record.getMessage()}
            if getattr(record, "progress", None):
                payload["progress"] = record.progress
            sys.stdout.write(MARKER + json.dumps(payload) + "\n")
            sys.stdout.flush()
        except Exception:
            self.handleError(record)


def _configure_logging(rank: int) -> None:
    # training's imports first: a library that configures logging as it is imported must not undo what follows.
    # Prefect is not among them (tasks/ does not import it), so no Prefect run logger is looked up here either
    import evoforge.tasks.finetune.training  # noqa: F401

    own = logging.getLogger("evoforge")
    own.handlers.clear()  # any handler a library gave it: the launcher is this process's terminal
    own.setLevel(logging.INFO)
    own.propagate = False
    if rank == 0:
        own.addHandler(MarkedLines())
    else:  # the other ranks say the same things: into the log file only, tagged
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"[rank {rank}] %(levelname)s %(message)s"))
        own.addHandler(handler)


def run_job(job: dict, data: dict) -> dict:
    """Train the job (launch.py `write_job`) in this process, one of the job's processes."""
    from evoforge.tasks.critic import CriticConfig
    from evoforge.tasks.finetune.config import FinetuneConfig
    from evoforge.tasks.finetune.training import TrackerRun, TrainingContext, train_in_process
    from evoforge.tasks.verify import VerifyConfig

    context = TrainingContext(verify=VerifyConfig.model_validate(job["context"]["verify"]),
                              critic=CriticConfig.model_validate(job["context"]["critic"]))
    tracker = TrackerRun(**job["tracker"]) if job["tracker"] else None
    return train_in_process(job["model_path"], data, FinetuneConfig.model_validate(job["config"]), Path(job["output_dir"]),
                            context, tracker, job["base_model"], job["methods"])


def main(job_path: str) -> int:
    from evoforge.data.children import die_with_parent

    die_with_parent()  # the launcher (accelerate, torchrun) dying takes this trainer with it
    from evoforge.data import home

    home.configure()
    import pyarrow.parquet as pq

    from evoforge.data.atomic import write_text

    rank = int(os.environ.get("RANK", "0"))
    _configure_logging(rank)
    job_file = Path(job_path)
    job = json.loads(job_file.read_text())
    data = {method: pq.read_table(job_file.parent / f"{method}.parquet") for method in job["methods"]}
    result = run_job(job, data)
    if rank == 0:
        write_text(Path(job["result"]), json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
