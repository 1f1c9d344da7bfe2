"""Export (tasks/export.py): tables as a Hugging Face dataset, zero-copy; the card the hub's own parser reads;
the folder written whole or not at all, in either format, read back by `datasets`; the commit a push makes.
And the finetune methods' datasets built in Arrow, equal to the rows the old Python route built."""
from __future__ import annotations

from types import SimpleNamespace

import datasets
import pyarrow as pa
import pytest

from evoforge.tasks import export
from evoforge.tasks.export import ExportError

pytestmark = pytest.mark.unit

LINEAGE = {
    "run": "demo", "rounds": [0, 1], "evoforge_version": "0.1.0", "exported_at": "2026-05-01T12:00:00+00:00",
    "lake": "/lake/runs",
    "tables": {"sft": {"table": "sft_examples", "rows": 3,
                       "sql": "SELECT prompt, completion FROM sft_examples WHERE round IN (0, 1) ORDER BY round, example_id",
                       "sources": [{"round": 0, "stage": "pairs", "version": 2, "commit": "3f2a9c", "committed_at":
                                    "2026-05-01T11:00:00+00:00", "config_hash": "c0ffee", "model": "tiny|random",
                                    "checkpoint": None}]}},
    "grader": {"name": "math-verify", "timeout_s": 5.0, "workers": 2},
    "decontamination": [{"name": "gsm8k-test", "path": "/sets/gsm8k/test.jsonl", "problems": 1319}],
}


def sft_table() -> pa.Table:
    """Two chunks, a missing completion and text outside ASCII: what a lake read hands over."""
    rows = pa.table({"prompt": ["What is 2+2?", "Combien font 3×3 ?", "q3"], "completion": ["\\boxed{4}", "ça fait \\boxed{9}", None]})
    return pa.concat_tables([rows.slice(0, 2), rows.slice(2)])


def stats_table() -> pa.Table:
    return pa.table({"problem_id": ["p1", "p2"],
                     "pass_at_k": pa.array([[(1, 0.5), (4, 0.9)], None], pa.map_(pa.int32(), pa.float64())),
                     "bucket": pa.array(["learnable", "solved"]).dictionary_encode()})


