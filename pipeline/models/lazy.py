"""lazy_load: a DiT expert whose streamed blocks are never all in RAM, read from the expert's own checkpoint.

The source is whatever the loader resolved for the expert (`ModelRef.dits[expert]["weights"]`): a diffusers
transformer folder, Wan's layout, a LightX2V block-split folder, a `*_original_ckpt` file, scaled fp8/int8
single files or a GGUF file (models.dit.DitWeights reads them all, with every key naming). Each tensor is
produced exactly as models.dit.build_dit produces it for the resident model (same dtype casts, fp32 modules
kept fp32, quantized linears kept quantized), so a streamed forward equals the resident one.

`skeleton()` builds the model with every block tensor on the meta device (no memory) and the rest (patch and
text embeddings, time embedding, head) read for real; the BlockStreamer then reads each unit's tensors on
use. RAM holds the non-block weights, two staging buffers of one unit, and the unit being read.

A LoRA is merged into the weights at load (models.lora); a unit read from the checkpoint would not have it,
so lazy_load with a LoRA is refused rather than run without it (cpu_offload alone streams the merged weights
from pinned RAM).
"""
from __future__ import annotations

import threading
from typing import Any

import torch

from ..errors import CheckpointError


def lora_refusal(ref: Any, expert: str) -> str | None:
    """Why lazy_load cannot run this expert (a LoRA is set for it), or None."""
    loras = [s for s in (getattr(ref, "loras", None) or {}).get(expert, []) if s.get("strength", 1.0) != 0]
    if not loras:
        return None
    return (f"lazy_load reads each block of the {expert} expert from its checkpoint file when it runs, and a LoRA "
            f"({loras[0]['path']}) is merged into the weights at load: the streamed blocks would run without it. "
            f"Set lazy_load false (cpu_offload alone streams the merged weights from pinned RAM) or drop the LoRA")


class ExpertSource:
    """The tensors of one DiT expert by model state-dict name, read from its resolved checkpoint on demand.
    Callable as a BlockStreamer `lazy_source`."""

    def __init__(self, ref: Any, expert: str, dtype: torch.dtype):
        from .dit import DitWeights, empty_model, expected_shapes
        from .loader import dit_config

        why = lora_refusal(ref, expert)
        if why:
            raise CheckpointError(why)
        self.config = dit_config(ref, expert)
        self.weights = DitWeights(ref.dits[expert]["weights"])
        found = self.weights.quant_scheme()
        if ref.quant_scheme and found and not ref.quant_scheme.startswith(found):
            raise CheckpointError(f"dit_quant_scheme is {ref.quant_scheme} but {self.weights.path} holds {found} "
                                  f"weights")
        model = empty_model(self.config)
        problems = self.weights.check(expected_shapes(model))
        if problems:
            raise CheckpointError(f"{self.weights.path} does not fit its architecture config: " + " | ".join(problems))
        self.dtype = dtype
        self.keep_fp32 = set(model._keep_in_fp32_modules or [])
        modules = dict(model.named_modules())
        # the linear layers build_dit keeps quantized: module name -> checkpoint entry of its weight
        self.quantized = {}
        for target, e in self.weights.entries.items():
            mod_name, _, pname = target.rpartition(".")
            if e.encoding != "plain" and pname == "weight" and type(modules[mod_name]) is torch.nn.Linear:
                self.quantized[mod_name] = e
        self._lock = threading.Lock()  # the staging thread and the caller share the open files

    def target_dtype(self, name: str) -> torch.dtype:
        return torch.float32 if any(m in name.split(".") for m in self.keep_fp32) else self.dtype

    def tensor(self, key: str) -> torch.Tensor:
        """The tensor `key` of the loaded model (build_dit's value for it)."""
        mod_name, _, pname = key.rpartition(".")
        w = self.weights
        with self._lock:
            e = self.quantized.get(mod_name)
            if e is not None and pname != "bias":
                if w.is_gguf and pname == "qweight":
                    return w.files.raw(e.key)
                if not w.is_gguf and pname == "weight":
                    return w.files.get(e.key)
                if not w.is_gguf and pname == "weight_scale":
                    scale = w.files.get(e.scale_key).float().reshape(-1)
                    return scale.expand(e.shape[0]).reshape(-1, 1) if scale.numel() == 1 else scale.reshape(-1, 1)
                raise KeyError(f"{key} is not a tensor of the quantized layer {mod_name}")
            if key not in w.entries:
                raise KeyError(f"tensor {key!r} is not in {w.path}")
            return w.plain(key).to(self.target_dtype(key))

    def __call__(self, keys: list[str]) -> dict[str, torch.Tensor]:
        return {k: self.tensor(k) for k in keys}

    def skeleton(self, granularity: str = "block") -> torch.nn.Module:
        """The expert with its streamed units' tensors on the meta device (right dtypes and shapes) and the rest
        loaded, ready for a BlockStreamer with this source."""
        from .dit import set_module, empty_model
        from .gguf_loader import GGUFLinear
        from .loader import own_aligned_memory
        from .quant import ScaledLinear
        from ..fast.offload import stream_units

        model = empty_model(self.config)
        meta = torch.device("meta")
        for mod_name, e in self.quantized.items():
            bias_key = f"{mod_name}.bias"
            bias = (torch.empty(e.shape[0], dtype=self.target_dtype(bias_key), device=meta)
                    if bias_key in self.weights.entries else None)
            if self.weights.is_gguf:
                raw = self.weights.files.raw(e.key)
                layer = GGUFLinear(torch.empty(raw.shape, dtype=raw.dtype, device=meta),
                                   self.weights.files.qtype(e.key), e.shape, bias)
            else:
                layer = ScaledLinear(torch.empty(e.shape, dtype=self.weights.files.dtype(e.key), device=meta),
                                     torch.empty(e.shape[0], 1, device=meta), bias)
            set_module(model, mod_name, layer)
        streamed = tuple(name + "." for name, _ in stream_units(model, granularity))
        for mod_name, mod in model.named_modules():
            for table, is_param in ((mod._parameters, True), (mod._buffers, False)):
                for name, t in list(table.items()):
                    if t is None or not t.is_meta:
                        continue  # the RoPE tables are computed, not loaded
                    key = f"{mod_name}.{name}" if mod_name else name
                    if key.startswith(streamed):
                        dtype = t.dtype if mod_name in self.quantized else self.target_dtype(key)
                        value = torch.empty(t.shape, dtype=dtype, device=meta)
                    else:
                        value = self.tensor(key)
                    table[name] = torch.nn.Parameter(value, requires_grad=False) if is_param else value
        model.requires_grad_(False)
        return own_aligned_memory(model.eval())

    def close(self) -> None:
        self.weights.close()
