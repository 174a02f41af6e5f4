"""lazy_load on a GPU, through the stage's own loader (runtime.load_fast_dit): pinned staging, the copy stream and
the reading thread, from each kind of checkpoint, equal to the resident expert on the same GPU."""
from __future__ import annotations

import pytest
import torch

from _formats import wan_t2v  # noqa: F401
from pipeline.config import parse_config
from pipeline.runtime import load_fast_dit as load_dit
from pipeline.models.loader import load_component, resolve_model
from test_lazy_load import inputs, source_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
CUDA = torch.device("cuda")


@pytest.mark.parametrize("kind,granularity", [("diffusers", "block"), ("wan", "phase"), ("fp8", "block"),
                                              ("gguf", "phase")])
def test_lazy_stream_on_gpu_equals_resident(kind, granularity, tiny_root, tmp_path, wan_t2v):  # noqa: F811
    ref = resolve_model(parse_config(source_config(kind, tiny_root, tmp_path, wan_t2v)), "t2v")
    x, t, ctx = (v.to(CUDA) for v in inputs())
    resident = load_component(ref, "high", CUDA, torch.float32)
    with torch.no_grad():
        expected = resident(x, t, ctx, return_dict=False)[0]
    del resident
    runtime = {"cpu_offload": True, "offload_granularity": granularity, "lazy_load": True,
               "activation_reserve_gb": 0, "self_attn_1_type": "torch_sdpa"}
    model = load_dit(load_component, ref, "high", CUDA, torch.float32, runtime, budget=0)
    report = model.wan_batch_perf["offload"]
    assert report["lazy_load"] and report["resident_units"] == 0 and report["streamed_units"] > 0
    assert report["lazy_source"] == ref.dits["high"]["weights"]
    with torch.no_grad():
        for _ in range(2):
            out = model(x, t, ctx, return_dict=False)[0]
            torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    model.wan_batch_streamer.remove()


@pytest.mark.parametrize("kind", ["diffusers", "fp8"])
def test_lazy_stream_with_a_lora_on_gpu_equals_resident(kind, tiny_root, tmp_path, wan_t2v):  # noqa: F811
    """LoRA merged into plain streamed weights (diffusers) and as float32 side branches streamed with the
    quantized blocks (fp8), through pinned staging and the copy stream."""
    from pipeline.testing import standins

    lora = tmp_path / "lora.safetensors"
    standins.write_lora(tiny_root / "t2v" / "transformer", lora, scale=0.1)
    cfg = {**source_config(kind, tiny_root, tmp_path, wan_t2v),
           "lora_configs": [{"name": "high_noise_model", "path": str(lora), "strength": 0.7}]}
    ref = resolve_model(parse_config(cfg), "t2v")
    x, t, ctx = (v.to(CUDA) for v in inputs())
    resident = load_component(ref, "high", CUDA, torch.float32)
    with torch.no_grad():
        expected = resident(x, t, ctx, return_dict=False)[0]
    del resident
    runtime = {"cpu_offload": True, "offload_granularity": "block", "lazy_load": True,
               "activation_reserve_gb": 0, "self_attn_1_type": "torch_sdpa"}
    model = load_dit(load_component, ref, "high", CUDA, torch.float32, runtime, budget=0)
    assert model.wan_batch_perf["offload"]["lazy_load"]
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(model(x, t, ctx, return_dict=False)[0], expected, atol=1e-5, rtol=0)
    model.wan_batch_streamer.remove()
