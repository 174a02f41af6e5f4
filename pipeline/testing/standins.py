"""Tiny stand-ins of the real checkpoint files, written from the embedded tiny model in each real format with
the real key names, dtypes and folder layout: Wan's original layout, LightX2V single files (bf16, scaled fp8,
int8, ComfyUI's scaled fp8), GGUF experts (ours, and city96's tools' form), LoRAs in each key style and in the
forms the real tools write (LightX2V's extractor, Lightning, musubi-tuner, diffusers with metadata), a tiny
Wan2.1 I2V model (one DiT + CLIP image encoder) and a tiny Wan2.1 T2V model (one DiT). The tests load them through the same loaders a full-size model uses, and `check-config`
can be tried on them (`write_standin_tree`).
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..store import atomic_path, atomic_write_text
from ..models import wan_layout as wl
from ..models.checkpoint import load_pth

FP8 = torch.float8_e4m3fn
QUANT_BLOCK = re.compile(r"^blocks\.\d+\.(self_attn|cross_attn|ffn)\.")


# ------------------------------------------------------------------------------------------- helpers
def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    with atomic_path(Path(path)) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def _save_pth(tensors: dict[str, torch.Tensor], path: Path) -> None:
    with atomic_path(Path(path)) as tmp:
        torch.save({k: v.contiguous() for k, v in tensors.items()}, tmp)


def _write_json(path: Path, data: dict) -> None:
    atomic_write_text(Path(path), json.dumps(data, indent=2, sort_keys=True))


def _state(folder: Path) -> dict[str, torch.Tensor]:
    from ..models.checkpoint import TensorFiles

    with TensorFiles.open(folder) as f:
        return {k: f.get(k) for k in f.keys()}


def _cast(sd: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    return sd if dtype is None else {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}


def _config(folder: Path) -> dict:
    return {k: v for k, v in wl.read_json(folder / "config.json").items() if not k.startswith("_")}


# ----------------------------------------------------------------------------------------- DiT (Wan)
def wan_dit_state(transformer_dir: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """A diffusers transformer folder's weights under Wan's original key names (checked by a round trip
    through diffusers' own Wan converter)."""
    sd = _state(transformer_dir)
    out = {wl.dit_key_to_wan(k): v for k, v in sd.items()}
    back = wl.dit_key_map(list(out))
    if sorted(back.values()) != sorted(sd) or any(back[wl.dit_key_to_wan(k)] != k for k in sd):
        raise AssertionError("Wan <-> diffusers DiT key mapping does not round-trip")
    return _cast(out, dtype)


def wan_dit_config(transformer_dir: Path, model_type: str) -> dict:
    """Wan's WanModel config.json for a diffusers transformer config (plus the keys Wan's constructor takes and
    the tiny model needs: text_dim, patch_size, rope_max_seq_len, image_dim)."""
    c = _config(transformer_dir)
    dim = c["num_attention_heads"] * c["attention_head_dim"]
    out = {"_class_name": "WanModel", "_diffusers_version": "0.33.0", "model_type": model_type,
           "patch_size": list(c["patch_size"]), "text_len": 512, "in_dim": c["in_channels"], "dim": dim,
           "ffn_dim": c["ffn_dim"], "freq_dim": c["freq_dim"], "text_dim": c["text_dim"],
           "out_dim": c["out_channels"], "num_heads": c["num_attention_heads"], "num_layers": c["num_layers"],
           "window_size": [-1, -1], "qk_norm": c["qk_norm"] is not None, "cross_attn_norm": c["cross_attn_norm"],
           "eps": c["eps"], "rope_max_seq_len": c["rope_max_seq_len"]}
    if c.get("image_dim"):
        out["image_dim"] = c["image_dim"]
    return out


def write_dit_shards(state: dict[str, torch.Tensor], out_dir: Path, config: dict, shards: int = 2) -> None:
    """Wan's per-expert folder: diffusion_pytorch_model-0000i-of-0000n.safetensors + index + config.json."""
    keys = sorted(state)
    per = -(-len(keys) // shards)
    weight_map, total = {}, 0
    for i in range(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[i * per:(i + 1) * per]}
        _save_safetensors(part, out_dir / name, {"format": "pt"})
        weight_map.update({k: name for k in part})
        total += sum(v.numel() * v.element_size() for v in part.values())
    _write_json(out_dir / "diffusion_pytorch_model.safetensors.index.json",
                {"metadata": {"total_size": total}, "weight_map": weight_map})
    _write_json(out_dir / "config.json", config)


def quantize_state(state: dict[str, torch.Tensor], scheme: str) -> dict[str, torch.Tensor]:
    """LightX2V's converter on Wan-named weights: the 2-D weights of the blocks' attention and FFN layers
    become fp8 (`fp8`) or int8 (`int8`) with a float32 `weight_scale` [out, 1]; `fp8-comfyui` writes ComfyUI's
    variant (one `scale_weight` per tensor and a `scaled_fp8` marker). Other tensors stay as they are."""
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if not (QUANT_BLOCK.match(k) and k.endswith(".weight") and v.dim() == 2):
            out[k] = v
            continue
        w = v.float()
        if scheme == "fp8-comfyui":
            s = w.abs().amax().clamp(min=1e-12) / torch.finfo(FP8).max
            out[k] = (w / s).clamp(-448, 448).to(FP8)
            out[k[: -len("weight")] + "scale_weight"] = s.reshape(())
        elif scheme in ("fp8", "int8"):
            qmax = torch.finfo(FP8).max if scheme == "fp8" else 127.0
            s = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-5) / qmax
            q = (w / s).clamp(-qmax, qmax)
            out[k] = q.to(FP8) if scheme == "fp8" else q.round().to(torch.int8)
            out[k + "_scale"] = s.float()
        else:
            raise ValueError(f"unknown scheme {scheme!r}")
    if scheme == "fp8-comfyui":
        out["scaled_fp8"] = torch.zeros(0, dtype=FP8)
    return out


def write_single_file(transformer_dir: Path, path: Path, scheme: str | None = None,
                      dtype: torch.dtype | None = None, prefix: str = "") -> None:
    """A LightX2V-style single-file DiT (Wan key names): bf16/fp32 distilled, or quantized with `scheme`."""
    state = wan_dit_state(transformer_dir, dtype)
    if scheme:
        state = quantize_state(state, scheme)
    _save_safetensors({prefix + k: v for k, v in state.items()}, path)


# --------------------------------------------------------------------------------------------- GGUF
def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """A plain (not error-optimising) Q4_K quantizer, written because the gguf package has no Q4_K
    `quantize`: blocks of 256 = 8 sub-blocks of 32, value = d*sc*q - dmin*m with 6-bit sc, m and 4-bit q."""
    blocks = x.reshape(-1, 8, 32).astype(np.float32)
    mins = np.minimum(blocks.min(axis=2), 0.0)
    scales = (blocks.max(axis=2) - mins) / 15.0
    d = scales.max(axis=1) / 63.0
    dmin = (-mins).max(axis=1) / 63.0
    d16, dmin16 = d.astype(np.float16), dmin.astype(np.float16)
    d, dmin = d16.astype(np.float32), dmin16.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d[:, None] > 0, np.round(scales / d[:, None]), 0).clip(0, 63).astype(np.uint8)
        m = np.where(dmin[:, None] > 0, np.round(-mins / dmin[:, None]), 0).clip(0, 63).astype(np.uint8)
        step = d[:, None] * sc
        q = np.where(step[:, :, None] > 0,
                     np.round((blocks + (dmin[:, None] * m)[:, :, None]) / step[:, :, None]), 0)
    q = q.clip(0, 15).astype(np.uint8).reshape(-1, 256)
    packed = np.zeros((len(blocks), 12), dtype=np.uint8)
    packed[:, 0:4] = (sc[:, 0:4] & 63) | ((sc[:, 4:8] >> 4) << 6)
    packed[:, 4:8] = (m[:, 0:4] & 63) | ((m[:, 4:8] >> 4) << 6)
    packed[:, 8:12] = (sc[:, 4:8] & 0xF) | ((m[:, 4:8] & 0xF) << 4)
    qs = np.zeros((len(blocks), 128), dtype=np.uint8)
    for i in range(4):  # 64 values per 32 bytes: low nibbles the first 32, high nibbles the next 32
        qs[:, 32 * i:32 * (i + 1)] = q[:, 64 * i:64 * i + 32] | (q[:, 64 * i + 32:64 * (i + 1)] << 4)
    out = np.concatenate([d16.view(np.uint8).reshape(-1, 2), dmin16.view(np.uint8).reshape(-1, 2), packed, qs],
                         axis=1)
    return out.reshape(*x.shape[:-1], x.shape[-1] // 256 * 144)


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """A plain Q6_K quantizer (the gguf package has none): blocks of 256 = 16 sub-blocks of 16, value =
    d * sc * (q - 32) with an int8 sc per sub-block and 6-bit q, packed as the gguf package's dequantizer reads
    it (low nibbles in ql, high 2 bits in qh, then the scales, then d as float16)."""
    blocks = x.reshape(-1, 16, 16).astype(np.float32)
    n = len(blocks)
    amax = np.abs(blocks).max(axis=2)
    scale = amax / 31.0
    d16 = (scale.max(axis=1) / 127.0).astype(np.float16)
    d = d16.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d[:, None] > 0, np.round(scale / d[:, None]), 0).clip(-128, 127).astype(np.int8)
        step = d[:, None] * sc.astype(np.float32)
        q = np.where(step[:, :, None] > 0, np.round(blocks / step[:, :, None]), 0)
    q = (q.clip(-32, 31) + 32).astype(np.uint8).reshape(n, 2, 128)  # two halves of 128 values
    low, high = q & 0xF, q >> 4
    ql = (low[:, :, :64] | (low[:, :, 64:] << 4)).reshape(n, 128)
    qh = (high[:, :, 0:32] | (high[:, :, 32:64] << 2) | (high[:, :, 64:96] << 4) | (high[:, :, 96:128] << 6))
    out = np.concatenate([ql, qh.reshape(n, 64), sc.view(np.uint8), d16.view(np.uint8).reshape(-1, 2)], axis=1)
    return out.reshape(*x.shape[:-1], x.shape[-1] // 256 * 210)


def gguf_quantize(arr: np.ndarray, qtype) -> np.ndarray:
    import gguf

    if qtype == gguf.GGMLQuantizationType.Q4_K:
        return quantize_q4_k(arr)
    if qtype == gguf.GGMLQuantizationType.Q6_K:
        return quantize_q6_k(arr)
    return gguf.quants.quantize(arr, qtype)


def write_gguf(state: dict[str, torch.Tensor], path: Path, qtype_of: Callable[[str, torch.Tensor], object]) -> None:
    """A ComfyUI-GGUF style file: Wan key names, `qtype_of(key, tensor)` picks each tensor's type. A tensor whose
    rows do not fill whole quant blocks, or with more than 4 dimensions, is stored flattened to blocks of 256
    (or 32) values with its real shape in `comfy.gguf.orig_shape.<key>`, as ComfyUI-GGUF's converter does."""
    import gguf

    with atomic_path(Path(path)) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch="wan")
        for key, t in state.items():
            qtype = qtype_of(key, t)
            arr = t.float().numpy()
            block = gguf.GGML_QUANT_SIZES[qtype][0]
            if arr.size % block:
                qtype, block = gguf.GGMLQuantizationType.F32, 1
            if arr.ndim > 4 or arr.shape[-1] % block:
                writer.add_array(f"comfy.gguf.orig_shape.{key}", [int(d) for d in arr.shape])
                if arr.size % 256 == 0 and 256 % block == 0:
                    arr = arr.reshape(-1, 256)
                elif block > 1:
                    arr = arr.reshape(-1, block)
                else:
                    arr = arr.reshape(arr.shape[0], -1)
            if qtype == gguf.GGMLQuantizationType.F32:
                writer.add_tensor(key, np.ascontiguousarray(arr, dtype=np.float32))
            elif qtype == gguf.GGMLQuantizationType.F16:
                writer.add_tensor(key, np.ascontiguousarray(arr, dtype=np.float16))
            else:
                writer.add_tensor(key, gguf_quantize(arr, qtype), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()


def gguf_types_for(name: str):
    """qtype_of for a QuantStack-like file: 2-D+ weights in `name` (Q4_K_M: Q4_K, Q8_0, ...), the rest F32."""
    import gguf

    main = gguf.GGMLQuantizationType[name.replace("_M", "").replace("_S", "")]

    def qtype_of(key: str, t: torch.Tensor):
        if not (key.endswith(".weight") and t.dim() >= 2 and "patch_embedding" not in key):
            return gguf.GGMLQuantizationType.F32
        block = gguf.GGML_QUANT_SIZES[main][0]
        if t.numel() % block == 0:
            return main
        # K-quant files mix types: what does not fill 256-value blocks falls back to Q8_0, as in real files
        return gguf.GGMLQuantizationType.Q8_0 if t.numel() % 32 == 0 else gguf.GGMLQuantizationType.F32

    return qtype_of


def write_gguf_expert(transformer_dir: Path, path: Path, quant: str = "Q8_0") -> None:
    write_gguf(wan_dit_state(transformer_dir), path, gguf_types_for(quant))


# city96's pipeline for Wan (ComfyUI-GGUF tools/): convert.py, then its patched llama-quantize, then
# fix_5d_tensors.py. Names llama-quantize keeps unquantized for Wan, and the ones its Q4_K_M rules raise to Q6_K.
_CITY96_KEEP = ("modulation.", "patch_embedding.", "text_embedding.", "time_projection.", "time_embedding.",
                "img_emb.", "head.")
_CITY96_Q6K = (".v.weight", ".ffn.2.weight")
CITY96_FTYPES = {"Q4_K_M": 15, "Q8_0": 7, "BF16": 32}  # gguf.LlamaFileType values


def city96_types(state: dict[str, torch.Tensor], ftype: str = "Q4_K_M") -> dict[str, str]:
    """Each tensor's GGUF type as city96's tools give it, from a bf16 Wan-named state dict: convert.py keeps
    1-D, small (<= 1024 values) and `.modulation` tensors F32 and writes the rest BF16, leaving the 5-D patch
    embedding out (fix_5d_tensors.py adds it back as F32, with its 5 dimensions); llama-quantize then
    quantizes the 2-D tensors outside _CITY96_KEEP: Q4_K_M is Q4_K, with `.v` and `.ffn.2` weights Q6_K, and
    a K-quant whose rows are not a multiple of 256 falls back to F16."""
    out = {}
    for key, t in state.items():
        if t.dim() > 4 or t.dim() == 1 or t.numel() <= 1024 or ".modulation" in key:
            out[key] = "F32"
            continue
        out[key] = "BF16"
        if ftype == "BF16" or t.dim() != 2 or any(k in key for k in _CITY96_KEEP):
            continue
        if ftype == "Q8_0":
            out[key] = "Q8_0" if t.shape[-1] % 32 == 0 else "F16"
        elif ftype == "Q4_K_M":
            kind = "Q6_K" if key.endswith(_CITY96_Q6K) else "Q4_K"
            out[key] = kind if t.shape[-1] % 256 == 0 else "F16"
        else:
            raise ValueError(f"unknown ftype {ftype!r}")
    return out


def write_gguf_city96(state: dict[str, torch.Tensor], path: Path, ftype: str = "Q4_K_M") -> dict[str, str]:
    """A Wan expert as city96's tools write it (see city96_types): no `comfy.gguf.orig_shape` (Wan is not a
    shape_fix architecture), the 5-D patch embedding as a plain 5-D F32 tensor, general.architecture `wan`,
    the file type and quantization version. `state` should be bf16, as the published checkpoints are."""
    import gguf

    types = city96_types(state, ftype)
    with atomic_path(Path(path)) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch="wan")
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_file_type(CITY96_FTYPES[ftype])
        for key, t in state.items():
            qtype = gguf.GGMLQuantizationType[types[key]]
            arr = t.float().numpy()
            if qtype == gguf.GGMLQuantizationType.F32:
                writer.add_tensor(key, np.ascontiguousarray(arr, dtype=np.float32))
            elif qtype == gguf.GGMLQuantizationType.F16:
                writer.add_tensor(key, np.ascontiguousarray(arr, dtype=np.float16))
            else:
                data = gguf.quants.quantize(arr, qtype) if qtype == gguf.GGMLQuantizationType.BF16 \
                    else gguf_quantize(arr, qtype)
                writer.add_tensor(key, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return types


def build_wide_dit(out: Path, seed: int = 41, layers: int = 2) -> Path:
    """A randomly initialised diffusers Wan DiT 256 wide (2 heads of 128), so K-quants (rows of 256) apply to its
    attention and FFN weights as they do at full size; patch (1, 2, 2) gives the 5-D patch embedding. bf16."""
    from diffusers import WanTransformer3DModel

    from ..tiny import DIT_CONFIG

    torch.manual_seed(seed)
    cfg = {**DIT_CONFIG, "num_attention_heads": 2, "attention_head_dim": 128, "ffn_dim": 512, "num_layers": layers,
           "patch_size": (1, 2, 2)}
    model = WanTransformer3DModel(**cfg).eval()
    with torch.no_grad():  # diffusers zero-initialises nothing we need, but make every tensor carry signal
        for name, p in model.named_parameters():
            if p.dim() == 1 and not name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    return Path(out)


# --------------------------------------------------------------------------------------------- LoRA
LORA_STYLES = ("lightx2v", "comfyui", "diffusers", "kohya")


def write_lora(transformer_dir: Path, path: Path, style: str = "lightx2v", rank: int = 4, seed: int = 0,
               scale: float = 0.05, alpha: float | None = None, diffs: bool = True,
               blocks: str = r"(attn1|attn2|ffn)") -> dict[str, torch.Tensor]:
    """A LoRA over the attention/FFN linears of a diffusers transformer folder, in one key style:
    lightx2v (diffusion_model.<wan>.lora_down/lora_up), comfyui (diffusion_model.<wan>.lora_A/lora_B),
    diffusers (transformer.<diffusers>.lora_A/lora_B), kohya (lora_unet_<wan with _>.lora_down/up).
    With `diffs`, the blocks' cross-attention norm and a bias get `.diff` / `.diff_b` entries."""
    sd = _state(transformer_dir)
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for k, w in sorted(sd.items()):
        if not (re.match(rf"^blocks\.\d+\.{blocks}\.", k) and k.endswith(".weight") and w.dim() == 2):
            continue
        mod = k[: -len(".weight")]
        down = torch.randn(rank, w.shape[1], generator=g) * scale
        up = torch.randn(w.shape[0], rank, generator=g) * scale
        wan = wl.dit_key_to_wan(k)[: -len(".weight")]
        if style == "lightx2v":
            base, dn, upn = f"diffusion_model.{wan}", ".lora_down.weight", ".lora_up.weight"
        elif style == "comfyui":
            base, dn, upn = f"diffusion_model.{wan}", ".lora_A.weight", ".lora_B.weight"
        elif style == "diffusers":
            base, dn, upn = f"transformer.{mod}", ".lora_A.weight", ".lora_B.weight"
        elif style == "kohya":
            base, dn, upn = "lora_unet_" + wan.replace(".", "_"), ".lora_down.weight", ".lora_up.weight"
        else:
            raise ValueError(f"unknown LoRA style {style!r}")
        out[base + dn], out[base + upn] = down, up
        if alpha is not None:
            out[base + ".alpha"] = torch.tensor(float(alpha))
    if diffs:
        prefix = "transformer." if style == "diffusers" else "diffusion_model."
        for k, w in sorted(sd.items()):
            m = re.match(r"^blocks\.(\d+)\.norm2\.(weight|bias)$", k)  # the cross-attention norm
            if m:
                name = k if style == "diffusers" else wl.dit_key_to_wan(k)
                base = name[: -len("." + m.group(2))]
                out[prefix + base + (".diff" if m.group(2) == "weight" else ".diff_b")] = \
                    torch.randn(w.shape, generator=g) * scale
    _save_safetensors(out, path)
    return out


# LoRAs as the tools that make them write them (`write_tool_lora`): the key names, dtypes, alpha tensors and
# header metadata of each tool's output.
TOOL_LORA_FORMS = ("lightx2v-extractor", "lightning", "musubi", "diffusers")
_LINEAR = re.compile(r"^blocks\.\d+\.(self_attn|cross_attn)\.(q|k|v|o)\.weight$|^blocks\.\d+\.ffn\.(0|2)\.weight$")


def _wan21_image_entries(dim: int, layers: int, g: torch.Generator, scale: float) -> dict[str, torch.Tensor]:
    """Wan-named weights of Wan2.1 I2V's CLIP image conditioning (what a Wan2.1 I2V LoRA also carries)."""
    out = {}
    for i in range(layers):
        for name in ("k_img", "v_img"):
            out[f"blocks.{i}.cross_attn.{name}.weight"] = torch.randn(dim, dim, generator=g) * scale
            out[f"blocks.{i}.cross_attn.{name}.bias"] = torch.randn(dim, generator=g) * scale
        out[f"blocks.{i}.cross_attn.norm_k_img.weight"] = torch.randn(dim, generator=g) * scale
    for j, shape in (("0", (1280,)), ("1", (1280, 1280)), ("3", (dim, 1280)), ("4", (dim,))):
        out[f"img_emb.proj.{j}.weight"] = torch.randn(*shape, generator=g) * scale
    return out


def write_tool_lora(transformer_dir: Path, path: Path, form: str, rank: int = 4, seed: int = 0,
                    scale: float = 0.05, alpha: float = 8.0, image_keys: bool = False,
                    pair_min_params: int = 1_000_000) -> None:
    """A LoRA for a diffusers transformer folder in one tool's form:

    lightx2v-extractor  LightX2V tools/extract/lora_extractor.py on (model, model + a random change): every
                        changed tensor; 2-D weights of at least `pair_min_params` values as an SVD rank-`rank`
                        pair `diffusion_model.<wan>.lora_up/lora_down.weight`, the rest as full differences
                        (`.diff` weight, `.diff_b` bias, `.diff_m` modulation: `blocks.<i>.diff_m`); bf16; no alpha.
    lightning           lightx2v/Wan2.2-Lightning: the blocks' attention and FFN linears, `diffusion_model.<wan>`
                        `.lora_down.weight` / `.lora_up.weight` / `.alpha`, bf16.
    musubi              kohya / musubi-tuner (networks.lora_wan): `lora_unet_<wan, dots as _>.lora_down.weight` /
                        `.lora_up.weight` / `.alpha`, bf16, kohya's `ss_*` header metadata.
    diffusers           diffusers' save_lora_weights: `transformer.<diffusers>.lora_A.weight` / `.lora_B.weight`,
                        float32, no alpha tensors: r and lora_alpha only in the header's `lora_adapter_metadata`.

    `image_keys` adds Wan2.1 I2V's image-conditioning entries (k_img, v_img, norm_k_img, img_emb) in the same
    form, as the Wan2.1 LoRAs people use on Wan2.2 carry them."""
    if form not in TOOL_LORA_FORMS:
        raise ValueError(f"unknown LoRA form {form!r}")
    sd = {k: v.float() for k, v in _state(transformer_dir).items()}
    wan = {wl.dit_key_to_wan(k): v for k, v in sd.items()}
    g = torch.Generator().manual_seed(seed)
    dim = _config(transformer_dir)["num_attention_heads"] * _config(transformer_dir)["attention_head_dim"]
    if image_keys:
        layers = _config(transformer_dir)["num_layers"]
        wan.update({k: v for k, v in _wan21_image_entries(dim, layers, g, 1.0).items() if k not in wan})
    out: dict[str, torch.Tensor] = {}
    metadata = None
    if form == "lightx2v-extractor":
        for key, w in sorted(wan.items()):
            diff = torch.randn(w.shape, generator=g) * scale
            if w.dim() == 2 and key.endswith(".weight") and w.numel() >= pair_min_params:
                u, sv, vh = torch.linalg.svd(diff, full_matrices=False)
                r = min(rank, *diff.shape)
                root = sv[:r].sqrt()
                base = "diffusion_model." + key.replace(".weight", "")
                out[base + ".lora_up.weight"] = (u[:, :r] * root.unsqueeze(0)).contiguous()
                out[base + ".lora_down.weight"] = (root.unsqueeze(1) * vh[:r]).contiguous()
            elif key.endswith(".weight"):
                out["diffusion_model." + key.replace(".weight", ".diff")] = diff
            elif key.endswith(".bias"):
                out["diffusion_model." + key.replace(".bias", ".diff_b")] = diff
            elif key.endswith(".modulation"):
                out["diffusion_model." + key.replace(".modulation", ".diff_m")] = diff
        out = {k: v.to(torch.bfloat16) for k, v in out.items()}
    else:
        to_diffusers = {v: k for k, v in ((k, wl.dit_key_to_wan(k)) for k in sd)}
        for key, w in sorted(wan.items()):
            image = any(n in key for n in ("k_img", "v_img"))
            if not ((_LINEAR.match(key) or (image and w.dim() == 2)) and key.endswith(".weight")):
                continue
            down = torch.randn(rank, w.shape[1], generator=g) * scale
            up = torch.randn(w.shape[0], rank, generator=g) * scale
            module = key[: -len(".weight")]
            if form == "lightning":
                base, dn, upn = f"diffusion_model.{module}", ".lora_down.weight", ".lora_up.weight"
            elif form == "musubi":
                base, dn, upn = "lora_unet_" + module.replace(".", "_"), ".lora_down.weight", ".lora_up.weight"
            else:
                dif = to_diffusers.get(key)
                if dif is None:  # an image key the model lacks: diffusers' names of Wan2.1 I2V's layers
                    dif = key.replace("cross_attn.k_img", "attn2.add_k_proj").replace("cross_attn.v_img",
                                                                                       "attn2.add_v_proj")
                base, dn, upn = "transformer." + dif[: -len(".weight")], ".lora_A.weight", ".lora_B.weight"
            out[base + dn], out[base + upn] = down, up
            if form in ("lightning", "musubi"):
                out[base + ".alpha"] = torch.tensor(float(alpha))
        if form in ("lightning", "musubi"):
            out = {k: v.to(torch.bfloat16) for k, v in out.items()}
        if form == "musubi":
            metadata = {"ss_network_module": "networks.lora_wan", "ss_network_dim": str(rank),
                        "ss_network_alpha": str(alpha), "ss_base_model_version": "wan2.1_t2v_14B"}
        elif form == "diffusers":
            targets = sorted({k.split(".")[-3] for k in out if k.endswith(".lora_A.weight")})
            cfg = {"r": rank, "lora_alpha": alpha, "target_modules": targets, "lora_dropout": 0.0, "bias": "none",
                   "use_dora": False, "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {},
                   "init_lora_weights": True, "peft_type": "LORA"}
            metadata = {"format": "pt", "lora_adapter_metadata": json.dumps(
                {f"transformer.{k}": v for k, v in cfg.items()}, indent=2, sort_keys=True)}
    _save_safetensors(out, path, metadata)


# ------------------------------------------------------------------------------------ T5 / VAE / CLIP
def write_t5(text_encoder_dir: Path, tokenizer_dir: Path, out: Path, dtype: torch.dtype | None = None) -> None:
    """models_t5_umt5-xxl-enc-bf16.pth (Wan's key names) + google/umt5-xxl/ tokenizer files, and the tiny
    architecture in `<file>.config.json` (the real file's is the published umt5-xxl)."""
    sd = _state(text_encoder_dir)
    wan = {}
    for k, v in sd.items():
        if k == "encoder.embed_tokens.weight":
            continue  # tied to shared.weight
        name = wl.T5_MAP.backward(k)
        if name is None:
            raise AssertionError(f"no Wan T5 name for {k}")
        wan[name] = v
    _save_pth(_cast(wan, dtype), out / wl.T5_FILE)
    cfg = wl.read_json(text_encoder_dir / "config.json")
    keep = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads", "relative_attention_num_buckets",
            "relative_attention_max_distance", "feed_forward_proj", "layer_norm_epsilon", "dropout_rate",
            "tie_word_embeddings", "pad_token_id", "eos_token_id", "decoder_start_token_id")
    _write_json(out / (wl.T5_FILE + ".config.json"), {k: cfg[k] for k in keep if k in cfg})
    tok = out / wl.T5_TOKENIZER
    tok.mkdir(parents=True, exist_ok=True)
    for f in tokenizer_dir.iterdir():
        shutil.copy2(f, tok / f.name)


