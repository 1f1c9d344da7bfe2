"""The process preference model (rStar-Math): the policy with a scalar head, trained by TRL's
RewardTrainer on the round's step pairs (`pairs` of kind 'step') with the pairwise loss
-log sigmoid(r_chosen - r_rejected). models/ppm.py scores steps with it in later rounds."""
from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc

from evoforge.tasks.arrow_datasets import arrow_dataset
from evoforge.tasks.finetune.trainer_args import build_arguments

if TYPE_CHECKING:
    from evoforge.tasks.finetune.config import FinetuneConfig
    from evoforge.tasks.finetune.rows import RoundInputs

TABLE = "pairs"
ROW_WISE = True  # training_rows and dataset act on each row of TABLE alone: an export streams them
ROWS_CHOSEN_BY = ("kind",)  # the columns training_rows reads to keep a row (its step pairs): an export counts by them


def training_rows(inputs: RoundInputs, config: FinetuneConfig) -> pa.Table:
    """The pairs stage's step pairs of this round: Q-ranked sibling steps of the MCTS tree."""
    pairs = inputs.stage_output("pairs", "pairs")
    return pairs.filter(pc.equal(pairs["kind"], "step"))


def arguments(config: FinetuneConfig, output_dir, run_name: str | None = None):
    return build_arguments("ppm", config, output_dir, run_name, max_length=config.max_length)


def load_model(path, dtype, tokenizer):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def dataset(pairs: pa.Table, config: FinetuneConfig, context):
    """TRL reward-model format, plain text: the problem and the solution so far as the prompt, each
    candidate step as a completion. The PPM scores a step in its context. All Arrow: the prompt is
    `prompt + "\n\n" + (prefix or "")` (a missing prompt stays missing), the steps are the pairs' columns."""
    rows = pairs.filter(pc.equal(pairs["kind"], "step"))
    return arrow_dataset(pa.table({
        "prompt": pc.binary_join_element_wise(rows["prompt"], pc.fill_null(rows["prefix"], ""), "\n\n"),
        "chosen": rows["chosen"],
        "rejected": rows["rejected"],
    }))


@contextmanager
def trainer(trainer_kwargs: dict, context, config: FinetuneConfig):
    from trl import RewardTrainer

    yield RewardTrainer(**trainer_kwargs)