def two_shards_of_sft(configs) -> int:
    """A shard size that splits `sft` in two and keeps `problem_stats` whole."""
    sft, stats = (configs[name]["train"].data.nbytes for name in ("sft", "problem_stats"))
    limit = max(stats, sft // 2 + 1)
    assert limit < sft <= 2 * limit
    return limit


def addresses(column: pa.ChunkedArray) -> list[int]:
    """Where every buffer of a column lives (its children's too)."""
    def of(array: pa.Array) -> list[int]:
        return [buffer.address for buffer in array.buffers() if buffer is not None]
    return [address for chunk in column.chunks for address in of(chunk)]


# -- zero-copy ---------------------------------------------------------------------------------------------

def test_each_table_is_a_config_of_one_train_split_holding_the_tables_own_buffers():
    table = sft_table().append_column("n", pa.chunked_array([[1, 2], [3]], pa.int64()))
    configs = export.dataset_configs({"sft": table})
    assert list(configs) == ["sft"] and list(configs["sft"]) == ["train"]
    split = configs["sft"]["train"]
    assert split.split == "train" and split.num_rows == 3 and split.column_names == ["prompt", "completion", "n"]
    held = split.data.table
    for name in table.column_names:
        assert addresses(held.column(name)) == addresses(table.column(name)), name  # the same memory, not a copy
    assert split.to_dict() == table.to_pydict()


def test_a_map_column_becomes_key_value_structs_over_the_same_buffers_and_a_dictionary_is_decoded():
    stats = stats_table()
    split = export.dataset_configs({"problem_stats": stats})["problem_stats"]["train"]
    assert split.features["pass_at_k"] == datasets.List({"key": datasets.Value("int32"), "value": datasets.Value("float64")})
    assert split.features["bucket"] == datasets.Value("string")
    assert split["pass_at_k"] == [[{"key": 1, "value": 0.5}, {"key": 4, "value": 0.9}], None]
    assert split["bucket"] == ["learnable", "solved"]
    assert addresses(split.data.table.column("pass_at_k")) == addresses(stats.column("pass_at_k"))
    assert addresses(split.data.table.column("problem_id")) == addresses(stats.column("problem_id"))


@pytest.mark.parametrize("name", ["", "a/b", "../up", "-x", "with space"])
def test_a_config_name_must_be_a_plain_folder_name(name):
    with pytest.raises(ExportError, match="cannot name a config"):
        export.dataset_configs({name: sft_table()})


# -- the card ----------------------------------------------------------------------------------------------

def test_the_card_is_read_by_the_hubs_own_parser_with_configs_features_and_lineage():
    from huggingface_hub import DatasetCard

    configs = export.dataset_configs({"sft": sft_table(), "problem_stats": stats_table()})
    text = export.dataset_card(configs, LINEAGE, license="apache-2.0", task_categories=["text-generation"],
                               tags=["math", "evoforge"], pretty_name="Demo round data")
    card = DatasetCard(text)
    data = card.data
    assert data.license == "apache-2.0" and data.task_categories == ["text-generation"]
    assert data.tags == ["math", "evoforge"] and data.pretty_name == "Demo round data" and data.size_categories == ["n<1K"]
    assert sorted(data.configs, key=lambda c: c["config_name"]) == [
        {"config_name": "problem_stats", "data_files": [{"split": "train", "path": "problem_stats/train-*.parquet"}]},
        {"config_name": "sft", "data_files": [{"split": "train", "path": "sft/train-*.parquet"}]}]
    infos = {info["config_name"]: info for info in data.dataset_info}
    assert datasets.Features._from_yaml_list(infos["sft"]["features"]) == configs["sft"]["train"].features
    assert datasets.Features._from_yaml_list(infos["problem_stats"]["features"]) == configs["problem_stats"]["train"].features
    assert infos["sft"]["splits"] == [{"name": "train", "num_bytes": sft_table().nbytes, "num_examples": 3}]
    body = card.text
    for said in ("# Demo round data", "run `demo`", "rounds 0, 1", "evoforge 0.1.0", "`/lake/runs`",
                 "SELECT prompt, completion FROM sft_examples", "| 0 | pairs | 2 | 3f2a9c |", "tiny\\|random",
                 "| name | math-verify |", "| gsm8k-test | /sets/gsm8k/test.jsonl | 1,319 |",
                 "load_dataset('<ORG/NAME or folder>', 'sft', split=\"train\")"):
        assert said in body, said
    assert "### `problem_stats`\n\nLineage not recorded." in body


def test_a_card_without_lineage_or_options_still_renders_and_counts_rows_from_a_schema():
    from huggingface_hub import DatasetCard

    text = export.dataset_card({"rollouts": (pa.schema([("text", pa.string())]), 12_345)}, {}, format="arrow",
                               location="exports/demo")
    card = DatasetCard(text)
    assert card.data.size_categories == ["10K<n<100K"] and card.data.license is None
    assert card.data.configs == [{"config_name": "rollouts", "data_files": [{"split": "train", "path": "rollouts/data-*.arrow"}]}]
    assert "Lineage not recorded." in card.text and "load_from_disk('exports/demo/rollouts')" in card.text
    assert "## Grading\n\nNot recorded." in card.text


def test_size_categories_follow_the_hubs_bounds():
    assert [export.size_category(n) for n in (0, 999, 1_000, 99_999, 100_000, 10**12)] == [
        "n<1K", "n<1K", "1K<n<10K", "10K<n<100K", "100K<n<1M", "n>1T"]


# -- the folder ----------------------------------------------------------------------------------------------

def test_a_parquet_export_is_laid_out_as_the_hub_lays_out_configs_and_load_dataset_reads_each(scratch):
    tables = {"sft": sft_table(), "problem_stats": stats_table()}
    configs = export.dataset_configs(tables)
    card = export.dataset_card(configs, LINEAGE, format="parquet")
    folder = export.write_export(configs, card, scratch / "out", "parquet", max_shard_bytes=two_shards_of_sft(configs))
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == [
        "README.md", "problem_stats/train-00000-of-00001.parquet",
        "sft/train-00000-of-00002.parquet", "sft/train-00001-of-00002.parquet"]
    for name, table in tables.items():
        loaded = datasets.load_dataset(str(folder), name, split="train", cache_dir=str(scratch / "cache"))
        assert loaded.features == configs[name]["train"].features
        assert loaded.to_list() == configs[name]["train"].to_list()
    assert datasets.get_dataset_config_names(str(folder)) == ["problem_stats", "sft"]


def test_an_arrow_export_loads_back_with_load_from_disk_one_config_per_folder(scratch):
    configs = export.dataset_configs({"sft": sft_table(), "problem_stats": stats_table()})
    folder = export.write_export(configs, export.dataset_card(configs, LINEAGE, format="arrow"), scratch / "out")
    sft = datasets.load_from_disk(str(folder / "sft"))
    # a Dataset with TRL's prompt/completion columns, as the table had them: SFTTrainer takes it as it is
    assert isinstance(sft, datasets.Dataset) and sft.split == "train"
    assert sft.column_names == ["prompt", "completion"] and sft.to_dict() == sft_table().to_pydict()
    assert datasets.load_from_disk(str(folder / "problem_stats"))["bucket"] == ["learnable", "solved"]
    through_card = datasets.load_dataset(str(folder), "sft", split="train", cache_dir=str(scratch / "cache"))
    assert through_card.to_list() == sft.to_list()
    assert (folder / "README.md").read_text().startswith("---\n")


@pytest.mark.parametrize("format", ["parquet", "arrow"])
def test_a_streamed_config_is_written_batch_by_batch_into_bounded_shards_and_reads_back_equal(scratch, format):
    """A lake table too large to hold reaches the export as a stream: shards close at the byte bound, are named
    once their count is known, and the rows read back equal, maps as key/value structs as for a table."""
    rows = pa.table({"problem_id": [f"p{i}" for i in range(1000)], "text": ["x" * 200] * 1000,
                     "pass_at_k": pa.array([[(1, i / 1000)] for i in range(1000)], pa.map_(pa.int32(), pa.float64()))})
    streamed = export.StreamedConfig(rows.schema, rows.num_rows, lambda: iter(rows.to_batches(max_chunksize=100)))
    card = export.dataset_card({"rollouts": streamed}, LINEAGE, format=format)
    folder = export.write_export({"rollouts": streamed}, card, scratch / "out", format, max_shard_bytes=60_000)
    if format == "parquet":
        shards = sorted(p.name for p in (folder / "rollouts").iterdir())
        assert len(shards) > 2 and shards[0] == f"train-00000-of-{len(shards):05d}.parquet"
    loaded = datasets.load_dataset(str(folder), "rollouts", split="train")
    assert loaded.data.table.equals(export.hub_compatible(rows).replace_schema_metadata(None).cast(loaded.data.table.schema))
    assert not [p for p in folder.rglob(".*")]  # no scratch left beside the configs


def test_an_existing_export_is_refused_unless_overwritten(scratch):
    configs = export.dataset_configs({"sft": sft_table()})
    target = scratch / "out"
    export.write_export(configs, "first", target)
    with pytest.raises(ExportError, match="exists and is not empty"):
        export.write_export(configs, "second", target)
    assert (target / "README.md").read_text() == "first"
    export.write_export(configs, "second", target, overwrite=True)
    assert (target / "README.md").read_text() == "second"
    (scratch / "empty").mkdir()
    export.write_export(configs, "into an empty folder", scratch / "empty")
    (scratch / "a-file").write_text("x")
    with pytest.raises(ExportError, match="is a file"):
        export.write_export(configs, "card", scratch / "a-file", overwrite=True)


def test_a_failure_mid_export_leaves_nothing_half_written(scratch, monkeypatch):
    from evoforge.data.atomic import leftovers

    configs = export.dataset_configs({"sft": sft_table(), "problem_stats": stats_table()})
    written = []
    real = export._write_parquet_shards

    def fail_on_the_second(dataset, folder, max_shard_bytes):
        if written:
            raise OSError("disk full")
        written.append(folder)
        real(dataset, folder, max_shard_bytes)

    monkeypatch.setattr(export, "_write_parquet_shards", fail_on_the_second)
    with pytest.raises(OSError, match="disk full"):
        export.write_export(configs, "card", scratch / "new", "parquet")
    assert not (scratch / "new").exists() and leftovers(scratch) == []
    # over an existing export: the old one stays whole
    monkeypatch.setattr(export, "_write_parquet_shards", real)
    export.write_export(configs, "old card", scratch / "old", "parquet")
    before = sorted(p.relative_to(scratch).as_posix() for p in (scratch / "old").rglob("*"))
    written.clear()
    monkeypatch.setattr(export, "_write_parquet_shards", fail_on_the_second)
    with pytest.raises(OSError):
        export.write_export(configs, "new card", scratch / "old", "parquet", overwrite=True)
    assert sorted(p.relative_to(scratch).as_posix() for p in (scratch / "old").rglob("*")) == before
    assert (scratch / "old" / "README.md").read_text() == "old card" and leftovers(scratch) == []


# -- the hub ---------------------------------------------------------------------------------------------------

class RecordingHubStandIn:
    """Stands in for huggingface_hub.HfApi, which the tests cannot reach (no network): records the calls."""

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **options):
        self.calls.append(("create_repo", repo_id, options))
        return f"https://huggingface.co/datasets/{repo_id}"

    def create_commit(self, repo_id, operations, **options):
        self.calls.append(("create_commit", repo_id, list(operations), options))
        return "commit-info"