def write_vae(vae_dir: Path, out: Path) -> None:
    sd = _state(vae_dir)
    cfg = _config(vae_dir)
    n = cfg.get("num_res_blocks", 2)
    _save_pth({wl.vae_key_to_wan(k, n): v for k, v in sd.items()}, out / wl.VAE_FILE)
    _write_json(out / (wl.VAE_FILE + ".config.json"), cfg)


def write_clip(image_encoder_dir: Path, out: Path) -> None:
    """Wan's open-clip .pth: the visual tower under Wan's names (q, k, v fused in to_qkv), plus a token of the
    text tower and log_scale, which the loader must skip."""
    sd = _state(image_encoder_dir)
    cfg = _config(image_encoder_dir)
    wan: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        m = re.match(r"^(?:vision_model\.)?encoder\.layers\.(\d+)\.self_attn\.(q|k|v)_proj\.(weight|bias)$", k)
        if m:
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = v
            continue
        name = wl.clip_key_to_wan(k)
        if name is None:
            continue  # post_layernorm, position_ids: not in Wan's file
        if name == "visual.cls_embedding":
            v = v.reshape(1, 1, -1)
        elif name == "visual.pos_embedding":
            v = v.reshape(1, *v.shape)
        wan[name] = v
    for (i, kind), parts in qkv.items():
        wan[f"visual.transformer.{i}.attn.to_qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    wan["textual.token_embedding.weight"] = torch.zeros(4, 8)
    wan["log_scale"] = torch.tensor(4.6)
    _save_pth(wan, out / wl.CLIP_FILE)
    keep = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
            "patch_size", "hidden_act", "layer_norm_eps", "projection_dim", "num_channels")
    _write_json(out / (wl.CLIP_FILE + ".config.json"), {k: cfg[k] for k in keep if k in cfg})


