"""`evoforge export` of a run (flows/export.py): every lake table and every method's training rows of a
round, read back by `datasets` equal to what the lake holds; a card the hub's own parser reads, with the
lineage; the commit a push to the hub makes; and a stock TRL trainer trained on what an export wrote. On
local disk (unit) and with the lake on the local S3 server (server)."""
from __future__ import annotations

import datasets
import pyarrow as pa
import pytest
from huggingface_hub import CommitOperationAdd, DatasetCard

from evoforge.app.cli import main
from evoforge.data import schemas
from evoforge.data.lake import lake
from evoforge.flows.config import RoundConfig
from evoforge.flows import export as export_flow
from evoforge.flows.export import export_run
from evoforge.tasks.arrow_datasets import hub_compatible
from evoforge.tasks.finetune.training import METHOD_MODULES, TrainingContext
from seeds import seed_every_methods_rows

METHODS = sorted(METHOD_MODULES)  # sft, dpo, grpo, traces, raro, svs, ppm
TABLES = sorted(schemas.ROUND_TABLES)


def test_every_table_and_method_of_a_round_exports_and_reads_back_equal(lake_on, scratch, capsys, monkeypatch):
    folder = scratch
    # a row-wise method (sft, dpo, traces, ppm) streams slices of its table: here a row at a time, equal to the whole
    monkeypatch.setattr(export_flow, "METHOD_SLICE_ROWS", 1)
    seed_every_methods_rows("r")
    capsys.readouterr()
    arguments = [arg for name in TABLES + METHODS for arg in ("--table", name)]
    assert main(["export", "--run", "r", *arguments, "--to", str(folder / "arrow")]) == 0
    assert "export run r (version" in capsys.readouterr().out
    assert main(["export", "--run", "r", "--round", "0", *arguments, "--to", str(folder / "parquet"),
                 "--format", "parquet", "--license", "apache-2.0"]) == 0

    empty = [name for name in TABLES if lake().read("r", name).num_rows == 0]
    assert "checkpoints" in empty and f"no rows, left out: {', '.join(empty)}" in capsys.readouterr().out
    assert not (folder / "arrow" / "checkpoints").exists()
    config, context = RoundConfig(), TrainingContext()
    from evoforge.flows.finetune import LakeRoundInputs

    for name in [t for t in TABLES + METHODS if t not in empty]:
        if name in METHOD_MODULES:  # the rows exactly as the method's trainer receives them, plus their round
            module = METHOD_MODULES[name]
            expected = module.dataset(module.training_rows(LakeRoundInputs("r", 0), config.finetune),
                                      config.finetune, context).data.table
            expected = expected.append_column("round", pa.array([0] * expected.num_rows, pa.int32()))
        else:
            expected = lake().read("r", name)
        expected = hub_compatible(expected)
        saved = datasets.load_from_disk(str(folder / "arrow" / name))
        assert saved.num_rows == expected.num_rows, name
        assert saved.data.table.schema.remove_metadata() == expected.schema.remove_metadata(), name
        assert saved.data.table.equals(expected), name
        hub_layout = datasets.load_dataset(str(folder / "parquet"), name, split="train")
        assert hub_layout.num_rows == expected.num_rows and hub_layout.column_names == expected.column_names, name
    assert folder.joinpath("arrow", "sft").is_dir() and lake().read("r", "sft_examples").num_rows == 4

    card = DatasetCard((folder / "parquet" / "README.md").read_text())  # the hub's own card parser
    assert card.data.license == "apache-2.0" and "text-generation" in card.data.task_categories
    assert sorted(c["config_name"] for c in card.data.configs) == sorted(set(TABLES + METHODS) - set(empty))
    assert card.data.size_categories == ["n<1K"]
    text = card.text
    assert "SELECT" in text and "--as-of" in text and "math-verify" in text and "0 | pairs | 1 |" in text



class RecordingHub:
    """A stand-in for the hub, which cannot be reached from here: records the calls huggingface_hub's
    `HfApi` would send, with huggingface_hub's own operation objects."""

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **options):
        self.calls.append(("create_repo", repo_id, options))

    def create_commit(self, repo_id, operations, **options):
        self.calls.append(("create_commit", repo_id, list(operations), options))
        return "https://huggingface.co/datasets/" + repo_id


@pytest.mark.unit
def test_an_export_to_the_hub_is_one_commit_of_the_parquet_layout_and_its_card(runs_root, monkeypatch):
    seed_every_methods_rows("r")
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    hub = RecordingHub()
    result = export_run("r", ["rollouts", "sft", "dpo"], "hub:evo-org/round-data", private=True, api=hub)
    (create, repo_id, options), (commit, commit_repo, operations, commit_options) = hub.calls
    assert (create, repo_id, commit, commit_repo) == ("create_repo", "evo-org/round-data", "create_commit", "evo-org/round-data")
    assert options["private"] is True and options["repo_type"] == "dataset" and commit_options["repo_type"] == "dataset"
    assert all(isinstance(op, CommitOperationAdd) for op in operations)
    paths = sorted(op.path_in_repo for op in operations)
    assert paths == ["README.md", "dpo/train-00000-of-00001.parquet", "rollouts/train-00000-of-00001.parquet",
                     "sft/train-00000-of-00001.parquet"]
    assert result.rows == {"rollouts": 4, "sft": 4, "dpo": 4}
    with pytest.raises(ValueError, match="hub gets the Parquet layout"):
        export_run("r", ["sft"], "hub:evo-org/round-data", format="arrow", api=hub)
    assert main(["export", "--run", "r", "--table", "nope", "--to", "x"]) == 2


@pytest.mark.model
def test_a_stock_trl_trainer_trains_on_an_exported_folder(runs_root, scratch, tiny_model):
    """What a user elsewhere does with an export: load_from_disk and hand it to TRL as it is."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    seed_every_methods_rows("r")
    assert main(["export", "--run", "r", "--table", "sft", "--table", "dpo", "--to", str(scratch / "out")]) == 0
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    common = dict(max_steps=1, per_device_train_batch_size=2, report_to=[], save_strategy="no", use_cpu=True)
    sft = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(str(tiny_model)), processing_class=tokenizer,
                     train_dataset=datasets.load_from_disk(str(scratch / "out" / "sft")),
                     args=SFTConfig(output_dir=str(scratch / "sft"), **common))
    assert sft.train().global_step == 1
    dpo = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(str(tiny_model)), processing_class=tokenizer,
                     train_dataset=datasets.load_from_disk(str(scratch / "out" / "dpo")),
                     args=DPOConfig(output_dir=str(scratch / "dpo"), **common))
    assert dpo.train().global_step == 1
