"""Request and response models of both APIs, and the one normalised job they become.

A job is what the worker writes as one manifest row: prompt, negative prompt, image (a file in the service
folder), seed and the per-row overrides (manifest column names). Fields a request leaves out take the server
config's values, as LightX2V's server does (it passes only the fields a request set).
"""
from __future__ import annotations

import math
import random
import re
from pathlib import Path, PurePosixPath
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..config import check_values
from ..manifest import SAFE_JOB_ID
from .inputs import RequestError
from .settings import ServiceSettings

MAX_SEED = 2**63 - 1
_SIZE = re.compile(r"^\s*(\d{1,6})\s*[*xX]\s*(\d{1,6})\s*$")


def random_seed() -> int:
    return random.randint(0, 2**32 - 1)  # LightX2V's range for an unset seed


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


class SubmitRequest(BaseModel):
    """POST /submit (the multi-device Wan service's fields, plus negative_prompt)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(description="text prompt")
    negative_prompt: Optional[str] = Field(None, description="CFG negative prompt (default: the config's)")
    image_url: Optional[str] = Field(None, description="first frame for image-to-video: http(s) URL, base64, or a "
                                                       "path under an allowed folder")
    image_size: Optional[str] = Field(None, description="'W*H', e.g. '832*480' (default: the config's size)")
    num_frames: Optional[int] = Field(None, ge=1, description="frames, 4k+1 (default: the config's)")
    guidance_scale: Optional[float] = Field(None, allow_inf_nan=False, description="CFG scale, both experts")
    infer_steps: Optional[int] = Field(None, ge=1, description="denoising steps (default: the config's)")
    seed: Optional[int] = Field(None, ge=0, le=MAX_SEED, description="noise seed (default: random)")

    _prompt = field_validator("prompt")(_not_blank)


class SubmitResponse(BaseModel):
    task_id: str
    status: str
    status_url: str
    queue_position: int


class StatusResponse(BaseModel):
    task_id: str
    status: str = Field(description="queued, running, done, failed or cancelled")
    stage: Optional[str] = Field(None, description="the stage in progress (or next) while queued/running")
    progress: float = Field(description="share of this job's stage artifacts that exist, 0..1")
    stages_done: list[str] = []
    queue_position: Optional[int] = None
    video_url: Optional[str] = None
    error: Optional[str] = None
    seed: int
    created_at: float
    started_at: Optional[float] = None
    finished_at: Optional[float] = None


class VideoTaskRequest(BaseModel):
    """LightX2V's VideoTaskRequest (lightx2v/server/schema.py) and the older route's TaskRequest: every field
    they define is here, so each is either honoured or refused by name (LIGHTX2V_UNSUPPORTED); a field
    LightX2V does not define is refused too, not ignored."""

    model_config = ConfigDict(extra="forbid")

    task_id: Optional[str] = None
    prompt: str = ""
    use_prompt_enhancer: bool = False
    negative_prompt: str = ""
    image_path: str = Field("", description="base64 image, http(s) URL, or a path under an allowed folder")
    last_frame_path: str = ""
    image_mask_path: str = ""
    save_result_path: str = Field("", description="relative to the server's outputs folder, or absolute inside it "
                                                  "or an --output-root folder; default <task_id>.mp4")
    presigned_url: str = ""
    infer_steps: int = 5
    seed: int = Field(default_factory=random_seed, ge=0, le=MAX_SEED)
    reuse: bool = False
    target_shape: list[int] = Field([], description="[height, width]")
    lora_name: Optional[str] = None
    lora_strength: float = 1.0
    num_fragments: int = 1
    target_video_length: int = 81
    video_path: str = ""
    sr_ratio: float = 2.0
    audio_path: str = ""
    video_duration: int = 5
    talk_objects: Optional[list[Any]] = None
    target_fps: Optional[int] = 16
    resize_mode: Optional[str] = "adaptive"
    aspect_ratio: str = "16:9"  # TaskRequest (POST /v1/tasks/): text-to-image only
    data_bootstrap_room: Optional[int] = None  # DisaggOverrideRequest
    disagg_phase1_receiver_engine_rank: Optional[int] = None
    disagg_bootstrap_room: Optional[int] = None
    disagg_decoder_bootstrap_room: Optional[int] = None


class TaskResponse(BaseModel):
    task_id: str
    task_status: str
    save_result_path: str


# LightX2V fields we do not implement: refused unless left at LightX2V's default.
LIGHTX2V_UNSUPPORTED = {
    "use_prompt_enhancer": (False, "prompt enhancement is not available"),
    "last_frame_path": ("", "first-last-frame video is not available"),
    "image_mask_path": ("", "masked image-to-video is not available"),
    "presigned_url": ("", "uploading the result to a presigned URL is not available (fetch it from "
                          "/v1/tasks/{task_id}/result)"),
    "reuse": (False, "reusing a previous request's result is not available (identical requests are served "
                     "from the artifact store's cache anyway)"),
    "num_fragments": (1, "multi-fragment (long) video is not available"),
    "video_path": ("", "video input (super-resolution, video-to-video) is not available"),
    "sr_ratio": (2.0, "super-resolution is not available"),
    "audio_path": ("", "audio-driven video is not available"),
    "video_duration": (5, "audio-driven video is not available"),
    "talk_objects": (None, "audio-driven video is not available"),
    "resize_mode": ("adaptive", "only the default resize (scale to cover, centre crop) is available"),
    "aspect_ratio": ("16:9", "aspect_ratio is for text-to-image; set target_shape for a video"),
    "data_bootstrap_room": (None, "disaggregated serving is not available"),
    "disagg_phase1_receiver_engine_rank": (None, "disaggregated serving is not available"),
    "disagg_bootstrap_room": (None, "disaggregated serving is not available"),
    "disagg_decoder_bootstrap_room": (None, "disaggregated serving is not available"),
}


def parse_image_size(value: str) -> tuple[int, int]:
    m = _SIZE.match(value)
    if not m:
        raise RequestError(422, f"image_size: expected 'W*H' such as '832*480', got {value!r}")
    return int(m.group(1)), int(m.group(2))


def build_job(settings: ServiceSettings, prompt: str, seed: int, negative_prompt: str | None = None,
              image: str | None = None, width: int | None = None, height: int | None = None,
              num_frames: int | None = None, infer_steps: int | None = None, guide_scale: float | None = None,
              names: dict[str, str] | None = None, save_result_path: str | None = None) -> dict[str, Any]:
    """Check the values (the engine's own rules, then this server's limits) and return the job dict.
    `names` maps config keys to the request's field names for the error messages."""
    values = {"target_width": width, "target_height": height, "target_video_length": num_frames,
              "infer_steps": infer_steps, "sample_guide_scale": guide_scale}
    values = {k: v for k, v in values.items() if v is not None}
    names = names or {}
    problems = check_values(values, where="field", names=names)
    limits = {"target_width": settings.max_side, "target_height": settings.max_side,
              "target_video_length": settings.max_frames, "infer_steps": settings.max_infer_steps}
    for key, limit in limits.items():
        if key in values and values[key] > limit:
            problems.append(f"field '{names.get(key, key)}': this server allows at most {limit} "
                            f"(got {values[key]})")
    if guide_scale is not None and not math.isfinite(guide_scale):
        problems.append(f"field '{names.get('sample_guide_scale', 'guide_scale')}': must be finite")
    if problems:
        raise RequestError(422, "; ".join(problems))
    overrides = {"width": width, "height": height, "num_frames": num_frames, "infer_steps": infer_steps,
                 "guide_scale": guide_scale}
    return {"prompt": prompt, "negative_prompt": negative_prompt, "image": image, "seed": int(seed),
            "overrides": {k: v for k, v in overrides.items() if v is not None},
            "save_result_path": save_result_path}


