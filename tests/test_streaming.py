"""Stages stream: bounded parts under one manifest, reads part by part, verify / filter / pairs over
streams giving exactly what the whole-table code gave, and stage_runs compaction."""
from __future__ import annotations

import bisect
import random
import re
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from evoforge.data import lake as lake_module
from evoforge.data import schemas
from evoforge.data.chunks import Chunks
from evoforge.data.ids import normalize_question, stable_hash
from evoforge.data.lake import DamagedPart, Lake, drop_duplicate_rows, sql_batches
from evoforge.data.manifest import read_manifest
from evoforge.tasks import verify as verify_module
from evoforge.tasks import filter as filter_module
from evoforge.tasks.filter import FilterConfig, bucket, filter_problems, pass_at_k, problem_stats_batches
from evoforge.tasks.pairs import REJECTABLE, PairsConfig, build_pairs, sft_selection, solution_pairs
from evoforge.tasks.verify import VerifyConfig, verify, verify_batches
from tests.verify_reference import python_verdicts


def rollouts(n_problems: int, per_problem: int = 8, seed: int = 0) -> pa.Table:
    """Rollouts as generate writes them: a problem's samples together, problems in no sorted order,
    answers that repeat within a problem (so dedup shares gradings) and differ across problems."""
    rng = random.Random(seed)
    rows = []
    for p in rng.sample(range(n_problems), n_problems):
        pid = stable_hash("problem", p)
        for i in range(per_problem):
            answer = rng.choice([str(p % 7), str(p % 7), str(p % 5 + 1), "x"])
            text = f"Step {i}: " + "we add the numbers. " * rng.randint(1, 4) + (
                f"So \\boxed{{{answer}}}" if answer != "x" else "no idea")
            rows.append(dict(rollout_id=stable_hash("rollout", pid, i), problem_id=pid, model_id="m", seed=p,
                             sample_index=i, text=text, completion_tokens=rng.randint(5, 60), finish_reason="stop",
                             mean_logprob=round(-rng.random(), 3)))
    return pa.Table.from_pylist(rows, schema=schemas.ROLLOUTS)


def golds(table: pa.Table) -> pa.Table:
    ids = sorted(set(table["problem_id"].to_pylist()))
    return pa.table({"problem_id": ids, "answer": [str(int(pid, 16) % 7) for pid in ids]})


def in_batches(table: pa.Table, size: int):
    yield from table.to_batches(max_chunksize=size)


@pytest.fixture()
def small_parts(monkeypatch):
    """Part bounds low enough that a test table spans several parts."""
    monkeypatch.setattr(lake_module, "PART_MAX_ROWS", 1000)
    monkeypatch.setattr(lake_module, "ROW_GROUP_ROWS", 256)
    monkeypatch.setattr(lake_module, "READ_BATCH_ROWS", 100)


class FakePool:
    """A deterministic grader (no processes): what verify does around the grader is what is tested."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def run(self, items, on_progress=None):
        out = []
        for _, gold, text in items:
            boxed = text.rsplit("\\boxed{", 1)[1].rstrip("}") if "\\boxed{" in text else None
            verdict = "no_answer" if boxed is None else "correct" if boxed == gold else "wrong"
            out.append((verdict, boxed, None, len(text) / 1000))
        return out


# -- bounded parts ---------------------------------------------------------------------------------
@pytest.mark.unit
def test_a_table_past_the_part_bounds_spans_several_parts_of_one_manifest_and_reads_back_equal(scratch, small_parts,
                                                                                                 monkeypatch):
    lake = Lake(scratch)
    table = rollouts(450)  # 3,600 rows
    lake.publish_stage("r", 0, "generate", {"rollouts": in_batches(table, 70)})
    manifest = read_manifest(lake.stage_dir("r", 0, "generate"))
    assert sorted(p.rows for p in manifest.parts) == [600, 1000, 1000, 1000]  # every part listed by the one manifest
    assert len(list((lake.stage_dir("r", 0, "generate") / "rollouts").glob("part-*.parquet"))) == 4
    assert lake.read("r", "rollouts", 0, "generate").drop_columns(["round", "stage"]).sort_by("rollout_id").equals(
        table.sort_by("rollout_id"))
    batches = list(lake.read_batches("r", "rollouts", 0, "generate", columns=["rollout_id", "round"]))
    assert all(b.schema.names == ["rollout_id", "round"] and b.num_rows <= 100 for b in batches)
    assert sum(b.num_rows for b in batches) == 3600 and lake.table_rows("r", 0, "generate") == {"rollouts": 3600}

    # the byte bound closes a part too, and a table given whole is split the same way
    monkeypatch.setattr(lake_module, "PART_MAX_BYTES", 12_000)
    lake.publish_stage("r", 0, "generate", {"rollouts": table})
    parts = read_manifest(lake.stage_dir("r", 0, "generate")).parts
    assert len(parts) > 4 and sum(p.rows for p in parts) == 3600 and all(p.rows <= 1000 for p in parts)
    assert lake.read("r", "rollouts").num_rows == 3600
    assert len(lake.inspect("r").files["rollouts"]) - 1 == len(parts)  # the committed parts, besides the schema file


@pytest.mark.unit
@pytest.mark.parametrize("whole", [True, False], ids=["read-whole", "checksummed-as-a-stream"])
def test_every_part_is_checked_against_its_manifest_before_its_rows_are_yielded(scratch, small_parts, monkeypatch, whole):
    if not whole:  # a part above WHOLE_PART_BYTES is checksummed as a stream, then read by row groups
        monkeypatch.setattr(lake_module, "WHOLE_PART_BYTES", 0)
    lake = Lake(scratch)
    table = rollouts(300)
    lake.publish_stage("r", 0, "generate", {"rollouts": in_batches(table, 100)})
    assert lake.read("r", "rollouts").num_rows == 2400
    part = sorted(read_manifest(lake.stage_dir("r", 0, "generate")).parts, key=lambda p: p.file)[1]
    path = lake.stage_dir("r", 0, "generate") / part.file
    data = path.read_bytes()
    path.write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])
    with pytest.raises(DamagedPart, match="checksum differs"):
        for _ in lake.read_batches("r", "rollouts"):
            pass
    # streamed into DuckDB, the damage is raised as itself, not as DuckDB's text
    with pytest.raises(DamagedPart, match="checksum differs"):
        list(sql_batches("SELECT count(*) FROM rollouts", rollouts=lake.reader("r", "rollouts", columns=["rollout_id"])))


@pytest.mark.unit
def test_a_stage_killed_mid_write_leaves_the_old_output_and_its_parts_are_swept(scratch):
    """SIGKILL a writer after it closed one bounded part and while it writes the next: no manifest
    names either, readers see the old output, and the sweep removes both."""
    lake = Lake(scratch)
    old = rollouts(10)
    lake.publish_stage("r", 0, "generate", {"rollouts": old})
    before = read_manifest(lake.stage_dir("r", 0, "generate"))
    script = f"""
