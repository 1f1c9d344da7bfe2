"""The stage flows through real Prefect, real vLLM (a tiny random model) and real math-verify."""
from __future__ import annotations

import duckdb
import pytest

from evoforge.data import catalog
from evoforge.data.lake import lake
from evoforge.flows.config import RoundConfig, load_config


@pytest.fixture()
def config(apples_round) -> RoundConfig:
    return apples_round


def stage_runs(run: str) -> list[dict]:
    con = catalog.connect(lake().run_dir(run))
    cursor = con.execute("SELECT stage, status, rows_in, rows_out, rows_quarantined, flow_run_id, output_fingerprint, error "
                         "FROM stage_runs ORDER BY started_at")
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row)) for row in cursor.fetchall()]


@pytest.mark.model
@pytest.mark.server
def test_ingest_generate_verify_filter_round_then_skip_then_force(prefect_server, runs_root, config):
    from evoforge.flows.generate import generate_flow
    from evoforge.flows.round import round_flow, stage_flow

    results = round_flow("flowtest", config)  # no round given: the run's next one, 0 for a new run
    assert [(r.stage, r.status) for r in results] == [
        ("ingest", "completed"), ("generate", "completed"), ("verify", "completed"), ("filter", "completed")]
    store = lake()
    problems, rollouts = store.read("flowtest", "problems"), store.read("flowtest", "rollouts")
    verdicts, stats = store.read("flowtest", "verdicts"), store.read("flowtest", "problem_stats")
    assert problems.num_rows == 5 and store.read("flowtest", "quarantine")["reason"].to_pylist() == ["not_json"]
    assert rollouts.num_rows == 20 and len(set(rollouts["rollout_id"].to_pylist())) == 20
    per_problem = {}
    for pid, index in zip(rollouts["problem_id"].to_pylist(), rollouts["sample_index"].to_pylist()):
        per_problem.setdefault(pid, set()).add(index)
    assert per_problem == {pid: {0, 1, 2, 3} for pid in problems["problem_id"].to_pylist()}
    assert set(verdicts["rollout_id"].to_pylist()) == set(rollouts["rollout_id"].to_pylist())
    assert sorted(stats["problem_id"].to_pylist()) == sorted(problems["problem_id"].to_pylist())
    assert set(stats["n"].to_pylist()) == {4}

    runs = stage_runs("flowtest")
    assert [(r["stage"], r["status"]) for r in runs] == [
        ("ingest", "completed"), ("generate", "completed"), ("verify", "completed"), ("filter", "completed")]
    assert runs[0]["rows_in"] == 6 and runs[0]["rows_quarantined"] == 1
    assert all(r["flow_run_id"] for r in runs)

    # the catalog file is a real DuckDB database a data engineer can open read-only
    con = duckdb.connect(str(store.run_dir("flowtest") / "catalog.duckdb"), read_only=True)
    assert con.execute("SELECT count(*) FROM verdicts").fetchone()[0] == 20
    con.close()

    again = round_flow("flowtest", config, round=0)
    assert [r.status for r in again] == ["skipped"] * 4
    assert store.read("flowtest", "rollouts").num_rows == 20

    texts = dict(zip(rollouts["rollout_id"].to_pylist(), rollouts["text"].to_pylist()))
    forced = generate_flow("flowtest", 0, config, force=True)
    assert forced.status == "completed"
    regenerated = store.read("flowtest", "rollouts")
    assert dict(zip(regenerated["rollout_id"].to_pylist(), regenerated["text"].to_pylist())) == texts

    changed = config.model_copy(deep=True)
    changed.generate.sampling.max_tokens = 8
    assert generate_flow("flowtest", 0, changed).status == "completed"  # a config change is not skipped
    assert max(store.read("flowtest", "rollouts")["completion_tokens"].to_pylist()) <= 8
    statuses = [(r["stage"], r["status"]) for r in stage_runs("flowtest")]
    assert statuses.count(("generate", "completed")) == 3 and statuses.count(("generate", "skipped")) == 1

    # a scheduled round names neither config nor round: the run's saved config, its next round
    following = round_flow("flowtest")
    assert [(r.stage, r.round, r.status) for r in following] == [
        ("generate", 1, "completed"), ("verify", 1, "completed"), ("filter", 1, "completed")]

    # the one rerun deployment of deploy/prefect.yaml: any stage by its registry name, on the saved config
    assert [(r.stage, r.round, r.status) for r in stage_flow(stage="filter", run="flowtest", round=1)] == [
        ("filter", 1, "skipped")]
    assert [(r.stage, r.status) for r in stage_flow(stage="ingest", run="flowtest")] == [("ingest", "skipped")]


