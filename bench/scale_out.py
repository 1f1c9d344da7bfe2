"""Scaling evoforge beyond one machine, part by part.

    .venv/bin/python bench/scale_out.py [--parts served,replicas,ray-verify,distinct] [--model default]
                                        [--runs verify-bench,demo] [--repeat 3]

Parts (PARTS below: name -> a function of the parsed options that prints its figures and returns
whether its checks held):
- `served`: the in-process vLLM engine against one launched `vllm serve` replica bound to the same
  cores, the same prompts (`--problems` easy-arithmetic questions, `--n` samples, `--max-tokens`, T 0.8,
  top-p 0.95, per-prompt seeds): rollouts/s and the served side's extra time (target <= 10%), and how
  many completions are identical.
- `replicas`: one replica on one core against two replicas on one core each, the same prompts through
  the OpenAI engine's routing (target >= 1.7x: the shape of adding a GPU).
- `ray-verify`: the same (gold, response) pairs graded on a Ray cluster of one one-CPU node, then of two
  one-CPU nodes (`ray.cluster_utils.Cluster` on this machine, which stands in for two machines), with
  the local grader pool (2 processes) for reference. Pairs/s of each and the two-node / one-node
  ratio (target >= 1.7x), overall and once the first results are in (the actors' start-up, 5-10 s
  here, is paid again by every job); the verdicts must be identical on every side. Two sets of pairs:
  the real rollouts of `--runs` that exist (their `generate` output with their problems' golds, as
  bench/verify_throughput.py loads them; a weak model's answers, mostly cheap to grade), and
  bench/verify_throughput.py's synthetic mix of `--pairs` pairs. Every pair is graded (not each
  distinct answer once, as the verify stage does: that saving is the `distinct` part's).
- `distinct`: bench/verify_throughput.py's figures for grading each distinct (gold, boxed answers) once
  against grading every rollout, on the same runs.

Each measurement runs in a fresh process (its own Ray cluster, shut down with it), sides alternating;
medians are printed. Times include starting the graders (Ray actors or local processes), not the cluster.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import verify_throughput  # noqa: E402
from bench.fresh_process import in_fresh_process  # noqa: E402
from evoforge.data import home  # noqa: E402

home.configure()


def pair_sets(args) -> dict[str, tuple[list[tuple[str, str]], str]]:
    """name -> (pairs, where they come from): the real rollouts of `--runs` that exist, and the synthetic mix."""
    from evoforge.data.lake import lake

    sets = {}
    pairs, used = [], []
    for run in [r for r in args.runs.split(",") if r]:
        if not (lake().run_dir(run) / "round=0" / "generate").is_dir():
            continue
        rollouts, problems = verify_throughput.real_rollouts(run)
        gold_of = dict(zip(problems["problem_id"].to_pylist(), problems["answer"].to_pylist()))
        ordered = sorted(rollouts.to_pylist(), key=lambda r: (r["problem_id"], r["rollout_id"]))
        pairs += [(gold_of[r["problem_id"]], r["text"] or "") for r in ordered if gold_of.get(r["problem_id"]) is not None]
        used.append(run)
    if pairs:
        sets["real"] = (pairs, f"real rollouts of {', '.join(used)}")
    sets["synthetic"] = (verify_throughput.make_pairs(args.pairs), "bench/verify_throughput.py's synthetic mix")
    return sets


def measure_ray_verify(pair_set: str, side: str, args) -> dict:
    """One side, in this (fresh) process: 'local', or 'ray:N' for a Ray cluster of N one-CPU nodes.
    `first`: seconds until the first results arrived (the graders' start-up and first chunk)."""
    pairs, _ = pair_sets(args)[pair_set]
    items = [("grade", gold, response) for gold, response in pairs]
    first = []

    def on_progress(done: int) -> None:
        if done and not first:
            first.append((time.perf_counter() - started, done))

    if side == "local":
        from evoforge.tasks.grading.pool import GraderPool

        started = time.perf_counter()
        with GraderPool(2, args.deadline, args.memory_mb, args.chunk_size) as pool:
            results = pool.run(items, on_progress)
        total = time.perf_counter() - started
        return {"total": total, "first": first[0], "verdicts": [r[0] for r in results]}

    import ray
    from ray.cluster_utils import Cluster

    from evoforge.models import ray_cluster
    from evoforge.tasks.grading.on_ray import RayGraderPool

    nodes = int(side.split(":")[1])
    temp = ray_cluster.temp_dir()
    temp.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "temp_dir": str(temp)})
    try:
        for _ in range(nodes - 1):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray_cluster.connect(cluster.address)
        started = time.perf_counter()
        with RayGraderPool(nodes, args.deadline, args.memory_mb, args.chunk_size, address=cluster.address) as pool:
            results = pool.run(items, on_progress)
        total = time.perf_counter() - started
    finally:
        ray.shutdown()
        cluster.shutdown()
    return {"total": total, "first": first[0], "verdicts": [r[0] for r in results]}


