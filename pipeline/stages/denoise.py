"""Stages `denoise-high`, `denoise-low`, `denoise-single` (Luigi task Denoise): run one expert over its range
of solver steps (CFG or distilled). Needs that DiT expert; reads the text (and image) artifacts and the previous
expert's latents with its solver state; writes `latents` and the solver state the next expert continues from.
A parallel rank group (pipeline/parallel) runs this same `run` with its own device, predict function and hook."""
from __future__ import annotations

import contextlib
import time
from typing import Any, Callable

import torch

from ..errors import WanBatchError
from ..fast.perf import batched_cfg as use_batched_cfg
from ..fast.step_cache import StepCache
from ..runtime import get_model
from .common import check_finite, sidecar
from .image import ImageConditioned
from .registry import Stage
from .schedule import export_state, import_state, make_scheduler


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


VERSION = 1


def solver_start(spec, store, device: torch.device):
    """(scheduler, latents) where this expert starts: the seed's noise, or the previous expert's latents with
    its solver state (UniPC's multistep history must carry across the switch)."""
    p = spec.params
    sched = make_scheduler(p["schedule"])
    if "prev" in spec.upstream:
        prev = spec.upstream["prev"]
        tensors = store.load_tensors(prev.ref, device)
        import_state(sched, tensors, store.sidecar(prev.ref)["scheduler_state"], device)
        return sched, tensors["latents"]
    return sched, initial_noise(p["seed"], tuple(p["latent_shape"])).to(device)


def run(spec, store, run_id: str = "", on_step: Callable[[int], None] | None = None, *,
        device: torch.device | None = None, predict: Callable[..., torch.Tensor] | None = None,
        prepare: Callable[[Any], dict[str, Any]] | None = None, write: bool = True) -> dict | None:
    """Load inputs, run the expert's steps, write the artifact. A parallel rank passes its `device`, its
    `predict` (CFG split across ranks), `prepare(transformer)` (sequence-parallel hooks; returns what to add
    to the sidecar) and `write=False` on every rank but the writer."""
    t0 = time.perf_counter()
    p = spec.params
    device = device or torch.device(spec.runtime["device"])
    sched, latents = solver_start(spec, store, device)
    transformer = get_model(spec, p["dit"], device=device)
    extra = prepare(transformer) if prepare is not None else {}
    context = store.load_tensors(spec.upstream["text"].ref, device)["context"].to(transformer.dtype)
    context_null = None
    if p["cfg"]:
        context_null = store.load_tensors(spec.upstream["text_null"].ref, device)["context"].to(transformer.dtype)
    image = store.load_tensors(spec.upstream["image"].ref, device) if "image" in spec.upstream else {}
    if "clip" in image:  # Wan2.1 I2V: the DiT also attends to the CLIP image features
        transformer = ImageConditioned(transformer, image["clip"])
    steps = range(*p["steps"])
    cache, installed = None, contextlib.nullcontext()
    if p.get("feature_caching"):  # step caching: its state lives and dies with this stage (fast/step_cache.py)
        if predict is not None or prepare is not None:
            raise WanBatchError(f"{spec.stage}: feature_caching does not run on a parallel rank group "
                                f"(sequence-parallel shards and split CFG branches would need shared residuals)")
        cache = StepCache(p["feature_caching"], steps.start)
        predict, installed = cache.predict(predict_noise), cache.install(transformer)
    with installed:
        latents = denoise_steps(transformer, sched, latents, steps, context, context_null, p["guide_scale"] or 1.0,
                                cond=image.get("cond"), on_step=on_step,
                                batched_cfg=use_batched_cfg(spec.runtime, device), predict=predict)
    if cache is not None:
        extra = {**(extra or {}), "feature_caching": cache.report()}
    if not write:
        return None
    check_finite("latents", latents, spec)
    state_tensors, state_meta = export_state(sched)
    return store.write_tensors(spec.ref, {"latents": latents, **state_tensors},
                               sidecar(spec, VERSION, run_id, time.perf_counter() - t0,
                                       {"scheduler_state": state_meta, "steps_run": len(steps), **(extra or {})}))


def _steps(params: dict[str, Any]) -> int:
    return len(range(*params["steps"]))


STAGES = [Stage(name=f"denoise-{expert}", family="denoise", version=VERSION, priority=priority, component=expert,
                fingerprint_param="dit", task="Denoise", run=run, steps=_steps)
          for expert, priority in (("high", 30), ("low", 20), ("single", 30))]
