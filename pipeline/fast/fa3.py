"""FlashAttention-3 (the `fa3-fwd` package, module `fa3_fwd_interface`) as diffusers attention backends: exact
bf16 attention, and fp8 e4m3 attention through FA3's descale path.

Both kernels are `torch.library` custom ops with fake (meta) implementations, so a regionally compiled block
traces through them without a graph break (one graph per block, as with SDPA). The fp8 quantization is plain
torch code in front of the op: under torch.compile Inductor fuses it into the QK-norm / RoPE kernels before it.

fp8 scaling (FA3 takes one descale per (batch, head), the finest its kernel has):
  - K smoothing: K minus its mean over the tokens (per batch, head, channel). Exact for softmax: every logit of a
    query row moves by the same q.mean(K), so the probabilities are unchanged; it takes the shared offset out of
    K (large in DiTs after QK-norm) so the fp8 grid covers the part that differs between tokens.
  - V smoothing: V minus its token mean, added back to the output. Exact too: each softmax row sums to 1.
  - Q, K, V: one scale per (batch, head) = amax / 448 (e4m3's largest finite value).

Diffusers' backend registry is keyed by its own enum, so our functions are registered under two FA3 members:
`_flash_3` (the FA3 kernel diffusers would call through `flash_attn_interface`) and `_flash_3_hub` (a Hub
kernel that cannot be fetched on an offline machine) for the fp8 variant. `install()` does it once, and only
when fa3-fwd imports; neither is marked context-parallel, so sequence parallelism falls back to SDPA.
"""
from __future__ import annotations

import functools
import importlib.util
import inspect

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
MODULE = "fa3_fwd_interface"
BF16_SLOT = "_flash_3"  # diffusers enum value our bf16 FA3 runs under
FP8_SLOT = "_flash_3_hub"  # ... and our fp8 FA3


def available() -> str | None:
    """None when fa3-fwd can run here, else the reason it cannot."""
    if importlib.util.find_spec(MODULE) is None:
        return "fa3-fwd is not installed (pip install 'wan-batch[hopper]')"
    if not torch.cuda.is_available():
        return "fa3-fwd needs CUDA"
    if torch.cuda.get_device_capability()[0] != 9:
        return f"fa3-fwd runs on Hopper (sm_90) only; this GPU is sm_{''.join(map(str, torch.cuda.get_device_capability()))}"
    return None


@functools.lru_cache(maxsize=None)
def _interface():
    return importlib.import_module(MODULE)


# ---- the kernels as custom ops --------------------------------------------------------------------------------

@torch.library.custom_op("wan_batch::fa3", mutates_args=())
def fa3(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    """bf16 attention over [B, S, H, D] (FA3's layout, also diffusers' backends')."""
    out = _interface().flash_attn_func(q, k, v, softmax_scale=softmax_scale, causal=False)
    return out[0] if isinstance(out, tuple) else out


@fa3.register_fake
def _fa3_fake(q, k, v, softmax_scale):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


@torch.library.custom_op("wan_batch::fa3_fp8", mutates_args=())
def fa3_fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_descale: torch.Tensor, k_descale: torch.Tensor,
            v_descale: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    """fp8 e4m3 attention; descales [B, H] float32; output bf16."""
    out = _interface().flash_attn_func(q, k, v, softmax_scale=softmax_scale, causal=False, q_descale=q_descale,
                                       k_descale=k_descale, v_descale=v_descale)
    return out[0] if isinstance(out, tuple) else out


@fa3_fp8.register_fake
def _fa3_fp8_fake(q, k, v, q_descale, k_descale, v_descale, softmax_scale):
    return q.new_empty((*q.shape[:-1], v.shape[-1]), dtype=torch.bfloat16)


# ---- fp8 quantization (traceable torch: fused by Inductor under compile) --------------------------------------

def quantize_per_head(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, S, H, D] -> (e4m3 tensor, descale [B, H] float32) with x ~= q * descale."""
    amax = x.abs().amax(dim=(1, 3)).float().clamp_min(1e-8)
    descale = amax / FP8_MAX
    q = (x.float() / descale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, descale.contiguous()


def smooth_and_quantize(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, smooth_v: bool = True):
    """The fp8 inputs of `fa3_fp8` and the V mean to add back to its output (None without V smoothing)."""
    k = k.float()
    k = k - k.mean(dim=1, keepdim=True)
    v_mean = None
    if smooth_v:
        v = v.float()
        v_mean = v.mean(dim=1, keepdim=True)
        v = v - v_mean
    (q8, qs), (k8, ks), (v8, vs) = quantize_per_head(q), quantize_per_head(k), quantize_per_head(v)
    return (q8, k8, v8, qs, ks, vs), v_mean


def fp8_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                            smooth_v: bool = True) -> torch.Tensor:
    """What the fp8 path computes, emulated in float32 on any device (the inputs rounded to e4m3 with the same
    scales, exact attention after): the error of the quantization alone, for CPU tests."""
    (q8, k8, v8, qs, ks, vs), v_mean = smooth_and_quantize(q, k, v, smooth_v)
    deq = lambda t, s: t.float() * s[:, None, :, None]  # noqa: E731
    out = torch.nn.functional.scaled_dot_product_attention(
        deq(q8, qs).transpose(1, 2), deq(k8, ks).transpose(1, 2), deq(v8, vs).transpose(1, 2), scale=scale)
    out = out.transpose(1, 2)
    return out if v_mean is None else out + v_mean


# ---- diffusers backends ------------------------------------------------------------------------------------------

def _to_bf16(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.bfloat16 else t.to(torch.bfloat16)  # this fa3-fwd build has no fp16/fp32 path


def _check(attn_mask, _parallel_config) -> None:
    if attn_mask is not None:
        raise ValueError("the fa3 attention backends take no attention mask")
    if _parallel_config is not None and getattr(_parallel_config, "context_parallel_config", None) is not None:
        raise ValueError("the fa3 attention backends do not run context-parallel")


def fa3_backend(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                _parallel_config=None):
    _check(attn_mask, _parallel_config)
    if is_causal or dropout_p:
        raise ValueError("the fa3 backend is non-causal inference attention")
    s = scale if scale is not None else query.shape[-1] ** -0.5
    return fa3(_to_bf16(query), _to_bf16(key), _to_bf16(value), s).to(query.dtype)


def fa3_fp8_backend(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                    _parallel_config=None):
    _check(attn_mask, _parallel_config)
    if is_causal or dropout_p:
        raise ValueError("the fa3_fp8 backend is non-causal inference attention")
    s = scale if scale is not None else query.shape[-1] ** -0.5
    args, v_mean = smooth_and_quantize(query, key, value)
    out = fa3_fp8(*args, s)
    if v_mean is not None:
        out = out.float() + v_mean
    return out.to(query.dtype)


@functools.lru_cache(maxsize=None)
def install() -> bool:
    """Register both backends in diffusers' registry (once). False when fa3-fwd cannot be imported."""
    if importlib.util.find_spec(MODULE) is None:
        return False
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry as R

    _interface()  # loads the extension (and fa3-fwd's own ops) now, not inside a traced region
    for slot, fn in ((BF16_SLOT, fa3_backend), (FP8_SLOT, fa3_fp8_backend)):
        name = AttentionBackendName(slot)
        R._backends[name] = fn
        R._constraints[name] = []
        R._supported_arg_names[name] = set(inspect.signature(fn).parameters)
        R._supports_context_parallel.discard(name.value)
    return True
