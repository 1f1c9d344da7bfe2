"""SvS online (`finetune.method: svs`): the synthesis reward's band rule, one batch out of three kinds of
rows, and a few steps on the tiny model through the finetune processes, with the variants the policy wrote
recorded as `variants` rows (origin 'online')."""
from __future__ import annotations

import math

import pyarrow as pa
import pyarrow.parquet  # noqa: F401 (pa.parquet)
import pytest

from evoforge.tasks.finetune.config import FinetuneConfig


@pytest.mark.unit
def test_a_synthesis_is_rewarded_by_its_variants_accuracy_band():
    from evoforge.tasks.synthesize import synthesis_reward

    band = (0.125, 0.625)
    assert [synthesis_reward(a, 8, band) for a in (0.0, 0.125, 0.5, 0.625, 0.75, 1.0)] == [0, 1, 1, 1, 0, 0]
    assert synthesis_reward(0.5, 8, band, rejected=True) == 0.0  # an answer leak or a copy earns nothing
    assert synthesis_reward(0.5, 0, band) == 0.0  # never solved
    assert synthesis_reward(1 / 8, 8, band) == 1.0 and synthesis_reward(5 / 8, 8, band) == 1.0  # the band is inclusive


@pytest.mark.unit
def test_three_kinds_of_scored_rows_become_one_padded_batch_and_uniform_groups_drop_out():
    import torch

    from evoforge.tasks.finetune.svs import _concat, _rows, group_accuracy

    def scored(rows, prompt_len, completion_len, advantages):
        return {"prompt_ids": torch.full((rows, prompt_len), 7), "prompt_mask": torch.ones(rows, prompt_len, dtype=torch.long),
                "completion_ids": torch.full((rows, completion_len), 9),
                "completion_mask": torch.ones(rows, completion_len, dtype=torch.long),
                "advantages": torch.tensor(advantages), "num_items_in_batch": torch.tensor(rows * completion_len)}

    solve, synth, variant = scored(2, 3, 4, [0.5, -0.5]), scored(2, 5, 2, [0.0, 0.0]), scored(4, 2, 3, [1.0, -1.0, 0.0, 0.0])
    batch = _concat([solve, synth, variant], pad_token_id=0)
    assert batch["prompt_ids"].shape == (8, 5) and batch["completion_ids"].shape == (8, 4)
    assert batch["prompt_ids"][0].tolist() == [0, 0, 7, 7, 7]  # prompts padded on the left
    assert batch["completion_ids"][2].tolist() == [9, 9, 0, 0] and batch["completion_mask"][2].tolist() == [1, 1, 0, 0]
    assert int(batch["num_items_in_batch"]) == 2 * 4 + 2 * 2 + 4 * 3
    kept = _rows(batch, batch["advantages"] != 0)
    assert kept["advantages"].tolist() == [0.5, -0.5, 1.0, -1.0] and int(kept["num_items_in_batch"]) == 2 * 4 + 2 * 3
    assert group_accuracy([1, 0, 0, 0, 1, 1, 1, 1], 4) == [0.25, 1.0]


@pytest.mark.unit
def test_the_ranks_of_a_step_agree_on_its_seeds_and_each_scores_an_equal_share_of_whole_groups():
    from evoforge.tasks.finetune.svs import fill_to_share, local_share, synthesis_seeds

    rows = [{"problem_id": p} for p in "abc" for _ in range(4)]  # three problems, G = 4, as gathered from the ranks
    texts = [f"{p}{i}" for p in "abc" for i in range(4)]
    rewards = [0, 1, 0, 0] + [1, 1, 1, 1] + [0, 0, 1, 1]  # accuracy 0.25 (in the band), 1.0, 0.5 (its upper edge)
    seeds = synthesis_seeds(rows, texts, rewards, 4, (0.125, 0.5))
    assert [(row["problem_id"], text) for row, text in seeds] == [("a", "a1"), ("c", "c2")]  # the first correct one
    # 3 valid variants x G_v = 3 rows over 2 ranks: one more copy of a variant, so no group is cut in two
    assert fill_to_share(["v1", "v2", "v3"], 3, 2) == ["v1", "v2", "v3", "v1"]
    assert fill_to_share(["s1"], 8, 2) == ["s1"] and fill_to_share([], 3, 2) == []
    assert fill_to_share(["s1"], 2, 4) == ["s1", "s1"]
    step = [f"r{i}" for i in range(12)]
    assert local_share(step, 2, 0) + local_share(step, 2, 1) == step and len(local_share(step, 2, 1)) == 6


