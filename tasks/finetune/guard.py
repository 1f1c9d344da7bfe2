"""The collapse guard: a method stops early when its policy collapses on rows held out of its training data.

Every `guard.eval_steps` optimizer steps (and once before the first step, the baseline) the guard measures,
on the held-out rows, asked with the very prompt the method trains on:

- held-out entropy (only with `entropy_floor` set: it costs generation): `samples` completions of up to
  `max_tokens` new tokens per prompt, sampled at `temperature` (no top-k, no top-p) from a fixed seed, and
  minus the mean log-probability of each sample's tokens under the model's own (temperature 1)
  distribution, averaged over the samples: the evaluate stage's entropy, on the same footing
  (models/engine.py: `mean_logprob`, tasks/evaluate.py: `entropy`).
- held-out loss (only with `max_loss_rise` set): the teacher-forced mean token NLL of the row's reference
  completion after its prompt, tokenized as TRL does (chat template, completion after the common prefix,
  `max_length`): sft and traces their completion, dpo the chosen answer. grpo and raro rows have none.

`guard_decision` is the rule; `CollapseGuard` the TRL/transformers callback that measures, records each
measurement in the trainer's log history (so a trainer resumed from a checkpoint keeps the history and
its best loss) and stops the trainer.
"""
from __future__ import annotations

import math
import random
import time
from transformers import TrainerCallback

from evoforge.tasks.finetune.config import CollapseGuardConfig, FinetuneConfig

# the dataset column that holds each method's reference completion (None: the method has none); a method
# not named here (ppm, a reward model) is never guarded
REFERENCE: dict[str, str | None] = {"sft": "completion", "traces": "completion", "dpo": "chosen", "grpo": None, "raro": None}
LOSS_KEY, ENTROPY_KEY, STOP_KEY = "guard_loss", "guard_entropy", "guard_stop"
ROWS_PER_BATCH = 8  # held-out prompts generated (or scored) at once


def guard_decision(history: list[dict], config: CollapseGuardConfig) -> str | None:
    """Why to stop after the last measurement of `history` ([{"step", "loss", "entropy"}], oldest first; a
    value that was not measured is None or absent), or None to go on. The baseline (step 0) never stops:
    it is what training is judged against."""
    if not history or history[-1]["step"] == 0:
        return None
    last = history[-1]
    step, entropy, loss = last["step"], last.get("entropy"), last.get("loss")
    if config.entropy_floor is not None and entropy is not None and entropy < config.entropy_floor:
        return f"held-out entropy {entropy:.3f} < floor {config.entropy_floor:g} at step {step}"
    if config.max_loss_rise is not None and loss is not None:
        earlier = [h["loss"] for h in history[:-1] if h.get("loss") is not None]
        if earlier and loss > (1 + config.max_loss_rise) * min(earlier):
            return f"held-out loss {loss:.2f} > {1 + config.max_loss_rise:g} x best {min(earlier):.2f} at step {step}"
    return None


def hold_out(dataset, method: str, config: FinetuneConfig, log=None):
    """(training rows, held-out rows or None): `guard.held_out_rows` rows of the method's dataset (at most
    `guard.held_out_share` of them), picked by `config.seed`, leave training. None when the guard has
    nothing to measure for the method, or the method's rows cannot spare one."""
    guard = config.guard
    if method not in REFERENCE or not guard.enabled:
        return dataset, None
    if REFERENCE[method] is None:  # grpo, raro: prompts only
        if guard.entropy_floor is None:
            _info(log, f"finetune {method}: collapse guard off: {method} rows have no reference completion to take a "
                       f"held-out loss on, and no entropy_floor is set")
            return dataset, None
        if guard.max_loss_rise is not None:
            _info(log, f"finetune {method}: collapse guard on the entropy floor only: {method} rows have no reference "
                       f"completion to take a held-out loss on")
    rows = len(dataset)
    held_out = min(guard.held_out_rows, int(rows * guard.held_out_share))
    if held_out < 1:
        _info(log, f"finetune {method}: collapse guard off: {rows} rows cannot spare one for a held-out measurement "
                   f"(guard.held_out_share {guard.held_out_share})")
        return dataset, None
    held = sorted(random.Random(config.seed).sample(range(rows), held_out))
    picked = set(held)
    return dataset.select([i for i in range(rows) if i not in picked]), dataset.select(held)


def _info(log, message: str) -> None:
    if log is not None:
        log.info(message)


def _prompt_ids(tokenizer, messages) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"])


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _eos_ids(model, tokenizer) -> set[int]:
    ids = getattr(model.generation_config, "eos_token_id", None)
    ids = ids if isinstance(ids, list) else [ids]
    return {i for i in [*ids, tokenizer.eos_token_id] if i is not None}


def held_out_loss(model, tokenizer, prompts: list, references: list, max_length: int) -> float | None:
    """Teacher-forced mean NLL per token of each reference completion (a list of assistant messages) after its
    prompt, over all the rows' completion tokens; tokenized as TRL's SFT and DPO trainers do. None when no
    completion token fits in `max_length`."""
    import torch

    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    for prompt, reference in zip(prompts, references):
        prompt_ids = _prompt_ids(tokenizer, prompt)
        full = list(tokenizer.apply_chat_template(prompt + reference, tokenize=True, return_dict=True)["input_ids"])
        start = _common_prefix(prompt_ids, full)
        full = full[:max_length]
        if start < 1 or start >= len(full):  # no completion token left to score
            continue
        ids = torch.tensor([full], device=device)
        keep = len(full) - start + 1  # logits that predict the completion tokens (and one spare at the end)
        logits = model(input_ids=ids, logits_to_keep=keep).logits[0, :-1].float()
        target = ids[0, start:]
        total += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
        tokens += int(target.numel())
    return total / tokens if tokens else None