import time
from pathlib import Path
import pyarrow as pa
from evoforge.data import lake as lake_module, schemas
lake_module.PART_MAX_ROWS, lake_module.ROW_GROUP_ROWS = 500, 100
def produced():
    for i in range(10_000):
        rows = [dict(rollout_id=f"{{i}}-{{j}}", problem_id="p", model_id="m", seed=i, sample_index=j, text="x" * 100,
                     completion_tokens=1, finish_reason="stop", mean_logprob=0.0) for j in range(50)]
        if i == 15:
            print("one part closed", flush=True)
        yield pa.Table.from_pylist(rows, schema=schemas.ROLLOUTS)
        time.sleep(0.02)
lake_module.Lake(Path({str(scratch)!r})).publish_stage("r", 0, "generate", {{"rollouts": produced()}})
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "one part closed"
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    folder = lake.stage_dir("r", 0, "generate") / "rollouts"
    assert read_manifest(lake.stage_dir("r", 0, "generate")) == before
    assert len(list(folder.glob("part-*.parquet"))) >= 3  # the committed part, a closed one, a half-written one
    assert lake.read("r", "rollouts").drop_columns(["round", "stage"]).equals(old)
    leftovers = lake.inspect("r").leftovers
    assert len(leftovers) >= 2 and lake.sweep("r") == len(leftovers)
    assert [folder / p.file.split("/")[1] for p in before.parts] == list(folder.iterdir())


@pytest.mark.unit
def test_a_producer_that_fails_mid_stream_leaves_the_old_output_and_no_new_part(scratch, small_parts):
    lake = Lake(scratch)
    lake.publish_stage("r", 0, "generate", {"rollouts": rollouts(5)})

    def failing():
        yield from in_batches(rollouts(200), 100)  # 1,600 rows: one part closed, one open
        raise RuntimeError("grader died")

    with pytest.raises(RuntimeError, match="grader died"):
        lake.publish_stage("r", 0, "generate", {"rollouts": failing()})
    assert lake.read("r", "rollouts").num_rows == 40 and lake.inspect("r").leftovers == []


# -- verify ----------------------------------------------------------------------------------------
def today_verify(table: pa.Table, problems: pa.Table, pool) -> pa.Table:
    """The verify stage before it streamed: the whole table sorted in Python, cut every CHUNK_ROLLOUTS rows, each
    chunk graded row by row in Python (`python_verdicts`)."""
    gold_of = dict(zip(problems["problem_id"].to_pylist(), problems["answer"].to_pylist()))
    rows = table.select(["rollout_id", "problem_id", "text"]).to_pylist()
    rows.sort(key=lambda r: (r["problem_id"], r["rollout_id"]))
    rows = [{**row, "gold": gold_of[row["problem_id"]]} for row in rows]
    size = verify_module.CHUNK_ROLLOUTS
    return pa.concat_tables([python_verdicts(rows[i:i + size], pool) for i in range(0, len(rows), size)])


@pytest.mark.unit
def test_verify_streamed_over_several_parts_gives_the_verdicts_and_chunks_of_the_whole_table(scratch, small_parts,
                                                                                            monkeypatch):
    monkeypatch.setattr(verify_module, "CHUNK_ROLLOUTS", 64)
    monkeypatch.setattr(verify_module, "STORE_CHUNKS_FROM_SECONDS", 0.0)  # every chunk stored, as slow gradings are
    monkeypatch.setattr(lake_module, "KEY_RANGE_ROWS", 500)  # sorted range by range, spilled: 7 ranges
    monkeypatch.setattr(VerifyConfig, "pool", lambda self: FakePool())
    lake = Lake(scratch)
    table = rollouts(400)  # 3,200 rollouts as generate writes them: 4 parts, 50 chunks
    problems = golds(table)
    lake.publish_stage("r", 0, "generate", {"rollouts": in_batches(table, 77)})
    assert len(read_manifest(lake.stage_dir("r", 0, "generate")).parts) == 4
    chunks = Chunks(scratch / "chunks")
    columns = ["rollout_id", "problem_id", "text"]
    streamed = pa.concat_tables(verify_batches(lake.reader("r", "rollouts", 0, "generate", columns=columns), problems,
                                               VerifyConfig(), chunks, total=table.num_rows))
    assert chunks.counts() == (0, 50)
    expected = today_verify(table, problems, FakePool())
    assert streamed.equals(expected)  # every column, row order included: bit-identical
    assert len(set(streamed["graded_with"].to_pylist())) < streamed.num_rows  # dedup did share gradings
    # the whole-table path cuts the same chunks (same keys): a rerun reuses every one
    again = Chunks(scratch / "chunks")
    assert verify(table, problems, VerifyConfig(), again).equals(expected) and again.counts() == (50, 0)
    # any order of the input grades the same
    shuffled = table.take(random.Random(3).sample(range(table.num_rows), table.num_rows)).select(columns)
    assert pa.concat_tables(verify_batches(pa.RecordBatchReader.from_batches(shuffled.schema, shuffled.to_batches(100)),
                                           problems, VerifyConfig(), total=table.num_rows)).equals(expected)
    assert not list((lake_module.home.home() / ".tmp" / "spill").glob("*"))  # the spilled ranges are gone


