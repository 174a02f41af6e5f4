"""LoRA per expert (`lora_configs`: [{name: high_noise_model|low_noise_model|dit, path, strength, alpha?}]).

Key styles read: LightX2V / ComfyUI (`diffusion_model.` prefix, Wan's layer names, `lora_down`/`lora_up` or
`lora_A`/`lora_B` (+ `.default`), optional `<layer>.alpha`; `.diff` / `.diff_b` / `.diff_m` full differences of
a weight / bias / modulation), diffusers (`transformer.` prefix, diffusers' layer names) and kohya / musubi-tuner
(`lora_unet_blocks_0_self_attn_q` + `.alpha`).

Scale of a low-rank pair, as LightX2V's LoRALoader: the file's alpha / rank, where the file's alpha is the
entry's `.alpha` tensor or else diffusers' `lora_adapter_metadata` (the safetensors header metadata diffusers'
save_lora_weights writes: `lora_alpha`, `alpha_pattern`, `use_rslora`, read as diffusers / peft read them); else
the config's alpha / rank; else 1; times strength. A `.diff*` entry is added times strength, and times the
config's alpha when one is given (LoRALoader.apply_lora: `diff * alpha * strength`).

Plain weights get the LoRA merged (in float32, then cast back); quantized layers (fp8, int8, GGUF) get it as a
side branch (re-quantizing a merged weight would change it). Strength 0 is skipped entirely, so it equals no
LoRA bit for bit.

Entries for a parameter family the expert does not have (Wan2.1 I2V's CLIP image conditioning `k_img`, `v_img`,
`norm_k_img`, `img_emb.*` on a Wan2.2 or T2V expert; VACE's control blocks) are skipped with a warning naming
the family and how many, as LightX2V, ComfyUI and WanVideoWrapper apply what fits. Of the other entries at least
90% must match the expert, else the LoRA is refused naming the unmatched ones: a LoRA for another model (or none
at all) must not run silently.
"""
from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from .checkpoint import TensorFiles
from .quant import QuantizedLinear
from .wan_layout import dit_key_map, dit_key_to_wan, is_diffusers_dit_naming

log = logging.getLogger(__name__)

MIN_COVERAGE = 0.9
EXPERT_NAMES = {"high_noise_model": "high", "low_noise_model": "low", "dit": "single"}
_PAIRS = [(".lora_up.weight", ".lora_down.weight"), (".lora_B.weight", ".lora_A.weight"),
          (".lora_B.default.weight", ".lora_A.default.weight"), (".lora.up.weight", ".lora.down.weight"),
          ("_lora.up.weight", "_lora.down.weight")]
_DIFFS = [(".diff_b", "bias"), (".diff_m", "modulation"), (".diff", "weight")]
_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "base_model.model.")
# Parameter families some Wan DiTs have and others lack: (what the warning calls it, pattern over an entry's
# name in Wan's, diffusers' or kohya's spelling).
FAMILIES = [
    ("Wan2.1 I2V's CLIP image conditioning (k_img, v_img, norm_k_img, img_emb)",
     re.compile(r"(^|[._])(k_img|v_img|norm_k_img|img_emb|add_k_proj|add_v_proj|norm_added_k|image_embedder)"
                r"([._]|$)")),
    ("VACE's control blocks (vace_blocks, vace_patch_embedding)", re.compile(r"(^|[._])vace_")),
]
METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY


@dataclass(frozen=True)
class LoraSpec:
    path: str
    strength: float = 1.0
    alpha: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "strength": self.strength, "alpha": self.alpha}


@dataclass
class LoraEntry:
    name: str  # the entry's base name in the file
    param: str  # target parameter, Wan or diffusers naming, before conversion
    kind: str  # pair | diff
    up: str | None = None
    down: str | None = None
    diff: str | None = None
    alpha: float | None = None  # the file's alpha for this pair (`.alpha` tensor or diffusers' metadata)
    rslora: bool = False  # diffusers' use_rslora: scale alpha / sqrt(rank)


def _strip(key: str) -> str:
    for p in _PREFIXES:
        if key.startswith(p):
            return key[len(p):]
    return key


