"""rStar-Math search: UCT and backup on a hand-built tree, the per-depth batched search with a
scripted policy (exact tree shape and values), and a real tiny-model search through vLLM and the sandbox."""
from __future__ import annotations

import math

import pyarrow as pa
import pytest

from evoforge.models.prompts import STEP_SYSTEM
from evoforge.tasks.mcts import MCTSConfig, Node, backup, leaf_reward, parse_step, search, select, uct
from evoforge.tasks.verify import VerifyConfig


def node(name, parent=None, status="ok", visits=0, value=0.0):
    n = Node(name, "t", "p", parent, parent.depth + 1 if parent else 0, status=status, visits=visits, value=value)
    if parent:
        parent.children.append(n)
    return n


@pytest.mark.unit
def test_uct_prefers_unvisited_then_balances_value_and_exploration():
    root = node("root", status="root", visits=10)
    strong, weak = node("a", root, visits=6, value=3.0), node("b", root, visits=4, value=-2.0)
    assert uct(strong, 10, 0.0) == pytest.approx(0.5) and uct(weak, 10, 0.0) == pytest.approx(-0.5)
    assert uct(weak, 10, 2.0) == pytest.approx(-0.5 + 2 * math.sqrt(math.log(10) / 4))
    assert select(root, 0.0) is strong
    fresh = node("c", root)
    assert uct(fresh, 10, 2.0) == math.inf and select(root, 2.0) is fresh


@pytest.mark.unit
def test_selection_skips_failed_steps_and_exhausted_subtrees():
    root = node("root", status="root", visits=3)
    dead = node("dead", root, visits=2, value=2.0)
    node("e1", dead, status="error", visits=1, value=-1.0)
    node("e2", dead, status="unparsed", visits=1, value=-1.0)
    node("failed", root, status="error", visits=1, value=-1.0)
    assert not dead.selectable() and select(root, 1.0) is None  # everything under the root failed
    alive = node("alive", root)
    assert select(root, 1.0) is alive


@pytest.mark.unit
def test_backup_adds_the_reward_along_the_path_and_visits_add_up():
    root = node("root", status="root")
    a = node("a", root)
    right = node("right", a, status="terminal")
    right.correct = True
    wrong = node("wrong", a, status="terminal")
    wrong.correct = False
    failed = node("failed", root, status="error")
    for leaf in (right, wrong, failed, right):
        backup(leaf, leaf_reward(leaf))
    assert (root.visits, root.value) == (4, 0.0) and (a.visits, a.value) == (3, 1.0)
    assert right.q == 1.0 and wrong.q == -1.0 and failed.q == -1.0
    assert root.visits == sum(c.visits for c in root.children) and a.visits == sum(c.visits for c in a.children)


@pytest.mark.unit
def test_parse_step_reads_final_answers_and_code():
    assert parse_step("The total is 12. The answer is \\boxed{12} ") == ("final", "12")
    assert parse_step("# count the pens\npens = 3 * 4\nprint(pens)\n") == ("code", "# count the pens\npens = 3 * 4\nprint(pens)")
    assert parse_step("```python\nx = 2\nprint(x)\n```") == ("code", "x = 2\nprint(x)")
    assert parse_step("   ") == ("code", "")


def scripted_steps(request, n):
    """Steps by depth: a right path, a wrong answer, a crash."""
    assert request.messages[0]["content"] == STEP_SYSTEM
    depth = request.assistant_prefix.count("<end_of_step>")
    if depth == 0:
        steps = ["# pens in the boxes\npens = 3 * 4\nprint(pens)", "print(undefined_name)", "The answer is \\boxed{99}"]
    else:
        assert "<output>12</output>" in request.assistant_prefix  # the first step's output is in context
        steps = ["The answer is \\boxed{12}", "The answer is \\boxed{13}", "# more\nprint(pens + 0)"]
    return [steps[i % len(steps)] for i in range(n)]


