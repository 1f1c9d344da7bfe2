"""Kill a stage with SIGKILL at seeded random moments, rerun it, and compare with an uninterrupted run.

    .venv/bin/python bench/chaos.py [--kills 10] [--seed 0] [--stages ingest,generate,...] [--lake disk|s3]

For each stage: a template run holds everything the stage reads (built once, uninterrupted); a
reference copy runs the stage without interruption; then each trial copies the template, starts
`evoforge stage <name>` (`evoforge ingest` for ingest) in its own process group, SIGKILLs the whole
group (vLLM's engine process and the grader workers included) at a seeded random moment of the
reference's duration, checks that the run is readable right after the kill, reruns the same command
and compares the stage's output with the reference by row keys. Two moments per stage are taken at
publication instead: the moment a part of the new output appears before its manifest does.

Reported per stage: trials recovered (the rerun exits 0, `doctor` finds nothing damaged), rows lost
and rows duplicated against the reference, leftovers not swept after the rerun (temporary files,
uncommitted parts, the stage's chunk folder), and where the kills landed (starting, computing,
publishing, after the commit). The tiny random model generates (fast; what matters here is the
machinery, not the answers). Its answers are all wrong, so the template's verdicts are rewritten to
mark 2 of each problem's 8 samples correct: that makes every problem under-performing and gives
synthesize real work. Everything is written under runs/bench-chaos/ and the Prefect server it
starts is stopped at the end.

`--lake s3` runs the same seeds and kill points with the lake on a local S3 server (moto,
data/local_s3.py; `EVOFORGE_RUNS=s3://<bucket>/runs`, the AWS variables pointing at it; logs and the
Prefect server under runs/bench-chaos-s3/). The run lock is then a lease (`_lock.json`), which the
rerun takes over at once since its holder died on this machine. Leftovers on S3 are counted the
same way, adapted to what a store keeps: a part upload killed mid-way never becomes an object, but
a part whose upload completed before the kill and that no version of the manifest lists is a
leftover (parts an earlier version lists are history, `Lake.inspect().superseded`, not leftovers);
so is a non-empty `_chunks/` folder of the stage, a checkpoint object its `_checkpoint.json` does
not list (or a checkpoint folder without one), and a multipart upload the kill left unfinished under
the run (no object, but the store keeps its parts, and bills them, until it is aborted).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from evoforge.data import home  # noqa: E402

home.configure()

STAGES = ["ingest", "generate", "verify", "synthesize", "finetune", "evaluate"]
BEFORE = {"generate": ["ingest"], "verify": ["ingest", "generate"],
          "synthesize": ["ingest", "generate", "verify", "filter"],
          "finetune": ["ingest", "generate", "verify", "filter", "synthesize", "pairs"],
          "evaluate": ["ingest", "generate", "verify", "filter", "synthesize", "pairs", "finetune"]}
# what identifies a row across runs (ids are content hashes; checkpoint ids are per training)
KEYS = {"problems": ["problem_id"], "quarantine": ["source_file", "source_row", "reason"],
        "rollouts": ["rollout_id"], "verdicts": ["rollout_id"], "problem_stats": ["problem_id"],
        "variants": ["variant_id"], "checkpoints": ["role", "method"], "train_metrics": ["step", "metric"],
        "evals": ["model_round", "eval_set", "search"],
        "eval_results": ["model_round", "eval_set", "problem_id", "search"],
        "score_intervals": ["model_round", "eval_set", "metric", "k", "search"],
        "promotions": ["checkpoint_id", "model_round", "decided_by"]}
SOURCE = "data/sets/easy_arithmetic/train.jsonl"


def config(tiny_model: Path) -> dict:
    return {
        "engine": {"model": str(tiny_model), "backend": "vllm", "max_model_len": 1024},
        "sources": [{"path": SOURCE, "preset": "plain", "name": "easy", "limit": 16}],
        "generate": {"sampling": {"n": 8, "max_tokens": 24, "seed": 0}, "batch_problems": 4},
        "verify": {"workers": 2},
        "synthesize": {"solutions_per_problem": 1, "samples_per_variant": 8,
                       "synthesis": {"n": 1, "max_tokens": 48, "seed": 1}},
        "pairs": {"sft_per_problem": 2},
        "finetune": {"method": "sft", "max_steps": 4, "batch_size": 2},
        "evaluate": {"sets": [{"name": "easy-test", "path": "data/sets/easy_arithmetic/test.jsonl",
                               "preset": "plain", "limit": 8}],
                     "sampling": {"n": 4, "max_tokens": 24, "seed": 7}, "pass_k": [1, 4]},
        "stages": ["generate", "verify", "filter", "synthesize", "pairs", "finetune", "evaluate"],
    }


class Bench:
    def __init__(self, root: Path, env: dict, config_path: Path, lake_root: str | Path, s3=None):
        from evoforge.data.lake import Lake
        from evoforge.data.storage import is_remote

        self.root, self.env, self.config_path = root, env, config_path
        self.lake = Lake(lake_root)
        self.remote = is_remote(self.lake.root)
        self.s3 = s3  # the LocalS3 server (data/local_s3.py) when the lake is on it

    def command(self, stage: str, run: str) -> list[str]:
        if stage == "ingest":
            return [sys.executable, "-m", "evoforge", "ingest", SOURCE, "--run", run, "--limit", "16",
                    "--name", "easy"]
        return [sys.executable, "-m", "evoforge", "stage", stage, "--run", run, "--config", str(self.config_path)]

    def start(self, stage: str, run: str, log: Path) -> subprocess.Popen:
        with open(log, "ab") as fh:
            return subprocess.Popen(self.command(stage, run), cwd=ROOT, env=self.env, stdout=fh,
                                    stderr=subprocess.STDOUT, start_new_session=True)

    def run(self, stage: str, run: str, log: Path) -> float:
        started = time.monotonic()
        process = self.start(stage, run, log)
        if process.wait() != 0:
            raise RuntimeError(f"{stage} on {run} failed; see {log}")
        return time.monotonic() - started

    def copy(self, source: str, target: str, without: str | None) -> None:
        from evoforge.data.storage import remove_tree

        remove_tree(self.lake.run_dir(target))
        if self.remote:  # object by object, copied on the server
            source_dir, target_dir = self.lake.run_dir(source), self.lake.run_dir(target)
            for path in self.objects(source_dir):
                source_dir.fs.copy_file(path._path, (target_dir / path.relative_to(source_dir).as_posix())._path)
        elif (self.lake.root / source).is_dir():
            shutil.copytree(self.lake.root / source, self.lake.root / target)
        if without:  # the stage's output is what the trial makes
            remove_tree(self.lake.stage_dir(target, 0, without))

    def list_objects(self, run: str, logs: Path) -> None:
        """On S3, what the run holds, object by object, into logs/<run>.objects (the store is gone after the bench)."""
        if self.remote:
            run_dir = self.lake.run_dir(run)
            (logs / f"{run}.objects").write_text("".join(
                f"{p.relative_to(run_dir).as_posix()} {p.info().size}\n" for p in self.objects(run_dir)))

    def objects(self, folder) -> list:
        """Every object under an s3:// folder, in one listing (directory markers left out)."""
        import pyarrow.fs as pafs

        from evoforge.data.storage import ObjectPath

        selector = pafs.FileSelector(folder._path, recursive=True, allow_not_found=True)
        return [ObjectPath(i.path, i) for i in folder.fs.get_file_info(selector) if i.type == pafs.FileType.File]

    def new_parts(self, folder) -> bool:
        """Whether a part sits in a table folder of `folder` (the trial's copy starts with none)."""
        from evoforge.data.manifest import PART_NAME

        if self.remote:
            return any(PART_NAME.fullmatch(p.name) and len(p.relative_to(folder).parts) == 2 for p in self.objects(folder))
        if not folder.is_dir():
            return False
        for table in os.scandir(folder):
            if table.is_dir():
                for entry in os.scandir(table.path):
                    if PART_NAME.fullmatch(entry.name):
                        return True
        return False

    def rows(self, run: str, stage: str) -> dict[str, Counter]:
        from evoforge.flows.stages import STAGES as REGISTRY

        found = {}
        for table in REGISTRY[stage].writes:
            rows = self.lake.read(run, table, 0, stage).to_pylist()
            found[table] = Counter(tuple(r[k] for k in KEYS[table]) for r in rows)
        return found

    def phase(self, run: str, stage: str, attempt_started: float) -> str:
        try:
            events = self.lake.read(run, "stage_runs").to_pylist()
        except Exception:
            return "starting"
        mine = [e for e in events if e["stage"] == stage and e["started_at"].timestamp() >= attempt_started]
        if not mine:
            return "starting"
        if any(e["status"] != "running" for e in mine):
            return "after commit"
        if self.lake.has_output(run, 0, stage):  # the trial's copy starts without one
            return "after commit"
        return "publishing" if self.new_parts(self.lake.stage_dir(run, 0, stage)) else "computing"


