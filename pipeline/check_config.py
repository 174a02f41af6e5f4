"""`wan-batch check-config FILE`: resolve a config the way a run would (paths, formats, which loader, which
keys are ours / LightX2V's / unknown), and check every file exists and its tensor names and shapes fit the
architecture, from headers and memory maps only (no 28 GB read). Every problem is listed, not just the first.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .config import BUILTIN_TINY, GenerationConfig, default_config_path, parse_config, read_raw, tae_warnings
from .config_keys import classify
from .errors import CheckpointError, ConfigError
from .models import loader as ld
from .models.verify import check_component

COMPONENT_NAMES = {"text": "T5 text encoder", "vae": "VAE", "high": "high-noise DiT", "low": "low-noise DiT",
                   "single": "DiT", "clip": "CLIP image encoder", "tae": "tiny VAE"}


def show(path: str | Path) -> str:
    """A path relative to the working directory when it is below it (shorter reports), else as is."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


@dataclass
class Report:
    source: str
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def text(self) -> str:
        out = [f"config {self.source}"] + self.lines
        out += [f"warning: {w}" for w in self.warnings]
        if self.problems:
            out.append(f"{len(self.problems)} problem(s):")
            out += [f"  - {p}" for p in self.problems]
        else:
            out.append("OK: every file exists and fits its architecture")
        return "\n".join(out)


def classify_keys(raw: dict[str, Any]) -> dict[str, list[str]]:
    """The config's keys by class (config_keys.KEYS decides, the same table a run reads)."""
    groups: dict[str, list[str]] = {}
    for k, v in raw.items():
        kind, _ = classify(k, v)
        if kind != "comment":
            groups.setdefault(kind, []).append(k)
    return groups


PATH_KEYS = ("model_path", "i2v_model_path", "dit_original_ckpt", "high_noise_original_ckpt",
             "low_noise_original_ckpt", "dit_quantized_ckpt", "high_noise_quantized_ckpt", "low_noise_quantized_ckpt",
             "t5_quantized_ckpt", "clip_quantized_ckpt", "tae_path")


def check_config(path: str | Path, model_path: str | None = None) -> Report:
    """Check a config as `run` would read it; `model_path` is the --model-path option (it wins)."""
    path = Path(path) if path else default_config_path()
    report = Report(str(path))
    try:
        raw = read_raw(path)
    except ConfigError as e:
        report.problems += [f"cannot read {path}: {p}" for p in e.problems]
        return report
    groups = classify_keys(raw)
    for group in ("ours", "implemented", "kernel", "refused", "model class", "unknown"):
        if groups.get(group):
            label = {"kernel": "kernel choice, same result"}.get(group, group)
            report.lines.append(f"keys ({label}): {', '.join(groups[group])}")
    if groups.get("unknown"):
        report.warnings.append(f"unknown key(s) are ignored: {', '.join(groups['unknown'])}")
    base = path.parent.resolve()
    try:
        config = parse_config(raw, source=str(path), base_dir=base, model_path=model_path, require_model=True)
    except ConfigError as e:
        report.problems += e.problems
        return report  # a config run refuses is not checked further: the run would not get that far
    report.warnings += tae_warnings(config.values)
    for key in PATH_KEYS:
        value = config.get(key)
        if not value or value == BUILTIN_TINY:
            continue
        where, how = config.locate(value)
        src = " (--model-path)" if key == "model_path" and model_path else ""
        report.lines.append(f"path {key}{src}: {value} -> {show(where)} [{how}]")
    for lora in config.get("lora_configs") or []:
        where, how = config.locate(lora["path"])
        report.lines.append(f"path lora_configs {lora['path']} -> {show(where)} [{how}]")
    for key in ("model_path", "i2v_model_path"):
        if config.get(key):
            _check_model(config, key, report)
    return report


def _attempt(report: Report, fn: Callable[[], Any], what: str = "") -> Any:
    try:
        return fn()
    except (CheckpointError, ConfigError, OSError, ValueError, KeyError) as e:
        msg = "; ".join(e.problems) if isinstance(e, ConfigError) else str(e)
        report.problems.append(f"{what}{msg}")
        return None


