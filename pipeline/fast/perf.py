"""The fast-path settings of a run (from LightX2V's keys and ours) and how a freshly loaded DiT gets them.

Settings travel in a stage spec's `runtime` (never in its cache key: they change speed, not the result beyond
floating-point tolerance; a quantized checkpoint is a different model and has its own fingerprint):
  self_attn_1_type / cross_attn_1_type / cross_attn_2_type -> attention backend per module (attention.py; FA3
    kernels in fa3.py; fp8 attention is lossy: attention.lossy_attention names it for the cache key)
  torch_compile (LightX2V's key) -> regional compile of the repeated block (accel.py)
  cpu_offload + offload_granularity block|phase -> block streaming (offload.py); + lazy_load -> the streamed
    blocks are read from the expert's own checkpoint on use, never all in RAM (lazy.py)
  batched_cfg (ours; default: on for CUDA) -> cond + uncond in one forward (stages/denoise.py)
"""
from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

PERF_KEYS = ("self_attn_1_type", "cross_attn_1_type", "cross_attn_2_type", "torch_compile", "cpu_offload",
             "offload_granularity", "lazy_load", "batched_cfg", "activation_reserve_gb",
             "parallel")  # seq/CFG parallel Denoise on several GPUs (pipeline/parallel)

# VRAM kept free for activations when planning how many blocks stay resident under cpu_offload (480p 81
# frames, batch 2, eager: about 6 GB were measured at the peak; 720p needs about twice that).
DEFAULT_ACTIVATION_RESERVE_GB = 8.0


def perf_runtime(values: dict[str, Any]) -> dict[str, Any]:
    """The perf settings of a config (its values dict), to put in a stage spec's runtime."""
    return {k: values.get(k) for k in PERF_KEYS if values.get(k) is not None}


def batched_cfg(runtime: dict[str, Any], device: torch.device) -> bool:
    value = runtime.get("batched_cfg")
    return device.type == "cuda" if value is None else bool(value)


def load_dit(load, ref, component: str, device: torch.device, dtype: torch.dtype, runtime: dict[str, Any],
             budget: int) -> torch.nn.Module:
    """Load a DiT expert with `load(ref, component, device, dtype)` and apply the run's fast paths.
    The choices made (and why a path was not taken) are kept on the model as `wan_batch_perf`."""
    from .attention import apply_attention

    report: dict[str, Any] = {}
    if device.type == "cuda":
        from .accel import use_compile_cache

        use_compile_cache()  # before anything of this process compiles (Inductor reads its directory once)
    offload = bool(runtime.get("cpu_offload")) and runtime.get("offload_granularity", "block") in ("block", "phase")
    if offload and device.type != "cuda":
        report["offload"] = "not used: cpu_offload streams to a GPU and the device is " + device.type
        offload = False
    source = None
    if offload and runtime.get("lazy_load") and getattr(ref, "dits", None):
        from .lazy import ExpertSource

        # the streamed blocks are never loaded here: a skeleton with them on the meta device, read on use
        from safetensors import SafetensorError

        from ..errors import CheckpointError

        try:
            source = ExpertSource(ref, component, dtype)
            model = source.skeleton(runtime.get("offload_granularity", "block"))
        except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as e:
            raise CheckpointError(f"cannot load the {component} model from {ref.path}: {e}") from e
    else:
        model = load(ref, component, torch.device("cpu") if offload else device, dtype)
    if runtime.get("lazy_load") and not offload:
        report["lazy_load"] = "not used: lazy_load streams blocks under cpu_offload (block or phase) on a GPU"
    report["attention"] = apply_attention(model, runtime.get("self_attn_1_type"),
                                          runtime.get("cross_attn_1_type") or runtime.get("cross_attn_2_type"),
                                          device)
    if offload:
        report["offload"] = _stream(model, component, device, runtime, budget, source)
    if runtime.get("torch_compile"):
        if offload:
            report["compile"] = "not used: the streaming hooks cannot run inside a compiled block"
        elif device.type != "cuda":
            report["compile"] = "not used: compile is for CUDA runs"
        else:
            from .accel import compile_blocks

            report["compile"] = compile_blocks(model)
    model.wan_batch_perf = report
    log.info("%s perf settings: %s", component, report)
    return model


def _stream(model, component: str, device: torch.device, runtime: dict[str, Any], budget: int, source) -> dict:
    from .offload import BlockStreamer, plan_resident_units

    granularity = runtime.get("offload_granularity", "block")
    reserve = int(float(runtime.get("activation_reserve_gb") or DEFAULT_ACTIVATION_RESERVE_GB) * 2**30)
    resident = plan_resident_units(model, granularity, budget, reserve)
    streamer = BlockStreamer(model, device, granularity, resident_units=resident, lazy_source=source)
    model.wan_batch_streamer = streamer  # keeps the hooks, buffers and the open checkpoint alive with the model
    return {"granularity": granularity, "resident_units": resident, "streamed_units": len(streamer.streamed),
            "lazy_load": source is not None,
            "lazy_source": str(source.weights.path) if source is not None else None}
