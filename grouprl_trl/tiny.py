"""The embedded default: a tiny causal LM, a tokenizer built locally, and a verifiable toy task.

``python -m grouprl_trl.tiny --save DIR`` writes the tiny model and its tokenizer to a folder (a model
path for verl, ``grouprl eval`` or ``from_pretrained``). Nothing here downloads anything. The tokenizer is character level over a small alphabet
(digits, lowercase letters, space and colon); every other character maps to ``<unk>``, so any
prompt text (e.g. a guidance instruction) can still be tokenised.

Toy task ("digit map"): the prompt is ``"q37:"`` (``num_digits`` digits) and the correct
answer is the digit ``(7 * (sum of the digits) + 3) mod 10`` (a function the model must learn
from scratch; with one digit it is a fixed permutation). The reward is 1.0 when the first character of the completion is that digit. A
fresh model answers at chance (about 1 / 42 of the vocabulary), so with 8 rollouts most
groups start all-wrong: exactly the case GCPO-gold targets. Each row carries the reference
``solution`` (the digit) for the algorithms that use one.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import torch

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]
ALPHABET = list("0123456789: abcdefghijklmnopqrstuvwxyz")


def build_tokenizer():
    """A character-level ``PreTrainedTokenizerFast`` made in memory (42 tokens incl. specials)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + ALPHABET)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        padding_side="left",
    )
    # A minimal chat template, so conversational prompts also work with the tiny model.
    fast.chat_template = (
        "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}{% endif %}"
    )
    return fast


def build_tiny_model(tokenizer=None, *, num_layers: int = 2, hidden_size: int = 64, seed: int = 0):
    """A randomly initialised ``Qwen2ForCausalLM`` sized for CPU tests (about 80k parameters)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = tokenizer or build_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def save_tiny_model(path: str | Path, **kwargs) -> Path:
    """Write the tiny model and tokenizer to ``path`` so they load like a hub checkpoint."""
    path = Path(path)
    tokenizer = build_tokenizer()
    model = build_tiny_model(tokenizer, **kwargs)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# ----------------------------------------------------------------------------- toy task
def toy_answer(digits: str) -> str:
    """The correct answer for the prompt digits: ``(7 * digit_sum + 3) mod 10``."""
    return str((7 * sum(int(d) for d in digits) + 3) % 10)


def build_toy_dataset(num_rows: int = 200, seed: int = 0, num_digits: int = 1):
    """``datasets.Dataset`` with columns ``prompt`` (str) and ``solution`` (the correct digit)."""
    from datasets import Dataset

    rng = random.Random(seed)
    rows = []
    for _ in range(num_rows):
        digits = "".join(str(rng.randrange(10)) for _ in range(num_digits))
        rows.append({"prompt": f"q{digits}:", "solution": toy_answer(digits)})
    return Dataset.from_list(rows)


def _completion_text(completion) -> str:
    if isinstance(completion, list):  # conversational: [{"role": "assistant", "content": ...}]
        return completion[-1]["content"] if completion else ""
    return completion


def toy_extract_answer(completion) -> str:
    """The toy task's final answer: the first character of the completion ('' if empty)."""
    text = _completion_text(completion).lstrip()
    return text[:1]


def toy_reward(completions, solution, **kwargs) -> list[float]:
    """1.0 if the completion's first character is the reference digit, else 0.0."""
    return [float(toy_extract_answer(c) == str(s)) for c, s in zip(completions, solution, strict=True)]


def toy_gold_completion(solution: str) -> str:
    """How a reference solution is written as a completion for the toy task."""
    return str(solution)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m grouprl_trl.tiny",
                                     description="Save the embedded tiny model and its tokenizer to a folder.")
    parser.add_argument("--save", required=True, metavar="DIR", help="output folder (created)")
    args = parser.parse_args(argv)
    print(f"wrote the tiny model and tokenizer to {save_tiny_model(args.save)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
