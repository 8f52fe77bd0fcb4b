"""grouprl eval scores as open-rs's lighteval set-up does, and says so in its results file."""

import json
from pathlib import Path

import pytest

from grouprl import evaluate
from grouprl_core import answers

FIXTURES = Path(__file__).parent / "fixtures"


def _run(tmp_path, *args):
    out = tmp_path / "out"
    assert evaluate.main([*args, "--data-dir", str(FIXTURES), "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    return json.loads((out / "results.json").read_text()), (out / "results.md").read_text(), rows


def test_lighteval_fallbacks_count_and_the_results_file_names_the_scoring(tmp_path):
    # aime24 (3 problems) and amc23 (2): sample 0 says "the final answer is: $x$." without a box,
    # sample 1 ends on the bare number. lighteval scores both 1, so pass@1 is 100 % (the training
    # reward, which needs a box or $...$ after an anchor, would give 50 %).
    result, table, rows = _run(tmp_path, "--model", "m", "--benchmarks", "aime24,amc23", "--n", "2",
                               "--generator", "fake_generators:unboxed_final_answer")
    assert [r["pass@1"] for r in result["benchmarks"].values()] == [100.0, 100.0]
    assert all(r["correct"] for r in rows) and len(rows) == 10
    assert rows[0]["pred"] == rows[0]["gold"] == "204" and rows[1]["pred"] == "204"
    assert result["scoring"] == answers.EVAL_DESCRIPTION
    assert "lighteval-open-rs" in result["scoring"] and "precision 5" in result["scoring"]
    assert f"Scoring: {answers.EVAL_DESCRIPTION}." in table
    assert result["template"] == "lighteval-math"  # the benchmarks' default, no longer null


def test_template_given_is_recorded(tmp_path):
    result, _, _ = _run(tmp_path, "--model", "m", "--benchmarks", "aime24", "--template", "plain",
                        "--generator", "fake_generators:always_right")
    assert result["template"] == "plain"


@pytest.mark.parametrize("benchmark, example, completion, correct", [
    # MATH-500 / Minerva: the gold is the worked solution's box, as lighteval takes line["solution"]
    ("math500", {"solution": "\\frac{1}{2}", "reference_solution": "So $x = \\boxed{\\frac{1}{2}}$."}, "\\boxed{0.5}", True),
    ("minerva", {"solution": "100", "reference_solution": ""}, "$\\boxed{100}$ parsecs", True),
    # OlympiadBench: our prepared answer lost its $...$; it is parsed as LaTeX again
    ("olympiadbench", {"solution": "\\frac{\\sqrt{3}}{2}"}, "\\boxed{\\frac{\\sqrt{3}}{2}}", True),
    ("olympiadbench", {"solution": "\\frac{\\sqrt{3}}{2}"}, "\\boxed{0.86603}", False),  # decimal vs irrational
    # AIME / AMC: the gold is a number (ExprExtractionConfig); AMC-23's 27.0
    ("amc23", {"solution": 27.0}, "The final answer is $27$", True),
    ("aime24", {"solution": "033"}, "\\boxed{33}", True),
])
def test_gold_per_benchmark(benchmark, example, completion, correct):
    assert evaluate.score_completion(completion, example, benchmark)[0] is correct
