"""CPU checks of the GPU fast paths: each must compute what the plain path computes (within a stated tolerance)
and fall back with a reason, never crash. The GPU speed of the same code is measured by benchmarks/."""
from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

from pipeline.fast import fp8_matmul
from pipeline.fast.attention import apply_attention, resolve_backend
from pipeline.fast.offload import BlockStreamer, plan_resident_units, safetensors_source
from pipeline.tiny import DIT_CONFIG
from pipeline.stages.denoise import denoise_steps, predict_noise


def tiny_dit(layers: int = 3, seed: int = 0) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    return WanTransformer3DModel(**{**DIT_CONFIG, "num_layers": layers}).eval()


def inputs(batch: int = 1, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, 3, 8, 8, generator=g)
    ctx = torch.randn(batch, 7, DIT_CONFIG["text_dim"], generator=g)
    return x, torch.full((batch,), 500.0), ctx


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


# ---- batched CFG -------------------------------------------------------------------------------------------

def test_batched_cfg_equals_two_forwards():
    model = tiny_dit()
    x, t, ctx = inputs()
    ctx_null = torch.randn_like(ctx)
    with torch.no_grad():
        two = predict_noise(model, x, t, ctx, ctx_null, 4.0, batched_cfg=False)
        one = predict_noise(model, x, t, ctx, ctx_null, 4.0, batched_cfg=True)
        cond_only = predict_noise(model, x, t, ctx, None, 4.0, batched_cfg=True)
    # fp32, same kernels at batch 2: equal to rounding (observed ~1e-6)
    torch.testing.assert_close(one, two, atol=1e-5, rtol=0)
    assert (one - cond_only).abs().max() > 1e-3  # guidance did change the prediction


def test_batched_cfg_denoise_loop_matches():
    model = tiny_dit()
    x, _, ctx = inputs()
    ctx_null = torch.randn_like(ctx)
    outs = []
    for batched in (False, True):
        sched = FlowMatchEulerDiscreteScheduler(shift=5.0)
        sched.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25])
        outs.append(denoise_steps(model, sched, x.clone(), range(4), ctx, ctx_null, 3.5, batched_cfg=batched))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=0)


# ---- attention backend selection ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["flash_attn3", "flash_attn2", "sage_attn2"])
def test_missing_attention_kernel_falls_back_with_reason(name):
    choice = resolve_backend(name, torch.device("cuda"))  # a device object only: no GPU needed
    try:
        import flash_attn  # noqa: F401
        pytest.skip("flash-attn is installed here")
    except ImportError:
        pass
    assert choice.backend == "native"
    assert choice.requested == name and choice.reason


def test_attention_fallback_on_cpu_and_unknown_names():
    assert resolve_backend("cudnn", torch.device("cpu")).reason == "_native_cudnn needs CUDA (device is cpu)"
    assert "unknown attention type" in resolve_backend("warp_attn", torch.device("cpu")).reason
    assert resolve_backend("torch_sdpa", torch.device("cpu")).backend == "native"
    assert resolve_backend(None, torch.device("cpu")).reason is None


def test_apply_attention_sets_every_block_and_keeps_output(caplog):
    model = tiny_dit()
    x, t, ctx = inputs()
    with torch.no_grad():
        ref = model(x, t, ctx, return_dict=False)[0]
    with caplog.at_level(logging.WARNING):
        report = apply_attention(model, "flash_attn3", "torch_sdpa", torch.device("cpu"))
    assert report["self"]["backend"] == "native" and "needs CUDA" in report["self"]["reason"]
    assert "flash_attn3 unavailable" in caplog.text
    for block in model.blocks:
        assert block.attn1.processor._attention_backend.value == "native"
        assert block.attn2.processor._attention_backend.value == "native"
    with torch.no_grad():
        out = model(x, t, ctx, return_dict=False)[0]
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


# ---- fp8 / int8 quantized linears ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,tol", [(torch.float8_e4m3fn, 0.07), (torch.int8, 0.01)])
def test_row_quantization_error_is_bounded(dtype, tol):
    x = torch.randn(64, 256) * torch.logspace(-2, 2, 64).unsqueeze(1)  # rows of very different scale
    q, s = fp8_matmul.quantize_rows(x, dtype)
    assert q.dtype == dtype and s.shape == (64, 1)
    back = q.float() * s
    rel = ((back - x).abs().amax(dim=1) / x.abs().amax(dim=1))
    assert rel.max() < tol  # e4m3 has 3 mantissa bits: <= 1/16 relative; int8: <= 1/254 of the row max


