"""`wan-batch check-config FILE`: resolve a config the way a run would (paths, formats, which loader, which
keys are ours / LightX2V's / unknown), and check every file exists and its tensor names and shapes fit the
architecture, from headers and memory maps only (no 28 GB read). Every problem is listed, not just the first.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .config import BUILTIN_TINY, GenerationConfig, default_config_path, parse_config, read_raw
from .config_keys import classify
from .errors import CheckpointError, ConfigError
from .models import loader as ld
from .models import wan_layout as wl

COMPONENT_NAMES = {"text": "T5 text encoder", "vae": "VAE", "high": "high-noise DiT", "low": "low-noise DiT",
                   "single": "DiT", "clip": "CLIP image encoder"}


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
             "low_noise_original_ckpt", "dit_quantized_ckpt", "high_noise_quantized_ckpt", "low_noise_quantized_ckpt")


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
            desc = _attempt(report, lambda: _check_component(folder, fmt, comp), f"{COMPONENT_NAMES[comp]}: ")
            if desc:
                report.lines.append(f"  {comp:<6} {desc}")
        for expert in experts:
            _check_expert(config, folder, fmt, task, family, experts, expert, scheme, loras.get(expert, []), report)
        if not config.get("dit_quantized"):
            for e in experts:
                qkey = ld.CKPT_KEYS[e][0]
                if config.get(qkey):
                    report.warnings.append(f"{qkey} is set but dit_quantized is not true: it is not used")


def _check_expert(config, folder: Path, fmt: str, task: str, family: str, experts, expert: str,
                  scheme: str | None, loras, report: Report) -> None:
    from .models.dit import DitWeights, empty_model, expected_shapes
    from .models.lora import _logical_shapes, check_lora

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
    logical = _logical_shapes(model, expected)
    for spec in loras:
        if spec.strength == 0:
            report.lines.append(f"         LoRA {show(spec.path)} strength 0: not applied")
            continue
        n = _attempt(report, lambda: check_lora(Path(spec.path), logical, expert), f"{name}: ")
        if n is not None:
            how = "side branch" if found else "merged"
            report.lines.append(f"         LoRA {show(spec.path)} strength {spec.strength}: {n} entries match ({how})")


def _check_component(folder: Path, fmt: str, comp: str) -> str:
    """A description of the component's files after checking their names and shapes (raises on a problem)."""
    if fmt == "wan":
        return {"text": _wan_t5, "vae": _wan_vae, "clip": _wan_clip}[comp](folder)
    return _diffusers_component(folder, comp)


def _meta(build: Callable[[], Any]):
    from accelerate import init_empty_weights

    with init_empty_weights():
        return build()


def _param_shapes(model) -> dict[str, tuple[int, ...]]:
    """Parameter shapes without tied copies (UMT5's encoder.embed_tokens is shared.weight)."""
    tied = getattr(model, "_tied_weights_keys", None) or {}
    tied = set(tied) if isinstance(tied, dict) else set()
    return {k: tuple(p.shape) for k, p in model.named_parameters() if k not in tied}


def _wan_t5(folder: Path) -> str:
    from transformers import UMT5Config, UMT5EncoderModel

    from .models.checkpoint import load_pth

    path = folder / wl.T5_FILE
    sd = load_pth(path)
    cfg = UMT5Config(**(wl.arch_override(path) or wl.UMT5_XXL))
    found = {}
    for k, v in sd.items():
        new = wl.T5_MAP.forward(k)
        found[new or k] = v
    wl.check_shapes(found, _param_shapes(_meta(lambda: UMT5EncoderModel(cfg))), str(path))
    tok = folder / wl.T5_TOKENIZER
    if not any(tok.glob("tokenizer*")) and not any(tok.glob("spiece.model")):
        raise CheckpointError(f"tokenizer folder {tok} has no tokenizer files")
    return f"{path.name} + {wl.T5_TOKENIZER}/ [Wan T5 -> UMT5EncoderModel, {cfg.num_layers} blocks, d_model {cfg.d_model}]"


