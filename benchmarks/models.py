"""Random-weight Wan2.2 A14B models built directly on the GPU (no downloads), and a weightless model folder in
the diffusers layout so the staged Luigi pipeline can run on them.

Sizes: `full` is the real architecture (DiT: 40 layers, dim 5120, FFN 13824, 40 heads of 128; UMT5-XXL
encoder; Wan2.1 VAE, which Wan2.2 A14B uses); `smoke` is the embedded tiny model's architecture, for checking
the benchmark itself on a CPU. Weights are seeded, so both pipelines in a run see the same numbers.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

FULL_DIT = dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16,
                out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
FULL_T5 = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
               relative_attention_num_buckets=32, relative_attention_max_distance=128,
               feed_forward_proj="gated-gelu", dropout_rate=0.0, layer_norm_epsilon=1e-6, pad_token_id=0,
               eos_token_id=1, decoder_start_token_id=0, tie_word_embeddings=False)
FULL_VAE: dict[str, Any] = {}  # AutoencoderKLWan's defaults are the Wan2.1 VAE


def dit_config(size: str, task: str = "t2v", layers: int | None = None) -> dict[str, Any]:
    from pipeline.tiny import DIT_CONFIG

    cfg = dict(FULL_DIT if size == "full" else DIT_CONFIG)
    cfg["in_channels"] = 36 if task == "i2v" else 16
    if layers:
        cfg["num_layers"] = layers
    return cfg


@contextlib.contextmanager
def _building(device: torch.device, dtype: torch.dtype, seed: int):
    """Construct modules straight on `device` in `dtype` (no fp32 CPU copy of 14B parameters)."""
    old = torch.get_default_dtype()
    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(old)


def _keep_fp32(model: torch.nn.Module) -> None:
    """What from_pretrained does for `_keep_in_fp32_modules` (norms, time embedder, modulation tables)."""
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    for name, p in model.named_parameters():
        if any(k in name.split(".") for k in keep):
            p.data = p.data.float()


def build_dit(cfg: dict[str, Any], device: torch.device, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    from diffusers import WanTransformer3DModel

    with _building(device, dtype, seed):
        model = WanTransformer3DModel(**cfg)
    _keep_fp32(model)
    return model.eval().requires_grad_(False)


def build_vae(size: str, device: torch.device, seed: int = 1) -> torch.nn.Module:
    from diffusers import AutoencoderKLWan

    from pipeline.tiny import VAE_CONFIG

    with _building(device, torch.float32, seed):
        vae = AutoencoderKLWan(**(FULL_VAE if size == "full" else VAE_CONFIG))
    return vae.eval().requires_grad_(False)


def build_t5(size: str, device: torch.device, dtype: torch.dtype, vocab: int, seed: int = 2) -> torch.nn.Module:
    from transformers import UMT5Config, UMT5EncoderModel

    from pipeline.tiny import T5_CONFIG

    cfg = dict(FULL_T5) if size == "full" else dict(T5_CONFIG, vocab_size=vocab)
    with _building(device, dtype, seed):
        enc = UMT5EncoderModel(UMT5Config(**cfg))
    return enc.eval().requires_grad_(False)


_ST_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64"}


def write_sparse_safetensors(path: Path, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
    """A safetensors file whose header lists the real keys, shapes and dtypes and whose data is a hole (a sparse
    file: it takes no disk space). The loaders' header checks see a full-size checkpoint; the weights
    themselves come from `install_random_loader`."""
    header, offset = {}, 0
    for key, (shape, dtype) in sorted(shapes.items()):
        n = int(torch.tensor(shape).prod().item() if shape else 1) * torch.empty((), dtype=dtype).element_size()
        header[key] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        f.truncate(8 + len(raw) + offset)


def _meta_shapes(module: torch.nn.Module, dtype: torch.dtype | None) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {k: (tuple(v.shape), dtype or v.dtype) for k, v in module.state_dict().items()}


def skeleton_models(root: Path, size: str, layers: int | None = None) -> dict[str, Path]:
    """t2v and i2v model folders in the diffusers layout with the configs of `size` and sparse weight files
    (right keys and shapes, no data): the loader that `install_random_loader` puts in place builds random
    weights from these configs."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from pipeline.tiny import BOUNDARY, SCHEDULER_CONFIG, T5_CONFIG, VAE_CONFIG, build_tokenizer

    out = {}
    for task in ("t2v", "i2v"):
        dest = root / f"{size}-{layers or 'all'}" / task
        if not (dest / "model_index.json").is_file():
            if dest.exists():
                shutil.rmtree(dest)
            tmp = dest.with_name(dest.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            tok = build_tokenizer(tmp / "tokenizer")  # the demo vocabulary: any ASCII prompt tokenizes
            UniPCMultistepScheduler(**SCHEDULER_CONFIG).save_config(tmp / "scheduler")
            index = {"_class_name": "WanImageToVideoPipeline" if task == "i2v" else "WanPipeline",
                     "_diffusers_version": "0.42.1", "boundary_ratio": BOUNDARY[task],
                     "scheduler": ["diffusers", "UniPCMultistepScheduler"],
                     "text_encoder": ["transformers", "UMT5EncoderModel"], "tokenizer": ["transformers", "T5Tokenizer"],
                     "transformer": ["diffusers", "WanTransformer3DModel"],
                     "transformer_2": ["diffusers", "WanTransformer3DModel"], "vae": ["diffusers", "AutoencoderKLWan"]}
            if task == "i2v":
                index.update(expand_timesteps=False, image_encoder=[None, None], image_processor=[None, None])
            (tmp / "model_index.json").write_text(json.dumps(index, indent=1))
            t5_cfg = dict(FULL_T5) if size == "full" else dict(T5_CONFIG, vocab_size=len(tok))
            with torch.device("meta"):
                dit = WanTransformer3DModel(**dit_config(size, task, layers))
                vae = AutoencoderKLWan(**(FULL_VAE if size == "full" else VAE_CONFIG))
                t5 = UMT5EncoderModel(UMT5Config(**t5_cfg))
            for sub in ("transformer", "transformer_2"):
                dit.save_config(tmp / sub)
                write_sparse_safetensors(tmp / sub / "diffusion_pytorch_model.safetensors",
                                         _meta_shapes(dit, torch.bfloat16))
            vae.save_config(tmp / "vae")
            write_sparse_safetensors(tmp / "vae" / "diffusion_pytorch_model.safetensors", _meta_shapes(vae, None))
            t5.config.save_pretrained(tmp / "text_encoder")
            write_sparse_safetensors(tmp / "text_encoder" / "model.safetensors", _meta_shapes(t5, torch.bfloat16))
            os.replace(tmp, dest)
        out[task] = dest
    return out


def install_random_loader(size: str, quantize: str | None, seed: int = 0):
    """Make the staged pipeline build each component with random weights on its device (from the folder's
    config) instead of reading weight files; `quantize='fp8'` turns the DiT's block linears into LightX2V's
    scaled-fp8 layout, standing in for a `dit_quant_scheme: fp8-sgl` checkpoint. Returns a function that
    undoes the patch."""
    import pipeline.models.loader as loader  # runtime.get_model reads loader.load_component at each load

    original = loader.load_component

    def load(ref, component, device, dtype):
        folder = Path(ref.path)
        if component == "text":
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(folder / "tokenizer")
            return tok, build_t5(size, device, dtype, len(tok), seed + 2)
        if component == "vae":
            return build_vae(size, device, seed + 1)
        sub = {"high": "transformer", "low": "transformer_2", "single": "transformer"}[component]
        cfg = json.loads((folder / sub / "config.json").read_text())
        cfg = {k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg.items() if not k.startswith("_")}
        model = build_dit(cfg, device, dtype, seed + (10 if component == "low" else 0))
        if quantize and device.type == "cuda":
            from pipeline.fast.fp8_matmul import FP8, quantize_blocks

            quantize_blocks(model, FP8 if quantize == "fp8" else torch.int8)
        return model

    loader.load_component = load

    def undo():
        loader.load_component = original

    return undo
