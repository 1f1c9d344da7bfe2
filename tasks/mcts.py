"""mcts (rStar-Math, arXiv 2501.04519): step-by-step Monte Carlo tree search with code-augmented steps.

A step is Python whose comments carry the reasoning (models/prompts.py: STEP_SYSTEM); it runs in the
sandbox together with the code of the steps before it, and its printed output joins the context. A
step that gives `\\boxed{}` is terminal and is graded with the verify stage's grader: +1 or -1. A step
whose code fails, times out or has no code gets -1 and is never expanded. Values are backed up the
path; Q = value / visits; selection follows UCT, Q + c * sqrt(ln N_parent / N_child).

Batching is the point: each rollout advances every tree of the batch together, and at each depth
the expansions of ALL trees go to the engine in one call (k samples per leaf) and all their code to
the sandbox pool at once.

Visit counts add up: values are only ever evaluated at leaves (terminal, failed, or cut at the depth
limit), so every expanded node has exactly the visits of its children summed.

With a PPM from an earlier round, `use_ppm` orders the unvisited candidates and picks the simulation path;
`ppm_q_init` adds rStar-Math's PPM-augmented search (rounds 3-4): a new step's Q starts at the PPM's score,
held as one virtual visit (Q = (q_ppm + value) / (visits + 1)), and a step cut at the depth limit backs up
the PPM's score instead of -1. Visit counts stay the real ones.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from evoforge.data import schemas
from evoforge.data.ids import problem_seed, stable_hash
from evoforge.data.section import Section
from evoforge.models.engine import Engine, GenerationRequest, SamplingConfig
from evoforge.models.prompts import ANSWER_END, STEP_END, step_messages, step_prefix
from evoforge.models.sandbox import Sandbox, SandboxConfig
from evoforge.tasks import summary
from evoforge.tasks.grading.answers import last_boxed
from evoforge.tasks.progress import Progress
from evoforge.tasks.verify import VerifyConfig

FAILED = ("error", "timeout", "unparsed")


class MCTSConfig(Section):
    rollouts: int = Field(8, ge=1, description="N: rollouts per tree")
    max_depth: int = Field(6, ge=1, description="D: steps in a solution at most")
    children: int = Field(3, ge=1, description="k: candidate steps sampled per expansion")
    exploration: float = Field(2.0, ge=0, description="c in UCT")
    step: SamplingConfig = Field(default_factory=lambda: SamplingConfig(
        n=1, temperature=0.8, top_p=0.95, max_tokens=256, stop=[STEP_END, ANSWER_END], seed=7))
    traces_per_problem: int = Field(2, ge=1, description="complete correct traces kept per problem, by mean Q")
    output_chars: int = Field(400, ge=16, description="printed output a step shows the next one")
    sandbox: SandboxConfig = Field(default_factory=lambda: SandboxConfig(wall_seconds=5, workers=2))
    buckets: list[str] = Field(default_factory=list,
                               description="search only problems of these filter buckets (empty: the whole pool)")
    limit: int | None = Field(None, ge=1, description="search at most this many problems (the first by id)")
    use_ppm: bool = Field(False, description="score candidate steps with the PPM trained in the round before, if any")
    ppm_q_init: bool = Field(False, description="PPM-augmented MCTS (rStar-Math rounds 3-4): each new step's Q starts at "
                                                "the PPM's score and a step cut at the depth limit is valued by the PPM "
                                                "(off: the PPM only orders the unvisited candidates)")
    batched: bool = Field(True, description="one engine call per depth for all trees (False: one per node, for the benchmark)")

    @model_validator(mode="after")
    def _q_init_needs_the_ppm(self):
        if self.ppm_q_init and not self.use_ppm:
            raise ValueError("mcts.ppm_q_init starts Q at the PPM's scores: it needs mcts.use_ppm")
        return self



def parse_step(text: str) -> tuple[str, str | None]:
    """A generated step -> ("final", answer) when it gives a boxed answer, else ("code", code) (the
    code may be empty: a step with no code cannot be run)."""
    text = text.split(STEP_END)[0].split(ANSWER_END)[0]
    answer = last_boxed(text)
    if answer is not None:
        return "final", answer
    code = re.sub(r"^\s*```(?:python)?\s*$", "", text, flags=re.MULTILINE).strip()
    code = code.split("<output>")[0].strip()  # a model that writes its own output has not seen it
    return "code", code

@dataclass(eq=False)
class Node:
    node_id: str
    tree_id: str
    problem_id: str
    parent: "Node | None"
    depth: int
    text: str = ""
    code: str | None = None
    output: str = ""
    status: str = "root"  # root | ok | terminal | cut | error | timeout | unparsed
    answer: str | None = None
    correct: bool | None = None
    visits: int = 0
    value: float = 0.0
    children: list["Node"] = field(default_factory=list)
    prior: float = 0.0  # the PPM's score of the step, when a PPM scores candidates (later rounds)
    q_init: float | None = None  # PPM-augmented MCTS: the PPM's score, counted as one visit of that value

    @property
    def q(self) -> float:
        if self.q_init is not None:
            return (self.q_init + self.value) / (self.visits + 1)
        return self.value / self.visits if self.visits else 0.0

    @property
    def path(self) -> list["Node"]:
        node, out = self, []
        while node is not None:
            out.append(node)
            node = node.parent
        return out[::-1]

    def selectable(self) -> bool:
        """Can a rollout still go here: unexpanded, a terminal (its value is backed up again), or an
        expanded node with a selectable child. Failed steps never are."""
        if self.status in FAILED:
            return False
        if self.status in ("terminal", "cut") or not self.children:
            return True
        return any(child.selectable() for child in self.children)


def uct(child: Node, parent_visits: int, c: float) -> float:
    """Q + c * sqrt(ln N_parent / N). An unvisited step is tried first, unless the PPM gave it a Q: then its
    score stands for one visit, and a step the PPM rates low can wait behind a proven sibling."""
    visits = child.visits + (child.q_init is not None)
    if visits == 0:
        return math.inf
    return child.q + c * math.sqrt(math.log(max(parent_visits, 1)) / visits)


def select(root: Node, c: float) -> Node | None:
    """Descend by UCT to a node to expand or re-evaluate; None when the whole tree is exhausted."""
    node = root
    if not node.selectable():
        return None
    while node.children and node.status not in ("terminal", "cut"):
        candidates = [child for child in node.children if child.selectable()]
        # unvisited children first (UCT is infinite for them), the PPM's favourite among them first
        node = max(candidates, key=lambda child: (uct(child, node.visits, c), child.prior))
    return node


def backup(leaf: Node, reward: float) -> None:
    for node in leaf.path:
        node.visits += 1
        node.value += reward


def leaf_reward(node: Node) -> float:
    """A terminal's verdict (+1 / -1); a failed step -1; a step cut at the depth limit -1, or the PPM's score of
    it under PPM-augmented MCTS (no answer yet is not a wrong answer)."""
    if node.status == "cut" and node.q_init is not None:
        return node.q_init
    return 1.0 if node.status == "terminal" and node.correct else -1.0


def ppm_text(question: str, node: Node) -> str:
    """What the PPM scores: the problem, the solution before the step, the step (as tasks/pairs.to_ppm_dataset)."""
    return f"{question}\n\n{step_prefix([(n.text, n.output) for n in node.path[1:-1]])}{node.text}"


def program(node: Node) -> str:
    """The code of `node` run after its ancestors' steps, whose prints are silenced (they were shown)."""
    earlier = "\n".join(n.code for n in node.path[1:-1] if n.code)
    if not earlier:
        return node.code or ""
    return ("import io as _io, sys as _sys\n_shown = _sys.stdout\n_sys.stdout = _io.StringIO()\n" + earlier
            + "\n_sys.stdout = _shown\n" + (node.code or ""))


