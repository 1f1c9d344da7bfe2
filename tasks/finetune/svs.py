"""SvS online (arXiv 2508.14029): self-play with variational problem synthesis inside GRPO training.

Each step (the paper's steps 6-13), in one GRPO update:
1. solve: the batch's problems, G samples each, rewarded by the verifier (tasks/finetune/grpo.py);
2. the under-performing problems (accuracy in `solve_band`, [12.5%, 50%]) give one correct solution each,
   from which the POLICY writes G variant problems (the synthesize stage's prompt, extraction and screens:
   tasks/synthesize.py, models/prompts.py);
3. each valid variant is solved G_v times and graded against the ORIGINAL answer;
4. a synthesis is rewarded 1 when its variant's accuracy lies in `synthesis_band` ([12.5%, 62.5%]) and it
   passed the screens (no answer leak, not a copy), else 0 (tasks/synthesize.py `synthesis_reward`);
5. the three kinds of rows (solving, synthesizing, solving variants) are one batch, one update; groups whose
   rewards are all equal carry no GRPO signal and are dropped (`dynamic_sampling`; TRL has no refill, so
   the batch shrinks instead of being topped up).

Under several training processes the step's choices are made on the whole step, gathered to every rank,
and each rank scores an equal share of each kind of row (see `SvsTrainer`).

Built on TRL's GRPOTrainer: `SvsTrainer` replaces only `_generate_and_score_completions` (TRL's own
generate-and-score step, called three times with the three kinds of rows, generation through vLLM where
`finetune.generation: vllm`, else HF generate) and concatenates the results. Defaults from the paper:
Clip-Higher (`epsilon_high` 0.28) and the token-level loss (`loss_type: dapo`).

Every variant written during training is a `variants` row (origin 'online', its step, accuracy and
reward): rank 0 writes each step's rows under the trainer's folder (`tables/variants/step-N.parquet`), which
a resumed run keeps and the finetune flow publishes with the checkpoint.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
from pydantic import Field

from evoforge.data.section import Section
from evoforge.tasks.arrow_datasets import arrow_dataset, messages_column
from evoforge.tasks.finetune import grpo

if TYPE_CHECKING:
    from evoforge.tasks.finetune.config import FinetuneConfig
    from evoforge.tasks.finetune.rows import RoundInputs

TABLE = "problems"
KINDS = ("solve", "synthesize", "variant")


class SvsConfig(Section):
    """`finetune.svs`: SvS trained online; the paper's defaults. G is `finetune.grpo.generations`."""
    solve_band: tuple[float, float] = Field(
        (0.125, 0.5), description="a problem whose accuracy over its G samples lies here (inclusive) is under-performing: "
                                  "the policy writes G variants from one of its correct solutions")
    synthesis_band: tuple[float, float] = Field(
        (0.125, 0.625), description="a variant whose accuracy (against the ORIGINAL answer) lies here rewards its synthesis")
    variant_generations: int = Field(8, ge=2, description="G_v: samples solving each valid variant")
    epsilon_high: float = Field(0.28, gt=0, description="Clip-Higher: the upper clip of the policy ratio (DAPO)")
    dynamic_sampling: bool = Field(True, description="drop the rows of groups whose rewards are all equal (no GRPO "
                                                     "signal) from the update; TRL has no refill, so the batch shrinks")
    max_variant_chars: int = Field(2000, ge=16, description="a longer variant is rejected (too_long)")


def training_rows(inputs: RoundInputs, config: FinetuneConfig) -> pa.Table:
    """GRPO's rows (`grpo.problems`): svs solves the same problems and synthesizes from them online."""
    return grpo.training_rows(inputs, config)


def arguments(config: FinetuneConfig, output_dir, run_name: str | None = None):
    return grpo.arguments(config, output_dir, run_name, method="svs", epsilon_high=config.svs.epsilon_high,
                          loss_type="dapo")


def dataset(problems: pa.Table, config: FinetuneConfig, context):
    """GRPO's rows (the question as the generate stage asks it, the answer for the verifier), marked as
    problems to solve; `problem_id` travels along to name the variants' parents. Built in Arrow
    (tasks/arrow_datasets.py `messages_column`)."""
    from evoforge.models.prompts import solve_messages

    rows = problems.num_rows
    return arrow_dataset(pa.table({
        "prompt": messages_column(lambda question: solve_messages(question, config.few_shot), question=problems["question"]),
        "answer": problems["answer"], "kind": pa.repeat("solve", rows), "problem_id": problems["problem_id"],
        "question": problems["question"], "reward": pa.repeat(0.0, rows),
    }))


