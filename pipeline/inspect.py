"""Look inside one job's chain of stage artifacts: status, tensor statistics, timings, cache hits, previews.

A chain comes from a job (its plan under a manifest + config: exactly the keys a run would use) or from one
cache key (its sidecar's upstream keys, followed back to the start). For each artifact: status (ok, missing,
corrupt, failed), key, shapes, dtype, min/max/mean/std over the finite values, NaN/Inf counts, wall time, model
fingerprint, the run that wrote it and whether that was a cache hit for the chain's latest run.

Previews are PNGs a person can look at without the VAE: the input image after resize/crop, the denoise
outputs through Wan's linear latent-to-RGB approximation, and the first, middle and last decoded frames.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import WanBatchError
from .stages.decode import read_video  # noqa: F401  (inspect.read_video: used by the report and tests)
from .stages.registry import STAGES, job_stage_names, role_name, stage_of, stage_of_name
from .store import ArtifactRef, ArtifactStore, atomic_path

STAGE_ORDER = job_stage_names()

# Wan 2.1 VAE latent (16 channels; Wan2.2 A14B uses the same VAE) -> RGB in [-1, 1]: a linear fit of the
# decoder, the numbers ComfyUI uses for its Wan21 latent previews (comfy/latent_formats.py, class Wan21). They
# apply to the normalised latents the DiT works on ((z - mean) / std), which is what our artifacts hold.
WAN21_LATENT_RGB_FACTORS = [
    [-0.1299, -0.1692, 0.2932], [0.0671, 0.0406, 0.0442], [0.3568, 0.2548, 0.1747], [0.0372, 0.2344, 0.1420],
    [0.0313, 0.0189, -0.0328], [0.0296, -0.0956, -0.0665], [-0.3477, -0.4059, -0.2925], [0.0166, 0.1902, 0.1975],
    [-0.0412, 0.0267, -0.1364], [-0.1293, 0.0740, 0.1636], [0.0680, 0.3019, 0.1128], [0.0032, 0.0581, 0.0639],
    [-0.1251, 0.0927, 0.1699], [0.0060, -0.0633, 0.0005], [0.3477, 0.2275, 0.2950], [0.1984, 0.0913, 0.1861],
]
WAN21_LATENT_RGB_BIAS = [-0.1835, -0.0868, -0.3360]
VAE_SPATIAL = 8


@dataclass
class StageInfo:
    name: str  # a job-level stage name (stages.registry.job_stage_names)
    ref: ArtifactRef
    status: str = "missing"  # ok | missing | corrupt | failed
    detail: str = ""  # why it is not ok
    sidecar: dict[str, Any] | None = None
    tensors: dict[str, dict[str, Any]] = field(default_factory=dict)
    cache: str | None = None  # hit | miss (relative to the chain's latest run), None when not written

    @property
    def wall_s(self) -> float | None:
        return (self.sidecar or {}).get("wall_s")

    @property
    def run_id(self) -> str | None:
        return (self.sidecar or {}).get("run_id")

    @property
    def model_fingerprint(self) -> str | None:
        params = (self.sidecar or {}).get("params") or {}
        return params.get(stage_of_name(self.name).fingerprint_param) if self.name in STAGE_ORDER else None

    def to_dict(self) -> dict[str, Any]:
        side = self.sidecar or {}
        return {"name": self.name, "stage": self.ref.stage, "key": self.ref.key, "status": self.status,
                "detail": self.detail, "cache": self.cache, "wall_s": self.wall_s, "run_id": self.run_id,
                "written_at": side.get("written_at"), "model_fingerprint": self.model_fingerprint,
                "device": side.get("device"), "host": side.get("host"), "upstream": side.get("upstream"),
                "payload": self.ref.key + "." + self.ref.ext, "tensors": self.tensors}


# -- finding artifacts -----------------------------------------------------------------------------------------
def _key_from_name(name: str) -> str:
    return name.split(".", 1)[0]


def locate(store: ArtifactStore, key: str) -> ArtifactRef:
    """The artifact whose cache key is (or starts with) `key`, in any stage folder of the store."""
    key = key.strip().lower()
    if len(key) < 4 or any(c not in "0123456789abcdef" for c in key):
        raise WanBatchError(f"{key!r} is not a cache key (hex, at least 4 characters)")
    found: dict[str, str] = {}
    for stage in STAGES:
        folder = store.root / stage / key[:2]
        for path in folder.glob(f"{key}*.json"):
            found[_key_from_name(path.name)] = stage
    if not found:
        raise WanBatchError(f"no artifact with key {key} in store {store.root}")
    if len(found) > 1:
        listing = ", ".join(f"{s}/{k[:16]}" for k, s in sorted(found.items()))
        raise WanBatchError(f"key prefix {key} is ambiguous in {store.root}: {listing}")
    full, stage = next(iter(found.items()))
    return ArtifactRef(stage, full, stage_of(stage).ext)


def chain_from_key(store: ArtifactStore, key: str) -> list[tuple[str, ArtifactRef]]:
    """(name, ref) of the artifact and everything upstream of it, found through the sidecars."""
    start = locate(store, key)
    out: dict[str, tuple[str, ArtifactRef]] = {}

    def visit(name: str, ref: ArtifactRef) -> None:
        if ref.key in out:
            return
        side = store.sidecar(ref) or {}
        for up_name, up_key in (side.get("upstream") or {}).items():
            try:
                up = locate(store, up_key)
            except WanBatchError:  # an upstream artifact that is gone: show it as missing
                up = ArtifactRef("?", up_key)
            visit(role_name(up_name, up.stage), up)
        out[ref.key] = (name, ref)

    visit(start.stage, start)
    return sort_chain(list(out.values()))


def chain_from_plan(plan) -> list[tuple[str, ArtifactRef]]:
    """(name, ref) of every stage of a job, from its plan (pipeline.plan.JobPlan)."""
    return sort_chain([(name, spec.ref) for name, spec in plan.stages().items()])


def sort_chain(chain: list[tuple[str, ArtifactRef]]) -> list[tuple[str, ArtifactRef]]:
    return sorted(chain, key=lambda item: STAGE_ORDER.index(item[0]) if item[0] in STAGE_ORDER else 99)


def find_job(manifest: str, config_path: str | None, job_id: str, model_path: str | None = None):
    """The plan of one job of a manifest (by job_id) under a config."""
    from .batch import load_batch

    return load_batch(manifest, config_path, model_path=model_path).plan_of(job_id)


# -- statistics ------------------------------------------------------------------------------------------------
def tensor_stats(t: torch.Tensor | np.ndarray) -> dict[str, Any]:
    """shape, dtype, and min/max/mean/std over the finite values (float64), with the NaN and Inf counts."""
    if isinstance(t, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(t))
    x = t.detach().cpu()
    stats: dict[str, Any] = {"shape": list(x.shape), "dtype": str(x.dtype).replace("torch.", "")}
    x = x.to(torch.float64)
    nan = int(torch.isnan(x).sum())
    inf = int(torch.isinf(x).sum())
    finite = x[torch.isfinite(x)]
    stats.update(nan=nan, inf=inf, numel=int(x.numel()))
    if finite.numel():
        stats.update(min=float(finite.min()), max=float(finite.max()), mean=float(finite.mean()),
                     std=float(finite.std(unbiased=False)))
    else:
        stats.update(min=None, max=None, mean=None, std=None)
    return stats


def load_payload(store: ArtifactStore, ref: ArtifactRef) -> dict[str, torch.Tensor | np.ndarray]:
    if ref.ext == "mp4":
        return {"frames": read_video(store.payload_path(ref))}
    return store.load_tensors(ref)


def inspect_chain(store: ArtifactStore, chain: list[tuple[str, ArtifactRef]],
                  with_stats: bool = True) -> tuple[list[StageInfo], str | None]:
    """StageInfo per artifact, and the chain's latest run id (the run a 'hit' or 'miss' refers to)."""
    infos: list[StageInfo] = []
    for name, ref in chain:
        info = StageInfo(name, ref)
        ok, reason = store.check(ref) if ref.stage != "?" else (False, "missing")
        info.sidecar = store.sidecar(ref) if ref.stage != "?" else None
        if ok:
            info.status = "ok"
            if with_stats:
                try:
                    info.tensors = {k: tensor_stats(v) for k, v in load_payload(store, ref).items()}
                except Exception as e:  # a payload that passes sha256 but cannot be parsed
                    info.status, info.detail = "corrupt", f"cannot read the payload: {e}"
        else:
            failure = store.failure(ref) if ref.stage != "?" else None
            if reason != "missing":
                info.status, info.detail = "corrupt", reason
            elif failure:
                info.status, info.detail = "failed", f"{failure.get('error')} (run {failure.get('run_id')})"
            else:
                info.status, info.detail = "missing", "not computed yet"
        infos.append(info)
    written = [i for i in infos if i.sidecar and i.status == "ok"]
    latest = max(written, key=lambda i: i.sidecar.get("written_at") or 0).run_id if written else None
    for info in written:
        info.cache = "miss" if info.run_id == latest else "hit"
    return infos, latest


