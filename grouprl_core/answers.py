"""Final answers of maths completions: extraction and comparison, in the modes of the papers' pipelines.

One module for the training rewards (:mod:`grouprl.rewards`), the evaluation harness
(:mod:`grouprl.evaluate`) and COPO's answer grouping on both backends (TRL's default
``answer_extractor`` and the ``pred`` that ``grouprl.rewards.compute_score`` hands to verl), so that
the answer a completion is rewarded for, scored on and grouped by is one string.

Pure Python; math-verify (and latex2sympy2_extended, which it installs) is imported lazily.

Modes
-----
:data:`TRAIN` (``"open-r1"``): the training reward of open-r1 and open-rs
    (``accuracy_reward`` / ``get_cosine_scaled_reward`` in huggingface/open-r1 and
    knoveleng/open-rs ``src/open_r1/rewards.py``). The whole completion is parsed with math-verify,
    one LaTeX target: ``boxed_match_priority=0`` (a box is tried first), no unanchored matches
    (``try_extract_without_anchor=False``), normalisation without ``nits`` and
    ``malformed_operators``, ``extraction_mode="first_match"``. So the answer is the last box; else
    ``final answer is $x$``; else ``answer: ... $x$`` with ``$`` maths. The reference is parsed
    with the default LaTeX target, a bare answer (``"18"``) wrapped in ``\\boxed{}`` first (our
    datasets hold bare answers where open-rs passed worked solutions).
    Our one addition: where that finds nothing, the content of the last ``Answer: X`` line
    (DAPO-Math-17k's instruction, used by the COPO / verl recipes) or of the last
    ``<answer>X</answer>`` block (the open-rs system prompt) is parsed as if boxed. open-r1
    scores those completions 0; nothing open-r1 scores changes.

:data:`EVAL` (``"lighteval"``): open-rs's evaluation (knoveleng/open-rs ``src/open_r1/evaluate.py``,
    lighteval's ``multilingual_extractive_match_metric``, lighteval ``metrics/dynamic_metrics.py``):
    prediction targets ``(ExprExtractionConfig(), LatexExtractionConfig(boxed_match_priority=0))``,
    ``fallback_mode="first_match"``, ``extraction_mode="any_match"``, precision 5
    (``verify(..., float_rounding=5)``), any extracted gold against any extracted prediction.
    Gold targets per benchmark (:data:`LIGHTEVAL_GOLD`): ``LatexExtractionConfig()`` (lighteval's
    default ``boxed_match_priority`` 55) on the worked solution for MATH-500 and Minerva and on the
    answer for OlympiadBench; ``ExprExtractionConfig()`` on the answer for AIME24 and AMC23. A gold
    nothing can be extracted from is compared as a plain string, as lighteval does. So a
    completion with no box still scores through ``final answer is $x$``, ``answer: x``, a last
    ``$...$`` or, at the lowest priority, its last number (typically a completion cut at the token
    limit), and several boxes joined by "and" / "," form a set. The whole completion is scored,
    reasoning included: open-rs's pinned lighteval (commit ed08481) had no reasoning-tag removal
    (lighteval 0.13's CLI strips ``<think>...</think>`` by default).

Both modes: text answers are compared as text. math-verify parses a bare word as a product of
one-letter symbols, so ``\\boxed{neve}`` "equals" ``even``. When the reference is a word
(:func:`is_text_answer`), a match also needs the extracted answer to spell it (case, spaces and
``\\text{}`` ignored). This only turns matches into non-matches; it is the one place where
:data:`EVAL` can differ from lighteval (an anagram of a bare-word gold).

Timeouts: math-verify bounds parsing and comparison with ``signal.alarm``, which works only on the
main thread and would cancel a timer someone else armed; :func:`timeout_seconds` turns it off in
those cases (verl calls the reward from worker threads), where the cost stays bounded by the
size of one completion.
"""

from __future__ import annotations

