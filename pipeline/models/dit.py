"""Build a diffusers WanTransformer3DModel from any DiT checkpoint encoding: plain (bf16/fp32, Wan's or diffusers'
key names, one file or shards), scaled fp8/int8 (LightX2V, ComfyUI), or GGUF.

The architecture always comes from a config (the model folder's), never from the keys. The model is created
on the meta device and filled one tensor at a time, so RAM holds the model plus one tensor, not two copies.
Quantized linear weights stay quantized (ScaledLinear / GGUFLinear); quantized tensors of other layers are
dequantized once at load. Parameters diffusers keeps in float32 (`_keep_in_fp32_modules`) are kept in float32
exactly as from_pretrained does, so every format loads to the same module as the diffusers layout.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from .checkpoint import TensorFiles
from .quant import ScaledLinear, dequantize_scaled, is_ignored_key, scheme_of, weight_key_of_scale
from .wan_layout import dit_key_map


@dataclass
class Entry:
    key: str  # key in the checkpoint
    shape: tuple[int, ...]  # logical shape
    encoding: str  # plain | fp8 | int8 | gguf:<TYPE>
    scale_key: str | None = None


class DitWeights:
    """The tensors of one DiT checkpoint, keyed by diffusers parameter name."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.is_gguf = self.path.suffix == ".gguf"
        if self.is_gguf:
            from .gguf_loader import GGUFTensors

            self.files = GGUFTensors(self.path)
        else:
            self.files = TensorFiles.open(self.path)
        self.entries: dict[str, Entry] = self._index()

    @property
    def file_paths(self) -> list[Path]:
        return [self.path] if self.is_gguf else list(self.files.files)

    def _index(self) -> dict[str, Entry]:
        keys = [k for k in self.files.keys() if not is_ignored_key(k)]
        scales = {}
        for k in keys:
            w = weight_key_of_scale(k)
            if w is not None:
                if w not in self.files:
                    raise CheckpointError(f"{self.path}: scale '{k}' has no weight '{w}' next to it")
                scales[w] = k
        names = [k for k in keys if weight_key_of_scale(k) is None]
        mapping = dit_key_map(names)
        entries: dict[str, Entry] = {}
        for k in names:
            target = mapping[k]
            if target in entries:
                raise CheckpointError(f"{self.path}: '{k}' and '{entries[target].key}' are the same weight")
            if self.is_gguf:
                enc = f"gguf:{self.files.type_name(k)}" if self.files.is_quantized(k) else "plain"
            elif k in scales:
                try:
                    enc = scheme_of(self.files.dtype(k))
                except ValueError:
                    raise CheckpointError(f"{self.path}: '{k}' has a scale but dtype {self.files.dtype(k)} "
                                          f"(expected float8_e4m3fn or int8)") from None
            elif self.files.dtype(k) in (torch.float8_e4m3fn, torch.int8):
                raise CheckpointError(f"{self.path}: '{k}' is {self.files.dtype(k)} without a weight_scale / "
                                      f"scale_weight next to it")
            elif not self.files.dtype(k).is_floating_point:
                raise CheckpointError(f"{self.path}: '{k}' is {self.files.dtype(k)}; DiT weights are floating point")
            else:
                enc = "plain"
            entries[target] = Entry(k, tuple(self.files.shape(k)), enc, scales.get(k))
        return entries

    def encodings(self) -> dict[str, int]:
        """How many tensors of each encoding ('plain', 'fp8', 'gguf:Q4_K', ...)."""
        return dict(Counter(e.encoding for e in self.entries.values()))

    def quant_scheme(self) -> str | None:
        q = {e.encoding.split(":")[0] for e in self.entries.values() if e.encoding != "plain"}
        if not q:
            return None
        if len(q) > 1:
            raise CheckpointError(f"{self.path} mixes quantization schemes {sorted(q)}")
        return q.pop()

    def check(self, expected: dict[str, tuple[int, ...]]) -> list[str]:
        """Problems (missing, unexpected, wrongly shaped keys) of this checkpoint against an architecture."""
        problems = []
        missing = [k for k in expected if k not in self.entries]
        extra = [self.entries[k].key for k in self.entries if k not in expected]
        bad = [f"{self.entries[k].key} {self.entries[k].shape} (expected {expected[k]})"
               for k in expected if k in self.entries and self.entries[k].shape != expected[k]]
        for k, e in self.entries.items():
            if e.scale_key is not None and k in expected:
                n = 1
                for d in self.files.shape(e.scale_key):
                    n *= d
                if n not in (1, e.shape[0]):
                    bad.append(f"{e.scale_key} has {n} scales for {e.shape[0]} output channels")
        if missing:
            hint = ""
            if any(k.startswith("condition_embedder.image_embedder") for k in missing):
                hint = " (the config wants a CLIP image embedder: is this a Wan2.2 checkpoint used as Wan2.1?)"
            problems.append(f"{len(missing)} missing weight(s){hint}: {', '.join(missing[:6])}")
        if extra:
            hint = ""
            if any(k.startswith("img_emb") for k in extra):
                hint = " (img_emb.* is Wan2.1's CLIP image embedder: a Wan2.1 checkpoint for a Wan2.2 model?)"
            problems.append(f"{len(extra)} unexpected weight(s){hint}: {', '.join(extra[:6])}")
        if bad:
            problems.append(f"{len(bad)} shape mismatch(es): {'; '.join(bad[:6])}")
        return problems

    # -- reading
    def plain(self, target: str) -> torch.Tensor:
        """The float tensor of a parameter, dequantized if it is stored quantized."""
        e = self.entries[target]
        if self.is_gguf:
            return self.files.dequantize(e.key)
        t = self.files.get(e.key)
        if e.scale_key is not None:
            return dequantize_scaled(t, self.files.get(e.scale_key)).reshape(e.shape)
        return t

    def close(self) -> None:
        if not self.is_gguf:
            self.files.close()