def test_a_push_creates_the_dataset_repo_and_commits_every_parquet_file_and_the_card_at_once(scratch):
    from huggingface_hub import CommitOperationAdd

    configs = export.dataset_configs({"sft": sft_table(), "problem_stats": stats_table()})
    folder = export.write_export(configs, export.dataset_card(configs, LINEAGE), scratch / "out", "parquet",
                                 max_shard_bytes=two_shards_of_sft(configs))
    api = RecordingHubStandIn()
    assert export.push_to_hub(folder, "org/demo", private=True, token="hf_stand_in", api=api) == "commit-info"
    (create, repo_id, options), (commit, commit_repo, operations, commit_options) = api.calls
    assert (create, repo_id, options) == ("create_repo", "org/demo", {"repo_type": "dataset", "private": True, "exist_ok": True})
    assert (commit, commit_repo, commit_options["repo_type"]) == ("create_commit", "org/demo", "dataset")
    assert commit_options["commit_message"] == "evoforge export: problem_stats, sft"
    assert all(isinstance(op, CommitOperationAdd) for op in operations)
    assert [op.path_in_repo for op in operations] == [
        "problem_stats/train-00000-of-00001.parquet", "sft/train-00000-of-00002.parquet",
        "sft/train-00001-of-00002.parquet", "README.md"]
    assert all(op.path_or_fileobj == str(folder / op.path_in_repo) for op in operations)
    api = RecordingHubStandIn()
    export.push_to_hub(folder, "org/demo", private=False, token="hf_stand_in", api=api)
    assert api.calls[0][2]["private"] is False