import logging
import re
import signal
import threading
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

logger = logging.getLogger(__name__)

#: The training reward's mode (open-r1 / open-rs ``accuracy_reward``).
TRAIN = "open-r1"
#: The evaluation mode (open-rs's lighteval set-up).
EVAL = "lighteval"
MODES = (TRAIN, EVAL)

#: Decimal places numbers are rounded to before comparison in :data:`EVAL` (open-rs ``precision=5``).
EVAL_PRECISION = 5

#: Seconds math-verify may spend on one parse or one comparison (math-verify's and lighteval's default).
MATH_VERIFY_TIMEOUT_S = 5

#: open-rs's lighteval tasks: the gold extraction target and which field holds the gold
#: ("solution": the worked solution; "answer": the final answer).
LIGHTEVAL_GOLD = {
    "math500": ("latex", "solution"),
    "minerva": ("latex", "solution"),
    "olympiadbench": ("latex", "answer"),
    "aime24": ("expr", "answer"),
    "amc23": ("expr", "answer"),
}

#: How :data:`EVAL` is described in result files.
EVAL_DESCRIPTION = (
    "lighteval-open-rs (math-verify extraction: Expr + LaTeX boxed-first, fallback first_match; "
    f"gold per benchmark; precision {EVAL_PRECISION}; text answers compared as text)"
)


# ----------------------------------------------------------------------------- text helpers
def completion_text(completion: Any) -> str:
    """The text of a completion: a plain string, or TRL's conversational ``[{role, content}, ...]``
    (the content of the last message; a content given as a list of ``{"type": "text"}`` parts is
    joined)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    if isinstance(completion, list):
        if not completion:
            return ""
        content = completion[-1].get("content", "")
        if isinstance(content, list):
            return "".join(part.get("text", "") for part in content if isinstance(part, dict))
        return content or ""
    raise TypeError(
        f"completion must be a string or a list of {{'role', 'content'}} messages, got {type(completion).__name__}"
    )


def _format_number(value: Any) -> str:
    """References arrive as strings, ints or floats (AMC-23 stores ``27.0``)."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def strip_math_delimiters(s: str) -> str:
    """``$x$``, ``$$x$$``, ``\\(x\\)``, ``\\[x\\]`` -> ``x`` (one outer pair)."""
    s = s.strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if s.startswith(left) and s.endswith(right) and len(s) >= len(left) + len(right):
            return s[len(left) : len(s) - len(right)].strip()
    return s


_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")


def _plain_text(s: str) -> str:
    """``\\text{Even}.`` -> ``Even``: wrappers, delimiters, spaces and a final period removed.

    Case is kept: lighteval's comparison (math-verify 0.5.2) tells ``Even`` from ``even``.
    """
    s = strip_math_delimiters(s)
    s = _TEXT_WRAPPER.sub(r"\1", s)
    return re.sub(r"\s+", "", s).rstrip(".")


def is_text_answer(gold: Any) -> bool:
    """True when the reference is a word (or words), e.g. ``even``, ``\\text{Monday}``, ``no solution``.

    Two letters or more, nothing else: a reference such as ``xy`` is then matched only as written.
    """
    s = strip_math_delimiters(_format_number(gold))
    s = _TEXT_WRAPPER.sub(r"\1", s).strip().rstrip(".")
    return bool(re.fullmatch(r"[A-Za-z]{2,}(?:[ \-][A-Za-z]+)*", s))


# ----------------------------------------------------------------------------- math-verify configs
def timeout_seconds() -> int | None:
    """math-verify's timeout where a SIGALRM may be used (main thread, no timer armed), else None."""
    if threading.current_thread() is not threading.main_thread():
        return None
    if signal.getitimer(signal.ITIMER_REAL)[0] > 0:  # someone else's alarm is running: leave it
        return None
    return MATH_VERIFY_TIMEOUT_S


