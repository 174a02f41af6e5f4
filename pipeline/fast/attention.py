"""Attention backend selection from LightX2V's keys (`self_attn_1_type`, `cross_attn_1_type`, `cross_attn_2_type`).

The kernels are diffusers' attention backends (`diffusers.models.attention_dispatch`), set per attention module:
`attn1` (self-attention over the video tokens: nearly all the attention time) and `attn2` (cross-attention to
the 512 text tokens, plus the image tokens for Wan2.1 I2V). A backend whose package or GPU is missing falls back
to PyTorch SDPA with the reason logged and returned; a missing kernel never stops a batch.

LightX2V name -> backend:
  flash_attn3 -> fa3: FlashAttention-3 from the `fa3-fwd` package (pip install 'wan-batch[hopper]'; Hopper
                 only; fast.fa3), else diffusers' _flash_3 (`flash_attn_interface`), else SDPA
  sage_attn2, sage_attn3, sage_attn -> fa3_fp8: fp8 e4m3 attention through fa3-fwd (opt-in, lossy: fast.fa3
                 states how), else the `sageattention` package (sage) when installed, else SDPA
  flash_attn2 -> flash (flash-attn 2)      torch_sdpa -> native (PyTorch picks cuDNN/flash/efficient)
Our own names: fa3, fa3_fp8, cudnn -> _native_cudnn, sdpa_flash -> _native_flash, sdpa_efficient ->
_native_efficient, and any diffusers backend name as it is (e.g. `flex`).

Self-attention with no type set is fa3 on a Hopper GPU with fa3-fwd installed (exact to bf16 rounding: cos
0.999996 against cuDNN), else SDPA; cross-attention with no type set is SDPA.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

LIGHTX2V_BACKENDS = {
    "flash_attn2": "flash",
    "flash_attn3": "fa3",
    "sage_attn2": "fa3_fp8",
    "sage_attn3": "fa3_fp8",
    "sage_attn": "fa3_fp8",
    "torch_sdpa": "native",
    "sdpa": "native",
    "cudnn": "_native_cudnn",
    "sdpa_flash": "_native_flash",
    "sdpa_efficient": "_native_efficient",
}
# Backends that only run on CUDA (the rest of diffusers' non-native backends need their own packages and GPUs).
_CUDA_ONLY = {"_native_cudnn", "_native_flash", "_native_efficient", "flash", "_flash_3", "sage",
              "_sage_qk_int8_pv_fp8_cuda", "_sage_qk_int8_pv_fp8_cuda_sm90", "_sage_qk_int8_pv_fp16_cuda",
              "_sage_qk_int8_pv_fp16_triton", "xformers"}
FALLBACK = "native"
# Ours (fast.fa3): name -> (diffusers enum slot it runs under, the diffusers backend to try when fa3-fwd cannot run)
OURS = {"fa3": ("_flash_3", "_flash_3"), "fa3_fp8": ("_flash_3_hub", "sage")}


@dataclass(frozen=True)
class BackendChoice:
    requested: str | None  # the config's name (None: not set)
    backend: str  # backend actually used: ours (fa3, fa3_fp8) or a diffusers backend name
    reason: str | None = None  # why it differs from the request, if it does

    @property
    def diffusers_name(self) -> str:
        """The value to give diffusers' set_attention_backend."""
        return OURS[self.backend][0] if self.backend in OURS else self.backend

    def as_dict(self) -> dict:
        return {"requested": self.requested, "backend": self.backend, "reason": self.reason}


def _diffusers_name(name: str) -> str | None:
    from diffusers.models.attention_dispatch import AttentionBackendName

    name = LIGHTX2V_BACKENDS.get(name.lower(), name.lower())
    valid = {b.value for b in AttentionBackendName} | set(OURS)
    return name if name in valid else None


def _fa3_reason(device: torch.device) -> str | None:
    from . import fa3

    if device.type != "cuda":
        return f"fa3-fwd needs CUDA (device is {device.type})"
    return fa3.available()


def resolve_backend(requested: str | None, device: torch.device, default_fa3: bool = False) -> BackendChoice:
    """The backend to use for `requested` on `device`, or SDPA with the reason it cannot be used. With nothing
    requested: fa3 where it runs when `default_fa3` (self-attention), else SDPA."""
    if not requested:
        if default_fa3 and _fa3_reason(device) is None:
            from . import fa3

            fa3.install()
            return BackendChoice(None, "fa3")
        return BackendChoice(None, FALLBACK)
    name = _diffusers_name(requested)
    if name is None:
        return BackendChoice(requested, FALLBACK, f"unknown attention type {requested!r}")
    if name in OURS:
        why = _fa3_reason(device)
        if why is None:
            from . import fa3

            fa3.install()
            return BackendChoice(requested, name)
        other = resolve_backend(OURS[name][1], device)  # the diffusers kernel of the same class, if it runs
        if other.reason is None:
            return BackendChoice(requested, other.backend, f"{why}; using diffusers' {other.backend}")
        return BackendChoice(requested, FALLBACK, f"{why}; {other.reason}")
    if name in _CUDA_ONLY and device.type != "cuda":
        return BackendChoice(requested, FALLBACK, f"{name} needs CUDA (device is {device.type})")
    from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements

    try:
        _check_attention_backend_requirements(AttentionBackendName(name))
    except (RuntimeError, ImportError) as e:
        return BackendChoice(requested, FALLBACK, str(e).split(". ")[0])
    if name == "_flash_3" and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] != 9:
        return BackendChoice(requested, FALLBACK, "flash-attn 3 runs on Hopper (sm_90) only")
    return BackendChoice(requested, name)


def apply_attention(transformer: torch.nn.Module, self_type: str | None, cross_type: str | None,
                    device: torch.device) -> dict[str, dict]:
    """Set the self- and cross-attention backends of a Wan transformer. Returns what was chosen and why."""
    choices = {"self": resolve_backend(self_type, device, default_fa3=True),
               "cross": resolve_backend(cross_type, device)}
    for kind, choice in choices.items():
        if choice.reason:
            log.warning("%s-attention: %s unavailable (%s); using %s", kind, choice.requested, choice.reason,
                        choice.backend)
    for block in getattr(transformer, "blocks", []):
        block.attn1.set_attention_backend(choices["self"].diffusers_name)
        block.attn2.set_attention_backend(choices["cross"].diffusers_name)
    return {k: c.as_dict() for k, c in choices.items()}


def attention_types(config: dict) -> tuple[str | None, str | None]:
    """(self-attention, cross-attention) names from a LightX2V config; cross_attn_1_type wins over _2."""
    return config.get("self_attn_1_type"), config.get("cross_attn_1_type") or config.get("cross_attn_2_type")


def lossy_attention(config: dict) -> str | None:
    """'fa3_fp8' when the config asks for fp8 attention (self or cross), else None. Unlike the exact kernels,
    it changes the result beyond rounding, so the denoise stage's cache key should carry it (plan.py)."""
    for name in (config.get("self_attn_1_type"), config.get("cross_attn_1_type"), config.get("cross_attn_2_type")):
        if name and _diffusers_name(str(name)) == "fa3_fp8":
            return "fa3_fp8"
    return None
