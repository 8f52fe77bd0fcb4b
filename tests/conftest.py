import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

# Modules that run grouprl's TRL trainers (or TRL's parser on their configs). They get the `trl`
# marker, so CI runs exactly them on every supported TRL version: `pytest -m trl`.
TRL_FACING = {
    "test_cli.py",
    "test_copo_trainer.py",
    "test_core_gold.py",
    "test_demo.py",
    "test_distributed_gold.py",
    "test_distributed_gpg.py",
    "test_distributed_trainers.py",
    "test_gcpo_trainer.py",
    "test_gpg_fidelity.py",
    "test_gpg_trainer.py",
    "test_guidance.py",
    "test_guidance_trainer.py",
    "test_parity_trl_verl.py",
    "test_recipes.py",
    "test_reliability.py",
    "test_reliability_gold.py",
    "test_shared_defaults.py",
    "test_trl_adapter.py",
    "test_trl_contract.py",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        verl_recipe = item.path.name == "test_recipes.py" and "verl" in item.name  # Hydra/verl, not TRL
        if item.path.name in TRL_FACING and not verl_recipe:
            item.add_marker(pytest.mark.trl)


def tiny_trainer_kwargs(tmp_path, **overrides):
    """Config fields every CPU trainer test shares (tiny batches, no bf16, no checkpointing)."""
    kwargs = dict(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to="none",
        bf16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=3,
        learning_rate=1e-3,
        max_steps=2,
        logging_steps=1,
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
    )
    kwargs.update(overrides)
    return kwargs


@pytest.fixture
def tiny_parts():
    from grouprl_trl.tiny import build_tiny_model, build_tokenizer, build_toy_dataset

    tokenizer = build_tokenizer()
    return build_tiny_model(tokenizer), tokenizer, build_toy_dataset(num_rows=64)
