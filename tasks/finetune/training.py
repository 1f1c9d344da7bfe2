"""The one train-and-publish path every method shares.

Train from `model_path` with each method of a chain in turn (each starts from the previous one's
weights) and publish the result as a checkpoint folder. The work happens in a staging folder beside
the output, `.<name>.staging`, so a crash leaves no half checkpoint, and a run killed mid-training
resumes from it: finished methods are not trained again, and the running one restarts from its last
saved trainer state (every `checkpoint_steps`). The finished folder is committed atomically.
The collapse guard (guard.py, `config.guard`) holds some of each method's rows out of training and
stops the method early when the policy collapses on them; a phase it stopped keeps the reason beside
its metrics (`stopped.json`), so a resumed chain still reports it.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
from prefect import task
from prefect.cache_policies import NO_CACHE

from evoforge.data.atomic import atomic_path, commit
from evoforge.tasks.critic import CriticConfig
from evoforge.tasks.finetune import dpo, grpo, ppm, raro, sft, traces
from evoforge.tasks.finetune.config import FinetuneConfig
from evoforge.tasks.progress import flow_run_logger
from evoforge.tasks.verify import VerifyConfig

METHOD_MODULES = {"sft": sft, "dpo": dpo, "grpo": grpo, "traces": traces, "raro": raro, "ppm": ppm}
# which lake table each method's rows come from (the finetune flow selects them)
METHOD_TABLES = {name: module.TABLE for name, module in METHOD_MODULES.items()}
STOPPED = "stopped.json"  # beside a finished phase's metrics.json when the collapse guard stopped it early


@dataclass
class TrainingContext:
    """What a method's reward needs besides its rows: the grader's settings (grpo) and the critic's (raro)."""
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)


def _causal_lm(path, dtype, tokenizer):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)


def _step_metrics(log_history: list[dict], method: str, steps_before: int) -> list[dict]:
    """The numeric entries of each logged step, and of each collapse guard measurement (guard.py), numbered
    across the chain."""
    from evoforge.tasks.finetune import guard  # imports transformers: only when training

    return [
        {"step": steps_before + int(entry["step"]), "method": method,
         **{k: float(v) for k, v in entry.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}}
        for entry in log_history if "loss" in entry or guard.LOSS_KEY in entry or guard.ENTROPY_KEY in entry
    ]


