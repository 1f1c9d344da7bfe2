"""SFT (rejection-sampling fine-tuning): the round's correct solutions (`sft_examples`), loss on the
completion only, asked exactly as the generate stage asks."""
from __future__ import annotations

from contextlib import contextmanager

import pyarrow as pa

from evoforge.tasks.finetune.config import FinetuneConfig, common_arguments

TABLE = "sft_examples"


def arguments(config: FinetuneConfig, output_dir):
    from trl import SFTConfig

    return SFTConfig(completion_only_loss=True, max_length=config.max_length, **common_arguments(config, output_dir))


def dataset(examples: pa.Table, config: FinetuneConfig, context):
    """TRL conversational prompt/completion format, so the loss covers the completion only."""
    import datasets

    from evoforge.models.prompts import solve_messages

    return datasets.Dataset.from_list([
        {"prompt": solve_messages(r["prompt"], config.few_shot),
         "completion": [{"role": "assistant", "content": r["completion"]}]}
        for r in examples.to_pylist()
    ])


@contextmanager
def trainer(trainer_kwargs: dict, context):
    from trl import SFTTrainer

    yield SFTTrainer(**trainer_kwargs)