def wait_for_publication(bench: Bench, run: str, stage: str, process: subprocess.Popen) -> bool:
    """Poll until a part of a new output appears before its manifest; True when caught in time. On S3
    a part appears when its upload completes; a listing there takes milliseconds, a commit after the
    last part tens of them (the lease check, the manifest's read and PUT)."""
    folder = bench.lake.stage_dir(run, 0, stage)
    while process.poll() is None:
        if bench.new_parts(folder):
            return True
        time.sleep(0.002 if bench.remote else 0.0005)
    return False


def leftovers(bench: Bench, run: str, stage: str) -> dict[str, int]:
    """What a dead attempt left that the rerun did not sweep, by kind (see the module doc)."""
    from evoforge.data.atomic import leftovers as temporaries

    run_dir = bench.lake.run_dir(run)
    inspected = bench.lake.inspect(run)
    # a stage's chunk folder (any execution key) that still holds a chunk: a published stage removes it
    chunk_folders = [f for f in run_dir.glob("_chunks/round=*/*") if f.is_dir() and any(f.rglob("*.arrow"))]
    found = {"uncommitted parts and temporary files": len(set(inspected.leftovers) | set(temporaries(run_dir))),
             "chunk folders": len(chunk_folders)}
    if bench.remote:
        found["checkpoint objects"] = len(unlisted_checkpoint_objects(bench, run_dir))
        found["unfinished uploads"] = len(unfinished_uploads(bench, run_dir))
    return found