@pytest.mark.unit
def test_dynamic_sampling_trains_as_many_rows_on_every_rank_and_padding_rows_carry_no_advantage():
    import torch

    from evoforge.tasks.finetune.svs import _pad_rows, _top_up, rows_to_train

    advantages = torch.tensor([0.5, -0.5, 0.0, 0.0, 1.0, 0.0, 0.0])
    keep, target = rows_to_train(advantages, dynamic_sampling=True)
    assert keep.tolist() == [True, True, False, False, True, False, False] and target == 3
    assert rows_to_train(advantages, dynamic_sampling=False)[1] == 7
    # another rank kept 5 rows: this one trains 5 too, the first uninformative rows filling in
    keep, target = rows_to_train(advantages, True, rows_on_busiest_rank=lambda kept: max(int(kept), 5))
    assert target == 5 and _top_up(keep, target).tolist() == [True, True, True, True, True, False, False]
    # nothing informative on any rank: the step trains every row (its forward and backward still run)
    keep, target = rows_to_train(torch.zeros(4), True)
    assert keep.all() and target == 4
    batch = {"advantages": torch.tensor([0.5, -0.5, 1.0]), "completion_ids": torch.arange(6).view(3, 2),
             "kinds": ["solve", "solve", "variant"], "num_items_in_batch": torch.tensor(6)}
    even = _pad_rows(batch, 4)  # e.g. 4 micro-batches a step
    assert even["advantages"].tolist() == [0.5, -0.5, 1.0, 0.0]  # the copy of row 0 has no advantage
    assert even["completion_ids"][3].tolist() == [0, 1] and even["kinds"][3] == "solve"
    assert _pad_rows(batch, 3) is batch


@pytest.mark.unit
def test_a_resumed_phase_forgets_the_rows_its_later_steps_wrote_before_the_interruption(scratch):
    from evoforge.tasks.finetune.training import TABLES, _forget_tables_after, _phase_tables

    folder = scratch / "trainer-0-svs" / TABLES / "variants"
    folder.mkdir(parents=True)
    for step in (1, 2, 3, 4):
        pa.parquet.write_table(pa.table({"step": [step, step]}), folder / f"step-{step:06d}.parquet")
    _forget_tables_after(scratch / "trainer-0-svs", 2)  # resumed from checkpoint-2: steps 3 and 4 train again
    assert sorted(p.name for p in folder.iterdir()) == ["step-000001.parquet", "step-000002.parquet"]
    assert _phase_tables([scratch / "trainer-0-svs"]) == {"variants": [{"step": 1}, {"step": 1}, {"step": 2}, {"step": 2}]}


@pytest.fixture(scope="module")
def parrot(tiny_model, tmp_path_factory):
    """The tiny model taught one reply, whatever it is asked: a variant problem and a boxed 4. Random weights
    never answer; this one answers the problems whose answer is 4 and writes a variant when asked for one."""
    from evoforge.data import home
    from evoforge.tasks.finetune.training import train_in_process

    reply = "Problem: What is two plus two?\n\n\\boxed{4}"
    rows = pa.Table.from_pylist([dict(prompt=f"What is {i} + {4 - i}? Write a new problem.", completion=reply)
                                 for i in range(8)])
    folder = home.home() / ".tmp" / "tests" / f"parrot-{tmp_path_factory.getbasetemp().name}"
    config = FinetuneConfig(method="sft", max_steps=40, batch_size=8, learning_rate=3e-3, few_shot=False, report_to=[],
                            guard={"held_out_rows": 0})
    train_in_process(str(tiny_model), {"sft": rows}, config, folder)
    return folder


