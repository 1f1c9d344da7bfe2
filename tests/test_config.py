"""The round config as a user writes it: a misspelt key is refused in one line that names the file,
the key and the closest valid one; keys written before the finetune methods had sections of their own
still read as they did."""
from __future__ import annotations

import pytest

from evoforge.flows.config import ConfigError, RoundConfig, load_config

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("text, line", [
    ("generate: {samplng: {n: 2}}\n", "generate.samplng: unknown key; did you mean 'sampling'?"),
    ("finetun: {max_steps: 2}\n", "finetun: unknown key; did you mean 'finetune'?"),
    ("finetune: {grpo: {generatons: 8}}\n", "finetune.grpo.generatons: unknown key; did you mean 'generations'?"),
    ("sources:\n  - {path: a.jsonl, presett: gsm8k}\n", "sources.0.presett: unknown key; did you mean 'preset'?"),
    ("engine: {launch: {replica: 2}}\n", "engine.launch.replica: unknown key; did you mean 'replicas'?"),
    ("verify: {zzz: 1}\n", "verify.zzz: unknown key (valid: workers, deadline_seconds,"),
])
def test_a_misspelt_key_is_one_line_naming_the_file_the_key_and_the_closest_valid_one(scratch, text, line):
    path = scratch / "round.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as refused:
        load_config(path)
    message = str(refused.value)
    assert message.startswith(f"config {path}: {line}") and "\n" not in message


def test_every_section_of_the_round_config_refuses_keys_it_does_not_declare():
    """Walked from RoundConfig: every nested settings class forbids extras, so no section can be added
    later that silently drops a typo."""
    import typing

    from pydantic import BaseModel

    seen, waiting = set(), [RoundConfig]
    while waiting:
        model = waiting.pop()
        if model in seen:
            continue
        seen.add(model)
        assert model.model_config.get("extra") == "forbid", model.__name__
        for field in model.model_fields.values():
            stack = [field.annotation]
            while stack:
                kind = stack.pop()
                if isinstance(kind, type) and issubclass(kind, BaseModel):
                    waiting.append(kind)
                stack.extend(typing.get_args(kind))
    assert len(seen) > 20  # the sections and what they nest (sampling, lora, guard, svs, ...)


def test_keys_from_before_the_method_sections_read_as_their_new_place(scratch, caplog, monkeypatch):
    from evoforge.tasks.finetune import config as finetune_config

    monkeypatch.setattr(finetune_config, "_said", set())  # said once per process: maybe already, by another test
    path = scratch / "old.yaml"
    path.write_text("critic: {replay_size: 7, critic_share: 0.25, tau_critic: 0.5}\n"
                    "finetune: {method: grpo, dpo_beta: 0.3, grpo_generations: 8, grpo_problems: all}\n")
    with caplog.at_level("WARNING", logger="evoforge"):
        config = load_config(path)
    said = [r.getMessage() for r in caplog.records]
    assert "config: finetune.grpo_generations is finetune.grpo.generations now; read as that" in said
    assert "config: critic.replay_size is finetune.raro.replay_size now; read as that" in said
    assert (config.finetune.dpo.beta, config.finetune.grpo.generations, config.finetune.grpo.problems) == (0.3, 8, "all")
    assert (config.finetune.raro.replay_size, config.finetune.raro.critic_share, config.critic.tau_critic) == (7, 0.25, 0.5)
    # saved again, the config has only the new keys, and loads to the same settings
    again = scratch / "again.yaml"
    from evoforge.flows.config import save_config

    save_config(config, again)
    assert "grpo_generations" not in again.read_text() and load_config(again) == config