@pytest.mark.unit
def test_verify_streamed_with_math_verify_grades_like_the_whole_table(scratch, small_parts, monkeypatch):
    monkeypatch.setattr(verify_module, "CHUNK_ROLLOUTS", 16)
    lake = Lake(scratch)
    table = rollouts(6, per_problem=8)
    problems = golds(table)
    lake.publish_stage("r", 0, "generate", {"rollouts": in_batches(table, 5)})
    config = VerifyConfig(workers=1, deadline_seconds=30)
    streamed = pa.concat_tables(verify_batches(lake.reader("r", "rollouts", columns=["rollout_id", "problem_id", "text"]),
                                               problems, config))
    whole = verify(table, problems, config)
    assert streamed.drop_columns(["seconds"]).equals(whole.drop_columns(["seconds"]))
    with config.pool() as pool:
        assert streamed.drop_columns(["seconds"]).equals(today_verify(table, problems, pool).drop_columns(["seconds"]))
    assert set(streamed["verdict"].to_pylist()) >= {"correct", "wrong", "no_answer"}


# -- filter and pairs against the Python they replaced --------------------------------------------
def reference_filter(verdicts: pa.Table, rollouts: pa.Table, config: FilterConfig) -> list[dict]:
    """Per problem in Python; the collapse signals are None where the input lacks their column."""
    tokens_of = dict(zip(rollouts["rollout_id"].to_pylist(), rollouts["completion_tokens"].to_pylist()))
    logprob_of = (dict(zip(rollouts["rollout_id"].to_pylist(), rollouts["mean_logprob"].to_pylist()))
                  if "mean_logprob" in rollouts.column_names else None)
    answers = (verdicts["extracted_answer"].to_pylist() if "extracted_answer" in verdicts.column_names
               else [None] * verdicts.num_rows)
    per_problem: dict[str, list] = {}
    for rollout, problem, verdict, answer in zip(verdicts["rollout_id"].to_pylist(), verdicts["problem_id"].to_pylist(),
                                                 verdicts["verdict"].to_pylist(), answers):
        if verdict == "no_reference":
            continue
        counts = per_problem.setdefault(problem, [0, 0, 0, set(), []])
        counts[0] += 1
        counts[1] += verdict == "correct"
        counts[2] += tokens_of.get(rollout, 0)
        if answer is not None:
            counts[3].add(answer)
        if logprob_of is not None and logprob_of.get(rollout) is not None:
            counts[4].append(logprob_of[rollout])
    return [dict(problem_id=p, n=n, correct=c, accuracy=c / n,
                 pass_at_k=[(k, v) for k in config.pass_k if (v := pass_at_k(n, c, k)) is not None],
                 mean_tokens=t / n, bucket=bucket(c / n, config.underperforming),
                 distinct_answers=len(distinct) if "extracted_answer" in verdicts.column_names else None,
                 mean_logprob=sum(logprobs) / len(logprobs) if logprobs else None)
            for p, (n, c, t, distinct, logprobs) in sorted(per_problem.items())]


def reference_pairs(problems, stats, rollouts, verdicts, config, variant_problem_ids=frozenset()) -> dict[str, list]:
    question = dict(zip(problems["problem_id"].to_pylist(), problems["question"].to_pylist()))
    origin = dict(zip(problems["problem_id"].to_pylist(), problems["origin"].to_pylist()))
    bucket_of = dict(zip(stats["problem_id"].to_pylist(), stats["bucket"].to_pylist()))
    bucket_of.update({pid: "variant" for pid in variant_problem_ids})
    verdict_of = dict(zip(verdicts["rollout_id"].to_pylist(), verdicts["verdict"].to_pylist()))
    by_problem: dict[str, list[dict]] = {}
    for row in rollouts.select(["rollout_id", "problem_id", "text", "completion_tokens", "mean_logprob"]).to_pylist():
        row["verdict"] = verdict_of.get(row["rollout_id"])
        by_problem.setdefault(row["problem_id"], []).append(row)
    pairs, sft = [], []
    for pid, rows in sorted(by_problem.items()):
        if pid not in question:
            continue
        correct = sorted((r for r in rows if r["verdict"] == "correct"), key=lambda r: (r["completion_tokens"], r["rollout_id"]))
        wrong = sorted((r for r in rows if r["verdict"] in REJECTABLE),
                       key=lambda r: (r["verdict"] != "wrong", -r["mean_logprob"], r["rollout_id"]))
        for i in range(min(config.pairs_per_problem, len(wrong)) if correct else 0):
            chosen, rejected = correct[i % len(correct)], wrong[i]
            pairs.append(dict(
                pair_id=stable_hash("pair", chosen["rollout_id"], rejected["rollout_id"]), kind="solution",
                problem_id=pid, prompt=question[pid], prefix=None, chosen=chosen["text"], rejected=rejected["text"],
                chosen_rollout_id=chosen["rollout_id"], rejected_rollout_id=rejected["rollout_id"],
                chosen_score=-float(chosen["completion_tokens"]), rejected_score=rejected["mean_logprob"]))
        if bucket_of.get(pid) in (*config.sft_buckets, "variant"):
            seen: set[str] = set()
            for r in correct:
                key = normalize_question(r["text"])
                if key in seen or len(seen) >= config.sft_per_problem:
                    continue
                seen.add(key)
                sft.append(dict(example_id=stable_hash("sft", pid, key), problem_id=pid, rollout_id=r["rollout_id"],
                                prompt=question[pid], completion=r["text"], bucket=bucket_of[pid],
                                origin=origin.get(pid, "seed")))
    return {"pairs": pairs, "sft_examples": sft}