def test_without_a_token_the_push_says_how_to_log_in_before_touching_the_hub(scratch, monkeypatch):
    import huggingface_hub.constants

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(scratch / "no-token-here"))
    configs = export.dataset_configs({"sft": sft_table()})
    folder = export.write_export(configs, export.dataset_card(configs, LINEAGE), scratch / "out", "parquet")
    api = RecordingHubStandIn()
    with pytest.raises(ExportError) as failure:
        export.push_to_hub(folder, "org/demo", private=True, api=api)
    assert "hf auth login" in str(failure.value) and "huggingface-cli login" in str(failure.value)
    assert "HF_TOKEN" in str(failure.value) and "\n" not in str(failure.value)
    assert api.calls == []
    monkeypatch.setenv("HF_TOKEN", "hf_from_the_environment")
    export.push_to_hub(folder, "org/demo", private=True, api=api)
    assert [call[0] for call in api.calls] == ["create_repo", "create_commit"]


def test_only_a_parquet_export_is_pushed_and_a_hub_target_names_org_and_name(scratch):
    configs = export.dataset_configs({"sft": sft_table()})
    arrow = export.write_export(configs, "card", scratch / "arrow", "arrow")
    with pytest.raises(ExportError, match="not a Parquet export"):
        export.hub_commit_operations(arrow)
    with pytest.raises(ExportError, match="holds no README.md"):
        export.hub_commit_operations(scratch)
    assert export.hub_repo_id("hub:org/name") == "org/name" and export.hub_repo_id("exports/round-3") is None
    for bad in ("hub:name", "hub:a/b/c", "hub:org/bad name"):
        with pytest.raises(ExportError, match="hub:ORG/NAME"):
            export.hub_repo_id(bad)


