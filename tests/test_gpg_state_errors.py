"""A damaged ``gpg_state_rank{R}.pt`` in a checkpoint: resuming fails with an error that names the
file and what it holds, not torch's unpickling advice (``weights_only=False`` would be wrong here: the
file is ours and damaged, not from an untrusted older format). The message is the contract: the path
of the file, "GPG state", and no "weights_only".
"""

from __future__ import annotations

import datetime

import pytest
import torch
from conftest import tiny_trainer_kwargs


def _trainer(out_dir, **overrides):
    from grouprl_trl import GPGConfig, GPGTrainer
    from grouprl_trl.tiny import build_tiny_model, build_tokenizer, build_toy_dataset, toy_reward

    tok = build_tokenizer()
    args = GPGConfig(**tiny_trainer_kwargs(out_dir, **overrides))
    return GPGTrainer(model=build_tiny_model(tok), reward_funcs=toy_reward, args=args,
                      train_dataset=build_toy_dataset(num_rows=64), processing_class=tok)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    _trainer(out, max_steps=1, save_strategy="steps", save_steps=1).train()
    return out / "checkpoint-1"


@pytest.mark.parametrize("damage", ["truncated", "foreign_object", "not_a_gpg_state"])
def test_damaged_gpg_state_names_the_file(checkpoint, tmp_path, damage):
    import shutil

    ckpt = tmp_path / "checkpoint-1"
    shutil.copytree(checkpoint, ckpt)
    state_file = ckpt / "gpg_state_rank0.pt"
    if damage == "truncated":
        state_file.write_bytes(state_file.read_bytes()[:40])
    elif damage == "foreign_object":  # a pickle torch's weights_only loader refuses (and would advise weights_only=False for)
        torch.save({"carry": datetime.date(2020, 1, 1), "resample_epoch": 0, "resample_consumed": 0}, state_file)
    else:  # loads fine, but is not what GPG saves
        torch.save({"step": 3}, state_file)
    trainer = _trainer(tmp_path / "resumed", max_steps=2, save_strategy="steps", save_steps=1)
    with pytest.raises(Exception) as info:  # the type is the trainer's choice; the message is the contract
        trainer.train(resume_from_checkpoint=str(ckpt))
    message = str(info.value)
    assert str(state_file) in message, message
    assert "GPG state" in message, message
    assert "weights_only" not in message, message