def request_lora(settings: ServiceSettings, name: str | None, strength: float) -> dict[str, Any]:
    """LightX2V's per-request LoRA: `lora_name` is a file in the server's --lora-dir, applied with
    `lora_strength` as LightX2V's worker does (switch_lora: the high-noise expert of a Wan2.2 model, the DiT of a
    Wan2.1 one). Becomes the row's `lora` / `lora_strength` manifest columns, so it is part of the denoise keys
    and tasks with the same LoRA share each patched expert. None: no LoRA (the config's lora_configs)."""
    if name is None:
        return {}
    if not settings.lora_dir:
        raise RequestError(422, "lora_name: this server has no LoRA folder (start it with --lora-dir DIR)")
    if not name or "/" in name or "\\" in name or name.startswith(".") or "\0" in name:
        raise RequestError(422, f"lora_name: {name!r} must be a file name in the server's LoRA folder")
    path = (Path(settings.lora_dir) / name).resolve()
    if path.parent != Path(settings.lora_dir).resolve() or not path.is_file():
        raise RequestError(422, f"lora_name: no LoRA file {name!r} in the server's LoRA folder")
    if not math.isfinite(strength):
        raise RequestError(422, "lora_strength: must be a finite number")
    return {"lora": str(path), "lora_strength": float(strength)}


