"""The finetune stage's training processes: started with `accelerate launch`, watched, and stopped.

The stage's own process (a Prefect task) never trains. It writes the job (each method's rows as
Parquet, the settings as JSON) beside the checkpoint (`.<checkpoint>.job/`), starts

    accelerate launch --config_file deploy/accelerate/<recipe>.yaml --num_processes N \
        -m evoforge.tasks.finetune.worker .<checkpoint>.job/job.json

and reads the children's output line by line: every line goes to the log file
(`<home>/logs/finetune/<checkpoint>.log`), the lines evoforge's own logger wrote on rank 0 (marked,
see worker.py) go on to the flow run's log, and their step counts drive a progress bar. A child that
fails becomes one error line naming the log; a stage that is interrupted (Ctrl-C, Prefect's
cancellation, an exception) kills the whole process group; a stage killed outright (`kill -9`) takes
its trainers with it, because each of them asked the kernel to kill it when its parent dies
(PR_SET_PDEATHSIG), so no trainer is left holding a GPU. The next attempt resumes from the trainer's
own checkpoints in the staging folder.

On a CPU the same recipe runs DDP over gloo, one core per process (accelerate's `--multi_gpu`
launcher is torchrun, which does not need a GPU; the trainers are told `use_cpu`).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from evoforge.data import home
from evoforge.data.children import dies_with_this_process
from evoforge.data.home import PROJECT_ROOT
from evoforge.tasks.finetune.config import FinetuneConfig
from evoforge.tasks.finetune.training import TrackerRun, TrainingContext, check_rows, staging_folder
from evoforge.tasks.progress import Progress, flow_run_logger

MARKER = "@evoforge "  # a line evoforge's logger wrote in a training process: JSON, forwarded to the flow run
RECIPES = PROJECT_ROOT / "deploy" / "accelerate"


class TrainingFailed(RuntimeError):
    pass


def recipe_path(name_or_path: str) -> Path:
    """deploy/accelerate/<name>.yaml for a shipped recipe's name, else the path of a user's accelerate config."""
    shipped = RECIPES / f"{name_or_path}.yaml"
    path = shipped if shipped.exists() else Path(name_or_path).expanduser()
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in RECIPES.glob("*.yaml")))
        raise ValueError(f"finetune.accelerate_config: {name_or_path!r} is neither a shipped recipe ({names}) nor a file")
    return path


def launch_command(config: FinetuneConfig, job: Path) -> list[str]:
    import torch

    if config.launcher == "ray":
        return [sys.executable, "-m", "evoforge.tasks.finetune.ray_train", str(job)]

    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(recipe_path(config.accelerate_config)),
               "--num_processes", str(config.processes), "--num_machines", "1"]
    if config.processes > 1 and not torch.cuda.is_available():
        # torchrun starts the processes; DDP over gloo; each trainer is told use_cpu (trainer_args.py)
        command += ["--multi_gpu", "--main_process_port", str(_free_port())]
    elif not torch.cuda.is_available():
        command += ["--cpu", "--num_cpu_threads_per_process", str(len(os.sched_getaffinity(0)))]
    return command + ["-m", "evoforge.tasks.finetune.worker", str(job)]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_job(job_dir: Path, model_path: str, data: dict[str, pa.Table], config: FinetuneConfig, output_dir: Path,
              context, tracker, base_model: dict | None, methods: list[str]) -> Path:
    """The job a training process reads: the rows of each method as Parquet, everything else as JSON."""
    from dataclasses import asdict

    job_dir.mkdir(parents=True, exist_ok=True)
    for method, table in data.items():
        pq.write_table(table, job_dir / f"{method}.parquet")
    spec = dict(model_path=str(model_path), methods=methods, output_dir=str(output_dir),
                config=config.model_dump(mode="json"),
                context={"verify": context.verify.model_dump(mode="json"), "critic": context.critic.model_dump(mode="json")},
                tracker=asdict(tracker) if tracker is not None else None, base_model=base_model,
                result=str(job_dir / "result.json"))
    path = job_dir / "job.json"
    path.write_text(json.dumps(spec, indent=1))
    return path


def log_path_for(output_dir: Path) -> Path:
    return home.home() / "logs" / "finetune" / f"{Path(output_dir).name}.log"


def launch_training(model_path: str, data: dict[str, pa.Table], config: FinetuneConfig, output_dir: Path, context,
                    resume: bool, tracker, base_model: dict | None, methods: list[str], log_path: Path | None = None) -> dict:
    """Train in `config.processes` processes started by accelerate (or Ray Train); returns the result rank 0
    wrote (training.py `train_in_process`), with "processes" added."""
    import shutil

    check_rows(data, methods)  # before any process starts: one line, nothing written
    if not resume:
        shutil.rmtree(staging_folder(output_dir), ignore_errors=True)
    job_dir = output_dir.parent / f".{output_dir.name}.job"
    shutil.rmtree(job_dir, ignore_errors=True)  # the job is written afresh each attempt; the trainer's state is kept
    job = write_job(job_dir, model_path, data, config, output_dir, context, tracker, base_model, methods)
    log_path = log_path or log_path_for(output_dir)
    command = launch_command(config, job)
    started = time.monotonic()
    returncode = run_supervised(command, log_path, f"{Path(output_dir).name} ({'+'.join(methods)}, "
                                                   f"{config.processes} process{'es' if config.processes > 1 else ''})")
    if returncode != 0:
        raise TrainingFailed(f"finetune: the training processes failed (exit {returncode}): "
                             f"{_last_error(log_path)}; log: {log_path}")
    result = json.loads((job_dir / "result.json").read_text())
    shutil.rmtree(job_dir, ignore_errors=True)
    result["processes"] = config.processes
    result["launch_seconds"] = time.monotonic() - started
    return result


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"  # lines reach the log as they are written
    env.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)))))
    # OpenMP threads that spin while waiting starve the other processes of a busy CPU: a colocated vLLM's
    # generate took 9-10 s spinning and 0.5 s passive beside other work on 2 cores
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # the trainers log to the file; TRL and transformers need not tell the terminal about progress bars
    env.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    env.pop("EVOFORGE_TRACEBACK", None)
    return env


def run_supervised(command: list[str], log_path: Path, what: str) -> int:
    """Run `command` in a process group of its own, its output to `log_path` and evoforge's marked lines
    to the flow run; kill the group if this stage is interrupted. Returns the exit code."""
    log = flow_run_logger()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", buffering=1) as sink:
        sink.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {what}: {' '.join(command)}\n")
        log.info(f"finetune: training {what}; log: {log_path}")
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=_environment(), cwd=str(home.home()), start_new_session=True,
                                   preexec_fn=dies_with_this_process(), text=True, errors="replace", bufsize=1)
        bars: dict[str, Progress] = {}
        try:
            for line in process.stdout:
                sink.write(line)
                marked = line.find(MARKER)  # at the start; after Ray's "(RayTrainWorker pid=...)" prefix
                if marked >= 0:
                    _forward(line[marked + len(MARKER):], log, bars)
            return process.wait()
        except BaseException:
            stop_group(process)
            raise
        finally:
            for bar in bars.values():
                bar.close()
            if process.poll() is None:
                stop_group(process)


def _forward(payload: str, log, bars: dict[str, Progress]) -> None:
    try:
        record = json.loads(payload)
    except ValueError:
        return
    progress = record.get("progress")
    if progress:  # the step lines drive a bar; the bar logs its own throttled line
        bar = bars.get(progress["label"])
        if bar is None:
            bar = bars[progress["label"]] = Progress(progress["label"], int(progress["total"]), "steps")
        bar.update(int(progress["done"]), f" ({record['message'].split(': ', 1)[-1]})")
        return
    log.log(int(record.get("level", 20)), record["message"])


def stop_group(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM to the training processes' group, SIGKILL past the grace: none is left holding a GPU."""
    def signal_group(signum: int) -> bool:
        try:
            os.killpg(process.pid, signum)
            return True
        except ProcessLookupError:
            return False

    if not signal_group(signal.SIGTERM):
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if process.poll() is not None and not signal_group(0):
            return
        time.sleep(0.1)
    signal_group(signal.SIGKILL)
    process.wait()


