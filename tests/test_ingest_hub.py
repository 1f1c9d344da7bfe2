"""Ingest by hub id (`hub:ORG/NAME`) from a Hugging Face cache laid out on disk the way
huggingface_hub lays it out: `datasets--ORG--NAME/refs/main` names a commit, `snapshots/<commit>/` holds
the README (its `configs:` are the subsets, as the hub shows them) and `<subset>/<split>-00000-of-00001.parquet`,
each a link into `blobs/`. Offline, as evoforge runs by default.

datasets 5.2 itself does not read that cache for `load_dataset("org/name")` offline (it raises
"Couldn't reach 'org/name' on the Hub (OfflineModeIsEnabled)" before looking, and then tries only its own
processed cache): `open_hub_source` resolves the snapshot with huggingface_hub and loads that folder.
"""
from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from evoforge.tasks.ingest import IngestError, SourceConfig, ingest, open_hub_source
from evoforge.tasks.verify import VerifyConfig, check_golds

VERIFY = VerifyConfig(workers=1, deadline_seconds=10)
COMMIT = "3f1c2a9b8e7d6c5b4a39281706f5e4d3c2b1a098"
README = """---
license: mit
configs:
{configs}
---
# {name}

A GSM8K-like dataset with {count} subsets.
"""


def gsm_rows(subset: str, split: str, count: int = 3) -> list[dict]:
    return [{"question": f"[{subset}/{split}] Ann has {i} apples and buys {i + 2} more. How many now?",
             "answer": f"{i} + {i + 2} = <<{i}+{i + 2}={2 * i + 2}>>{2 * i + 2}\n#### {2 * i + 2}"} for i in range(count)]


def write_hub_dataset(hub_cache: Path, repo_id: str, subsets: dict[str, dict[str, list[dict]]],
                      commit: str = COMMIT) -> Path:
    """A dataset repository in the hub cache as `hf download` / `load_dataset` leave it; returns its snapshot."""
    repo = hub_cache / f"datasets--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    files: dict[str, bytes] = {}
    configs = []
    for subset, splits in subsets.items():
        configs.append(f"- config_name: {subset}\n  data_files:")
        for split, rows in splits.items():
            sink = io.BytesIO()
            pq.write_table(pa.Table.from_pylist(rows), sink)
            files[f"{subset}/{split}-00000-of-00001.parquet"] = sink.getvalue()
            configs.append(f"  - split: {split}\n    path: {subset}/{split}-*")
    files["README.md"] = README.format(configs="\n".join(configs), name=repo_id, count=len(subsets)).encode()
    for name, data in files.items():
        # blobs are named by their hash (an LFS file's sha256, a git blob's sha1), snapshots link to them
        blob = repo / "blobs" / (hashlib.sha256(data).hexdigest() if name.endswith(".parquet")
                                 else hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest())
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def two_subsets() -> dict[str, dict[str, list[dict]]]:
    return {subset: {split: gsm_rows(subset, split) for split in ("train", "test")} for subset in ("main", "socratic")}


@pytest.fixture()
def hf_home(scratch, monkeypatch) -> Path:
    """A Hugging Face home of the test's own, offline, as a process started with HF_HOME, HF_HUB_CACHE,
    HF_DATASETS_CACHE and HF_HUB_OFFLINE set would see it (huggingface_hub and datasets read them at import,
    so this process's copies are pointed there too)."""
    import datasets
    import huggingface_hub

    root = scratch / "hf"
    for key, value in hf_environment(root).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", root / "datasets")
    monkeypatch.setattr(datasets.config, "DOWNLOADED_DATASETS_PATH", root / "datasets" / "downloads")
    monkeypatch.setattr(datasets.config, "EXTRACTED_DATASETS_PATH", root / "datasets" / "downloads" / "extracted")
    return root