# -- the finetune methods' datasets, built in Arrow ---------------------------------------------------------------
# Each `old_*` is the Python route the method used before (Dataset.from_list over to_pylist), kept here only to
# check the Arrow route builds the same dataset: same columns, features, values and order.

def old_sft(examples, config):
    from evoforge.models.prompts import solve_messages

    return datasets.Dataset.from_list([
        {"prompt": solve_messages(r["prompt"], config.few_shot),
         "completion": [{"role": "assistant", "content": r["completion"]}]}
        for r in examples.to_pylist()
    ])


def old_dpo(pairs, config):
    import pyarrow.compute as pc

    from evoforge.models.prompts import solve_messages

    rows = pairs.filter(pc.equal(pairs["kind"], "solution")).to_pylist()
    return datasets.Dataset.from_list([
        {"prompt": solve_messages(r["prompt"], config.few_shot),
         "chosen": [{"role": "assistant", "content": r["chosen"]}],
         "rejected": [{"role": "assistant", "content": r["rejected"]}]}
        for r in rows
    ])


def old_ppm(pairs):
    import pyarrow.compute as pc

    rows = pairs.filter(pc.equal(pairs["kind"], "step")).to_pylist()
    return datasets.Dataset.from_list([
        {"prompt": f"{r['prompt']}\n\n{r['prefix'] or ''}", "chosen": r["chosen"], "rejected": r["rejected"]}
        for r in rows
    ])


def old_traces(traces):
    from evoforge.models.prompts import step_messages

    return datasets.Dataset.from_list([
        {"prompt": step_messages(r["prompt"]), "completion": [{"role": "assistant", "content": r["completion"]}]}
        for r in traces.to_pylist()
    ])


def old_grpo(problems, config):
    from evoforge.models.prompts import solve_messages

    return datasets.Dataset.from_list([
        {"prompt": solve_messages(r["question"], config.few_shot), "answer": r["answer"]}
        for r in problems.select(["question", "answer"]).to_pylist()
    ])


def old_svs(problems, config):
    from evoforge.models.prompts import solve_messages

    return datasets.Dataset.from_list([
        {"prompt": solve_messages(r["question"], config.few_shot), "answer": r["answer"], "kind": "solve",
         "problem_id": r["problem_id"], "question": r["question"], "reward": 0.0}
        for r in problems.select(["problem_id", "question", "answer"]).to_pylist()
    ])


def old_raro(rows, config, context):
    from evoforge.models.prompts import solve_messages
    from evoforge.tasks.critic import critic_prompt

    critic = context.critic
    return datasets.Dataset.from_list([
        {"prompt": solve_messages(r["question"], config.few_shot) if r["role"] == "policy" else
         critic_prompt(r["question"], r["order"], r["policy_answer"], r["expert_answer"], critic.max_answer_chars),
         "role": r["role"], "question": r["question"], "expert_answer": r["expert_answer"], "order": r["order"] or ""}
        for r in rows.to_pylist()
    ])


