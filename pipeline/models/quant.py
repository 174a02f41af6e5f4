"""Quantized linear layers loaded from checkpoints, kept quantized in memory.

Scaled fp8 / int8 (LightX2V's converter: `<layer>.weight` float8_e4m3fn or int8 [out, in] next to
`<layer>.weight_scale` float32 [out, 1], i.e. one scale per output channel; ComfyUI's variant names the scale
`<layer>.scale_weight` and usually has one scale per tensor, plus a `scaled_fp8` marker tensor). The weight is
w = q * scale. On CUDA the product runs through pipeline.fast.fp8_matmul (torch._scaled_mm / _int_mm);
elsewhere the layer dequantizes in forward.

`QuantizedLinear` is also the base of the GGUF layer: both can carry LoRA side branches (a LoRA cannot be
merged into a quantized weight without re-quantizing it).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..fast import fp8_matmul

FP8_DTYPES = (torch.float8_e4m3fn,)
SCALE_SUFFIXES = (".weight_scale", ".scale_weight")
# Keys of scaled checkpoints that hold no weights we use: ComfyUI's format marker, activation scales (only
# meaningful to a static-activation fp8 matmul, which we do not run).
IGNORED_SUFFIXES = (".scale_input", ".input_scale")
IGNORED_KEYS = ("scaled_fp8",)


def weight_key_of_scale(key: str) -> str | None:
    """'<layer>.weight_scale' or '<layer>.scale_weight' -> '<layer>.weight'; None for other keys."""
    if key.endswith(".weight_scale"):
        return key[: -len("_scale")]
    if key.endswith(".scale_weight"):
        return key[: -len("scale_weight")] + "weight"
    return None


def is_ignored_key(key: str) -> bool:
    """ComfyUI writes its marker under the checkpoint's prefix too (`model.diffusion_model.scaled_fp8`)."""
    return key.rpartition("diffusion_model.")[2] in IGNORED_KEYS or key.endswith(IGNORED_SUFFIXES)


def scheme_of(dtype: torch.dtype) -> str:
    if dtype in FP8_DTYPES:
        return "fp8"
    if dtype == torch.int8:
        return "int8"
    raise ValueError(f"{dtype} is not a scaled-quantization dtype")


def dequantize_scaled(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The float32 weight a scaled tensor stands for (scale: per-tensor or per-output-channel)."""
    s = scale.float()
    if s.numel() > 1:
        s = s.reshape(-1, *([1] * (q.dim() - 1)))
    return q.float() * s


class QuantizedLinear(torch.nn.Module):
    """A linear layer whose weight stays quantized; subclasses implement `_base(x)` and `dequantized()`.
    LoRA side branches (down [r, in], up [out, r], scale) add scale * up(down(x)) to the output."""

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
        self.lora_scales: list[float] = []
        self.dense_scales: list[float] = []

    @property
    def device(self) -> torch.device:
        return next(self.buffers()).device

    def add_lora(self, down: torch.Tensor, up: torch.Tensor, scale: float) -> None:
        n = len(self.lora_scales)
        self.register_buffer(f"lora_down_{n}", down.contiguous().to(self.device))
        self.register_buffer(f"lora_up_{n}", up.contiguous().to(self.device))
        self.lora_scales.append(float(scale))

    def add_dense_delta(self, delta: torch.Tensor, scale: float) -> None:
        """A full weight difference (a LoRA file's `.diff` entry) kept beside the quantized weight."""
        n = len(self.dense_scales)
        self.register_buffer(f"dense_delta_{n}", delta.contiguous().to(self.device))
        self.dense_scales.append(float(scale))

    def _base(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dequantized(self) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._base(x)
        for n, s in enumerate(self.lora_scales):
            down, up = getattr(self, f"lora_down_{n}"), getattr(self, f"lora_up_{n}")
            y = y + s * F.linear(F.linear(x, down.to(x.dtype)), up.to(x.dtype)).to(y.dtype)
        for n, s in enumerate(self.dense_scales):
            y = y + s * F.linear(x, getattr(self, f"dense_delta_{n}").to(x.dtype)).to(y.dtype)
        return y


class ScaledLinear(QuantizedLinear):
    """fp8 (e4m3) or int8 weight with a float32 scale per output channel."""

    def __init__(self, weight_q: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None):
        out_features, in_features = weight_q.shape
        super().__init__(in_features, out_features, bias)
        scale = weight_scale.float().reshape(-1)
        if scale.numel() == 1:  # ComfyUI: one scale for the whole tensor
            scale = scale.expand(out_features)
        if scale.numel() != out_features:
            raise ValueError(f"weight scale has {scale.numel()} entries for {out_features} output channels")
        self.register_buffer("weight", weight_q)
        self.register_buffer("weight_scale", scale.reshape(out_features, 1).contiguous())

    @property
    def scheme(self) -> str:
        return scheme_of(self.weight.dtype)

    def dequantized(self) -> torch.Tensor:
        return dequantize_scaled(self.weight, self.weight_scale)

    def _base(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias
        if self.weight.dtype in FP8_DTYPES:
            return fp8_matmul.scaled_fp8_linear(x, self.weight, self.weight_scale, bias)
        return fp8_matmul.scaled_int8_linear(x, self.weight, self.weight_scale, bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.scheme}, loras={len(self.lora_scales)}"


class W8A8Linear(ScaledLinear):
    """A scaled fp8 / int8 layer of a quantized text or image encoder: LightX2V's encoder linears quantize the
    activation per token on every device (q_linear.py), so this one does too (fp8_matmul.w8a8_linear), where the
    DiT's layers dequantize off the GPU."""

    def _base(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_matmul.w8a8_linear(x, self.weight, self.weight_scale, self.bias)
