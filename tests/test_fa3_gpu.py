"""FA3 kernels on a Hopper GPU with fa3-fwd installed (skipped elsewhere): exactness of the bf16 kernel, the fp8
kernel against its float32 emulation, no graph break under torch.compile, and the default choice."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.fast import fa3

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or fa3.available() is not None,
                                 reason="needs a Hopper GPU and fa3-fwd")]


def cos(a, b) -> float:
    return F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def inputs(seed, s=2048, h=8, d=128):
    g = torch.Generator("cuda").manual_seed(seed)
    q = torch.randn(2, s, h, d, device="cuda", generator=g)
    k = torch.randn(2, s, h, d, device="cuda", generator=g) + 3 * torch.randn(1, 1, h, d, device="cuda", generator=g)
    v = torch.randn(2, s, h, d, device="cuda", generator=g)
    return [t.to(torch.bfloat16) for t in (q, k, v)]


def exact(q, k, v):
    return F.scaled_dot_product_attention(*(t.double().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)


@pytest.mark.parametrize("d", [64, 128])
def test_fa3_bf16_is_exact_to_rounding(d):
    q, k, v = inputs(0, d=d)
    fa3.install()
    out = fa3.fa3_backend(q, k, v)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    assert cos(out, exact(q, k, v)) > 0.99999


def test_fa3_fp8_matches_its_emulation():
    q, k, v = inputs(1)
    fa3.install()
    out = fa3.fa3_fp8_backend(q, k, v)
    ref = exact(q, k, v)
    emu = fa3.fp8_attention_reference(q.float(), k.float(), v.float())
    assert torch.isfinite(out).all()
    assert cos(out, ref) > 0.99
    assert cos(out, emu) > 0.999  # the kernel computes what the quantization implies


def test_compiled_attention_has_no_graph_break():
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    fa3.install()
    q, k, v = inputs(2, s=1024)
    for slot in (fa3.BF16_SLOT, fa3.FP8_SLOT):
        def fn(a, b, c, slot=slot):
            return dispatch_attention_fn(a * 1.0, b, c, backend=slot) + 1
        explained = torch._dynamo.explain(fn)(q, k, v)
        assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
        torch.testing.assert_close(torch.compile(fn)(q, k, v), fn(q, k, v), atol=2e-2, rtol=0)


def test_default_self_attention_on_hopper_is_fa3():
    from pipeline.fast.attention import apply_attention
    from pipeline.tiny import DIT_CONFIG
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(**DIT_CONFIG).cuda()
    report = apply_attention(model, None, None, torch.device("cuda"))
    assert report["self"]["backend"] == "fa3" and report["cross"]["backend"] == "native"
    assert model.blocks[0].attn1.processor._attention_backend.value == fa3.BF16_SLOT
