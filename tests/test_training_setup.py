"""What a user sets before training starts: trainer_args, the accelerate recipes, the GPU recipe, LoRA and the
tracker settings. All of it is checked before any work, with one line that names the problem."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from evoforge.data.home import PROJECT_ROOT
from evoforge.flows.config import ConfigError, load_config


def _load(tmp: Path, finetune: dict):
    path = tmp / "round.yaml"
    path.write_text(yaml.safe_dump({"finetune": finetune}))
    return load_config(path)


@pytest.mark.unit
@pytest.mark.parametrize("trainer_args, message", [
    ({"lr_schedular_type": "cosine"}, "finetune.trainer_args.lr_schedular_type: not a field of SFTConfig; closest: lr_scheduler_type"),
    ({"max_steps": 5}, "finetune.trainer_args.max_steps: evoforge sets it; set it with finetune.max_steps"),
    ({"output_dir": "/elsewhere"}, "finetune.trainer_args.output_dir: evoforge sets it; set it with evoforge (the checkpoint's staging folder)"),
    ({"warmup_steps": "lots"}, "finetune.trainer_args.warmup_steps: 'lots' does not fit float"),
    ({"lr_scheduler_type": "cosinus"}, "finetune.trainer_args: SFTConfig refuses them: cosinus is not a valid SchedulerType"),
])
def test_bad_trainer_args_fail_at_load_with_one_line_and_nothing_written(scratch, trainer_args, message):
    with pytest.raises(ConfigError) as caught:
        _load(scratch, {"method": "sft", "trainer_args": trainer_args})
    text = str(caught.value)
    assert message in text and "\n" not in text and text.startswith(f"config {scratch / 'round.yaml'}: finetune:")
    assert [p.name for p in scratch.iterdir()] == ["round.yaml"]  # the config file alone: nothing written


@pytest.mark.unit
def test_trainer_args_reach_the_methods_of_a_chain_that_have_them(scratch):
    from evoforge.tasks.finetune import dpo, grpo, sft

    config = _load(scratch, {"method": "sft+grpo", "generation": "hf", "batch_size": 4, "grpo": {"generations": 4}, "trainer_args": {
        "lr_scheduler_type": "cosine", "warmup_steps": 0.1, "gradient_checkpointing": True, "epsilon_high": 0.28}}).finetune
    sft_args, grpo_args = sft.arguments(config, scratch / "a", "ck"), grpo.arguments(config, scratch / "b", "ck")
    assert sft_args.lr_scheduler_type == grpo_args.lr_scheduler_type == "cosine"
    assert sft_args.warmup_steps == 0.1 and sft_args.gradient_checkpointing and sft_args.run_name == "ck"
    assert grpo_args.epsilon_high == 0.28 and not hasattr(sft_args, "epsilon_high")  # a GRPO field goes to GRPO alone
    assert sft_args.report_to == ["tensorboard"] and sft_args.max_steps == config.max_steps
    # a field no method of the chain has is refused, even if another method knows it
    with pytest.raises(ConfigError, match="epsilon_high: not a field of DPOConfig, SFTConfig"):
        _load(scratch, {"method": "sft+dpo", "trainer_args": {"epsilon_high": 0.28}})
    assert dpo.arguments(_load(scratch, {"method": "dpo", "report_to": []}).finetune, scratch / "c").report_to == []


@pytest.mark.unit
def test_every_shipped_accelerate_recipe_is_a_valid_accelerate_config():
    from accelerate.commands.config.config_args import load_config_from_file

    from evoforge.tasks.finetune.launch import recipe_path

    expected = {"ddp": "MULTI_GPU", "fsdp": "FSDP", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED"}
    for name, kind in expected.items():
        path = recipe_path(name)
        config = load_config_from_file(str(path))
        assert config.distributed_type.value == kind, name
        text = path.read_text()
        assert text.startswith("#") and "GPU" in text and "For:" in text  # says which GPUs and model sizes it is for
    assert config.deepspeed_config["zero_stage"] == 3
    with pytest.raises(ValueError, match="neither a shipped recipe .*ddp, fsdp, zero2, zero3"):
        recipe_path("zero4")


@pytest.mark.unit
def test_the_gpu_recipe_loads_and_trains_a_1_5b_model_on_8_gpus_with_zero3_vllm_colocate_and_a_tracker():
    config = load_config(PROJECT_ROOT / "deploy" / "configs" / "gpu-1.5b.yaml")
    finetune = config.finetune
    assert finetune.processes == 8 and finetune.accelerate_config == "zero3"
    assert finetune.generation == "vllm" and finetune.vllm_mode == "colocate" and finetune.report_to == ["tensorboard"]
    assert finetune.trainer_args["bf16"] and finetune.trainer_args["gradient_checkpointing"]
    assert "1.5B" in config.engine.model and (PROJECT_ROOT / "deploy" / "accelerate" / "zero3.yaml").exists()
    text = (PROJECT_ROOT / "deploy" / "configs" / "gpu-1.5b.yaml").read_text()
    assert "Memory per GPU" in text and "GB of 80" in text


@pytest.mark.unit
def test_lora_settings_and_generation_modes_are_checked(scratch):
    config = _load(scratch, {"lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}}).finetune
    assert config.lora.merge is True and config.lora.dropout == 0.05  # merged into full weights by default
    with pytest.raises(ConfigError, match="finetune.lora.r: Input should be greater than or equal to 1"):
        _load(scratch, {"lora": {"r": 0}})
    with pytest.raises(ConfigError, match="vllm_mode server needs vllm_server_url"):
        _load(scratch, {"generation": "vllm", "vllm_mode": "server"})
    assert _load(scratch, {}).finetune.generation == "vllm"  # vLLM is installed here: GRPO samples through it
    assert _load(scratch, {}).finetune.processes == 1
