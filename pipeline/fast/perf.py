"""The fast-path settings of a run (from LightX2V's keys and ours). `runtime.load_fast_dit` applies them to a
freshly loaded DiT.

Settings travel in a stage spec's `runtime` (never in its cache key: they change speed, not the result beyond
floating-point tolerance; a quantized checkpoint is a different model and has its own fingerprint):
  self_attn_1_type / cross_attn_1_type / cross_attn_2_type -> attention backend per module (attention.py; FA3
    kernels in fa3.py; fp8 attention is lossy: attention.lossy_attention names it for the cache key)
  torch_compile (LightX2V's key) -> regional compile of the repeated block (accel.py)
  cpu_offload + offload_granularity block|phase -> block streaming (offload.py); + lazy_load -> the streamed
    blocks are read from the expert's own checkpoint on use, never all in RAM (models/lazy.py)
  batched_cfg (ours; default: on for CUDA) -> cond + uncond in one forward (stages/denoise.py)
"""
from __future__ import annotations

import logging
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
