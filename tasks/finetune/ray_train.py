"""Training across machines on the Ray cluster evoforge already uses (`finetune.launcher: ray`): Ray Train's
TorchTrainer starts `finetune.processes` workers wherever the cluster has room (one per GPU, or one per CPU
here), sets up torch.distributed between them (NCCL on GPUs, gloo on CPUs), and each runs the same
`train_in_process` that an accelerate-launched process runs. The scheduler is Ray's, not evoforge's.

    python -m evoforge.tasks.finetune.ray_train <job.json>

is what launch.py starts (the Ray driver in a process of its own, supervised like accelerate's: its output
to the log file, evoforge's marked lines to the flow run, killed on cancel; a driver that dies ends its Ray
job and with it the workers). Workers' output reaches the driver (`log_to_driver`), prefixed by Ray, and
the launcher finds evoforge's marked lines in it.

Rank 0 writes the checkpoint into the job's output folder on its own machine: across machines that folder
must be on storage every machine sees (the project home on NFS), which `launcher: ray` checks after
training; the lake itself can be anywhere (on S3 the finetune stage uploads the checkpoint as usual).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def train_loop(loop_config: dict) -> dict | None:
    """One Ray Train worker: Ray has set RANK, WORLD_SIZE, MASTER_ADDR and the process group."""
    import pyarrow as pa

    from evoforge.data import home

    home.configure()
    from evoforge.tasks.finetune import worker

    rank = int(os.environ.get("RANK", "0"))
    worker._configure_logging(rank)
    data = {method: pa.ipc.open_stream(blob).read_all() for method, blob in loop_config["data"].items()}
    result = worker.run_job(loop_config["job"], data)
    return result if rank == 0 else None  # rank 0's return value is the fit's Result.return_value


def main(job_path: str) -> int:
    from evoforge.data.children import die_with_parent

    die_with_parent()
    from evoforge.data import home

    home.configure()
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # v2's print patch floods the log with bytecode
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from evoforge.data.atomic import write_text
    from evoforge.models.ray_cluster import connect, worker_env

    job_file = Path(job_path)
    job = json.loads(job_file.read_text())
    config = job["config"]
    connect(config.get("ray_address"), log_to_driver=True)
    data = {}
    for method in job["methods"]:
        table = pq.read_table(job_file.parent / f"{method}.parquet")
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        data[method] = sink.getvalue().to_pybytes()
    gpu = torch.cuda.is_available()
    trainer = TorchTrainer(
        train_loop_per_worker=train_loop,
        train_loop_config={"job": job, "data": data},
        scaling_config=ScalingConfig(num_workers=config["processes"], use_gpu=gpu,
                                     resources_per_worker=None if gpu else {"CPU": 1}),
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        # Ray's own records of the run (no checkpoints go through Ray: the trainers keep theirs in the staging folder)
        run_config=RunConfig(name=Path(job["output_dir"]).name, storage_path=str(home.home() / ".tmp" / "ray-train"),
                             worker_runtime_env={"env_vars": worker_env()}),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    if not Path(job["output_dir"]).exists():
        raise RuntimeError(f"rank 0 wrote the checkpoint on another machine: with launcher ray across machines, "
                           f"{Path(job['output_dir']).parent} must be on storage every machine sees (EVOFORGE_HOME on NFS)")
    write_text(Path(job["result"]), json.dumps(result.return_value))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