def parse_entries(files: TensorFiles, kohya_names: dict[str, str]) -> tuple[list[LoraEntry], list[str]]:
    """LoRA entries of a file, and the keys that are none of the known styles."""
    keys = set(files.keys())
    used: set[str] = set()
    entries: list[LoraEntry] = []
    for key in sorted(keys):
        for up_sfx, down_sfx in _PAIRS:
            if key.endswith(up_sfx):
                base = key[: -len(up_sfx)]
                down = base + down_sfx
                if down in keys:
                    alpha_key = base + ".alpha"
                    alpha = _alpha_tensor(files, alpha_key) if alpha_key in keys else None
                    used.update({key, down, alpha_key})
                    entries.append(LoraEntry(base, _target(base, "weight", kohya_names), "pair", key, down,
                                             alpha=alpha))
                break
    for key in sorted(keys - used):
        for sfx, param in _DIFFS:
            if key.endswith(sfx):
                base = key[: -len(sfx)]
                used.add(key)
                entries.append(LoraEntry(base, _target(base, param, kohya_names), "diff", diff=key))
                break
    unknown = sorted(k for k in keys - used if not k.endswith(".alpha"))
    return entries, unknown


def _alpha_tensor(files: TensorFiles, key: str) -> float:
    if math.prod(files.shape(key)) != 1:
        raise CheckpointError(f"LoRA {files.files[0]}: '{key}' has shape {files.shape(key)}; an alpha is one number")
    value = float(files.get(key).float().reshape(()).item())
    if not math.isfinite(value):
        raise CheckpointError(f"LoRA {files.files[0]}: '{key}' is {value}")
    return value


def _target(base: str, param: str, kohya_names: dict[str, str]) -> str:
    base = _strip(base)
    if base.startswith("lora_unet_"):
        base = kohya_names.get(base[len("lora_unet_"):], base)
    if param == "modulation":  # `<block>.diff_m` is the block's modulation table itself
        return f"{base}.modulation"
    return f"{base}.{param}"


def _kohya_names(expected: dict[str, tuple[int, ...]]) -> dict[str, str]:
    """kohya flattens Wan's module names with underscores; map them back through the known modules."""
    out = {}
    for k in expected:
        mod = dit_key_to_wan(k).rpartition(".")[0]
        out[mod.replace(".", "_")] = mod
    return out


@dataclass
class Resolved:
    entry: LoraEntry
    target: str  # diffusers parameter name


def _family_of(name: str) -> str | None:
    for label, rx in FAMILIES:
        if rx.search(name):
            return label
    return None


def resolve(path: Path, expected: dict[str, tuple[int, ...]], expert: str) -> tuple[list[Resolved], TensorFiles]:
    """Match a LoRA file's entries to the expert's parameters; skip the families the expert lacks; refuse it
    below MIN_COVERAGE of the rest or on a shape mismatch. `expected` maps diffusers parameter names to shapes."""
    try:
        files = TensorFiles.open(path)
    except CheckpointError as e:
        raise CheckpointError(f"LoRA for {expert}: {e}") from None
    entries, unknown = parse_entries(files, _kohya_names(expected))
    if not entries:
        raise CheckpointError(f"LoRA {path} has no LoRA entries (lora_down/lora_up, lora_A/lora_B or diff keys); "
                              f"its keys look like {sorted(files.keys())[:4]}")
    params = [e.param for e in entries]
    mapping = {p: p for p in params} if is_diffusers_dit_naming(params) else dit_key_map(params)
    has_family = {label for label, rx in FAMILIES if any(rx.search(k) for k in expected)}
    matched, unmatched, bad = [], [], []
    skipped: dict[str, list[str]] = {}
    for e in entries:
        target = mapping.get(e.param, e.param)
        if target not in expected:
            family = _family_of(e.name)
            if family is not None and family not in has_family:
                skipped.setdefault(family, []).append(e.name)
            else:
                unmatched.append(e.name)
            continue
        shape = expected[target]
        if e.kind == "pair":
            up, down = files.shape(e.up), files.shape(e.down)
            if len(up) != 2 or len(down) != 2 or len(shape) != 2 or (up[0], down[1]) != shape or up[1] != down[0]:
                bad.append(f"{e.name}: up {up} x down {down} does not fit {target} {shape}")
                continue
        elif math.prod(files.shape(e.diff)) != math.prod(shape):
            bad.append(f"{e.name}: diff {files.shape(e.diff)} does not fit {target} {shape}")
            continue
        matched.append(Resolved(e, target))
    total = len(entries)
    n_skipped = sum(len(v) for v in skipped.values())
    if bad:
        raise CheckpointError(f"LoRA {path} does not fit the {expert} expert: {'; '.join(bad[:5])}"
                              + (f" (+{len(bad) - 5} more)" if len(bad) > 5 else ""))
    could = total - n_skipped  # the entries this expert has a place for, were the LoRA made for it
    if not matched or len(matched) < MIN_COVERAGE * could:
        what = f"{could} entries" + (f" ({n_skipped} more are for parts this model lacks)" if n_skipped else "")
        raise CheckpointError(
            f"LoRA {path} matches only {len(matched)} of its {what} in the {expert} expert "
            f"({100 * len(matched) / max(could, 1):.0f}% < {100 * MIN_COVERAGE:.0f}%): wrong model or wrong "
            f"target? Unmatched: {', '.join(unmatched[:8])}" + (f" (+{len(unmatched) - 8} more)"
                                                                  if len(unmatched) > 8 else ""))
    for family, names in skipped.items():
        log.warning("LoRA %s: %d of %d entries are for %s, which the %s expert does not have; they are skipped "
                    "(e.g. %s)", path, len(names), total, family, expert, ", ".join(names[:3]))
    if unmatched:
        log.warning("LoRA %s: %d of %d entries match nothing in the %s expert and are skipped: %s",
                    path, len(unmatched), total, expert, ", ".join(unmatched[:8]))
    if unknown:
        log.warning("LoRA %s: %d key(s) of no known LoRA style are ignored: %s", path, len(unknown),
                    ", ".join(unknown[:8]))
    _apply_metadata_alpha(path, files, matched)
    _warn_name_mismatch(path, expert)
    return matched, files


