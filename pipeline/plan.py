"""Expand validated jobs into stage specs: what each stage computes, from what, with which model.

A StageSpec's key is the sha256 of (stage, version, params, upstream keys), so identical prompts share one
EncodeText artifact across rows and batches, and changing a seed re-runs only denoise and decode.
Positive and negative prompts are separate EncodeText artifacts, so a negative prompt shared by every row
(the usual case) is encoded once for the whole store.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from diffusers.pipelines.wan.pipeline_wan import prompt_clean

from .config import GenerationConfig, guide_scales
from .errors import WanBatchError
from .manifest import Job
from .models.loader import fingerprint, resolve_model, scheduler_config
from .fast.perf import perf_runtime
from .runtime import resolve_device, resolve_dtype
from .stages.schedule import make_scheduler, split_index
from .store import ArtifactRef, cache_key

STAGE_VERSION = {"text": 1, "image": 1, "denoise": 1, "decode": 1}
VAE_SPATIAL, VAE_TEMPORAL, LATENT_CHANNELS = 8, 4, 16


@dataclass
class StageSpec:
    stage: str  # text | image | denoise-high | denoise-low | denoise-single | decode
    params: dict[str, Any]
    upstream: dict[str, "StageSpec"] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)  # ModelRef fields + component: how to load, not in key
    runtime: dict[str, Any] = field(default_factory=dict)  # device etc.: how to run, not in key

    @property
    def family(self) -> str:
        return self.stage.split("-")[0]

    @cached_property
    def key(self) -> str:
        return cache_key(self.stage, STAGE_VERSION[self.family], self.params,
                         {name: spec.key for name, spec in sorted(self.upstream.items())})

    @property
    def ref(self) -> ArtifactRef:
        return ArtifactRef(self.stage, self.key, "mp4" if self.stage == "decode" else "safetensors")

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "params": self.params, "model": self.model, "runtime": self.runtime,
                "upstream": {k: v.to_dict() for k, v in self.upstream.items()}}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StageSpec":
        return cls(stage=d["stage"], params=d["params"], model=d["model"], runtime=d["runtime"],
                   upstream={k: cls.from_dict(v) for k, v in d["upstream"].items()})

    @classmethod
    def from_json(cls, text: str) -> "StageSpec":
        return cls.from_dict(json.loads(text))

    def chain(self) -> list["StageSpec"]:
        """This spec and everything upstream, each once, upstream first."""
        seen: dict[str, StageSpec] = {}

        def visit(spec: StageSpec) -> None:
            for up in spec.upstream.values():
                visit(up)
            seen.setdefault(spec.key, spec)

        visit(self)
        return list(seen.values())


@dataclass
class JobPlan:
    job: Job
    decode: StageSpec | None = None
    error: str | None = None

    def stages(self) -> dict[str, StageSpec]:
        """stage name -> spec for this job (the text stage of the positive prompt is 'text')."""
        if self.decode is None:
            return {}
        out: dict[str, StageSpec] = {}
        for spec in self.decode.chain():
            name = spec.stage
            if name == "text" and spec.params["prompt"] != prompt_clean(self.job.prompt):
                name = "text-negative"
            out.setdefault(name, spec)
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

    def _model(self, task: str):
        if task not in self._models:
            self._models[task] = resolve_model(self.config, task)
        return self._models[task]

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
        sched_cfg = {k: val for k, val in scheduler_config(ref).items() if not k.startswith("_")}
        return {"kind": "unipc", "infer_steps": int(v["infer_steps"]), "shift": float(v["sample_shift"]),
                "boundary": float(boundary), "scheduler_config": sched_cfg}

    def _plan(self, job: Job) -> StageSpec:
        v = self.config.with_overrides(job.overrides)
        ref = self._model(job.task)
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
        timesteps = make_scheduler(schedule).timesteps
        split = split_index(schedule, timesteps)
        g_high, g_low = guide_scales(v)
        experts = ref.experts
        ranges = {"high": [0, split], "low": [split, len(timesteps)], "single": [0, len(timesteps)]}
        scales = {"high": g_high, "low": g_low, "single": g_high}
        prev: StageSpec | None = None
        for expert in experts:
            params = {"seed": job.seed, "latent_shape": shape, "schedule": schedule, "steps": ranges[expert],
                      "cfg": cfg, "guide_scale": scales[expert] if cfg else None,
                      "dit": fingerprint(ref, expert), "dtype": self.runtime["dtype"]}
            upstream = {**texts, **image, **({"prev": prev} if prev else {})}
            prev = StageSpec(f"denoise-{expert}", params, upstream, model=self._component(ref, expert),
                             runtime=self.runtime)
        decode_params = {"fps": v["fps"], "crf": v["video_crf"], "vae": fingerprint(ref, "vae")}
        return StageSpec("decode", decode_params, {"latents": prev}, model=self._component(ref, "vae"),
                         runtime=self.runtime)


def plan_jobs(jobs: list[Job], config: GenerationConfig) -> list[JobPlan]:
    planner = Planner(config)
    return [planner.plan(job) for job in jobs]
