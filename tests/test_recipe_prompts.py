"""The prompt fields of TRL recipes (``prompt_template``, ``raw_prompt``) and the verl recipes' prepare
commands: GCPO-guidance's official format prompt, GPG-7B's raw SimpleRL-Zoo prompts without a chat
template. Expected texts are written out here from the official files (docs/recipes.md: GC 34, GCW 3,
GPGPY make_conversation_math35)."""

from __future__ import annotations

import pytest
from datasets import Dataset

from grouprl import recipes
from grouprl.train_trl import RecipeArguments, prepare_dataset
from grouprl_trl.tiny import build_tokenizer

FORMAT = ("You first think through the reasoning process as an internal monologue, enclosed within <think> </think> "
          "tags. Then, provide your final answer enclosed within \\boxed{}.")


def _args(**kw) -> RecipeArguments:
    return RecipeArguments(trainer="grouprl_trl.GPGTrainer", reward_funcs=[], dataset_path="x", **kw)


def _data(prompts, problems=None) -> Dataset:
    problems = problems or [f"p{i}" for i in range(len(prompts))]
    return Dataset.from_list([{"prompt": p, "problem": q, "solution": "1"} for p, q in zip(prompts, problems)])


def test_gcpo_guidance_template_is_the_question_then_the_official_format_sentence():
    data = _data([[{"role": "system", "content": "sys"}, {"role": "user", "content": "old"}]], ["  What is 2+3?\n"])
    out = prepare_dataset(data, _args(prompt_template="gcpo-guidance"), build_tokenizer())
    assert out[0]["prompt"] == [{"role": "user", "content": "What is 2+3?\n\n" + FORMAT}]
    # the negative context built from it: the note follows the format sentence once
    from grouprl_core.guidance import build_negative_prompt

    negative = build_negative_prompt(out[0]["prompt"])
    note = "\n\nNote: Intentionally generate an incorrect answer."
    assert negative[-1]["content"] == "What is 2+3?\n\n" + FORMAT + note


def test_raw_prompt_passes_the_user_text_without_a_chat_template():
    tok = build_tokenizer()
    text = "<|im_start|>user\nq12: add the digits<|im_end|>\n<|im_start|>assistant\n"
    out = prepare_dataset(_data([[{"role": "user", "content": text}]]), _args(raw_prompt=True), tok)
    assert out[0]["prompt"] == text  # a plain string: TRL applies no chat template to it
    # the length filter counts the raw text's tokens (as the official loader does)
    short = prepare_dataset(_data([[{"role": "user", "content": "q1:"}], [{"role": "user", "content": "q" * 50}]]),
                            _args(raw_prompt=True, max_prompt_length=len(tok("q1:")["input_ids"])), tok)
    assert short["prompt"] == ["q1:"]


@pytest.mark.parametrize(
    "kwargs, prompt, match",
    [
        ({"raw_prompt": True}, [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
         r"one user message per prompt; a prompt has roles \['system', 'user'\]"),
        ({"raw_prompt": True, "system_prompt": "s"}, [{"role": "user", "content": "u"}], "set system_prompt: null"),
        ({"prompt_template": "nope"}, [{"role": "user", "content": "u"}], "prompt_template='nope' is not one of"),
        ({"prompt_template": "source"}, [{"role": "user", "content": "u"}], "prompt_template='source' is not one of"),
    ],
)
def test_bad_prompt_fields_are_errors_naming_the_field(kwargs, prompt, match):
    with pytest.raises(ValueError, match=match):
        prepare_dataset(_data([prompt]), _args(**kwargs), build_tokenizer())


def test_the_reproduction_recipes_select_the_official_prompts():
    simplerl = recipes.resolve("gpg_7b_simplerl")
    assert simplerl["raw_prompt"] is True and simplerl["system_prompt"] is None
    for name in ("guidance_1p5b", "guidance_math7b"):
        recipe = recipes.resolve(name)
        assert recipe["prompt_template"] == "gcpo-guidance" and recipe["system_prompt"] is None
    verl = recipes.resolve("guidance_math7b_verl")
    assert verl["overrides"]["data.train_files"] == "data/dapo-math-17k-gcpo-guidance/train.parquet"


def test_verl_guidance_data_is_prepared_with_the_format_and_the_preflight_says_how(tmp_path, monkeypatch):
    from grouprl import cli
    from grouprl.preflight import verl_prepare_commands

    commands = verl_prepare_commands(recipes.resolve("guidance_math7b_verl"))
    assert commands["data/dapo-math-17k-gcpo-guidance"] == (
        "dapo-math-17k --template gcpo-guidance --out data/dapo-math-17k-gcpo-guidance")
    assert verl_prepare_commands(recipes.resolve("gpg_zero_math7b_verl"))["data/aime24"] == "aime24 --out data/aime24"
    # run the printed command on the shipped sample rows: the prompts carry the official format
    monkeypatch.chdir(tmp_path)
    args = commands["data/dapo-math-17k-gcpo-guidance"].split() + ["--format", "verl", "--source", "sample"]
    assert cli.main(["data", "prepare", *args]) == 0
    import pyarrow.parquet as pq

    rows = pq.read_table(tmp_path / "data/dapo-math-17k-gcpo-guidance/train.parquet").to_pylist()
    assert rows and all(len(r["prompt"]) == 1 and r["prompt"][0]["role"] == "user" for r in rows)
    assert all(r["prompt"][0]["content"] == r["extra_info"]["problem"].strip() + "\n\n" + FORMAT for r in rows)