@pytest.mark.unit
def test_search_batches_every_tree_per_depth_and_writes_consistent_trees(scripted_engine):
    problems = pa.table({"problem_id": ["p1", "p2"], "question": ["3 boxes of 4 pens?"] * 2, "answer": ["12", "12"]})
    policy = scripted_engine(scripted_steps, "scripted-steps@test")
    config = MCTSConfig(rollouts=3, max_depth=3, children=3)
    out = search(problems, policy, config, VerifyConfig(workers=1))
    nodes = out["mcts_nodes"].to_pylist()
    assert policy.calls[:2] == [2, 2]  # both trees expanded in one engine call at each depth
    by_id = {n["node_id"]: n for n in nodes}
    for tree in ("p1", "p2"):
        tree_nodes = [n for n in nodes if n["problem_id"] == tree]
        roots = [n for n in tree_nodes if n["parent_id"] is None]
        assert len(roots) == 1 and all(n["parent_id"] in by_id for n in tree_nodes if n["parent_id"])
        for n in tree_nodes:  # visits of an expanded node are its children's, summed
            kids = [k for k in tree_nodes if k["parent_id"] == n["node_id"]]
            if kids:
                assert n["visits"] == sum(k["visits"] for k in kids)
        depth1 = {n["exec_status"] for n in tree_nodes if n["depth"] == 1}
        assert depth1 == {"ok", "error", "terminal"}
        ok = next(n for n in tree_nodes if n["depth"] == 1 and n["exec_status"] == "ok")
        assert ok["exec_output"].strip() == "12"
        assert next(n for n in tree_nodes if n["answer"] == "12")["correct"] is True
        assert next(n for n in tree_nodes if n["answer"] == "99")["correct"] is False
        continued = next(n for n in tree_nodes if n["depth"] == 2 and n["code"])
        assert continued["exec_output"].strip() == "12"  # the earlier step's variables carried over
    traces = out["traces"].to_pylist()
    assert {t["problem_id"] for t in traces} == {"p1", "p2"} and all(t["answer"] == "12" for t in traces)
    assert all(len(t["node_ids"]) == t["depth"] and t["depth"] in (2, 3) for t in traces)
    assert "<output>12</output>" in traces[0]["completion"] and traces[0]["completion"].endswith("\\boxed{12}")


@pytest.mark.model
def test_a_tiny_model_search_through_vllm_and_the_sandbox_writes_trees(tiny_engine_config):
    from evoforge.models.loader import load_engine

    problems = pa.table({"problem_id": ["a", "b", "c"], "question": ["What is 2 + 3?", "What is 4 * 5?", "What is 9 - 1?"],
                         "answer": ["5", "20", "8"]})
    config = MCTSConfig(rollouts=2, max_depth=2, children=2)
    config.step.max_tokens = 24
    out = search(problems, load_engine(tiny_engine_config), config, VerifyConfig(workers=1))
    nodes = out["mcts_nodes"].to_pylist()
    ids = {n["node_id"] for n in nodes}
    assert len(ids) == len(nodes) and {n["problem_id"] for n in nodes if n["parent_id"] is None} == {"a", "b", "c"}
    assert all(n["parent_id"] in ids for n in nodes if n["parent_id"])
    assert all(n["exec_status"] in ("root", "ok", "terminal", "cut", "error", "timeout", "unparsed") for n in nodes)
    for n in nodes:
        kids = [k for k in nodes if k["parent_id"] == n["node_id"]]
        if kids:
            assert n["visits"] == sum(k["visits"] for k in kids)
    assert sum(1 for n in nodes if n["depth"] == 1) == 3 * 2  # the first rollout expands each root with k = 2


def crafted_tree():
    """root -> a (leads to correct and wrong), b (only wrong), c (only failed); a -> a1 correct, a2 wrong."""
    def row(node_id, parent, q, visits, text, status="ok", correct=None):
        return dict(node_id=node_id, tree_id="t", problem_id="p", parent_id=parent, depth=0 if parent is None else 1,
                    step_text=text, code=None, exec_output="", exec_status=status, visits=visits, q_value=q,
                    is_terminal=status == "terminal", answer=None, correct=correct)
    from evoforge.data import schemas

    return pa.Table.from_pylist([
        row("root", None, 0.0, 5, ""),
        row("a", "root", 0.0, 2, "# multiply the boxes by the pens\nx = 3 * 4\nprint(x)"),
        row("a1", "a", 1.0, 1, "The answer is \\boxed{12}", "terminal", True),
        row("a2", "a", -1.0, 1, "It is 3 + 4 = 7, so \\boxed{7}", "terminal", False),
        row("b", "root", -1.0, 2, "# add them\nx = 3 + 4\nprint(x)"),
        row("b1", "b", -1.0, 2, "The answer is \\boxed{7}", "terminal", False),
        row("c", "root", -1.0, 1, "print(undefined)", "error"),
    ], schema=schemas.MCTS_NODES)


