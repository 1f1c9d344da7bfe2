"""DPO on the round's solution pairs (`pairs` of kind 'solution'): a correct and a wrong answer to one problem."""
from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from evoforge.data.section import Section
from evoforge.tasks.arrow_datasets import arrow_dataset, assistant_turn, messages_column
from evoforge.tasks.finetune.trainer_args import build_arguments

if TYPE_CHECKING:
    from evoforge.tasks.finetune.config import FinetuneConfig
    from evoforge.tasks.finetune.rows import RoundInputs

TABLE = "pairs"
ROW_WISE = True  # training_rows and dataset act on each row of TABLE alone: an export streams them
ROWS_CHOSEN_BY = ("kind",)  # the columns training_rows reads to keep a row (its solution pairs): an export counts by them


class DpoConfig(Section):
    """`finetune.dpo`: DPO's own settings (TRL's DPOConfig; any other field through `trainer_args`)."""
    beta: float = Field(0.1, gt=0, description="how far the policy may move from the reference (DPO's beta)")


def training_rows(inputs: RoundInputs, config: FinetuneConfig) -> pa.Table:
    """The pairs stage's solution pairs of this round (a correct and a wrong answer to one problem)."""
    pairs = inputs.round_table("pairs", "pairs")
    return pairs.filter(pc.equal(pairs["kind"], "solution"))


def arguments(config: FinetuneConfig, output_dir, run_name: str | None = None):
    return build_arguments("dpo", config, output_dir, run_name, beta=config.dpo.beta, max_length=config.max_length)


def dataset(pairs: pa.Table, config: FinetuneConfig, context):
    """TRL conversational preference format: prompt messages, chosen and rejected assistant turns, built in
    Arrow (tasks/arrow_datasets.py `messages_column`)."""
    from evoforge.models.prompts import solve_messages

    rows = pairs.filter(pc.equal(pairs["kind"], "solution"))
    return arrow_dataset(pa.table({
        "prompt": messages_column(lambda question: solve_messages(question, config.few_shot), question=rows["prompt"]),
        "chosen": assistant_turn(rows["chosen"]),
        "rejected": assistant_turn(rows["rejected"]),
    }))


@contextmanager
def trainer(trainer_kwargs: dict, context, config: FinetuneConfig):
    from trl import DPOTrainer

    yield DPOTrainer(**trainer_kwargs)