# ------------------------------------------------------------- T5 / CLIP through LightX2V's converter
# tools/convert/converter.py's model_type_keys_map: a 2-D tensor is quantized when key.split(".")[key_idx] is a
# target; keys holding an ignore_key are dropped. Written here from the converter, not taken from the loader.
CONVERTER_MODEL_TYPES = {"wan_t5": (2, ("attn", "ffn"), ()), "wan_clip": (3, ("attn", "mlp"), ("textual",))}


def qtorch_e4m3(x: torch.Tensor) -> torch.Tensor:
    """qtorch's float_quantize(x, exp=4, man=3, rounding="nearest") (qtorch 0.3, which the converter calls) on
    float32 values, bit for bit: the magnitude rounded half away from zero to 3 mantissa bits (half an ulp
    added to the bit pattern, then truncated); below 2^-6 the value is shifted by 2^-6 first, which puts
    subnormals on the 2^-9 grid; exponents above 8 saturate (unreachable after the converter's clip to 448)."""
    x = x.float().contiguous()
    bits = x.view(torch.int32)
    exponent = ((bits >> 23) & 0xFF) - 127
    mask, half = (1 << 20) - 1, 1 << 19

    def round_bits(b: torch.Tensor) -> torch.Tensor:
        return (b + half) & ~mask

    normal = round_bits(bits)
    too_big = ((normal >> 23) & 0xFF) > 127 + 8
    normal = torch.where(too_big, torch.copysign(torch.tensor(480.0), x), normal.view(torch.float32))
    shift = torch.where(bits < 0, -(2.0 ** -6), 2.0 ** -6).float()
    shifted = round_bits((x + shift).view(torch.int32)).view(torch.float32) - shift
    return torch.where(exponent < -6, shifted, normal)