def test_scaled_linear_matches_dequantized_reference():
    torch.manual_seed(3)
    lin = torch.nn.Linear(64, 48)
    x = torch.randn(2, 10, 64)
    for dtype, fn in ((torch.float8_e4m3fn, fp8_matmul.scaled_fp8_linear),
                      (torch.int8, fp8_matmul.scaled_int8_linear)):
        wq, ws = fp8_matmul.quantize_weight(lin.weight.data, dtype)
        y = fn(x, wq, ws, lin.bias.data)
        ref = F.linear(x, wq.float() * ws, lin.bias.data)
        assert y.shape == (2, 10, 48)
        torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
        # and what the GPU path computes (activation quantized per token as well) is close to the fp32 product
        xq, xs = fp8_matmul.quantize_rows(x.reshape(-1, 64), dtype)
        emulated = (xq.float() * xs) @ (wq.float() * ws).t() + lin.bias.data
        assert cosine(emulated, lin(x).reshape(-1, 48)) > 0.998


def test_quantize_blocks_keeps_model_output_close():
    model = tiny_dit(layers=2)
    x, t, ctx = inputs()
    with torch.no_grad():
        ref = model(x, t, ctx, return_dict=False)[0]
        q = copy.deepcopy(model)
        n = fp8_matmul.quantize_blocks(q)
        out = q(x, t, ctx, return_dict=False)[0]
    # per block: to_q/k/v/out of attn1 and attn2 (8) and the two FFN linears
    assert n == 2 * 10
    assert all(isinstance(m, torch.nn.Linear) is False for m in q.blocks[0].ffn.net if hasattr(m, "weight_scale"))
    assert q.blocks[0].attn1.to_q.weight.dtype == torch.float8_e4m3fn
    assert cosine(out, ref) > 0.995
    assert not torch.equal(out, ref)  # the weights really are quantized


# ---- block streaming (cpu_offload) --------------------------------------------------------------------------

def _slot_range(streamer):
    return [(s.data_ptr(), s.data_ptr() + s.numel()) for s in streamer.slots]


@pytest.mark.parametrize("granularity,resident", [("block", 0), ("block", 1), ("phase", 0), ("phase", 2)])
def test_streamed_forward_equals_resident(granularity, resident):
    model = tiny_dit()
    x, t, ctx = inputs()
    with torch.no_grad():
        ref = model(x, t, ctx, return_dict=False)[0]
    streamed_model = copy.deepcopy(model)
    streamer = BlockStreamer(streamed_model, "cpu", granularity, resident_units=resident)
    units_per_block = 1 if granularity == "block" else 3
    assert len(streamer.streamed) == 3 * units_per_block - resident
    with torch.no_grad():
        outs = [streamed_model(x, t, ctx, return_dict=False)[0] for _ in range(2)]
    for out in outs:
        assert torch.equal(out, ref)
    # the last streamed unit's weights are views of a slot, not its own copy
    last = streamer.streamed[-1]
    ptr = last.entries[0].module._parameters[last.entries[0].name].data_ptr() \
        if last.entries[0].is_param else last.entries[0].module._buffers[last.entries[0].name].data_ptr()
    assert any(lo <= ptr < hi for lo, hi in _slot_range(streamer))
    assert streamer.bytes_streamed >= 2 * sum(u.nbytes for u in streamer.streamed)


def test_remove_restores_a_usable_model():
    """After streaming stops, every unit points at its own weights again (not at a shared slot)."""
    model = tiny_dit()
    x, t, ctx = inputs()
    with torch.no_grad():
        ref = model(x, t, ctx, return_dict=False)[0]
        streamer = BlockStreamer(model, "cpu", "block")
        model(x, t, ctx, return_dict=False)
        streamer.remove()
        assert torch.equal(model(x, t, ctx, return_dict=False)[0], ref)