def _check_model(config: GenerationConfig, key: str, report: Report) -> None:
    value = config[key]
    if value == BUILTIN_TINY:
        from .tiny import ensure_tiny_models

        folders = [ensure_tiny_models() / "t2v", ensure_tiny_models() / "i2v"]
    else:
        folder = Path(config.resolve_path(value))
        if not folder.is_dir():
            report.problems.append(f"{key}: model folder not found: {folder}")
            return
        folders = [folder]
    for folder in folders:
        fmt = _attempt(report, lambda: ld.model_format(config, folder), f"{key}: ")
        if fmt is None:
            continue
        facts = _attempt(report, lambda: ld.model_facts(folder, fmt), f"{key}: ")
        if facts is None:
            continue
        task, family, experts, boundary, image_encoder = facts
        layout = "diffusers layout" if fmt == "diffusers" else "Wan's original layout"
        report.lines.append(f"{key}: {show(folder)} ({layout}, {family} {task}, experts {', '.join(experts)}"
                            + (f", boundary {config.get('boundary') or boundary}" if len(experts) == 2 else "") + ")")
        scheme = _attempt(report, lambda: ld.quant_scheme(config))
        from .models.lora import parse_lora_configs

        loras = _attempt(report, lambda: parse_lora_configs(config.get("lora_configs"), experts,
                                                            config.resolve_path)) or {}
        if config.get("use_image_encoder") is False and image_encoder:
            report.problems.append(ld.image_encoder_refusal(folder))
        mismatch = ld.model_cls_mismatch(config.get("model_cls"), family, folder)
        if mismatch:
            report.problems.append(mismatch)
        for comp in ("text", "vae", *(("clip",) if image_encoder else ())):
            if comp == "vae" and config.get("use_tae") and task == "t2v":
                # LightX2V loads no VAE for a T2V run with use_tae (the encoder is for I2V only)
                report.lines.append(f"  {comp:<6} not used: use_tae decodes with the tiny VAE")
                continue
            desc = _attempt(report, lambda: check_component(folder, fmt, comp, _encoder_quant(config, folder, comp))
                            .description, f"{COMPONENT_NAMES[comp]}: ")
            if desc:
                report.lines.append(f"  {comp:<6} {desc}")
        for flag, ckpt in (("t5_quantized", "t5_quantized_ckpt"), ("clip_quantized", "clip_quantized_ckpt")):
            if config.get(ckpt) and config.get(flag) is not True:
                report.warnings.append(f"{ckpt} is set but {flag} is not true: it is not used")
        if config.get("use_tae"):
            _check_tae(config, folder, report)
        for expert in experts:
            _check_expert(config, folder, fmt, task, family, experts, expert, scheme, loras.get(expert, []), report)
        if not config.get("dit_quantized"):
            for e in experts:
                qkey = ld.CKPT_KEYS[e][0]
                if config.get(qkey):
                    report.warnings.append(f"{qkey} is set but dit_quantized is not true: it is not used")


def _encoder_quant(config: GenerationConfig, folder: Path, comp: str) -> dict[str, str] | None:
    """The quantized file of the text / CLIP encoder (t5_quantized, clip_quantized) as a run finds it;
    raises (reported as this component's problem) when it is not there."""
    from .models.encoder_quant import KEYS, quant_source

    return quant_source(config, folder, comp) if comp in KEYS else None


def _check_tae(config: GenerationConfig, folder: Path, report: Report) -> None:
    from .models.tae import check_tae, find_tae

    found = _attempt(report, lambda: find_tae(config, folder), "tiny VAE: ")
    if found is None:
        return
    path, how = found
    desc = _attempt(report, lambda: check_tae(Path(path)), "tiny VAE: ")
    if desc:
        scaled = ("need_scaled: the latents un-normalized first" if config.get("need_scaled")
                  else "the latents as the DiT makes them")
        report.lines.append(f"  tae    {show(path)} [{desc}; {scaled}] ({how})")


def _check_expert(config, folder: Path, fmt: str, task: str, family: str, experts, expert: str,
                  scheme: str | None, loras, report: Report) -> None:
    from .models.dit import DitWeights, empty_model, expected_shapes
    from .models.lora import logical_shapes, check_lora

    name = COMPONENT_NAMES[expert]
    src = _attempt(report, lambda: ld.dit_source(config, folder, fmt, expert), f"{name}: ")
    if src is None:
        return
    ref = ld.ModelRef(path=str(folder), task=task, format=fmt, family=family, experts=tuple(experts),
                      dits={expert: src})
    cfg = _attempt(report, lambda: ld.dit_config(ref, expert), f"{name}: ")
    if cfg is None:
        return
    model = _attempt(report, lambda: empty_model(cfg), f"{name}: config {src['config']}: ")
    if model is None:
        return
    expected = expected_shapes(model)
    weights = _attempt(report, lambda: DitWeights(src["weights"]), f"{name}: ")
    if weights is None:
        return
    for p in weights.check(expected):
        report.problems.append(f"{name}: {src['weights']}: {p}")
    found = _attempt(report, weights.quant_scheme, f"{name}: ")
    mismatch = ld.quant_mismatch(scheme, found, src["weights"])
    if mismatch:
        report.problems.append(f"{name}: {mismatch}")
    if found and not scheme:
        report.warnings.append(f"{name}: {src['weights']} is {found}-quantized; set dit_quantized and "
                               f"dit_quant_scheme to say so (it loads quantized either way)")
    enc = ", ".join(f"{n} {k}" for k, n in sorted(weights.encodings().items()))
    loader_name = "GGUF" if weights.is_gguf else (f"scaled {found}" if found else "safetensors")
    arch = f"{cfg['num_layers']} layers, dim {cfg['num_attention_heads'] * cfg['attention_head_dim']}"
    report.lines.append(f"  {expert:<6} {show(src['weights'])} [{loader_name}: {enc}] ({arch}, "
                        f"config {show(src['config'])})")
    weights.close()
    logical = logical_shapes(model, expected)
    for spec in loras:
        if spec.strength == 0:
            report.lines.append(f"         LoRA {show(spec.path)} strength 0: not applied")
            continue
        n = _attempt(report, lambda: check_lora(Path(spec.path), logical, expert), f"{name}: ")
        if n is not None:
            how = "side branch" if found else "merged"
            report.lines.append(f"         LoRA {show(spec.path)} strength {spec.strength}: {n} entries match ({how})")