def random_graded_round(seed: int = 1):
    """A graded round with ties in tokens and log-probs, repeated texts (ASCII and not), every verdict, a
    problem outside the pool and rollouts without a verdict."""
    rng = random.Random(seed)
    table = rollouts(120, per_problem=8, seed=seed)
    table = table.set_column(table.schema.get_field_index("completion_tokens"), "completion_tokens",
                             pa.array([rng.choice([10, 10, 20, 30]) for _ in range(table.num_rows)], pa.int32()))
    table = table.set_column(table.schema.get_field_index("mean_logprob"), "mean_logprob",
                             pa.array([rng.choice([-0.5, -0.5, -0.1, -1.25]) for _ in range(table.num_rows)], pa.float64()))
    # a third of the texts from a few that are one under normalize_question or only look so: case, Python's
    # whitespace (\x0b, \x1c), a full-width letter NFKC makes ASCII, accents it does not
    texts = table["text"].to_pylist()
    for i in range(0, len(texts), 3):
        texts[i] = rng.choice(["So \\boxed{1}", "so  \\BOXED{1}", "SO\t\\boxed{1} ", "\uff33o \\boxed{1}",
                               "so\x0b\x1c\\boxed{1}\n", "Café \\boxed{1}", "CAFÉ  \\boxed{1}", "cafe \\boxed{1}"])
    table = table.set_column(table.schema.get_field_index("text"), "text", pa.array(texts, pa.string()))
    verdict_names = ["correct", "correct", "wrong", "no_answer", "timeout", "bad_gold", "no_reference"]
    graded = [i for i in range(table.num_rows) if i % 17]  # every 17th rollout has no verdict
    verdicts = pa.table({"rollout_id": table["rollout_id"].take(graded),
                         "problem_id": table["problem_id"].take(graded),
                         "verdict": [rng.choice(verdict_names) for _ in graded],
                         "extracted_answer": [rng.choice(["1", "2", "2", "\\frac{1}{2}", None]) for _ in graded]})
    ids = sorted(set(table["problem_id"].to_pylist()))
    problems = pa.table({"problem_id": ids[1:], "question": [f"question {p}" for p in ids[1:]],
                         "origin": ["seed"] * (len(ids) - 1)})
    stats = pa.table({"problem_id": ids, "bucket": [rng.choice(["underperforming", "learnable", "solved", "unsolved"])
                                                    for _ in ids]})
    return problems, stats, table, verdicts


@pytest.mark.unit
def test_filter_over_streams_equals_the_python_reference(scratch, small_parts, graded_round, monkeypatch):
    monkeypatch.setattr(lake_module, "PART_MAX_ROWS", 300)
    config = FilterConfig()
    problems, stats, table, verdicts = random_graded_round()
    expected = reference_filter(verdicts, table, config)
    assert filter_problems(verdicts, table, config).to_pylist() == expected
    assert {row["distinct_answers"] for row in expected} >= {1, 2, 3}  # repeated answers and NULLs among them
    lake = Lake(scratch)
    lake.publish_stage("r", 0, "generate", {"rollouts": in_batches(table, 50)})
    full = pa.Table.from_pylist([dict(rollout_id=r, problem_id=p, verdict=v, extracted_answer=a) for r, p, v, a in zip(
        *(verdicts[c].to_pylist() for c in ("rollout_id", "problem_id", "verdict", "extracted_answer")))],
        schema=schemas.VERDICTS)
    lake.publish_stage("r", 0, "verify", {"verdicts": in_batches(full, 50)})
    assert len(read_manifest(lake.stage_dir("r", 0, "verify")).parts) == 4  # 903 rows, 300 a part
    monkeypatch.setattr(lake_module, "KEY_RANGE_ROWS", 100)  # counted range of problems by range, spilled:
    monkeypatch.setattr(filter_module, "NARROW_RANGE_FACTOR", 1)  # 10 ranges
    streamed = pa.concat_tables(problem_stats_batches(
        lake.reader("r", "verdicts", 0, "verify", columns=["rollout_id", "problem_id", "verdict", "extracted_answer"]),
        lake.reader("r", "rollouts", 0, "generate", columns=["rollout_id", "problem_id", "completion_tokens",
                                                              "mean_logprob"]), config,
        problems["problem_id"].to_pylist(), total=full.num_rows))
    assert streamed.to_pylist() == expected
    # the small graded round of the pairs tests, too
    _, _, small_rollouts, small_verdicts = graded_round
    small_verdicts = small_verdicts.append_column("problem_id", small_rollouts["problem_id"])
    assert filter_problems(small_verdicts, small_rollouts, config).to_pylist() == reference_filter(
        small_verdicts, small_rollouts, config)


@pytest.mark.unit
@pytest.mark.parametrize("per_problem", [(1, 1), (2, 2), (3, 5), (0, 0)])
def test_pairs_over_streams_equal_the_python_reference(scratch, small_parts, graded_round, per_problem, monkeypatch):
    config = PairsConfig(pairs_per_problem=per_problem[0], sft_per_problem=per_problem[1])
    for problems, stats, table, verdicts in (graded_round, random_graded_round()):
        variants = frozenset(stats["problem_id"].to_pylist()[:3])
        expected = reference_pairs(problems, stats, table, verdicts, config, variants)
        out = build_pairs(problems, stats, table, verdicts, config, variants)
        assert out["pairs"].to_pylist() == expected["pairs"]
        assert out["sft_examples"].to_pylist() == expected["sft_examples"]
    lake = Lake(scratch)  # from the lake, part by part, in ranges of problems spilled to disk
    monkeypatch.setattr(lake_module, "KEY_RANGE_ROWS", 200)
    lake.publish_stage("r", 0, "generate", {"rollouts": in_batches(table, 64)})
    columns = ["rollout_id", "problem_id", "text", "completion_tokens", "mean_logprob"]
    stream = lambda: lake.reader("r", "rollouts", 0, "generate", columns=columns)  # noqa: E731
    given = lambda: verdicts.to_batches(50)  # noqa: E731
    pairs = pa.concat_tables([schemas.PAIRS.empty_table(),
                              *solution_pairs(problems, stream(), given(), config, total=table.num_rows)])
    sft = pa.concat_tables([schemas.SFT_EXAMPLES.empty_table(),
                            *sft_selection(problems, stats, stream(), given(), config, variants, total=table.num_rows)])
    assert pairs.to_pylist() == expected["pairs"] and sft.to_pylist() == expected["sft_examples"]


