"""One end-to-end round on the embedded default model (SmolLM2-135M-Instruct), small sizes, through the CLI."""
from __future__ import annotations

import json

import pytest

from evoforge.data.lake import lake
from evoforge.app.cli import main


@pytest.mark.model
@pytest.mark.server
def test_a_round_on_the_default_model_from_the_command_line(write_jsonl, prefect_server, runs_root, scratch, capsys):
    from evoforge.data.home import PROJECT_ROOT

    easy = [json.loads(line) for line in (PROJECT_ROOT / "data/sets/easy_arithmetic/train.jsonl").open()]
    one_step = [r for r in easy if r["steps"] == 1][:8]
    pool = write_jsonl(scratch / "pool.jsonl", one_step + [{"question": "Broken row"}])
    config = scratch / "round.yaml"
    config.write_text(f"""
engine: {{model: default}}
sources: [{{path: {pool}, preset: plain, name: easy}}]
eval_sets: [{{name: gsm8k-test, path: data/sets/gsm8k/test.jsonl, preset: gsm8k}}]
generate: {{sampling: {{n: 4, max_tokens: 120, seed: 0}}}}
stages: [generate, verify, filter]
""")
    assert main(["round", "--run", "e2e", "--config", str(config)]) == 0
    printed = capsys.readouterr().out
    assert "run e2e, round 0: 8 problems, 32 rollouts" in printed
    assert "missing_field 1" in printed

    store = lake()
    verdicts = store.read("e2e", "verdicts")["verdict"].to_pylist()
    assert len(verdicts) == 32
    # the small model follows the answer format and solves some one-step problems (fixed seeds)
    assert verdicts.count("no_answer") < 16
    assert verdicts.count("correct") >= 1
    stats = store.read("e2e", "problem_stats")
    assert sum(stats["correct"].to_pylist()) == verdicts.count("correct")
    assert (store.run_dir("e2e") / "config.yaml").exists()

    assert main(["stage", "filter", "--run", "e2e", "--round", "0"]) == 0  # the saved config is reused
    assert "skipped" in capsys.readouterr().out
    assert main(["sql", "--run", "e2e", "--csv", "SELECT count(*) AS n FROM rollouts"]) == 0
    assert capsys.readouterr().out.split() == ["n", "32"]
    assert main(["status", "--run", "e2e"]) == 0
    assert "completed" in capsys.readouterr().out
    assert main(["stage", "verify", "--run", "nosuchrun", "--round", "0"]) == 2
    assert capsys.readouterr().err.startswith("error: run 'nosuchrun' does not exist")

    # the round as a dataset: each table a config, read back with its rows; the card names the model that
    # generated the rollouts and the stage versions they came from
    import datasets
    from huggingface_hub import DatasetCard

    tables = ["problems", "quarantine", "rollouts", "verdicts", "problem_stats"]
    assert main(["export", "--run", "e2e", *[a for t in tables for a in ("--table", t)], "--table", "grpo",
                 "--to", str(scratch / "export"), "--format", "parquet"]) == 0
    for table in tables:
        assert datasets.load_dataset(str(scratch / "export"), table, split="train").num_rows == store.read("e2e", table).num_rows
    card = DatasetCard((scratch / "export" / "README.md").read_text())
    model_id = store.read("e2e", "rollouts")["model_id"][0].as_py()
    generate = store.manifest("e2e", 0, "generate")
    assert f"| 0 | generate | {generate.version} | {generate.commit} |" in card.text and model_id in card.text
    assert generate.config_hash and generate.config_hash in card.text and "gsm8k-test" in card.text