def empty_model(config: dict[str, Any]):
    from accelerate import init_empty_weights
    from diffusers import WanTransformer3DModel

    with init_empty_weights():  # parameters on the meta device; the RoPE buffers are computed for real
        return WanTransformer3DModel.from_config(config)


def expected_shapes(model) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def set_module(root: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def build_dit(config: dict[str, Any], weights: DitWeights, dtype: torch.dtype):
    """A WanTransformer3DModel of `config` filled from `weights` (CPU, eval mode)."""
    model = empty_model(config)
    problems = weights.check(expected_shapes(model))
    if problems:
        raise CheckpointError(f"{weights.path} does not fit its architecture config: " + " | ".join(problems))
    keep_fp32 = set(model._keep_in_fp32_modules or [])

    def target_dtype(name: str) -> torch.dtype:
        return torch.float32 if any(m in name.split(".") for m in keep_fp32) else dtype

    modules = dict(model.named_modules())
    state: dict[str, torch.Tensor] = {}
    replaced: set[str] = set()
    for target, e in weights.entries.items():
        mod_name, _, pname = target.rpartition(".")
        if e.encoding != "plain" and pname == "weight" and type(modules[mod_name]) is torch.nn.Linear:
            bias_key = f"{mod_name}.bias"
            bias = weights.plain(bias_key).to(target_dtype(bias_key)) if bias_key in weights.entries else None
            if weights.is_gguf:
                from .gguf_loader import GGUFLinear

                layer = GGUFLinear(weights.files.raw(e.key), weights.files.qtype(e.key), e.shape, bias)
            else:
                layer = ScaledLinear(weights.files.get(e.key), weights.files.get(e.scale_key), bias)
            set_module(model, mod_name, layer)
            replaced.add(mod_name)
    for target in weights.entries:
        mod_name, _, _ = target.rpartition(".")
        if mod_name in replaced:
            continue
        state[target] = weights.plain(target).to(target_dtype(target))
    weights.close()
    model.load_state_dict(state, strict=False, assign=True)
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise CheckpointError(f"{weights.path}: weights never loaded: {', '.join(left[:6])}")
    model.requires_grad_(False)
    return model.eval()