def _expand(frontier: list[tuple[Node, str]], gold: dict[str, str], engine: Engine, box: Sandbox, grader,
            config: MCTSConfig, seed: int) -> list[Node]:
    """One engine call for all `frontier` leaves (k children each), their code through the sandbox in
    parallel, their answers through the grader in one batch. Returns the new children, leaf order."""
    requests = [
        GenerationRequest(step_messages(question), problem_seed(seed, leaf.node_id),
                          assistant_prefix=step_prefix([(n.text, n.output) for n in leaf.path[1:]]))
        for leaf, question in frontier
    ]
    sampling = config.step.model_copy(update={"n": config.children})
    born: list[Node] = []
    for (leaf, _), completions in zip(frontier, engine.generate(requests, sampling)):
        for index, completion in enumerate(completions):
            kind, content = parse_step(completion.text)
            child = Node(stable_hash("node", leaf.node_id, index, completion.text), leaf.tree_id, leaf.problem_id,
                         leaf, leaf.depth + 1, text=completion.text.split("<output>")[0].strip())  # not its own made-up output
            if kind == "final":
                child.status, child.answer = "terminal", content
            elif not content:
                child.status = "unparsed"
            else:
                child.code = content
            leaf.children.append(child)
            born.append(child)
    runnable = [c for c in born if c.code]
    for child, result in zip(runnable, box.run_many([program(c) for c in runnable])):
        child.output = (result.stdout if result.status == "ok" else result.stderr)[-config.output_chars:]
        child.status = "ok" if result.status == "ok" else ("timeout" if result.status == "timeout" else "error")
    terminals = [c for c in born if c.status == "terminal"]
    if terminals:
        verdicts = grader.run([("grade", gold[c.problem_id], c.text) for c in terminals])
        for child, verdict in zip(terminals, verdicts):
            child.correct = verdict[0] == "correct"
    return born


