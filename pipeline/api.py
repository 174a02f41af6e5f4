"""The Python API, shaped like LightX2V's `LightX2VPipeline` so a LightX2V script ports by changing its import:

    from pipeline.api import LightX2VPipeline          # was: from lightx2v import LightX2VPipeline
    pipe = LightX2VPipeline(model_path="/models/Wan2.2-T2V-A14B", model_cls="wan2.2_moe", task="t2v")
    pipe.create_generator(config_json="configs/wan22/wan_moe_t2v.json")   # or attn_mode=, infer_steps=, ...
    pipe.generate(seed=42, prompt="...", negative_prompt="...", save_result_path="out.mp4")

Backed by the batch engine, not a second code path: every call runs RunManifest in this process (local
scheduler, one worker), so a job goes through the same stages, cache keys and artifact store as `wan-batch run`
and `luigi --module pipeline RunManifest`; models stay resident between calls in the process-wide model cache
(runtime.MODELS), a second identical call is a cache hit, and a call killed midway resumes from its finished
stages. `generate_batch` takes many rows and runs them stage-major.

What LightX2V's arguments mean here: the keys they set are LightX2V's config keys with the meanings of
pipeline/config.py (a key we do not run is refused there, naming it). Arguments for model families we do not
run (audio, action, video-to-video, VACE references...) are refused when given, never ignored.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from .batch import load_batch
from .config import BUILTIN_TINY, GenerationConfig, load_config, parse_config
from .errors import WanBatchError
from .store import ArtifactStore, atomic_path, atomic_write_text

log = logging.getLogger("wan_batch.api")

# LightX2V model classes that are Wan2.1/Wan2.2 T2V/I2V as this engine runs them.
MODEL_CLASSES = ("wan2.1", "wan2.1_distill", "wan2.2_moe", "wan2.2_moe_distill")
# create_generator's arguments with no effect on a Wan video here, and the value LightX2V uses by default:
# changing one is refused (it would be silently ignored otherwise).
_NO_EFFECT_DEFAULTS = {"aspect_ratio": "16:9", "resize_mode": None, "audio_fps": 24000,
                       "distilled_sigma_values": None}
# kernel choices LightX2V exposes that give the same result here (docs/config.md)
_KERNEL_CHOICES = ("rope_type", "double_precision_rope", "norm_modulate_backend")
# generate()'s arguments LightX2V always passes (video super-resolution, reference prompts) with no effect on a
# Wan T2V/I2V video: accepted at LightX2V's defaults only
_GENERATE_NO_EFFECT = {"sr_ratio": 2.0, "prompt_ref": "人物动作的参考视频"}


@dataclass
class GenerationResult:
    """What one `generate` made: the video (where save_result_path put it), its job and artifact keys."""
    video: Path
    job_id: str
    status: str
    error: str | None
    cached_stages: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    decode_key: str | None = None
    frames: Any = None  # uint8 [F, H, W, 3] with return_result_tensor=True


class WanBatchPipeline:
    """Load once, generate many times, share the store with the batches (module doc)."""

    def __init__(self, task: str = "t2v", model_path: str = "", model_cls: str = "", support_tasks=None,
                 sf_model_path=None, dit_original_ckpt=None, low_noise_original_ckpt=None,
                 high_noise_original_ckpt=None, transformer_model_name=None, *, store: str | os.PathLike = "wan-store",
                 work_dir: str | os.PathLike = "wan-api-runs"):
        if model_cls and model_cls not in MODEL_CLASSES:
            raise WanBatchError(f"model_cls {model_cls!r} is not run by wan-batch (it runs {', '.join(MODEL_CLASSES)})")
        if sf_model_path or transformer_model_name or support_tasks:
            raise WanBatchError("sf_model_path / transformer_model_name / support_tasks are for Self-Forcing, "
                                "MiniMax and other model families that wan-batch does not run")
        if task not in ("t2v", "i2v"):
            raise WanBatchError(f"task {task!r}: wan-batch runs t2v and i2v")
        self.task = task
        self.model_path = model_path
        self.model_cls = model_cls
        self.store = Path(store)
        self.work_dir = Path(work_dir)
        self.values: dict[str, Any] = {"task": task}
        if model_cls:
            self.values["model_cls"] = model_cls
        if model_path:
            self.values["model_path"] = model_path if model_path == BUILTIN_TINY else str(Path(model_path).resolve())
        for key, value in (("dit_original_ckpt", dit_original_ckpt), ("low_noise_original_ckpt", low_noise_original_ckpt),
                           ("high_noise_original_ckpt", high_noise_original_ckpt)):
            if value:
                self.values[key] = str(Path(value).resolve())
        self._config_path: Path | None = None

    # -- configuration (LightX2V's methods) -----------------------------------------------------------------
    def create_generator(self, attn_mode="flash_attn2", infer_steps=50, num_frames=81, height=480, width=832,
                         guidance_scale=5.0, sample_shift=5.0, fps=16, aspect_ratio="16:9", boundary=0.900,
                         boundary_step_index=2, denoising_step_list=(1000, 750, 500, 250), config_json=None,
                         rope_type="torch_complex_rope", resize_mode=None, audio_fps=24000,
                         double_precision_rope=True, norm_modulate_backend="torch",
                         distilled_sigma_values=None) -> "WanBatchPipeline":
        """From a LightX2V config JSON, or from these arguments as LightX2V sets them. Reads and checks the
        config now (every key), so a bad value is reported here rather than at the first generate."""
        if config_json is not None:
            raw = json.loads(Path(config_json).read_text(encoding="utf-8"))
            if not isinstance(raw, dict):
                raise WanBatchError(f"{config_json}: the top level must be a JSON object")
            # LightX2V's update(config_json): the file's keys over what the constructor set, except the
            # model path given on the command line / constructor, which wins as LightX2V's --model_path does
            self.values = {**self.values, **raw, **{k: v for k, v in self.values.items() if k == "model_path"}}
        else:
            given = dict(aspect_ratio=aspect_ratio, resize_mode=resize_mode, audio_fps=audio_fps,
                         distilled_sigma_values=distilled_sigma_values)
            changed = [k for k, v in given.items() if v != _NO_EFFECT_DEFAULTS[k]]
            if changed:
                raise WanBatchError(f"create_generator: {', '.join(changed)} have no effect on a Wan T2V/I2V video "
                                    "in wan-batch; leave them at LightX2V's defaults")
            self.values.update({
                "self_attn_1_type": attn_mode, "cross_attn_1_type": attn_mode, "cross_attn_2_type": attn_mode,
                "infer_steps": infer_steps, "target_video_length": num_frames, "target_height": height,
                "target_width": width, "sample_guide_scale": guidance_scale, "sample_shift": sample_shift,
                # LightX2V: CFG is on unless the guidance scale is 1
                "enable_cfg": guidance_scale != 1, "fps": fps, "boundary": boundary,
            })
            if self.model_cls.endswith("_distill"):
                self.values.update(denoising_step_list=list(denoising_step_list),
                                   boundary_step_index=boundary_step_index)
            log.debug("kernel choices with the same result here: %s",
                      {k: v for k, v in zip(_KERNEL_CHOICES, (rope_type, double_precision_rope, norm_modulate_backend))})
        self.config()  # read and checked now
        return self

    def set_infer_config_json(self, config_json) -> None:
        self.create_generator(config_json=config_json)

    def enable_offload(self, cpu_offload=False, offload_granularity="block", text_encoder_offload=False,
                       image_encoder_offload=False, vae_offload=False) -> None:
        self.values.update(cpu_offload=cpu_offload, offload_granularity=offload_granularity,
                           t5_cpu_offload=text_encoder_offload, clip_cpu_offload=image_encoder_offload,
                           vae_cpu_offload=vae_offload)
        self._changed()

    def enable_quantize(self, dit_quantized=False, text_encoder_quantized=False, image_encoder_quantized=False,
                        dit_quantized_ckpt=None, low_noise_quantized_ckpt=None, high_noise_quantized_ckpt=None,
                        text_encoder_quantized_ckpt=False, image_encoder_quantized_ckpt=False,
                        quant_scheme="fp8-sgl", text_encoder_quant_scheme=None, skip_fp8_block_index=None) -> None:
        if skip_fp8_block_index is not None:
            raise WanBatchError("enable_quantize: skip_fp8_block_index is LightX2V's LTX-2 setting; it has no effect "
                                "on a Wan model")
        if text_encoder_quant_scheme is not None:
            raise WanBatchError("enable_quantize: text_encoder_quant_scheme is read for LightX2V's HunyuanVideo-1.5 / "
                                "Qwen-Image text encoders; a Wan model's T5 and CLIP take quant_scheme")
        # LightX2V's Wan branch: t5_quant_scheme = clip_quant_scheme = quant_scheme
        values = dict(dit_quantized=dit_quantized, dit_quant_scheme=quant_scheme, t5_quantized=text_encoder_quantized,
                      clip_quantized=image_encoder_quantized, t5_quant_scheme=quant_scheme,
                      clip_quant_scheme=quant_scheme)
        for key, value in (("dit_quantized_ckpt", dit_quantized_ckpt), ("low_noise_quantized_ckpt", low_noise_quantized_ckpt),
                           ("high_noise_quantized_ckpt", high_noise_quantized_ckpt),
                           ("t5_quantized_ckpt", text_encoder_quantized_ckpt),
                           ("clip_quantized_ckpt", image_encoder_quantized_ckpt)):
            if value:
                values[key] = str(Path(value).resolve())
        self.values.update(values)
        self._changed()

    def enable_lightvae(self, use_lightvae=False, use_tae=False, vae_path=None, tae_path=None) -> None:
        """LightX2V's enable_lightvae: use_tae with a tae_path naming a lighttae file (LightX2V's
        lighttaew2_1, trained on un-normalized latents) also sets need_scaled, as LightX2V does for Wan."""
        self.values.update(use_lightvae=use_lightvae, use_tae=use_tae,
                           **({"vae_path": vae_path} if vae_path else {}), **({"tae_path": str(Path(tae_path).resolve())} if tae_path else {}))
        if use_tae and tae_path and "lighttae" in str(tae_path):
            self.values["need_scaled"] = True
        self._changed()

    def enable_cache(self, cache_method="Tea", coefficients=(), teacache_thresh=0.15, use_ret_steps=False,
                     magcache_calibration=False, magcache_K=6, magcache_thresh=0.24, magcache_retention_ratio=0.2,
                     magcache_ratios=()) -> None:
        self.values["feature_caching"] = cache_method
        if cache_method == "Tea":
            self.values.update(coefficients=list(coefficients), teacache_thresh=teacache_thresh,
                               use_ret_steps=use_ret_steps)
        elif cache_method == "Mag":
            self.values.update(magcache_calibration=magcache_calibration, magcache_K=magcache_K,
                               magcache_thresh=magcache_thresh, magcache_retention_ratio=magcache_retention_ratio,
                               magcache_ratios=list(magcache_ratios))
        self._changed()

    def enable_parallel(self, cfg_p_size=1, seq_p_size=1, seq_p_attn_type="ulysses") -> None:
        self.values["parallel"] = {"cfg_p_size": cfg_p_size, "seq_p_size": seq_p_size,
                                   "seq_p_attn_type": seq_p_attn_type}
        self._changed()

    def enable_lora(self, lora_configs: list[dict], lora_dynamic_apply: bool = False) -> None:
        """LoRAs per expert ([{name: high_noise_model | low_noise_model, path, strength}]). wan-batch merges
        them into the expert it loads; `lora_dynamic_apply` (LightX2V's unmerged path) is kept as the config key
        of that name, a kernel choice with the same result (docs/config.md). The LoRA set is part of the
        expert's fingerprint, so an expert with and one without a LoRA never share a cache entry, and switching
        back returns the unpatched weights exactly."""
        self.values["lora_configs"] = [dict(c, path=str(Path(c["path"]).resolve())) if c.get("path") else dict(c)
                                       for c in lora_configs]
        self.values["lora_dynamic_apply"] = lora_dynamic_apply
        self._changed()

    def switch_lora(self, lora_path: str = "", strength: float = 1.0, *, high_lora_path: str | None = None,
                    high_lora_strength: float = 1.0, low_lora_path: str | None = None,
                    low_lora_strength: float = 1.0) -> None:
        """LightX2V's switch_lora: on a two-expert (MoE) model the positional LoRA goes to the high-noise
        expert, as LightX2V's Wan2.2 runner does (pass low_lora_path for the other); on a one-DiT model to the
        model. An empty path removes that expert's LoRA. The next generate uses the new set."""
        experts = self._experts()
        moe = "high" in experts
        if moe:
            updates = {"high_noise_model": (high_lora_path if high_lora_path is not None else lora_path,
                                            high_lora_strength if high_lora_path is not None else strength)}
            if low_lora_path is not None:
                updates["low_noise_model"] = (low_lora_path, low_lora_strength)
        else:
            updates = {None: (lora_path, strength)}
        current = [dict(c) for c in self.values.get("lora_configs") or []]
        for name, (path, weight) in updates.items():
            current = [c for c in current if c.get("name") != name]
            if path:
                entry = {"path": str(Path(path).resolve()), "strength": float(weight)}
                if name:
                    entry["name"] = name
                current.append(entry)
        self.values["lora_configs"] = current
        log.info("LoRA set now: %s", current or "none")
        self._changed()

    # -- generating ------------------------------------------------------------------------------------------
    def generate(self, seed: int = 42, prompt: str = "", negative_prompt: str = "",
                 save_result_path: str | os.PathLike = "lightx2v_gen_result.mp4", task: str | None = None,
                 image_path: str | None = None, num_frames: int | None = None, return_result_tensor: bool = False,
                 target_shape=(), **unsupported) -> GenerationResult:
        """One video through the batch engine; the MP4 is copied (atomically) to save_result_path."""
        given = [k for k, v in unsupported.items() if v not in (None, "", [], (), False)
                 and _GENERATE_NO_EFFECT.get(k, object()) != v]
        if given or target_shape:
            raise WanBatchError(f"generate: {', '.join(given or ['target_shape'])} belong to model families "
                                "wan-batch does not run (Wan T2V/I2V only)")
        if task is not None and task != self.task:
            raise WanBatchError(f"generate(task={task!r}): this pipeline was made for {self.task}; make another")
        # an empty negative prompt is encoded as given, as LightX2V's Wan runner does
        row = {"job_id": _job_id(), "prompt": prompt, "negative_prompt": negative_prompt, "seed": seed,
               "image": str(Path(image_path).resolve()) if image_path else None,
               "num_frames": num_frames}
        result = self.generate_batch([row])[0]
        dest = Path(save_result_path)
        if result.status == "ok":
            dest.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(dest) as tmp:
                shutil.copyfile(result.video, tmp)
            result.video = dest
            if return_result_tensor:
                from .stages.decode import read_video

                result.frames = read_video(dest)
        else:
            raise WanBatchError(f"generate failed: {result.error}")
        return result

    def generate_batch(self, rows: Iterable[dict] | Any, output_dir: str | os.PathLike | None = None,
                       strict: bool = False) -> list[GenerationResult]:
        """Many rows at once, stage-major (each model loaded once for the whole batch): a list of dicts (manifest
        columns), a pandas DataFrame, a pyarrow Table, or the path of a Parquet manifest."""
        from tasks.build import run_batch

        run_id = uuid.uuid4().hex[:12]
        folder = self.work_dir / run_id
        folder.mkdir(parents=True, exist_ok=True)
        manifest = _write_rows(rows, folder / "manifest.parquet")
        out = Path(output_dir) if output_dir is not None else folder / "outputs"
        config = str(self.config_path())
        batch = load_batch(manifest, config, strict=strict)  # refuses a bad manifest before Luigi starts
        run_batch(str(manifest), config=config, output_dir=str(out), store=str(self.store), strict=strict,
                  local_scheduler=True)
        results = {r["job_id"]: r for r in pq.read_table(out / "results.parquet").to_pylist()}
        made = []
        for plan in batch.plans:
            r = results[plan.job.job_id]
            made.append(GenerationResult(
                video=Path(r["video"]) if r["video"] else out / f"{plan.job.job_id}.mp4", job_id=r["job_id"],
                status=r["status"], error=r["error"], cached_stages=list(r["cached_stages"] or []),
                seconds={k[len("seconds_"):]: v for k, v in r.items() if k.startswith("seconds_") and v is not None},
                decode_key=plan.decode.key if plan.decode is not None else None))
        return made

    def inspect(self, key: str, with_stats: bool = True):
        """The chain of artifacts behind a result (its decode_key, or any artifact key): pipeline.inspect's
        StageInfo objects (status, tensors' statistics, timings, cache hits), upstream first."""
        from .inspect import chain_from_key, inspect_chain

        store = ArtifactStore(self.store)
        infos, _ = inspect_chain(store, chain_from_key(store, key), with_stats=with_stats)
        return infos

    # -- the config behind it all ------------------------------------------------------------------------------
    def config(self) -> GenerationConfig:
        return parse_config(dict(self.values), source="LightX2VPipeline", base_dir=Path.cwd())

    def config_path(self) -> Path:
        """The config as a JSON file (RunManifest reads a file), named by its content: the same settings are
        the same file, so calls share model fingerprints and cache entries."""
        if self._config_path is None:
            text = json.dumps(self.values, sort_keys=True, indent=1)
            self.config()  # checked before it is written
            path = self.work_dir / f"config-{hashlib.sha256(text.encode()).hexdigest()[:16]}.json"
            if not path.is_file():
                atomic_write_text(path, text)
            self._config_path = path
        return self._config_path

    def _changed(self) -> None:
        self._config_path = None

    def _experts(self) -> tuple[str, ...]:
        from .models.loader import resolve_model

        return resolve_model(load_config(str(self.config_path())), self.task).experts


LightX2VPipeline = WanBatchPipeline  # the name a LightX2V script imports


def _job_id() -> str:
    return "api-" + uuid.uuid4().hex[:12]


def _write_rows(rows, path: Path) -> Path:
    if isinstance(rows, (str, os.PathLike)):
        return Path(rows)
    if isinstance(rows, pa.Table):
        table = rows
    elif hasattr(rows, "to_dict") and hasattr(rows, "columns"):  # a pandas DataFrame
        table = pa.Table.from_pandas(rows, preserve_index=False)
    else:
        rows = [{k: v for k, v in dict(r).items() if v is not None} for r in rows]
        for r in rows:
            r.setdefault("job_id", _job_id())
        columns = list(dict.fromkeys(k for r in rows for k in r))
        table = pa.Table.from_pylist([{k: r.get(k) for k in columns} for r in rows])
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path