def _wan_vae(folder: Path) -> str:
    from diffusers import AutoencoderKLWan

    from .models.checkpoint import load_pth

    path = folder / wl.VAE_FILE
    sd = load_pth(path)
    vae = _meta(lambda: AutoencoderKLWan(**wl.vae_config(path)))
    n = vae.config.num_res_blocks
    to_dif = {wl.vae_key_to_wan(k, n): k for k in vae.state_dict()}
    wl.check_shapes({to_dif.get(k, k): v for k, v in sd.items()},
                    {k: tuple(v.shape) for k, v in vae.state_dict().items()}, str(path))
    return f"{path.name} [Wan VAE -> AutoencoderKLWan, base_dim {vae.config.base_dim}]"


def _wan_clip(folder: Path) -> str:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from .models.checkpoint import load_pth

    path = folder / wl.CLIP_FILE
    sd = load_pth(path)
    model = _meta(lambda: CLIPVisionModel(CLIPVisionConfig(**wl.clip_config(path))))
    pre = wl.clip_prefix(model)
    found: dict[str, Any] = {}
    for k, v in sd.items():
        m = wl._CLIP_QKV.match(k)
        if m:
            third = v.shape[0] // 3
            for part in ("q_proj", "k_proj", "v_proj"):
                found[f"{pre}encoder.layers.{m.group(1)}.self_attn.{part}.{m.group(2)}"] = (third, *v.shape[1:])
            continue
        new = wl.CLIP_MAP.forward(k)
        if new is None:
            continue
        new = pre + new
        shape = tuple(v.shape)
        if new.endswith("class_embedding"):
            shape = (shape[-1],)
        elif new.endswith("position_embedding.weight"):
            shape = shape[-2:]
        found[new] = shape
    expected = {k: s for k, s in _param_shapes(model).items() if not k.startswith(f"{pre}post_layernorm")}
    wl.check_shapes(found, expected, str(path), shape_of=lambda s: tuple(s))
    return f"{path.name} [open-clip ViT -> CLIPVisionModel, {model.config.num_hidden_layers} layers]"


def _diffusers_component(folder: Path, comp: str) -> str:
    from .models.checkpoint import TensorFiles

    if comp == "text":
        from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel  # noqa: F401 - checked below

        sub = folder / "text_encoder"
        model = _meta(lambda: UMT5EncoderModel(UMT5Config.from_pretrained(sub)))
        if not (folder / "tokenizer").is_dir():
            raise CheckpointError(f"missing folder {folder / 'tokenizer'}")
        what = "UMT5EncoderModel"
    elif comp == "vae":
        from diffusers import AutoencoderKLWan

        sub = folder / "vae"
        model = _meta(lambda: AutoencoderKLWan.from_config(AutoencoderKLWan.load_config(sub)))
        what = "AutoencoderKLWan"
    else:
        from transformers import CLIPVisionConfig, CLIPVisionModel

        sub = folder / "image_encoder"
        model = _meta(lambda: CLIPVisionModel(CLIPVisionConfig.from_pretrained(sub)))
        if not (folder / "image_processor").is_dir():
            raise CheckpointError(f"missing folder {folder / 'image_processor'}")
        what = "CLIPVisionModel"
    expected = _param_shapes(model)
    state_keys = set(model.state_dict())
    with TensorFiles.open(sub) as files:
        found = {}
        for k in files.keys():
            name = k
            if name not in state_keys and name.startswith("vision_model."):  # saved by transformers < 5
                name = name[len("vision_model."):]
            if name in expected or name not in state_keys:
                found[name] = files.shape(k)
    wl.check_shapes(found, expected, str(sub), shape_of=lambda s: tuple(s))
    return f"{sub.name}/ [{what}]"
