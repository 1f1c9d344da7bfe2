"""GRPO with the verifier as the reward: the round's learnable problems plus the variants it kept
(`problems`, with the answer the reward checks)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Literal

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from evoforge.data.section import Section
from evoforge.tasks.arrow_datasets import arrow_dataset, messages_column
from evoforge.tasks.finetune.trainer_args import build_arguments

if TYPE_CHECKING:
    from evoforge.tasks.finetune.config import FinetuneConfig
    from evoforge.tasks.finetune.rows import RoundInputs

TABLE = "problems"


class GrpoConfig(Section):
    """`finetune.grpo`: GRPO's own settings, shared by svs and raro, which train with GRPO too."""
    generations: int = Field(4, ge=2, description="completions per prompt whose rewards form one GRPO group")
    max_completion_tokens: int = Field(256, ge=8)
    temperature: float = Field(1.0, gt=0)
    beta: float = Field(0.0, ge=0, description="KL weight against the starting policy (0: no reference model)")
    problems: Literal["learnable", "all"] = Field(
        "learnable", description="grpo, svs: the round's learnable problems (SvS) or every problem with a reference answer")


def training_rows(inputs: RoundInputs, config: FinetuneConfig) -> pa.Table:
    """The round's problems with a reference answer (its learnable ones, or all with `grpo.problems: all`)
    and the variants the synthesize stage kept, each with the answer the reward checks. svs trains on
    the same rows: it solves them and synthesizes from them online."""
    pool = inputs.problem_pool().select(["problem_id", "question", "answer"])
    pool = pool.filter(pc.invert(pc.is_null(pool["answer"])))
    if config.grpo.problems == "learnable":
        stats = inputs.round_table("problem_stats", "filter")
        learnable = stats.filter(pc.equal(stats["bucket"], "learnable"))["problem_id"]
        pool = pool.filter(pc.is_in(pool["problem_id"], learnable))
    kept = inputs.stage_output("problems", "synthesize").select(["problem_id", "question", "answer"])  # the variants it kept
    return pa.concat_tables([pool, kept])


def arguments(config: FinetuneConfig, output_dir, run_name: str | None = None, method: str = "grpo", **method_args):
    """GRPO's arguments; RARO and SvS train with GRPO too and use these (`method_args`: their own). With
    `generation: vllm` TRL samples
    through vLLM (its colocate or server mode; on a CPU, models/vllm_sync.py's engine, see `trainer`)."""
    import torch

    if (config.batch_size * config.gradient_accumulation_steps) % config.grpo.generations:
        raise ValueError(f"finetune grpo: batch_size x gradient_accumulation_steps "
                         f"({config.batch_size} x {config.gradient_accumulation_steps}) must be a multiple of "
                         f"grpo.generations ({config.grpo.generations})")
    vllm = {}
    if config.generation == "vllm":
        vllm = dict(use_vllm=True, vllm_mode=config.vllm_mode)
        if config.vllm_mode == "server":
            vllm["vllm_server_base_url"] = config.vllm_server_url
        elif not torch.cuda.is_available():
            # TRL corrects for the sampler's log-probabilities differing from the trainer's (another precision,
            # stale weights) with one more forward pass per step. On a CPU both are float32 and, synced every
            # step, the same weights: the ratio is 1 (measured: 4e-7 apart), and the pass cost ~15% of a step.
            # With sync_steps > 1 the weights are stale, and the correction is kept. trainer_args can say otherwise.
            vllm["vllm_importance_sampling_correction"] = config.sync_steps > 1
    return build_arguments(method, config, output_dir, run_name, num_generations=config.grpo.generations,
                           max_completion_length=config.grpo.max_completion_tokens,
                           temperature=config.grpo.temperature, beta=config.grpo.beta, **vllm, **method_args)


def dataset(problems: pa.Table, config: FinetuneConfig, context):
    """TRL conversational prompt format (built in Arrow: tasks/arrow_datasets.py `messages_column`); `answer`
    travels along to the verifier reward."""
    from evoforge.models.prompts import solve_messages

    return arrow_dataset(pa.table({
        "prompt": messages_column(lambda question: solve_messages(question, config.few_shot), question=problems["question"]),
        "answer": problems["answer"],
    }))


class VerifierReward:
    """GRPO reward: 1.0 when the completion's last boxed answer matches the problem's answer, else 0.0.

    Graded by the verify stage's own process pool, so a reward means exactly what a `correct`
    verdict means, and a pathological answer cannot hang training (the pool kills it at its deadline).
    The pool is the process's shared one (`VerifyConfig.pool()`), already running when a verify stage
    ran before in the process; a group's samples that agree are graded once.
    """

    __name__ = "verifier_correct"  # TRL logs each reward function under its name

    def __init__(self, pool):
        self.pool = pool

    def __call__(self, prompts, completions, answer, **_) -> list[float]:
        from evoforge.tasks.verify import grade_each_answer_once  # math-verify: not for config loading

        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        results = grade_each_answer_once(self.pool, list(zip(answer, texts)))
        return [1.0 if r[0] == "correct" else 0.0 for r in results]


@contextmanager
def trainer(trainer_kwargs: dict, context, config: FinetuneConfig):
    from evoforge.tasks.finetune.vllm_colocate import build_grpo_trainer

    with context.verify.pool() as pool:
        yield build_grpo_trainer(trainer_kwargs, config.sync_steps, reward_funcs=[VerifierReward(pool)])