@lru_cache(maxsize=None)
def _configs() -> dict:
    """Extraction targets of each mode (math-verify imported on first use)."""
    from latex2sympy2_extended import NormalizationConfig
    from math_verify import ExprExtractionConfig, LatexExtractionConfig

    # open-r1 / open-rs accuracy_reward: "we require the answer to be provided in correct latex"
    train_norm = NormalizationConfig(basic_latex=True, units=True, malformed_operators=False, nits=False, boxed="all")
    # lighteval's LatexExtractionConfig default normalisation (its equations=True is a no-op
    # warning in latex2sympy2_extended >= 1.10, where the parser handles equations)
    eval_norm = NormalizationConfig(basic_latex=True, units=True, malformed_operators=True, nits=True, boxed="all")
    return {
        "train_pred": [LatexExtractionConfig(normalization_config=train_norm, boxed_match_priority=0,
                                             try_extract_without_anchor=False)],
        "train_gold": [LatexExtractionConfig()],
        "eval_pred": [LatexExtractionConfig(normalization_config=eval_norm, boxed_match_priority=0),
                      ExprExtractionConfig()],
        "eval_gold_latex": [LatexExtractionConfig(normalization_config=eval_norm, boxed_match_priority=55)],
        "eval_gold_expr": [ExprExtractionConfig()],
    }


def _parse(text: str, config: str, extraction_mode: str) -> list:
    from math_verify import parse

    return parse(isolate_last_box(text), extraction_config=_configs()[config], fallback_mode="first_match",
                 extraction_mode=extraction_mode, parsing_timeout=timeout_seconds())


# ----------------------------------------------------------------------------- extraction
@dataclass(frozen=True)
class Extraction:
    """What a mode extracted from a completion.

    ``parsed``: math-verify's parse (sympy values, then the matched string); ``answer``: that
    matched string (normalised LaTeX), or None when nothing was found or what was found parses to
    no value. ``answer`` is what COPO groups by and what ``compute_score`` returns as ``pred``.
    """

    parsed: tuple
    answer: str | None


_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_ANSWER_LINE = re.compile(r"^[ \t]*(?:\*\*)?Answer(?:\*\*)?[ \t]*:[ \t]*(?:\*\*[ \t]*)?(.+?)[ \t]*$", re.MULTILINE)


def _tagged_answer(text: str) -> str | None:
    """The last ``Answer: X`` line or ``<answer>X</answer>`` block, whichever ends later."""
    found = [(m.end(), m.group(1)) for m in _ANSWER_LINE.finditer(text)]
    found += [(m.end(), m.group(1)) for m in _ANSWER_TAG.finditer(text)]
    if not found:
        return None
    answer = strip_math_delimiters(max(found)[1].strip()).strip()
    return answer or None


_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
# what may stand between two boxes of one answer: "and", "or" or a comma, with spaces and maths delimiters
_BOX_SEPARATOR = re.compile(r"(?:\s|\$|\\[()\[\]])*(?:and|or|,)(?:\s|\$|\\[()\[\]])*")


