"""Denoise: run one expert over its range of solver steps (CFG or distilled)."""
from __future__ import annotations

from typing import Callable

import torch


def initial_noise(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Float32 noise from a CPU generator: the same on every device, and the same as diffusers' pipelines
    given `generator=torch.Generator('cpu').manual_seed(seed)`."""
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)


@torch.no_grad()
def denoise_steps(transformer, scheduler, latents: torch.Tensor, steps: range, context: torch.Tensor,
                  context_null: torch.Tensor | None, guide_scale: float, cond: torch.Tensor | None = None,
                  on_step: Callable[[int], None] | None = None, batched_cfg: bool = False,
                  predict: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
    """Advance `latents` (fp32) through `steps` of `scheduler` with one expert.

    With `context_null` (CFG), the conditional and unconditional predictions are combined as
    uncond + scale * (cond - uncond): in two forwards exactly like the diffusers pipelines, or with
    `batched_cfg` in one forward of batch 2 (same numbers up to floating-point reordering; one pass over the
    weights instead of two, and larger matmuls)."""
    dtype = transformer.dtype
    timesteps = scheduler.timesteps
    for i in steps:
        t = timesteps[i]
        model_input = latents if cond is None else torch.cat([latents, cond], dim=1)
        model_input = model_input.to(dtype)
        timestep = t.expand(latents.shape[0]).to(latents.device)
        noise_pred = (predict or predict_noise)(transformer, model_input, timestep, context, context_null,
                                                guide_scale, batched_cfg)
        latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
        if on_step is not None:
            on_step(i)
    return latents


def predict_noise(transformer, model_input: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                  context_null: torch.Tensor | None, guide_scale: float, batched_cfg: bool = False) -> torch.Tensor:
    """One model evaluation of a step: the conditional prediction, guided by the unconditional one when
    `context_null` is given (two forwards, or one of batch 2 with `batched_cfg`)."""
    if context_null is None:
        return transformer(hidden_states=model_input, timestep=timestep, encoder_hidden_states=context,
                           return_dict=False)[0]
    if batched_cfg:
        both = transformer(hidden_states=torch.cat([model_input, model_input]),
                           timestep=torch.cat([timestep, timestep]),
                           encoder_hidden_states=torch.cat([context, context_null]), return_dict=False)[0]
        noise_cond, noise_uncond = both.chunk(2)
    else:
        noise_cond = transformer(hidden_states=model_input, timestep=timestep, encoder_hidden_states=context,
                                 return_dict=False)[0]
        noise_uncond = transformer(hidden_states=model_input, timestep=timestep, encoder_hidden_states=context_null,
                                   return_dict=False)[0]
    return noise_uncond + guide_scale * (noise_cond - noise_uncond)