@pytest.mark.model
@pytest.mark.parametrize("processes", [1, 2])
def test_svs_trains_solving_synthesizing_and_variant_solving_in_one_update(parrot, scratch, processes):
    """One process, and two (DDP, the same global batch of 4 problems: each rank holds 2): the step's counts are
    the whole step's, and every variant the policy wrote is recorded once."""
    from evoforge.tasks.finetune.launch import train_policy

    problems = pa.Table.from_pylist([dict(problem_id=f"p{i}", question=f"What is {i} + {4 - i if i < 2 else 9}?",
                                          answer="4" if i < 2 else str(i + 9)) for i in range(4)])
    config = FinetuneConfig(method="svs", max_steps=2, batch_size=4 // processes, processes=processes,
                            grpo={"generations": 2, "max_completion_tokens": 24},
                            learning_rate=1e-5, few_shot=False, report_to=[], guard={"held_out_rows": 0},
                            svs={"solve_band": [0.125, 1.0], "synthesis_band": [0.125, 1.0], "variant_generations": 3,
                                 "dynamic_sampling": False})
    result = train_policy(str(parrot), {"svs": problems}, config, scratch / "ckpt")
    assert result["processes"] == processes
    assert result["steps"] == 2 and all(math.isfinite(m["loss"]) for m in result["metrics"] if "loss" in m)
    steps = [m for m in result["metrics"] if "loss" in m]
    solved_fours = [m for m in steps if m["svs/synthesize_rows"] > 0]
    assert solved_fours, steps  # a step whose batch held a problem answered 4 wrote variants from its solution
    for m in solved_fours:  # the trainer's per-kind counts: all three kinds in one batch, every row trained
        assert m["svs/solve_rows"] == 4 and m["svs/synthesize_rows"] % config.grpo.generations == 0
        assert m["svs/variant_rows"] > 0 and m["svs/variant_rows"] % config.svs.variant_generations == 0
        assert m["svs/variant_rows"] % processes == 0  # whole groups, an equal share on each rank
        assert m["svs/rows_trained"] == m["svs/solve_rows"] + m["svs/synthesize_rows"] + m["svs/variant_rows"]
    for name in ("svs/solve_reward", "svs/synthesis_reward", "svs/variant_accuracy", "svs/entropy"):
        assert all(name in m for m in steps)
    variants = result["tables"]["variants"]
    assert variants and {v["origin"] for v in variants} == {"online"}
    assert {v["step"] for v in variants} <= {1, 2} and all(v["answer"] == "4" for v in variants)
    valid = [v for v in variants if v["reject_reason"] in (None, "outside_band")]
    # solved G_v = 3 times (twice that for a variant copied to even out the ranks' shares)
    assert valid and all(v["n"] in (3, 6) and v["reward"] == (1.0 if v["kept"] else 0.0) for v in valid)
    assert len({v["variant_id"] for v in valid}) == len(valid)  # each written once, whichever rank solved it
    assert any(v["reject_reason"] == "near_duplicate_of_pool" for v in variants)  # the same variant twice: once solved
    assert (scratch / "ckpt" / "model.safetensors").exists() and not (scratch / "ckpt" / "tables").exists()


@pytest.mark.model
@pytest.mark.server  # the stage's own Prefect server
def test_an_svs_stage_killed_mid_training_resumes_and_keeps_each_steps_variants_once(parrot, runs_root, scratch):
    """kill -9 of the stage while svs trains: the rerun resumes from the trainer's last saved state, trains the
    steps after it again, and the variants of those steps come from the run that finished, not both."""
    import os
    import signal
    import subprocess

    from evoforge.data import home, schemas
    from evoforge.data.lake import lake
    from test_training_processes import WORKER, finetune_stage_until_saved, trainers
    from waiting import wait_until

    run, store = "svs-crash", lake()
    store.publish_stage(run, 0, "ingest", {"problems": pa.Table.from_pylist([
        dict(problem_id=f"p{i}", question=f"What is {i} + {4 - i}?", answer="4", source="t", source_file="f", source_row=i,
             origin="seed") for i in range(4)], schema=schemas.PROBLEMS)})
    store.publish_stage(run, 0, "synthesize", {"problems": schemas.PROBLEMS.empty_table()})
    config = {"engine": {"model": str(parrot), "max_model_len": 1024}, "stages": ["finetune"],
              "finetune": {"method": "svs", "max_steps": 4, "checkpoint_steps": 1, "batch_size": 4, "learning_rate": 1e-5,
                           "grpo": {"problems": "all", "generations": 2, "max_completion_tokens": 24},
                           "few_shot": False, "report_to": [], "guard": {"held_out_rows": 0},
                           "svs": {"solve_band": [0.125, 1.0], "synthesis_band": [0.125, 1.0], "variant_generations": 2}}}
    first, saved, command, env = finetune_stage_until_saved(run, config, runs_root, scratch, "trainer-0-svs")
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    wait_until("the trainer died with its stage", lambda: not trainers(WORKER), timeout=60)

    done = subprocess.run(command, cwd=home.PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (row,) = store.read(run, "checkpoints", 0, "finetune").to_pylist()
    log = (store.log_dir(run) / f"finetune-{row['checkpoint_id']}.log").read_text()
    assert saved < 4 and row["steps"] == 4 and "resuming from the trainer state saved at checkpoint-" in log
    steps = [m["step"] for m in store.read(run, "train_metrics", 0, "finetune").to_pylist() if m["metric"] == "loss"]
    assert sorted(steps) == [1, 2, 3, 4]
    variants = store.read(run, "variants", 0, "finetune").to_pylist()
    assert variants and {v["origin"] for v in variants} == {"online"}
    per_step = {s: sum(1 for v in variants if v["step"] == s) for s in {v["step"] for v in variants}}
    # a step's batch holds 2 problems: at most 2 seeds x G = 2 syntheses; a step trained twice (before the kill
    # and after) must not count its syntheses twice
    assert set(per_step) <= {1, 2, 3, 4} and all(count <= 4 for count in per_step.values()), per_step
    assert not trainers()
