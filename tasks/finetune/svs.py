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

import pyarrow as pa

from evoforge.tasks.finetune import grpo
from evoforge.tasks.finetune.config import FinetuneConfig

TABLE = "problems"
KINDS = ("solve", "synthesize", "variant")


def arguments(config: FinetuneConfig, output_dir, run_name: str | None = None):
    return grpo.arguments(config, output_dir, run_name, method="svs", epsilon_high=config.svs.epsilon_high,
                          loss_type="dapo")


def dataset(problems: pa.Table, config: FinetuneConfig, context):
    """GRPO's rows (the question as the generate stage asks it, the answer for the verifier), marked as
    problems to solve; `problem_id` travels along to name the variants' parents."""
    import datasets

    from evoforge.models.prompts import solve_messages

    return datasets.Dataset.from_list([
        {"prompt": solve_messages(r["question"], config.few_shot), "answer": r["answer"], "kind": "solve",
         "problem_id": r["problem_id"], "question": r["question"], "reward": 0.0}
        for r in problems.select(["problem_id", "question", "answer"]).to_pylist()
    ])


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
    """The rows `keep` (a bool tensor) of a generate-and-score output; the token count recomputed."""
    import torch

    out = {key: (value[keep] if isinstance(value, torch.Tensor) and value.dim() >= 1 else value)
           for key, value in batch.items()}
    out["num_items_in_batch"] = out["completion_mask"].sum().to(batch["completion_mask"].device)
    return out


def make_trainer_class():
    from trl import GRPOTrainer

    class SvsTrainer(GRPOTrainer):
        """GRPOTrainer whose generate-and-score step is SvS's: solve, synthesize, solve the variants."""

        def _generate_and_score_completions(self, inputs):
            from evoforge.models.prompts import extract_problem, solve_messages, synthesis_messages
            from evoforge.tasks.synthesize import Candidate, screen, synthesis_reward

            svs, group = self.svs_config, self.num_generations
            solved = super()._generate_and_score_completions(inputs)
            texts = self.processing_class.batch_decode(solved["completion_ids"], skip_special_tokens=True)
            rewards = list(self.svs_reward.last)
            lo, hi = svs.solve_band
            # the under-performing problems, and one correct solution of each: the synthesis seeds
            seeds = []
            for start, accuracy in zip(range(0, len(inputs), group), group_accuracy(rewards, group)):
                if accuracy > 0 and lo - 1e-9 <= accuracy <= hi + 1e-9:  # a correct solution to write from
                    correct = next(i for i in range(start, start + group) if rewards[i] == 1.0)
                    seeds.append((inputs[start], texts[correct]))
            batches, counts = [solved], {"solve": len(inputs), "synthesize": 0, "variant": 0}
            variants = []
            if seeds:
                synth_inputs = [{"prompt": synthesis_messages(row["question"], solution), "answer": row["answer"],
                                 "kind": "synthesize", "problem_id": row["problem_id"], "question": row["question"],
                                 "reward": 0.0} for row, solution in seeds for _ in range(group)]
                generated = self._generate([x["prompt"] for x in synth_inputs])
                written = generated[3]  # the completions, as TRL's own scoring sees them
                raw = [c[-1]["content"] if isinstance(c, list) else c for c in written]
                candidates = [Candidate(x["problem_id"], f"step{self.state.global_step}-{i}", x["answer"], text,
                                        extract_problem(text), None) for i, (x, text) in enumerate(zip(synth_inputs, raw))]
                questions = {x["problem_id"]: x["question"] for x in synth_inputs}
                screen(candidates, questions, list(questions.values()), svs.max_variant_chars)
                valid = [c for c in candidates if c.reject_reason is None]
                accuracy = {}
                if valid:
                    variant_inputs = [{"prompt": solve_messages(c.text, self.svs_few_shot), "answer": c.answer,
                                       "kind": "variant", "problem_id": c.parent_problem_id, "question": c.text,
                                       "reward": 0.0} for c in valid for _ in range(svs.variant_generations)]
                    with self._group_size(svs.variant_generations):
                        batches.append(super()._generate_and_score_completions(variant_inputs))
                    counts["variant"] = len(variant_inputs)
                    for c, value in zip(valid, group_accuracy(self.svs_reward.last, svs.variant_generations)):
                        accuracy[id(c)] = value
                for x, c in zip(synth_inputs, candidates):
                    x["reward"] = synthesis_reward(accuracy.get(id(c), 0.0), svs.variant_generations if id(c) in accuracy
                                                   else 0, svs.synthesis_band, c.reject_reason is not None)
                    variants.append(dict(candidate=c, accuracy=accuracy.get(id(c)), reward=x["reward"]))
                self._replay = generated  # score the syntheses that were solved, not fresh ones
                try:
                    batches.append(super()._generate_and_score_completions(synth_inputs))
                finally:
                    self._replay = None
                counts["synthesize"] = len(synth_inputs)
            self._record(counts, rewards, variants)
            batch = _concat(batches, self.processing_class.pad_token_id)
            if svs.dynamic_sampling:
                informative = batch["advantages"] != 0
                if bool(informative.any()):  # all uniform: nothing to learn this step, and nothing to drop either
                    batch = _rows(batch, informative)
            self._metrics["train"]["svs/rows_trained"].append(float(batch["advantages"].numel()))
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
                    raw_output=c.raw_output, n=self.svs_config.variant_generations if v["accuracy"] is not None else 0,
                    correct=round((v["accuracy"] or 0.0) * self.svs_config.variant_generations), accuracy=v["accuracy"] or 0.0,
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
