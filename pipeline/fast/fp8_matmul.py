"""Quantized linear layers that stay quantized on the GPU: fp8 (e4m3) and int8 weights multiplied on the tensor
cores, never dequantized to bf16 first.

fp8: `torch._scaled_mm` with a per-output-channel weight scale (LightX2V's scaled-fp8 checkpoints store exactly
that) and a dynamic per-token activation scale, with Hopper's fast fp8 accumulation (as LightX2V's and torchao's
inference kernels use; measured on an H100 the rowwise-scaled product without it was only ~1.1x bf16). Quantizing the activation is a memory-bound pass of its own: in
eager mode it runs as one compiled (fused) kernel; inside a compiled block (accel.compile_blocks) it is traced
with the block, so Inductor fuses it into the norm/modulation that produces the activation.
int8: `torch._int_mm` (int32 accumulate) with the same scaling scheme.

Where the fast path cannot run (CPU, an old GPU, a shape the kernel refuses) the functions compute the same
product by dequantizing, and say once in the log why. The numbers are the same up to the activation
quantization (which the fallback does not do); see tests/test_perf_paths.py for the tolerance.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
INT8_MAX = 127.0
_EPS = 1e-12

_warned: set[str] = set()
_compiled: dict[str, Callable] = {}


def _warn_once(key: str, msg: str, *args) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(msg, *args)


def quantize_rows(x: torch.Tensor, dtype: torch.dtype = FP8) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row quantization of a 2-D tensor: (q, scale [rows, 1] fp32) with x ~= q * scale."""
    qmax = FP8_MAX if dtype == FP8 else INT8_MAX
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp(min=_EPS) / qmax
    q = (xf / scale).clamp(-qmax, qmax)
    if dtype != FP8:
        q = q.round()
    return q.to(dtype), scale


def quantize_tokens(x: torch.Tensor, dtype: torch.dtype = FP8) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (per-row) activation quantization as LightX2V's kernels do it: fp8 divides by absmax / 448
    (its triton and torchao kernels), int8 multiplies by 127 / absmax and rounds half to even (vllm's
    scaled_int8_quant, torchao; LightX2V's own int8 triton kernel multiplies the same way). The two int8 forms
    differ on values that land on a rounding boundary, which bf16-valued inputs often do."""
    if dtype == FP8:
        return quantize_rows(x, dtype)
    xf = x.float()
    absmax = xf.abs().amax(dim=-1, keepdim=True).clamp(min=_EPS)
    q = (xf * (INT8_MAX / absmax)).round().clamp(-128, 127)
    return q.to(torch.int8), absmax / INT8_MAX


def quantize_weight(weight: torch.Tensor, dtype: torch.dtype = FP8) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel weight quantization ([out, in] -> q [out, in], scale [out, 1] fp32), the layout of
    LightX2V's scaled-fp8 / int8 checkpoints."""
    return quantize_rows(weight, dtype)


def _quantizer(dtype: torch.dtype) -> Callable:
    """The activation quantizer for eager calls: one fused kernel (compiled once per dtype), or plain ops."""
    if torch.compiler.is_compiling():
        return lambda x: quantize_tokens(x, dtype)  # traced into the caller's graph and fused there
    key = str(dtype)
    if key not in _compiled:
        from .accel import use_compile_cache

        use_compile_cache()  # before this process's first compile: the caches' directory is read then
        try:
            _compiled[key] = torch.compile(lambda x: quantize_tokens(x, dtype), dynamic=True)
        except Exception as e:  # noqa: BLE001 - compile unavailable: eager ops are correct, only slower
            _warn_once("compile", "activation quantization runs unfused (torch.compile unavailable: %s)", e)
            _compiled[key] = lambda x: quantize_tokens(x, dtype)
    return _compiled[key]


def _dequant_linear(x: torch.Tensor, weight_q: torch.Tensor, weight_scale: torch.Tensor,
                    bias: torch.Tensor | None) -> torch.Tensor:
    w = weight_q.to(torch.float32) * weight_scale.reshape(-1, 1).to(torch.float32)
    return F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))


