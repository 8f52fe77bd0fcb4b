"""Record lighteval's own verdicts on the cases of tests/answer_cases.py (the reference for grouprl's eval scorer).

Runs in an interpreter that has lighteval (it pins its own math-verify and transformers, so keep it
out of the grouprl environment)::

    python3 -m venv .venv-lighteval
    .venv-lighteval/bin/pip install torch==2.13.0
    .venv-lighteval/bin/pip install lighteval==0.13.0
    .venv-lighteval/bin/python scripts/lighteval_verdicts.py            # rewrites the fixture
    .venv-lighteval/bin/python scripts/lighteval_verdicts.py --out -    # prints it instead

It scores every case with lighteval's ``MultilingualExtractiveMatchMetric`` configured as open-rs's
``src/open_r1/evaluate.py`` configures it (``latex_gold_metric`` for MATH-500, Minerva and
OlympiadBench, ``expr_gold_metric`` for AIME24 and AMC23: precision 5, fallback ``first_match``,
prediction targets Expr + LaTeX boxed-first, aggregation max), on the raw completion (open-rs's
lighteval had no reasoning-tag removal). The gold is what open-rs's prompt functions pass: the
worked solution for MATH-500 / Minerva (``line["solution"]``), the answer otherwise
(``line["answer"]``; OlympiadBench writes it in ``$...$``). This script does not import grouprl.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.metadata
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "lighteval_verdicts.json"

# open-rs src/open_r1/evaluate.py: which metric each task uses and which row field is the gold
TASKS = {"math500": ("latex", "solution"), "minerva": ("latex", "solution"), "olympiadbench": ("latex", "answer"),
         "aime24": ("expr", "answer"), "amc23": ("expr", "answer")}


def load_cases() -> list[dict]:
    namespace: dict = {}
    exec((ROOT / "tests" / "answer_cases.py").read_text(encoding="utf-8"), namespace)
    return namespace["CASES"]


def case_key(case: dict) -> str:
    """A hash of what a verdict depends on, so that a changed case shows up as a stale fixture."""
    payload = json.dumps([case["completion"], case["answer"], case["bench"], case.get("solution")], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def completion_text(completion) -> str:
    return completion[-1]["content"] if isinstance(completion, list) else completion


def row_gold(case: dict) -> tuple[str, str]:
    """(metric kind, gold string) as the open-rs task would build it from the dataset row."""
    kind, field = TASKS[case["bench"]]
    answer = case["answer"]
    answer = str(int(answer)) if isinstance(answer, float) and answer.is_integer() else str(answer)
    if field == "solution":
        # MATH-500 / Minerva rows carry a worked solution with the boxed answer
        return kind, case.get("solution") or f"$\\boxed{{{answer}}}$"
    if kind == "latex" and "$" not in answer:
        return kind, f"${answer}$"  # OlympiadBench answers are written in $...$
    return kind, answer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(FIXTURE), help="fixture path, or - for stdout")
    args = parser.parse_args(argv)

    from lighteval.metrics.dynamic_metrics import MultilingualExtractiveMatchMetric
    from lighteval.metrics.utils.extractive_match_utils import ExprExtractionConfig, LatexExtractionConfig
    from lighteval.models.model_output import ModelResponse
    from lighteval.tasks.requests import Doc
    from lighteval.utils.language import Language

    def metric(kind: str) -> MultilingualExtractiveMatchMetric:
        gold_target = (LatexExtractionConfig(),) if kind == "latex" else (ExprExtractionConfig(),)
        return MultilingualExtractiveMatchMetric(
            language=Language.ENGLISH, fallback_mode="first_match", precision=5,
            gold_extraction_target=gold_target,
            pred_extraction_target=(ExprExtractionConfig(), LatexExtractionConfig(boxed_match_priority=0)),
            aggregation_function=max)

    metrics = {kind: metric(kind) for kind in ("latex", "expr")}
    verdicts = {}
    for case in load_cases():
        kind, gold = row_gold(case)
        doc = Doc(query="", choices=[gold], gold_index=0)
        verdict = metrics[kind].compute(doc=doc, model_response=ModelResponse(text=[completion_text(case["completion"])]))
        verdicts[case["name"]] = {"key": case_key(case), "target": kind, "gold": gold, "verdict": int(verdict),
                                  "extracted": (doc.specific or {}).get("extracted_predictions", [])}
        print(f"{int(verdict)}  {case['name']}", file=sys.stderr)

    versions = {name: importlib.metadata.version(name)
                for name in ("lighteval", "math-verify", "latex2sympy2_extended", "sympy")}
    fixture = {
        "header": (f"Verdicts computed by lighteval {versions['lighteval']} (math-verify {versions['math-verify']}, "
                   f"latex2sympy2_extended {versions['latex2sympy2_extended']}, sympy {versions['sympy']}) on "
                   f"{datetime.date.today().isoformat()}, by scripts/lighteval_verdicts.py from the cases in "
                   "tests/answer_cases.py, with open-rs's evaluate.py metric configuration. Regenerate with that "
                   "script; do not edit by hand."),
        "versions": versions,
        "cases": verdicts,
    }
    text = json.dumps(fixture, indent=1, ensure_ascii=False) + "\n"
    if args.out == "-":
        sys.stdout.write(text)
    else:
        Path(args.out).write_text(text, encoding="utf-8")
        print(f"wrote {args.out} ({len(verdicts)} cases)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
