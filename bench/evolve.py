"""Self-evolving arms from the same start, over several seeds, with intervals: plain RLVR (GRPO), SvS trained
online, SvS's offline round, and rejection sampling.

    .venv/bin/python bench/evolve.py                      # grpo, svs, offline: 3 seeds x 3 rounds each
    .venv/bin/python bench/evolve.py --arms offline,rft --method sft     # the SvS round against rejection sampling
    # the same comparison for a 1.5B model on a GPU node (engine and finetune settings from the config):
    .venv/bin/python bench/evolve.py --config deploy/configs/gpu-1.5b.yaml --model Qwen/Qwen2.5-Math-1.5B-Instruct \
        --seeds 3 --rounds 3 --pool 512 --n 8 --max-tokens 1024 --steps 100 --eval-problems 500 --eval-n 32

Every arm: generate -> verify -> filter -> [synthesize] -> pairs -> finetune -> evaluate; the three RL arms train
with the same problems (all the pool's, `grpo.problems: all`), G = `--n` samples a problem, batch and steps:
- grpo: no synthesize; finetune `method: grpo` (RLVR on the pool).
- svs: no synthesize; finetune `method: svs` (tasks/finetune/svs.py: each step also writes variants of the
  under-performing problems, solves them G_v = `--n` times and rewards the synthesis, in one update). Its steps
  draw more samples than grpo's (the syntheses and their solutions): the price of the method, reported per arm.
- offline: the SvS round as the factory runs it: synthesize between rounds with the frozen policy, finetune
  `method: --method` (default grpo) on the pool and the kept variants.
- rft (rejection sampling, with `--method sft`): no synthesize; its n per problem is raised so that its
  generated samples match the offline arm's generate + synthesis + variant-solving samples of the same round
  and seed.
Each (arm, seed) is one run, `<tag>-<arm>-s<seed>`: the seed moves sampling, synthesis and training; the
held-out samples use one fixed seed, so the starting model's evaluation is the same in every run and
every comparison is paired over the same problems. The promotion gate is on (its default: a checkpoint
significantly worse on held-out pass@1 does not become the next round's policy), as in any run.

Prints, per arm: each round's trained model and the policy that came out of the round, with held-out
pass@1 and pass@k and their 95% intervals pooled over seeds (bootstrap over problems, each problem's
samples in every seed redrawn inside it), the paired change from the starting model, the gate's
decisions, and wall time; then the paired difference between the arms. Also bench/out/evolve.json.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from evoforge.data import home  # noqa: E402

home.configure()

EVAL_SET = "easy-arithmetic-test"


def base_config(args, seed: int):
    from evoforge.flows.config import RoundConfig, load_config

    sets = [{"name": EVAL_SET, "path": "data/sets/easy_arithmetic/test.jsonl", "preset": "plain",
             "limit": args.eval_problems}]
    if args.gsm8k_problems:
        sets.append({"name": "gsm8k-test", "path": "data/sets/gsm8k/test.jsonl", "preset": "gsm8k",
                     "limit": args.gsm8k_problems})
    machine = load_config(args.config) if args.config else None  # a GPU node's engine and training settings
    engine = {**(machine.engine.model_dump() if machine else {}), "model": args.model}
    finetune = machine.finetune.model_dump(exclude={"method"}) if machine else {}
    return RoundConfig.model_validate({
        "engine": engine,
        "sources": [{"path": "data/sets/easy_arithmetic/train.jsonl", "preset": "plain", "name": "easy_arithmetic",
                     "limit": args.pool}],
        "eval_sets": [{"name": s["name"], "path": s["path"], "preset": s["preset"]} for s in sets],
        "generate": {"sampling": {"n": args.n, "max_tokens": args.max_tokens, "seed": seed}},
        "synthesize": {"samples_per_variant": args.n, "synthesis": {"n": 1, "max_tokens": args.max_tokens, "seed": 100 + seed}},
        "pairs": {"sft_per_problem": 4},
        "finetune": {**finetune, "method": args.method, "max_steps": args.steps, "seed": seed,
                     "grpo": {"problems": "all", "generations": args.n, "max_completion_tokens": args.max_tokens},
                     "batch_size": finetune.get("batch_size", 2 * args.n), "svs": {"variant_generations": args.n}},
        "evaluate": {"sets": sets, "sampling": {"n": args.eval_n, "max_tokens": args.max_tokens, "seed": 1234},
                     "pass_k": sorted({1, args.eval_n})},
    })


def samples(run: str, round: int) -> dict[str, int]:
    from evoforge.data.lake import lake

    store = lake()
    online = store.read(run, "variants", round, "finetune")
    return {
        "generate": store.read(run, "rollouts", round, "generate").num_rows,
        "synthesis": store.read(run, "variants", round, "synthesize").num_rows,
        "variant_solving": store.read(run, "rollouts", round, "synthesize").num_rows,
        # svs: written and solved inside training (G_v solutions of each valid variant)
        "online_synthesis": online.num_rows,
        "online_variant_solving": sum(v["n"] for v in online.select(["n"]).to_pylist()),
    }


def run_arm(args, arm: str, seed: int, svs_budgets: list[dict] | None) -> dict:
    """One run of `args.rounds` rounds in a process of its own, then what `collect_run` reads of it: a fresh
    process per run times each run alike, and what one run leaves in memory cannot slow the next."""
    import multiprocessing

    child = multiprocessing.get_context("spawn").Process(target=_rounds, args=(args, arm, seed, svs_budgets))
    child.start()
    child.join()
    if child.exitcode != 0:
        raise SystemExit(f"arm {arm} seed {seed}: the run's process ended with status {child.exitcode}")
    return collect_run(args, f"{args.tag}-{arm}-s{seed}", seed)


def _rounds(args, arm: str, seed: int, svs_budgets: list[dict] | None) -> None:
    from evoforge.flows.round import round_flow

    run = f"{args.tag}-{arm}-s{seed}"
    config = base_config(args, seed)
    for round in range(args.rounds):
        arm_config = config.model_copy(deep=True)
        if arm != "offline":
            arm_config.stages = [s for s in arm_config.stages if s != "synthesize"]
        if arm in ("grpo", "svs"):
            arm_config.finetune.method = arm
        if arm == "rft" and svs_budgets:  # with the offline SvS arm: the same samples per round
            svs = svs_budgets[round]
            arm_config.generate.sampling.n = max(args.n, math.ceil(sum(svs.values()) / max(1, svs["generate"] // args.n)))
        round_flow(run, arm_config, round=round)


def collect_run(args, run: str, seed: int) -> dict:
    """A finished run's per-round budgets, the policy each round handed on, decisions, early stops, the
    per-problem held-out results, and its wall time (first stage start to last stage end)."""
    from evoforge.data.lake import lake
    from evoforge.flows.inputs import round_policy

    store = lake()
    config = base_config(args, seed)
    events = store.read(run, "stage_runs").to_pylist()
    wall = (max(e["finished_at"] for e in events if e["finished_at"])
            - min(e["started_at"] for e in events if e["started_at"])).total_seconds()
    results = [r for r in store.read(run, "eval_results", columns=["model_id", "model_round", "eval_set", "problem_id", "n",
                                                                    "correct", "mean_logprob", "search", "round"]).to_pylist()
               if (r["search"] or "none") == "none"]  # the samples themselves, not a PPM's picks among them
    decisions = [{k: d[k] for k in ("round", "model_round", "decision", "why")}
                 for d in store.read(run, "promotions").to_pylist()]
    checkpoints = [{k: c[k] for k in ("round", "steps", "stopped_early")}
                   for c in store.read(run, "checkpoints").to_pylist() if c["role"] == "policy"]
    return {"run": run, "seed": seed, "wall_seconds": wall, "budgets": [samples(run, r) for r in range(args.rounds)],
            "policies": [round_policy(run, config, r + 1).model_round for r in range(args.rounds)],
            "results": results, "decisions": decisions, "checkpoints": checkpoints}


def chosen_rows(runs: list[dict], model_round: int | list[int], eval_set: str) -> dict[tuple[str, str], dict]:
    """The held-out rows of one model of each seed's run (`model_round`: one number for all seeds, or one
    per seed), keyed (model id, problem id): a model several seeds share (the starting model; a policy
    nobody improved on) counts once, not once per seed."""
    rounds = model_round if isinstance(model_round, list) else [model_round] * len(runs)
    rows = {}
    for run, m in zip(runs, rounds):
        for r in run["results"]:
            if r["model_round"] == m and r["eval_set"] == eval_set and r["n"]:
                rows[(r["model_id"], r["problem_id"])] = r  # a model measured twice: the same seed, the same counts
    return rows


def per_problem(runs: list[dict], model_round: int | list[int], eval_set: str):
    """(n, correct) arrays of shape (problems, distinct models) over the problems every model measured."""
    import numpy as np

    tables: dict[str, dict] = {}
    for (model_id, problem_id), r in chosen_rows(runs, model_round, eval_set).items():
        tables.setdefault(model_id, {})[problem_id] = (r["n"], r["correct"])
    groups = list(tables.values())
    common = sorted(set.intersection(*(set(t) for t in groups))) if groups else []
    n = np.array([[t[p][0] for t in groups] for p in common], dtype=int).reshape(len(common), len(groups))
    c = np.array([[t[p][1] for t in groups] for p in common], dtype=int).reshape(len(common), len(groups))
    return common, n, c


def pooled_entropy(runs: list[dict], model_round: int | list[int], eval_set: str) -> float:
    """Held-out entropy (tasks/evaluate.py's estimator) over the distinct models' samples."""
    import pyarrow as pa

    from evoforge.tasks.evaluate import held_out_entropy

    rows = [{"n": r["n"], "mean_logprob": r["mean_logprob"]} for r in chosen_rows(runs, model_round, eval_set).values()]
    return held_out_entropy(pa.Table.from_pylist(rows, schema=pa.schema([("n", pa.int32()), ("mean_logprob", pa.float64())])))


def summarize(args, arms: dict[str, list[dict]]) -> dict:
    from evoforge.tasks.intervals import change_interval, score_interval

    k_max = args.eval_n
    out: dict = {"settings": vars(args), "arms": {}, "between_arms": []}
    for arm, runs in arms.items():
        rows = []
        _, n0, c0 = per_problem(runs, 0, EVAL_SET)  # the starting model: the baseline of every change
        for model in range(args.rounds + 1):
            for label, rounds in ((("start" if model == 0 else "trained"), model), ("policy", None)):
                if label == "policy":
                    if model == 0:
                        continue
                    rounds = [run["policies"][model - 1] for run in runs]
                entry = {"model": model, "kind": label, "model_rounds": rounds}
                problems, n, c = per_problem(runs, rounds, EVAL_SET)
                if not problems:
                    continue
                for k in sorted({1, k_max}):
                    score = score_interval(n, c, k, seed=k)
                    entry[f"pass@{k}"] = [score.estimate, score.low, score.high]
                    if model:
                        change = change_interval(n, c, n0, c0, k, seed=k)
                        entry[f"pass@{k} change from model 0"] = [change.estimate, change.low, change.high]
                entry["per_model_pass@1"] = [float((c[:, s] / n[:, s]).mean()) for s in range(n.shape[1])]
                entry["entropy"] = pooled_entropy(runs, rounds, EVAL_SET)
                entry["problems"], entry["samples_per_problem"] = len(problems), int(n.sum(axis=1).max())
                rows.append(entry)
        out["arms"][arm] = {
            "rows": rows,
            "wall_seconds": [run["wall_seconds"] for run in runs],
            "budgets": [run["budgets"] for run in runs],
            "decisions": [run["decisions"] for run in runs],
            "checkpoints": [run["checkpoints"] for run in runs],
        }
    (b, runs_b), *others = arms.items()  # every other arm against the first (grpo: plain RLVR)
    for a, runs_a in others:
        for model in range(1, args.rounds + 1):
            for label in ("trained", "policy"):
                rounds_a = model if label == "trained" else [run["policies"][model - 1] for run in runs_a]
                rounds_b = model if label == "trained" else [run["policies"][model - 1] for run in runs_b]
                pa_, na, ca = per_problem(runs_a, rounds_a, EVAL_SET)
                pb_, nb, cb = per_problem(runs_b, rounds_b, EVAL_SET)
                common = sorted(set(pa_) & set(pb_))
                if not common:  # an arm trained nothing that round in some seed
                    continue
                ia, ib = [pa_.index(p) for p in common], [pb_.index(p) for p in common]
                entry = {"model": model, "kind": label, "difference": f"{a} - {b}"}
                for k in sorted({1, k_max}):
                    diff = change_interval(na[ia], ca[ia], nb[ib], cb[ib], k, seed=k)
                    entry[f"pass@{k}"] = [diff.estimate, diff.low, diff.high]
                out["between_arms"].append(entry)
    return out


def fmt(triple) -> str:
    return f"{triple[0]:.3f} [{triple[1]:.3f}, {triple[2]:.3f}]"


def fmt_change(triple) -> str:
    return f"{triple[0]:+.3f} [{triple[1]:+.3f}, {triple[2]:+.3f}]"


def print_table(args, summary: dict) -> None:
    k = args.eval_n
    print(f"\narms {args.arms}: {args.seeds} seeds x {args.rounds} rounds per arm, pool {args.pool} "
          f"easy-arithmetic problems, model {args.model}, finetune {args.method} x {args.steps} steps; held-out "
          f"{EVAL_SET}: {args.eval_problems} problems x {args.eval_n} samples per seed. Intervals: 95%, bootstrap over "
          f"problems with each problem's samples (in every seed) redrawn inside it; changes are paired.")
    for arm, data in summary["arms"].items():
        walls = data["wall_seconds"]
        print(f"\narm {arm}: wall {sum(walls):.0f} s ({', '.join(f'{w:.0f}' for w in walls)} s per seed)")
        for seed, budget in enumerate(data["budgets"]):
            print(f"  seed {seed} samples per round: {[sum(b.values()) for b in budget]}")
        print(f"  {'model':<7}{'kind':<22}{'pass@1 [95%]':<24}{f'pass@{k} [95%]':<24}{'pass@1 change from model 0':<30}"
              f"{'entropy':<9}{'pass@1 of each distinct model'}")
        for row in data["rows"]:
            change = fmt_change(row["pass@1 change from model 0"]) if "pass@1 change from model 0" in row else ""
            seeds = ", ".join(f"{v:.3f}" for v in row["per_model_pass@1"])
            kind = row["kind"] if row["kind"] != "policy" else \
                f"policy (models {','.join(str(m) for m in row['model_rounds'])})"
            print(f"  {row['model']:<7}{kind:<22}{fmt(row['pass@1']):<24}{fmt(row[f'pass@{k}']):<24}{change:<30}"
                  f"{row['entropy']:<9.3f}{seeds}")
        for seed, decisions in enumerate(data["decisions"]):
            stops = {c["round"]: c["stopped_early"] for c in data["checkpoints"][seed] if c["stopped_early"]}
            print(f"  seed {seed} gate: " + "; ".join(
                f"round {d['round']} {d['decision']}" + (f" (training stopped early: {stops[d['round']]})"
                                                         if d['round'] in stops else "") for d in decisions))
    for entry in summary["between_arms"]:
        print(f"\n{entry['difference']}, model {entry['model']} ({entry['kind']}): pass@1 {fmt_change(entry['pass@1'])}, "
              f"pass@{k} {fmt_change(entry[f'pass@{k}'])}", end="")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pool", type=int, default=16)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--method", default="grpo", help="the offline and rft arms' finetune method or chain "
                                                          "(grpo, sft, dpo, sft+grpo); the grpo and svs arms train theirs")
    parser.add_argument("--config", help="a round config whose engine and finetune settings the arms use (a GPU "
                                         "node's: deploy/configs/gpu-1.5b.yaml)")
    parser.add_argument("--eval-problems", type=int, default=32)
    parser.add_argument("--eval-n", type=int, default=4)
    parser.add_argument("--gsm8k-problems", type=int, default=0, help="also evaluate on this many GSM8K test problems")
    parser.add_argument("--arms", default="grpo,svs,offline", help="grpo, svs, offline, rft (comma-separated)")
    parser.add_argument("--tag", default="bench-evolve")
    parser.add_argument("--from-runs", action="store_true",
                        help="run nothing: summarize the runs a finished bench with the same settings left")
    args = parser.parse_args()

    from evoforge.data.lake import lake
    from evoforge.data.storage import remove_tree

    arms_run = args.arms.split(",")
    if not args.from_runs:
        for arm in arms_run:  # a bench measures afresh: a kept run would skip every stage
            for old_run in lake().root.glob(f"{args.tag}-{arm}-s*"):
                remove_tree(old_run)
    arms: dict[str, list[dict]] = {}
    svs_budgets: dict[int, list[dict]] = {}
    if "offline" not in arms_run:  # the rejection-sampling arm alone matches the budgets of offline runs already there
        for seed in range(args.seeds):
            if lake().run_dir(f"{args.tag}-offline-s{seed}").exists():
                svs_budgets[seed] = [samples(f"{args.tag}-offline-s{seed}", r) for r in range(args.rounds)]
    for arm in arms_run:
        arms[arm] = []
        for seed in range(args.seeds):
            if args.from_runs:
                result = collect_run(args, f"{args.tag}-{arm}-s{seed}", seed)
            else:
                result = run_arm(args, arm, seed, svs_budgets.get(seed))
            if arm == "offline":
                svs_budgets[seed] = result["budgets"]
            arms[arm].append(result)
            print(f"arm {arm} seed {seed}: {result['wall_seconds']:.0f} s", flush=True)
    summary = summarize(args, arms)
    print_table(args, summary)
    out = ROOT / "bench" / "out" / "evolve.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1, default=str))
    print(f"\n{out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
