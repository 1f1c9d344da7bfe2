"""The one train-and-publish path every method shares, as it runs inside each training process.

The finetune stage does not train in its own process: launch.py's `train_policy` / `train_ppm`
(Prefect tasks) start `accelerate launch ... -m evoforge.tasks.finetune.worker` with
`finetune.processes` processes; each of them runs `train_in_process` below (DDP, FSDP or DeepSpeed
as the accelerate recipe says; one process is the same code with a world of one).

Train from `model_path` with each method of a chain in turn (each starts from the weights the
previous one saved) and publish the result as a checkpoint folder. The work happens in a staging
folder beside the output, `.<name>.staging`, so a crash leaves no half checkpoint, and a run killed
mid-training resumes from it: finished methods are not trained again, and the running one restarts
from its last saved trainer state (every `checkpoint_steps`). The finished folder is committed
atomically. With `finetune.lora` the trainers get PEFT's LoraConfig and the checkpoint is the merged
weights (`merge: true`) or the adapter alone with the base it loads on (adapters.py).
The collapse guard (guard.py, `config.guard`) holds some of each method's rows out of training and
stops the method early when the policy collapses on them; a phase it stopped keeps the reason beside
its metrics (`stopped.json`), so a resumed chain still reports it.
"""
from __future__ import annotations

import gc
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from evoforge.data.atomic import atomic_path
from evoforge.tasks.critic import CriticConfig
from evoforge.tasks.finetune import adapters, dpo, grpo, ppm, raro, sft, svs, traces
from evoforge.tasks.finetune.config import FinetuneConfig
from evoforge.tasks.progress import flow_run_logger
from evoforge.tasks.verify import VerifyConfig

METHOD_MODULES = {"sft": sft, "dpo": dpo, "grpo": grpo, "traces": traces, "raro": raro, "svs": svs, "ppm": ppm}
# which lake table each method's rows come from (the finetune flow selects them)
METHOD_TABLES = {name: module.TABLE for name, module in METHOD_MODULES.items()}
STOPPED = "stopped.json"  # beside a finished phase's metrics.json when the collapse guard stopped it early
# what trainer.save_model writes besides the model, which a checkpoint does not carry (a pickle of the
# arguments names the staging folder: it would change the weights' hash from one attempt to the next)
NOT_CHECKPOINT = ("training_args.bin", "metrics.json", STOPPED)
# rows a method's trainer writes besides the model, under its output folder: tables/<table>/step-<N>.parquet
# (svs: the variants it wrote); kept with a finished phase, returned as the result's "tables"
TABLES = "tables"


@dataclass
class TrainingContext:
    """What a method's reward needs besides its rows: the grader's settings (grpo) and the critic's (raro)."""
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)


@dataclass
class TrackerRun:
    """One tracker run per checkpoint: named by the checkpoint id, the round config as its parameters,
    TensorBoard's event files in `folder` (runs/<run>/tracking/<checkpoint_id>/ on a local lake)."""
    name: str
    folder: str | None = None
    params: dict = field(default_factory=dict)


def staging_folder(output_dir: Path) -> Path:
    output_dir = Path(output_dir)
    return output_dir.parent / f".{output_dir.name}.staging"


def check_rows(data: dict[str, pa.Table], methods: list[str]) -> None:
    for method in methods:
        rows = data.get(method)
        if rows is None or rows.num_rows == 0:
            raise ValueError(f"finetune ({method}): no training rows in {METHOD_TABLES[method]}")