def test_a_stage_reads_each_input_once_and_a_rerun_on_the_same_parts_reads_none(lake_on, small_parts, monkeypatch):
    """filter and pairs over a round spread across parts: each reads each part of its streamed inputs once
    (the input fingerprint is hashed in that pass; pairs writes both its tables from it, and streams the
    pool's problems too), with the outputs
    of the whole-table code; a rerun on the same parts reads none; an input rewritten with the same rows
    is read once to find it unchanged."""
    import prefect.artifacts

    from evoforge.data.lake import lake
    from evoforge.flows.config import RoundConfig
    from evoforge.flows.filter import filter_flow
    from evoforge.flows.pairs import pairs_flow

    for name in ("create_table_artifact", "create_markdown_artifact"):  # no Prefect API in a unit test
        monkeypatch.setattr(prefect.artifacts, name, lambda **kw: None)
    monkeypatch.setattr(lake_module, "PART_MAX_ROWS", 300)  # 960 rollouts: 4 parts
    monkeypatch.setattr(lake_module, "KEY_RANGE_ROWS", 200)  # ranges of problems, spilled
    reads = {}
    part_batches = Lake._part_batches

    def counted(store, run, round, stage, folder, part, schema):
        reads[(stage, part.table)] = reads.get((stage, part.table), 0) + 1
        return part_batches(store, run, round, stage, folder, part, schema)

    monkeypatch.setattr(Lake, "_part_batches", counted)
    problems, _, table, verdicts = random_graded_round()
    full_verdicts = schemas.conform(verdicts, schemas.VERDICTS, where="verdicts", missing_as_null=True)
    store = lake()
    store.publish_stage("r", 0, "ingest", {"problems": schemas.conform(problems, schemas.PROBLEMS, where="problems",
                                                                       missing_as_null=True)}, key="source")
    store.publish_stage("r", 0, "generate", {"rollouts": in_batches(table, 64)})
    store.publish_stage("r", 0, "verify", {"verdicts": in_batches(full_verdicts, 50)})
    parts = {(stage, name): len([p for p in store.manifest("r", 0, stage).parts if p.table == name])
             for stage, name in (("generate", "rollouts"), ("verify", "verdicts"))}
    assert min(parts.values()) > 1
    with_pool = {**parts, ("ingest", "problems"): len(store.manifest("r", 0, "ingest").parts)}

    def stage(flow, expected: str, keys: dict = parts) -> dict:
        reads.clear()
        assert flow.fn("r", 0, RoundConfig()).status == expected
        return {key: reads.get(key, 0) for key in keys}

    assert stage(filter_flow, "completed") == parts and stage(pairs_flow, "completed", with_pool) == with_pool
    stats = store.read("r", "problem_stats", 0, "filter").select(["problem_id", "bucket"])
    expected = build_pairs(problems, stats, table, verdicts, RoundConfig().pairs)
    for name in ("pairs", "sft_examples"):
        written = store.read("r", name, 0, "pairs").drop_columns(["round", "stage"])
        assert written.sort_by([(written.column_names[0], "ascending")]).equals(
            expected[name].sort_by([(written.column_names[0], "ascending")])), name
    assert stage(filter_flow, "skipped") == {key: 0 for key in parts}
    assert stage(pairs_flow, "skipped", with_pool) == {key: 0 for key in with_pool}

    store.publish_stage("r", 0, "verify", {"verdicts": in_batches(full_verdicts, 70)})  # the same rows, other parts
    assert stage(filter_flow, "skipped") == {key: 1 * parts[key] if key[0] == "generate" else
                                             len(store.manifest("r", 0, "verify").parts) for key in parts}
    events = [e for e in store.read("r", "stage_runs").to_pylist() if e["stage"] == "filter" and e["status"] != "running"]
    assert len({e["input_fingerprint"] for e in events}) == 1 and len({e["input_parts"] for e in events}) == 2


def test_the_pairs_stage_gives_step_pairs_the_question_of_their_problem_from_the_streamed_pool(lake_on, small_parts,
                                                                                              monkeypatch):
    """The pool's questions are never held by the pairs stage: the searched problems' ones are taken as the
    pool streams by, in ranges spilled to disk, and the step pairs made after the pass carry them."""
    import prefect.artifacts

    from evoforge.data.lake import lake
    from evoforge.flows.config import RoundConfig
    from evoforge.flows.filter import filter_flow
    from evoforge.flows.pairs import pairs_flow
    from tests.test_mcts import crafted_tree

    for name in ("create_table_artifact", "create_markdown_artifact"):  # no Prefect API in a unit test
        monkeypatch.setattr(prefect.artifacts, name, lambda **kw: None)
    monkeypatch.setattr(lake_module, "KEY_RANGE_ROWS", 200)  # ranges of problems, spilled
    problems, _, table, verdicts = random_graded_round()
    store = lake()
    store.publish_stage("r", 0, "ingest", {"problems": schemas.conform(problems, schemas.PROBLEMS, where="problems",
                                                                       missing_as_null=True)}, key="source")
    store.publish_stage("r", 0, "generate", {"rollouts": in_batches(table, 64)})
    store.publish_stage("r", 0, "verify", {"verdicts": schemas.conform(verdicts, schemas.VERDICTS, where="verdicts",
                                                                       missing_as_null=True)})
    searched, question = problems["problem_id"][-1].as_py(), problems["question"][-1].as_py()
    tree = crafted_tree()
    tree = tree.set_column(tree.schema.get_field_index("problem_id"), "problem_id", pa.array([searched] * tree.num_rows))
    store.publish_stage("r", 0, "mcts", {"mcts_nodes": tree})
    assert filter_flow.fn("r", 0, RoundConfig()).status == "completed"
    assert pairs_flow.fn("r", 0, RoundConfig()).status == "completed"
    steps = [p for p in store.read("r", "pairs", 0, "pairs").to_pylist() if p["kind"] == "step"]
    assert sorted((p["chosen_rollout_id"], p["rejected_rollout_id"]) for p in steps) == [("a", "b"), ("a", "c"), ("a1", "a2")]
    assert {(p["problem_id"], p["prompt"]) for p in steps} == {(searched, question)}


