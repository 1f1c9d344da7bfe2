"""The collapse guard (tasks/finetune/guard.py): its rule, its held-out split, and early stops of real
trainings on the tiny model."""
from __future__ import annotations

import math

import pyarrow as pa
import pytest
from pydantic import ValidationError

from evoforge.tasks.finetune.config import CollapseGuardConfig, FinetuneConfig
from evoforge.tasks.finetune.guard import guard_decision, hold_out


def sft_rows(n: int) -> pa.Table:
    return pa.Table.from_pylist([{"prompt": f"What is {i} + {i + 3}?", "completion": f"{i} + {i + 3} = {2 * i + 3}.\n\\boxed{{{2 * i + 3}}}"}
                                 for i in range(n)])


@pytest.mark.unit
def test_the_entropy_floor_fires_after_training_but_never_on_the_baseline():
    config = CollapseGuardConfig(entropy_floor=0.05, max_loss_rise=None)
    assert guard_decision([{"step": 0, "entropy": 0.01}], config) is None  # the baseline is what training is judged against
    history = [{"step": 0, "entropy": 2.0}, {"step": 10, "entropy": 0.031}]
    assert guard_decision(history, config) == "held-out entropy 0.031 < floor 0.05 at step 10"
    assert guard_decision(history[:1] + [{"step": 10, "entropy": 0.05}], config) is None  # at the floor is not below it
    assert guard_decision([], config) is None


@pytest.mark.unit
def test_the_loss_rule_fires_on_a_rise_over_the_best_loss_so_far_not_the_first():
    config = CollapseGuardConfig(max_loss_rise=0.5)
    history = [{"step": 0, "loss": 3.0}, {"step": 10, "loss": 1.8}, {"step": 20, "loss": 2.91}]
    # 2.91 is below 1.5 x the first loss (4.5) but above 1.5 x the best (2.7)
    assert guard_decision(history, config) == "held-out loss 2.91 > 1.5 x best 1.80 at step 20"
    assert guard_decision(history[:2], config) is None  # falling is fine
    assert guard_decision(history[:2] + [{"step": 20, "loss": 2.7}], config) is None  # exactly 1.5 x best: within bounds
    assert guard_decision(history, CollapseGuardConfig(max_loss_rise=None)) is None  # the rule switched off


@pytest.mark.unit
def test_nothing_fires_within_bounds():
    config = CollapseGuardConfig(entropy_floor=0.5, max_loss_rise=0.25)
    history = [{"step": 0, "loss": 2.0, "entropy": 3.0}, {"step": 5, "loss": 1.6, "entropy": 1.0},
               {"step": 10, "loss": 1.9, "entropy": 0.6}]
    assert guard_decision(history, config) is None
    for rows in range(1, len(history) + 1):
        assert guard_decision(history[:rows], config) is None


@pytest.mark.unit
def test_a_history_without_loss_grpo_like_never_fires_the_loss_rule():
    history = [{"step": 0, "loss": None, "entropy": 5.0}, {"step": 10, "loss": None, "entropy": 4.0},
               {"step": 20, "entropy": 6.0}]
    assert guard_decision(history, CollapseGuardConfig(max_loss_rise=0.01)) is None
    assert guard_decision(history[:2], CollapseGuardConfig(max_loss_rise=0.01, entropy_floor=4.5)) == \
        "held-out entropy 4.000 < floor 4.5 at step 10"


@pytest.mark.unit
def test_guard_settings_are_checked():
    assert FinetuneConfig().guard == CollapseGuardConfig()  # on by default: the loss rule, 8 rows, every 10 steps
    for bad in ({"eval_steps": 0}, {"held_out_rows": -1}, {"entropy_floor": 0}, {"max_loss_rise": -0.1},
                {"samples": 0}, {"max_tokens": 0}, {"temperature": 0}):
        with pytest.raises(ValidationError):
            FinetuneConfig(guard=bad)


