"""Run one stage spec: load its inputs from the store, get its model from the resident cache, call the
pure stage function, check the output is finite, write the artifact atomically. Luigi tasks call `run_spec`;
so do the debugging commands."""
from __future__ import annotations

import logging
import os
import platform
import socket
import time
from typing import Any, Callable

import torch

from . import __version__, faults
from .config import component_device
from .errors import StageFailed
from .models.loader import ModelRef, load_component, vae_tiling, with_tiling
from .fast.perf import batched_cfg, load_dit
from .plan import STAGE_VERSION, StageSpec
from .runtime import MODELS, default_budget
from .stages.decode import decode_latents, to_uint8, write_mp4
from .stages.denoise import denoise_steps, initial_noise
from .stages.image import (ImageConditioned, encode_image_clip, encode_image_condition, load_image_rgb,
                           resize_center_crop)
from .stages.schedule import export_state, import_state, make_scheduler
from .stages.text import encode_text
from .store import ArtifactStore

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DIT_COMPONENTS = ("high", "low", "single")


def _device(spec: StageSpec) -> torch.device:
    return torch.device(spec.runtime["device"])


def get_model(spec: StageSpec, component: str | None = None, fp: str | None = None) -> Any:
    """The spec's model from the process-wide cache (loaded at most once while it fits the budget).
    `component`/`fp` pick another component of the spec's model (the image stage's CLIP encoder)."""
    ref = ModelRef.from_dict(spec.model)
    component = component or spec.model["component"]
    device, dtype = _device(spec), _DTYPES[spec.runtime["dtype"]]
    device = component_device(component, spec.runtime, device)  # t5/vae/clip_cpu_offload
    gb = spec.runtime.get("vram_budget_gb" if device.type == "cuda" else "ram_budget_gb")
    budget = int(gb * 2**30) if gb else default_budget(device)
    fp = fp or spec.params.get("model") or spec.params.get("dit") or spec.params.get("vae")
    estimate = _estimate_bytes(ref, component)
    if component in DIT_COMPONENTS:
        # fast paths (attention backend, compile, block streaming) from the run's settings; on a GPU only one
        # expert is resident at a time (stage-major order needs just one; its activations get the room)
        def load():
            return load_dit(load_component, ref, component, device, dtype, spec.runtime, budget)

        return MODELS.get((component, fp, str(device), str(dtype)), load, budget, estimate,
                          exclusive="dit" if device.type == "cuda" else None)
    tiling = vae_tiling(component, spec.runtime)  # use_tiling_vae: a tiled VAE is its own cache entry
    return MODELS.get((component, fp, str(device), str(dtype), *(("tiled",) if tiling else ())),
                      lambda: with_tiling(load_component(ref, component, device, dtype), tiling), budget, estimate)


def _estimate_bytes(ref: ModelRef, component: str) -> int:
    from .models.loader import estimate_bytes

    return estimate_bytes(ref, component)


def _check_finite(name: str, tensor: torch.Tensor, spec: StageSpec) -> None:
    bad = (~torch.isfinite(tensor)).sum().item()
    if bad:
        raise StageFailed(f"{spec.stage} produced {bad} non-finite values in '{name}' "
                          f"(of {tensor.numel()}); the artifact was not written")


def _sidecar(spec: StageSpec, run_id: str, seconds: float, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "stage_version": STAGE_VERSION[spec.family], "params": spec.params,
        "upstream": {name: up.key for name, up in spec.upstream.items()},
        "model": spec.model, "wall_s": round(seconds, 4), "device": spec.runtime["device"], "run_id": run_id,
        "host": socket.gethostname(), "pid": os.getpid(),  # which worker computed it (multi-worker runs)
        "software": {"wan_batch": __version__, "torch": torch.__version__, "python": platform.python_version()},
        **(extra or {}),
    }