def search(problems: pa.Table, engine: Engine, config: MCTSConfig, verify: VerifyConfig, round: int = 0,
           step_scorer=None) -> dict[str, pa.Table]:
    """problems (problem_id, question, answer) -> {"mcts_nodes", "traces"}.

    `step_scorer(texts) -> scores` (a trained PPM, models/ppm.py) orders unvisited candidates and the
    simulation path, and with `config.ppm_q_init` gives each new step its first Q and values the steps cut at
    the depth limit; round 0 has none and relies on terminal rewards alone."""
    rows = problems.select(["problem_id", "question", "answer"]).to_pylist()
    roots: list[tuple[Node, dict]] = []
    for row in rows:
        tree_id = stable_hash("tree", row["problem_id"], engine.model_id, config.step.seed, round)
        roots.append((Node(stable_hash("node", tree_id), tree_id, row["problem_id"], None, 0), row))
    gold = {row["problem_id"]: row["answer"] for row in rows}
    with Sandbox(config.sandbox) as box, verify.pool() as grader, \
            Progress("mcts", config.rollouts * len(roots), "rollouts") as progress:
        for rollout in range(config.rollouts):
            frontier: list[tuple[Node, str]] = []
            for root, row in roots:
                leaf = select(root, config.exploration)
                if leaf is None:
                    continue
                if leaf.status in ("terminal", "cut"):
                    backup(leaf, leaf_reward(leaf))
                else:
                    frontier.append((leaf, row["question"]))
            while frontier:  # one depth of every tree per engine call
                seed = problem_seed(config.step.seed, f"rollout-{rollout}")
                if config.batched:
                    born = _expand(frontier, gold, engine, box, grader, config, seed)
                else:  # the same expansions, one engine call per node
                    born = [c for entry in frontier for c in _expand([entry], gold, engine, box, grader, config, seed)]
                if step_scorer is not None:
                    question_of = {row["problem_id"]: row["question"] for row in rows}
                    scored = [c for c in born if c.status == "ok"]
                    for child, score in zip(scored, step_scorer([ppm_text(question_of[c.problem_id], c) for c in scored])):
                        child.prior = float(score)
                        if config.ppm_q_init:
                            child.q_init = child.prior
                by_parent: dict[int, list[Node]] = {}
                for child in born:
                    by_parent.setdefault(id(child.parent), []).append(child)
                following: list[tuple[Node, str]] = []
                for leaf, question in frontier:
                    kids = by_parent.get(id(leaf), [])
                    for child in kids:
                        if child.status != "ok":
                            backup(child, leaf_reward(child))
                    going_on = [child for child in kids if child.status == "ok"]
                    if not going_on:
                        continue
                    # simulate down the PPM's favourite (without a PPM: the first sample, random already)
                    nxt = max(going_on, key=lambda child: child.prior)
                    if nxt.depth >= config.max_depth:
                        nxt.status = "cut"
                        backup(nxt, leaf_reward(nxt))
                    else:
                        following.append((nxt, question))
                frontier = following
            progress.update((rollout + 1) * len(roots))
    return {"mcts_nodes": _node_rows(roots), "traces": _traces(roots, config.traces_per_problem)}