SIDES = {"local": "local grader pool, 2 processes", "ray:1": "Ray, 1 node x 1 CPU (1 actor)",
         "ray:2": "Ray, 2 nodes x 1 CPU (2 actors)"}


def ray_verify(args) -> bool:
    identical = True
    for pair_set, (pairs, source) in pair_sets(args).items():
        print(f"ray-verify on {len(pairs)} pairs, {source}; deadline {args.deadline:g} s, chunks of "
              f"{args.chunk_size}; median of {args.repeat} fresh-process runs per side")
        sides = {side: [] for side in SIDES}
        for _ in range(args.repeat):
            for side in sides:
                sides[side].append(in_fresh_process(__file__, f"ray-verify:{pair_set}:{side}", args))
        total, steady = {}, {}
        for side, label in SIDES.items():
            runs = sides[side]
            total[side] = statistics.median(r["total"] for r in runs)
            # once the first results are in: the graders' throughput without their start-up
            steady[side] = statistics.median((len(pairs) - r["first"][1]) / (r["total"] - r["first"][0]) for r in runs)
            start_s = statistics.median(r["first"][0] for r in runs)
            print(f"  {label:34s} {total[side]:7.2f} s {len(pairs) / total[side]:7.1f} pairs/s;  first results after "
                  f"{start_s:5.2f} s, then {steady[side]:7.1f} pairs/s")
        verdicts = [run["verdicts"] for runs in sides.values() for run in runs]
        same = all(v == verdicts[0] for v in verdicts)
        identical &= same
        print(f"  two nodes / one node: {total['ray:1'] / total['ray:2']:.2f}x overall, "
              f"{steady['ray:2'] / steady['ray:1']:.2f}x once started (target >= 1.7x); identical verdicts on every "
              f"side and run: {same}")
    return identical


def distinct(args) -> bool:
    """bench/verify_throughput.py's real-rollout comparison, with its own options."""
    options = argparse.Namespace(pairs=args.pairs, workers=2, deadline=args.deadline, repeat=args.repeat, runs=args.runs)
    print("distinct: the verify stage (each distinct (gold, boxed answers) graded once) against grading every rollout")
    return verify_throughput.compare_on_real_rollouts(options)


GENERATION_SIDES = {
    "inprocess": "in-process engine (vLLM, both cores)",
    "served:1:2": "one served replica on both cores",
    "served:1:1": "one served replica on one core",
    "served:2:1": "two served replicas, one core each",
}


def generation_requests(args):
    from evoforge.data.home import PROJECT_ROOT
    from evoforge.models.engine import GenerationRequest
    from evoforge.models.prompts import solve_messages

    rows = [json.loads(line) for line in (PROJECT_ROOT / "data/sets/easy_arithmetic/train.jsonl").open()][: args.problems]
    return [GenerationRequest(solve_messages(r["question"]), seed=1000 + i) for i, r in enumerate(rows)]


