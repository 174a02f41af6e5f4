"""The denoising loop on a rank group: CFG parallel on top of the (possibly sequence-parallel) DiT.

CFG parallel: the ranks of CFG group 0 run the conditional forward, those of group 1 the unconditional one,
at the same time; one all-gather per step gives every rank both predictions, combined exactly as the
single-process path does (uncond + scale * (cond - uncond), stages/denoise.py). Every rank then takes the same
solver step on the full latents, so all ranks hold identical latents throughout and rank 0 can write them.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..stages.denoise import predict_noise
from .group import RankGroup


def predict_noise_parallel(transformer, model_input: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                           context_null: torch.Tensor | None, guide_scale: float, group: RankGroup,
                           batched_cfg: bool = False) -> torch.Tensor:
    """One guided prediction. Without a CFG split this is stages.denoise.predict_noise (whose forwards may
    themselves be sequence-parallel)."""
    if context_null is None or group.layout.cfg == 1:
        return predict_noise(transformer, model_input, timestep, context, context_null, guide_scale, batched_cfg)
    mine = context if group.cfg_index == 0 else context_null
    noise = transformer(hidden_states=model_input, timestep=timestep, encoder_hidden_states=mine,
                        return_dict=False)[0].contiguous()
    both = [torch.empty_like(noise) for _ in range(group.layout.cfg)]
    dist.all_gather(both, noise, group=group.cfg_group)
    noise_cond, noise_uncond = both
    return noise_uncond + guide_scale * (noise_cond - noise_uncond)
