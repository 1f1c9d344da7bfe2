"""Experiment tracking: the trackers are transformers' own (`report_to`); evoforge names the run by the
checkpoint id, points TensorBoard's event files under the run in the lake, and adds the round config
to each tracker's run as its parameters.

- tensorboard (the default: no account, no server): event files in runs/<run>/tracking/<checkpoint>/
  (a chain: one sub-folder per method); `tensorboard --logdir runs/<run>/tracking` shows every
  checkpoint of the run, each named by its id. The round config is the text entry `round_config`.
- mlflow, wandb, trackio: configured by their own environment variables (MLFLOW_TRACKING_URI,
  MLFLOW_EXPERIMENT_NAME; WANDB_PROJECT, WANDB_MODE, WANDB_API_KEY; TRACKIO_PROJECT...), as those
  libraries document; the run is named by the checkpoint id and the round config goes to its params.
"""
from __future__ import annotations

import json

from transformers import TrainerCallback


def flatten(params: dict, prefix: str = "") -> dict[str, str | int | float | bool]:
    """{"finetune": {"lora": {"r": 8}}} -> {"finetune.lora.r": 8}; lists and None as JSON text."""
    flat: dict = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, (str, int, float, bool)):
            flat[name] = value
        else:
            flat[name] = json.dumps(value)
    return flat


class RoundConfigToTrackers(TrainerCallback):
    """At train begin (after the trackers' own callbacks opened their run), the round config as the run's
    parameters: TensorBoard gets it as YAML text, MLflow as params, W&B as config."""

    def __init__(self, params: dict):
        self.params = params
        self.handler = None  # the trainer's callback handler (`bind`): transformers hands a callback no other callbacks

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        import yaml
        from transformers.integrations import MLflowCallback, TensorBoardCallback, WandbCallback

        for callback in self.handler.callbacks if self.handler is not None else []:
            if isinstance(callback, TensorBoardCallback) and callback.tb_writer is not None:
                text = yaml.safe_dump(self.params, sort_keys=False)
                callback.tb_writer.add_text("round_config", f"```yaml\n{text}```", 0)
                callback.tb_writer.flush()
            elif isinstance(callback, MLflowCallback) and getattr(callback, "_initialized", False):
                flat = flatten(self.params)
                items = list(flat.items())
                for start in range(0, len(items), 100):  # MLflow takes at most 100 params a call
                    callback._ml_flow.log_params({f"round.{k}": str(v)[:500] for k, v in items[start:start + 100]})
            elif isinstance(callback, WandbCallback) and getattr(callback, "_initialized", False):
                callback._wandb.config.update({"round": self.params}, allow_val_change=True)


def bind(trainer) -> None:
    """Let each RoundConfigToTrackers of `trainer` see the trainer's other callbacks."""
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, RoundConfigToTrackers):
            callback.handler = trainer.callback_handler