def assert_same_dataset(new: datasets.Dataset, old: datasets.Dataset) -> None:
    assert new.column_names == old.column_names
    assert new.features == old.features
    assert new.data.table.equals(old.data.table)  # types, values and order (chunking aside)
    assert new.to_list() == old.to_list()


def in_two_chunks(table: pa.Table) -> pa.Table:
    """The rows as a lake read hands them over: several chunks, the first an offset slice of a bigger one."""
    padded = pa.concat_tables([table.slice(0, 1), table])
    return pa.concat_tables([padded.slice(1, 2), padded.slice(3)])


def configs_both_ways():
    from evoforge.tasks.finetune.config import FinetuneConfig

    return [FinetuneConfig(), FinetuneConfig(few_shot=False)]


LONG = "Å" + "long answer with a \\boxed{7} " * 10  # past the critic's 100 characters, with a character outside ASCII


def test_sft_and_traces_datasets_equal_the_python_route_and_completions_keep_their_buffers():
    from evoforge.data import schemas
    from evoforge.tasks.finetune import sft, traces

    examples = in_two_chunks(pa.Table.from_pylist([
        dict(example_id=f"e{i}", problem_id=f"p{i}", prompt=prompt, completion=completion)
        for i, (prompt, completion) in enumerate([("What is 2+2?", "\\boxed{4}"), ("Ça fait 3×3 ?", None),
                                                  ("", "empty question"), ("multi\nline {braces}", LONG)])],
        schema=schemas.SFT_EXAMPLES))
    for config in configs_both_ways():
        assert_same_dataset(sft.dataset(examples, config, None), old_sft(examples, config))
    assert_same_dataset(traces.dataset(examples, configs_both_ways()[0], None), old_traces(examples))
    single = examples.combine_chunks()
    built = sft.dataset(single, configs_both_ways()[0], None)
    content = built.data.table.column("completion").chunks[0].values.field("content")
    assert [b.address for b in content.buffers() if b] == addresses(single.column("completion"))


def pairs_table() -> pa.Table:
    from evoforge.data import schemas

    rows = [("solution", "Q1", None, "good", "bad"), ("step", "Q2", "step 1\n", "step 2", "wrong step"),
            ("solution", "Q3 ×", None, "✓", None), ("step", "Q4", None, "first step", "other"),
            ("step", "Q5", "", "x", "y"), ("solution", "", None, "", "")]
    return in_two_chunks(pa.Table.from_pylist([
        dict(pair_id=f"pair{i}", kind=kind, problem_id=f"p{i}", prompt=prompt, prefix=prefix, chosen=chosen,
             rejected=rejected) for i, (kind, prompt, prefix, chosen, rejected) in enumerate(rows)], schema=schemas.PAIRS))


def test_dpo_and_ppm_datasets_equal_the_python_route():
    from evoforge.tasks.finetune import dpo, ppm

    pairs = pairs_table()
    for config in configs_both_ways():
        assert_same_dataset(dpo.dataset(pairs, config, None), old_dpo(pairs, config))
    assert_same_dataset(ppm.dataset(pairs, configs_both_ways()[0], None), old_ppm(pairs))


def test_grpo_and_svs_datasets_equal_the_python_route():
    from evoforge.data import schemas
    from evoforge.tasks.finetune import grpo, svs

    problems = in_two_chunks(pa.Table.from_pylist([
        dict(problem_id=f"p{i}", question=question, answer=answer, source="t")
        for i, (question, answer) in enumerate([("What is 2+2?", "4"), ("Ça fait 3×3 ?", "9"), (LONG, None), ("q", "1/2")])],
        schema=schemas.PROBLEMS))
    for config in configs_both_ways():
        assert_same_dataset(grpo.dataset(problems, config, None), old_grpo(problems, config))
        assert_same_dataset(svs.dataset(problems, config, None), old_svs(problems, config))


