"""vLLM tier: ``grouprl eval --backend vllm`` for real on the tiny model (vLLM on CPU), next to the HF backend."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest

from grouprl import cli
from vllm_tier import HIDDEN, require_vllm

pytestmark = pytest.mark.vllm

FIXTURES = Path(__file__).parent / "fixtures"
BENCHMARKS = "math500,amc23,olympiadbench"  # the fixtures whose problems fit the tiny model's 512 positions


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    require_vllm()
    from grouprl_trl.tiny import save_tiny_model

    return str(save_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny128", hidden_size=HIDDEN))


def _eval(model_dir, out: Path, *args):
    assert cli.main(["eval", "--model", model_dir, "--benchmarks", BENCHMARKS, "--data-dir", str(FIXTURES),
                     "--template", "plain", "--max-new-tokens", "8", "--out", str(out), *args]) == 0
    result = json.loads((out / "results.json").read_text())
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    return result, rows


def _keys(obj):
    """The nested key structure of a results.json (values dropped)."""
    return {k: _keys(v) for k, v in obj.items()} if isinstance(obj, dict) else None


def test_vllm_backend_pass_at_1_over_n_samples(model_dir, tmp_path):
    n = 3
    result, rows = _eval(model_dir, tmp_path / "vllm", "--backend", "vllm", "--n", str(n), "--temperature", "1.0")
    hf_result, _ = _eval(model_dir, tmp_path / "hf", "--backend", "hf", "--n", str(n), "--temperature", "1.0")
    assert result["backend"] == "vllm" and hf_result["backend"] == "hf"
    assert _keys(result) == _keys(hf_result)  # the same results file, whichever backend
    assert (tmp_path / "vllm" / "results.md").read_text().startswith(f"Model: `{model_dir}` · backend vllm · n={n}")
    by_problem = defaultdict(list)
    for row in rows:
        by_problem[(row["benchmark"], row["index"])].append(row)
    for name, scores in result["benchmarks"].items():
        problems = [v for (b, _), v in by_problem.items() if b == name]
        assert scores["problems"] == len(problems) >= 2 and scores["n"] == n
        assert all(sorted(r["sample"] for r in v) == list(range(n)) for v in problems)
        # pass@1 = mean over problems of the fraction of the n samples that are correct
        expected = 100 * sum(sum(r["correct"] for r in v) / n for v in problems) / len(problems)
        assert scores["pass@1"] == pytest.approx(expected)
    # n real samples per problem, not one completion repeated
    assert any(len({r["completion"] for r in v}) > 1 for v in by_problem.values())
    assert sum(len(r["completion"]) for r in rows) > 0


def test_vllm_and_hf_backends_agree_on_greedy_decoding(model_dir, tmp_path):
    vllm_result, vllm_rows = _eval(model_dir, tmp_path / "vllm", "--backend", "vllm", "--temperature", "0")
    hf_result, hf_rows = _eval(model_dir, tmp_path / "hf", "--backend", "hf", "--temperature", "0")

    def table(rows):
        return {(r["benchmark"], r["index"]): (r["completion"], r["pred"], r["correct"]) for r in rows}

    vllm_table, hf_table = table(vllm_rows), table(hf_rows)
    assert len(vllm_table) == len(hf_table) == len(vllm_rows) >= 6
    assert vllm_table == hf_table
    assert any(c for c, _, _ in vllm_table.values())  # non-empty completions were compared
    for name in vllm_result["benchmarks"]:
        assert vllm_result["benchmarks"][name]["pass@1"] == hf_result["benchmarks"][name]["pass@1"]