def held_out_entropy(model, tokenizer, prompts: list, samples: int, max_tokens: int, temperature: float,
                     seed: int) -> float | None:
    """Minus the mean log-probability (temperature 1) of the sampled tokens of each of `samples` completions
    per prompt, averaged over the completions (the evaluate stage's entropy). Completions end at their first
    end-of-sequence token, which counts, as in models/engine.py."""
    import torch

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = _eos_ids(model, tokenizer)
    encoded = [_prompt_ids(tokenizer, p) for p in prompts]
    torch.manual_seed(seed)
    per_sample: list[float] = []
    for first in range(0, len(encoded), ROWS_PER_BATCH):
        batch = encoded[first:first + ROWS_PER_BATCH]
        width = max(len(ids) for ids in batch)  # padded on the left, by hand: the tokenizer is TRL's, untouched
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch], device=device)
        attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=device)
        out = model.generate(
            input_ids=input_ids, attention_mask=attention, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
            max_new_tokens=max_tokens, num_return_sequences=samples, pad_token_id=pad, eos_token_id=sorted(eos),
            use_cache=True, output_logits=True, return_dict_in_generate=True,
        )
        logprobs = torch.log_softmax(torch.stack(out.logits, dim=1).float(), dim=-1)  # raw logits: temperature 1
        generated = out.sequences[:, width:]
        for i in range(generated.shape[0]):
            row = generated[i].tolist()
            cut = next((j for j, t in enumerate(row) if t in eos), None)
            length = len(row) if cut is None else cut + 1
            if length == 0:
                continue
            picked = logprobs[i, torch.arange(length, device=device), generated[i, :length]]
            value = -float(picked.mean())
            if math.isfinite(value):
                per_sample.append(value)
    return sum(per_sample) / len(per_sample) if per_sample else None


def _rank_zeros(decision):
    """Rank 0's decision on every training process: each measures the same rows with the same weights and
    seed, but a process that stopped alone would leave the others waiting in the next collective."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return decision
    shared = [decision]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


class CollapseGuard(TrainerCallback):
    """Measures the held-out rows at train begin (step 0) and at every `eval_steps`-th step end, appends each
    measurement to the trainer's log history ({"step", "guard_loss", "guard_entropy"}; with "guard_stop", the
    reason, when it stopped), and stops the trainer when `guard_decision` fires. `stopped`: the reason, if it
    stopped training before `max_steps`; `seconds`: the time each measurement took."""

    def __init__(self, tokenizer, held_out, method: str, config: FinetuneConfig, log=None):
        self.tokenizer, self.method, self.config, self.guard, self.log = tokenizer, method, config, config.guard, log
        reference = REFERENCE[method]
        self.prompts = [row["prompt"] for row in held_out]
        self.references = ([row[reference] for row in held_out]
                           if reference is not None and self.guard.max_loss_rise is not None else None)
        self.history: list[dict] = []
        self.stopped: str | None = None
        self.seconds: list[float] = []

    def measure(self, model) -> dict:
        """{"loss", "entropy"} on the held-out rows now (None where not measured); the model's train mode and
        the global random state (TRL's own sampling, dropout) are as they were."""
        import torch

        was_training = model.training
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        started = time.monotonic()
        model.eval()
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=devices):
                loss = (held_out_loss(model, self.tokenizer, self.prompts, self.references, self.config.max_length)
                        if self.references is not None else None)
                entropy = (held_out_entropy(model, self.tokenizer, self.prompts, self.guard.samples, self.guard.max_tokens,
                                            self.guard.temperature, self.config.seed)
                           if self.guard.entropy_floor is not None else None)
        finally:
            model.train(was_training)
        self.seconds.append(time.monotonic() - started)
        return {"loss": loss, "entropy": entropy}

    def _record(self, state, model) -> str | None:
        step = state.global_step
        values = self.measure(model)
        self.history.append({"step": step, **values})
        reason = guard_decision(self.history, self.guard)
        entry = {"step": step, **{key: values[name] for key, name in ((LOSS_KEY, "loss"), (ENTROPY_KEY, "entropy"))
                                  if values[name] is not None}}
        shown = ", ".join(f"{name} {values[name]:.4f}" for name in ("loss", "entropy") if values[name] is not None)
        if reason and step < state.max_steps:
            entry[STOP_KEY] = reason  # a string: the step metrics keep only the numbers
        state.log_history.append(entry)  # saved with the trainer state, so a resumed trainer keeps the history
        if self.log is not None:
            self.log.info(f"finetune {self.method}: collapse guard at step {step}: held-out {shown or 'nothing'} "
                          f"({self.seconds[-1]:.1f} s)" + (f"; {reason}" if reason else ""))
        return reason

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        # a trainer resumed from a checkpoint has its earlier measurements in its restored log history
        self.history = [{"step": e["step"], "loss": e.get(LOSS_KEY), "entropy": e.get(ENTROPY_KEY)}
                        for e in state.log_history if LOSS_KEY in e or ENTROPY_KEY in e]
        if state.global_step == 0 and not self.history:
            self._record(state, model)
            first = self.history[-1]
            if self.guard.entropy_floor is not None and first["entropy"] is not None and first["entropy"] < self.guard.entropy_floor:
                _info(self.log, f"finetune {self.method}: collapse guard: the starting held-out entropy "
                                f"{first['entropy']:.3f} is already below the floor {self.guard.entropy_floor:g}; "
                                f"training stops at the first check (step {self.guard.eval_steps})")

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.guard.eval_steps:
            return control
        reason = _rank_zeros(self._record(state, model))
        if reason and state.global_step < state.max_steps:
            self.stopped = reason
            control.should_training_stop = True
        return control
