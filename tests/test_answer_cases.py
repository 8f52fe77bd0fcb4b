"""The adversarial cases of tests/answer_cases.py through every scorer that uses grouprl_core.answers:
the training rewards (accuracy_reward, cosine, verl's compute_score), the eval scorer
(grouprl.evaluate.score_completion), COPO's extractor on both backends, and lighteval's own verdicts
(the recorded fixture, and a live lighteval where one is installed)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from answer_cases import CASES

from grouprl.evaluate import score_completion
from grouprl.rewards import accuracy_reward, compute_score, cosine_reward
from grouprl_core import answers
from grouprl_trl.copo import COPOConfig, resolve_answer_extractor

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "lighteval_verdicts.json"
IDS = [c["name"] for c in CASES]

#: Where our eval verdict differs from lighteval's on purpose: a word is compared as text.
DEVIATIONS = {"anagram_of_text_gold": "lighteval parses the bare word 'even' as e*v*e*n and accepts the anagram"}


def _example(case: dict) -> dict:
    """The prepared record the eval harness holds for the case (grouprl.data's columns)."""
    return {"problem": "p", "solution": case["answer"], "reference_solution": case.get("solution", "")}


def _text(case: dict) -> str:
    c = case["completion"]
    return c[-1]["content"] if isinstance(c, list) else c


def test_there_are_enough_cases_and_each_has_a_reason():
    assert len(CASES) >= 60
    assert len(set(IDS)) == len(IDS)
    for case in CASES:
        assert case["train"] in (0, 1) and case["eval"] in (0, 1) and case["why"].strip()
        assert case["bench"] in answers.LIGHTEVAL_GOLD


# ----------------------------------------------------------------------------- training rewards
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_training_reward(case):
    assert accuracy_reward([case["completion"]], [case["answer"]]) == [float(case["train"])], case["why"]
    # the cosine reward uses the same verdict: for a correct answer it is >= 0.5, for a wrong one <= 0
    cos = cosine_reward([case["completion"]], [case["answer"]])[0]
    assert (cos >= 0.5) if case["train"] else (cos <= 0.0)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_verl_compute_score(case):
    got = compute_score("knoveleng/open-rs", _text(case), case["answer"])
    assert got == {"score": float(case["train"]), "acc": float(case["train"]), "pred": case["extracted"] or ""}


# ----------------------------------------------------------------------------- COPO on both backends
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_copo_extractor(case):
    trl_default = resolve_answer_extractor(COPOConfig.__dataclass_fields__["answer_extractor"].default)
    assert trl_default(case["completion"]) == case["extracted"]


def test_trl_and_verl_copo_group_by_the_same_answers():
    # TRL's COPO groups by its default answer_extractor; verl's COPO by the `pred` compute_score
    # returns (algorithm.grouprl.copo.answer_key: pred). Same completions -> same strings ("" = none).
    trl_default = resolve_answer_extractor(COPOConfig.__dataclass_fields__["answer_extractor"].default)
    trl = [trl_default(c["completion"]) or "" for c in CASES]
    verl = [compute_score("math_dapo", _text(c), c["answer"])["pred"] for c in CASES]
    assert trl == verl
    assert len({a for a in trl if a}) > 40  # distinct, non-trivial answers, not everything ""


# ----------------------------------------------------------------------------- eval scorer
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_eval_scorer(case):
    correct, pred = score_completion(_text(case), _example(case), case["bench"])
    assert int(correct) == case["eval"], case["why"]


def _fixture() -> dict:
    return json.loads(FIXTURE.read_text(encoding="utf-8"))


def test_fixture_says_where_its_verdicts_come_from():
    fixture = _fixture()
    assert fixture["header"].startswith(f"Verdicts computed by lighteval {fixture['versions']['lighteval']}")
    assert "scripts/lighteval_verdicts.py" in fixture["header"]


def _case_key(case: dict) -> str:
    """The fixture script's hash of a case (loaded from the file: scripts/ is no package)."""
    spec = importlib.util.spec_from_file_location("lighteval_verdicts", ROOT / "scripts" / "lighteval_verdicts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.case_key(case)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_eval_scorer_agrees_with_recorded_lighteval(case):
    recorded = _fixture()["cases"].get(case["name"])
    assert recorded is not None and recorded["key"] == _case_key(case), (
        "the lighteval fixture is stale for this case; rerun scripts/lighteval_verdicts.py")
    # the gold our harness hands the scorer is the one open-rs's task gives lighteval
    assert answers.lighteval_gold(case["bench"], case["answer"], case.get("solution")) == (
        recorded["target"], recorded["gold"])
    ours = int(score_completion(_text(case), _example(case), case["bench"])[0])
    if case["name"] in DEVIATIONS:
        assert (recorded["verdict"], ours) == (1, 0), DEVIATIONS[case["name"]]
    else:
        assert ours == recorded["verdict"], f"lighteval extracted {recorded['extracted']}"


def _lighteval_python() -> str | None:
    """An interpreter with lighteval: GROUPRL_LIGHTEVAL_PYTHON, ./.venv-lighteval, or this one."""
    candidates = [os.environ.get("GROUPRL_LIGHTEVAL_PYTHON"), str(ROOT / ".venv-lighteval" / "bin" / "python"),
                  sys.executable]
    for python in filter(None, candidates):
        if Path(python).exists() and subprocess.run([python, "-c", "import lighteval"], capture_output=True).returncode == 0:
            return python
    return None


@pytest.mark.lighteval  # its own tier (GROUPRL_TIERS=lighteval bash scripts/test.sh); CI checks the recorded fixture
def test_eval_scorer_agrees_with_live_lighteval():
    python = _lighteval_python()
    if python is None:
        pytest.fail("lighteval is not installed: run GROUPRL_TIERS=lighteval bash scripts/test.sh (builds "
                    ".venv-lighteval) or set GROUPRL_LIGHTEVAL_PYTHON to an interpreter with lighteval==0.13.0")
    out = subprocess.run([python, str(ROOT / "scripts" / "lighteval_verdicts.py"), "--out", "-"],
                         capture_output=True, text=True, check=True).stdout
    live = json.loads(out)["cases"]
    by_name = {c["name"]: c for c in CASES}
    mismatches = {}
    for name, rec in live.items():
        ours = int(score_completion(_text(by_name[name]), _example(by_name[name]), by_name[name]["bench"])[0])
        if ours != rec["verdict"]:
            mismatches[name] = (ours, rec["verdict"])
    assert set(mismatches) == set(DEVIATIONS), mismatches


# ----------------------------------------------------------------------------- the issue's table
ISSUE_TABLE = {  # case name -> (training verdict, eval verdict); before this change: all but the last scored 0, the last 1
    "box_then_bare_word_boxed": (1, 1),
    "answer_tag_echoed_in_think_then_box": (1, 1),
    "bold_answer_line": (1, 1),
    "two_boxes_joined_by_and": (1, 1),
    "final_answer_is_without_box": (1, 1),
    "anagram_of_text_gold": (0, 0),
}


@pytest.mark.parametrize("name", list(ISSUE_TABLE))
def test_issue_table_rows(name):
    case = next(c for c in CASES if c["name"] == name)
    train = accuracy_reward([case["completion"]], [case["answer"]])[0]
    evald = score_completion(_text(case), _example(case), case["bench"])[0]
    assert (train, float(evald)) == tuple(float(v) for v in ISSUE_TABLE[name])


# ----------------------------------------------------------------------------- rules in isolation
@pytest.mark.parametrize("text, expected", [
    ("\\boxed{3}, no: \\boxed{4}", "{3}, no: \\boxed{4}"),  # other words between: only the last box stays
    ("\\boxed{2} and \\boxed{3}", "\\boxed{2} and \\boxed{3}"),  # one answer in two boxes
    ("$\\boxed{2}$, $\\boxed{3}$", "$\\boxed{2}$, $\\boxed{3}$"),
    ("\\boxed{1} x \\boxed{2} or \\boxed{3}", "{1} x \\boxed{2} or \\boxed{3}"),
    ("\\boxed{1} then \\fbox{2}", "{1} then \\boxed{2}"),  # the box pattern needs a \boxed to reach it
    ("\\fbox{2}", "\\fbox{2}"),
    ("no box", "no box"),
])
def test_isolate_last_box(text, expected):
    assert answers.isolate_last_box(text) == expected


@pytest.mark.parametrize("gold, is_text", [
    ("even", True), ("\\text{Monday}", True), ("$\\text{no solution}$", True), ("xy", True),
    ("x", False), ("3", False), ("\\frac{1}{2}", False), ("2x", False), ("\\pi", False), ("(C)", False),
])
def test_is_text_answer(gold, is_text):
    assert answers.is_text_answer(gold) is is_text


def test_unknown_mode_and_benchmark_are_clear_errors():
    with pytest.raises(ValueError, match="answer mode"):
        answers.extract("\\boxed{1}", "qwen")
    with pytest.raises(ValueError, match="gold target"):
        answers.parse_gold("1", answers.EVAL, "string")
    with pytest.raises(ValueError, match="no lighteval gold rule"):
        answers.lighteval_gold("gsm8k", "1")
