"""README snippets that must work as printed: the GPGConfig example on a CPU machine, and the
commands of the "verl CPU try" (their dry run passes every check but vLLM and the GPU)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from grouprl import cli, preflight

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _block(after: str, language: str) -> str:
    start = README.index(after)
    match = re.compile(rf"```{language}\n(.*?)```", re.S).search(README, start)
    return match.group(1)


def test_gpgconfig_snippet_builds_on_cpu(tmp_path, monkeypatch):
    from grouprl_trl.tiny import build_toy_dataset, save_tiny_model, toy_reward

    code = _block("## Use it from TRL", "python")
    model = save_tiny_model(tmp_path / "tiny")
    code = code.replace('"Qwen/Qwen2.5-Math-7B"', repr(str(model))).replace("trainer.train()", "")
    monkeypatch.chdir(tmp_path)
    namespace = {"my_reward": toy_reward, "ds": build_toy_dataset(num_rows=8)}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the README's own example
    assert type(namespace["trainer"]).__name__ == "GPGTrainer" and namespace["args"].valid_threshold == 0.6


def test_verl_cpu_try_commands(tmp_path, monkeypatch, capsys):
    from grouprl_trl import tiny

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(preflight, "detect_machine", lambda: preflight.Machine(()))
    commands = [shlex.split(c.split("#")[0]) for c in _block("### verl CPU try", "bash").replace("\\\n", " ").splitlines()
                if c.strip()]
    assert [c[:2] for c in commands] == [["python", "-m"], ["grouprl", "data"], ["grouprl", "train"]]
    assert tiny.main(commands[0][3:]) == 0
    assert cli.main(commands[1][1:]) == 0
    capsys.readouterr()
    assert cli.main(commands[2][1:]) == 1
    report = capsys.readouterr().out.partition("# preflight\n")[2]
    fails = [line.split()[1] for line in report.splitlines() if line.startswith("  FAIL")]
    assert fails == (["extras"] if not preflight.is_installed("vllm") else []) + ["hardware"], report
    for topic in ("config", "data", "model"):
        assert f"  ok    {topic}" in report