def _node_rows(roots) -> pa.Table:
    rows = []
    stack = [root for root, _ in roots]
    while stack:
        node = stack.pop()
        rows.append(dict(
            node_id=node.node_id, tree_id=node.tree_id, problem_id=node.problem_id,
            parent_id=node.parent.node_id if node.parent else None, depth=node.depth, step_text=node.text,
            code=node.code, exec_output=node.output, exec_status=node.status, visits=node.visits, q_value=node.q,
            is_terminal=node.status == "terminal", answer=node.answer, correct=node.correct,
        ))
        stack.extend(node.children)
    return pa.Table.from_pylist(rows, schema=schemas.MCTS_NODES)


def _traces(roots, per_problem: int) -> pa.Table:
    rows = []
    for root, row in roots:
        correct_leaves, stack = [], [root]
        while stack:
            node = stack.pop()
            if node.status == "terminal" and node.correct:
                correct_leaves.append(node)
            stack.extend(node.children)
        scored = sorted(((sum(n.q for n in leaf.path[1:]) / leaf.depth, leaf) for leaf in correct_leaves),
                        key=lambda pair: -pair[0])
        for mean_q, leaf in scored[:per_problem]:
            steps = leaf.path[1:]
            rows.append(dict(
                trace_id=stable_hash("trace", leaf.node_id), problem_id=root.problem_id, tree_id=root.tree_id,
                node_ids=[n.node_id for n in steps], prompt=row["question"],
                completion=step_prefix([(n.text, n.output) for n in steps[:-1]]) + steps[-1].text,
                answer=leaf.answer, mean_q=mean_q, depth=leaf.depth,
            ))
    return pa.Table.from_pylist(rows, schema=schemas.TRACES)


def summarize(tables: dict[str, pa.Table]) -> list[str]:
    lines = []
    nodes = tables.get("mcts_nodes")
    if nodes is not None and nodes.num_rows:
        rows = nodes.to_pylist()
        terminal = [r for r in rows if r["is_terminal"]]
        steps = nodes.filter(pc.greater(nodes["depth"], 0))
        lines.append(f"- **trees** {len({r['tree_id'] for r in rows})}, **nodes** {len(rows)}, **steps** {steps.num_rows}")
        lines.append(summary.line("steps by status", summary.counts(steps["exec_status"])))
        correct = sum(1 for r in terminal if r["correct"])
        lines.append(f"- **terminal leaves** {len(terminal)}, correct {correct}"
                     + (f" ({correct / len(terminal):.1%})" if terminal else ""))
    lines.append(f"- **traces**: {summary.rows(tables, 'traces')}")
    return lines