_CAPS: dict[int, dict[str, bool]] = {}  # CUDA device index -> what its kernels accept (probed once, eagerly)


def probe(device: torch.device | int | None = None) -> dict[str, bool]:
    """Find out once per GPU whether fp8 `_scaled_mm` (row-wise scales, with a bias) and `_int_mm` run, with
    tiny products, outside any compiled region; later calls (compiled ones too) only read the answer."""
    idx = torch.device("cuda", device) if isinstance(device, int) else torch.device(device or "cuda")
    idx = idx.index if idx.index is not None else torch.cuda.current_device()
    if idx in _CAPS:
        return _CAPS[idx]
    caps = {"fp8": False, "bias": False, "int8": False}
    dev = torch.device("cuda", idx)
    a = torch.randn(32, 64, device=dev)
    w = torch.randn(32, 64, device=dev)
    major, minor = torch.cuda.get_device_capability(dev)
    if (major, minor) >= (8, 9):
        aq, as_ = quantize_rows(a)
        wq, ws = quantize_rows(w)
        try:
            torch._scaled_mm(aq, wq.t(), scale_a=as_, scale_b=ws.t(), out_dtype=torch.bfloat16)
            caps["fp8"] = True
            torch._scaled_mm(aq, wq.t(), scale_a=as_, scale_b=ws.t(), out_dtype=torch.bfloat16,
                             bias=torch.zeros(32, device=dev, dtype=torch.bfloat16))
            caps["bias"] = True
        except RuntimeError as e:
            log.warning("fp8 _scaled_mm on GPU %d: %s", idx, str(e).splitlines()[0])
    else:
        log.warning("fp8 matmul needs compute capability >= 8.9 (GPU %d: %d.%d): dequantizing", idx, major, minor)
    try:
        aq, _ = quantize_rows(a, torch.int8)
        wq, _ = quantize_rows(w, torch.int8)
        torch._int_mm(aq, wq.t())
        caps["int8"] = True
    except RuntimeError as e:
        log.warning("int8 _int_mm on GPU %d: %s", idx, str(e).splitlines()[0])
    _CAPS[idx] = caps
    return caps


def _fast_ok(x: torch.Tensor, weight_q: torch.Tensor, kind: str) -> bool:
    if not x.is_cuda:
        return False
    idx = x.device.index if x.device.index is not None else torch.cuda.current_device()
    caps = _CAPS.get(idx) if torch.compiler.is_compiling() else probe(idx)
    if not caps or not caps[kind]:
        return False
    n, k = weight_q.shape
    return k % 16 == 0 and n % 16 == 0


