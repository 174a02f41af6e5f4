"""The fast-path settings of a run (from LightX2V's keys and ours) and how a freshly loaded DiT gets them.

Settings travel in a stage spec's `runtime` (never in its cache key: they change speed, not the result beyond
floating-point tolerance; a quantized checkpoint is a different model and has its own fingerprint):
  self_attn_1_type / cross_attn_1_type / cross_attn_2_type -> attention backend per module (attention.py)
  torch_compile (LightX2V's key) -> regional compile of the repeated block (accel.py)
  cpu_offload + offload_granularity block|phase, lazy_load -> block streaming (offload.py)
  batched_cfg (ours; default: on for CUDA) -> cond + uncond in one forward (stages/denoise.py)
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

PERF_KEYS = ("self_attn_1_type", "cross_attn_1_type", "cross_attn_2_type", "torch_compile", "cpu_offload",
             "offload_granularity", "lazy_load", "batched_cfg", "activation_reserve_gb",
             "parallel",  # seq/CFG parallel Denoise on several GPUs (pipeline/parallel)
             "t5_cpu_offload", "vae_cpu_offload", "clip_cpu_offload",
             "use_tiling_vae")  # tiled VAE encode/decode (models.loader.vae_tiling)  # where T5/VAE/CLIP live (config.component_device)

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
    offload = bool(runtime.get("cpu_offload")) and runtime.get("offload_granularity", "block") in ("block", "phase")
    if offload and device.type != "cuda":
        report["offload"] = "not used: cpu_offload streams to a GPU and the device is " + device.type
        offload = False
    model = load(ref, component, torch.device("cpu") if offload else device, dtype)
    report["attention"] = apply_attention(model, runtime.get("self_attn_1_type"),
                                          runtime.get("cross_attn_1_type") or runtime.get("cross_attn_2_type"),
                                          device)
    if offload:
        report["offload"] = _stream(model, ref, component, device, runtime, budget)
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


def _stream(model, ref, component: str, device: torch.device, runtime: dict[str, Any], budget: int) -> dict:
    from ..models.loader import COMPONENTS
    from .offload import BlockStreamer, plan_resident_units, safetensors_source

    granularity = runtime.get("offload_granularity", "block")
    reserve = int(float(runtime.get("activation_reserve_gb") or DEFAULT_ACTIVATION_RESERVE_GB) * 2**30)
    resident = plan_resident_units(model, granularity, budget, reserve)
    source, note = None, None
    if runtime.get("lazy_load"):
        files = sorted(str(f) for f in (Path(ref.path) / COMPONENTS[component][0]).glob("*.safetensors"))
        if getattr(ref, "format", "diffusers") == "diffusers" and files:
            source = safetensors_source(files)
        else:
            note = "lazy_load needs the diffusers layout's safetensors shards: weights kept in pinned RAM"
            log.warning("%s: %s", component, note)
    streamer = BlockStreamer(model, device, granularity, resident_units=resident, lazy_source=source)
    model.wan_batch_streamer = streamer  # keeps the hooks and buffers alive with the model
    return {"granularity": granularity, "resident_units": resident, "streamed_units": len(streamer.streamed),
            "lazy_load": source is not None, "note": note}