def run_text(spec: StageSpec, store: ArtifactStore, run_id: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    tokenizer, encoder = get_model(spec)
    context, seq_len = encode_text(tokenizer, encoder, spec.params["prompt"], spec.params["text_len"])
    _check_finite("context", context, spec)
    return store.write_tensors(spec.ref, {"context": context},
                               _sidecar(spec, run_id, time.perf_counter() - t0, {"seq_len": seq_len}))


def run_image(spec: StageSpec, store: ArtifactStore, run_id: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    p = spec.params
    image = resize_center_crop(load_image_rgb(spec.model["image"]), p["width"], p["height"])
    vae = get_model(spec)
    cond = encode_image_condition(vae, image, p["num_frames"])
    _check_finite("cond", cond, spec)
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(p["height"], p["width"], 3)
    extra = {}
    if p.get("clip"):  # Wan2.1 I2V: CLIP image features for the DiT's image cross-attention
        processor, encoder = get_model(spec, "clip", p["clip"])
        extra["clip"] = encode_image_clip(processor, encoder, image)
        _check_finite("clip", extra["clip"], spec)
    return store.write_tensors(spec.ref, {"cond": cond, "image": pixels, **extra},
                               _sidecar(spec, run_id, time.perf_counter() - t0))


def solver_start(spec: StageSpec, store: ArtifactStore, device: torch.device):
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


def run_denoise(spec: StageSpec, store: ArtifactStore, run_id: str,
                on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    from .parallel.layout import ParallelLayout

    if ParallelLayout.from_runtime(spec.runtime).enabled:  # config `parallel`: torchrun ranks compute it
        from .parallel.launch import run_denoise_parallel

        return run_denoise_parallel(spec, store, run_id, faults.wrap_step(spec.stage, on_step))
    t0 = time.perf_counter()
    p, device = spec.params, _device(spec)
    sched, latents = solver_start(spec, store, device)
    transformer = get_model(spec)
    context = store.load_tensors(spec.upstream["text"].ref, device)["context"].to(transformer.dtype)
    context_null = None
    if p["cfg"]:
        context_null = store.load_tensors(spec.upstream["text_null"].ref, device)["context"].to(transformer.dtype)
    image = store.load_tensors(spec.upstream["image"].ref, device) if "image" in spec.upstream else {}
    cond = image.get("cond")
    if "clip" in image:  # Wan2.1 I2V: the DiT also attends to the CLIP image features
        transformer = ImageConditioned(transformer, image["clip"])
    steps = range(*p["steps"])
    on_step = faults.wrap_step(spec.stage, on_step)
    latents = denoise_steps(transformer, sched, latents, steps, context, context_null, p["guide_scale"] or 1.0,
                            cond=cond, on_step=on_step, batched_cfg=batched_cfg(spec.runtime, device))
    _check_finite("latents", latents, spec)
    state_tensors, state_meta = export_state(sched)
    return store.write_tensors(spec.ref, {"latents": latents, **state_tensors},
                               _sidecar(spec, run_id, time.perf_counter() - t0,
                                        {"scheduler_state": state_meta, "steps_run": len(steps)}))


def run_decode(spec: StageSpec, store: ArtifactStore, run_id: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    latents = store.load_tensors(spec.upstream["latents"].ref)["latents"]
    vae = get_model(spec)
    frames = decode_latents(vae, latents)
    _check_finite("frames", frames, spec)
    pixels = to_uint8(frames)
    fps, crf = spec.params["fps"], spec.params["crf"]
    return store.write_file(spec.ref, lambda tmp: write_mp4(pixels, fps, tmp, crf),
                            _sidecar(spec, run_id, time.perf_counter() - t0,
                                     {"frames": int(pixels.shape[0]), "height": int(pixels.shape[1]),
                                      "width": int(pixels.shape[2])}))


RUNNERS = {"text": run_text, "image": run_image, "denoise": run_denoise, "decode": run_decode}


def run_spec(spec: StageSpec, store: ArtifactStore, run_id: str = "", **kwargs) -> dict[str, Any]:
    faults.point(spec.stage, "start")
    return RUNNERS[spec.family](spec, store, run_id, **kwargs)
