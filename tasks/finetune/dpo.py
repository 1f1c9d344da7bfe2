"""DPO on the round's solution pairs (`pairs` of kind 'solution'): a correct and a wrong answer to one problem."""
from __future__ import annotations

from contextlib import contextmanager

import pyarrow as pa
import pyarrow.compute as pc

from evoforge.tasks.finetune.config import FinetuneConfig
from evoforge.tasks.finetune.trainer_args import build_arguments

TABLE = "pairs"


def arguments(config: FinetuneConfig, output_dir, run_name: str | None = None):
    return build_arguments("dpo", config, output_dir, run_name, beta=config.dpo_beta, max_length=config.max_length)


def dataset(pairs: pa.Table, config: FinetuneConfig, context):
    """TRL conversational preference format: prompt messages, chosen and rejected assistant turns."""
    import datasets

    from evoforge.models.prompts import solve_messages

    rows = pairs.filter(pc.equal(pairs["kind"], "solution")).to_pylist()
    return datasets.Dataset.from_list([
        {"prompt": solve_messages(r["prompt"], config.few_shot),
         "chosen": [{"role": "assistant", "content": r["chosen"]}],
         "rejected": [{"role": "assistant", "content": r["rejected"]}]}
        for r in rows
    ])


@contextmanager
def trainer(trainer_kwargs: dict, context, config: FinetuneConfig):
    from trl import DPOTrainer

    yield DPOTrainer(**trainer_kwargs)