def _adapter_metadata(path: Path, files: TensorFiles) -> dict[str, Any] | None:
    """diffusers' LoraConfig of the transformer from the header metadata (`transformer.`-prefixed keys, as
    save_lora_weights writes them, or unprefixed, as save_lora_adapter writes them); None when absent."""
    raw = next(iter(files.metadata.values()), {}).get(METADATA_KEY)
    if raw is None:
        return None
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise CheckpointError(f"LoRA {path}: header metadata {METADATA_KEY} is not JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"LoRA {path}: header metadata {METADATA_KEY} must be a JSON object")
    prefixed = {k[len("transformer."):]: v for k, v in data.items() if k.startswith("transformer.")}
    cfg = prefixed or data
    if cfg.get("use_dora"):
        raise CheckpointError(f"LoRA {path} is a DoRA adapter (use_dora in its {METADATA_KEY}): DoRA's "
                              f"magnitude vectors are not supported")
    return cfg


def _pattern_value(patterns: Any, module: str, default: Any) -> Any:
    """peft's rank_pattern / alpha_pattern: the first key that matches the end of the module's name."""
    if isinstance(patterns, dict):
        for key, value in patterns.items():
            if re.fullmatch(rf"(.*\.)?{key}", module):
                return value
    return default


def _apply_metadata_alpha(path: Path, files: TensorFiles, matched: list[Resolved]) -> None:
    cfg = _adapter_metadata(path, files)
    if cfg is None:
        return
    for r in matched:
        if r.entry.kind != "pair" or r.entry.alpha is not None:
            continue  # an `.alpha` tensor of the entry itself wins
        alpha = _pattern_value(cfg.get("alpha_pattern"), r.target.rpartition(".")[0], cfg.get("lora_alpha"))
        if alpha is None:
            continue
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise CheckpointError(f"LoRA {path}: {METADATA_KEY} gives lora_alpha {alpha!r} (expected a number)")
        r.entry.alpha = float(alpha)
        r.entry.rslora = bool(cfg.get("use_rslora", False))


def _warn_name_mismatch(path: Path, expert: str) -> None:
    name = Path(path).name.lower().replace("-", "_")
    says = "high" if re.search(r"high_?noise", name) else "low" if re.search(r"low_?noise", name) else None
    if says and expert in ("high", "low") and says != expert:
        log.warning("LoRA %s looks made for the %s-noise expert but is applied to the %s-noise expert "
                    "(lora_configs name); check the target", path, says, expert)


def pair_scale(e: LoraEntry, rank: int, spec: LoraSpec) -> float:
    if e.alpha is not None:
        base = e.alpha / (math.sqrt(rank) if e.rslora else rank)
    elif spec.alpha is not None:
        base = spec.alpha / rank
    else:
        base = 1.0
    return base * spec.strength


def diff_scale(spec: LoraSpec) -> float:
    """LightX2V's LoRALoader: a full difference is added times strength, and times the config's alpha if set."""
    return spec.strength * (spec.alpha if spec.alpha is not None else 1.0)


@torch.no_grad()
def apply_loras(model: torch.nn.Module, specs: list[LoraSpec], expert: str) -> int:
    """Apply LoRAs to a loaded DiT in place; returns the number of parameters changed."""
    specs = [s for s in specs if s.strength != 0]
    if not specs:
        return 0
    from .dit import expected_shapes

    expected = logical_shapes(model, expected_shapes(model))
    changed = 0
    for spec in specs:
        resolved, files = resolve(Path(spec.path), expected, expert)
        with files:
            for r in resolved:
                changed += _apply_one(model, r, files, spec)
        log.info("applied LoRA %s (strength %s) to %d parameters of the %s expert", spec.path, spec.strength,
                 len(resolved), expert)
    return changed


def logical_shapes(model: torch.nn.Module, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Parameter shapes as the architecture has them, with quantized layers' weights as [out, in]."""
    out = {k: v for k, v in shapes.items() if not (k.endswith(".weight_scale") or k.endswith(".qweight")
                                                 or ".lora_" in k or ".dense_delta_" in k)}
    for name, mod in model.named_modules():
        if isinstance(mod, QuantizedLinear):
            out[f"{name}.weight"] = (mod.out_features, mod.in_features)
    return out


def _apply_one(model: torch.nn.Module, r: Resolved, files: TensorFiles, spec: LoraSpec) -> int:
    mod_name, _, pname = r.target.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    if isinstance(mod, QuantizedLinear) and pname == "weight":
        kind, tensors, scale = side_branch(r, files, spec, mod.out_features, mod.in_features)
        if kind == "lora":
            mod.add_lora(*tensors, scale)
        else:
            mod.add_dense_delta(*tensors, scale)
        return 1
    param = getattr(mod, pname)
    param.data = merged(param.data, r, files, spec)
    return 1


def merged(value: torch.Tensor, r: Resolved, files: TensorFiles, spec: LoraSpec) -> torch.Tensor:
    """A plain tensor with one resolved LoRA entry merged: added in float32, cast back to its dtype."""
    e = r.entry
    if e.kind == "pair":
        down, up = files.get(e.down).float(), files.get(e.up).float()
        delta = (up @ down) * pair_scale(e, down.shape[0], spec)
    else:
        delta = files.get(e.diff).float().reshape(value.shape) * diff_scale(spec)
    return (value.float() + delta.to(value.device)).to(value.dtype)


def side_branch(r: Resolved, files: TensorFiles, spec: LoraSpec, out_features: int, in_features: int
                ) -> tuple[str, list[torch.Tensor], float]:
    """A resolved entry on a quantized linear, as its side branch: ('lora', [down, up], scale) or
    ('dense', [delta], scale), float32 (re-quantizing a merged weight would change it)."""
    e = r.entry
    if e.kind == "pair":
        down = files.get(e.down).float()
        return "lora", [down, files.get(e.up).float()], pair_scale(e, down.shape[0], spec)
    return "dense", [files.get(e.diff).float().reshape(out_features, in_features)], diff_scale(spec)


def check_lora(path: Path, expected: dict[str, tuple[int, ...]], expert: str) -> int:
    """Validate a LoRA against an architecture without applying it (check-config); returns matched entries."""
    resolved, files = resolve(Path(path), expected, expert)
    files.close()
    return len(resolved)


def parse_lora_configs(lora_configs: list[dict[str, Any]] | None, experts: tuple[str, ...],
                       resolve_path) -> dict[str, list[LoraSpec]]:
    """lora_configs -> {expert: [LoraSpec]}. A Wan2.2 entry must name its expert; a Wan2.1 one may omit it."""
    out: dict[str, list[LoraSpec]] = {}
    for n, item in enumerate(lora_configs or []):
        if not isinstance(item, dict):
            raise CheckpointError(f"lora_configs[{n}] must be an object with path, name and strength (got {item!r})")
        if not isinstance(item.get("path"), str) or not item["path"]:
            raise CheckpointError(f"lora_configs[{n}].path must be a file path (got {item.get('path')!r})")
        name = item.get("name")
        if name is None:
            if experts != ("single",):
                raise CheckpointError(f"lora_configs[{n}] ({item.get('path')}) has no name: set "
                                      f"\"name\": \"high_noise_model\" or \"low_noise_model\"")
            expert = "single"
        else:
            expert = EXPERT_NAMES.get(name) if isinstance(name, str) else None
            if expert is None or expert not in experts:
                want = "dit (or no name)" if experts == ("single",) else "high_noise_model or low_noise_model"
                raise CheckpointError(f"lora_configs[{n}]: name {name!r} does not fit this model; use {want}")
        path = resolve_path(item["path"])
        if not Path(path).is_file():
            raise CheckpointError(f"lora_configs[{n}]: LoRA file not found: {path}")
        strength = item.get("strength", 1.0)
        alpha = item.get("alpha")
        for key, value in (("strength", strength), ("alpha", 0.0 if alpha is None else alpha)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise CheckpointError(f"lora_configs[{n}].{key} must be a finite number (got {value!r})")
        out.setdefault(expert, []).append(LoraSpec(str(path), float(strength),
                                                   None if alpha is None else float(alpha)))
    return out
