"""Regional torch.compile: compile the repeated transformer block once and reuse it for all 40 layers.

Compiling the whole DiT takes minutes and recompiles on every shape; the block is where the time goes (norms,
modulation, RoPE, the fp8 activation quantization in front of each linear), and with PyTorch's inlining of
nn.Module calls one compiled graph serves every block instance (parameters are graph inputs). The first
forward pays the compile (reported separately by the benchmarks as warm-up); a new resolution or batch size
recompiles once, after which that dimension is treated as dynamic.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import torch

log = logging.getLogger(__name__)


def compile_blocks(transformer: torch.nn.Module, mode: str | None = None, fullgraph: bool = False) -> dict[str, Any]:
    """Compile each repeated block of `transformer` in place (diffusers' `compile_repeated_blocks`), after
    probing the quantized-matmul kernels eagerly so the compiled code only reads the answer. Returns a
    report; compile failures are logged and leave the model eager."""
    report: dict[str, Any] = {"compiled": False, "mode": mode, "reason": None}
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