def converter_quantize(state: dict[str, torch.Tensor], model_type: str, linear_type: str,
                       non_linear_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """converter.py --quantized --linear_type fp8|int8 --model_type wan_t5|wan_clip (quantize_model and
    tools/convert/quant/quant.py), computed as it computes: the scale is the row's absmax clamped at 1e-5
    divided by 127 / 448, in the source tensor's dtype (Wan's bf16 T5 gives bf16 scales), saved as
    `<key>_scale` [out, 1]; int8: round(w / scale) clamped to [-128, 127]; fp8: w / scale clipped to +-448 in
    the source dtype, then qtorch's rounding, then float8_e4m3fn. Other tensors are cast to non_linear_dtype."""
    key_idx, targets, ignore = CONVERTER_MODEL_TYPES[model_type]
    out: dict[str, torch.Tensor] = {}
    for key, w in state.items():
        if any(ig in key for ig in ignore):
            continue
        parts = key.split(".")
        if w.dim() != 2 or len(parts) < key_idx + 1 or parts[key_idx] not in targets:
            out[key] = w.to(non_linear_dtype)
            continue
        max_val = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-5)
        if linear_type == "int8":
            scales = max_val / 127
            q = torch.clamp(torch.round(w / scales), -128, 127).to(torch.int8)
        else:
            finfo = torch.finfo(FP8)
            scales = max_val / finfo.max
            scaled = torch.clip(w / scales, finfo.min, finfo.max)
            q = qtorch_e4m3(scaled.float()).to(FP8)
        out[key] = q
        out[key + "_scale"] = scales.view(w.shape[0], -1)
    return out


