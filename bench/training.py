"""Training figures, side by side in one run, on SmolLM2-135M (the default model) on this machine's CPU.

    .venv/bin/python bench/training.py [--grpo-steps 3] [--sft-steps 30] [--only grpo,memory,overhead,processes]

Each arm runs in a fresh process of its own (`--arm NAME`) and reports its wall time and the peak resident
memory of it and its children (RUSAGE_CHILDREN: the training processes the finetune stage starts):

- grpo: GRPO seconds per step with `generation: vllm` (the colocated engine and its weight sync) against
  `generation: hf` (HF generate), same model, batch, generations and completion tokens. Goal: >= 2x.
- memory: peak RSS of LoRA SFT against full SFT, same steps and batch. Goal: <= 0.6x.
- overhead: the finetune stage's training (train_policy: the job written, accelerate launch, the worker,
  the checkpoint published) against what a user would write instead: a plain script that builds the same TRL
  SFTTrainer with the same arguments, data and steps. Both whole processes, imports included. Goal: <= 10%.
- processes: `processes: 2` (DDP over gloo, one core each) against `processes: 1`, the same global batch:
  the loss at the last step, and seconds per step (informational on 2 cores; on GPUs it is the user's).

Figures vary with what else runs on the machine: run it alone.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from evoforge.data import home  # noqa: E402

home.configure()
OUT = home.home() / "bench" / "out" / "training"


def _rows(n: int):
    import pyarrow as pa

    return pa.Table.from_pylist([
        {"problem_id": f"p{i}", "question": f"Ann has {i} apples and buys {i + 3} more. How many apples does she have?",
         "answer": str(2 * i + 3), "prompt": f"Ann has {i} apples and buys {i + 3} more. How many apples does she have?",
         "completion": f"Ann starts with {i} apples and buys {i + 3} more, so she has {i} + {i + 3} = {2 * i + 3} apples.\n"
                       f"\\boxed{{{2 * i + 3}}}"} for i in range(n)])


def _config(**overrides):
    from evoforge.tasks.finetune.config import FinetuneConfig

    base = dict(method="sft", max_steps=10, batch_size=4, learning_rate=1e-5, few_shot=False, report_to=[],
                guard={"held_out_rows": 0}, checkpoint_steps=1000)
    return FinetuneConfig(**{**base, **overrides})


def arm(name: str, steps: int) -> dict:
    """One measurement, in this (fresh) process."""
    import shutil

    from evoforge.models.registry import default_model_folder
    from evoforge.tasks.finetune.launch import train_policy

    model = str(default_model_folder())
    out = OUT / name
    shutil.rmtree(out, ignore_errors=True)
    started = time.monotonic()
    if name.startswith("grpo-"):
        result = grpo_steps(model, name.split("-")[1], steps, out)
    elif name in ("sft-full", "sft-lora", "sft-lora-checkpointing", "sft-stage", "sft-processes-1", "sft-processes-2"):
        processes = 2 if name == "sft-processes-2" else 1
        config = _config(max_steps=steps, batch_size=4 // processes, processes=processes,
                         lora={"r": 16, "alpha": 32, "dropout": 0.0} if name.startswith("sft-lora") else None,
                         trainer_args={"gradient_checkpointing": True} if name.endswith("checkpointing") else {})
        result = train_policy(model, {"sft": _rows(64).select(["prompt", "completion"])}, config, out)
    elif name == "sft-plain":
        result = plain_sft(model, steps, out)
    else:
        raise SystemExit(f"unknown arm {name}")
    wall = time.monotonic() - started
    rss = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    losses = [m["loss"] for m in result["metrics"] if "loss" in m]
    # GRPO's own step time (TRL's `step_time`): generation, rewards and the update; the first step also warms
    # the engine up, so it is reported apart
    step_times = [m["step_time"] for m in result["metrics"] if "step_time" in m]
    return {"arm": name, "steps": result["steps"], "train_seconds": result["wall_seconds"], "arm_seconds": wall,
            "peak_rss_mb": rss / 1024, "last_loss": losses[-1] if losses else None, "step_times": step_times,
            "generation_seconds": result.get("generation_seconds", [])}


def grpo_steps(model: str, generation: str, steps: int, out: Path) -> dict:
    """GRPO as each finetune process runs it (the method module's arguments, dataset and trainer, the verifier
    reward), with the time each step spends generating (TRL's `_generate_single_turn`: the weight sync and
    sampling) measured apart from TRL's `step_time` (generation, rewards, the update)."""
    from evoforge.tasks.finetune import adapters, grpo
    from evoforge.tasks.finetune.training import TrainingContext

    config = _config(method="grpo", max_steps=steps, batch_size=8, grpo={"generations": 8, "max_completion_tokens": 96},
                     generation=generation)
    tokenizer = adapters.load_tokenizer(model)
    kwargs = dict(model=adapters.causal_lm(model, None, tokenizer), args=grpo.arguments(config, out / "trainer"),
                  train_dataset=grpo.dataset(_rows(16).select(["question", "answer"]), config, None), processing_class=tokenizer)
    started = time.monotonic()
    generating: list[float] = []
    with grpo.trainer(kwargs, TrainingContext(), config) as trainer:
        original = trainer._generate_single_turn

        def timed(*args, **kwargs):
            began = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                generating.append(time.perf_counter() - began)

        trainer._generate_single_turn = timed
        trainer.train()
    return {"steps": trainer.state.global_step, "wall_seconds": time.monotonic() - started, "generation_seconds": generating,
            "metrics": [e for e in trainer.state.log_history if "loss" in e]}


