"""``grouprl data``: turn the training and evaluation sets of the papers into TRL and verl inputs.

Usage::

    grouprl data list
    grouprl data prepare NAME --out DIR [--source PATH_OR_HUB_ID] [--limit N]
                          [--format trl|verl|both] [--template NAME] [--no-dedup]

(also ``python -m grouprl.data ...``). Without ``--source`` the hub dataset in :data:`SOURCES` is
loaded with ``datasets.load_dataset``; ``--source`` takes another hub id, a local ``.jsonl`` /
``.json`` / ``.parquet`` file (one split: ``train`` for training sets, ``test`` for benchmarks) or a
directory holding ``train.*`` / ``test.*`` files. Local files must have the hub dataset's columns.
``--source sample`` reads the few rows of each dataset shipped with grouprl (``grouprl/sample_data``,
in the hub datasets' columns): enough to try ``data prepare``, ``train`` and ``eval`` offline.

Output in ``DIR``:

* TRL (``--format trl``): a ``datasets.DatasetDict`` written with ``save_to_disk`` (split ``train``,
  plus ``test`` where the source has one; benchmarks have only ``test``); read it back with
  :func:`load_prepared`. Columns:

  - ``prompt``: conversational ``[{"role", "content"}, ...]`` built with the template of the run
    that used the set (see :data:`TEMPLATES`);
  - ``solution`` and ``answer``: the reference final answer (what :mod:`grouprl.rewards` compares
    against; TRL passes the ``solution`` column to ``accuracy_reward``/``cosine_reward``);
  - ``reference_solution``: the full worked solution where the source has one, else "";
  - ``problem``, ``source``, ``index``.

  **GCPO-gold** needs a reference to inject: use ``reference_column: reference_solution`` for
  open-rs, open-s1, MATH-lighteval, math500, minerva and aime24 (full solutions); DAPO-Math-17k,
  amc23 and olympiadbench have answers only, so there use ``reference_column: solution``.
* verl (``--format verl``): ``DIR/train.parquet`` (and ``DIR/test.parquet``) in verl's RL schema:
  ``data_source``, ``prompt`` (messages), ``ability`` = "math",
  ``reward_model = {"style": "rule", "ground_truth": answer}``,
  ``extra_info = {"split", "index", "problem", "answer", "reference_solution"}``. Score it with
  ``custom_reward_function.path=<grouprl>/rewards.py``, ``name=compute_score``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from grouprl.rewards import last_boxed_content

PREPARE_RECORD = "grouprl_prepare.json"  # written into every prepared folder: dataset name and template

# ----------------------------------------------------------------------------- prompt templates
#: open-rs ``recipes/grpo.yaml`` / GPG ``recipes/gpg.yaml`` system prompt, verbatim (the doubled
#: braces are in the YAML value and reach the model as written: open-r1 does not ``format`` it).
OPEN_RS_SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with the "
    "answer, and put your final answer within \\boxed{{}} . The reasoning process and answer are enclosed "
    "within <think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning process here "
    "</think> <answer> answer here </answer>. Note that respond by English, NOT use other languages."
)

#: open-r1 ``recipes/Qwen2.5-Math-7B/grpo/config_simple_rl.yaml`` system prompt (MATH-lighteval runs).
OPEN_R1_SYSTEM_PROMPT = (
    "You are a helpful AI Assistant, designed to provided well-reasoned and detailed responses. You FIRST "
    "think about the reasoning process as an internal monologue and then provide the user with the answer. "
    "The reasoning process MUST BE enclosed within <think> and </think> tags."
)

#: The user-message template of open-r1/open-rs's lighteval maths tasks (from simple-evals).
LIGHTEVAL_MATH_TEMPLATE = (
    "Solve the following math problem efficiently and clearly.  The last line of your response should be of "
    "the following format: 'Therefore, the final answer is: $\\boxed{{ANSWER}}$. I hope it is correct' "
    "(without quotes) where ANSWER is just the final number or expression that solves the problem. Think "
    "step by step before answering.\n\n{problem}"
)

#: Qwen2.5-Math evaluation harness, ``prompt_type qwen25-math-cot`` (system message).
QWEN_MATH_COT_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."

#: GCPO-guidance's official format instruction (jacklishufan/gcpo ``examples/format_prompt/``
#: ``math_format_perception*.jinja``): the user message is the question, a blank line, then this sentence.
GCPO_GUIDANCE_FORMAT = (
    "You first think through the reasoning process as an internal monologue, enclosed within <think> </think> "
    "tags. Then, provide your final answer enclosed within \\boxed{}."
)


def _system_and_user(system: str) -> Callable[[str], list[dict]]:
    return lambda problem: [{"role": "system", "content": system}, {"role": "user", "content": problem}]


#: Prompt templates: name -> (problem -> messages). ``source`` keeps the source's own prompt.
TEMPLATES: dict[str, Callable[[str], list[dict]] | None] = {
    "open-rs": _system_and_user(OPEN_RS_SYSTEM_PROMPT),
    "open-r1": _system_and_user(OPEN_R1_SYSTEM_PROMPT),
    "lighteval-math": lambda problem: [{"role": "user", "content": LIGHTEVAL_MATH_TEMPLATE.format(problem=problem)}],
    "qwen-math-cot": _system_and_user(QWEN_MATH_COT_SYSTEM_PROMPT),
    "gcpo-guidance": lambda problem: [{"role": "user", "content": f"{problem.strip()}\n\n{GCPO_GUIDANCE_FORMAT}"}],
    "plain": lambda problem: [{"role": "user", "content": problem}],
    "source": None,
}


# ----------------------------------------------------------------------------- row converters
def _column(row: dict, column: str, name: str) -> Any:
    if column not in row:
        raise KeyError(
            f"{name}: a row has no column {column!r} (it has {sorted(row)}); --source data must use the "
            f"columns of the hub dataset {SOURCES[name].hub_id}"
        )
    return row[column]


def _answer_text(value: Any) -> str:
    """References come as strings, numbers (AMC-23: ``27.0``) or lists (OlympiadBench)."""
    if isinstance(value, (list, tuple)):
        value = ", ".join(_answer_text(v) for v in value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    if len(text) >= 2 and text.startswith("$") and text.endswith("$"):
        text = text.strip("$").strip()
    return text


def _problem_answer_solution(name: str):
    """Rows with ``problem``, ``answer`` and a full ``solution`` (open-rs, open-s1, aime24, math500)."""

    def convert(row: dict) -> dict:
        return {
            "problem": _column(row, "problem", name),
            "answer": _answer_text(_column(row, "answer", name)),
            "reference_solution": row.get("solution") or "",
        }

    return convert


def _answer_from_boxed_solution(name: str):
    """Rows whose answer is the last ``\\boxed{}`` of ``solution`` (MATH-lighteval, Minerva)."""

    def convert(row: dict) -> dict:
        solution = _column(row, "solution", name)
        answer = row.get("answer")
        if answer in (None, ""):
            answer = last_boxed_content(solution)
        return {
            "problem": _column(row, "problem", name),
            "answer": _answer_text(answer) if answer is not None else "",
            "reference_solution": solution,
        }

    return convert


def _amc23(row: dict) -> dict:
    return {"problem": _column(row, "problem", "amc23"), "answer": _answer_text(_column(row, "answer", "amc23")),
            "reference_solution": ""}


def _olympiadbench(row: dict) -> dict:
    problem = row.get("question", row.get("problem"))
    if problem is None:
        _column(row, "question", "olympiadbench")
    answer = row.get("answer", row.get("final_answer"))
    if answer is None:
        _column(row, "answer", "olympiadbench")
    solution = row.get("solution") or ""
    if isinstance(solution, (list, tuple)):
        solution = "\n\n".join(solution)
    return {"problem": problem, "answer": _answer_text(answer), "reference_solution": solution}


_DAPO_PROBLEM = re.compile(
    r"where \$Answer is the answer to the problem\.\s*(.*?)\s*Remember to put your answer on its own line",
    re.DOTALL,
)


def _dapo(row: dict) -> dict:
    messages = _column(row, "prompt", "dapo-math-17k")
    reward_model = _column(row, "reward_model", "dapo-math-17k")
    content = messages[-1]["content"]
    match = _DAPO_PROBLEM.search(content)
    return {
        "problem": match.group(1) if match else content,
        "answer": _answer_text(reward_model["ground_truth"]),
        "reference_solution": "",
        "prompt": [{"role": m["role"], "content": m["content"]} for m in messages],
    }


@dataclass(frozen=True)
class Source:
    """One dataset the papers use: where it lives and how its rows become prepared records."""

    name: str
    hub_id: str
    splits: dict[str, str]  # our split name -> the hub split
    template: str  # default prompt template (a key of TEMPLATES)
    convert: Callable[[dict], dict]
    data_source: str  # verl ``data_source`` (kept compatible with verl's defaults where one exists)
    is_benchmark: bool = False
    dedup: bool = False  # drop rows whose prompt repeats an earlier one
    hub_config: str | None = None
    note: str = ""


SOURCES: dict[str, Source] = {
    s.name: s
    for s in [
        Source("open-rs", "knoveleng/open-rs", {"train": "train"}, "open-rs",
               _problem_answer_solution("open-rs"), "knoveleng/open-rs",
               note="7k problems (open-rs / GPG-RS3); system prompt of open-rs recipes/grpo.yaml"),
        Source("open-s1", "knoveleng/open-s1", {"train": "train"}, "open-rs",
               _problem_answer_solution("open-s1"), "knoveleng/open-s1",
               note="18.6k problems (GPG-RS1, open-rs recipes/gpg.yaml)"),
        Source("math-lighteval", "DigitalLearningGmbH/MATH-lighteval", {"train": "train", "test": "test"}, "open-r1",
               _answer_from_boxed_solution("math-lighteval"), "DigitalLearningGmbH/MATH-lighteval",
               hub_config="default", note="MATH 7.5k/5k (GPG ablations, open-r1 config_simple_rl.yaml)"),
        Source("dapo-math-17k", "BytedTsinghua-SIA/DAPO-Math-17k", {"train": "train"}, "source", _dapo,
               "math_dapo", dedup=True,
               note="COPO / GPG-verl; prompt kept as in the source ('Answer:' line); duplicates dropped"),
        Source("aime24", "HuggingFaceH4/aime_2024", {"test": "train"}, "lighteval-math",
               _problem_answer_solution("aime24"), "aime24", is_benchmark=True, note="30 problems"),
        Source("math500", "HuggingFaceH4/MATH-500", {"test": "test"}, "lighteval-math",
               _problem_answer_solution("math500"), "HuggingFaceH4/MATH-500", is_benchmark=True,
               note="500 problems"),
        Source("amc23", "knoveleng/AMC-23", {"test": "train"}, "lighteval-math", _amc23, "amc23",
               is_benchmark=True, note="40 problems"),
        Source("minerva", "knoveleng/Minerva-Math", {"test": "train"}, "lighteval-math",
               _answer_from_boxed_solution("minerva"), "minerva", is_benchmark=True, note="272 problems"),
        Source("olympiadbench", "knoveleng/OlympiadBench", {"test": "train"}, "lighteval-math", _olympiadbench,
               "olympiadbench", is_benchmark=True, note="675 problems (English, open-ended maths)"),
    ]
}

_ALIASES = {"math_lighteval": "math-lighteval", "dapo": "dapo-math-17k", "dapo_math_17k": "dapo-math-17k",
            "math_500": "math500", "minerva_math": "minerva", "aime_2024": "aime24", "open_rs": "open-rs",
            "open_s1": "open-s1"}


def get_source(name: str) -> Source:
    """Look up a dataset by name (case-insensitive; a few common aliases accepted)."""
    key = name.lower()
    key = _ALIASES.get(key, key)
    if key not in SOURCES:
        raise SystemExit(f"unknown dataset {name!r}; known: {', '.join(SOURCES)} (see `grouprl data list`)")
    return SOURCES[key]


# ----------------------------------------------------------------------------- loading
_LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")
SAMPLE = "sample"  # --source value: the rows shipped in SAMPLE_DIR
SAMPLE_DIR = Path(__file__).resolve().parent / "sample_data"


def sample_path(name: str) -> Path:
    """The shipped sample of dataset ``name``: ``NAME.jsonl`` or a ``NAME/`` folder of split files."""
    for path in (SAMPLE_DIR / name, SAMPLE_DIR / f"{name}.jsonl"):
        if path.exists():
            return path
    raise SystemExit(f"--source sample: no sample of {name!r} in {SAMPLE_DIR}")


def _read_local_file(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _read_source_rows(source: Source, location: str | None) -> dict[str, list[dict]]:
    """Raw rows per split, from the hub (default or ``location`` as a hub id) or local files."""
    if location == SAMPLE:
        location = str(sample_path(source.name))
    path = Path(location) if location else None
    if path is not None and path.is_file():
        if path.suffix not in _LOCAL_SUFFIXES:
            raise SystemExit(f"--source {path}: expected a {'/'.join(_LOCAL_SUFFIXES)} file")
        split = "test" if source.is_benchmark else "train"
        return {split: _read_local_file(path)}
    if path is not None and path.is_dir():
        rows = {}
        for split in source.splits:
            for suffix in _LOCAL_SUFFIXES:
                if (path / f"{split}{suffix}").is_file():
                    rows[split] = _read_local_file(path / f"{split}{suffix}")
                    break
        if not rows:
            raise SystemExit(f"--source {path}: no {'/'.join(s + '.*' for s in source.splits)} file in this folder")
        return rows
    if path is not None and (location.startswith((".", "/")) or location.endswith(_LOCAL_SUFFIXES)):
        raise SystemExit(f"--source {location}: no such file or folder")

    from datasets import load_dataset

    hub_id = location or source.hub_id
    rows = {}
    for split, hub_split in source.splits.items():
        print(f"[grouprl data] loading {hub_id} split {hub_split!r} from the hub", file=sys.stderr)
        rows[split] = load_dataset(hub_id, source.hub_config, split=hub_split).to_list()
    return rows


def build_records(source: Source, rows: list[dict], split: str, template: str | None = None,
                  dedup: bool | None = None, limit: int | None = None) -> list[dict]:
    """Convert raw rows of ``source`` into prepared records (see the module docstring for columns).

    Rows without a usable answer are dropped and counted on stderr (a MATH solution with no box,
    say); ``limit`` keeps the first ``limit`` records after de-duplication.
    """
    from tqdm.auto import tqdm

    template = template or source.template
    if template not in TEMPLATES:
        raise SystemExit(f"unknown --template {template!r}; known: {', '.join(TEMPLATES)}")
    make_prompt = TEMPLATES[template]
    dedup = source.dedup if dedup is None else dedup
    records, seen, dropped, duplicates = [], set(), 0, 0
    for row in tqdm(rows, desc=f"{source.name}/{split}", unit="row", file=sys.stderr, leave=False):
        rec = source.convert(row)
        if not rec["answer"]:
            dropped += 1
            continue
        if make_prompt is None and "prompt" not in rec:
            raise SystemExit(f"--template source: {source.name} rows carry no prompt; pick another template")
        prompt = rec.pop("prompt", None) if make_prompt is None else make_prompt(rec["problem"])
        rec.pop("prompt", None)
        key = json.dumps(prompt, sort_keys=True)
        if dedup and key in seen:
            duplicates += 1
            continue
        seen.add(key)
        records.append({"prompt": prompt, "problem": rec["problem"], "solution": rec["answer"],
                        "answer": rec["answer"], "reference_solution": rec["reference_solution"],
                        "source": source.name, "index": len(records)})
        if limit is not None and len(records) >= limit:
            break
    if dropped:
        print(f"[grouprl data] {source.name}/{split}: dropped {dropped} rows without a reference answer",
              file=sys.stderr)
    if duplicates:
        print(f"[grouprl data] {source.name}/{split}: dropped {duplicates} duplicate prompts", file=sys.stderr)
    return records


def load_examples(name: str, source: str | None = None, limit: int | None = None, template: str | None = None,
                  dedup: bool | None = None) -> dict[str, list[dict]]:
    """Prepared records per split for dataset ``name`` (hub, or ``source`` hub id / local path)."""
    spec = get_source(name)
    raw = _read_source_rows(spec, source)
    return {split: build_records(spec, rows, split, template, dedup, limit) for split, rows in raw.items()}


def load_prepared(path: str | Path, split: str = "train"):
    """Load one split of a TRL dataset written by ``grouprl data prepare``."""
    from datasets import load_from_disk

    data = load_from_disk(str(path))
    if split not in data:
        raise SystemExit(f"{path}: no split {split!r} (it has {list(data)})")
    return data[split]


# ----------------------------------------------------------------------------- writers
def verl_rows(source: Source, records: list[dict], split: str) -> list[dict]:
    """Records in verl's RL parquet schema (``data_source``, ``prompt``, ``ability``, ``reward_model``,
    ``extra_info``)."""
    return [
        {
            "data_source": source.data_source,
            "prompt": rec["prompt"],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": rec["answer"]},
            "extra_info": {"split": split, "index": rec["index"], "problem": rec["problem"],
                           "answer": rec["answer"], "reference_solution": rec["reference_solution"]},
        }
        for rec in records
    ]


def write_trl(records: dict[str, list[dict]], out: Path) -> None:
    from datasets import Dataset, DatasetDict

    DatasetDict({split: Dataset.from_list(recs) for split, recs in records.items()}).save_to_disk(str(out))


def write_verl(source: Source, records: dict[str, list[dict]], out: Path) -> list[Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for split, recs in records.items():
        path = out / f"{split}.parquet"
        pq.write_table(pa.Table.from_pylist(verl_rows(source, recs, split)), path)
        paths.append(path)
    return paths


def prepare(name: str, out: str | Path, source: str | None = None, limit: int | None = None,
            fmt: str = "both", template: str | None = None, dedup: bool | None = None) -> dict[str, int]:
    """Prepare dataset ``name`` into ``out``; returns the number of rows per split."""
    if fmt not in ("trl", "verl", "both"):
        raise SystemExit(f"--format must be trl, verl or both, got {fmt!r}")
    if limit is not None and limit <= 0:
        raise SystemExit(f"--limit must be positive, got {limit}")
    spec = get_source(name)
    records = load_examples(spec.name, source, limit, template, dedup)
    out = Path(out)
    if fmt in ("trl", "both"):
        write_trl(records, out)  # first: save_to_disk owns the folder's dataset files
        print(f"[grouprl data] wrote TRL dataset {out} ({', '.join(f'{k}: {len(v)}' for k, v in records.items())})",
              file=sys.stderr)
    if fmt in ("verl", "both"):
        for path in write_verl(spec, records, out):
            print(f"[grouprl data] wrote verl parquet {path}", file=sys.stderr)
    # what the prompts were built with, read back by `grouprl eval` for its results record
    (out / PREPARE_RECORD).write_text(json.dumps({"name": spec.name, "template": template or spec.template}) + "\n")
    return {split: len(recs) for split, recs in records.items()}


# ----------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grouprl data", description="Prepare the papers' datasets for TRL and verl.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="show the known datasets")
    prep = sub.add_parser("prepare", help="download/convert one dataset")
    prep.add_argument("name", help="dataset name (see `grouprl data list`)")
    prep.add_argument("--out", required=True, help="output folder")
    prep.add_argument("--source", help="hub id, local .jsonl/.json/.parquet file or folder, or 'sample' (the few "
                                       "rows shipped with grouprl, offline) (default: the dataset's hub id)")
    prep.add_argument("--limit", type=int, help="keep the first N rows of each split")
    prep.add_argument("--format", dest="fmt", default="both", choices=["trl", "verl", "both"],
                      help="trl: a datasets save_to_disk folder; verl: train/test parquet; both (default: %(default)s)")
    prep.add_argument("--template", choices=sorted(TEMPLATES), help="prompt template (default: the paper's)")
    prep.add_argument("--no-dedup", dest="dedup", action="store_false", default=None,
                      help="keep repeated prompts (DAPO-Math-17k is de-duplicated by default)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "list":
        print(f"{'name':<16}{'hub id':<38}{'splits':<13}{'template':<16}notes")
        for s in SOURCES.values():
            print(f"{s.name:<16}{s.hub_id:<38}{','.join(s.splits):<13}{s.template:<16}{s.note}")
        return 0
    counts = prepare(args.name, args.out, args.source, args.limit, args.fmt, args.template, args.dedup)
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