# -- stage_runs compaction -------------------------------------------------------------------------
def event(i: int, status: str = "completed") -> pa.Table:
    at = datetime(2025, 1, 1, tzinfo=timezone.utc) + timedelta(seconds=i)
    return pa.Table.from_pylist([dict(stage_run_id=f"run-{i}", run="r", round=0, stage="verify", status=status,
                                      started_at=at, finished_at=at)], schema=schemas.STAGE_RUNS)


@pytest.mark.unit
def test_the_sft_key_of_an_ascii_text_is_normalize_questions_for_every_whitespace():
    """`sft_candidates` keys an ASCII text without `normalize_question` (its words split and joined by one space,
    lowered): its example ids and the repeats it finds must be `normalize_question`'s, for every whitespace
    character Python's `\\s` matches in ASCII, mixed case and runs of any length."""
    rng = random.Random(5)
    whitespace = [" ", " ", "\t", "\n", "\x0b", "\x0c", "\r", "\x1c", "\x1d", "\x1e", "\x1f"]

    def spaced_out(words: list[str]) -> str:
        gap = lambda: "".join(rng.choice(whitespace) for _ in range(rng.choice([1, 1, 1, 2, 3, 15, 16, 17, 33, 40])))  # noqa: E731
        edges = [gap() if rng.random() < 0.3 else "" for _ in range(2)]
        return edges[0] + gap().join(w.upper() if rng.random() < 0.2 else w for w in words) + edges[1]

    sentences = [["so", "x", "is", "\\boxed{1}"], ["so", "x", "is", "\\boxed{1}."]]
    rows = [dict(rollout_id=f"r{p}-{k}", problem_id=f"p{p:03d}", text=spaced_out(rng.choice(sentences)),
                 completion_tokens=rng.choice([10, 20]), mean_logprob=-0.5) for p in range(120) for k in range(3)]
    table = pa.Table.from_pylist(rows)
    verdicts = pa.table({"rollout_id": table["rollout_id"], "problem_id": table["problem_id"],
                         "verdict": ["correct"] * table.num_rows})
    ids = sorted(set(table["problem_id"].to_pylist()))
    problems = pa.table({"problem_id": ids, "question": [f"question {p}" for p in ids], "origin": ["seed"] * len(ids)})
    stats = pa.table({"problem_id": ids, "bucket": ["learnable"] * len(ids)})
    config = PairsConfig(pairs_per_problem=0, sft_per_problem=2)
    expected = reference_pairs(problems, stats, table, verdicts, config)["sft_examples"]
    assert build_pairs(problems, stats, table, verdicts, config)["sft_examples"].to_pylist() == expected
    # both ways were taken: first candidates distinct, and one a repeat of the other
    assert 120 < len(expected) < 240
    assert sum(bool(re.search(r"\s{17,}", row["text"])) for row in rows) > 50  # long runs too


@pytest.mark.unit
def test_duplicate_rows_are_dropped_only_when_every_column_is_equal():
    rows = pa.concat_tables([event(1), event(2), event(1), event(1, "failed"), event(2), event(3)])
    assert [(r["stage_run_id"], r["status"]) for r in drop_duplicate_rows(rows).to_pylist()] == [
        ("run-1", "completed"), ("run-2", "completed"), ("run-1", "failed"), ("run-3", "completed")]


@pytest.mark.unit
def test_stage_runs_compaction_keeps_every_event_exactly_once_even_when_cut_short(scratch):
    from evoforge.data import catalog
    from evoforge.data.lake import write_parquet
    from evoforge.data.manifest import new_part_name

    lake = Lake(scratch)
    for i in range(70):
        lake.append_run_table("r", "stage_runs", event(i))
    assert len(lake.run_table_files("r", "stage_runs")) == 70
    assert lake.compact_run_table("r", "stage_runs", above=100) == 0  # few enough: left alone
    # a compaction cut short after it wrote the merged file, before it removed the sources: each event twice on disk
    write_parquet(lake.read("r", "stage_runs"), lake.run_dir("r") / "stage_runs" / new_part_name())
    assert len(lake.run_table_files("r", "stage_runs")) == 71
    expected = sorted(f"run-{i}" for i in range(70))
    assert sorted(lake.read("r", "stage_runs")["stage_run_id"].to_pylist()) == expected
    for i in range(70, 75):
        lake.append_run_table("r", "stage_runs", event(i))
    assert lake.compact_run_table("r", "stage_runs") == 76
    (merged,) = lake.run_table_files("r", "stage_runs")
    assert sorted(lake.read("r", "stage_runs")["stage_run_id"].to_pylist()) == sorted(f"run-{i}" for i in range(75))
    assert catalog.connect(lake.run_dir("r")).execute("SELECT count(*) FROM stage_runs").fetchone()[0] == 75
    assert lake.inspect("r", checksum=True).damaged == [] and lake.sweep("r") == 0