def unlisted_checkpoint_objects(bench: Bench, run_dir) -> list:
    """Objects under <run>/models/<id>/ that the folder's `_checkpoint.json` does not list (all of a
    folder without one: an upload that never finished)."""
    from evoforge.models.checkpoint_store import CHECKPOINT_MANIFEST

    models = run_dir / "models"
    by_folder: dict[str, list] = {}
    for path in bench.objects(models):
        by_folder.setdefault(path.relative_to(models).parts[0], []).append(path)
    unlisted = []
    for name, paths in by_folder.items():
        try:
            listed = {e["file"] for e in json.loads((models / name / CHECKPOINT_MANIFEST).read_text())["files"]}
        except FileNotFoundError:
            listed = set()
        unlisted += [p for p in paths if p.relative_to(models / name).as_posix() not in listed | {CHECKPOINT_MANIFEST}]
    return unlisted


def unfinished_uploads(bench: Bench, run_dir) -> list[str]:
    """Multipart uploads under the run that were started and neither completed nor aborted."""
    prefix = run_dir.key.rstrip("/") + "/"
    found, pages = [], bench.s3.client().get_paginator("list_multipart_uploads")
    for page in pages.paginate(Bucket=run_dir.bucket, Prefix=prefix):
        found += [u["Key"] for u in page.get("Uploads", [])]
    return found