def measure_generation(side: str, args) -> dict:
    """One side, in this (fresh) process: 'inprocess', or 'served:R:T' for R launched replicas of T cores
    each. A warm-up call first, so no side pays its first call's costs in the timing; the servers'
    start-up is not timed (printed apart)."""
    from evoforge.models.engine import EngineConfig, LaunchConfig, SamplingConfig
    from evoforge.models.loader import load_engine

    requests = generation_requests(args)
    sampling = SamplingConfig(n=args.n, temperature=0.8, top_p=0.95, max_tokens=args.max_tokens, seed=0)
    config = EngineConfig(model=args.model, max_model_len=2048)
    started = time.perf_counter()
    if side == "inprocess":
        engine = load_engine(config)
    else:
        _, replicas, threads = side.split(":")
        engine = load_engine(config.model_copy(update={
            "backend": "openai", "launch": LaunchConfig(replicas=int(replicas), threads_per_replica=int(threads), port=8400)}))
    ready = time.perf_counter() - started
    engine.generate(requests[:2], sampling.model_copy(update={"max_tokens": 16}))
    started = time.perf_counter()
    out = engine.generate(requests, sampling)
    total = time.perf_counter() - started
    return {"total": total, "ready": ready, "rollouts": sum(len(c) for c in out),
            "tokens": sum(x.token_count for c in out for x in c), "texts": [[x.text for x in c] for c in out]}


def _generation(args, sides: list[str]) -> dict:
    results = {side: in_fresh_process(__file__, f"generation:{side}", args) for side in sides}
    print(f"  {args.problems} easy-arithmetic prompts x {args.n} samples, up to {args.max_tokens} tokens, T 0.8, "
          f"top-p 0.95, model {args.model}")
    for side in sides:
        r = results[side]
        print(f"  {GENERATION_SIDES[side]:40s} {r['total']:7.1f} s {r['rollouts'] / r['total']:6.2f} rollouts/s "
              f"{r['tokens'] / r['total']:7.1f} tok/s   (ready after {r['ready']:.0f} s)")
    return results


def served(args) -> bool:
    print("served: the in-process engine against one `vllm serve` replica on the same cores (HTTP overhead)")
    results = _generation(args, ["inprocess", "served:1:2"])
    local, remote = results["inprocess"], results["served:1:2"]
    overhead = remote["total"] / local["total"] - 1
    same = sum(a == b for x, y in zip(local["texts"], remote["texts"]) for a, b in zip(x, y))
    print(f"  served / in-process time: {overhead:+.1%} (target <= +10%); identical completions {same} of "
          f"{local['rollouts']}")
    return overhead <= 0.10


def replicas(args) -> bool:
    print("replicas: one replica on one core against two replicas on one core each (the shape of adding a GPU)")
    results = _generation(args, ["served:1:1", "served:2:1"])
    ratio = results["served:1:1"]["total"] / results["served:2:1"]["total"]
    print(f"  two replicas / one: {ratio:.2f}x (target >= 1.7x)")
    return ratio >= 1.7


PARTS = {"served": served, "replicas": replicas, "ray-verify": ray_verify, "distinct": distinct}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--parts", default="served,replicas,ray-verify,distinct", help=f"comma-separated, of: {', '.join(PARTS)}")
    parser.add_argument("--runs", default="verify-bench,demo", help="runs whose real rollouts to grade (comma-separated)")
    parser.add_argument("--pairs", type=int, default=12000,
                        help="synthetic pairs (at most 14,552): enough grading for the graders' start-up not to dominate")
    parser.add_argument("--deadline", type=float, default=10.0)
    parser.add_argument("--memory-mb", type=int, default=2048)
    parser.add_argument("--chunk-size", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--model", default="default", help="generation parts: the model served")
    parser.add_argument("--problems", type=int, default=64, help="generation parts: prompts (16 leave the replicas unevenly loaded at the end: 1.61x)")
    parser.add_argument("--n", type=int, default=4, help="generation parts: samples per prompt")
    parser.add_argument("--max-tokens", type=int, default=128, help="generation parts: tokens per sample at most")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        part, rest = args.side.split(":", 1)
        if part == "generation":
            print(json.dumps(measure_generation(rest, args)))
            return
        pair_set, side = rest.split(":", 1)
        print(json.dumps(measure_ray_verify(pair_set, side, args)))
        return
    unknown = [p for p in args.parts.split(",") if p and p not in PARTS]
    if unknown:
        parser.error(f"unknown parts {unknown}; known: {', '.join(PARTS)}")
    ok = True
    for part in [p for p in args.parts.split(",") if p]:
        ok &= PARTS[part](args)
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