def test_raro_dataset_equals_the_python_route_for_both_roles_and_both_orders():
    from evoforge.tasks.critic import CriticConfig
    from evoforge.tasks.finetune import raro

    rows = in_two_chunks(pa.Table.from_pylist([
        dict(role="policy", problem_id="p1", question="What is 2+2?", expert_answer="4", policy_answer=None, order=None,
             replayed=None),
        dict(role="critic", problem_id="p2", question="Ça fait 3×3 ?", expert_answer=LONG, policy_answer="9",
             order="policy_first", replayed=False),
        dict(role="critic", problem_id="p3", question="q3", expert_answer="1", policy_answer=LONG + "é" * 200,
             order="expert_first", replayed=True),
        dict(role="policy", problem_id="p4", question=LONG, expert_answer="x", policy_answer=None, order=None, replayed=None),
    ], schema=raro.RARO_ROWS))
    for max_chars in (100, 2000):
        context = SimpleNamespace(critic=CriticConfig(max_answer_chars=max_chars))
        for config in configs_both_ways():
            assert_same_dataset(raro.dataset(rows, config, context), old_raro(rows, config, context))


def test_messages_column_refuses_a_template_that_does_not_insert_its_argument_verbatim():
    from evoforge.tasks.arrow_datasets import messages_column

    column = pa.array(["a", "b"])
    with pytest.raises(ValueError, match="verbatim"):
        messages_column(lambda q: [{"role": "user", "content": q.strip()}], q=column)
    with pytest.raises(ValueError, match="role"):
        messages_column(lambda q: [{"role": "user", "content": q, "name": "x"}], q=column)
    empty = messages_column(lambda q: [{"role": "system", "content": "s"}, {"role": "user", "content": q}], q=pa.array([], pa.string()))
    assert len(empty) == 0 and empty.type == pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


def test_an_export_counts_a_row_wise_methods_rows_by_the_columns_it_chooses_by_and_types_them_from_no_rows():
    """`evoforge export` counts a row-wise method's rows from its `ROWS_CHOSEN_BY` columns alone (none: every row)
    and takes their types from its `dataset` of no rows (flows/export.py): the count is `training_rows`' over
    whole rows, the types, metadata included, those of the rows it builds."""
    from evoforge.data import schemas
    from evoforge.flows.export import _OneSlice
    from evoforge.tasks.finetune import dpo, ppm, sft, traces
    from evoforge.tasks.finetune.training import METHOD_MODULES

    # every row-wise method says what it chooses its rows by: the export counts a new one only so
    assert [m.__name__ for m in METHOD_MODULES.values() if getattr(m, "ROW_WISE", False)] == [
        m.__name__ for m in METHOD_MODULES.values() if isinstance(getattr(m, "ROWS_CHOSEN_BY", None), tuple)] == [
        m.__name__ for m in (sft, dpo, traces, ppm)]

    examples = pa.Table.from_pylist([dict(example_id="e0", problem_id="p0", prompt="What is 2+2?", completion="4"),
                                     dict(example_id="e1", problem_id="p1", prompt="Q", completion=LONG)],
                                    schema=schemas.SFT_EXAMPLES)
    steps = pa.Table.from_pylist([dict(trace_id="t0", problem_id="p0", prompt="Q", completion="step 1\n\\boxed{4}")],
                                 schema=schemas.TRACES)
    for config in configs_both_ways():
        for module, table in ((sft, examples), (traces, steps), (dpo, pairs_table()), (ppm, pairs_table())):
            kept = module.training_rows(_OneSlice(table), config)
            counted = module.training_rows(_OneSlice(table.select(list(module.ROWS_CHOSEN_BY))), config).num_rows \
                if module.ROWS_CHOSEN_BY else table.num_rows
            assert 0 < counted == kept.num_rows, module.__name__
            typed = module.dataset(module.training_rows(_OneSlice(table.schema.empty_table()), config), config, None)
            built = module.dataset(kept, config, None)
            assert typed.data.table.schema.equals(built.data.table.schema, check_metadata=True), module.__name__
