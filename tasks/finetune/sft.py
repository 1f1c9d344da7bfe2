"""SFT (rejection-sampling fine-tuning): the round's correct solutions (`sft_examples`), loss on the
completion only, asked exactly as the generate stage asks."""
from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING

import pyarrow as pa

from evoforge.tasks.arrow_datasets import arrow_dataset, assistant_turn, messages_column
from evoforge.tasks.finetune.trainer_args import build_arguments

if TYPE_CHECKING:
    from evoforge.tasks.finetune.config import FinetuneConfig
    from evoforge.tasks.finetune.rows import RoundInputs

TABLE = "sft_examples"
ROW_WISE = True  # training_rows and dataset act on each row of TABLE alone: an export streams them
ROWS_CHOSEN_BY = ()  # the columns training_rows reads to keep a row (every row): an export counts by them


def training_rows(inputs: RoundInputs, config: FinetuneConfig) -> pa.Table:
    """The pairs stage's `sft_examples` of this round: a correct solution per problem, and the variants'."""
    return inputs.round_table("sft_examples", "pairs")


def arguments(config: FinetuneConfig, output_dir, run_name: str | None = None):
    return build_arguments("sft", config, output_dir, run_name, completion_only_loss=True, max_length=config.max_length)


def dataset(examples: pa.Table, config: FinetuneConfig, context):
    """TRL conversational prompt/completion format, so the loss covers the completion only. Built in Arrow
    (`messages_column`): the rows equal `[{"prompt": solve_messages(r["prompt"]), "completion": [assistant
    turn]} for r in rows]`; the completions keep the table's buffers."""
    from evoforge.models.prompts import solve_messages

    return arrow_dataset(pa.table({
        "prompt": messages_column(lambda question: solve_messages(question, config.few_shot), question=examples["prompt"]),
        "completion": assistant_turn(examples["completion"]),
    }))


@contextmanager
def trainer(trainer_kwargs: dict, context, config: FinetuneConfig):
    from trl import SFTTrainer

    yield SFTTrainer(**trainer_kwargs)
