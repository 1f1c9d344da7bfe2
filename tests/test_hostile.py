"""Hostile and damaged input (issue 13): each case a user found that once took a file or a run down.
Every case ends as data or as one quarantine row naming the row, the field and the reason."""
from __future__ import annotations

import codecs
import json
import os

import pyarrow as pa
import pyarrow.parquet  # noqa: F401 (pa.parquet)
import pytest

from evoforge.tasks.ingest import SourceConfig, ingest
from evoforge.tasks.verify import VerifyConfig, check_golds

pytestmark = pytest.mark.unit

VERIFY = VerifyConfig(workers=1, deadline_seconds=10)


def ingested(path, **config):
    return ingest(path, SourceConfig(path=str(path), **config), check_golds=lambda answers: check_golds(answers, VERIFY))


def test_a_byte_order_mark_at_the_start_of_a_file_is_not_a_bad_row(scratch):
    path = scratch / "bom.jsonl"
    path.write_bytes(codecs.BOM_UTF8 + b'{"question": "What is 1 + 1?", "answer": "2"}\n{"question": "And 2 + 2?", "answer": "4"}\n')
    result = ingested(path)
    assert result.problems["answer"].to_pylist() == ["2", "4"] and result.quarantine.num_rows == 0
    assert result.problems["question"].to_pylist()[0] == "What is 1 + 1?"


def test_an_integer_past_pythons_digit_limit_quarantines_its_row_and_names_the_field(scratch, write_jsonl):
    huge = "9" * 5000
    path = write_jsonl(scratch / "huge.jsonl", [
        {"question": "What is 2 + 3?", "answer": "5"},
        f'{{"question": "How many grains?", "answer": {huge}}}',
        f'{{"question": "What is 4 + 4?", "answer": "8", "unused": {huge}}}',  # a field nobody reads is no harm
    ])
    result = ingested(path)
    assert result.problems["answer"].to_pylist() == ["5", "8"]
    (row,) = result.quarantine.to_pylist()
    assert (row["source_row"], row["field"], row["reason"]) == (2, "answer", "unusable_number")
    assert "5000 digits" in row["detail"]


@pytest.mark.parametrize("gold", ["NaN", "nan", "inf", "-inf", "Infinity", "1e999", "-1e999"])
def test_a_gold_answer_that_is_not_a_finite_number_is_quarantined_as_unusable(scratch, write_jsonl, gold):
    path = write_jsonl(scratch / "golds.jsonl", [{"question": "What is 2 + 3?", "answer": "5"},
                                                 {"question": "What is the limit?", "answer": gold}])
    result = ingested(path)
    assert result.problems["answer"].to_pylist() == ["5"]
    (row,) = result.quarantine.to_pylist()
    assert (row["source_row"], row["field"], row["reason"]) == (2, "answer", "unusable_answer")


def test_json_nan_and_overflowing_numbers_as_gold_answers_are_quarantined_too(scratch, write_jsonl):
    path = write_jsonl(scratch / "json-numbers.jsonl", ['{"question": "A?", "answer": NaN}',
                                                        '{"question": "B?", "answer": 1e999}',
                                                        '{"question": "C?", "answer": 2e3}'])
    result = ingested(path)
    assert result.problems["answer"].to_pylist() == ["2000"]  # 2e3 read by JSON as 2000.0
    assert [(r["source_row"], r["reason"]) for r in result.quarantine.to_pylist()] == [(1, "unusable_answer"),
                                                                                        (2, "unusable_answer")]