@pytest.mark.unit
def test_held_out_rows_leave_training_the_same_way_every_time():
    import datasets

    rows = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": f"q{i}"}], "completion": f"a{i}"}
                                       for i in range(6)])
    config = FinetuneConfig(guard={"held_out_rows": 2, "held_out_share": 0.5})
    train, held = hold_out(rows, "sft", config)
    assert len(train) == 4 and len(held) == 2
    assert sorted(r["completion"] for r in [*train, *held]) == [f"a{i}" for i in range(6)]
    again, held_again = hold_out(rows, "sft", config)
    assert list(held_again["completion"]) == list(held["completion"]) and list(again["completion"]) == list(train["completion"])
    other = hold_out(rows, "sft", config.model_copy(update={"seed": 7}))[1]
    assert len(other) == 2
    unguarded = [
        hold_out(rows, "sft", FinetuneConfig(guard={"held_out_share": 0.1})),  # 6 rows cannot spare one
        hold_out(rows, "sft", FinetuneConfig(guard={"held_out_rows": 0})),  # switched off
        hold_out(rows, "sft", FinetuneConfig(guard={"max_loss_rise": None})),  # nothing to measure
        hold_out(rows, "grpo", FinetuneConfig()),  # no reference completion, no entropy floor
        hold_out(rows, "ppm", FinetuneConfig()),  # a reward model: never guarded
    ]
    assert all(train is rows and held is None for train, held in unguarded)
    grpo_train, grpo_held = hold_out(rows, "grpo", FinetuneConfig(guard={"held_out_rows": 1, "entropy_floor": 0.1}))
    assert len(grpo_train) == 5 and len(grpo_held) == 1
    capped = hold_out(rows, "sft", FinetuneConfig())[1]  # 8 asked for, at most a quarter of 6 given
    assert len(capped) == 1


@pytest.mark.model
def test_sft_stops_at_the_first_check_under_an_impossible_entropy_floor(tiny_model, scratch):
    from transformers import AutoModelForCausalLM

    from evoforge.tasks.finetune.training import train_in_process

    config = FinetuneConfig(method="sft", max_steps=6, batch_size=2, learning_rate=1e-3, few_shot=False,
                            guard={"eval_steps": 2, "held_out_rows": 2, "held_out_share": 0.5, "entropy_floor": 1e6, "max_tokens": 8})
    folder = scratch / "ckpt"
    result = train_in_process(str(tiny_model), {"sft": sft_rows(6)}, config, folder)
    assert result["steps"] == 2 < config.max_steps
    assert result["stopped_early"].startswith("sft: held-out entropy ") and result["stopped_early"].endswith(
        "< floor 1e+06 at step 2")
    guard = [m for m in result["metrics"] if "guard_entropy" in m]
    assert [m["step"] for m in guard] == [0, 2]  # the baseline, then every eval_steps
    assert all(isinstance(m[k], float) and math.isfinite(m[k]) and m[k] > 0
               for m in guard for k in ("guard_entropy", "guard_loss"))
    assert [m["step"] for m in result["metrics"] if "loss" in m] == [1, 2] and math.isfinite(result["final_loss"])
    assert AutoModelForCausalLM.from_pretrained(folder).config.model_type == "llama"
    assert not list(scratch.glob(".*staging*"))


@pytest.mark.model
def test_the_held_out_rows_are_not_in_the_trainers_dataset(tiny_model, scratch, monkeypatch):
    import trl
    from transformers import AutoTokenizer

    from evoforge.tasks.finetune.guard import CollapseGuard
    from evoforge.tasks.finetune.training import train_in_process

    seen = {}
    original = trl.SFTTrainer.train

    def spy(self, *args, **kwargs):
        tokenizer = AutoTokenizer.from_pretrained(tiny_model)
        seen["trained"] = [tokenizer.decode(row["input_ids"]) for row in self.train_dataset]
        guard = next(c for c in self.callback_handler.callbacks if isinstance(c, CollapseGuard))
        seen["held_out"] = [prompt[-1]["content"] for prompt in guard.prompts]
        return original(self, *args, **kwargs)

    monkeypatch.setattr(trl.SFTTrainer, "train", spy)
    config = FinetuneConfig(method="sft", max_steps=1, batch_size=2, few_shot=False, guard={"held_out_rows": 2, "held_out_share": 0.5})
    result = train_in_process(str(tiny_model), {"sft": sft_rows(6)}, config, scratch / "ckpt")
    questions = sft_rows(6)["prompt"].to_pylist()
    assert len(seen["trained"]) == 4 and len(seen["held_out"]) == 2
    trained = [q for q in questions if any(q in text for text in seen["trained"])]
    assert sorted(trained + seen["held_out"]) == sorted(questions) and not set(trained) & set(seen["held_out"])
    # the loss rule alone (the default): a baseline, no entropy, and no early stop at the last step
    assert [m["step"] for m in result["metrics"] if "guard_loss" in m] == [0]
    assert not any("guard_entropy" in m for m in result["metrics"]) and result["stopped_early"] is None