# what accelerate prints after a training process failed: torchrun's summary (N > 1), or, for one process,
# its own subprocess.run's; the child's exception is further up
LAUNCHER_ERRORS = ("ChildFailedError", "CalledProcessError")


def _last_error(log_path: Path) -> str:
    """The most telling line of a failed attempt: the last exception line of the log's last attempt."""
    lines = deque(maxlen=400)
    with open(log_path, errors="replace") as fh:
        for line in fh:
            if line.startswith("=== "):
                lines.clear()
            lines.append(line.rstrip())
    for line in reversed(lines):
        text = line.split("]: ", 1)[-1] if line.startswith("[rank") else line  # torchrun tags a rank's lines
        head = text.split(":", 1)[0]
        if head.endswith(("Error", "Exception", "Interrupt")) and " " not in head.strip() \
                and not head.endswith(LAUNCHER_ERRORS):
            return text[:400]  # the trainer's own exception, not the launcher's report that a child failed
    return next((line for line in reversed(lines) if line.strip()), "no output")[:400]


def train_policy(model_path: str, data: dict[str, pa.Table], config: FinetuneConfig, output_dir: Path,
                 context: TrainingContext | None = None, resume: bool = True, tracker: TrackerRun | None = None,
                 base_model: dict | None = None, log_path: Path | None = None) -> dict:
    """The policy trained with each method of `config.method` in turn, saved in `output_dir`, by
    `config.processes` training processes that launch.py starts with accelerate.

    `data` maps each method to its rows (METHOD_TABLES names their table; raro's are
    tasks/critic.py `RARO_ROWS`). Returns {"steps", "final_loss", "wall_seconds", "metrics":
    [{"step", "method", "loss", ...}], "stopped_early", "processes"}; steps count across the chain (a
    method the collapse guard stopped counts the steps it ran). `config.guard` (guard.py) holds rows out
    of each method's data and adds its measurements to the metrics ({"step", "method", "guard_loss",
    "guard_entropy"}); "stopped_early" is why it stopped the first method it stopped ("sft: held-out
    loss ..."), or None. `resume=False` starts over, discarding what an interrupted attempt saved.
    `log_path`: the training processes' whole output (default: <home>/logs/finetune/<checkpoint>.log).
    """
    return launch_training(model_path, data, config, Path(output_dir), context or TrainingContext(), resume, tracker,
                           base_model, config.methods, log_path)


def train_ppm(model_path: str, step_pairs: pa.Table, config: FinetuneConfig, output_dir: Path,
              resume: bool = True, tracker: TrackerRun | None = None, log_path: Path | None = None) -> dict:
    """The process preference model from the policy at `model_path` on step pairs (see ppm.py), trained
    like the policy; same return value as `train_policy`. A PPM is always published as full weights
    (models/ppm.py scores with a plain folder), LoRA or not."""
    ppm_config = config if config.lora is None else config.model_copy(
        update={"lora": config.lora.model_copy(update={"merge": True})})
    return launch_training(model_path, {"ppm": step_pairs}, ppm_config, Path(output_dir), TrainingContext(), resume,
                           tracker, None, ["ppm"], log_path)
