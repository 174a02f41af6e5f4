"""Regional torch.compile: compile the repeated transformer block once and reuse it for all 40 layers.

Compiling the whole DiT takes minutes and recompiles on every shape; the block is where the time goes (norms,
modulation, RoPE, the fp8 activation quantization in front of each linear), and with PyTorch's inlining of
nn.Module calls one compiled graph serves every block instance (parameters are graph inputs). The first
forward pays the compile (reported separately by the benchmarks as warm-up); a new resolution or batch size
recompiles once, after which that dimension is treated as dynamic.

Warm-up is paid once per machine, not per process: Inductor's caches (its FX graph cache, the AOTAutograd
cache and the compiled Triton kernels) live under `$WAN_BATCH_HOME/compile-cache/` (default
~/.cache/wan-batch), so a second batch on the same machine loads the compiled blocks instead of compiling
them. A cache the user set (TORCHINDUCTOR_CACHE_DIR / TRITON_CACHE_DIR) wins. The caches are keyed by
torch's own hashes of the graph, the torch/Triton versions and the GPU, so a stale entry is never used.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


def compile_cache_dir() -> Path:
    base = os.environ.get("WAN_BATCH_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "wan-batch")
    return Path(base) / "compile-cache"


def use_compile_cache() -> dict[str, str]:
    """Point Inductor's and Triton's on-disk caches at WAN_BATCH_HOME (unless the user set them) and turn the
    persistent caches on. Returns the directories used. Must run before the first compile of the process:
    both read their directory when they first compile."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    root = compile_cache_dir()
    # torch writes its default into the environment the first time anything asks (registering a custom op
    # does), so a value equal to (or under) the default is torch's, not the user's
    torch_default = os.path.abspath(default_cache_dir())
    dirs = {}
    for var, sub in (("TORCHINDUCTOR_CACHE_DIR", "inductor"), ("TRITON_CACHE_DIR", "triton")):
        value = os.environ.get(var)
        if not value or os.path.abspath(value).startswith(torch_default):
            os.environ[var] = str(root / sub)
        dirs[var] = os.environ[var]
        Path(dirs[var]).mkdir(parents=True, exist_ok=True)
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    if hasattr(inductor_config, "autotune_local_cache"):
        inductor_config.autotune_local_cache = True
    import torch._functorch.config as functorch_config

    if hasattr(functorch_config, "enable_autograd_cache"):
        functorch_config.enable_autograd_cache = True
    return dirs


def compile_blocks(transformer: torch.nn.Module, mode: str | None = None, fullgraph: bool = False) -> dict[str, Any]:
    """Compile each repeated block of `transformer` in place (diffusers' `compile_repeated_blocks`), after
    probing the quantized-matmul kernels eagerly so the compiled code only reads the answer. Returns a
    report; compile failures are logged and leave the model eager."""
    report: dict[str, Any] = {"compiled": False, "mode": mode, "reason": None}
    report["cache"] = use_compile_cache()["TORCHINDUCTOR_CACHE_DIR"]
    device = next(transformer.parameters()).device
    if device.type == "cuda":
        from . import fp8_matmul

        report["kernels"] = fp8_matmul.probe(device)
    try:
        import torch._dynamo

        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 16)
        t0 = time.perf_counter()
        kwargs = {"fullgraph": fullgraph, "dynamic": None}
        if mode:
            kwargs["mode"] = mode
        if hasattr(transformer, "compile_repeated_blocks"):
            transformer.compile_repeated_blocks(**kwargs)
        else:
            for block in transformer.blocks:
                block.compile(**kwargs)
        report.update(compiled=True, setup_s=round(time.perf_counter() - t0, 3))
    except Exception as e:  # noqa: BLE001 - an uncompilable model still runs eagerly
        report["reason"] = f"{type(e).__name__}: {e}"
        log.warning("torch.compile of the transformer blocks failed, running eagerly: %s", report["reason"])
    return report