class SvsReward:
    """One reward function for the three kinds: a solving row (an original or a variant) is graded by the
    verifier against its `answer` (a variant's: the original's); a synthesizing row carries the reward its
    variant earned, computed before the row is scored (`reward`)."""

    __name__ = "svs"

    def __init__(self, verifier):
        self.verifier = verifier
        self.last: list[float] = []

    def __call__(self, prompts, completions, answer, kind, reward, **kwargs) -> list[float]:
        solving = [i for i, k in enumerate(kind) if k != "synthesize"]
        graded = self.verifier([prompts[i] for i in solving], [completions[i] for i in solving],
                               [answer[i] for i in solving]) if solving else []
        out = list(map(float, reward))
        for i, value in zip(solving, graded):
            out[i] = value
        self.last = out
        return out


def group_accuracy(rewards: list[float], group: int) -> list[float]:
    """Mean reward of each consecutive group of `group` rows (TRL keeps a prompt's samples together)."""
    return [sum(rewards[i:i + group]) / group for i in range(0, len(rewards), group)]


def _concat(batches: list[dict], pad_token_id: int) -> dict:
    """TRL's generate-and-score outputs as one batch: prompts left-padded, completions right-padded to the
    longest, per-row values concatenated, the token count summed."""
    import torch
    import torch.nn.functional as F

    out = {}
    for key in batches[0]:
        values = [b[key] for b in batches]
        if key == "num_items_in_batch":
            out[key] = sum(values)
        elif not isinstance(values[0], torch.Tensor) or values[0].dim() == 1:
            out[key] = torch.cat(values) if isinstance(values[0], torch.Tensor) else [v for vs in values for v in vs]
        else:
            width = max(v.shape[1] for v in values)
            left = key.startswith("prompt")
            fill = pad_token_id if key in ("prompt_ids", "completion_ids") else 0
            out[key] = torch.cat([F.pad(v, (width - v.shape[1], 0) if left else (0, width - v.shape[1]), value=fill)
                                  for v in values])
    return out


def _rows(batch: dict, keep) -> dict:
    """The rows `keep` (a bool tensor) of a generate-and-score output; the token count recomputed (this
    rank's: the trainer sums it over the ranks)."""
    import torch

    rows = keep.shape[0]
    out = {key: (value[keep] if isinstance(value, torch.Tensor) and value.dim() >= 1 else
                 [v for v, k in zip(value, keep.tolist()) if k] if isinstance(value, list) and len(value) == rows
                 else value)
           for key, value in batch.items()}
    out["num_items_in_batch"] = out["completion_mask"].sum().to(batch["completion_mask"].device)
    return out


def synthesis_seeds(rows: list[dict], texts: list[str], rewards: list[float], group: int,
                    band: tuple[float, float]) -> list[tuple[dict, str]]:
    """The under-performing problems of a step (accuracy in `band`, above 0), each with its first correct
    solution: what the policy writes variants from. `rows`, `texts`, `rewards`: the step's solving rows in
    TRL's order, a problem's `group` samples consecutive."""
    lo, hi = band
    seeds = []
    for start, accuracy in zip(range(0, len(rows), group), group_accuracy(rewards, group)):
        if accuracy > 0 and lo - 1e-9 <= accuracy <= hi + 1e-9:
            correct = next(i for i in range(start, start + group) if rewards[i] == 1.0)
            seeds.append((rows[start], texts[correct]))
    return seeds


def fill_to_share(items: list, rows_per_item: int, processes: int) -> list:
    """`items` repeated in turn until their rows (`rows_per_item` each) split evenly over `processes`: every
    rank scores as many rows (TRL gathers them), and a group is never cut. Empty stays empty."""
    out = list(items)
    while out and (len(out) * rows_per_item) % processes:
        out.append(items[(len(out) - len(items)) % len(items)])
    return out


def local_share(rows: list, processes: int, rank: int) -> list:
    """This rank's contiguous slice of a step's rows, as TRL's sampler deals them out."""
    size = len(rows) // processes
    return rows[rank * size:(rank + 1) * size]


def rows_to_train(advantages, dynamic_sampling: bool, rows_on_busiest_rank=lambda kept: kept) -> tuple:
    """Which of a step's rows train (a mask over them) and how many rows every rank trains.

    Dynamic sampling keeps the rows whose advantage is not 0 (a group with one reward for all has none). TRL
    then needs every rank to train as many rows (it gathers per-row values in its loss) and a multiple of
    `steps_per_generation` (it splits the step into that many equal micro-batches and drops a remainder):
    the count is raised to the busiest rank's (`rows_on_busiest_rank`: the max of a count over the ranks),
    rounded up; uninformative rows fill it first. Where nothing is informative anywhere, every row trains.
    Returns the mask and the target count; `_pad_rows` makes up a shortfall with copies."""
    import torch

    keep = advantages != 0 if dynamic_sampling else torch.ones_like(advantages, dtype=torch.bool)
    target = int(rows_on_busiest_rank(keep.sum()))
    if target == 0:
        keep, target = torch.ones_like(keep), int(rows_on_busiest_rank(torch.tensor(keep.numel())))
    return keep, target