@pytest.mark.model
@pytest.mark.server
def test_one_stage_per_run_at_a_time_and_other_runs_are_not_blocked(prefect_server, runs_root, config):
    import subprocess
    import sys
    import time

    from evoforge.data.runlock import RunBusy
    from evoforge.flows.ingest import ingest_flow

    run_dir = lake().ensure_run("busy")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from evoforge.data.runlock import run_lock\n"
        f"with run_lock(__import__('pathlib').Path({str(run_dir)!r}), 'round 0 / generate'):\n"
        "    print('held', flush=True); time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunBusy, match=r"run 'busy' is busy: round 0 / generate \(pid \d+"):
            ingest_flow("busy", config.sources[0])
        assert ingest_flow("other", config.sources[0]).status == "completed"  # a different run goes ahead
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    assert ingest_flow("busy", config.sources[0]).status == "completed"  # a dead holder leaves no stale lock


@pytest.mark.model
@pytest.mark.server
def test_a_stage_without_its_input_fails_with_a_clear_message(prefect_server, runs_root, config):
    from evoforge.flows.inputs import MissingInput
    from evoforge.flows.verify import verify_flow

    lake().ensure_run("empty")
    with pytest.raises(MissingInput, match="run `evoforge stage generate --run empty --round 0` first"):
        verify_flow("empty", 0, config)


@pytest.mark.unit
def test_the_shipped_demo_config_loads(runs_root):
    from evoforge.flows.config import DEFAULT_CONFIG

    demo = load_config(DEFAULT_CONFIG)
    assert demo.engine.model == "default" and demo.generate.sampling.n == 8
    assert {s.name for s in demo.sources} == {"easy_arithmetic", "gsm8k"}
    from evoforge.flows.config import PROJECT_ROOT

    for shipped in sorted((PROJECT_ROOT / "deploy" / "configs").glob("*.yaml")):
        load_config(shipped)  # every shipped config validates against the current schema
    rstar = load_config(PROJECT_ROOT / "deploy" / "configs" / "rstar.yaml")
    assert "mcts" in rstar.stages and rstar.finetune.train_ppm and rstar.mcts.use_ppm
    raro = load_config(PROJECT_ROOT / "deploy" / "configs" / "raro.yaml")
    assert "critic" in raro.stages and raro.finetune.methods == ["raro"] and raro.sources[0].preset == "demonstrations"


@pytest.mark.server
def test_ingest_command_prints_counts_by_reason_and_names_a_bad_file(write_jsonl, prefect_server, runs_root, scratch, capsys):
    from evoforge.app.cli import main

    source = write_jsonl(scratch / "mixed.jsonl", [
        {"question": "What is 3 + 4?", "answer": "7"}, {"question": "What is 3 + 4?", "answer": "7"},
        {"question": "No answer here"}, b"\xff\xfe broken",
    ])
    assert main(["ingest", str(source), "--run", "cli"]) == 0
    out = capsys.readouterr().out
    assert "4 rows read, 1 problems, 3 quarantined (completed)" in out
    assert "duplicate 1, missing_field 1, not_utf8 1" in out
    assert main(["ingest", str(source), "--run", "cli"]) == 0
    assert "(skipped)" in capsys.readouterr().out
    # an edited source replaces its own rows: its unchanged rows are not called duplicates of themselves
    write_jsonl(source, [{"question": "What is 3 + 4?", "answer": "7"}, {"question": "What is 5 + 5?", "answer": "10"}])
    assert main(["ingest", str(source), "--run", "cli"]) == 0
    assert "2 rows read, 2 problems, 0 quarantined (completed)" in capsys.readouterr().out
    assert sorted(lake().read("cli", "problems")["answer"].to_pylist()) == ["10", "7"]
    assert lake().read("cli", "quarantine").num_rows == 0
    not_jsonl = scratch / "notes.jsonl"
    not_jsonl.write_text("just\ntext\n")
    assert main(["ingest", str(not_jsonl), "--run", "cli"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "notes.jsonl: not a JSONL file" in err and "Traceback" not in err


@pytest.mark.server
def test_a_truncated_part_is_named_by_status_sql_and_ingest_and_a_rerun_heals_it(write_jsonl, prefect_server, runs_root,
                                                                                 scratch, capsys):
    """The issue's repro: ingest a small file, truncate its `problems` part to half its size, then run
    `status`, `sql` and the ingest again with --force; `doctor` finds it, `doctor --repair` heals it."""
    from evoforge.app.cli import main

    source = write_jsonl(scratch / "small.jsonl", [{"question": f"What is {i} + {i}?", "answer": str(2 * i)}
                                                    for i in range(40)])
    assert main(["ingest", str(source), "--run", "hurt"]) == 0
    (part,) = (lake().stage_dir("hurt", 0, "ingest") / "problems").glob("part-*.parquet")
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    capsys.readouterr()

    assert main(["status", "--run", "hurt"]) == 0
    captured = capsys.readouterr()
    assert "ingest" in captured.out and "completed" in captured.out  # the rest of the run still answers
    assert captured.err.count(f"damaged: {part} (size") == 1
    assert main(["sql", "SELECT count(*) AS n FROM problems", "--run", "hurt", "--csv"]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines() == ["n", "0"] and captured.err.startswith(f"damaged: {part}")
    assert main(["doctor", "--run", "hurt"]) == 1
    assert f"damaged: {part}" in capsys.readouterr().out

    # the stage that reads it names it; the stage that wrote it replaces it, with or without --force
    assert main(["ingest", str(source), "--run", "hurt"]) == 0
    assert "40 problems, 0 quarantined (completed)" in capsys.readouterr().out
    stage = lake().stage_dir("hurt", 0, "ingest")
    committed = lambda: [stage / p.file for p in lake().manifest("hurt", 0, "ingest").parts]  # noqa: E731
    assert lake().read("hurt", "problems").num_rows == 40 and part not in committed()  # superseded, kept until vacuum
    assert main(["ingest", str(source), "--run", "hurt", "--force"]) == 0
    assert main(["doctor", "--run", "hurt"]) == 0

    (part,) = [p for p in committed() if p.parent.name == "problems"]
    part.write_bytes(b"PAR1" + bytes(part.stat().st_size - 4))  # same size, different bytes
    capsys.readouterr()
    assert main(["doctor", "--run", "hurt", "--repair"]) == 0
    out = capsys.readouterr().out
    assert "checksum differs" in out and "moved" in out and "recomputed" in out
    assert main(["ingest", str(source), "--run", "hurt"]) == 0
    assert "40 problems" in capsys.readouterr().out and main(["doctor", "--run", "hurt"]) == 0


@pytest.mark.model
@pytest.mark.server
def test_a_stage_that_fails_for_good_is_recorded_and_stops_the_round_with_one_line(prefect_server, runs_root, config,
                                                                                   scratch, capsys):
    from evoforge.app.cli import main
    from evoforge.flows.config import save_config

    broken = config.model_copy(deep=True)
    broken.engine.max_model_len = 64  # the few-shot prompt does not fit: the engine refuses every request
    path = scratch / "broken.yaml"
    save_config(broken, path)
    assert main(["round", "--run", "broken", "--config", str(path), "--round", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # (vLLM's own load progress goes to stderr too)
    assert [line for line in err if line.startswith("error:")] == err[-1:]
    assert err[-1].startswith("error: generate (run broken, round 0) failed: EngineRequestError: ")
    assert "maximum context length is 64" in err[-1]
    runs = stage_runs("broken")
    assert [(r["stage"], r["status"]) for r in runs] == [("ingest", "completed"), ("generate", "failed")]
    assert "maximum context length" in next(r["error"] for r in runs if r["status"] == "failed")
    assert lake().read("broken", "rollouts").num_rows == 0  # nothing half-written, and verify never ran


@pytest.mark.server
def test_a_run_started_by_ingest_alone_runs_a_stage_on_the_shipped_default_config(prefect_server, runs_root, scratch,
                                                                                   write_jsonl, capsys):
    """...and a user error inside the stage's flow is exactly one line on the terminal, the whole log
    (Prefect's traceback included) in the run's log file."""
    import os
    import subprocess
    import sys

    from evoforge.app.cli import main

    source = write_jsonl(scratch / "pool.jsonl", [{"question": "What is 1 + 1?", "answer": "2"}])
    assert main(["ingest", str(source), "--run", "bare"]) == 0
    # a fresh process, as a user runs it (its own temporary Prefect server, its own terminal)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    done = subprocess.run([sys.executable, "-m", "evoforge", "stage", "verify", "--run", "bare"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "run 'bare' has no saved config: using the shipped deploy/configs/demo.yaml" in done.stdout
    (line,) = done.stderr.splitlines()
    assert line.startswith("error: run 'bare' round 0 has no rollouts: run `evoforge stage generate --run bare --round 0` first")
    log = line.rsplit("(log: ", 1)[1].rstrip(")")
    assert "Traceback" in open(log).read() and "MissingInput" in open(log).read()