@pytest.mark.unit
def test_a_stage_start_compacts_the_runs_events_under_the_lock(runs_root):
    from evoforge.data.lake import lake
    from evoforge.flows.stage_runner import run_guard

    for i in range(lake_module.RUN_TABLE_COMPACT_FILES + 1):
        lake().append_run_table("r", "stage_runs", event(i))
    with run_guard("r", "round 0 / verify") as store:
        assert len(store.run_table_files("r", "stage_runs")) == 1
    assert store.read("r", "stage_runs").num_rows == lake_module.RUN_TABLE_COMPACT_FILES + 1


# -- object storage ---------------------------------------------------------------------------------
@pytest.mark.server
def test_bounded_parts_streamed_reads_and_compaction_on_an_s3_lake(s3_runs, small_parts, monkeypatch):
    monkeypatch.setattr(lake_module, "WHOLE_PART_BYTES", 20_000)  # some parts checksummed as a stream
    lake = Lake(s3_runs)
    table = rollouts(300)
    lake.publish_stage("r", 0, "generate", {"rollouts": in_batches(table, 90)})
    assert len(read_manifest(lake.stage_dir("r", 0, "generate")).parts) == 3
    assert pa.Table.from_batches(list(lake.read_batches("r", "rollouts", columns=list(table.column_names)))).sort_by(
        "rollout_id").equals(table.sort_by("rollout_id"))
    problems = golds(table)
    monkeypatch.setattr(VerifyConfig, "pool", lambda self: FakePool())
    streamed = pa.concat_tables(verify_batches(lake.reader("r", "rollouts", columns=["rollout_id", "problem_id", "text"]),
                                               problems, VerifyConfig()))
    assert streamed.equals(today_verify(table, problems, FakePool()))
    for i in range(5):
        lake.append_run_table("r", "stage_runs", event(i))
    assert lake.compact_run_table("r", "stage_runs", above=3) == 5
    assert len(lake.run_table_files("r", "stage_runs")) == 1 and lake.read("r", "stage_runs").num_rows == 5


@pytest.mark.unit
def test_key_ranges_come_in_key_order_each_key_whole_through_one_or_two_spill_passes(monkeypatch):
    table = rollouts(300)
    ids = table["problem_id"].to_pylist()
    for fanout in (128, 3):  # 3: more ranges than one pass keeps files open for: a second pass splits them
        monkeypatch.setattr(lake_module, "SPILL_FANOUT", fanout)
        boundaries = lake_module.key_boundaries(ids, table.num_rows, range_rows=200)
        assert len(boundaries) == 11
        # a pool's Arrow column splits where its Python list does (the stages pass the column)
        assert lake_module.key_boundaries(table["problem_id"], table.num_rows, range_rows=200) == boundaries
        ranges = list(lake_module.in_key_ranges({"rows": table.to_batches(64), "same": table}, "problem_id", boundaries))
        assert len(ranges) == 12 and all(r["rows"].num_rows == r["same"].num_rows for r in ranges)
        keys = [sorted(set(r["rows"]["problem_id"].to_pylist())) for r in ranges]
        assert sum(keys, []) == sorted(set(ids))  # in key order, each key in one range only
        assert sum(r["rows"].num_rows for r in ranges) == table.num_rows
    assert not list((lake_module.home.home() / ".tmp" / "spill").glob("*"))