# -- previews --------------------------------------------------------------------------------------------------
def latent_to_rgb(latents: torch.Tensor) -> np.ndarray:
    """Wan latents [1 or none, 16, T, h, w] -> uint8 RGB frames [T, h, w, 3] (linear approximation)."""
    z = latents.detach().float().cpu()
    if z.ndim == 5:
        z = z[0]
    if z.ndim != 4 or z.shape[0] != len(WAN21_LATENT_RGB_FACTORS):
        raise WanBatchError(f"expected Wan latents with 16 channels [1, 16, T, h, w], got {list(latents.shape)}")
    factors = torch.tensor(WAN21_LATENT_RGB_FACTORS)  # [16, 3]
    rgb = torch.einsum("cthw,cr->thwr", z, factors) + torch.tensor(WAN21_LATENT_RGB_BIAS)
    rgb = ((rgb + 1.0) / 2.0).clamp(0, 1)
    rgb = torch.nan_to_num(rgb, nan=0.0)
    return (rgb * 255).round().to(torch.uint8).numpy()


def pick_frames(n: int) -> list[tuple[str, int]]:
    """('first', 0), ('middle', n // 2), ('last', n - 1)."""
    return [("first", 0), ("middle", n // 2), ("last", n - 1)]


def _save_png(array: np.ndarray, path: Path) -> Path:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(array), "RGB").save(tmp, format="PNG")
    return path


def latent_strip(latents: torch.Tensor) -> np.ndarray:
    """First, middle and last latent frame side by side, each upscaled 8x (nearest) to the video's size."""
    frames = latent_to_rgb(latents)
    panels = [frames[i].repeat(VAE_SPATIAL, 0).repeat(VAE_SPATIAL, 1) for _, i in pick_frames(len(frames))]
    return np.concatenate(panels, axis=1)


def denoised_estimate(tensors: dict[str, torch.Tensor], sidecar: dict[str, Any]) -> torch.Tensor | None:
    """The solver's latest clean-video (x0) prediction saved with a denoise artifact (UniPC keeps it as its
    newest model output), else None. Less noisy than the latents after the high-noise expert."""
    state = (sidecar or {}).get("scheduler_state") or {}
    outputs = (state.get("model_outputs") or {}).get("list") or []
    names = [node.get("tensor") for node in outputs if isinstance(node, dict) and node.get("tensor")]
    names = [n for n in names if n in tensors]
    return tensors[names[-1]] if names else None


def write_previews(store: ArtifactStore, infos: list[StageInfo], out_dir: Path) -> list[Path]:
    """PNG previews of the artifacts that are ok; returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for info in infos:
        if info.status != "ok":
            continue
        if info.ref.stage == "image":
            pixels = store.load_tensors(info.ref)["image"]
            written.append(_save_png(pixels.numpy(), out_dir / "image_input.png"))
        elif info.ref.stage.startswith("denoise"):
            tensors = store.load_tensors(info.ref)
            written.append(_save_png(latent_strip(tensors["latents"]), out_dir / f"{info.name}_latents.png"))
            x0 = denoised_estimate(tensors, info.sidecar)
            if x0 is not None:
                written.append(_save_png(latent_strip(x0), out_dir / f"{info.name}_x0.png"))
        elif info.ref.stage == "decode":
            frames = read_video(store.payload_path(info.ref))
            for label, i in pick_frames(len(frames)):
                written.append(_save_png(frames[i], out_dir / f"decode_frame_{label}.png"))
    return written


# -- text output -----------------------------------------------------------------------------------------------
def _num(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return str(v)
    return f"{v:.4g}"


def format_chain(infos: list[StageInfo], latest: str | None, header: str) -> str:
    def run_name(run_id: str | None, written: bool) -> str:
        return run_id if run_id else ("(direct)" if written else "-")  # "": a stage task run without a run id

    lines = [header, f"latest run: {run_name(latest, latest is not None)}  (cache 'hit' = this artifact was "
                     "reused from an earlier run)", ""]
    lines.append(f"{'stage':<15}{'key':<14}{'status':<9}{'cache':<7}{'wall_s':>8}  {'model':<17}{'run':<14}device")
    for info in infos:
        side = info.sidecar or {}
        wall = f"{info.wall_s:.2f}" if info.wall_s is not None else "-"
        lines.append(f"{info.name:<15}{info.ref.key[:12]:<14}{info.status:<9}{info.cache or '-':<7}{wall:>8}  "
                     f"{info.model_fingerprint or '-':<17}{run_name(info.run_id, bool(side)):<14}{side.get('device', '-')}")
        if info.detail:
            lines.append(f"    ! {info.detail}")
        for name, s in info.tensors.items():
            if name.startswith("sched."):
                continue  # solver state: in --json only
            lines.append(f"    {name:<10} {str(s['shape']):<22} {s['dtype']:<8} min {_num(s['min'])}  "
                         f"max {_num(s['max'])}  mean {_num(s['mean'])}  std {_num(s['std'])}  "
                         f"nan {s['nan']}  inf {s['inf']}")
    return "\n".join(lines)


def to_json(infos: list[StageInfo], latest: str | None, extra: dict[str, Any] | None = None) -> str:
    return json.dumps({**(extra or {}), "latest_run": latest, "stages": [i.to_dict() for i in infos]}, indent=1)
