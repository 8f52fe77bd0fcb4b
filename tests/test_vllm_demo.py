"""vLLM tier: ``python -m grouprl_trl.demo --vllm`` trains with colocated vLLM rollouts (a few steps)."""

import json
import math

import pytest

from vllm_tier import require_vllm

pytestmark = pytest.mark.vllm


def test_demo_vllm_switch_generates_with_vllm(tmp_path, monkeypatch):
    require_vllm()
    from trl.generation.vllm_generation import VLLMGeneration

    from grouprl_trl.demo import main

    calls = []
    generate = VLLMGeneration.generate

    def counted(self, *args, **kwargs):
        calls.append(kwargs.get("num_generations"))
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(VLLMGeneration, "generate", counted)
    steps = 3
    rows = main(["--vllm", "--algo", "gcpo_gold", "--steps", str(steps), "--window", "1", "--out", str(tmp_path)])
    assert len(calls) == steps  # every rollout of every step came from vLLM
    payload = json.loads((tmp_path / "results.json").read_text())
    assert payload["config"]["vllm"] is True and payload["config"]["hidden_size"] == 128
    assert len(payload["curves"]["gcpo_gold"]) == steps
    assert math.isfinite(rows[0]["steps_per_s"]) and rows[0]["steps_per_s"] > 0
    assert math.isfinite(rows[0]["cpu_s_per_step"]) and rows[0]["cpu_s_per_step"] > 0
    assert (tmp_path / "gcpo_gold" / "model" / "config.json").is_file()  # what vLLM loaded
