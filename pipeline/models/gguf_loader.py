"""GGUF DiT experts (QuantStack/Wan2.2-*-GGUF, city96's ComfyUI-GGUF layout): Wan's original key names,
memory-mapped with the `gguf` package, kept quantized, dequantized one layer at a time when it runs.

ggml stores dimensions in reverse order; tensors of more than 4 dimensions (the 3D patch embedding) are
stored flattened with their real shape in a `comfy.gguf.orig_shape.<name>` metadata array.
Dequantization: on CPU the `gguf` package's numpy reference (every type it can dequantize); on CUDA diffusers'
torch kernels for the types it has (Q4_0..Q8_0, K-quants, IQ4), else the numpy path.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import CheckpointError
from .quant import QuantizedLinear

UNQUANTIZED = ("F32", "F16", "BF16", "F64")


def _gguf():
    import gguf

    return gguf


class GGUFTensors:
    """Keys, logical (torch-order) shapes and quant types of a .gguf file; raw data stays memory-mapped."""

    def __init__(self, path: Path):
        gguf = _gguf()
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"missing file {self.path}")
        try:
            self.reader = gguf.GGUFReader(str(self.path), "r")
        except Exception as e:  # noqa: BLE001 - the reader raises ValueError/struct errors on a bad file
            raise CheckpointError(f"{self.path} is not a readable GGUF file: {e}") from None
        self._tensors = {t.name: t for t in self.reader.tensors}

    def keys(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, key: str) -> bool:
        return key in self._tensors

    def _orig_shape(self, key: str) -> tuple[int, ...] | None:
        field = self.reader.get_field(f"comfy.gguf.orig_shape.{key}")
        if field is None:
            return None
        return tuple(int(field.parts[i][0]) for i in field.data)

    def shape(self, key: str) -> tuple[int, ...]:
        orig = self._orig_shape(key)
        if orig is not None:
            return orig
        return tuple(int(d) for d in reversed(self._tensors[key].shape.tolist()))

    def qtype(self, key: str):
        return self._tensors[key].tensor_type

    def type_name(self, key: str) -> str:
        return self.qtype(key).name

    def is_quantized(self, key: str) -> bool:
        return self.type_name(key) not in UNQUANTIZED

    def raw(self, key: str) -> torch.Tensor:
        """The stored bytes (or floats for unquantized types), sharing the file's memory map."""
        data = self._tensors[key].data
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a read-only memmap: torch warns it is not writable; we never write
            return torch.from_numpy(data)

    def dequantize(self, key: str) -> torch.Tensor:
        return dequantize_raw(self.raw(key), self.qtype(key), self.shape(key))


def torch_dequantize(raw: torch.Tensor, qtype, shape: tuple[int, ...]) -> torch.Tensor | None:
    """diffusers' torch GGUF kernels (run where `raw` is, e.g. on the GPU); None for a type they lack."""
    gguf = _gguf()
    if qtype.name in ("F32", "F16"):
        return raw.to(torch.float32).reshape(shape)
    from diffusers.quantizers.gguf.utils import dequantize_functions

    fn = dequantize_functions.get(qtype)
    if fn is None:
        return None
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = raw.view(torch.uint8).reshape(-1, type_size)
    return fn(blocks, block_size, type_size, dtype=torch.float32).to(torch.float32).reshape(shape)


def dequantize_raw(raw: torch.Tensor, qtype, shape: tuple[int, ...]) -> torch.Tensor:
    """float32 tensor of `shape` from stored GGUF data."""
    gguf = _gguf()
    raw_cpu = raw
    if raw.is_cuda:
        out = torch_dequantize(raw, qtype, shape)
        if out is not None:
            return out
        raw_cpu = raw.cpu()
    try:
        out = gguf.quants.dequantize(raw_cpu.numpy(), qtype)
    except NotImplementedError:
        raise CheckpointError(f"the gguf package cannot dequantize {qtype.name} tensors") from None
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).reshape(shape).to(raw.device)


class GGUFLinear(QuantizedLinear):
    """A linear layer whose weight is a GGUF quantized tensor, dequantized on each forward."""

    def __init__(self, raw: torch.Tensor, qtype, shape: tuple[int, int], bias: torch.Tensor | None):
        out_features, in_features = shape
        super().__init__(in_features, out_features, bias)
        self.register_buffer("qweight", raw)
        self.qtype = qtype
        self.shape = tuple(shape)

    def dequantized(self) -> torch.Tensor:
        return dequantize_raw(self.qweight, self.qtype, self.shape)

    def _base(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantized().to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.qtype.name}, loras={len(self.lora_scales)}"