@pytest.mark.unit
def test_step_pairs_contrast_correct_leading_with_wrong_leading_siblings():
    from evoforge.tasks.pairs import PairsConfig, build_step_pairs

    pairs = build_step_pairs(crafted_tree(), {"p": "3 boxes of 4 pens?"}, PairsConfig()).to_pylist()
    at_root = sorted((p["chosen_rollout_id"], p["rejected_rollout_id"]) for p in pairs if p["prefix"] == "")
    assert at_root == [("a", "b"), ("a", "c")]  # top correct-leading vs the bottom-2 wrong-leading
    at_a = [p for p in pairs if p["prefix"]]
    assert [(p["chosen_rollout_id"], p["rejected_rollout_id"]) for p in at_a] == [("a1", "a2")]
    assert at_a[0]["prefix"].startswith("# multiply the boxes") and "<end_of_step>" in at_a[0]["prefix"]
    assert all(p["kind"] == "step" and p["chosen_score"] - p["rejected_score"] >= 0.5 for p in pairs)


@pytest.mark.unit
def test_no_step_pair_without_both_kinds_of_children_or_past_the_thresholds():
    from evoforge.tasks.pairs import PairsConfig, build_step_pairs

    tree = crafted_tree().to_pylist()
    only_wrong = pa.Table.from_pylist([r for r in tree if r["node_id"] not in ("a", "a1", "a2")], schema=crafted_tree().schema)
    assert build_step_pairs(only_wrong, {}, PairsConfig()).num_rows == 0  # no correct-leading sibling anywhere
    assert build_step_pairs(crafted_tree(), {}, PairsConfig(step_min_q_margin=2.5)).num_rows == 0
    assert build_step_pairs(crafted_tree(), {}, PairsConfig(step_min_edit_distance=0.95)).num_rows == 0
    # two steps that differ in one character are no lesson for the PPM
    tree = crafted_tree().to_pylist()
    for r in tree:
        if r["node_id"] == "a2":
            r["step_text"] = "The answer is \\boxed{13}"
    same = build_step_pairs(pa.Table.from_pylist(tree, schema=crafted_tree().schema), {}, PairsConfig()).to_pylist()
    assert ("a1", "a2") not in [(p["chosen_rollout_id"], p["rejected_rollout_id"]) for p in same]


