"""LightX2V-style JSON config: read, validate (every problem at once), apply per-row overrides.

A LightX2V user's Wan2.2 config works unchanged: its keys keep LightX2V's meaning. Our own keys (model
location, device, memory budgets) are listed in OUR_KEYS and documented in README. Keys we know LightX2V
uses but that do not change our output (kernel choices, parallel layout) are accepted silently; anything
else gets a warning naming the key, never silence.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .parallel.layout import problems as parallel_problems

log = logging.getLogger(__name__)

BUILTIN_TINY = "builtin:tiny"

# key -> (accepted python types, short description used in error messages)
_NUM = (int, float)
LIGHTX2V_KEYS: dict[str, tuple[tuple[type, ...], str]] = {
    "infer_steps": ((int,), "a positive integer"),
    "target_video_length": ((int,), "an integer of the form 4k+1"),
    "text_len": ((int,), "a positive integer"),
    "target_height": ((int,), "a positive multiple of 16"),
    "target_width": ((int,), "a positive multiple of 16"),
    "sample_guide_scale": ((int, float, list), "a number or a [high_noise, low_noise] pair"),
    "sample_shift": (_NUM, "a positive number"),
    "enable_cfg": ((bool,), "true or false"),
    "boundary": (_NUM, "a number in (0, 1)"),
    "boundary_step_index": ((int,), "an index into denoising_step_list"),
    "denoising_step_list": ((list,), "a list of timesteps in (0, 1000], decreasing"),
    "self_attn_1_type": ((str,), "an attention backend name"),
    "cross_attn_1_type": ((str,), "an attention backend name"),
    "cross_attn_2_type": ((str,), "an attention backend name"),
    "cpu_offload": ((bool,), "true or false"),
    "offload_granularity": ((str,), "model, block or phase"),
    "t5_cpu_offload": ((bool,), "true or false"),
    "vae_cpu_offload": ((bool,), "true or false"),
    "lazy_load": ((bool,), "true or false"),
    "use_image_encoder": ((bool,), "true or false"),
    "use_tiling_vae": ((bool,), "true or false"),
    "use_tiny_vae": ((bool,), "true or false"),
    "lora_configs": ((list,), "a list of {name, path, strength}"),
    "high_noise_original_ckpt": ((str,), "a file path"),
    "low_noise_original_ckpt": ((str,), "a file path"),
    "dit_original_ckpt": ((str,), "a file path"),
    "dit_quantized": ((bool,), "true or false"),
    "dit_quant_scheme": ((str,), "fp8-sgl, int8, gguf-Q4_K_M, gguf-Q8_0, ..."),
    "high_noise_quantized_ckpt": ((str,), "a file path"),
    "low_noise_quantized_ckpt": ((str,), "a file path"),
    "dit_quantized_ckpt": ((str,), "a file path"),
    "t5_quantized": ((bool,), "true or false"),
    "t5_quant_scheme": ((str,), "a quant scheme name"),
    "fps": ((int,), "a positive integer"),
    "sample_neg_prompt": ((str,), "a string"),
    "seed": ((int,), "an integer"),
    "model_cls": ((str,), "a LightX2V model class name"),
    "task": ((str,), "t2v or i2v"),
    "parallel": ((dict, bool), "a {seq_p_size, cfg_p_size} object"),
    "seq_parallel": ((bool,), "true or false"),
    "cfg_parallel": ((bool,), "true or false"),
    "torch_compile": ((bool,), "true or false"),
    # step caching (implemented in pipeline/fast/step_cache.py; checked in caching_problems)
    "feature_caching": ((str,), "NoCaching, Tea or Mag"),
    "teacache_thresh": (_NUM, "a non-negative number"),
    "coefficients": ((list,), "two lists of polynomial coefficients [[use_ret_steps], [without]]"),
    "use_ret_steps": ((bool,), "true or false"),
    "magcache_thresh": (_NUM, "a non-negative number"),
    "magcache_K": ((int,), "a non-negative integer"),
    "magcache_retention_ratio": (_NUM, "a number in [0, 1]"),
    "magcache_ratios": ((list,), "two lists of per-step ratios [[conditional], [unconditional]]"),
    "magcache_calibration": ((bool,), "true or false"),
    "vae_dtype": ((str,), "bf16 or fp32 (also torch.bfloat16, torch.float32)"),
}
# LightX2V's vae_dtype spellings (lightx2v/utils/envs.py DTYPE_MAP) of the two decode precisions we run
VAE_DTYPES = {"bf16": "bfloat16", "BF16": "bfloat16", "torch.bfloat16": "bfloat16",
              "fp32": "float32", "FP32": "float32", "torch.float32": "float32"}
CACHING_OFF = "NoCaching"
CACHING_KEYS = {"Tea": ("teacache_thresh", "coefficients", "use_ret_steps"),
                "Mag": ("magcache_thresh", "magcache_K", "magcache_retention_ratio", "magcache_ratios",
                        "magcache_calibration")}
# LightX2V keys that only pick kernels or features we do not implement: accepted, no effect on output.
LIGHTX2V_IGNORED = {
    "mm_config", "rotary_chunk", "clean_cuda_cache",
    "compile_shapes", "unload_modules", "use_31_block", "vae_stride", "patch_size",
    "num_channels_latents", "attention_type", "quant_op", "changing_resolution", "t5_offload_granularity",
    "enable_cfg_truncation", "audio_sr", "do_mm_calib", "num_fragments", "infer_dtype",
}
OUR_KEYS: dict[str, tuple[tuple[type, ...], str]] = {
    "model_path": ((str,), "a model folder or builtin:tiny"),
    "i2v_model_path": ((str,), "an image-to-video model folder or builtin:tiny"),
    "model_format": ((str,), "auto, diffusers or wan (Wan's original layout)"),
    "device": ((str,), "auto, cpu or cuda[:N]"),
    "dtype": ((str,), "auto, float32, bfloat16 or float16"),
    "ram_budget_gb": (_NUM, "a positive number"),
    "vram_budget_gb": (_NUM, "a positive number"),
    "video_crf": ((int,), "an integer 0..51"),
    "batched_cfg": ((bool,), "true or false"),
    "activation_reserve_gb": (_NUM, "a positive number"),
}

DEFAULTS: dict[str, Any] = {
    "model_path": BUILTIN_TINY,
    "i2v_model_path": None,
    "model_format": "auto",
    "task": "t2v",
    "infer_steps": 40,
    "target_video_length": 81,
    "text_len": 512,
    "target_height": 480,
    "target_width": 832,
    "sample_guide_scale": 5.0,
    "sample_shift": 5.0,
    "enable_cfg": True,
    "fps": 16,
    "sample_neg_prompt": "",
    "seed": 42,
    "device": "auto",
    "dtype": "auto",
    "video_crf": 18,
}

# manifest override column -> config key
ROW_OVERRIDES = {
    "height": "target_height",
    "width": "target_width",
    "num_frames": "target_video_length",
    "infer_steps": "infer_steps",
    "guide_scale": "sample_guide_scale",
    "shift": "sample_shift",
}


def _is_type(value: Any, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool) and bool not in types:
        return False  # JSON true is not a number
    return isinstance(value, types)


def check_values(cfg: dict[str, Any], where: str = "config key", names: dict[str, str] | None = None) -> list[str]:
    """Range checks shared by the config file and per-row overrides; returns problem sentences.

    `names` maps a config key to the name the user wrote (a manifest column for per-row overrides)."""
    problems: list[str] = []
    names = names or {}

    def bad(key: str, msg: str) -> None:
        problems.append(f"{where} '{names.get(key, key)}': {msg} (got {cfg.get(key)!r})")

    for key in ("target_height", "target_width"):
        v = cfg.get(key)
        if isinstance(v, int) and (v <= 0 or v % 16):
            bad(key, "must be a positive multiple of 16")
    v = cfg.get("target_video_length")
    if isinstance(v, int) and (v < 1 or (v - 1) % 4):
        bad("target_video_length", "frame count must be of the form 4k+1 (1, 5, 9, ..., 81)")
    for key in ("infer_steps", "text_len", "fps"):
        v = cfg.get(key)
        if isinstance(v, int) and v <= 0:
            bad(key, "must be positive")
    v = cfg.get("sample_shift")
    if isinstance(v, _NUM) and not isinstance(v, bool) and (not math.isfinite(v) or v <= 0):
        bad("sample_shift", "must be a positive finite number")
    v = cfg.get("sample_guide_scale")
    if isinstance(v, list):
        if len(v) != 2 or not all(_is_type(x, _NUM) and math.isfinite(x) for x in v):
            bad("sample_guide_scale", "a list must be [high_noise_scale, low_noise_scale]")
    elif _is_type(v, _NUM) and not math.isfinite(v):
        bad("sample_guide_scale", "must be finite")
    v = cfg.get("boundary")
    if _is_type(v, _NUM) and not 0 < v < 1:
        bad("boundary", "must be between 0 and 1")
    steps = cfg.get("denoising_step_list")
    if steps is not None and isinstance(steps, list):
        if not steps or not all(_is_type(s, (int, float)) and 0 < s <= 1000 for s in steps):
            bad("denoising_step_list", "must be a non-empty list of timesteps in (0, 1000]")
        elif any(a <= b for a, b in zip(steps, steps[1:])):
            bad("denoising_step_list", "must be strictly decreasing")
        idx = cfg.get("boundary_step_index")
        if isinstance(idx, int) and not 0 <= idx <= len(steps):
            bad("boundary_step_index", f"must be between 0 and {len(steps)} (the step list has {len(steps)} steps)")
    v = cfg.get("video_crf")
    if isinstance(v, int) and not 0 <= v <= 51:
        bad("video_crf", "must be 0..51")
    for lora in cfg.get("lora_configs") or []:
        if not isinstance(lora, dict) or "path" not in lora:
            problems.append(f"{where} 'lora_configs': each entry needs a 'path' (got {lora!r})")
        elif lora.get("name", "high_noise_model") not in ("high_noise_model", "low_noise_model", "dit"):
            problems.append(f"{where} 'lora_configs': name must be high_noise_model, low_noise_model or dit "
                            f"(got {lora.get('name')!r})")
    return problems


@dataclass(frozen=True)
class GenerationConfig:
    """A validated config. `values` has defaults filled in; `source` names where it came from."""

    values: dict[str, Any]
    source: str
    base_dir: Path

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    def resolve_path(self, value: str | None) -> str | None:
        """Model paths in a config are relative to the config file's folder (or absolute, or builtin:)."""
        if value is None or value.startswith("builtin:"):
            return value
        p = Path(os.path.expanduser(value))
        return str(p if p.is_absolute() else (self.base_dir / p).resolve())

    def with_overrides(self, overrides: dict[str, Any]) -> dict[str, Any]:
        merged = dict(self.values)
        merged.update(overrides)
        return merged

    @property
    def is_distilled(self) -> bool:
        return self.values.get("denoising_step_list") is not None


