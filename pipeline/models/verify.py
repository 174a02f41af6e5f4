"""Checkpoint files against their architecture, without loading them: every key name and shape of a component
(text encoder, VAE, CLIP; original Wan layout or diffusers layout) compared with the model class built on the
meta device. `wan-batch check-config` and `wan-batch diagnose --health` both check through here (the DiT's
weights through models.dit.DitWeights.check)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import CheckpointError
from . import wan_layout as wl


@dataclass
class Verified:
    tensors: int  # tensors in the files
    description: str  # what they are, for a report line


def check_component(folder: Path, fmt: str, comp: str, quant: dict[str, str] | None = None) -> Verified:
    """Check a non-DiT component's files (names and shapes, on the meta device: nothing is loaded) against
    its architecture; raises CheckpointError naming the file and the keys. `quant`: the component's quantized
    file (t5_quantized / clip_quantized, encoder_quant.quant_source), which replaces its weights."""
    if quant:
        from .encoder_quant import describe

        return Verified(*describe(folder, fmt, comp, quant))
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


def _wan_t5(folder: Path) -> Verified:
    from transformers import UMT5Config, UMT5EncoderModel

    from .checkpoint import load_pth

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
    return Verified(len(sd), f"{path.name} + {wl.T5_TOKENIZER}/ [Wan T5 -> UMT5EncoderModel, {cfg.num_layers} "
                             f"blocks, d_model {cfg.d_model}]")


def _wan_vae(folder: Path) -> Verified:
    from diffusers import AutoencoderKLWan

    from .checkpoint import load_pth

    path = folder / wl.VAE_FILE
    sd = load_pth(path)
    vae = _meta(lambda: AutoencoderKLWan(**wl.vae_config(path)))
    n = vae.config.num_res_blocks
    to_dif = {wl.vae_key_to_wan(k, n): k for k in vae.state_dict()}
    wl.check_shapes({to_dif.get(k, k): v for k, v in sd.items()},
                    {k: tuple(v.shape) for k, v in vae.state_dict().items()}, str(path))
    return Verified(len(sd), f"{path.name} [Wan VAE -> AutoencoderKLWan, base_dim {vae.config.base_dim}]")


def _wan_clip(folder: Path) -> Verified:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from .checkpoint import load_pth

    path = folder / wl.CLIP_FILE
    sd = load_pth(path)
    model = _meta(lambda: CLIPVisionModel(CLIPVisionConfig(**wl.clip_config(path))))
    pre = wl.clip_prefix(model)
    found: dict[str, Any] = {}
    for k, v in sd.items():
        m = wl.CLIP_QKV.match(k)
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
    return Verified(len(sd), f"{path.name} [open-clip ViT -> CLIPVisionModel, {model.config.num_hidden_layers} layers]")


def _diffusers_component(folder: Path, comp: str) -> Verified:
    from .checkpoint import TensorFiles

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
        n = len(files.keys())
        found = {}
        for k in files.keys():
            name = k
            if name not in state_keys and name.startswith("vision_model."):  # saved by transformers < 5
                name = name[len("vision_model."):]
            if name in expected or name not in state_keys:
                found[name] = files.shape(k)
    wl.check_shapes(found, expected, str(sub), shape_of=lambda s: tuple(s))
    return Verified(n, f"{sub.name}/ [{what}]")