def plain_sft(model: str, steps: int, out: Path) -> dict:
    """What a user writes instead of the finetune stage: the same TRL trainer, arguments, data and steps."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTTrainer

    from evoforge.models.prompts import solve_messages
    from evoforge.tasks.finetune import sft

    config = _config(max_steps=steps)
    tokenizer = AutoTokenizer.from_pretrained(model)
    rows = _rows(64).to_pylist()
    dataset = datasets.Dataset.from_list([{"prompt": solve_messages(r["prompt"], False),
                                           "completion": [{"role": "assistant", "content": r["completion"]}]} for r in rows])
    started = time.monotonic()
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(model), args=sft.arguments(config, out / "trainer"),
                         train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    trainer.save_model(str(out))
    history = trainer.state.log_history
    return {"steps": trainer.state.global_step, "wall_seconds": time.monotonic() - started,
            "metrics": [{"loss": e["loss"]} for e in history if "loss" in e]}


def run_arm(name: str, steps: int) -> dict:
    OUT.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    # every arm in the environment the finetune stage gives its trainers (tasks/finetune/launch.py), so the plain
    # script is not slowed by OpenMP threads spinning against the others
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    done = subprocess.run([sys.executable, __file__, "--arm", name, "--steps", str(steps)], capture_output=True, text=True,
                          cwd=str(ROOT), env=env)
    if done.returncode != 0:
        raise SystemExit(f"arm {name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_seconds"] = time.monotonic() - started  # the whole command, imports included
    print(f"  {name:16s} {result['steps']:3d} steps  train {result['train_seconds']:7.1f} s  process "
          f"{result['process_seconds']:7.1f} s  peak RSS {result['peak_rss_mb']:7.0f} MB  last loss {result['last_loss']}",
          flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arm", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--grpo-steps", type=int, default=4)
    parser.add_argument("--sft-steps", type=int, default=30)
    parser.add_argument("--only", default="grpo,memory,overhead,processes")
    args = parser.parse_args()
    if args.arm:
        print(json.dumps(arm(args.arm, args.steps)))
        return
    wanted = set(args.only.split(","))
    figures = {}
    print("SmolLM2-135M on this CPU; each arm a fresh process")
    if "grpo" in wanted:
        print(f"GRPO, {args.grpo_steps} steps of 8 prompts x 8 generations, up to 96 completion tokens:")
        hf, vllm = run_arm("grpo-hf", args.grpo_steps), run_arm("grpo-vllm", args.grpo_steps)
        after_first = lambda values: sum(values[1:]) / max(1, len(values) - 1)  # noqa: E731  (the first warms up)
        per_step = {k: after_first(r["step_times"]) for k, r in (("hf", hf), ("vllm", vllm))}
        generating = {k: after_first(r["generation_seconds"]) for k, r in (("hf", hf), ("vllm", vllm))}
        whole = {k: r["train_seconds"] / r["steps"] for k, r in (("hf", hf), ("vllm", vllm))}
        figures["grpo"] = {"step_s": per_step, "generation_s": generating,
                           "first_step_s": {"hf": hf["step_times"][0], "vllm": vllm["step_times"][0]},
                           "train_s_per_step": whole, "speedup": per_step["hf"] / per_step["vllm"],
                           "generation_speedup": generating["hf"] / generating["vllm"],
                           "speedup_with_start": whole["hf"] / whole["vllm"]}
        g = figures["grpo"]
        print(f"  => seconds per step after the first: hf {per_step['hf']:.1f}, vllm {per_step['vllm']:.1f}: "
              f"{g['speedup']:.2f}x (goal >= 2x); of which generating: hf {generating['hf']:.1f}, vllm "
              f"{generating['vllm']:.1f}: {g['generation_speedup']:.2f}x; whole training incl. loading and the engine's "
              f"start {g['speedup_with_start']:.2f}x")
    if "memory" in wanted:
        print(f"SFT, {args.sft_steps} steps of batch 4: full fine-tune against LoRA (r 16, all linear layers):")
        full, lora = run_arm("sft-full", args.sft_steps), run_arm("sft-lora", args.sft_steps)
        checkpointed = run_arm("sft-lora-checkpointing", args.sft_steps)  # trainer_args: {gradient_checkpointing: true}
        figures["memory"] = {"full_mb": full["peak_rss_mb"], "lora_mb": lora["peak_rss_mb"],
                             "lora_checkpointing_mb": checkpointed["peak_rss_mb"],
                             "ratio": lora["peak_rss_mb"] / full["peak_rss_mb"],
                             "ratio_checkpointing": checkpointed["peak_rss_mb"] / full["peak_rss_mb"]}
        print(f"  => peak RSS LoRA / full: {figures['memory']['ratio']:.2f}x (goal <= 0.6x); with gradient checkpointing "
              f"{figures['memory']['ratio_checkpointing']:.2f}x")
    if "overhead" in wanted:
        print(f"SFT, {args.sft_steps} steps: the finetune stage's training against a plain TRL script:")
        plain, stage = run_arm("sft-plain", args.sft_steps), run_arm("sft-stage", args.sft_steps)
        overhead = stage["process_seconds"] / plain["process_seconds"] - 1
        figures["overhead"] = {"plain_s": plain["process_seconds"], "stage_s": stage["process_seconds"], "overhead": overhead}
        print(f"  => evoforge's overhead: {overhead:+.1%} of the wall time (goal <= 10%)")
    if "processes" in wanted:
        print(f"SFT, {args.sft_steps} steps, global batch 4: processes 1 (batch 4) against processes 2 (2 x 2):")
        one, two = run_arm("sft-processes-1", args.sft_steps), run_arm("sft-processes-2", args.sft_steps)
        figures["processes"] = {"loss_1": one["last_loss"], "loss_2": two["last_loss"],
                                "loss_difference": abs(two["last_loss"] - one["last_loss"]) / abs(one["last_loss"]),
                                "s_per_step_1": one["train_seconds"] / one["steps"],
                                "s_per_step_2": two["train_seconds"] / two["steps"]}
        p = figures["processes"]
        print(f"  => last-step loss {p['loss_1']:.4f} vs {p['loss_2']:.4f} ({p['loss_difference']:.2%} apart); "
              f"s/step {p['s_per_step_1']:.2f} vs {p['s_per_step_2']:.2f} (2 cores: informational)")
    (OUT / "figures.json").write_text(json.dumps(figures, indent=1))
    print(f"figures: {OUT / 'figures.json'}")


if __name__ == "__main__":
    main()
