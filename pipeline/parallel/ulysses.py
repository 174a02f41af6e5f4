"""Ulysses sequence parallelism for WanTransformer3DModel, with diffusers' context-parallel machinery.

Which and why: diffusers 0.42.1 already has everything Ulysses needs for Wan, and it is exact. The model's
`_cp_plan` splits the RoPE tables and the token sequence (after patch embedding) across the ranks, the
self-attention processor all-to-alls q/k/v from sequence shards to head shards and back around the attention
kernel (`TemplatedUlyssesAttention`, torch.distributed all_to_all_single), cross-attention runs on the local
queries against the full text keys, and `proj_out`'s output is all-gathered. Checked with the gloo backend on
CPU: the tiny model's output is bit-identical to the single-process forward (tests/test_parallel.py). Writing
the same all-to-alls ourselves would only duplicate that code.

What we do not take from diffusers: `ModelMixin.enable_parallelism` itself. It picks the device as
`rank % torch.accelerator.device_count()` (a ZeroDivisionError on a CPU-only machine) and builds a mesh of the
whole world, which leaves no room for the CFG split. `enable_ulysses` performs the same three steps on our
(cfg, ring, ulysses) mesh: set up the ParallelConfig, point every attention processor at it, install the
`_cp_plan` hooks.

Limits: the token count and the head count must be divisible by seq_p_size (Wan2.2 A14B: 40 heads; 81
frames at 480x832 give 32,760 tokens, at 720x1280 75,600: 2, 4 and 8 ranks all divide both). diffusers'
"ulysses_anything" mode for uneven splits all-gathers tensors of unequal size, which gloo refuses, so it is not
used. The self-attention backend must be one diffusers can run context-parallel (native SDPA, cuDNN, flash,
sage, ...); another is replaced by native SDPA with a warning.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from ..errors import StageFailed
from .group import RankGroup

log = logging.getLogger(__name__)


def token_count(transformer: torch.nn.Module, latent_shape: tuple[int, ...] | list[int]) -> int:
    p_t, p_h, p_w = transformer.config.patch_size
    _, _, t, h, w = latent_shape
    return (t // p_t) * (h // p_h) * (w // p_w)


def check_divisible(transformer: torch.nn.Module, latent_shape, seq: int) -> None:
    heads = transformer.config.num_attention_heads
    tokens = token_count(transformer, latent_shape)
    bad = []
    if heads % seq:
        bad.append(f"the model's {heads} attention heads")
    if tokens % seq:
        bad.append(f"the video's {tokens} DiT tokens (latents {list(latent_shape)})")
    if bad:
        raise StageFailed(f"parallel.seq_p_size={seq} must divide {' and '.join(bad)}; choose a seq_p_size "
                          "that divides both, or change the frame count or size")


def _cp_backends(transformer: torch.nn.Module) -> dict[str, Any]:
    """Make every self-attention backend one that diffusers runs context-parallel; report what changed."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    report: dict[str, Any] = {"self_attention": None, "replaced": None}
    for block in transformer.blocks:
        proc = block.attn1.processor
        backend = getattr(proc, "_attention_backend", None)
        name = AttentionBackendName(backend) if backend else _AttentionBackendRegistry.get_active_backend()[0]
        if not _AttentionBackendRegistry._is_context_parallel_available(name):
            report["replaced"] = name.value
            block.attn1.set_attention_backend("native")
            name = AttentionBackendName.NATIVE
        report["self_attention"] = name.value
    if report["replaced"]:
        log.warning("self-attention backend %s cannot run sequence-parallel in diffusers; using native SDPA",
                    report["replaced"])
    return report


def enable_ulysses(transformer: torch.nn.Module, group: RankGroup) -> dict[str, Any]:
    """Split `transformer`'s token sequence over the group's Ulysses ranks (in place). Returns a report."""
    try:
        from diffusers import ContextParallelConfig
        from diffusers.hooks.context_parallel import apply_context_parallel
        from diffusers.models._modeling_parallel import ParallelConfig
    except ImportError as e:  # older diffusers: no context parallelism
        raise StageFailed(f"sequence parallelism needs diffusers' context-parallel support ({e}); "
                          "diffusers 0.42 has it") from None
    if getattr(transformer, "_cp_plan", None) is None:
        raise StageFailed(f"{type(transformer).__name__} has no context-parallel plan in this diffusers version")
    report = _cp_backends(transformer)
    cp = ContextParallelConfig(ulysses_degree=group.layout.seq)
    config = ParallelConfig(context_parallel_config=cp)
    config.setup(group.rank, group.world, group.device, mesh=group.mesh)
    transformer._parallel_config = config
    for module in transformer.modules():
        proc = getattr(module, "processor", None)
        if proc is not None and hasattr(proc, "_parallel_config"):
            proc._parallel_config = config
    apply_context_parallel(transformer, cp, transformer._cp_plan)
    report["ulysses_degree"] = group.layout.seq
    return report
