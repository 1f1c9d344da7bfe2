"""Lake contents tests build on: the rows each stage leaves, without running the stage."""
from __future__ import annotations

import pyarrow as pa

from evoforge.data import schemas


def seed_every_methods_rows(run: str) -> None:
    """The tables each method reads, as the stages before finetune leave them (flows/finetune.py training_data)."""
    from evoforge.data.lake import lake

    store = lake()
    solution = lambda i: f"{i} + 4 = {i + 4}. The answer is \\boxed{{{i + 4}}}."  # noqa: E731
    ids = [f"p{i}" for i in range(4)]
    table = lambda rows, schema: pa.Table.from_pylist(rows, schema=schema)  # noqa: E731
    store.publish_stage(run, 0, "ingest", {"problems": table([
        dict(problem_id=p, question=f"What is {i} + 4?", answer=str(i + 4), source="t", source_file="f", source_row=i,
             origin="seed", expert_answer=solution(i)) for i, p in enumerate(ids)], schemas.PROBLEMS)})
    store.publish_stage(run, 0, "generate", {"rollouts": table([
        dict(rollout_id=f"r{i}", problem_id=p, model_id="m", seed=i, sample_index=0, text=f"\\boxed{{{i}}}",
             completion_tokens=4, finish_reason="stop", mean_logprob=-1.0) for i, p in enumerate(ids)], schemas.ROLLOUTS)})
    store.publish_stage(run, 0, "verify", {"verdicts": table([
        dict(rollout_id=f"r{i}", problem_id=p, verdict="correct" if i == 0 else "wrong", extracted_answer=str(i),
             gold=str(i + 4), detail=None, seconds=0.01, graded_with="math-verify")
        for i, p in enumerate(ids)], schemas.VERDICTS)})
    store.publish_stage(run, 0, "filter", {"problem_stats": table([
        dict(problem_id=p, n=8, correct=2 + i, accuracy=(2 + i) / 8, pass_at_k=[(1, (2 + i) / 8)], mean_tokens=30.0,
             bucket="underperforming" if i < 2 else "learnable") for i, p in enumerate(ids)], schemas.PROBLEM_STATS)})
    store.publish_stage(run, 0, "critic", {"judgments": table([
        dict(judgment_id=f"j{i}", problem_id=p, rollout_id=f"r{i}", order="policy_first", label="expert", parsed_ok=True,
             critic_reward=1.0, policy_reward=0.0, critic_model_id="m") for i, p in enumerate(ids)], schemas.JUDGMENTS)})
    store.publish_stage(run, 0, "synthesize", {"problems": schemas.PROBLEMS.empty_table()})
    store.publish_stage(run, 0, "pairs", {
        "sft_examples": table([dict(example_id=f"e{i}", problem_id=p, rollout_id=f"r{i}", prompt=f"What is {i} + 4?",
                                    completion=solution(i), bucket="learnable", origin="seed") for i, p in enumerate(ids)],
                              schemas.SFT_EXAMPLES),
        "pairs": table([dict(pair_id=f"{kind}{i}", kind=kind, problem_id=p, prompt=f"What is {i} + 4?",
                             prefix="x = 1\n" if kind == "step" else None, chosen=solution(i),
                             rejected=f"The answer is \\boxed{{{i}}}.", chosen_rollout_id="a", rejected_rollout_id="b",
                             chosen_score=1.0, rejected_score=-1.0) for i, p in enumerate(ids) for kind in ("solution", "step")],
                       schemas.PAIRS)})
    store.publish_stage(run, 0, "mcts", {"mcts_nodes": schemas.MCTS_NODES.empty_table(), "traces": table([
        dict(trace_id=f"t{i}", problem_id=p, tree_id="t", node_ids=["a"], prompt=f"What is {i} + 4?",
             completion=f"x = {i} + 4\nprint(x)\n<end_of_step>\n<output>{i + 4}</output>\nThe answer is \\boxed{{{i + 4}}}",
             answer=str(i + 4), mean_q=1.0, depth=1) for i, p in enumerate(ids)], schemas.TRACES)})