def complete_checkpoints(trainer_dir: Path) -> list[Path]:
    """The trainer's saved states that a resume can load, oldest first. A process killed while the trainer saved
    leaves the newest one half written; the trainer writes its state file last (after the weights, optimizer and
    every rank's random state) and removes the older state only after it, so the last complete one is there."""
    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    needed = ["rng_state.pth"] if ranks == 1 else [f"rng_state_{rank}.pth" for rank in range(ranks)]
    complete = []
    for folder in trainer_dir.glob("checkpoint-*"):
        try:
            json.loads((folder / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue
        if all((folder / name).exists() for name in needed):
            complete.append(folder)
    return sorted(complete, key=lambda p: int(p.name.split("-")[1]))


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _wait_for_everyone() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _step_metrics(log_history: list[dict], method: str, steps_before: int) -> list[dict]:
    """The numeric entries of each logged step, and of each collapse guard measurement (guard.py), numbered
    across the chain."""
    from evoforge.tasks.finetune import guard  # imports transformers: only when training

    return [
        {"step": steps_before + int(entry["step"]), "method": method,
         **{k: float(v) for k, v in entry.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}}
        for entry in log_history if "loss" in entry or guard.LOSS_KEY in entry or guard.ENTROPY_KEY in entry
    ]


def _phase_callbacks(method: str, config: FinetuneConfig, tracker: TrackerRun | None, log):
    from transformers import TrainerCallback

    class Log(TrainerCallback):
        """One line per step on the terminal and in the flow run (the launcher forwards rank 0's lines), and the
        step count the launcher's progress bar follows."""

        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero:  # the bar starts here: its rate counts training, not loading
                log.info(f"finetune {method}: training from step {state.global_step}",
                         extra={"progress": {"label": f"finetune {method}", "done": state.global_step,
                                             "total": state.max_steps}})

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs and "loss" in logs:
                extra = f" reward {logs['reward']:.3f}" if "reward" in logs else ""
                log.info(f"finetune {method}: step {state.global_step}/{config.max_steps} loss {logs['loss']:.4f}{extra}",
                         extra={"progress": {"label": f"finetune {method}", "done": state.global_step,
                                             "total": state.max_steps}})

    callbacks = [Log()]
    if tracker is not None and tracker.params:
        from evoforge.tasks.finetune.tracking import RoundConfigToTrackers

        callbacks.append(RoundConfigToTrackers(tracker.params))
    return callbacks


def train_in_process(model_path: str, data: dict[str, pa.Table], config: FinetuneConfig, output_dir: Path,
                     context: TrainingContext | None = None, tracker: TrackerRun | None = None,
                     base_model: dict | None = None, methods: list[str] | None = None) -> dict:
    """The policy (or, with methods ["ppm"], the PPM) trained with each method of `config.method` in turn,
    saved in `output_dir`; run by every training process alike (rank 0 writes the files). `base_model`: what
    an adapter checkpoint records about the model it loads on ({"reference", "model_id"}), with `lora.merge:
    false`. Returns {"steps", "final_loss", "wall_seconds", "metrics": [{"step", "method", "loss", ...}],
    "stopped_early"}."""
    import torch

    from evoforge.tasks.finetune import guard

    methods = methods or config.methods
    context = context or TrainingContext()
    check_rows(data, methods)
    log = flow_run_logger()
    main = _rank() == 0
    output_dir = Path(output_dir)
    staging = staging_folder(output_dir)
    staging.mkdir(parents=True, exist_ok=True)
    tokenizer = adapters.load_tokenizer(model_path)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    metrics: list[dict] = []
    steps_before = 0
    stopped_early: str | None = None
    weights = model_path  # where the next phase starts from: the input model, then each finished phase
    merged = None  # the last phase's adapter merged into its model, when it could be merged in memory
    started = time.monotonic()
    for index, method in enumerate(methods):
        module = METHOD_MODULES[method]
        phase = f"{index}-{method}"
        finished = staging / f"finished-{phase}"
        if (finished / "metrics.json").exists():  # trained before a crash: take its weights, do not train again
            phase_metrics = json.loads((finished / "metrics.json").read_text())
            metrics += phase_metrics
            steps_before = max([steps_before, *(m["step"] for m in phase_metrics)])
            if (finished / STOPPED).exists():
                stopped_early = stopped_early or json.loads((finished / STOPPED).read_text())["stopped_early"]
            log.info(f"finetune {method}: finished before an interruption; resuming after it")
            weights = str(finished)
            continue

        trainer_dir = staging / f"trainer-{phase}"
        saved = complete_checkpoints(trainer_dir)
        if saved:
            log.info(f"finetune {method}: resuming from the trainer state saved at {saved[-1].name}")
            if main:
                _forget_tables_after(trainer_dir, int(saved[-1].name.split("-")[-1]))
        # the collapse guard's rows leave training (the same rows every time: a resumed trainer sees the same data)
        train_rows, held_out = guard.hold_out(module.dataset(data[method], config, context), method, config, log)
        collapse = guard.CollapseGuard(tokenizer, held_out, method, config, log) if held_out is not None else None
        if collapse is not None:
            log.info(f"finetune {method}: collapse guard on {len(held_out)} held-out rows every "
                     f"{config.guard.eval_steps} steps; training on {len(train_rows)}")
        model = adapters.load_for_training(module, weights, dtype, tokenizer, config.lora)
        phase_tracker = None
        if tracker is not None:
            phase_tracker = tracker if len(methods) == 1 else TrackerRun(f"{tracker.name}/{phase}", tracker.folder and
                                                                          f"{tracker.folder}/{phase}", tracker.params)
            if phase_tracker.folder:
                os.environ["TENSORBOARD_LOGGING_DIR"] = phase_tracker.folder
        trainer_kwargs = dict(model=model, args=module.arguments(config, trainer_dir, phase_tracker and phase_tracker.name),
                              train_dataset=train_rows, processing_class=tokenizer,
                              callbacks=[*_phase_callbacks(method, config, phase_tracker, log), *([collapse] if collapse else [])])
        peft_config = adapters.peft_config(config.lora, method, model)
        if peft_config is not None:
            trainer_kwargs["peft_config"] = peft_config
        with module.trainer(trainer_kwargs, context, config) as trainer:
            if phase_tracker is not None and phase_tracker.params:
                from evoforge.tasks.finetune.tracking import bind

                bind(trainer)
            result = trainer.train(resume_from_checkpoint=str(saved[-1]) if saved else None)
            # every process takes part (FSDP and ZeRO-3 gather the weights); rank 0 writes
            with atomic_path(finished) if main else _elsewhere(staging) as building:
                trainer.save_model(str(building))
                _wait_for_everyone()
                # from the trainer's own history, which a resumed trainer restores, so no step's log is lost
                phase_metrics = _step_metrics(trainer.state.log_history, method, steps_before)
                stopped = f"{method}: {collapse.stopped}" if collapse is not None and collapse.stopped else None
                if main:  # the phase's weights, metrics and tables appear together: it is done
                    (building / "metrics.json").write_text(json.dumps(phase_metrics))
                    if (trainer_dir / TABLES).is_dir():
                        shutil.copytree(trainer_dir / TABLES, building / TABLES)
                    if stopped:
                        (building / STOPPED).write_text(json.dumps({"stopped_early": stopped}))
            if main and index == len(methods) - 1 and config.lora is not None and config.lora.merge \
                    and not (trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled):
                # merged in place, while the weights are here and whole: publishing needs no second copy of the base
                merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
        _wait_for_everyone()
        if stopped:
            log.warning(f"finetune {method}: stopped early by the collapse guard after {result.global_step} of "
                        f"{config.max_steps} steps: {collapse.stopped}")
        metrics += phase_metrics
        stopped_early = stopped_early or stopped
        steps_before += int(result.global_step)
        weights = str(finished)
        del trainer, model, trainer_kwargs  # the next phase (or the merge) loads its own copy: free this one first
        gc.collect()
        if main:
            shutil.rmtree(trainer_dir, ignore_errors=True)
    wall = time.monotonic() - started
    if main:  # only the final weights and tokenizer go into the checkpoint
        with atomic_path(output_dir) as building:
            adapters.write_checkpoint(METHOD_MODULES[methods[-1]], Path(weights), building, config.lora, tokenizer,
                                      base_model, dtype, merged)
            for name in NOT_CHECKPOINT:
                (building / name).unlink(missing_ok=True)
            shutil.rmtree(building / TABLES, ignore_errors=True)
    _wait_for_everyone()
    losses = [m["loss"] for m in metrics if "loss" in m]  # the guard's entries carry no training loss
    tables = _phase_tables([staging / f"finished-{index}-{method}" for index, method in enumerate(methods)]) if main else {}
    if main:
        shutil.rmtree(staging)  # published, and its tables read: the trainer's state is spent
    return {
        "tables": tables,
        "steps": steps_before,
        "final_loss": losses[-1] if losses else float("nan"),
        "wall_seconds": wall,
        "metrics": metrics,
        "stopped_early": stopped_early,
    }


def _forget_tables_after(trainer_dir: Path, step: int) -> None:
    """A resumed phase trains its later steps again: the rows they wrote before the interruption go."""
    for path in (trainer_dir / TABLES).glob("*/step-*.parquet"):
        if int(path.stem.split("-")[1]) > step:
            path.unlink()


def _phase_tables(finished: list[Path]) -> dict[str, list[dict]]:
    """The rows the phases' trainers wrote besides the model (svs: its `variants`), by table, in step order."""
    import pyarrow.parquet as pq

    tables: dict[str, list[dict]] = {}
    for folder in finished:
        for path in sorted((folder / TABLES).glob("*/step-*.parquet")):
            tables.setdefault(path.parent.name, []).extend(pq.read_table(path).to_pylist())
    return tables


class _elsewhere:
    """Where a process other than rank 0 points trainer.save_model: it writes nothing there, but FSDP and
    ZeRO-3 need every process in the call."""

    def __init__(self, staging: Path):
        self.path = staging / f"rank-{_rank()}-unused"

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
