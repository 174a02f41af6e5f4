"""lazy_load: a DiT expert whose streamed blocks are never all in RAM, read from the expert's own checkpoint.

The source is whatever the loader resolved for the expert (`ModelRef.dits[expert]["weights"]`): a diffusers
transformer folder, Wan's layout, a LightX2V block-split folder, a `*_original_ckpt` file, scaled fp8/int8
single files or a GGUF file (models.dit.DitWeights reads them all, with every key naming). Each tensor is
produced exactly as models.dit.build_dit produces it for the resident model (same dtype casts, fp32 modules
kept fp32, quantized linears kept quantized), so a streamed forward equals the resident one.

`skeleton()` builds the model with every block tensor on the meta device (no memory) and the rest (patch and
text embeddings, time embedding, head) read for real; the BlockStreamer then reads each unit's tensors on
use. RAM holds the non-block weights, two staging buffers of one unit, and the unit being read.

A LoRA (models.lora) is applied to each tensor as it is read, exactly as the resident loader applies it at
load: merged in float32 into a plain weight, or kept as a float32 side branch of a quantized linear (its
`lora_down_n` / `lora_up_n` / `dense_delta_n` buffers are streamed with the unit). The LoRA files stay open
(memory-mapped) beside the checkpoint; nothing of them is held in RAM between reads.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError


class ExpertSource:
    """The tensors of one DiT expert by model state-dict name, read from its resolved checkpoint on demand.
    Callable as a BlockStreamer `lazy_source`."""

    def __init__(self, ref: Any, expert: str, dtype: torch.dtype):
        from .dit import DitWeights, empty_model, expected_shapes
        from .loader import dit_config

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
        self._plan_loras(ref, expert, expected_shapes(model))

    def _plan_loras(self, ref: Any, expert: str, expected: dict[str, tuple[int, ...]]) -> None:
        """Which LoRA entries apply to which tensor, in the order load_dit's apply_loras applies them: merged
        into a plain tensor, or side branches of a quantized linear, laid out as QuantizedLinear.add_lora /
        add_dense_delta name their buffers (read from the LoRA file only when streamed)."""
        from .lora import LoraSpec, diff_scale, pair_scale, resolve

        self._merges: dict[str, list[tuple[Any, Any, LoraSpec]]] = {}  # plain tensor -> entries to merge
        # quantized linear -> ({buffer: (files, file key, shape)}, LoRA scales, dense scales)
        self._sides: dict[str, tuple[dict[str, tuple[Any, str, tuple[int, ...]]], list[float], list[float]]] = {}
        self._lora_files = []
        for spec in [LoraSpec(**s) for s in (ref.loras or {}).get(expert, []) if s.get("strength", 1.0) != 0]:
            resolved, files = resolve(Path(spec.path), expected, expert)
            self._lora_files.append(files)
            for r in resolved:
                mod_name, _, pname = r.target.rpartition(".")
                if not (mod_name in self.quantized and pname == "weight"):
                    self._merges.setdefault(r.target, []).append((r, files, spec))
                    continue
                buffers, lora_scales, dense_scales = self._sides.setdefault(mod_name, ({}, [], []))
                e = r.entry
                if e.kind == "pair":
                    n, down = len(lora_scales), tuple(files.shape(e.down))
                    buffers[f"lora_down_{n}"] = (files, e.down, down)
                    buffers[f"lora_up_{n}"] = (files, e.up, tuple(files.shape(e.up)))
                    lora_scales.append(float(pair_scale(e, down[0], spec)))
                else:
                    out_in = tuple(self.quantized[mod_name].shape[:2])
                    buffers[f"dense_delta_{len(dense_scales)}"] = (files, e.diff, out_in)
                    dense_scales.append(float(diff_scale(spec)))

    def target_dtype(self, name: str) -> torch.dtype:
        return torch.float32 if any(m in name.split(".") for m in self.keep_fp32) else self.dtype

    def tensor(self, key: str) -> torch.Tensor:
        """The tensor `key` of the loaded model (build_dit's value for it)."""
        mod_name, _, pname = key.rpartition(".")
        w = self.weights
        with self._lock:
            e = self.quantized.get(mod_name)
            branch = self._sides.get(mod_name, ({},))[0].get(pname)
            if branch is not None:  # a LoRA side branch, float32 as models.lora.side_branch makes it
                files, file_key, shape = branch
                return files.get(file_key).float().reshape(shape).contiguous()
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
            from .lora import merged

            value = w.plain(key).to(self.target_dtype(key))
            for r, files, spec in self._merges.get(key, ()):
                value = merged(value, r, files, spec)
            return value

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
            buffers, lora_scales, dense_scales = self._sides.get(mod_name, ({}, [], []))  # meta, like the rest
            for name, (_, _, shape) in buffers.items():
                layer.register_buffer(name, torch.empty(shape, dtype=torch.float32, device=meta))
            layer.lora_scales, layer.dense_scales = list(lora_scales), list(dense_scales)
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
        for files in self._lora_files:
            files.close()
