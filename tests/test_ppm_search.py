"""rStar-Math's PPM where the paper uses it, end to end on the tiny model: PPM-augmented MCTS (each new
step's Q starts at the PPM's score, a step cut at the depth limit is valued by it) and test-time search in
evaluate (the PPM picks one of each problem's samples), beside plain sampling, with intervals, against a
baseline measured a round earlier and picked again by the same PPM. The PPM here is the tiny model with a
fresh scoring head: the machinery is what is under test, not its judgement."""
from __future__ import annotations

import shutil

import pyarrow as pa
import pytest

from evoforge.data import schemas


def _ppm_folder(tiny_model, folder):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1)
    model.config.pad_token_id = model.config.eos_token_id
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(folder)
    return folder


def _checkpoint(role: str, path, parent: str) -> dict:
    from evoforge.models.registry import resolve

    return dict(checkpoint_id=f"{role}-x", parent_model_id=parent, role=role, method="traces" if role == "policy" else "ppm",
                path=str(path), model_id=resolve(str(path)).model_id, data_fingerprint="d", train_rows=1, steps=1,
                final_loss=0.0, wall_seconds=1.0, stopped_early=None, base_model_id=None, adapter=False, processes=1,
                tracking=None)


@pytest.mark.model
@pytest.mark.server
def test_ppm_augmented_search_and_ppm_best_of_n_run_through_the_stages(write_jsonl, prefect_server, runs_root,
                                                                        tiny_engine_config, tiny_model, scratch):
    from evoforge.data import catalog
    from evoforge.data.lake import lake
    from evoforge.flows.config import RoundConfig
    from evoforge.flows.round import round_flow
    from evoforge.models.registry import resolve

    source = write_jsonl(scratch / "pool.jsonl", [{"question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(3)])
    held_out = write_jsonl(scratch / "held.jsonl", [{"question": f"What is {i} + 2?", "answer": str(i + 2)} for i in range(3)])
    config = RoundConfig.model_validate({
        "engine": tiny_engine_config.model_dump(), "sources": [{"path": str(source), "preset": "plain"}],
        "mcts": {"rollouts": 3, "max_depth": 1, "children": 2, "use_ppm": True, "ppm_q_init": True,
                 "step": {"max_tokens": 16}},
        "evaluate": {"sets": [{"name": "held", "path": str(held_out), "preset": "plain"}], "search": "ppm_best_of_n",
                     "sampling": {"n": 3, "max_tokens": 16, "seed": 5}, "pass_k": [1, 3]},
        "stages": ["evaluate"]})
    store = lake()
    # round 0 measures the starting model; no PPM exists yet, so plain sampling only
    assert [r.status for r in round_flow("ppm", config, round=0) if r.stage == "evaluate"] == ["completed"]
    assert set(store.read("ppm", "eval_results", 0, "evaluate")["search"].to_pylist()) == {"none"}

    ppm = _ppm_folder(tiny_model, scratch / "ppm")
    trained = scratch / "trained"  # the round's "trained" policy: the same weights, so its picks must equal the baseline's
    shutil.copytree(tiny_model, trained)
    start = resolve(str(tiny_model)).model_id
    store.publish_stage("ppm", 0, "finetune", {"checkpoints": pa.Table.from_pylist([_checkpoint("ppm", ppm, start)],
                                                                                    schema=schemas.CHECKPOINTS)})
    store.publish_stage("ppm", 1, "finetune", {"checkpoints": pa.Table.from_pylist(
        [_checkpoint("policy", trained, start), _checkpoint("ppm", ppm, start)], schema=schemas.CHECKPOINTS)})
    results = round_flow("ppm", config.model_copy(update={"stages": ["mcts", "evaluate"]}), round=1)
    assert [r.status for r in results] == ["completed", "completed"]

    con = catalog.connect(store.run_dir("ppm"))
    # the search ran with the PPM (the random tiny model writes no runnable step for it to score: what Q-init does
    # to the values is tests/test_mcts.py's scripted search)
    assert con.execute("SELECT count(*) FROM mcts_nodes WHERE depth = 1").fetchone()[0] > 0
    (mcts_model,) = con.execute("SELECT DISTINCT model_id FROM stage_runs WHERE stage = 'mcts'").fetchall()[0]
    assert mcts_model.endswith(f"+{resolve(str(ppm)).model_id}")

    rows = con.execute("SELECT model_round, search, count(*), sum(n) FROM eval_results WHERE round = 1 "
                       "GROUP BY ALL ORDER BY ALL").fetchall()
    assert rows == [(2, "none", 3, 9), (2, "ppm_best_of_n", 3, 3)]  # 3 samples a problem; the PPM's 1 pick of them
    shown = {(r["model_round"], r["search"]) for r in catalog.query(con, "held_out")}
    assert shown == {(0, "none"), (2, "none"), (2, "ppm_best_of_n")}
    picks = [i for i in catalog.query(con, "intervals") if i["search"] == "ppm_best_of_n"]
    assert [(i["metric"], i["baseline_model_round"], i["paired_problems"]) for i in picks] == [("pass@1", 0, 3)]
    assert picks[0]["low"] <= picks[0]["estimate"] <= picks[0]["high"]
    assert picks[0]["change"] == 0.0  # same weights, same samples, one PPM: the re-picked baseline picks the same