def default_config_path() -> Path:
    return Path(__file__).parent / "configs" / "wan22_moe_tiny.json"


def load_config(path: str | os.PathLike | None = None) -> GenerationConfig:
    """Read and validate a config file; None or '' means the embedded tiny model's config."""
    path = Path(path) if path else default_config_path()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(str(path), [f"cannot read the file: {e.strerror or e}"]) from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(str(path), [f"not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"]) from None
    if not isinstance(raw, dict):
        raise ConfigError(str(path), ["the top level must be a JSON object"])
    return parse_config(raw, source=str(path), base_dir=path.parent.resolve())


def parse_config(raw: dict[str, Any], source: str = "<dict>", base_dir: Path | None = None) -> GenerationConfig:
    problems: list[str] = []
    known = {**LIGHTX2V_KEYS, **OUR_KEYS}
    for key, value in raw.items():
        if key in LIGHTX2V_IGNORED or key.startswith("_"):
            continue
        if key not in known:
            log.warning("config %s: unknown key '%s' is ignored (not a LightX2V Wan key nor one of ours)", source, key)
            continue
        types, desc = known[key]
        if value is not None and not _is_type(value, types):
            problems.append(f"config key '{key}': expected {desc}, got {type(value).__name__} {value!r}")
    values = {**DEFAULTS, **{k: v for k, v in raw.items() if k in known and v is not None}}
    if values.get("denoising_step_list") is not None:
        # LightX2V's distilled configs run without CFG unless they say otherwise.
        values.setdefault("boundary_step_index", len(values["denoising_step_list"]) // 2)
        if "enable_cfg" not in raw:
            values["enable_cfg"] = False
    problems += check_values(values)
    problems += parallel_problems(values.get("parallel"), bool(values.get("enable_cfg")))
    if not problems:
        problems += caching_problems(values)
    if values.get("vae_dtype") is not None and values["vae_dtype"] not in VAE_DTYPES:
        problems.append(f"config key 'vae_dtype': must be bf16 or fp32 (got {values['vae_dtype']!r}); "
                        f"fp16 decode is not offered (not measured against fp32)")
    if values.get("task") not in ("t2v", "i2v"):
        problems.append(f"config key 'task': must be t2v or i2v (got {values.get('task')!r})")
    if values.get("model_format") not in ("auto", "diffusers", "wan"):
        problems.append(f"config key 'model_format': must be auto, diffusers or wan (got {values.get('model_format')!r})")
    if problems:
        raise ConfigError(source, problems)
    return GenerationConfig(values=values, source=source, base_dir=base_dir or Path.cwd())


def _lists(v: Any, n: int) -> bool:
    return isinstance(v, list) and len(v) == n and all(
        isinstance(x, list) and x and all(_is_type(y, _NUM) and math.isfinite(y) for y in x) for x in v)


def caching_problems(values: dict[str, Any]) -> list[str]:
    """LightX2V's `feature_caching` ("NoCaching" is off): the methods we run and the keys each one reads."""
    mode = values.get("feature_caching") or CACHING_OFF
    if mode == CACHING_OFF:
        return []
    if mode not in CACHING_KEYS:
        return [f"config key 'feature_caching': must be NoCaching, Tea or Mag (got {mode!r}); LightX2V's other "
                f"methods (TaylorSeer, Ada, Custom, FirstBlock, DualBlock, DynamicBlock) are not implemented"]
    missing = [f"config key '{k}': required with feature_caching {mode!r} (LightX2V reads it unconditionally)"
               for k in CACHING_KEYS[mode] if values.get(k) is None]
    if missing:
        return missing
    problems = []
    if values.get("parallel") or values.get("seq_parallel") or values.get("cfg_parallel"):
        problems.append("config key 'feature_caching': not available with parallel/seq_parallel/cfg_parallel "
                        "(the cached residuals would have to follow the ranks' sequence shards and CFG branches)")
    if mode == "Tea" and not _lists(values["coefficients"], 2):
        problems.append("config key 'coefficients': must be two non-empty lists of numbers ([use_ret_steps], "
                        "[without]) as in LightX2V's TeaCache configs")
    if mode == "Mag" and not _lists(values["magcache_ratios"], 2):
        problems.append("config key 'magcache_ratios': must be two lists of numbers ([conditional], "
                        "[unconditional]) as in LightX2V's MagCache configs")
    for key in ("teacache_thresh", "magcache_thresh", "magcache_K"):
        if key in CACHING_KEYS[mode] and values[key] < 0:
            problems.append(f"config key '{key}': must be >= 0 (got {values[key]!r})")
    if mode == "Mag" and not 0 <= values["magcache_retention_ratio"] <= 1:
        problems.append(f"config key 'magcache_retention_ratio': must be between 0 and 1 "
                        f"(got {values['magcache_retention_ratio']!r})")
    return problems


def guide_scales(values: dict[str, Any]) -> tuple[float, float]:
    """(high-noise scale, low-noise scale). LightX2V's pair order is [high_noise, low_noise]."""
    g = values["sample_guide_scale"]
    if isinstance(g, list):
        return float(g[0]), float(g[1])
    return float(g), float(g)
