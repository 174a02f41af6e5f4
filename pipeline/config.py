"""LightX2V-style JSON config: read, validate (every problem at once), apply per-row overrides.

A LightX2V user's Wan config works unchanged: its keys keep LightX2V's meaning. What each key does here is
one table (config_keys.KEYS): implemented, a kernel choice with the same result, or refused with the reason
(a key of a model class we do not run names the class). Keys in no table get a warning naming the key.
The model comes from --model-path (LightX2V's --model_path) or the config's model_path: never by default.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config_keys import KEYS, OURS, encoder_scheme_problem, is_finite_number, key_problems
from .errors import ConfigError
from .parallel.layout import problems as parallel_problems

log = logging.getLogger(__name__)

BUILTIN_TINY = "builtin:tiny"
MODEL_PATH_HINT = ("pass --model-path (LightX2V's --model_path) or set model_path in the config; the embedded "
                   "tiny model is model_path \"builtin:tiny\" (pipeline/configs/wan22_moe_tiny.json)")

# key -> (accepted python types, short description used in error messages): from the one table
_NUM = (int, float)
KNOWN_KEYS: dict[str, tuple[tuple[type, ...], str]] = {k: (e.types, e.desc) for k, e in KEYS.items()}
OUR_KEYS = {k: KNOWN_KEYS[k] for k, e in KEYS.items() if e.kind == OURS}
DTYPES = ("auto", "float32", "bfloat16", "float16")
# Upper bounds that keep a run from failing deep inside a model (issue 19): the DiT's rotary table has 1024
# positions per axis (latent frames, height/16, width/16); T5's attention is quadratic in text_len.
MAX_FRAMES = 4 * 1023 + 1
MAX_SIDE = 1024 * 16
MAX_TEXT_LEN = 4096
MAX_STEPS = 10000
# LightX2V's vae_dtype spellings (lightx2v/utils/envs.py DTYPE_MAP) of the two decode precisions we run
VAE_DTYPES = {"bf16": "bfloat16", "BF16": "bfloat16", "torch.bfloat16": "bfloat16",
              "fp32": "float32", "FP32": "float32", "torch.float32": "float32"}
CACHING_OFF = "NoCaching"
CACHING_KEYS = {"Tea": ("teacache_thresh", "coefficients", "use_ret_steps"),
                "Mag": ("magcache_thresh", "magcache_K", "magcache_retention_ratio", "magcache_ratios",
                        "magcache_calibration")}

DEFAULTS: dict[str, Any] = {
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
    "enable_cfg": False,  # LightX2V's default (get_default_config)
    "fps": 16,
    "sample_neg_prompt": "",
    "seed": 42,
    "device": "auto",
    "dtype": "auto",
    "video_crf": 18,
}

# The noise seed goes to torch.Generator.manual_seed (which takes 0..2^64-1) and into results.parquet's int64
# `seed` column: 0..2^63-1 is what both hold. The service's MAX_SEED is the same.
MAX_SEED = 2**63 - 1

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


_POSITIVE = {"infer_steps", "text_len", "target_height", "target_width", "fps", "target_video_length"}
_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list",
               dict: "a JSON object"}


def _expected(key: str, types: tuple[type, ...]) -> str:
    """'a positive integer', 'true or false', 'a number or a list', ... for a type error message."""
    if types == (int,) and key in _POSITIVE:
        return "a positive integer"
    words = [_TYPE_WORDS[t] for t in types if t in _TYPE_WORDS]
    if "an integer" in words and "a number" in words:
        words.remove("an integer")
    return " or ".join(dict.fromkeys(words))


def adjust_frames(n: int, task: str) -> int:
    """The frame count LightX2V makes of `n` (which needs the form 4k+1 for the VAE's 4x time stride):
    i2v rounds as set_config does (n // 4 * 4 + 1); t2v keeps the frames its latent count gives
    ((n - 1) // 4 + 1 latent frames decode to (n - 1) // 4 * 4 + 1 frames)."""
    return n // 4 * 4 + 1 if task == "i2v" else (n - 1) // 4 * 4 + 1


def check_values(cfg: dict[str, Any], where: str = "config key", names: dict[str, str] | None = None) -> list[str]:
    """Range checks shared by the config file and per-row overrides; returns problem sentences.

    `names` maps a config key to the name the user wrote (a manifest column for per-row overrides)."""
    problems: list[str] = []
    names = names or {}

    def bad(key: str, msg: str) -> None:
        problems.append(f"{where} '{names.get(key, key)}': {msg} (got {cfg.get(key)!r})")

    for key in ("target_height", "target_width"):
        v = cfg.get(key)
        if isinstance(v, int) and (v <= 0 or v % 16 or v > MAX_SIDE):
            bad(key, f"must be a positive multiple of 16, at most {MAX_SIDE}")
    v = cfg.get("target_video_length")
    if _is_type(v, (int,)) and not 1 <= v <= MAX_FRAMES:
        bad("target_video_length", f"frame count must be between 1 and {MAX_FRAMES} (the DiT's rotary "
                                   f"positions cover 1024 latent frames)")
    for key, top in (("infer_steps", MAX_STEPS), ("text_len", MAX_TEXT_LEN), ("fps", 1000)):
        v = cfg.get(key)
        if _is_type(v, (int,)) and not 0 < v <= top:
            bad(key, f"must be positive, at most {top}")
    v = cfg.get("sample_shift")
    if _is_type(v, _NUM) and (not math.isfinite(v) or v <= 0):
        bad("sample_shift", "must be a positive finite number")
    v = cfg.get("sample_guide_scale")
    if isinstance(v, list):
        if len(v) != 2 or not all(_is_type(x, _NUM) and math.isfinite(x) for x in v):
            bad("sample_guide_scale", "a list must be [high_noise_scale, low_noise_scale], both finite numbers")
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
    v = cfg.get("seed")
    if _is_type(v, (int,)) and not 0 <= v <= MAX_SEED:
        bad("seed", "must be between 0 and 2^63-1")
    v = cfg.get("video_crf")
    if isinstance(v, int) and not 0 <= v <= 51:
        bad("video_crf", "must be 0..51")
    for key in ("ram_budget_gb", "vram_budget_gb", "activation_reserve_gb"):
        v = cfg.get(key)
        if _is_type(v, _NUM) and not (math.isfinite(v) and v > 0):
            bad(key, "must be a positive finite number of GB")
    v = cfg.get("dtype")
    if isinstance(v, str) and v not in DTYPES:
        bad("dtype", f"must be one of {', '.join(DTYPES)}")
    v = cfg.get("device")
    if isinstance(v, str) and not _device_ok(v):
        bad("device", "must be auto, cpu, cuda or cuda:N")
    for i, lora in enumerate(cfg.get("lora_configs") or []):
        at = f"{where} 'lora_configs[{i}]"
        if not isinstance(lora, dict) or "path" not in lora:
            problems.append(f"{at}': each entry needs a 'path' (got {lora!r})")
            continue
        if not isinstance(lora["path"], str) or not lora["path"]:
            problems.append(f"{at}.path': must be a file path (got {lora['path']!r})")
        if lora.get("name", "high_noise_model") not in ("high_noise_model", "low_noise_model", "dit"):
            problems.append(f"{at}.name': must be high_noise_model, low_noise_model or dit (got {lora.get('name')!r})")
        for k in ("strength", "alpha"):
            if k in lora and lora[k] is not None and not is_finite_number(lora[k]):
                problems.append(f"{at}.{k}': must be a finite number (got {lora[k]!r})")
    return problems


def _device_ok(name: str) -> bool:
    if name in ("auto", "cpu", "cuda"):
        return True
    head, _, idx = name.partition(":")
    return head == "cuda" and idx.isdigit()


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
        return self.locate(value)[0]

    def locate(self, value: str | None) -> tuple[str | None, str]:
        """(absolute path, how it was found) of a path in the config. Relative paths resolve against the
        working directory, as LightX2V resolves them; when nothing is there but the path exists next to the
        config file, that one is used (a config kept beside its models). Absent anywhere: the working
        directory's path (its error names it)."""
        if value is None or value.startswith("builtin:"):
            return value, "builtin"
        p = Path(os.path.expanduser(value))
        if p.is_absolute():
            return str(p), "absolute"
        here = (Path.cwd() / p).resolve()
        if here.exists():
            return str(here), "working directory"
        beside = (self.base_dir / p).resolve()
        if beside.exists():
            return str(beside), "config's folder (fallback: not found in the working directory)"
        return str(here), "working directory (not found there, nor in the config's folder)"

    def with_overrides(self, overrides: dict[str, Any]) -> dict[str, Any]:
        merged = dict(self.values)
        merged.update(overrides)
        return merged

    @property
    def is_distilled(self) -> bool:
        return self.values.get("denoising_step_list") is not None


def default_config_path() -> Path:
    return Path(__file__).parent / "configs" / "wan22_moe_tiny.json"


def read_raw(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
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
    return raw


def load_config(path: str | os.PathLike | None = None, model_path: str | None = None) -> GenerationConfig:
    """Read and validate a config file; None or '' means the embedded tiny model's config (named in the log).
    `model_path` (the --model-path option, LightX2V's --model_path) wins over the config's model_path; with
    neither the config is refused: the tiny model is never picked for a config that did not ask for it."""
    if not path:
        path = default_config_path()
        log.info("no config given: the embedded tiny model's config %s", path)
    path = Path(path)
    return parse_config(read_raw(path), source=str(path), base_dir=path.parent.resolve(), model_path=model_path,
                        require_model=True)


def parse_config(raw: dict[str, Any], source: str = "<dict>", base_dir: Path | None = None,
                 model_path: str | None = None, require_model: bool = False) -> GenerationConfig:
    """Validate a config dict: every key's class is decided here (config_keys.KEYS), so check-config and a
    run agree. `require_model`: refuse a config that names no model (the entry points set it)."""
    problems: list[str] = []
    for key, value in raw.items():
        if key not in KNOWN_KEYS:
            if not key.startswith(("_", "comment")):
                log.warning("config %s: unknown key '%s' is ignored (not a LightX2V Wan key nor one of ours)",
                            source, key)
            continue
        types, _ = KNOWN_KEYS[key]
        if value is not None and object not in types and not _is_type(value, types):
            problems.append(f"config key '{key}': expected {_expected(key, types)}, got {type(value).__name__} "
                            f"{value!r}")
    problems += key_problems(raw)
    values = {**DEFAULTS, **{k: v for k, v in raw.items() if k in KNOWN_KEYS and v is not None}}
    if model_path:
        values["model_path"] = model_path
    if require_model and not values.get("model_path"):
        problems.append(f"no model: {MODEL_PATH_HINT}")
    if values.get("use_compile") is not None:  # LightX2V's name for our torch_compile runtime setting
        values["torch_compile"] = bool(values["use_compile"])
    if values.get("denoising_step_list") is not None:
        values.setdefault("boundary_step_index", len(values["denoising_step_list"]) // 2)
    problems += check_values(values)
    n = values.get("target_video_length")
    if _is_type(n, (int,)) and 1 <= n <= MAX_FRAMES and (n - 1) % 4:
        fixed = adjust_frames(n, values.get("task", "t2v"))
        log.warning("config %s: target_video_length %d is not of the form 4k+1; adjusted to %d as LightX2V "
                    "does", source, n, fixed)
        values["target_video_length"] = fixed
    par = values.get("parallel")
    if isinstance(par, dict) and par.get("cfg_p_size") == 2 and not values.get("enable_cfg"):
        # LightX2V: cfg_parallel = enable_cfg and cfg_p_size > 1; with CFG off each rank group computes the
        # same single prediction, so one group gives the same video on half the GPUs.
        log.warning("config %s: parallel.cfg_p_size 2 with CFG off: there is no unconditional prediction to "
                    "split, so the Denoise runs on seq_p_size GPUs (as LightX2V's ranks compute it)", source)
        values["parallel"] = {**par, "cfg_p_size": 1}
    problems += parallel_problems(values.get("parallel"), bool(values.get("enable_cfg")))
    if not problems:
        problems += caching_problems(values)
    if values.get("vae_dtype") is not None and values["vae_dtype"] not in VAE_DTYPES:
        problems.append(f"config key 'vae_dtype': must be bf16 or fp32 (got {values['vae_dtype']!r}); "
                        f"fp16 decode is not offered (not measured against fp32)")
    for flag, key in (("t5_quantized", "t5_quant_scheme"), ("clip_quantized", "clip_quant_scheme")):
        why = encoder_scheme_problem(key, values.get(key)) if values.get(flag) is True else None
        if why:  # read only with the flag true, as LightX2V reads it
            problems.append(f"config key '{key}': {why}")
    if values.get("task") not in ("t2v", "i2v"):
        problems.append(f"config key 'task': must be t2v or i2v (got {values.get('task')!r})")
    if values.get("model_format") not in ("auto", "diffusers", "wan"):
        problems.append(f"config key 'model_format': must be auto, diffusers or wan (got {values.get('model_format')!r})")
    if problems:
        raise ConfigError(source, problems)
    for warning in tae_warnings(values):
        log.warning("config %s: %s", source, warning)
    return GenerationConfig(values=values, source=source, base_dir=base_dir or Path.cwd())


def tae_warnings(values: dict[str, Any]) -> list[str]:
    """Tiny VAE keys that do nothing as set (LightX2V reads them the same way): said, not refused."""
    out = []
    if not values.get("use_tae"):
        out += [f"config key '{k}' is only read with use_tae true: it is not used" for k in ("tae_path", "need_scaled")
                if values.get(k)]
        return out
    if values.get("vae_dtype") is not None:
        out.append("config key 'vae_dtype' does not apply to the tiny VAE decode (use_tae): it runs in the run's "
                   "dtype (LightX2V runs it in bfloat16)")
    name = Path(str(values.get("tae_path") or "")).name
    if "lighttae" in name and not values.get("need_scaled"):
        out.append(f"tae_path {name} is LightX2V's lighttae, which expects un-normalized latents: LightX2V's "
                   f"enable_lightvae sets need_scaled true for it, a JSON config must set it itself (it is false)")
    return out


def component_device(component: str, runtime: dict[str, Any], device: Any) -> Any:
    """Where a component runs: t5_cpu_offload / vae_cpu_offload / clip_cpu_offload true keep the T5 encoder,
    the VAE or the CLIP encoder in CPU memory, as LightX2V does, and run it there (LightX2V moves it to the GPU
    for each use; the numbers are the same within floating-point tolerance, the GPU holds none of it). Unset,
    the component stays on the run's device: LightX2V's default for these keys is cpu_offload, which here
    means DiT block streaming only (the other components then use VRAM, not a different result)."""
    import torch

    key = {"text": "t5_cpu_offload", "vae": "vae_cpu_offload", "clip": "clip_cpu_offload"}.get(component)
    return torch.device("cpu") if key and runtime.get(key) else device


def _lists(v: Any, n: int) -> bool:
    return isinstance(v, list) and len(v) == n and all(
        isinstance(x, list) and x and all(_is_type(y, _NUM) and math.isfinite(y) for y in x) for x in v)


def caching_problems(values: dict[str, Any]) -> list[str]:
    """LightX2V's `feature_caching` ("NoCaching" is off): the methods we run and the keys each one reads."""
    mode = values.get("feature_caching") or CACHING_OFF
    stray = [f"config key '{k}': only read with feature_caching {m!r} (it is {mode!r} here)"
             for m, keys in CACHING_KEYS.items() if m != mode for k in keys if values.get(k) is not None]
    if mode == CACHING_OFF:
        return stray
    if mode not in CACHING_KEYS:
        return [f"config key 'feature_caching': must be NoCaching, Tea or Mag (got {mode!r}); LightX2V's other "
                f"methods (TaylorSeer, Ada, Custom, FirstBlock, DualBlock, DynamicBlock) are not implemented"]
    missing = [f"config key '{k}': required with feature_caching {mode!r} (LightX2V reads it unconditionally)"
               for k in CACHING_KEYS[mode] if values.get(k) is None]
    if missing or stray:
        return missing + stray
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