def hf_environment(root: Path) -> dict[str, str]:
    return {"HF_HOME": str(root), "HF_HUB_CACHE": str(root / "hub"), "HF_DATASETS_CACHE": str(root / "datasets"),
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def hub_ingest(**config):
    source = SourceConfig(**{"path": "hub:org/gsm", "preset": "gsm8k", **config})
    hub = open_hub_source(source)
    return hub, ingest(hub, source, check_golds=lambda answers: check_golds(answers, VERIFY))


@pytest.mark.unit
def test_subset_and_split_choose_the_rows_and_each_has_its_own_key(hf_home):
    write_hub_dataset(hf_home / "hub", "org/gsm", two_subsets())
    seen = {}
    for subset, split in (("main", "train"), ("main", "test"), ("socratic", "test")):
        hub, result = hub_ingest(subset=subset, split=split)
        assert result.quarantine.num_rows == 0 and result.rows_read == 3
        rows = result.problems.to_pylist()
        assert [r["question"][:len(subset) + len(split) + 3] for r in rows] == [f"[{subset}/{split}]"] * 3
        assert [r["answer"] for r in rows] == ["2", "4", "6"]  # the gsm8k preset: after `####`
        assert rows[1]["expert_answer"] == "1 + 3 = 4\nThe answer is \\boxed{4}."
        assert {r["source"] for r in rows} == {"org/gsm"}  # the default name: ORG/NAME
        assert {r["source_file"] for r in rows} == {f"hub:org/gsm?subset={subset}&split={split}"}
        assert hub.revision == COMMIT  # refs/main's snapshot
        seen[(subset, split)] = hub.fingerprint
    assert len(set(seen.values())) == 3
    again, _ = hub_ingest(subset="main", split="test")
    assert again.fingerprint == seen[("main", "test")]  # the same revision, subset and split: the same key
    # no --split: train; a limit reads the first rows only
    hub, result = hub_ingest(subset="socratic", limit=2, name="gsm-socratic")
    assert hub.split == "train" and result.rows_read == 2
    assert set(result.problems["source"].to_pylist()) == {"gsm-socratic"}


@pytest.mark.unit
def test_a_new_revision_in_the_cache_changes_the_key(hf_home):
    write_hub_dataset(hf_home / "hub", "org/gsm", two_subsets())
    before, _ = hub_ingest(subset="main", split="test")
    changed = two_subsets()
    changed["main"]["test"] = gsm_rows("main", "test", count=4)
    write_hub_dataset(hf_home / "hub", "org/gsm", changed, commit="9" * 40)  # refs/main now names it
    after, result = hub_ingest(subset="main", split="test")
    assert after.revision == "9" * 40 and result.problems.num_rows == 4
    assert after.fingerprint != before.fingerprint and after.label == before.label  # it replaces the same part


@pytest.mark.unit
def test_a_row_with_a_missing_answer_is_quarantined_and_decontamination_still_applies(hf_home):
    from evoforge.tasks.decontam import Decontaminator

    rows = gsm_rows("main", "train", count=3)
    rows[1]["answer"] = None
    rows.append({"question": "What is the sum of the first ten positive odd numbers, the eval set asks?",
                 "answer": "#### 100"})
    write_hub_dataset(hf_home / "hub", "org/gsm", {"main": {"train": rows}})
    decontaminator = Decontaminator()
    decontaminator.add_set("heldout", [("h1", "What is the sum of the first ten positive odd numbers, the eval set asks?")])
    source = SourceConfig(path="hub:org/gsm", preset="gsm8k")
    result = ingest(open_hub_source(source), source, check_golds=lambda answers: check_golds(answers, VERIFY),
                    decontaminator=decontaminator)
    assert result.rows_read == 4 and result.problems.num_rows == 2
    by_row = {r["source_row"]: r for r in result.quarantine.to_pylist()}
    assert (by_row[2]["reason"], by_row[2]["field"]) == ("missing_field", "answer")
    assert by_row[2]["source_file"] == "hub:org/gsm?subset=main&split=train" and "main/train" in by_row[2]["raw"]
    assert (by_row[4]["reason"], by_row[4]["matched_set"]) == ("contaminated", "heldout")


@pytest.mark.unit
def test_a_round_configs_sources_take_a_hub_id_with_subset_and_split(hf_home, scratch):
    from evoforge.flows.config import load_config

    write_hub_dataset(hf_home / "hub", "org/gsm", two_subsets())
    path = scratch / "round.yaml"
    path.write_text("sources:\n- {path: 'hub:org/gsm', subset: socratic, split: test, preset: gsm8k, limit: 2}\n")
    (source,) = load_config(path).sources
    hub = open_hub_source(source)
    result = ingest(hub, source, check_golds=lambda answers: check_golds(answers, VERIFY))
    assert (hub.subset, hub.split) == ("socratic", "test") and result.problems.num_rows == 2
    assert result.problems["question"].to_pylist()[0].startswith("[socratic/test]")


@pytest.mark.unit
def test_what_cannot_be_loaded_is_one_line_naming_the_id_and_what_to_do(hf_home, write_jsonl, scratch):
    write_hub_dataset(hf_home / "hub", "org/gsm", two_subsets())

    def error(**config) -> str:
        with pytest.raises(IngestError) as caught:
            hub_ingest(**config)
        assert "\n" not in str(caught.value)
        return str(caught.value)

    uncached = error(path="hub:org/not-here")
    assert uncached.startswith("hub:org/not-here: not in the Hugging Face cache")
    assert str(hf_home / "hub") in uncached and "hf download org/not-here --repo-type dataset" in uncached
    assert error(subset="nope") == ("hub:org/gsm has no subset 'nope'; its subsets: main, socratic "
                                    "(--subset, `subset:` in a config)")
    assert error() == "hub:org/gsm has subsets main, socratic: choose one with --subset (`subset:` in a config)"
    assert error(subset="main", split="validation") == (
        "hub:org/gsm subset 'main' has no split 'validation'; its splits: train, test (--split, `split:` in a config)")
    assert error(path="hub:not a repo") == "hub:not a repo: not a hub dataset id; expected hub:ORG/NAME"
    # a subset whose files this cache never fetched (load_dataset fetches only the subset it was asked for)
    for blob in (hf_home / "hub" / "datasets--org--gsm" / "snapshots" / COMMIT / "socratic").iterdir():
        blob.unlink()
    missing = error(subset="socratic", split="test")
    assert missing.startswith("hub:org/gsm subset 'socratic': cannot be read from the cached snapshot ")
    assert "hf download org/gsm --repo-type dataset" in missing
    assert hub_ingest(subset="main", split="test")[1].problems.num_rows == 3  # the subset it has still loads
    # `subset` means nothing to a file
    path = write_jsonl(scratch / "pool.jsonl", [{"question": "One?", "answer": "#### 1"}])
    with pytest.raises(IngestError, match="`subset` is for a hub dataset"):
        ingest(path, SourceConfig(path=str(path), subset="main"), check_golds=lambda answers: [True] * len(answers))


@pytest.mark.server
def test_the_ingest_command_and_a_round_config_read_a_hub_id_from_the_users_cache(prefect_server, runs_root, scratch):
    """A fresh `evoforge` process with HF_HOME / HF_HUB_CACHE / HF_DATASETS_CACHE pointing at the cache:
    the counts, a rerun skipped, another split added beside it, and errors as one line."""
    from prefect.settings import PREFECT_API_URL

    from evoforge.data.lake import lake

    hf = scratch / "hf"
    rows = two_subsets()
    rows["socratic"]["test"].append({"question": "A question whose answer was lost?", "answer": None})
    write_hub_dataset(hf / "hub", "org/gsm", rows)
    env = {**os.environ, **hf_environment(hf), "PREFECT_API_URL": PREFECT_API_URL.value()}

    def evoforge(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "evoforge", *args], capture_output=True, text=True, env=env,
                              timeout=300)

    done = evoforge("ingest", "hub:org/gsm", "--subset", "socratic", "--split", "test", "--preset", "gsm8k",
                    "--run", "hub")
    assert done.returncode == 0, done.stderr
    assert "ingest hub:org/gsm -> run hub: 4 rows read, 3 problems, 1 quarantined (completed)" in done.stdout
    assert "missing_field 1" in done.stdout
    assert "(skipped)" in evoforge("ingest", "hub:org/gsm", "--subset", "socratic", "--split", "test", "--preset",
                                   "gsm8k", "--run", "hub").stdout
    done = evoforge("ingest", "hub:org/gsm", "--subset", "main", "--preset", "gsm8k", "--run", "hub")
    assert "3 rows read, 3 problems, 0 quarantined (completed)" in done.stdout, done.stderr
    problems = lake().read("hub", "problems").to_pylist()
    assert sorted({r["source_file"] for r in problems}) == ["hub:org/gsm?subset=main&split=train",
                                                           "hub:org/gsm?subset=socratic&split=test"]
    assert lake().read("hub", "quarantine")["source_file"].to_pylist() == ["hub:org/gsm?subset=socratic&split=test"]

    for args, expected in ((["hub:org/elsewhere"], "error: hub:org/elsewhere: not in the Hugging Face cache"),
                           (["hub:org/gsm", "--subset", "nope"], "error: hub:org/gsm has no subset 'nope'")):
        done = evoforge("ingest", *args, "--run", "hub")
        assert done.returncode == 2 and done.stderr.startswith(expected), done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr

    config = scratch / "round.yaml"
    config.write_text("sources:\n- {path: 'hub:org/gsm', subset: main, split: test, preset: gsm8k}\n")
    done = evoforge("stage", "ingest", "--run", "from-config", "--round", "0", "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert lake().read("from-config", "problems")["source_file"].to_pylist() == ["hub:org/gsm?subset=main&split=test"] * 3


@pytest.mark.server
def test_a_hub_id_ingests_into_a_lake_on_object_storage(prefect_server, s3_runs, hf_home):
    """The same hub source into a lake on the local S3 server: the stage commits it there, and a rerun of the
    same revision, subset and split is skipped."""
    from evoforge.data.lake import lake
    from evoforge.flows.ingest import ingest_flow

    write_hub_dataset(hf_home / "hub", "org/gsm", two_subsets())
    source = SourceConfig(path="hub:org/gsm", preset="gsm8k", subset="socratic", split="test")
    assert ingest_flow("s3hub", source, []).status == "completed"
    problems = lake().read("s3hub", "problems")
    assert problems.num_rows == 3 and set(problems["source_file"].to_pylist()) == {"hub:org/gsm?subset=socratic&split=test"}
    assert ingest_flow("s3hub", source, []).status == "skipped"