def _train(model_path: str, data: dict[str, pa.Table], methods: list[str], config: FinetuneConfig, output_dir: Path,
           context: TrainingContext, resume: bool) -> dict:
    import torch
    from transformers import AutoTokenizer, TrainerCallback

    from evoforge.tasks.finetune import guard

    for method in methods:
        rows = data.get(method)
        if rows is None or rows.num_rows == 0:
            raise ValueError(f"finetune ({method}): no training rows in {METHOD_TABLES[method]}")
    log = flow_run_logger()
    output_dir = Path(output_dir)
    staging = output_dir.parent / f".{output_dir.name}.staging"
    if not resume:
        shutil.rmtree(staging, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    load = getattr(METHOD_MODULES[methods[0]], "load_model", _causal_lm)
    model = load(model_path, dtype, tokenizer)
    metrics: list[dict] = []
    steps_before = 0
    stopped_early: str | None = None
    started = time.monotonic()
    for index, method in enumerate(methods):
        module = METHOD_MODULES[method]
        phase = f"{index}-{method}"
        finished = staging / f"finished-{phase}"
        if (finished / "metrics.json").exists():  # trained before a crash: take its weights, do not train again
            model = getattr(module, "load_model", _causal_lm)(finished, dtype, tokenizer)
            phase_metrics = json.loads((finished / "metrics.json").read_text())
            metrics += phase_metrics
            steps_before = max([steps_before, *(m["step"] for m in phase_metrics)])
            if (finished / STOPPED).exists():
                stopped_early = stopped_early or json.loads((finished / STOPPED).read_text())["stopped_early"]
            log.info(f"finetune {method}: finished before an interruption; resuming after it")
            continue

        class Log(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    extra = f" reward {logs['reward']:.3f}" if "reward" in logs else ""
                    log.info(f"finetune {method}: step {state.global_step}/{config.max_steps} loss {logs['loss']:.4f}{extra}")

        trainer_dir = staging / f"trainer-{phase}"
        saved = sorted(trainer_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        if saved:
            log.info(f"finetune {method}: resuming from the trainer state saved at {saved[-1].name}")
        # the collapse guard's rows leave training (the same rows every time: a resumed trainer sees the same data)
        train_rows, held_out = guard.hold_out(module.dataset(data[method], config, context), method, config, log)
        collapse = guard.CollapseGuard(tokenizer, held_out, method, config, log) if held_out is not None else None
        if collapse is not None:
            log.info(f"finetune {method}: collapse guard on {len(held_out)} held-out rows every "
                     f"{config.guard.eval_steps} steps; training on {len(train_rows)}")
        trainer_kwargs = dict(model=model, args=module.arguments(config, trainer_dir), train_dataset=train_rows,
                              processing_class=tokenizer, callbacks=[Log(), *([collapse] if collapse else [])])
        with module.trainer(trainer_kwargs, context) as trainer:
            result = trainer.train(resume_from_checkpoint=str(saved[-1]) if saved else None)
        model = trainer.model
        # from the trainer's own history, which a resumed trainer restores, so no step's log is lost
        phase_metrics = _step_metrics(trainer.state.log_history, method, steps_before)
        stopped = f"{method}: {collapse.stopped}" if collapse is not None and collapse.stopped else None
        if stopped:
            log.warning(f"finetune {method}: stopped early by the collapse guard after {result.global_step} of "
                        f"{config.max_steps} steps: {collapse.stopped}")
        with atomic_path(finished) as building:  # the phase's weights and metrics appear together: it is done
            model.save_pretrained(building, safe_serialization=True)
            (building / "metrics.json").write_text(json.dumps(phase_metrics))
            if stopped:
                (building / STOPPED).write_text(json.dumps({"stopped_early": stopped}))
        metrics += phase_metrics
        stopped_early = stopped_early or stopped
        steps_before += int(result.global_step)
        shutil.rmtree(trainer_dir, ignore_errors=True)
    wall = time.monotonic() - started
    for path in staging.glob("*"):  # only the final weights and tokenizer go into the checkpoint
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    commit(staging, output_dir)
    losses = [m["loss"] for m in metrics if "loss" in m]  # the guard's entries carry no training loss
    return {
        "steps": steps_before,
        "final_loss": losses[-1] if losses else float("nan"),
        "wall_seconds": wall,
        "metrics": metrics,
        "stopped_early": stopped_early,
    }


@task(name="finetune", cache_policy=NO_CACHE, persist_result=False)
def train_policy(model_path: str, data: dict[str, pa.Table], config: FinetuneConfig, output_dir: Path,
                 context: TrainingContext | None = None, resume: bool = True) -> dict:
    """The policy trained with each method of `config.method` in turn, saved in `output_dir`.

    `data` maps each method to its rows (METHOD_TABLES names their table; raro's are
    tasks/critic.py `RARO_ROWS`). Returns {"steps", "final_loss", "wall_seconds", "metrics":
    [{"step", "method", "loss", ...}], "stopped_early"}; steps count across the chain (a method the
    collapse guard stopped counts the steps it ran). `config.guard` (guard.py) holds rows out of each
    method's data and adds its measurements to the metrics ({"step", "method", "guard_loss",
    "guard_entropy"}); "stopped_early" is why it stopped the first method it stopped ("sft: held-out
    loss ..."), or None.
    """
    return _train(model_path, data, config.methods, config, output_dir, context or TrainingContext(), resume)


@task(name="train_ppm", cache_policy=NO_CACHE, persist_result=False)
def train_ppm(model_path: str, step_pairs: pa.Table, config: FinetuneConfig, output_dir: Path,
              resume: bool = True) -> dict:
    """The process preference model from the policy at `model_path` on step pairs (see ppm.py); same
    return value as `train_policy`."""
    return _train(model_path, {"ppm": step_pairs}, ["ppm"], config, output_dir, TrainingContext(), resume)
