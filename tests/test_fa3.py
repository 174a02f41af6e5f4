"""FA3 attention backends (pipeline.fast.fa3): the exactness of the fp8 path's smoothing, the size of its
quantization error, tracing without a graph break (fake implementations), and the backend choice and fallback.
The kernels themselves run on Hopper only: tests/test_fa3_gpu.py."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.fast import fa3
from pipeline.fast.attention import resolve_backend


def attention(q, k, v):
    """Exact attention on [B, S, H, D]."""
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def cos(a, b) -> float:
    return F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def dit_like(seed: int, s: int = 256, h: int = 4, d: int = 64):
    """Inputs with a shared per-channel offset in K and V (as after QK-norm in a DiT), which plain randn lacks."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, s, h, d, generator=g) * 2
    k = torch.randn(1, s, h, d, generator=g) * 2 + 4 * torch.randn(1, 1, h, d, generator=g)
    v = torch.randn(1, s, h, d, generator=g) + 2 * torch.randn(1, 1, h, d, generator=g)
    return q, k, v


def test_smoothing_is_exact_in_float64():
    q, k, v = (t.double() for t in dit_like(0))
    ref = attention(q, k, v)
    k_mean, v_mean = k.mean(dim=1, keepdim=True), v.mean(dim=1, keepdim=True)
    smoothed = attention(q, k - k_mean, v - v_mean) + v_mean
    torch.testing.assert_close(smoothed, ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_fp8_quantization_error_is_small_and_smoothing_helps(seed):
    q, k, v = dit_like(seed)
    ref = attention(q, k, v)
    smoothed = fa3.fp8_attention_reference(q, k, v)
    (q8, qs), (k8, ks), (v8, vs) = (fa3.quantize_per_head(t) for t in (q, k, v))
    deq = lambda t, s: t.float() * s[:, None, :, None]  # noqa: E731
    plain = attention(deq(q8, qs), deq(k8, ks), deq(v8, vs))
    assert q8.dtype == torch.float8_e4m3fn and qs.shape == (1, 4)
    assert cos(smoothed, ref) > 0.995
    assert (smoothed - ref).norm() < 0.7 * (plain - ref).norm()  # the offsets cost precision without smoothing
    assert not torch.equal(smoothed, ref)  # really rounded to e4m3


def test_per_head_scales_use_the_fp8_range():
    x = torch.randn(2, 64, 3, 16) * torch.tensor([1e-3, 1.0, 1e3]).view(1, 1, 3, 1)
    q, s = fa3.quantize_per_head(x)
    assert s.shape == (2, 3) and s.dtype == torch.float32
    assert torch.allclose(q.float().abs().amax(dim=(1, 3)), torch.full((2, 3), fa3.FP8_MAX))
    rel = (q.float() * s[:, None, :, None] - x).abs().amax() / x.abs().amax()
    assert rel < 1 / 16


def test_backends_trace_without_running_the_kernel():
    """Fake implementations: the backends (quantization included) trace on fake tensors, as torch.compile does."""
    from torch.fx.experimental.proxy_tensor import make_fx

    q, k, v = (t.to(torch.bfloat16) for t in dit_like(4, s=32, h=2, d=64))
    for fn, op in ((fa3.fa3_backend, "wan_batch.fa3.default"), (fa3.fa3_fp8_backend, "wan_batch.fa3_fp8.default")):
        graph = make_fx(lambda a, b_, c: fn(a, b_, c), tracing_mode="fake")(q, k, v)
        targets = [str(n.target) for n in graph.graph.nodes if n.op == "call_function"]
        assert op in targets
        out = [n for n in graph.graph.nodes if n.op == "output"][0].args[0]
        assert out.meta["val"].shape == q.shape and out.meta["val"].dtype == torch.bfloat16


def test_lightx2v_names_map_to_ours_and_fall_back_with_the_reason():
    for name, ours in (("flash_attn3", "fa3"), ("sage_attn2", "fa3_fp8"), ("sage_attn3", "fa3_fp8"),
                       ("fa3_fp8", "fa3_fp8")):
        choice = resolve_backend(name, torch.device("cpu"))
        assert choice.backend == "native" and "fa3-fwd needs CUDA" in choice.reason, (name, choice)
        if fa3.available() is None:
            assert resolve_backend(name, torch.device("cuda")).backend == ours
    # not set: SDPA off Hopper, with no warning (nothing was asked for)
    assert resolve_backend(None, torch.device("cpu"), default_fa3=True).reason is None


def test_compile_caches_live_under_wan_batch_home(tmp_path, monkeypatch):
    """Even after torch has put its own default in the environment (importing fast.fa3 registers ops, which
    does), the caches move under WAN_BATCH_HOME; a directory the user chose is kept."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    from pipeline.fast.accel import use_compile_cache

    monkeypatch.setenv("WAN_BATCH_HOME", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    cache_dir()  # torch's default now in the environment
    dirs = use_compile_cache()
    assert dirs["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "compile-cache" / "inductor")
    assert cache_dir() == dirs["TORCHINDUCTOR_CACHE_DIR"]  # what Inductor will use
    assert dirs["TRITON_CACHE_DIR"] == str(tmp_path / "compile-cache" / "triton")
    mine = tmp_path / "mine"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(mine))
    assert use_compile_cache()["TORCHINDUCTOR_CACHE_DIR"] == str(mine)


def test_lossy_attention_is_named_for_the_cache_key():
    from pipeline.fast.attention import lossy_attention

    assert lossy_attention({"self_attn_1_type": "sage_attn2"}) == "fa3_fp8"
    assert lossy_attention({"cross_attn_2_type": "fa3_fp8"}) == "fa3_fp8"
    assert lossy_attention({"self_attn_1_type": "flash_attn3", "cross_attn_1_type": "torch_sdpa"}) is None
    assert lossy_attention({}) is None