@pytest.mark.unit
def test_boundaries_cut_from_a_sample_of_a_long_pool_split_it_evenly_and_the_same_way_every_time():
    ids = [stable_hash("problem", i) for i in range(200_000)]
    column = pa.chunked_array([pa.array(ids[:70_000]), pa.array(ids[70_000:])])  # as a pool's parts give it
    boundaries = lake_module.key_boundaries(column, 1_600_000, range_rows=32_768)  # 49 ranges: a sample of ~12,500 ids
    assert len(boundaries) == 48 and boundaries == sorted(boundaries)
    assert lake_module.key_boundaries(column, 1_600_000, range_rows=32_768) == boundaries  # a rerun splits alike
    ordered = sorted(ids)
    exact = [ordered[len(ordered) * i // 49] for i in range(1, 49)]
    assert boundaries != exact  # cut from the sample, not the whole column
    cuts = [0] + [bisect.bisect_left(ordered, b) for b in boundaries] + [len(ordered)]
    sizes = [high - low for low, high in zip(cuts, cuts[1:])]
    assert max(sizes) < 1.3 * len(ordered) / 49 and min(sizes) > 0.7 * len(ordered) / 49


@pytest.mark.unit
def test_every_row_goes_to_the_range_bisect_gives_its_key_whatever_the_keys_bytes():
    """`range_slices` compares keys of one byte length as raw bytes (hash ids: no Python string per key) and
    others as strings: both must put each row where Python's string order does, its rows in their order."""
    rng = random.Random(3)
    ids = [stable_hash("problem", i % 700) for i in range(5_000)]
    cases = [
        (pa.array(ids), sorted({stable_hash("cut", i) for i in range(30)})),
        (pa.array(ids).slice(777, 2_000), sorted(rng.sample(ids, 12))),  # a slice; boundaries equal to keys
        (pa.array(ids, pa.large_string()), sorted(rng.sample(ids, 12))),
        (pa.array(["é" + i[:14] for i in ids[:500]] + ["z" * 16] * 3), sorted(["é5", "éa", "f"])),  # 2-byte characters, 16 bytes a key
        (pa.array(["a\x00b", "a\x00c", "abb", "a\x00a"]), ["a\x00b", "ab"]),  # NUL bytes: compared as strings
        (pa.array(["ab", "abc", "b", "a"]), ["ab", "abc"]),  # keys of several lengths
        (pa.array(ids[:50]), []),
    ]
    for keys, boundaries in cases:
        batch = pa.record_batch({"problem_id": keys, "row": pa.array(range(len(keys)))})
        got = [(index, row) for index, rows in lake_module.range_slices([batch], "problem_id", boundaries)
               for row in rows["row"].to_pylist()]
        expected = sorted(((bisect.bisect_right(boundaries, key), row) for row, key in enumerate(keys.to_pylist())),
                          key=lambda pair: pair[0])  # stable: a range's rows in their order
        assert got == expected, boundaries


@pytest.mark.unit
def test_a_stage_chunk_on_disk_is_there_whole_or_not_at_all_and_the_next_attempt_reads_it_back(scratch):
    """A resumable chunk (an Arrow IPC file, data/chunks.py) reads back equal, nulls and long texts included; a
    computing that fails leaves no file and no temporary beside it."""
    from evoforge.data import chunks as chunks_module
    from evoforge.data.atomic import leftovers

    folder = scratch / "chunks" / "0123"
    rows = rollouts(30)
    first = Chunks(folder)
    assert first.get_or_compute("k1", lambda: rows).equals(rows) and first.counts() == (0, 1)
    with pytest.raises(RuntimeError, match="grader died"):
        first.get_or_compute("k2", lambda: (_ for _ in ()).throw(RuntimeError("grader died")))
    assert sorted(p.name for p in folder.iterdir()) == ["k1.arrow"] and leftovers(folder) == []
    again = Chunks(folder)
    assert again.get_or_compute("k1", lambda: pytest.fail("computed again")).equals(rows) and again.counts() == (1, 0)
    assert chunks_module.read_chunk(folder / "k1.arrow").equals(rows)


@pytest.mark.unit
def test_a_chunk_computed_faster_than_storing_it_is_worth_is_returned_and_counted_but_not_stored(scratch):
    """`store_from_seconds`: verify's chunks decided on their columns take ~5 ms, less than storing them costs; a
    rerun computes them again. A slower chunk is stored as ever, and read back by the next attempt."""
    import time

    folder = scratch / "chunks" / "0123"
    rows = rollouts(3)
    first = Chunks(folder)

    def slow() -> pa.Table:
        time.sleep(0.6)
        return rows

    assert first.get_or_compute("quick", lambda: rows, store_from_seconds=0.5).equals(rows)
    assert first.get_or_compute("slow", slow, store_from_seconds=0.5).equals(rows) and first.counts() == (0, 2)
    assert sorted(p.name for p in folder.iterdir()) == ["slow.arrow"]
    again = Chunks(folder)
    assert again.get_or_compute("slow", lambda: pytest.fail("computed again"), store_from_seconds=0.5).equals(rows)
    assert again.get_or_compute("quick", lambda: rows, store_from_seconds=0.5).equals(rows)
    assert again.counts() == (1, 1)


@pytest.mark.unit
def test_a_ranges_pairs_and_sft_candidates_are_those_the_duckdb_queries_gave_nulls_and_repeats_included():
    """`made_of_range` ranks and pairs with Arrow and NumPy, without the texts (taken by row number afterwards), and
    ranks and keys the SFT candidates with Arrow and Python: its pairs and candidates (keys, walked problems,
    example ids, order) are those of the stage's earlier DuckDB queries (tests/pairs_reference.py), over a round
    with ties, repeated and non-ASCII texts, rollouts without a verdict, null token counts and null, NaN and
    infinite log-probabilities (DuckDB orders nulls last, NaN above every number)."""
    import math

    from evoforge.tasks.pairs import _graded, _RangeProblems, made_of_range, sft_candidates
    from tests.pairs_reference import old_pairs, old_sft_candidates

    rng = random.Random(4)
    problems, stats, table, verdicts = random_graded_round(seed=4)
    for column, odd in (("completion_tokens", [None]), ("mean_logprob", [None, math.nan, -math.inf])):
        values = [rng.choice(odd) if rng.random() < 0.15 else value for value in table[column].to_pylist()]
        table = table.set_column(table.schema.get_field_index(column), column, pa.array(values, table.schema.field(column).type))

    def comparable(rows: list[dict]) -> list[dict]:  # NaN equals nothing, itself included
        return [{k: "NaN" if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()} for row in rows]

    table = table.take(pa.array(rng.sample(range(table.num_rows), table.num_rows)))  # rows in no order
    ranged = {"rollouts": table.select(["rollout_id", "problem_id", "text", "completion_tokens", "mean_logprob"]),
              "verdicts": verdicts.select(["rollout_id", "problem_id", "verdict"]), "problems": problems, "stats": stats}
    for per_problem in (1, 2, 5):
        config = PairsConfig(pairs_per_problem=per_problem, sft_per_problem=per_problem)
        made = pa.concat_tables([rows for name, rows in made_of_range(config, frozenset(), ("pairs",), ranged)])
        expected = old_pairs(ranged["rollouts"], ranged["verdicts"], REJECTABLE, per_problem)
        expected = expected.filter(pc.is_in(expected["problem_id"], value_set=problems["problem_id"]))
        assert comparable(made.drop_columns(["prompt"]).select(expected.column_names).to_pylist()) == comparable(
            expected.to_pylist())
        sft_problems = _RangeProblems(problems, stats, frozenset()).sft_problems(config)
        candidates = sft_candidates(_graded(ranged["rollouts"], ranged["verdicts"]), sft_problems["problem_id"], per_problem)
        expected = old_sft_candidates(ranged["rollouts"], ranged["verdicts"], sft_problems, per_problem)
        assert candidates.select(expected.column_names).to_pylist() == expected.to_pylist()
        assert 0 < sum(candidates["python_key"].to_pylist()) < candidates.num_rows  # both ways, walked and keyed
    assert None in made["chosen_score"].to_pylist() and None in made["rejected_score"].to_pylist()  # nulls were paired
    assert pc.any(pc.is_nan(made["rejected_score"])).as_py() and -math.inf in made["rejected_score"].to_pylist()
