"""Wan's original checkpoint layout (Wan-AI/Wan2.2-*-A14B, Wan-AI/Wan2.1-I2V-14B-*) mapped onto the
transformers / diffusers classes the pipeline runs.

    models_t5_umt5-xxl-enc-bf16.pth      Wan's T5 key names        -> transformers UMT5EncoderModel
    google/umt5-xxl/                     tokenizer files
    Wan2.1_VAE.pth                       Wan's VAE key names       -> diffusers AutoencoderKLWan
    high_noise_model/ low_noise_model/   DiT shards + index + config.json (Wan2.2 A14B)
    config.json + diffusion_pytorch_model-*.safetensors at the top (Wan2.1: one DiT)
    models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth   (Wan2.1 I2V) -> transformers CLIPVisionModel

The .pth files carry weights only. Their architecture is the published one (umt5-xxl, Wan2.1 VAE, ViT-H/14)
unless a `<file>.config.json` next to the weights gives the transformers/diffusers config (the tiny stand-ins
used by the tests do that). The DiT's architecture always comes from its local config.json, never from the keys.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError

T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
T5_TOKENIZER = "google/umt5-xxl"
VAE_FILE = "Wan2.1_VAE.pth"
CLIP_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
EXPERT_DIRS = {"high": "high_noise_model", "low": "low_noise_model"}
WAN_BOUNDARY = {"t2v": 0.875, "i2v": 0.900}  # Wan2.2 A14B's switch points (wan/configs/wan_*_A14B.py)

# Published architectures of the weight-only .pth files.
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                relative_attention_num_buckets=32, relative_attention_max_distance=128,
                feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6,
                dropout_rate=0.0, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
                decoder_start_token_id=0)
WAN21_VAE: dict[str, Any] = {}  # diffusers' AutoencoderKLWan defaults are the Wan2.1 VAE
CLIP_VIT_H14 = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                    image_size=224, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=1024,
                    num_channels=3)

# Wan's WanModel constructor defaults, for keys its config.json leaves out.
_WAN_DIT_DEFAULTS = dict(patch_size=[1, 2, 2], text_dim=4096, cross_attn_norm=True, qk_norm=True, window_size=[-1, -1])
_WAN_DIT_REQUIRED = ("dim", "num_heads", "in_dim", "out_dim", "ffn_dim", "freq_dim", "num_layers", "eps")


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"missing file {path}") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data


def arch_override(weights: Path) -> dict[str, Any] | None:
    """The `<weights>.config.json` next to a weight-only file, if there is one."""
    side = weights.with_name(weights.name + ".config.json")
    return read_json(side) if side.is_file() else None


# ----------------------------------------------------------------------------------------------- key maps
class TemplateMap:
    """Two-way key renaming from (wan_template, other_template) pairs, where `{i}` stands for a layer index."""

    def __init__(self, pairs: list[tuple[str, str]]):
        self.pairs = pairs
        self._fwd = [(self._regex(a), b) for a, b in pairs]
        self._bwd = [(self._regex(b), a) for a, b in pairs]

    @staticmethod
    def _regex(template: str) -> re.Pattern:
        return re.compile("^" + re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)") + "$")

    @staticmethod
    def _apply(rules, key: str) -> str | None:
        for rx, out in rules:
            m = rx.match(key)
            if m:
                return out.replace("{i}", m.group("i")) if "{i}" in out else out
        return None

    def forward(self, key: str) -> str | None:
        return self._apply(self._fwd, key)

    def backward(self, key: str) -> str | None:
        return self._apply(self._bwd, key)


T5_MAP = TemplateMap([
    ("token_embedding.weight", "shared.weight"),
    ("blocks.{i}.norm1.weight", "encoder.block.{i}.layer.0.layer_norm.weight"),
    ("blocks.{i}.attn.q.weight", "encoder.block.{i}.layer.0.SelfAttention.q.weight"),
    ("blocks.{i}.attn.k.weight", "encoder.block.{i}.layer.0.SelfAttention.k.weight"),
    ("blocks.{i}.attn.v.weight", "encoder.block.{i}.layer.0.SelfAttention.v.weight"),
    ("blocks.{i}.attn.o.weight", "encoder.block.{i}.layer.0.SelfAttention.o.weight"),
    ("blocks.{i}.pos_embedding.embedding.weight",
     "encoder.block.{i}.layer.0.SelfAttention.relative_attention_bias.weight"),
    ("blocks.{i}.norm2.weight", "encoder.block.{i}.layer.1.layer_norm.weight"),
    ("blocks.{i}.ffn.gate.0.weight", "encoder.block.{i}.layer.1.DenseReluDense.wi_0.weight"),  # gelu branch
    ("blocks.{i}.ffn.fc1.weight", "encoder.block.{i}.layer.1.DenseReluDense.wi_1.weight"),  # linear branch
    ("blocks.{i}.ffn.fc2.weight", "encoder.block.{i}.layer.1.DenseReluDense.wo.weight"),
    ("norm.weight", "encoder.final_layer_norm.weight"),
])

# CLIP visual tower (open-clip ViT-H/14 as Wan ships it) -> transformers CLIPVisionModel (names below the
# `vision_model.` prefix, which transformers 5 dropped from the state dict; see clip_prefix). to_qkv is split.
CLIP_MAP = TemplateMap([
    ("visual.patch_embedding.weight", "embeddings.patch_embedding.weight"),
    ("visual.cls_embedding", "embeddings.class_embedding"),
    ("visual.pos_embedding", "embeddings.position_embedding.weight"),
    ("visual.pre_norm.weight", "pre_layrnorm.weight"),
    ("visual.pre_norm.bias", "pre_layrnorm.bias"),
    ("visual.transformer.{i}.norm1.weight", "encoder.layers.{i}.layer_norm1.weight"),
    ("visual.transformer.{i}.norm1.bias", "encoder.layers.{i}.layer_norm1.bias"),
    ("visual.transformer.{i}.attn.proj.weight", "encoder.layers.{i}.self_attn.out_proj.weight"),
    ("visual.transformer.{i}.attn.proj.bias", "encoder.layers.{i}.self_attn.out_proj.bias"),
    ("visual.transformer.{i}.norm2.weight", "encoder.layers.{i}.layer_norm2.weight"),
    ("visual.transformer.{i}.norm2.bias", "encoder.layers.{i}.layer_norm2.bias"),
    ("visual.transformer.{i}.mlp.0.weight", "encoder.layers.{i}.mlp.fc1.weight"),
    ("visual.transformer.{i}.mlp.0.bias", "encoder.layers.{i}.mlp.fc1.bias"),
    ("visual.transformer.{i}.mlp.2.weight", "encoder.layers.{i}.mlp.fc2.weight"),
    ("visual.transformer.{i}.mlp.2.bias", "encoder.layers.{i}.mlp.fc2.bias"),
])
CLIP_QKV = re.compile(r"^visual\.transformer\.(\d+)\.attn\.to_qkv\.(weight|bias)$")

# The VAE's residual-block internals: Wan's nn.Sequential indices -> diffusers' names.
_VAE_RES = [("residual.0.gamma", "norm1.gamma"), ("residual.2.", "conv1."), ("residual.3.gamma", "norm2.gamma"),
            ("residual.6.", "conv2."), ("shortcut.", "conv_shortcut.")]


def vae_key_to_wan(key: str, num_res_blocks: int) -> str:
    """diffusers AutoencoderKLWan key -> Wan2.1_VAE.pth key, for any depth (diffusers' own converter
    hard-codes the full-size VAE's indices; tests check the two agree there)."""
    def res(rest: str) -> str:
        for wan, dif in _VAE_RES:
            if rest.startswith(dif):
                return wan + rest[len(dif):]
        return rest

    for side in ("encoder", "decoder"):
        if key.startswith(f"{side}.conv_in."):
            return key.replace(f"{side}.conv_in.", f"{side}.conv1.", 1)
        if key.startswith(f"{side}.norm_out."):
            return key.replace(f"{side}.norm_out.", f"{side}.head.0.", 1)
        if key.startswith(f"{side}.conv_out."):
            return key.replace(f"{side}.conv_out.", f"{side}.head.2.", 1)
        m = re.match(rf"^{side}\.mid_block\.(resnets|attentions)\.(\d)\.(.*)$", key)
        if m:
            idx = {"resnets": {"0": 0, "1": 2}, "attentions": {"0": 1}}[m.group(1)][m.group(2)]
            rest = res(m.group(3)) if m.group(1) == "resnets" else m.group(3)
            return f"{side}.middle.{idx}.{rest}"
    m = re.match(r"^encoder\.down_blocks\.(\d+)\.(.*)$", key)
    if m:
        return f"encoder.downsamples.{m.group(1)}.{res(m.group(2))}"
    m = re.match(r"^decoder\.up_blocks\.(\d+)\.(resnets|upsamplers)\.(\d+)\.(.*)$", key)
    if m:
        level, kind, j, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
        stride = num_res_blocks + 2  # num_res_blocks + 1 residual blocks, then one upsampler, per level
        if kind == "resnets":
            return f"decoder.upsamples.{level * stride + j}.{res(rest)}"
        return f"decoder.upsamples.{level * stride + num_res_blocks + 1}.{rest}"
    if key.startswith("quant_conv."):
        return key.replace("quant_conv.", "conv1.", 1)
    if key.startswith("post_quant_conv."):
        return key.replace("post_quant_conv.", "conv2.", 1)
    return key


# -------------------------------------------------------------------------------------------------- DiT
def strip_prefix(key: str) -> str:
    for prefix in ("model.diffusion_model.", "diffusion_model.", "transformer."):
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def is_diffusers_dit_naming(keys) -> bool:
    return any(".attn1." in k or k.startswith("condition_embedder.") for k in keys)


def dit_key_map(keys: list[str]) -> dict[str, str]:
    """checkpoint key -> diffusers WanTransformer3DModel key, for Wan's or diffusers' naming (with or without
    a `model.diffusion_model.` / `diffusion_model.` prefix). Uses diffusers' own Wan converter on the names."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    stripped = {k: strip_prefix(k) for k in keys}
    if is_diffusers_dit_naming(stripped.values()):
        return stripped
    # The converter only renames (pop + re-insert); feeding it the names themselves yields the mapping.
    converted = convert_wan_transformer_to_diffusers({s: k for k, s in stripped.items()})
    return {orig: new for new, orig in converted.items()}


_DIT_TO_WAN = [
    ("condition_embedder.time_embedder.linear_1.", "time_embedding.0."),
    ("condition_embedder.time_embedder.linear_2.", "time_embedding.2."),
    ("condition_embedder.text_embedder.linear_1.", "text_embedding.0."),
    ("condition_embedder.text_embedder.linear_2.", "text_embedding.2."),
    ("condition_embedder.time_proj.", "time_projection.1."),
    ("condition_embedder.image_embedder.norm1.", "img_emb.proj.0."),
    ("condition_embedder.image_embedder.ff.net.0.proj.", "img_emb.proj.1."),
    ("condition_embedder.image_embedder.ff.net.2.", "img_emb.proj.3."),
    ("condition_embedder.image_embedder.norm2.", "img_emb.proj.4."),
    ("proj_out.", "head.head."),
]
_DIT_BLOCK_TO_WAN = [
    (".attn1.", ".self_attn."), (".attn2.", ".cross_attn."), (".to_q.", ".q."), (".to_k.", ".k."),
    (".to_v.", ".v."), (".to_out.0.", ".o."), (".add_k_proj.", ".k_img."), (".add_v_proj.", ".v_img."),
    (".norm_added_k.", ".norm_k_img."), (".norm2.", ".norm3."), (".ffn.net.0.proj.", ".ffn.0."),
    (".ffn.net.2.", ".ffn.2."),
]


def dit_key_to_wan(key: str) -> str:
    """diffusers WanTransformer3DModel key -> Wan's original key (used to write stand-in checkpoints)."""
    if key == "scale_shift_table":
        return "head.modulation"
    for dif, wan in _DIT_TO_WAN:
        if key.startswith(dif):
            return wan + key[len(dif):]
    m = re.match(r"^blocks\.(\d+)\.(.*)$", key)
    if m:
        rest = "." + m.group(2)
        if rest == ".scale_shift_table":
            return f"blocks.{m.group(1)}.modulation"
        for dif, wan in _DIT_BLOCK_TO_WAN:
            rest = rest.replace(dif, wan)
        return f"blocks.{m.group(1)}{rest}"
    return key


def dit_config_from_wan(wan_cfg: dict[str, Any], family: str, source: str) -> dict[str, Any]:
    """Wan's WanModel config.json -> diffusers WanTransformer3DModel config.

    `family` settles what the file cannot: Wan2.1's I2V DiT has a CLIP image embedder, Wan2.2's does not,
    though both say model_type "i2v". Keys of diffusers' config present in the file override the result."""
    missing = [k for k in _WAN_DIT_REQUIRED if k not in wan_cfg]
    if missing:
        raise CheckpointError(f"{source} lacks {', '.join(missing)} (expected Wan's WanModel config.json)")
    c = {**_WAN_DIT_DEFAULTS, **wan_cfg}
    dim, heads = int(c["dim"]), int(c["num_heads"])
    if dim % heads:
        raise CheckpointError(f"{source}: dim {dim} is not a multiple of num_heads {heads}")
    image = c.get("model_type") == "i2v" and family == "wan2.1"
    out = dict(patch_size=tuple(c["patch_size"]), num_attention_heads=heads, attention_head_dim=dim // heads,
               in_channels=int(c["in_dim"]), out_channels=int(c["out_dim"]), text_dim=int(c["text_dim"]),
               freq_dim=int(c["freq_dim"]), ffn_dim=int(c["ffn_dim"]), num_layers=int(c["num_layers"]),
               cross_attn_norm=bool(c["cross_attn_norm"]),
               qk_norm="rms_norm_across_heads" if c["qk_norm"] else None, eps=float(c["eps"]),
               image_dim=1280 if image else None, added_kv_proj_dim=dim if image else None,
               rope_max_seq_len=1024, pos_embed_seq_len=None)
    for key in ("image_dim", "rope_max_seq_len", "pos_embed_seq_len", "added_kv_proj_dim"):
        if key in wan_cfg:
            out[key] = wan_cfg[key]
    return out


# ---------------------------------------------------------------------------------------------- layout
def is_wan_layout(folder: Path) -> bool:
    return (folder / T5_FILE).is_file() or (folder / EXPERT_DIRS["high"]).is_dir() or \
        _wan_root_dit_config(folder) is not None


def _wan_root_dit_config(folder: Path) -> dict[str, Any] | None:
    cfg = folder / "config.json"
    if not cfg.is_file():
        return None
    data = read_json(cfg)
    return data if data.get("_class_name") == "WanModel" or "num_heads" in data else None


def wan_family(folder: Path) -> str:
    """'wan2.2' (two experts in high_noise_model/ and low_noise_model/) or 'wan2.1' (one DiT at the top)."""
    if (folder / EXPERT_DIRS["high"]).is_dir() or (folder / EXPERT_DIRS["low"]).is_dir():
        return "wan2.2"
    if _wan_root_dit_config(folder) is not None:
        return "wan2.1"
    raise CheckpointError(f"{folder} has neither high_noise_model/ + low_noise_model/ (Wan2.2 A14B) nor a "
                          f"top-level WanModel config.json (Wan2.1): not Wan's original layout")


def wan_dit_dir(folder: Path, expert: str) -> Path:
    return folder / EXPERT_DIRS[expert] if expert in EXPERT_DIRS else folder


def wan_dit_wan_config(folder: Path, expert: str) -> tuple[Path, dict[str, Any]]:
    path = wan_dit_dir(folder, expert) / "config.json"
    return path, read_json(path)


# ---------------------------------------------------------------------------------------------- loaders
def load_t5(folder: Path, dtype: torch.dtype):
    """(tokenizer, UMT5EncoderModel) from models_t5_umt5-xxl-enc-bf16.pth + google/umt5-xxl/."""
    from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

    from .checkpoint import load_pth

    weights_path = folder / T5_FILE
    sd = load_pth(weights_path)
    cfg = UMT5Config(**(arch_override(weights_path) or UMT5_XXL))
    converted = convert_t5(sd, cfg, str(weights_path))
    tok_dir = folder / T5_TOKENIZER
    if not tok_dir.is_dir():
        raise CheckpointError(f"missing tokenizer folder {tok_dir}")
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    encoder = UMT5EncoderModel.from_pretrained(None, config=cfg, state_dict=converted, torch_dtype=dtype)
    return tokenizer, encoder


def convert_t5(sd: dict[str, torch.Tensor], cfg, source: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for k, v in sd.items():
        new = T5_MAP.forward(k)
        if new is None:
            unknown.append(k)
        else:
            out[new] = v
    if unknown:
        raise CheckpointError(f"{source}: {len(unknown)} key(s) are not Wan T5 encoder keys, e.g. {unknown[:5]}")
    out["encoder.embed_tokens.weight"] = out.get("shared.weight")
    check_shapes(out, expected_t5_shapes(cfg), source)
    return out


def expected_t5_shapes(cfg) -> dict[str, tuple[int, ...]]:
    from accelerate import init_empty_weights
    from transformers import UMT5EncoderModel

    with init_empty_weights():
        model = UMT5EncoderModel(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_shapes(found: dict[str, Any], expected: dict[str, tuple[int, ...]], source: str,
                 shape_of=lambda v: tuple(v.shape)) -> None:
    """Raise naming every missing, unexpected or wrongly shaped key (first few of each)."""
    problems = []
    missing = [k for k in expected if k not in found]
    extra = [k for k in found if k not in expected]
    bad = [f"{k} {shape_of(found[k])} (expected {expected[k]})" for k in expected
           if k in found and found[k] is not None and shape_of(found[k]) != expected[k]]
    if missing:
        problems.append(f"{len(missing)} missing key(s): {', '.join(missing[:6])}")
    if extra:
        problems.append(f"{len(extra)} unexpected key(s): {', '.join(extra[:6])}")
    if bad:
        problems.append(f"{len(bad)} shape mismatch(es): {'; '.join(bad[:6])}")
    if problems:
        raise CheckpointError(f"{source} does not fit the architecture: " + " | ".join(problems))


def vae_config(weights_path: Path) -> dict[str, Any]:
    return arch_override(weights_path) or dict(WAN21_VAE)


def load_vae(folder: Path):
    """diffusers AutoencoderKLWan (float32, like every reference pipeline) from Wan2.1_VAE.pth."""
    from diffusers import AutoencoderKLWan

    from .checkpoint import load_pth

    path = folder / VAE_FILE
    sd = load_pth(path)
    vae = AutoencoderKLWan(**vae_config(path))
    vae.load_state_dict(convert_vae(sd, vae, str(path)), strict=True)
    return vae.float().eval()


def convert_vae(sd: dict[str, torch.Tensor], vae, source: str) -> dict[str, torch.Tensor]:
    n = vae.config.num_res_blocks
    expected = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    wan_to_dif = {vae_key_to_wan(k, n): k for k in expected}
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        out[wan_to_dif.get(k, k)] = v.float()
    check_shapes(out, expected, source)
    return out


def clip_config(weights_path: Path) -> dict[str, Any]:
    return arch_override(weights_path) or dict(CLIP_VIT_H14)


def load_clip(folder: Path, dtype: torch.dtype):
    """(CLIPImageProcessor, CLIPVisionModel) from Wan's open-clip .pth (only the visual tower is used)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from .checkpoint import load_pth

    path = folder / CLIP_FILE
    cfg = CLIPVisionConfig(**clip_config(path))
    model = CLIPVisionModel(cfg)
    model.load_state_dict(convert_clip(load_pth(path), model, str(path)), strict=True)
    return clip_processor(cfg.image_size), model.to(dtype).eval()


def clip_processor(image_size: int):
    """Wan's CLIP preprocessing as transformers' CLIPImageProcessor (the .pth carries no processor config)."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})


def clip_prefix(model) -> str:
    """'vision_model.' when this transformers version keeps it in CLIPVisionModel's state dict, else ''."""
    return "" if "embeddings.class_embedding" in model.state_dict() else "vision_model."


def convert_clip(sd: dict[str, torch.Tensor], model, source: str) -> dict[str, torch.Tensor]:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    out = map_clip(sd, model)
    check_shapes(out, expected, source)
    return out


def map_clip(sd: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """Wan's visual-tower keys -> CLIPVisionModel's (to_qkv split in three; the identity post-norm and the
    position ids added); other towers' keys are dropped. No shape check (convert_clip does it)."""
    pre = clip_prefix(model)
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        m = CLIP_QKV.match(k)
        if m:
            q, kk, vv = v.chunk(3, dim=0)
            for name, part in zip(("q_proj", "k_proj", "v_proj"), (q, kk, vv)):
                out[f"{pre}encoder.layers.{m.group(1)}.self_attn.{name}.{m.group(2)}"] = part
            continue
        new = CLIP_MAP.forward(k)
        if new is None:
            continue  # the text tower, the projection head and log_scale are not used by Wan's I2V
        new = pre + new
        if new.endswith("class_embedding"):
            v = v.reshape(-1)
        elif new.endswith("position_embedding.weight"):
            v = v.reshape(v.shape[-2], v.shape[-1])
        out[new] = v
    # Wan's ViT has no post-norm (and Wan reads the 31st block's output, before it): identity.
    width = model.config.hidden_size
    out.setdefault(f"{pre}post_layernorm.weight", torch.ones(width))
    out.setdefault(f"{pre}post_layernorm.bias", torch.zeros(width))
    for k, v in model.state_dict().items():
        if k.endswith("position_ids"):
            out.setdefault(k, v)
    return out


def clip_key_to_wan(key: str) -> str | None:
    return CLIP_MAP.backward(key[len("vision_model."):] if key.startswith("vision_model.") else key)