def write_quantized_encoder(source: Path, out: Path, linear_type: str) -> Path:
    """LightX2V's quantized T5 or CLIP file (`-o_e .pth`, as tools/convert/readme.md converts them) from Wan's
    .pth: non-linear tensors bf16 for T5, fp16 for CLIP, as the readme's commands set --non_linear_dtype."""
    clip = source.name == wl.CLIP_FILE
    state = load_pth(source)
    q = converter_quantize(state, "wan_clip" if clip else "wan_t5", linear_type,
                           torch.float16 if clip else torch.bfloat16)
    if out.suffix == ".safetensors":  # the converter's default output (--single_file)
        _save_safetensors(q, out)
    else:
        _save_pth(q, out)
    return out


# ------------------------------------------------------------------------------------------- layouts
def write_wan_layout(src: Path, out: Path, dtype: torch.dtype | None = None) -> Path:
    """Wan's original layout of a diffusers-layout model (Wan2.2 A14B pair or Wan2.1 single DiT)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    idx = wl.read_json(src / "model_index.json")
    task = "i2v" if "ImageToVideo" in idx["_class_name"] else "t2v"
    write_t5(src / "text_encoder", src / "tokenizer", out, dtype)
    write_vae(src / "vae", out)
    two = idx.get("transformer_2") and idx["transformer_2"][0] is not None
    if two:
        for sub, expert in (("transformer", "high"), ("transformer_2", "low")):
            write_dit_shards(wan_dit_state(src / sub, dtype), out / wl.EXPERT_DIRS[expert],
                             wan_dit_config(src / sub, task))
        _write_json(out / "configuration.json", {"framework": "Pytorch", "task": f"{task}-A14B"})
    else:
        write_dit_shards(wan_dit_state(src / "transformer", dtype), out, wan_dit_config(src / "transformer", task))
    if idx.get("image_encoder") and idx["image_encoder"][0] is not None:
        write_clip(src / "image_encoder", out)
    return out


def build_tiny_wan21_i2v(out: Path) -> Path:
    """A tiny Wan2.1-I2V-14B in the diffusers layout: the tiny model's T5, tokenizer, VAE and scheduler, one
    36-channel DiT with a CLIP image embedder, and a tiny CLIP ViT (17 tokens instead of 257)."""
    from diffusers import UniPCMultistepScheduler, WanImageToVideoPipeline, WanTransformer3DModel
    from transformers import (AutoTokenizer, CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel,
                              UMT5EncoderModel)
    from diffusers import AutoencoderKLWan

    from ..tiny import DIT_CONFIG, ensure_tiny_models

    base = ensure_tiny_models() / "i2v"
    torch.manual_seed(31)
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                            num_attention_heads=4, image_size=56, patch_size=14,
                                            hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=16)).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    torch.manual_seed(32)
    dim = DIT_CONFIG["num_attention_heads"] * DIT_CONFIG["attention_head_dim"]
    dit = WanTransformer3DModel(**{**DIT_CONFIG, "in_channels": 36, "image_dim": 32,
                                   "added_kv_proj_dim": dim}).eval()
    pipe = WanImageToVideoPipeline(
        tokenizer=AutoTokenizer.from_pretrained(base / "tokenizer"),
        text_encoder=UMT5EncoderModel.from_pretrained(base / "text_encoder"),
        vae=AutoencoderKLWan.from_pretrained(base / "vae"),
        scheduler=UniPCMultistepScheduler.from_pretrained(base / "scheduler"),
        image_processor=processor, image_encoder=clip, transformer=dit, transformer_2=None, boundary_ratio=None)
    pipe.save_pretrained(out, safe_serialization=True)
    return Path(out)


def build_tiny_wan21_t2v(out: Path) -> Path:
    """A tiny Wan2.1-T2V (1.3B or 14B: the same layout, one DiT) in the diffusers layout: the tiny T2V model's
    T5, tokenizer, VAE, scheduler and its high-noise DiT as the one transformer (no transformer_2, no boundary)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5EncoderModel

    from ..tiny import ensure_tiny_models

    base = ensure_tiny_models() / "t2v"
    pipe = WanPipeline(tokenizer=AutoTokenizer.from_pretrained(base / "tokenizer"),
                       text_encoder=UMT5EncoderModel.from_pretrained(base / "text_encoder"),
                       vae=AutoencoderKLWan.from_pretrained(base / "vae"),
                       scheduler=UniPCMultistepScheduler.from_pretrained(base / "scheduler"),
                       transformer=WanTransformer3DModel.from_pretrained(base / "transformer"),
                       transformer_2=None, boundary_ratio=None)
    pipe.save_pretrained(out, safe_serialization=True)
    return Path(out)