def _top_up(keep, target: int):
    """`keep` with its first unkept rows added until it holds `target` rows, or all of them."""
    keep = keep.clone()
    for i in (~keep).nonzero().flatten().tolist()[:max(0, target - int(keep.sum()))]:
        keep[i] = True
    return keep


def _pad_rows(batch: dict, rows: int) -> dict:
    """The batch grown to `rows` by copies of its first rows with advantage 0. A copy adds nothing to the policy
    gradient (its advantage is 0); it counts in the token normalizer like an uninformative row."""
    import torch

    have = batch["advantages"].shape[0]
    if have >= rows:
        return batch
    copies = torch.arange(rows - have) % have
    out = {key: (torch.cat([value, value[copies]]) if isinstance(value, torch.Tensor) and value.dim() >= 1 else
                 value + [value[i] for i in copies.tolist()] if isinstance(value, list) and len(value) == have else value)
           for key, value in batch.items()}
    out["advantages"][have:] = 0.0
    return out


def make_trainer_class():
    from trl import GRPOTrainer

    class SvsTrainer(GRPOTrainer):
        """GRPOTrainer whose generate-and-score step is SvS's: solve, synthesize, solve the variants.

        Under several processes each rank holds a slice of the step; the choices (which problems seed a
        synthesis, which variants are valid, their accuracy) are made on the whole step, gathered to every
        rank, so the ranks agree and each scores an equal, contiguous share of every kind of row."""

        def _generate_and_score_completions(self, inputs):
            import torch
            from accelerate.utils import gather_object

            from evoforge.models.prompts import extract_problem, solve_messages, synthesis_messages
            from evoforge.tasks.synthesize import Candidate, screen, synthesis_reward

            svs, group = self.svs_config, self.num_generations
            processes, rank = self.accelerator.num_processes, self.accelerator.process_index
            solved = super()._generate_and_score_completions(inputs)
            texts = self.processing_class.batch_decode(solved["completion_ids"], skip_special_tokens=True)
            rewards = gather_object(list(self.svs_reward.last))
            seeds = synthesis_seeds(gather_object(list(inputs)), gather_object(texts), rewards, group, svs.solve_band)
            batches, counts = [solved], {"solve": len(rewards), "synthesize": 0, "variant": 0}
            variants = []
            if seeds:  # the same on every rank: all of them synthesize, or none
                synth_inputs = [{"prompt": synthesis_messages(row["question"], solution), "answer": row["answer"],
                                 "kind": "synthesize", "problem_id": row["problem_id"], "question": row["question"],
                                 "reward": 0.0} for row, solution in fill_to_share(seeds, group, processes)
                                for _ in range(group)]
                mine = local_share(synth_inputs, processes, rank)
                generated = self._generate([x["prompt"] for x in mine])
                raw = gather_object([c[-1]["content"] if isinstance(c, list) else c for c in generated[3]])
                candidates = [Candidate(x["problem_id"], f"step{self.state.global_step}-{i}", x["answer"], text,
                                        extract_problem(text), None) for i, (x, text) in enumerate(zip(synth_inputs, raw))]
                questions = {x["problem_id"]: x["question"] for x in synth_inputs}
                screen(candidates, questions, list(questions.values()), svs.max_variant_chars)
                valid = [c for c in candidates if c.reject_reason is None]
                solutions = {}  # id(candidate) -> its variant's rewards, over every copy solved
                if valid:
                    solving = fill_to_share(valid, svs.variant_generations, processes)
                    variant_inputs = [{"prompt": solve_messages(c.text, self.svs_few_shot), "answer": c.answer,
                                       "kind": "variant", "problem_id": c.parent_problem_id, "question": c.text,
                                       "reward": 0.0} for c in solving for _ in range(svs.variant_generations)]
                    with self._group_size(svs.variant_generations):
                        batches.append(super()._generate_and_score_completions(
                            local_share(variant_inputs, processes, rank)))
                    counts["variant"] = len(variant_inputs)
                    graded = gather_object(list(self.svs_reward.last))
                    for c, start in zip(solving, range(0, len(graded), svs.variant_generations)):
                        solutions.setdefault(id(c), []).extend(graded[start:start + svs.variant_generations])
                for x, c in zip(synth_inputs, candidates):
                    solved_by = solutions.get(id(c), [])
                    accuracy = sum(solved_by) / len(solved_by) if solved_by else None
                    x["reward"] = synthesis_reward(accuracy or 0.0, len(solved_by), svs.synthesis_band,
                                                   c.reject_reason is not None)
                    variants.append(dict(candidate=c, accuracy=accuracy, n=len(solved_by), reward=x["reward"]))
                self._replay = generated  # score the syntheses that were solved, not fresh ones
                try:
                    batches.append(super()._generate_and_score_completions(mine))
                finally:
                    self._replay = None
                counts["synthesize"] = len(synth_inputs)
            self._record(counts, rewards, variants)
            batch = _concat(batches, self.processing_class.pad_token_id)
            multiple = self.args.steps_per_generation
            keep, target = rows_to_train(batch["advantages"], svs.dynamic_sampling,
                                         lambda kept: self.accelerator.gather(kept.reshape(1)).max())
            target += (-target) % multiple
            batch = _pad_rows(_rows(batch, _top_up(keep, target)), target)
            # TRL's token count is the whole step's, over every rank (its loss divides by it)
            batch["num_items_in_batch"] = self.accelerator.gather(batch["completion_mask"].sum()).sum()
            self._metrics["train"]["svs/rows_trained"].append(
                float(self.accelerator.gather(torch.tensor(batch["advantages"].numel())).sum()))
            return batch

        def log(self, logs, start_time=None):
            # the policy's token entropy over the step's completions (TRL's `entropy`), under the name SvS reports
            metrics = self._metrics["train"]
            if metrics.get("entropy"):
                metrics["svs/entropy"] = list(metrics["entropy"])
            super().log(logs, start_time)

        def _generate(self, prompts):
            replay = getattr(self, "_replay", None)
            return replay if replay is not None else super()._generate(prompts)

        @contextmanager
        def _group_size(self, size: int):
            """TRL normalizes advantages over groups of `num_generations` rows: a variant's G_v samples are one."""
            kept = self.num_generations
            self.num_generations = size
            try:
                yield
            finally:
                self.num_generations = kept

        def _record(self, counts: dict, solve_rewards: list[float], variants: list[dict]) -> None:
            metrics = self._metrics["train"]
            for kind in KINDS:
                metrics[f"svs/{kind}_rows"].append(float(counts[kind]))
            metrics["svs/solve_reward"].append(sum(solve_rewards) / max(1, len(solve_rewards)))
            metrics["svs/synthesis_reward"].append(
                sum(v["reward"] for v in variants) / len(variants) if variants else 0.0)
            solved = [v["accuracy"] for v in variants if v["accuracy"] is not None]
            metrics["svs/variant_accuracy"].append(sum(solved) / len(solved) if solved else 0.0)
            if self.accelerator.is_main_process and variants:
                self._write_variants(variants)

        def _write_variants(self, variants: list[dict]) -> None:
            from evoforge.data import schemas
            from evoforge.data.lake import write_parquet
            from evoforge.data.ids import problem_id, stable_hash

            step = self.state.global_step + 1  # the optimizer step these rows train
            rows = []
            for v in variants:
                c = v["candidate"]
                valid = c.reject_reason is None
                rows.append(dict(
                    variant_id=problem_id(c.text) if valid else stable_hash("variant", c.source_rollout_id, c.raw_output),
                    parent_problem_id=c.parent_problem_id, source_rollout_id=None, text=c.text, answer=c.answer,
                    raw_output=c.raw_output, n=v["n"], correct=round((v["accuracy"] or 0.0) * v["n"]),
                    accuracy=v["accuracy"] or 0.0,
                    kept=v["reward"] == 1.0, reward=v["reward"],
                    reject_reason=c.reject_reason or (None if v["reward"] == 1.0 else "outside_band"),
                    origin="online", step=step))
            folder = Path(self.args.output_dir) / "tables" / "variants"
            folder.mkdir(parents=True, exist_ok=True)
            write_parquet(pa.Table.from_pylist(rows, schema=schemas.VARIANTS), folder / f"step-{step:06d}.parquet")

    return SvsTrainer


@contextmanager
def trainer(trainer_kwargs: dict, context, config: FinetuneConfig):
    from evoforge.tasks.finetune.vllm_colocate import build_grpo_trainer

    with context.verify.pool() as pool:
        reward = SvsReward(grpo.VerifierReward(pool))
        built = build_grpo_trainer(trainer_kwargs, config.sync_steps, trainer_class=make_trainer_class(),
                                   reward_funcs=[reward])
        built.svs_config, built.svs_reward, built.svs_few_shot = config.svs, reward, config.few_shot
        yield built