def _box_spans(text: str) -> list[tuple[int, int]]:
    """``(command start, closing brace)`` of every complete ``\\boxed{..}`` / ``\\fbox{..}``, braces balanced."""
    spans = []
    for m in _BOX_COMMAND.finditer(text):
        i = m.end()
        while i < len(text) and text[i].isspace():
            i += 1
        if i >= len(text) or text[i] != "{":
            continue
        depth = 0
        for j in range(i, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                spans.append((m.start(), j))
                break
    return spans


def isolate_last_box(text: str) -> str:
    """Keep only the final group of boxes as boxes: the last box, plus the boxes before it that are
    joined to it by nothing but "and", "or" or a comma; earlier ``\\boxed`` / ``\\fbox`` commands are
    dropped (their braces and contents stay).

    This is latex2sympy2_extended 1.0.6's ``boxed="last"`` rule, which the pipelines we mirror ran
    (open-rs pins math-verify 0.5.2, which uses it; lighteval 0.13 still does). Later
    latex2sympy2_extended versions also join boxes less than 10 characters apart or separated by
    other words ("\\boxed{3}, no: \\boxed{4}" gives {3, 4}); applying the rule here, before
    math-verify sees the text, gives the same answer on every version.
    """
    spans = _box_spans(text)
    if len(spans) < 2:
        return text
    first = len(spans) - 1
    while first > 0 and _BOX_SEPARATOR.fullmatch(text[spans[first - 1][1] + 1 : spans[first][0]]):
        first -= 1
    cut = spans[first][0]
    head, tail = text[:cut], text[cut:]
    if not tail.startswith("\\boxed") and "\\boxed" in head:
        # math-verify's box pattern starts at a \boxed; the older rule would reach an \fbox group from an
        # earlier \boxed, so the group keeps one
        tail = "\\boxed" + tail[len("\\fbox"):]
    return _BOX_COMMAND.sub("", head) + tail


def _matched_text(parsed) -> str | None:
    """The string math-verify matched (its ``first_match`` fallback), whether or not it parsed."""
    text = next((p for p in parsed if isinstance(p, str)), None)
    return text.strip() or None if text is not None else None


def _matched_string(parsed: list) -> str | None:
    """The matched string, when math-verify also parsed a value from it (a box cut off at the token
    limit leaves a match that parses to nothing: no answer)."""
    return _matched_text(parsed) if any(not isinstance(p, str) for p in parsed) else None


def extract(completion: Any, mode: str = TRAIN) -> Extraction:
    """Extract the final answer of ``completion`` (a string or TRL messages) the way ``mode`` does."""
    text = completion_text(completion)
    if mode == TRAIN:
        parsed = _parse(text, "train_pred", "first_match")
        if not parsed:
            tagged = _tagged_answer(text)
            if tagged is not None:
                parsed = _parse("\\boxed{" + tagged + "}", "train_pred", "first_match")
    elif mode == EVAL:
        parsed = _parse(text, "eval_pred", "any_match")
    else:
        raise ValueError(f"answer mode must be one of {MODES}, got {mode!r}")
    return Extraction(tuple(parsed), _matched_string(parsed))


def final_answer(completion: Any) -> str | None:
    """The training-mode answer string of a completion, None if it gives none.

    COPO's default answer extractor on TRL; verl's COPO reads the same string as the ``pred``
    that :func:`grouprl.rewards.compute_score` returns. Raw strings (not canonicalised values),
    as the official COPO code compares them.
    """
    return extract(completion, TRAIN).answer


# ----------------------------------------------------------------------------- references
def parse_gold(gold: Any, mode: str = TRAIN, target: str = "latex") -> list:
    """Parse a reference for ``mode``.

    :data:`TRAIN`: a reference containing ``\\boxed`` (a worked solution) is parsed as it is, a bare
    answer is wrapped in ``\\boxed{}``; returns [] when unparseable. :data:`EVAL`: ``target``
    ``"latex"`` or ``"expr"`` (see :data:`LIGHTEVAL_GOLD`); the raw string when nothing is
    extracted (lighteval's fallback).
    """
    gold = _format_number(gold)
    if mode == TRAIN:
        if "\\boxed" not in gold:
            gold = "\\boxed{" + strip_math_delimiters(gold) + "}"
        return _parse(gold, "train_gold", "first_match")
    if mode == EVAL:
        if target not in ("latex", "expr"):
            raise ValueError(f"gold target must be 'latex' or 'expr', got {target!r}")
        return _parse(gold, f"eval_gold_{target}", "any_match") or [gold]
    raise ValueError(f"answer mode must be one of {MODES}, got {mode!r}")


def lighteval_gold(benchmark: str, answer: Any, solution: str | None = None) -> tuple[str, str]:
    """``(target, gold text)`` lighteval is given for one problem of ``benchmark`` (open-rs's tasks).

    MATH-500 and Minerva use the worked ``solution`` (the answer, boxed, when there is none);
    OlympiadBench the answer as the dataset writes it, in ``$...$`` (our prepared data stores it
    without the dollars, so they are put back); AIME24 and AMC23 the bare answer.
    """
    if benchmark not in LIGHTEVAL_GOLD:
        raise ValueError(f"no lighteval gold rule for benchmark {benchmark!r}; known: {', '.join(LIGHTEVAL_GOLD)}")
    target, field = LIGHTEVAL_GOLD[benchmark]
    answer = _format_number(answer)
    if field == "solution" and solution:
        return target, solution
    if target == "latex" and not any(d in answer for d in ("$", "\\(", "\\[", "\\boxed")):
        answer = f"${answer}$" if field == "answer" else f"$\\boxed{{{answer}}}$"
    return target, answer


# ----------------------------------------------------------------------------- comparison
def matches(gold: Any, extraction: Extraction, mode: str = TRAIN, target: str = "latex") -> bool:
    """True when the extracted answer equals the reference ``gold`` (a string, number or a list of
    accepted ones) under ``mode``; ``target`` is :data:`EVAL`'s gold extraction target."""
    if isinstance(gold, (list, tuple)):
        return any(matches(g, extraction, mode, target) for g in gold)
    if not extraction.parsed:
        return False
    from math_verify import verify

    gold_parsed = parse_gold(gold, mode, target)
    pred_text = _matched_text(extraction.parsed)
    if not gold_parsed:  # TRAIN only (EVAL falls back to the raw string itself): compare as strings
        logger.warning("math-verify cannot parse the reference %r; comparing as strings", gold)
        return pred_text is not None and _plain_text(pred_text) == _plain_text(_format_number(gold))
    rounding = EVAL_PRECISION if mode == EVAL else 6  # 6: math-verify's default, as open-r1 calls it
    ok = any(not _decimal_vs_irrational(g, p) and verify(g, p, float_rounding=rounding, timeout_seconds=timeout_seconds())
             for g in gold_parsed for p in extraction.parsed)
    gold_text = _matched_text(gold_parsed) or _format_number(gold)
    if ok and is_text_answer(gold_text):  # a word: the answer must spell it (never turns a 0 into a 1)
        ok = pred_text is not None and _plain_text(pred_text) == _plain_text(gold_text)
    return ok


def _decimal_vs_irrational(a: Any, b: Any) -> bool:
    """True for a decimal against an exact irrational constant (``1.5708`` vs ``\\frac{\\pi}{2}``).

    math-verify 0.5.2 (pinned by open-rs; lighteval 0.13 keeps its rule) rounds only when both
    sides evaluate to plain numbers, so such a pair never matched in those pipelines; newer
    math-verify rounds the constant too and would accept it.
    """
    from sympy import Basic, Float, Number

    def is_decimal(x: Any) -> bool:
        return isinstance(x, Float) or (isinstance(x, Basic) and x.is_Mul and any(isinstance(f, Float) for f in x.args)
                                        and all(isinstance(f, Number) for f in x.args))

    def is_irrational_constant(x: Any) -> bool:
        if not isinstance(x, Basic) or isinstance(x, Number) or x.free_symbols or not x.is_number:
            return False
        try:
            return not isinstance(x.doit(), Number)
        except Exception:  # an expression sympy cannot evaluate is left to math-verify
            return False

    return (is_decimal(a) and is_irrational_constant(b)) or (is_decimal(b) and is_irrational_constant(a))


def score(completion: Any, gold: Any, mode: str = TRAIN, target: str = "latex") -> tuple[bool, str | None]:
    """``(correct, extracted answer)`` for one completion."""
    extraction = extract(completion, mode)
    return matches(gold, extraction, mode, target), extraction.answer
