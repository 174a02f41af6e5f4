"""Expand validated jobs into stage specs: what each stage computes, from what, with which model.

A StageSpec's key is the sha256 of (stage, version, params, upstream keys), so identical prompts share one
EncodeText artifact across rows and batches, and changing a seed re-runs only denoise and decode.
Positive and negative prompts are separate EncodeText artifacts, so a negative prompt shared by every row
(the usual case) is encoded once for the whole store.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from diffusers.pipelines.wan.pipeline_wan import prompt_clean

from .config import VAE_DTYPES, GenerationConfig, guide_scales
from .errors import WanBatchError
from .manifest import Job
from .models.loader import fingerprint, resolve_model, row_loras, scheduler_config
from .fast.attention import lossy_attention
from .fast.perf import perf_runtime
from .fast.step_cache import cache_params
from .runtime import resolve_device, resolve_dtype
from .spec import StageSpec
from .stages.registry import role_name
from .stages.schedule import make_scheduler, split_index

__all__ = ["JobPlan", "Planner", "StageSpec", "plan_jobs"]

VAE_SPATIAL, VAE_TEMPORAL, LATENT_CHANNELS = 8, 4, 16


@dataclass
class JobPlan:
    job: Job
    decode: StageSpec | None = None
    error: str | None = None

    def stages(self) -> dict[str, StageSpec]:
        """Job-level stage name -> spec, upstream first. An artifact is named by the role its consumer gives it
        (the registry's roles: the negative prompt's text artifact is 'text-negative'); a negative prompt equal
        to the prompt is the same artifact, named 'text'."""
        if self.decode is None:
            return {}
        chain = self.decode.chain()
        names: dict[str, str] = {}
        for spec in chain:
            for role, up in spec.upstream.items():
                names.setdefault(up.key, role_name(role, up.stage))
        out: dict[str, StageSpec] = {}
        for spec in chain:
            out.setdefault(names.get(spec.key, spec.stage), spec)
        return out


def _file_sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class Planner:
    """Builds specs for jobs under one config; models are resolved once per task type."""

    def __init__(self, config: GenerationConfig):
        self.config = config
        self.device = resolve_device(config["device"])
        self.dtype = resolve_dtype(config["dtype"], self.device)
        self.runtime = {"device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
                        "ram_budget_gb": config.get("ram_budget_gb"), "vram_budget_gb": config.get("vram_budget_gb"),
                        **perf_runtime(config.values)}
        self._models: dict[str, Any] = {}
        # per model and per schedule, not per row: building a diffusers scheduler (to count its timesteps) and
        # reading the model's scheduler config were most of a 10,000-row manifest's planning (issue 21)
        self._scheduler_configs: dict[int, dict[str, Any]] = {}
        self._steps: dict[str, tuple[int, int]] = {}

    def _model(self, task: str, loras: list[dict[str, Any]] | None = None):
        """The model of a task; with a row's LoRA set, the same model with that set on its experts (its
        fingerprint, hence the denoise keys and the resident expert, follow the set)."""
        if task not in self._models:
            self._models[task] = resolve_model(self.config, task)
        ref = self._models[task]
        if loras is None:
            return ref
        memo = (task, json.dumps(loras, sort_keys=True))
        if memo not in self._models:
            self._models[memo] = replace(ref, loras=row_loras(loras, ref.experts))
        return self._models[memo]

    def _component(self, ref, component: str) -> dict[str, Any]:
        return {**ref.to_dict(), "component": component}

    def plan(self, job: Job) -> JobPlan:
        if job.error:
            return JobPlan(job, error=job.error)
        try:
            return JobPlan(job, decode=self._plan(job))
        except WanBatchError as e:
            return JobPlan(job, error=f"row {job.row}: {e}")

    def _text(self, ref, prompt: str, text_len: int) -> StageSpec:
        params = {"prompt": prompt_clean(prompt), "text_len": text_len, "model": fingerprint(ref, "text"),
                  "dtype": self.runtime["dtype"]}
        return StageSpec("text", params, model=self._component(ref, "text"), runtime=self.runtime)

    def _schedule(self, ref, v: dict[str, Any]) -> dict[str, Any]:
        if v.get("denoising_step_list") is not None:
            return {"kind": "distill", "denoising_step_list": list(v["denoising_step_list"]),
                    "shift": float(v["sample_shift"]), "boundary_step_index": int(v["boundary_step_index"])}
        # the config's boundary wins; else the model's own (Wan2.2: 0.875 T2V, 0.900 I2V)
        boundary = v.get("boundary") or ref.boundary_ratio or 0.875
        if id(ref) not in self._scheduler_configs:  # refs live in self._models, so their ids stay theirs
            self._scheduler_configs[id(ref)] = {k: val for k, val in scheduler_config(ref).items()
                                                if not k.startswith("_")}
        sched_cfg = dict(self._scheduler_configs[id(ref)])
        return {"kind": "unipc", "infer_steps": int(v["infer_steps"]), "shift": float(v["sample_shift"]),
                "boundary": float(boundary), "scheduler_config": sched_cfg}

    def _step_split(self, schedule: dict[str, Any]) -> tuple[int, int]:
        """(number of solver steps, index of the first low-noise step) of a schedule."""
        key = json.dumps(schedule, sort_keys=True)
        if key not in self._steps:
            timesteps = make_scheduler(schedule).timesteps
            self._steps[key] = (len(timesteps), split_index(schedule, timesteps))
        return self._steps[key]

    def _plan(self, job: Job) -> StageSpec:
        v = self.config.with_overrides(job.overrides)
        ref = self._model(job.task, job.loras)
        height, width, frames = v["target_height"], v["target_width"], v["target_video_length"]
        shape = [1, LATENT_CHANNELS, (frames - 1) // VAE_TEMPORAL + 1, height // VAE_SPATIAL, width // VAE_SPATIAL]
        text_len = v["text_len"]
        texts = {"text": self._text(ref, job.prompt, text_len)}
        cfg = bool(v["enable_cfg"])
        if cfg:
            negative = job.negative_prompt if job.negative_prompt is not None else v["sample_neg_prompt"]
            texts["text_null"] = self._text(ref, negative, text_len)
        image = {}
        if job.image:
            params = {"image_sha256": _file_sha256(job.image), "height": height, "width": width,
                      "num_frames": frames, "vae": fingerprint(ref, "vae")}
            if ref.image_encoder:  # Wan2.1 I2V: the image artifact also holds CLIP features
                params["clip"] = fingerprint(ref, "clip")
            image["image"] = StageSpec("image", params, model={**self._component(ref, "vae"), "image": job.image},
                                       runtime=self.runtime)

        schedule = self._schedule(ref, v)
        n_steps, split = self._step_split(schedule)
        g_high, g_low = guide_scales(v)
        experts = ref.experts
        ranges = {"high": [0, split], "low": [split, n_steps], "single": [0, n_steps]}
        scales = {"high": g_high, "low": g_low, "single": g_high}
        try:
            caching = cache_params(v, n_steps)
        except ValueError as e:
            raise WanBatchError(str(e)) from e
        prev: StageSpec | None = None
        for expert in experts:
            params = {"seed": job.seed, "latent_shape": shape, "schedule": schedule, "steps": ranges[expert],
                      "cfg": cfg, "guide_scale": scales[expert] if cfg else None,
                      "dit": fingerprint(ref, expert), "dtype": self.runtime["dtype"],
                      # fp8 attention changes the result beyond rounding: its denoise artifacts are its own
                      **({"attention": lossy} if (lossy := lossy_attention(v)) else {})}
            if caching:  # only when on, so uncached artifacts keep the keys they always had
                params["feature_caching"] = caching
            upstream = {**texts, **image, **({"prev": prev} if prev else {})}
            prev = StageSpec(f"denoise-{expert}", params, upstream, model=self._component(ref, expert),
                             runtime=self.runtime)
        if ref.tae:  # use_tae: LightX2V's tiny VAE decodes, in the run's dtype (vae_dtype is the VAE's)
            decode_params = {"fps": v["fps"], "crf": v["video_crf"], "vae": fingerprint(ref, "tae"),
                             "decoder": "tae", "need_scaled": bool(v.get("need_scaled")),
                             "dtype": self.runtime["dtype"]}
            return StageSpec("decode", decode_params, {"latents": prev}, model=self._component(ref, "tae"),
                             runtime=self.runtime)
        decode_params = {"fps": v["fps"], "crf": v["video_crf"], "vae": fingerprint(ref, "vae")}
        if VAE_DTYPES.get(v.get("vae_dtype") or "fp32") == "bfloat16":  # only then: fp32 keys stay as they were
            decode_params["vae_dtype"] = "bfloat16"
        return StageSpec("decode", decode_params, {"latents": prev}, model=self._component(ref, "vae"),
                         runtime=self.runtime)


def plan_jobs(jobs: list[Job], config: GenerationConfig) -> list[JobPlan]:
    planner = Planner(config)
    return [planner.plan(job) for job in jobs]