def trial(bench: Bench, stage: str, number: int, moment: float | None, reference: dict, logs: Path) -> dict:
    run = f"{stage}-kill-{number}"
    bench.copy(f"{stage}-template", run, without=stage)
    log = logs / f"{run}.log"
    attempt_started = time.time()
    process = bench.start(stage, run, log)
    if moment is None:  # at publication: the first part of the new output, before its manifest
        caught = wait_for_publication(bench, run, stage, process)
        killed_at = time.time() - attempt_started if caught else None
    else:
        deadline = time.monotonic() + moment
        while process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        killed_at = moment if process.poll() is None else None
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        where = bench.phase(run, stage, attempt_started)
    else:
        where = "finished before the kill"
    process.wait()
    readable = True
    try:  # right after the kill, everything committed still reads whole
        if bench.lake.run_dir(run).is_dir():
            bench.rows(run, stage)
            readable = not bench.lake.inspect(run, checksum=True).damaged
    except Exception:
        readable = False
    rerun = bench.start(stage, run, log)
    code = rerun.wait()
    from evoforge.data.lake import LakeError

    try:
        damaged = len(bench.lake.inspect(run, checksum=True).damaged)
        got = bench.rows(run, stage)
    except LakeError:
        damaged, got = 1, {}
    lost = sum(max(0, n - got.get(t, Counter())[k]) for t, rows in reference.items() for k, n in rows.items())
    duplicated = sum(max(0, n - reference.get(t, Counter())[k]) for t, rows in got.items() for k, n in rows.items())
    left = leftovers(bench, run, stage)
    bench.list_objects(run, logs)
    return {"stage": stage, "trial": number, "kill_after_s": None if killed_at is None else round(killed_at, 2),
            "phase": where, "readable_after_kill": readable, "rerun_exit": code, "damaged": damaged,
            "recovered": code == 0 and damaged == 0 and readable, "lost": lost, "duplicated": duplicated,
            "leftovers": sum(left.values()), "leftovers_by_kind": left,
            "superseded_parts": len(bench.lake.inspect(run).superseded)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10, help="kills per stage (2 of them at publication)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--lake", choices=["disk", "s3"], default="disk",
                        help="where the runs live: a local folder, or a local S3 server (moto)")
    args = parser.parse_args()
    stages = [s for s in args.stages.split(",") if s]
    unknown = set(stages) - set(STAGES)
    if unknown:
        parser.error(f"unknown stages {sorted(unknown)}; choose from {STAGES}")

    from evoforge.app.prefect_server import api_url, start_server, stop_server
    from evoforge.models.tiny import tiny_model_folder

    root = ROOT / "runs" / ("bench-chaos" if args.lake == "disk" else "bench-chaos-s3")
    shutil.rmtree(root, ignore_errors=True)
    logs = root / "logs"
    logs.mkdir(parents=True)
    s3 = bucket = None
    if args.lake == "s3":
        from evoforge.data.local_s3 import LocalS3

        s3 = LocalS3(log_path=logs / "local-s3.log").start()
        os.environ.update(s3.environment())  # this process's lake and the stages' processes
        # a bucket of this invocation's own: the trials' checkpoint caches (.cache/checkpoints/<bucket>/)
        # are keyed by bucket, so none of an earlier invocation is resumed from
        bucket = s3.create_bucket(f"chaos-{os.getpid()}-{int(time.time())}")
    lake_root = root / "lake" if args.lake == "disk" else f"s3://{bucket}/runs"
    prefect_home = root / "prefect"
    prefect_home.mkdir()
    config_path = root / "round.json"
    config_path.write_text(json.dumps(config(tiny_model_folder())))
    port = free_port()
    server_env = {"PREFECT_HOME": str(prefect_home),
                  "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{prefect_home / 'prefect.db'}"}
    os.environ.update(server_env)
    server = start_server(port=port, log_path=logs / "prefect-server.log")
    env = {**os.environ, "EVOFORGE_RUNS": str(lake_root), "PREFECT_API_URL": api_url(port=port)}
    bench = Bench(root, env, config_path, lake_root, s3)
    results = []
    try:
        done: list[str] = []  # stages the growing base run holds, each run once, uninterrupted
        for stage in [s for s in STAGES if s in stages]:
            template = f"{stage}-template"
            for before in BEFORE.get(stage, []):
                if before not in done:
                    bench.run(before, "base", logs / "base.log")
                    done.append(before)
                    if before == "verify":
                        rig_verdicts(bench, "base")
            bench.copy("base", template, without=None)
            bench.copy(template, f"{stage}-reference", without=None)
            seconds = bench.run(stage, f"{stage}-reference", logs / f"{stage}-reference.log")
            reference = bench.rows(f"{stage}-reference", stage)
            bench.list_objects(f"{stage}-reference", logs)
            rng = random.Random(f"{args.seed}-{stage}")
            moments = [rng.uniform(0.05, 1.0) * seconds for _ in range(max(0, args.kills - 2))] + [None] * min(2, args.kills)
            print(f"{stage}: uninterrupted {seconds:.1f} s, {sum(sum(c.values()) for c in reference.values())} rows; "
                  f"{len(moments)} kills", flush=True)
            for number, moment in enumerate(moments):
                result = trial(bench, stage, number, moment, reference, logs)
                results.append(result)
                print("  " + json.dumps(result, default=str), flush=True)
                (root / "results.json").write_text(json.dumps(results, indent=1, default=str))  # kept if a later stage fails
    finally:
        stop_server(server)
        if s3 is not None:
            s3.stop()
            from evoforge.data import home as evoforge_home

            for cache in ("checkpoints", "checkpoints/training"):  # the trials' downloads and training folders
                shutil.rmtree(evoforge_home.cache_dir() / cache / bucket, ignore_errors=True)
    (root / "results.json").write_text(json.dumps(results, indent=1, default=str))
    print()
    print(f"lake: {'local folder' if args.lake == 'disk' else 'local S3 server (moto)'}")
    print("| stage | kills | landed: starting / computing / publishing / after commit / finished | recovered "
          "| rows lost | rows duplicated | leftovers not swept |")
    print("|---|---|---|---|---|---|---|")
    for stage in stages:
        mine = [r for r in results if r["stage"] == stage]
        landed = Counter(r["phase"] for r in mine)
        print(f"| {stage} | {len(mine)} | {landed['starting']} / {landed['computing']} / {landed['publishing']} / "
              f"{landed['after commit']} / {landed['finished before the kill']} | "
              f"{sum(r['recovered'] for r in mine)}/{len(mine)} | {sum(r['lost'] for r in mine)} | "
              f"{sum(r['duplicated'] for r in mine)} | {sum(r['leftovers'] for r in mine)} |")