def scaled_fp8_linear(x: torch.Tensor, weight_fp8: torch.Tensor, weight_scale: torch.Tensor,
                      bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ (weight_fp8 * weight_scale).T + bias, on fp8 tensor cores when possible.

    x: [..., in] (bf16/fp16/fp32); weight_fp8: [out, in] float8_e4m3fn; weight_scale: out scales (any shape with
    `out` elements, fp32); bias: [out] or None. Returns x's dtype (bf16 for fp32 x on the fast path)."""
    if not _fast_ok(x, weight_fp8, "fp8"):
        if x.is_cuda:
            _warn_once("fp8-slow", "fp8 weights are dequantized on %s (no fp8 kernel for it)", x.device)
        return _dequant_linear(x, weight_fp8, weight_scale, bias)
    shape = x.shape
    out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
    xq, xs = _quantizer(FP8)(x.reshape(-1, shape[-1]))
    ws = weight_scale.reshape(1, -1).to(torch.float32)
    b = None if bias is None else bias.to(out_dtype)
    idx = x.device.index if x.device.index is not None else torch.cuda.current_device()
    if b is not None and _CAPS[idx]["bias"]:
        y = torch._scaled_mm(xq, weight_fp8.t(), scale_a=xs, scale_b=ws, bias=b, out_dtype=out_dtype,
                               use_fast_accum=True)
    else:
        y = torch._scaled_mm(xq, weight_fp8.t(), scale_a=xs, scale_b=ws, out_dtype=out_dtype,
                              use_fast_accum=True)
        if b is not None:
            y = y + b
    return y.reshape(*shape[:-1], -1)


def scaled_int8_linear(x: torch.Tensor, weight_int8: torch.Tensor, weight_scale: torch.Tensor,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """The int8 counterpart: per-token int8 activations, `torch._int_mm`, both scales applied to the int32
    result (fused into one epilogue when compiled)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.shape[0] <= 16 or not _fast_ok(x, weight_int8, "int8"):  # _int_mm wants more than 16 rows
        return _dequant_linear(x, weight_int8, weight_scale, bias)
    out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
    xq, xs = _quantizer(torch.int8)(x2)
    acc = torch._int_mm(xq, weight_int8.t())
    y = acc.float() * xs * weight_scale.reshape(1, -1).float()
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype).reshape(*shape[:-1], -1)


def w8a8_reference(x: torch.Tensor, weight_q: torch.Tensor, weight_scale: torch.Tensor,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """The W8A8 product on any device: the activation quantized per token to the weight's dtype
    (quantize_tokens, as LightX2V's kernels do it), the quantized values multiplied in float32 (exact products, fp32
    accumulation like the tensor-core kernels), both scales applied to the result. Returns x's dtype."""
    shape = x.shape
    xq, xs = quantize_tokens(x.reshape(-1, shape[-1]), weight_q.dtype)
    acc = xq.float() @ weight_q.float().t()
    y = acc * xs * weight_scale.reshape(1, -1).float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*shape[:-1], -1)


def w8a8_linear(x: torch.Tensor, weight_q: torch.Tensor, weight_scale: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """LightX2V's text/image-encoder quantized linears (q_linear.py: sgl, vllm, q8f, torchao, triton kernels):
    weight and activation both 8-bit, the activation quantized per token on every call. On a GPU with the
    kernels this is scaled_fp8_linear / scaled_int8_linear; elsewhere (and for int8 products of <= 16 rows,
    which _int_mm refuses) w8a8_reference computes the same numbers, activation quantization included, so a CPU
    run gives what the quantized encoder gives, not what the bf16 encoder would."""
    kind = "fp8" if weight_q.dtype == FP8 else "int8"
    rows = x.numel() // max(x.shape[-1], 1)
    if _fast_ok(x, weight_q, kind) and (kind == "fp8" or rows > 16):
        fn = scaled_fp8_linear if kind == "fp8" else scaled_int8_linear
        return fn(x, weight_q, weight_scale, bias).to(x.dtype)  # fp32 x (the CLIP encoder): fp32 out, as below
    return w8a8_reference(x, weight_q, weight_scale, bias)


class QuantLinear(torch.nn.Module):
    """A Linear whose weight stays fp8 or int8 with a per-output-channel scale (used by the benchmarks to turn a
    bf16 model into its LightX2V-quantized form; checkpoint loading has its own module in models/quant.py)."""

    def __init__(self, weight_q: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = weight_q.shape[1], weight_q.shape[0]
        self.register_buffer("weight", weight_q)
        self.register_buffer("weight_scale", weight_scale.reshape(-1, 1).float())
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, dtype: torch.dtype = FP8) -> "QuantLinear":
        q, s = quantize_weight(linear.weight.data, dtype)
        bias = None if linear.bias is None else linear.bias.data
        return cls(q, s, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fn = scaled_fp8_linear if self.weight.dtype == FP8 else scaled_int8_linear
        return fn(x, self.weight, self.weight_scale, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, dtype={self.weight.dtype}"


def quantize_blocks(model: torch.nn.Module, dtype: torch.dtype = FP8, blocks_attr: str = "blocks") -> int:
    """Replace every nn.Linear inside the repeated transformer blocks by a QuantLinear (in place, freeing the
    bf16 weight as it goes). Embeddings and the output head stay in their dtype, as in LightX2V's fp8 models.
    Returns the number of layers converted."""
    n = 0
    for block in getattr(model, blocks_attr):
        for name, mod in list(block.named_modules()):
            for child_name, child in list(mod.named_children()):
                if isinstance(child, torch.nn.Linear):
                    setattr(mod, child_name, QuantLinear.from_linear(child, dtype))
                    n += 1
    return n
