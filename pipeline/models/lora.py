"""LoRA per expert (`lora_configs`: [{name: high_noise_model|low_noise_model|dit, path, strength, alpha?}]).

Key styles read: LightX2V / ComfyUI (`diffusion_model.` prefix, Wan's layer names, `lora_down`/`lora_up` or
`lora_A`/`lora_B` (+ `.default`), optional `<layer>.alpha`; `.diff` / `.diff_b` / `.diff_m` full differences of
a weight / bias / modulation), diffusers (`transformer.` prefix, diffusers' layer names) and kohya
(`lora_unet_blocks_0_self_attn_q`). Scale as LightX2V: alpha/rank when the file has an alpha, else the
config's alpha/rank when given, else 1; times strength.

Plain weights get the LoRA merged (in float32, then cast back); quantized layers (fp8, int8, GGUF) get it as a
side branch (re-quantizing a merged weight would change it). Strength 0 is skipped entirely, so it equals no
LoRA bit for bit. A LoRA whose entries match fewer than 90% of the target expert's layers is refused, naming the
unmatched entries: a LoRA for another model (or none at all) must not run silently.
"""
from __future__ import annotations

import logging
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
    alpha: float | None = None


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
                    alpha = float(files.get(alpha_key).float().item()) if alpha_key in keys else None
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


def resolve(path: Path, expected: dict[str, tuple[int, ...]], expert: str) -> tuple[list[Resolved], TensorFiles]:
    """Match a LoRA file's entries to the expert's parameters; refuse it below MIN_COVERAGE or on a shape
    mismatch. `expected` maps diffusers parameter names to shapes (the architecture)."""
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
    matched, unmatched, bad = [], [], []
    for e in entries:
        target = mapping.get(e.param, e.param)
        if target not in expected:
            unmatched.append(e.name)
            continue
        shape = expected[target]
        if e.kind == "pair":
            up, down = files.shape(e.up), files.shape(e.down)
            if len(up) != 2 or len(down) != 2 or len(shape) != 2 or (up[0], down[1]) != shape or up[1] != down[0]:
                bad.append(f"{e.name}: up {up} x down {down} does not fit {target} {shape}")
                continue
        else:
            n = 1
            for d in files.shape(e.diff):
                n *= d
            numel = 1
            for d in shape:
                numel *= d
            if n != numel:
                bad.append(f"{e.name}: diff {files.shape(e.diff)} does not fit {target} {shape}")
                continue
        matched.append(Resolved(e, target))
    total = len(entries)
    if bad:
        raise CheckpointError(f"LoRA {path} does not fit the {expert} expert: {'; '.join(bad[:5])}"
                              + (f" (+{len(bad) - 5} more)" if len(bad) > 5 else ""))
    if len(matched) < MIN_COVERAGE * total:
        raise CheckpointError(
            f"LoRA {path} matches only {len(matched)} of its {total} entries in the {expert} expert "
            f"({100 * len(matched) / total:.0f}% < {100 * MIN_COVERAGE:.0f}%): wrong model or wrong target? "
            f"Unmatched: {', '.join(unmatched[:8])}" + (f" (+{len(unmatched) - 8} more)" if len(unmatched) > 8 else ""))
    if unmatched:
        log.warning("LoRA %s: %d of %d entries match nothing in the %s expert and are skipped: %s",
                    path, len(unmatched), total, expert, ", ".join(unmatched[:8]))
    if unknown:
        log.warning("LoRA %s: %d key(s) of no known LoRA style are ignored: %s", path, len(unknown),
                    ", ".join(unknown[:8]))
    _warn_name_mismatch(path, expert)
    return matched, files


def _warn_name_mismatch(path: Path, expert: str) -> None:
    name = Path(path).name.lower().replace("-", "_")
    says = "high" if re.search(r"high_?noise", name) else "low" if re.search(r"low_?noise", name) else None
    if says and expert in ("high", "low") and says != expert:
        log.warning("LoRA %s looks made for the %s-noise expert but is applied to the %s-noise expert "
                    "(lora_configs name); check the target", path, says, expert)


def _scale(e: LoraEntry, rank: int, spec: LoraSpec) -> float:
    if e.alpha is not None:
        base = e.alpha / rank
    elif spec.alpha is not None:
        base = spec.alpha / rank
    else:
        base = 1.0
    return base * spec.strength


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
    e = r.entry
    mod_name, _, pname = r.target.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    if isinstance(mod, QuantizedLinear) and pname == "weight":
        if e.kind == "pair":
            down = files.get(e.down).float()
            mod.add_lora(down, files.get(e.up).float(), _scale(e, down.shape[0], spec))
        else:
            mod.add_dense_delta(files.get(e.diff).float().reshape(mod.out_features, mod.in_features),
                                spec.strength)
        return 1
    param = getattr(mod, pname)
    if e.kind == "pair":
        down, up = files.get(e.down).float(), files.get(e.up).float()
        delta = (up @ down) * _scale(e, down.shape[0], spec)
    else:
        delta = files.get(e.diff).float().reshape(param.shape) * spec.strength
    param.data = (param.data.float() + delta.to(param.device)).to(param.dtype)
    return 1


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
        name = item.get("name")
        if name is None:
            if experts != ("single",):
                raise CheckpointError(f"lora_configs[{n}] ({item.get('path')}) has no name: set "
                                      f"\"name\": \"high_noise_model\" or \"low_noise_model\"")
            expert = "single"
        else:
            expert = EXPERT_NAMES.get(name)
            if expert is None or expert not in experts:
                want = "dit (or no name)" if experts == ("single",) else "high_noise_model or low_noise_model"
                raise CheckpointError(f"lora_configs[{n}]: name {name!r} does not fit this model; use {want}")
        path = resolve_path(item["path"])
        if not Path(path).is_file():
            raise CheckpointError(f"lora_configs[{n}]: LoRA file not found: {path}")
        strength = item.get("strength", 1.0)
        alpha = item.get("alpha")
        if not isinstance(strength, (int, float)) or isinstance(strength, bool):
            raise CheckpointError(f"lora_configs[{n}]: strength must be a number (got {strength!r})")
        out.setdefault(expert, []).append(LoraSpec(str(path), float(strength),
                                                   None if alpha is None else float(alpha)))
    return out