def rig_verdicts(bench: Bench, run: str) -> None:
    """Mark samples 0 and 1 of each problem correct (accuracy 2/8: under-performing), so synthesize
    and the stages after it have work with a model that never answers right."""
    import pyarrow as pa
    import pyarrow.compute as pc

    verdicts = bench.lake.read(run, "verdicts", 0, "verify").drop_columns(["round", "stage"])
    rollouts = bench.lake.read(run, "rollouts", 0, "generate").select(["rollout_id", "sample_index", "problem_id"])
    index = dict(zip(rollouts["rollout_id"].to_pylist(), rollouts["sample_index"].to_pylist()))
    correct = pa.array([index[r] < 2 for r in verdicts["rollout_id"].to_pylist()])
    rigged = verdicts.set_column(verdicts.schema.get_field_index("verdict"), "verdict",
                                 pc.if_else(correct, "correct", verdicts["verdict"]))
    problems = {p["problem_id"]: p["answer"] for p in bench.lake.read(run, "problems").to_pylist()}
    texts = [f"The answer is \\boxed{{{problems[p]}}}." for p in rollouts["problem_id"].to_pylist()]
    generated = bench.lake.read(run, "rollouts", 0, "generate").drop_columns(["round", "stage"])
    ordered = dict(zip(rollouts["rollout_id"].to_pylist(), texts))
    generated = generated.set_column(generated.schema.get_field_index("text"), "text", pa.array(
        [ordered[r] if index[r] < 2 else t for r, t in zip(generated["rollout_id"].to_pylist(), generated["text"].to_pylist())]))
    bench.lake.publish_stage(run, 0, "generate", {"rollouts": generated})
    bench.lake.publish_stage(run, 0, "verify", {"verdicts": rigged})


if __name__ == "__main__":
    main()