# ------------------------------------------------------------------------------- the whole model tree
def write_standin_tree(root: Path) -> Path:
    """Tiny stand-ins under the names the configs in configs/ use (`<root>/Wan-AI/...`, `<root>/lightx2v/...`,
    `<root>/QuantStack/...`), so `wan-batch check-config` and runs can be tried without the real weights."""
    from ..tiny import ensure_tiny_models

    root = Path(root)
    tiny = ensure_tiny_models()
    wan21 = root / "Wan-AI" / "Wan2.1-I2V-14B-480P-Diffusers"
    if not (wan21 / "model_index.json").is_file():
        build_tiny_wan21_i2v(wan21)
    t2v21 = root / "Wan-AI" / "Wan2.1-T2V-1.3B-Diffusers"
    if not (t2v21 / "model_index.json").is_file():
        build_tiny_wan21_t2v(t2v21)
    for size in ("1.3B", "14B"):
        if size != "1.3B":
            shutil.copytree(t2v21, root / "Wan-AI" / f"Wan2.1-T2V-{size}-Diffusers", dirs_exist_ok=True)
        write_wan_layout(t2v21, root / "Wan-AI" / f"Wan2.1-T2V-{size}")
    for task, name in (("t2v", "Wan2.2-T2V-A14B"), ("i2v", "Wan2.2-I2V-A14B")):
        write_wan_layout(tiny / task, root / "Wan-AI" / name)
        shutil.copytree(tiny / task, root / "Wan-AI" / f"{name}-Diffusers", dirs_exist_ok=True)
    for res in ("480P", "720P"):
        write_wan_layout(wan21, root / "Wan-AI" / f"Wan2.1-I2V-14B-{res}")
    distill = root / "lightx2v" / "Wan2.2-Distill-Models"
    loras = root / "lightx2v" / "Wan2.2-Distill-Loras"
    for task in ("t2v", "i2v"):
        for sub, noise in (("transformer", "high_noise"), ("transformer_2", "low_noise")):
            src = tiny / task / sub
            stem = f"wan2.2_{task}_A14b_{noise}"
            write_single_file(src, distill / f"{stem}_lightx2v_4step.safetensors")
            write_single_file(src, distill / f"{stem}_scaled_fp8_e4m3_lightx2v_4step.safetensors", "fp8")
            write_single_file(src, distill / f"{stem}_int8_lightx2v_4step.safetensors", "int8")
            date = "_1217" if task == "t2v" else ""  # as named in the configs (seed 000's t2v LoRAs)
            write_lora(src, loras / f"{stem}_lora_rank64_lightx2v_4step{date}.safetensors",
                       seed=1 if noise == "high_noise" else 2)
    for task, repo in (("i2v", "Wan2.2-I2V-A14B-GGUF"),):
        for sub, noise in (("transformer", "HighNoise"), ("transformer_2", "LowNoise")):
            for quant in ("Q4_K_M", "Q8_0"):
                name = f"{repo.replace('-GGUF', '')}-{noise}-{quant}.gguf"
                write_gguf_expert(tiny / task / sub, root / "QuantStack" / repo / noise / name, quant)
    d21 = root / "lightx2v" / "Wan2.1-Distill-Models"
    write_single_file(t2v21 / "transformer", d21 / "wan2.1_t2v_14b_lightx2v_4step.safetensors")
    for res in ("480p", "720p"):
        write_single_file(wan21 / "transformer", d21 / f"wan2.1_i2v_{res}_lightx2v_4step.safetensors")
        write_single_file(wan21 / "transformer", d21 / f"wan2.1_i2v_{res}_scaled_fp8_e4m3_lightx2v_4step.safetensors",
                          "fp8")
        write_single_file(wan21 / "transformer", d21 / f"wan2.1_i2v_{res}_int8_lightx2v_4step.safetensors", "int8")
    return root