def test_streaming_really_reads_the_host_copy():
    """Corrupting a unit's host copy changes the output: the forward uses the streamed weights."""
    model = tiny_dit()
    x, t, ctx = inputs()
    streamer = BlockStreamer(model, "cpu", "block")
    with torch.no_grad():
        before = model(x, t, ctx, return_dict=False)[0]
        streamer.streamed[1].host.zero_()
        after = model(x, t, ctx, return_dict=False)[0]
    assert not torch.equal(before, after)


def test_lazy_load_reads_blocks_from_safetensors(tmp_path):
    from safetensors.torch import save_file

    model = tiny_dit()
    x, t, ctx = inputs()
    with torch.no_grad():
        ref = model(x, t, ctx, return_dict=False)[0]
    path = tmp_path / "dit.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    lazy = copy.deepcopy(model)
    streamer = BlockStreamer(lazy, "cpu", "phase", lazy_source=safetensors_source([str(path)]))
    assert all(u.host is None for u in streamer.streamed)  # nothing kept in RAM
    with torch.no_grad():
        for _ in range(2):
            assert torch.equal(lazy(x, t, ctx, return_dict=False)[0], ref)
    streamer.remove()


def test_lazy_load_missing_tensor_names_the_key(tmp_path):
    from safetensors.torch import save_file

    model = tiny_dit()
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("blocks.2.")}
    save_file(sd, str(tmp_path / "partial.safetensors"))
    BlockStreamer(model, "cpu", "block", lazy_source=safetensors_source([str(tmp_path / "partial.safetensors")]))
    x, t, ctx = inputs()
    with pytest.raises(RuntimeError, match="blocks.2"):
        with torch.no_grad():
            model(x, t, ctx, return_dict=False)


def test_resident_unit_plan_follows_the_budget():
    model = tiny_dit()
    block = sum(p.numel() * p.element_size() for p in model.blocks[0].parameters())
    counts = [plan_resident_units(model, "block", budget, reserve_bytes=0) for budget in
              (0, 4 * block, 6 * block, 100 * block)]
    assert counts[0] == 0 and counts[-1] == 3
    assert counts == sorted(counts) and counts[1] < counts[-1]


# ---- residency policy ---------------------------------------------------------------------------------------

def test_exclusive_models_are_never_resident_together():
    from pipeline.runtime import ModelCache

    cache = ModelCache()
    big = 1 << 40
    a = cache.get(("high", "f", "cpu", "x"), lambda: torch.nn.Linear(4, 4), big, 0, exclusive="dit")
    cache.get(("text", "f", "cpu", "x"), lambda: torch.nn.Linear(4, 4), big, 0)
    cache.get(("low", "f", "cpu", "x"), lambda: torch.nn.Linear(4, 4), big, 0, exclusive="dit")
    resident = [k[0] for k in cache._models]
    assert resident == ["text", "low"]
    assert cache.get(("high", "f", "cpu", "x"), lambda: torch.nn.Linear(4, 4), big, 0, exclusive="dit") is not a
    assert [k[0] for k in cache._models] == ["text", "high"]


def test_perf_settings_on_cpu_are_reported_not_fatal():
    from pipeline.runtime import load_fast_dit as load_dit

    model = load_dit(lambda ref, comp, dev, dt: tiny_dit(), None, "high", torch.device("cpu"), torch.float32,
                     {"cpu_offload": True, "offload_granularity": "block", "torch_compile": True,
                      "self_attn_1_type": "flash_attn3"}, budget=1 << 30)
    report = model.wan_batch_perf
    assert report["offload"].startswith("not used")
    assert report["compile"].startswith("not used")
    assert report["attention"]["self"]["backend"] == "native"


def test_perf_keys_are_known_config_keys(caplog):
    from pipeline.config import parse_config

    with caplog.at_level(logging.WARNING):
        cfg = parse_config({"torch_compile": True, "batched_cfg": False, "cpu_offload": True,
                            "offload_granularity": "phase", "self_attn_1_type": "flash_attn3"})
    assert "unknown key" not in caplog.text
    from pipeline.fast.perf import perf_runtime

    rt = perf_runtime(cfg.values)
    assert rt["torch_compile"] is True and rt["batched_cfg"] is False and rt["offload_granularity"] == "phase"
