"""SFT on MCTS traces (rStar-Math): the step-format prompt, the whole traced solution (`traces`) as
the completion. Trained exactly like SFT; only the data differs."""
from __future__ import annotations

from typing import TYPE_CHECKING

import pyarrow as pa

from evoforge.tasks.arrow_datasets import arrow_dataset, assistant_turn, messages_column
from evoforge.tasks.finetune.sft import arguments, trainer  # noqa: F401  (the SFT trainer, on traces)

if TYPE_CHECKING:
    from evoforge.tasks.finetune.config import FinetuneConfig
    from evoforge.tasks.finetune.rows import RoundInputs

TABLE = "traces"
ROW_WISE = True  # training_rows and dataset act on each row of TABLE alone: an export streams them
ROWS_CHOSEN_BY = ()  # the columns training_rows reads to keep a row (every row): an export counts by them


def training_rows(inputs: RoundInputs, config: FinetuneConfig) -> pa.Table:
    """The traces this round's MCTS kept (its own rows only: no later stage adds any)."""
    return inputs.stage_output("traces", "mcts")


def dataset(traces: pa.Table, config: FinetuneConfig, context):
    """SFT's conversational prompt/completion format with the step-format prompt, built in Arrow
    (tasks/arrow_datasets.py `messages_column`)."""
    from evoforge.models.prompts import step_messages

    return arrow_dataset(pa.table({"prompt": messages_column(step_messages, question=traces["prompt"]),
                                   "completion": assistant_turn(traces["completion"])}))
