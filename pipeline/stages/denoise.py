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
                  on_step: Callable[[int], None] | None = None) -> torch.Tensor:
    """Advance `latents` (fp32) through `steps` of `scheduler` with one expert.

    With `context_null` (CFG), the conditional and unconditional predictions are combined as
    uncond + scale * (cond - uncond), in two forwards exactly like the diffusers pipelines."""
    dtype = transformer.dtype
    timesteps = scheduler.timesteps
    for i in steps:
        t = timesteps[i]
        model_input = latents if cond is None else torch.cat([latents, cond], dim=1)
        model_input = model_input.to(dtype)
        timestep = t.expand(latents.shape[0]).to(latents.device)
        noise_pred = transformer(hidden_states=model_input, timestep=timestep, encoder_hidden_states=context,
                                 return_dict=False)[0]
        if context_null is not None:
            noise_uncond = transformer(hidden_states=model_input, timestep=timestep,
                                       encoder_hidden_states=context_null, return_dict=False)[0]
            noise_pred = noise_uncond + guide_scale * (noise_pred - noise_uncond)
        latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
        if on_step is not None:
            on_step(i)
    return latents