@pytest.mark.model
@pytest.mark.server
def test_the_mcts_stage_writes_trees_the_catalog_and_named_queries_read(write_jsonl, prefect_server, runs_root, tiny_engine_config, scratch):
    from evoforge.data import catalog
    from evoforge.data.lake import lake
    from evoforge.flows.config import RoundConfig
    from evoforge.flows.round import round_flow
    from evoforge.tasks.ingest import SourceConfig

    source = write_jsonl(scratch / "pool.jsonl", [{"question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(3)])
    config = RoundConfig(engine=tiny_engine_config, sources=[SourceConfig(path=str(source), preset="plain")],
                         mcts=MCTSConfig(rollouts=1, max_depth=2, children=2), stages=["mcts"])
    config.mcts.step.max_tokens = 16
    (result,) = [r for r in round_flow("trees", config, round=0) if r.stage == "mcts"]
    assert result.status == "completed" and result.rows_in == 3
    con = catalog.connect(lake().run_dir("trees"))
    assert con.execute("SELECT count(*) FROM mcts_nodes WHERE parent_id IS NULL").fetchone()[0] == 3
    assert con.execute("SELECT count(*) FROM mcts_nodes WHERE depth = 1").fetchone()[0] == 6
    shape = con.execute(catalog.resolve_query("tree_shape")).fetchall()
    assert len(shape) == 3 and all(row[5] == 2 for row in shape)  # each root expanded with k = 2
    (outcomes,) = con.execute(catalog.resolve_query("step_outcomes")).fetchall()
    assert outcomes[1] == 6
    con.execute(catalog.resolve_query("q_by_depth")).fetchall()


@pytest.mark.unit
def test_a_step_scorer_sees_each_runnable_step_in_its_context(scripted_engine):
    problems = pa.table({"problem_id": ["p1"], "question": ["3 boxes of 4 pens?"], "answer": ["12"]})
    seen = []

    def scorer(texts):
        seen.extend(texts)
        return [1.0 if "pens + 0" in t else 0.0 for t in texts]

    search(problems, scripted_engine(scripted_steps, "scripted-steps@test"), MCTSConfig(rollouts=2, max_depth=3, children=3), VerifyConfig(workers=1),
              step_scorer=scorer)
    assert seen and all(t.startswith("3 boxes of 4 pens?\n\n") for t in seen)
    assert any(t.endswith("pens = 3 * 4\nprint(pens)") for t in seen)  # a first step, no prefix
    deeper = [t for t in seen if "print(pens + 0)" in t]
    assert deeper and all("<output>12</output>" in t for t in deeper)  # later steps carry the earlier output


@pytest.mark.unit
def test_ppm_q_init_lets_a_proven_step_go_before_an_unvisited_one_the_ppm_rates_low():
    """rStar-Math rounds 3-4: a new step's Q starts at the PPM's score (one virtual visit), so UCT is no longer
    infinite for an unvisited step; without it the unvisited step always goes first."""
    root = node("root", status="root", visits=2)
    proven = node("proven", root, visits=2, value=1.0)
    doubtful = node("doubtful", root)
    assert select(root, 1.0) is doubtful  # plain UCT: unvisited first
    proven.q_init, doubtful.q_init = 0.8, -0.9
    assert proven.q == pytest.approx((0.8 + 1.0) / 3) and doubtful.q == pytest.approx(-0.9)
    assert uct(proven, 2, 1.0) == pytest.approx((0.8 + 1.0) / 3 + math.sqrt(math.log(2) / 3))
    assert uct(doubtful, 2, 1.0) == pytest.approx(-0.9 + math.sqrt(math.log(2) / 1))
    assert select(root, 1.0) is proven
    doubtful.q_init = 0.95  # the PPM likes it: explored first again
    assert select(root, 1.0) is doubtful


@pytest.mark.unit
def test_a_step_cut_at_the_depth_limit_backs_up_the_ppms_score_under_q_init():
    root = node("root", status="root")
    cut = node("cut", root, status="cut")
    assert leaf_reward(cut) == -1.0  # no PPM: an unfinished solution counts as a wrong one
    cut.q_init = 0.4
    backup(cut, leaf_reward(cut))
    assert (root.visits, root.value) == (1, 0.4) and cut.q == pytest.approx((0.4 + 0.4) / 2)
    with pytest.raises(ValueError, match="needs mcts.use_ppm"):
        MCTSConfig(ppm_q_init=True)


@pytest.mark.unit
def test_ppm_q_init_changes_the_search_as_specified(scripted_engine):
    """The same scripted policy and PPM, with and without Q-init: with it every scored step keeps the PPM's
    score as its first Q, and the runnable steps cut at the depth limit back up that score, not -1."""
    problems = pa.table({"problem_id": ["p1"], "question": ["3 boxes of 4 pens?"], "answer": ["12"]})

    def scorer(texts):
        return [0.5 if "pens + 0" in t else 0.25 for t in texts]

    def run(**ppm):
        config = MCTSConfig(rollouts=4, max_depth=2, children=3, use_ppm=True, **ppm)
        nodes = search(problems, scripted_engine(scripted_steps, "scripted-steps@test"), config, VerifyConfig(workers=1),
                          step_scorer=scorer)["mcts_nodes"].to_pylist()
        return {(n["depth"], n["exec_status"], n["code"]): n for n in nodes}

    plain, augmented = run(), run(ppm_q_init=True)
    cut_plain = [n for n in plain.values() if n["exec_status"] == "cut"]
    cut_augmented = [n for n in augmented.values() if n["exec_status"] == "cut"]
    assert cut_plain and cut_augmented
    assert all(n["q_value"] == -1.0 for n in cut_plain)  # cut: -1 per visit
    # cut under Q-init: (score + score * visits) / (visits + 1) = the PPM's score of "print(pens + 0)"
    assert all(n["q_value"] == pytest.approx(0.5) for n in cut_augmented)
    first = augmented[(1, "ok", "# pens in the boxes\npens = 3 * 4\nprint(pens)")]
    assert first["q_value"] != plain[(1, "ok", "# pens in the boxes\npens = 3 * 4\nprint(pens)")]["q_value"]
