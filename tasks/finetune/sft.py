"""SFT (rejection-sampling fine-tuning): the round's correct solutions (`sft_examples`), loss on the
completion only, asked exactly as the generate stage asks."""
from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING

import pyarrow as pa

from evoforge.tasks.finetune.trainer_args import build_arguments

if TYPE_CHECKING:
    from evoforge.tasks.finetune.config import FinetuneConfig
    from evoforge.tasks.finetune.rows import RoundInputs

TABLE = "sft_examples"


def training_rows(inputs: RoundInputs, config: FinetuneConfig) -> pa.Table:
    """The pairs stage's `sft_examples` of this round: a correct solution per problem, and the variants'."""
    return inputs.round_table("sft_examples", "pairs")


def arguments(config: FinetuneConfig, output_dir, run_name: str | None = None):
    return build_arguments("sft", config, output_dir, run_name, completion_only_loss=True, max_length=config.max_length)


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
def trainer(trainer_kwargs: dict, context, config: FinetuneConfig):
    from trl import SFTTrainer

    yield SFTTrainer(**trainer_kwargs)