def check_task_id(task_id: str) -> str:
    if not SAFE_JOB_ID.match(task_id) or ".." in task_id:
        raise RequestError(422, f"task_id: {task_id!r} is not allowed (letters, digits, '.', '_', '-'; at most 128)")
    return task_id


MAX_NAME_BYTES = 200  # a path component; the atomic writer's temp name adds ~20 bytes to it (limit 255)


def check_save_result_path(value: str, settings: ServiceSettings) -> str:
    """LightX2V's save_result_path: relative to the outputs folder, or absolute inside one of the result roots
    (the outputs folder, --output-root folders); '.mp4' is added when there is no suffix. Checked here, where
    the client can be told, and again when the video is published (result_target)."""
    path = PurePosixPath(value.replace("\\", "/"))
    if "\0" in value or ".." in path.parts or any(p.startswith("~") for p in path.parts):
        raise RequestError(422, f"save_result_path: {value!r} must name a file inside the server's outputs folder "
                              "(no '..', no '~', no NUL)")
    parts = [p for p in path.parts if p not in (".", "/")]
    if not parts:
        raise RequestError(422, f"save_result_path: {value!r} names no file")
    long = next((p for p in parts if len(p.encode()) > MAX_NAME_BYTES), None)
    if long is not None:
        raise RequestError(422, f"save_result_path: the name {long[:40]!r}... has {len(long.encode())} bytes; "
                              f"at most {MAX_NAME_BYTES} per folder or file name")
    path = PurePosixPath("/" if path.is_absolute() else "", *parts)
    if not path.suffix:
        path = path.with_suffix(".mp4")
    if path.suffix.lower() != ".mp4":
        raise RequestError(422, f"save_result_path: this server writes MP4 files; {value!r} has suffix {path.suffix}")
    saved = str(path)
    target = result_target(settings, saved, "save_result_path")
    for parent in target.parents:  # a file where a folder is needed: refuse now, not when publishing
        if parent.exists() and not parent.is_dir():
            raise RequestError(422, f"save_result_path: {value!r} needs {parent.name!r} to be a folder, and a "
                                  "file of that name exists")
    if target.is_dir():
        raise RequestError(422, f"save_result_path: {value!r} is a folder")
    return saved


def result_target(settings: ServiceSettings, saved: str, field: str = "save_result_path") -> Path:
    """Where a task's save_result_path is written, symlinks resolved; RequestError when that is outside every
    result root (a relative path through a symlink included)."""
    roots = settings.result_roots()
    path = Path(saved) if PurePosixPath(saved).is_absolute() else settings.outputs / saved
    real = path.resolve()
    if not any(real.is_relative_to(r) for r in roots):
        where = "resolves outside" if not PurePosixPath(saved).is_absolute() else "is outside"
        raise RequestError(422, f"{field}: {saved!r} {where} the folders this server writes results to "
                              f"({', '.join(map(str, roots))}; add one with --output-root)")
    return real