@pytest.mark.model
def test_grpo_stops_on_the_entropy_floor_with_no_loss_rule(tiny_model, scratch):
    from evoforge.tasks.finetune.training import train_in_process

    prompts = pa.Table.from_pylist([{"problem_id": f"p{i}", "question": f"What is {i} + 4?", "answer": str(i + 4)}
                                    for i in range(3)])
    config = FinetuneConfig(method="grpo", max_steps=3, batch_size=4, grpo={"generations": 4, "max_completion_tokens": 8}, generation="hf",
                            learning_rate=1e-3, few_shot=False,
                            guard={"eval_steps": 1, "held_out_rows": 1, "held_out_share": 0.5, "entropy_floor": 1e6, "max_tokens": 8, "samples": 2})
    result = train_in_process(str(tiny_model), {"grpo": prompts}, config, scratch / "ckpt")
    assert result["steps"] == 1 and result["stopped_early"].startswith("grpo: held-out entropy ")
    guard = [m for m in result["metrics"] if "guard_entropy" in m]
    assert [m["step"] for m in guard] == [0, 1] and not any("guard_loss" in m for m in result["metrics"])
    assert [m["step"] for m in result["metrics"] if "loss" in m] == [1]
    assert (scratch / "ckpt" / "model.safetensors").exists()


@pytest.mark.model
def test_a_resumed_chain_still_reports_the_early_stop_of_a_finished_phase(tiny_model, scratch, monkeypatch):
    import trl

    from evoforge.tasks.finetune.training import train_in_process

    config = FinetuneConfig(method="sft+sft", max_steps=4, batch_size=2, learning_rate=1e-3, few_shot=False,
                            guard={"eval_steps": 2, "held_out_rows": 2, "held_out_share": 0.5, "entropy_floor": 1e6, "max_tokens": 4})
    folder = scratch / "ckpt"
    original = trl.SFTTrainer.training_step
    phases = []

    def crash_in_the_second_phase(self, *args, **kwargs):
        if "trainer-1-sft" in self.args.output_dir:
            raise RuntimeError("simulated crash")
        phases.append(self.args.output_dir)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(trl.SFTTrainer, "training_step", crash_in_the_second_phase)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_in_process(str(tiny_model), {"sft": sft_rows(6)}, config, folder)
    assert len(phases) == 2  # the first phase stopped at step 2 of 4
    staging = scratch / ".ckpt.staging"
    assert "sft: held-out entropy" in (staging / "finished-0-sft" / "stopped.json").read_text()

    monkeypatch.setattr(trl.SFTTrainer, "training_step", original)
    result = train_in_process(str(tiny_model), {"sft": sft_rows(6)}, config, folder)
    assert result["stopped_early"].startswith("sft: held-out entropy ") and result["stopped_early"].endswith("at step 2")
    assert result["steps"] == 4  # 2 + 2: each phase counts the steps it ran
    assert [(m["step"], m["method"]) for m in result["metrics"] if "loss" in m] == [(1, "sft"), (2, "sft"), (3, "sft"), (4, "sft")]
    assert [m["step"] for m in result["metrics"] if "guard_entropy" in m] == [0, 2, 2, 4]
    assert (folder / "model.safetensors").exists()


@pytest.mark.model
def test_a_trainer_resumed_mid_phase_keeps_its_guard_history(tiny_model, scratch, monkeypatch):
    import trl

    from evoforge.tasks.finetune.guard import CollapseGuard
    from evoforge.tasks.finetune.training import train_in_process

    config = FinetuneConfig(method="sft", max_steps=4, batch_size=2, checkpoint_steps=1, learning_rate=1e-3, few_shot=False,
                            guard={"eval_steps": 2, "held_out_rows": 2, "held_out_share": 0.5, "max_loss_rise": 100.0})
    original_step, original_measure = trl.SFTTrainer.training_step, CollapseGuard.measure
    measured = []

    def crash_at_step_three(self, *args, **kwargs):
        if self.state.global_step >= 2:
            raise RuntimeError("simulated crash")
        return original_step(self, *args, **kwargs)

    def count(self, model):
        measured.append(self)
        return original_measure(self, model)

    monkeypatch.setattr(CollapseGuard, "measure", count)
    monkeypatch.setattr(trl.SFTTrainer, "training_step", crash_at_step_three)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_in_process(str(tiny_model), {"sft": sft_rows(6)}, config, scratch / "ckpt")
    assert len(measured) == 2  # the baseline and step 2, saved with the trainer state at checkpoint-2
    monkeypatch.setattr(trl.SFTTrainer, "training_step", original_step)
    result = train_in_process(str(tiny_model), {"sft": sft_rows(6)}, config, scratch / "ckpt")
    assert len(measured) == 3  # only step 4: no second baseline
    assert [m["step"] for m in result["metrics"] if "guard_loss" in m] == [0, 2, 4]
    assert [m["step"] for m in result["metrics"] if "loss" in m] == [1, 2, 3, 4]
    assert result["steps"] == 4 and result["stopped_early"] is None