def test_verify_file_grades_every_good_line_and_writes_a_row_naming_each_bad_one(scratch, capsys):
    from evoforge.app.cli import main

    source = scratch / "mixed.jsonl"
    source.write_bytes(b"\n".join([
        json.dumps({"gold": "12", "pred": "so \\boxed{12}"}).encode(),
        b"this is not json",
        json.dumps({"gold": "3"}).encode(),
        b'{"gold": "1", "pred": "\xff\xfe"}',
        json.dumps({"gold": "7", "pred": "\\boxed{8}"}).encode(),
    ]) + b"\n")
    out = scratch / "graded.jsonl"
    assert main(["verify-file", str(source), "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["input_line"], r["verdict"]) for r in rows] == [
        (1, "correct"), (2, "invalid_input"), (3, "invalid_input"), (4, "invalid_input"), (5, "wrong")]
    assert "mixed.jsonl:2: not JSON" in rows[1]["detail"] and "no field 'pred'" in rows[2]["detail"]
    assert "not UTF-8" in rows[3]["detail"]
    printed = capsys.readouterr().out
    assert "5 lines" in printed and "invalid_input 3" in printed


def test_verify_file_refuses_an_output_folder_that_does_not_exist_before_grading(scratch, capsys):
    from evoforge.app.cli import main

    source = scratch / "in.jsonl"
    source.write_text(json.dumps({"gold": "1", "pred": "\\boxed{1}"}) + "\n")
    assert main(["verify-file", str(source), "--out", str(scratch / "missing" / "out.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist or is not writable" in err


@pytest.mark.parametrize("command", [["status"], ["sql", "SELECT 1"], ["report"]])
def test_a_run_that_does_not_exist_is_one_line_that_lists_the_runs(runs_root, capsys, command):
    from evoforge.data.lake import lake
    from evoforge.app.cli import main

    lake().ensure_run("alpha")
    lake().ensure_run("beta")
    assert main([*command, "--run", "gamma"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "run 'gamma' does not exist" in err and "runs there: alpha, beta" in err


@pytest.mark.parametrize("command, option", [
    (["ingest", "data/sets/gsm8k/test.jsonl", "--run", "r", "--limit", "0"], "--limit"),
    (["verify-file", "in.jsonl", "--out", "out.jsonl", "--workers", "0"], "--workers"),
])
def test_an_option_out_of_range_is_one_line_naming_the_option_and_what_it_allows(runs_root, scratch, capsys,
                                                                               monkeypatch, command, option):
    from evoforge.app.cli import main

    monkeypatch.chdir(scratch)
    (scratch / "in.jsonl").write_text('{"gold": "1", "pred": "1"}\n')
    assert main(command) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {option}: Input should be greater than or equal to 1, not 0")



def publish_one_problem(store, run: str) -> None:
    """A run whose only table is one ingested problem: what the `evoforge sql` tests query."""
    from evoforge.data import schemas

    store.publish_stage(run, 0, "ingest", {"problems": pa.Table.from_pylist([dict(
        problem_id="p0", question="1+1?", answer="2", source="t", source_file="f", source_row=0, origin="seed")],
        schema=schemas.PROBLEMS)})


@pytest.mark.parametrize("statement", [
    "COPY (SELECT * FROM problems) TO '{folder}/part-copy.parquet'",
    "ATTACH '{run_dir}/catalog.duckdb' AS c",
    "SELECT 1; COPY (SELECT 1) TO '{folder}/x.csv'",
    "CREATE OR REPLACE VIEW problems AS SELECT 1",
    "SET enable_external_access = true",
    "EXPLAIN ANALYZE COPY (SELECT 42) TO '{folder}/x.csv'",  # ANALYZE runs what it explains
    "EXPLAIN (ANALYZE, FORMAT json) COPY (SELECT 42) TO '{folder}/x.csv'",
    "COPY (SELECT 42) TO '{part}' (FORMAT parquet, USE_TMP_FILE false)",  # over a part the views read
    "INSTALL httpfs",
    "LOAD '{run_dir}/x.duckdb_extension'",
    "SELECT content FROM read_text('/etc/passwd')",  # a query, but of a file outside the run
    "SELECT * FROM glob('/root/**')",
    "SELECT * FROM read_csv('{home}/README.md')",
    "SELECT * FROM read_parquet('{other}')",  # another run's part
    "SELECT * FROM read_blob('{manifest}')",  # this run's, but not a part of its tables
    "SELECT * FROM read_blob('{run_dir}/**/*.json')",  # the manifests again, by a glob
])
def test_evoforge_sql_only_reads_the_runs_tables_unless_asked(runs_root, capsys, statement):
    """What `evoforge sql` refuses, each in one line: writes of any kind, and reads of anything but the parts
    its views read (DuckDB's own lock: allowed paths, no external access, locked configuration)."""
    from evoforge.data import home
    from evoforge.data.lake import lake
    from evoforge.app.cli import main

    store = lake()
    publish_one_problem(store, "r")
    run_dir = store.run_dir("r")
    (part,) = [p for p in (run_dir / "round=0" / "ingest" / "problems").iterdir() if p.suffix == ".parquet"]
    manifest = next(p for p in run_dir.rglob("*.json") if "manifest" in str(p))
    other = store.ensure_run("other") / "part.parquet"
    pa.parquet.write_table(pa.table({"secret": [1]}), other)
    folder = run_dir / "round=0" / "scratch"
    folder.mkdir(parents=True)
    before = part.read_bytes()
    sql = statement.format(folder=folder, run_dir=run_dir, part=part, home=home.home(), manifest=manifest, other=other)
    assert main(["sql", sql, "--run", "r"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "evoforge sql" in err and "--allow-writes" in err, err
    assert list(folder.iterdir()) == [] and part.read_bytes() == before
    assert main(["sql", "SELECT count(*) AS n FROM problems", "--run", "r", "--csv"]) == 0
    assert capsys.readouterr().out.splitlines() == ["n", "1"]
    if statement.startswith("COPY (SELECT * FROM problems)"):  # opted in, it runs
        assert main(["sql", sql, "--run", "r", "--allow-writes"]) == 0 and list(folder.iterdir())


def test_a_query_larger_than_its_sessions_memory_spills_to_a_folder_of_its_own_and_reads_no_other(runs_root, monkeypatch):
    """A read-only session (`evoforge sql`) answers a query whose hash table outgrows its memory limit by
    spilling to a folder only it may open, gone when it closes; another session's spill stays out of reach."""
    import duckdb

    from evoforge.data import catalog, home
    from evoforge.data.lake import lake

    monkeypatch.setattr(catalog, "QUERY_MEMORY_LIMIT", "80MB")  # the query's hash table alone is ~2x that
    publish_one_problem(lake(), "r")
    other = home.home() / ".tmp" / "duckdb" / "session-another"
    other.mkdir(parents=True, exist_ok=True)
    (other / "rows.csv").write_text("secret\n1\n")
    con = catalog.connect(lake().run_dir("r"), read_only=True)
    spill = con.execute("SELECT current_setting('temp_directory')").fetchone()[0]
    assert spill.startswith(str(home.home() / ".tmp" / "duckdb")) and not os.path.exists(spill)
    groups = con.execute("SELECT count(*), sum(n), max(first) FROM (SELECT 'key-' || (i % 3000000)::VARCHAR AS k, "
                         "count(*) AS n, min(i) AS first FROM range(6000000) t(i) GROUP BY k)").fetchone()
    assert groups == (3_000_000, 6_000_000, 2_999_999)
    assert con.execute("SELECT count(*) FROM problems").fetchone() == (1,)
    with pytest.raises(duckdb.PermissionException):
        con.execute(f"SELECT * FROM read_csv('{other / 'rows.csv'}')")
    con.close()
    assert not os.path.exists(spill)
    (other / "rows.csv").unlink()
    other.rmdir()


def test_a_second_thread_of_the_same_process_is_refused_the_run_lock(scratch):
    import threading

    from evoforge.data.runlock import RunBusy, run_lock

    holding, release, refused = threading.Event(), threading.Event(), []

    def hold():
        with run_lock(scratch / "r", "round 0 / generate"):
            with run_lock(scratch / "r", "round 0 / generate"):  # re-entrant for its own thread
                holding.set()
                release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    assert holding.wait(10)
    try:
        with run_lock(scratch / "r", "round 0 / verify"):
            pass
    except RunBusy as err:
        refused.append(str(err))
    release.set()
    holder.join(10)
    assert refused and "another thread of this process" in refused[0]
    with run_lock(scratch / "r", "round 0 / verify"):  # released: free again
        pass


def test_a_file_system_without_locks_is_one_clear_line(scratch, monkeypatch):
    import errno
    import fcntl

    from evoforge.data.runlock import LockUnavailable, run_lock

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(LockUnavailable, match="does not support locks \\(ENOLCK, e.g. NFS mounted nolock\\)"):
        with run_lock(scratch / "r", "round 0 / generate"):
            pass


def test_a_stage_of_a_run_that_does_not_exist_is_one_line_and_creates_nothing(runs_root, capsys):
    from evoforge.data.lake import lake
    from evoforge.app.cli import main

    lake().ensure_run("alpha")
    assert main(["stage", "verify", "--run", "nosuchrun"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "run 'nosuchrun' does not exist" in err and "runs there: alpha" in err
    assert not (runs_root / "nosuchrun").exists()


@pytest.mark.parametrize("gold, response, verdict", [
    ("2e3", "so \\boxed{2000}", "correct"),
    ("2000", "so \\boxed{2e3}", "correct"),
    ("6.02e23", "\\boxed{6.02\\times10^{23}}", "correct"),
    ("6.02\\times 10^{23}", "\\boxed{6.02e23}", "correct"),
    ("-3E-2", "\\boxed{-0.03}", "correct"),
    ("2e3", "\\boxed{2001}", "wrong"),
    ("2e", "\\boxed{2e}", "correct"),  # a product with Euler's e, not E notation: left as it is
])
def test_scientific_notation_is_graded_as_the_number_it_is(gold, response, verdict):
    from evoforge.tasks.grading.answers import grade

    assert grade(gold, response)[0] == verdict


def _health_server(port: int):
    """A stand-in for someone else's Prefect server: answers /api/health and nothing else."""
    import http.server
    import threading

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/api/health" else 404)
            self.end_headers()
            self.wfile.write(b"true")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_commands_use_this_projects_server_or_the_users_url_never_whatever_answers(scratch, monkeypatch):
    import socket

    from evoforge.app import cli
    from evoforge.app.prefect_server import api_url, project_server_url

    monkeypatch.setenv("PREFECT_HOME", str(scratch / "prefect"))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 4200)) == 0:
            pytest.skip("a server already listens on 4200 here")
    foreign = _health_server(4200)  # another project's server on the default port
    try:
        cli._use_running_server()
        assert "PREFECT_API_URL" not in os.environ and project_server_url() is None
        # the server this project's `evoforge ui` recorded is used
        (scratch / "prefect").mkdir()
        (scratch / "prefect" / "server.json").write_text('{"url": "%s", "pid": 1}' % api_url(port=4200))
        cli._use_running_server()
        assert os.environ["PREFECT_API_URL"] == api_url(port=4200)
    finally:
        foreign.shutdown()
        foreign.server_close()  # free port 4200 at once
        # set by _use_running_server itself, not by monkeypatch: undone here, or it would outlive the test
        os.environ.pop("PREFECT_API_URL", None)
    assert project_server_url() is None  # recorded, but gone: not used


def test_leftovers_of_dead_writers_are_swept_when_a_stage_starts(runs_root):
    """Temporary files a killed writer left (no writer of the run lives but the lock holder) go at the
    next stage start; the published data stays."""
    import pyarrow as pa

    from evoforge.data import schemas
    from evoforge.data.lake import lake
    from evoforge.flows.stage_runner import run_guard

    store = lake()
    store.publish_stage("r", 0, "ingest", {"problems": pa.Table.from_pylist(
        [dict(problem_id="p", question="q", answer="1", origin="seed")], schema=schemas.PROBLEMS)})
    folder = store.stage_dir("r", 0, "ingest") / "problems"
    debris = [folder / f".part-00000.parquet.tmp-{'a' * 32}", store.run_dir("r") / f".config.yaml.tmp-{'b' * 32}",
              folder / f"part-{'d' * 32}.parquet",  # a part whose commit never came
              store.run_dir("r") / "round=0" / f".generate.tmp-{'c' * 32}"]
    for path in debris[:3]:
        path.write_bytes(b"half a file")
    (debris[3] / "rollouts").mkdir(parents=True)  # a whole stage output that was never committed
    users = folder / "part-backup.parquet"
    users.write_bytes(b"the user's own file")
    with run_guard("r", "round 0 / generate"):
        assert not any(path.exists() for path in debris)
    assert store.read("r", "problems")["problem_id"].to_pylist() == ["p"] and users.exists()
