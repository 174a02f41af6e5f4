"""lazy_load streams each block from the expert's real checkpoint, whatever its format, and equals the resident
model: diffusers folder, Wan's layout, a LightX2V block-split folder, a bf16 `*_original_ckpt`, scaled fp8 and
int8 single files, GGUF, each with and without LoRAs (applied to every tensor as it is read). The blocks are
never all in RAM (tensor bytes counted, not RSS).

Streaming runs here on the CPU (BlockStreamer's device-agnostic path); on a GPU the same source feeds the
pinned staging buffers."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from _formats import wan_t2v  # noqa: F401
from pipeline.config import parse_config
from pipeline.errors import CheckpointError
from pipeline.models.lazy import ExpertSource
from pipeline.fast.offload import BlockStreamer, stream_units
from pipeline.models.loader import load_component, resolve_model
from pipeline.testing import standins
from pipeline.tiny import DIT_CONFIG

CPU = torch.device("cpu")


def inputs(seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 2, 8, 8, generator=g)
    ctx = torch.randn(1, 9, DIT_CONFIG["text_dim"], generator=g)
    return x, torch.tensor([700.0]), ctx


def tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None or t.is_meta or t.numel() == 0:
            continue
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def model_tensors(model):
    for m in model.modules():
        yield from m._parameters.values()
        yield from m._buffers.values()


def _block_split(tiny_root, out):
    """LightX2V's block-split layout: one safetensors file per block plus one for the rest (Wan key names)."""
    from safetensors.torch import save_file

    out.mkdir()
    state = standins.wan_dit_state(tiny_root / "t2v" / "transformer")
    blocks = sorted({int(k.split(".")[1]) for k in state if k.startswith("blocks.")})
    for i in blocks:
        save_file({k: v.contiguous() for k, v in state.items() if k.startswith(f"blocks.{i}.")},
                  str(out / f"block_{i}.safetensors"))
    save_file({k: v.contiguous() for k, v in state.items() if not k.startswith("blocks.")},
              str(out / "non_block.safetensors"))
    return out


def source_config(kind: str, tiny_root, tmp_path, wan_t2v) -> dict:  # noqa: F811
    t2v = tiny_root / "t2v"
    if kind == "diffusers":
        return {"model_path": str(t2v)}
    if kind == "wan":
        return {"model_path": str(wan_t2v)}
    if kind == "block-split":
        return {"model_path": str(t2v), "high_noise_original_ckpt": str(_block_split(tiny_root, tmp_path / "split"))}
    if kind == "original-bf16":
        path = tmp_path / "high_bf16.safetensors"
        standins.write_single_file(t2v / "transformer", path, dtype=torch.bfloat16, prefix="model.diffusion_model.")
        return {"model_path": str(t2v), "high_noise_original_ckpt": str(path)}
    cfg = {"model_path": str(t2v), "dit_quantized": True}
    for key, sub in (("high_noise_quantized_ckpt", "transformer"), ("low_noise_quantized_ckpt", "transformer_2")):
        if kind == "gguf":
            path = tmp_path / f"{sub}.gguf"
            standins.write_gguf_expert(t2v / sub, path, "Q8_0")
        else:
            path = tmp_path / f"{sub}_{kind}.safetensors"
            standins.write_single_file(t2v / sub, path, scheme=kind)
        cfg[key] = str(path)
    cfg["dit_quant_scheme"] = {"fp8": "fp8-e4m3", "int8": "int8", "fp8-comfyui": "fp8-e4m3", "gguf": "gguf-Q8_0"}[kind]
    return cfg


KINDS = ["diffusers", "wan", "block-split", "original-bf16", "fp8", "int8", "fp8-comfyui", "gguf"]


@pytest.mark.parametrize("kind", KINDS)
def test_streamed_output_equals_the_resident_model(kind, tiny_root, tmp_path, wan_t2v):  # noqa: F811
    ref = resolve_model(parse_config(source_config(kind, tiny_root, tmp_path, wan_t2v)), "t2v")
    x, t, ctx = inputs()
    resident = load_component(ref, "high", CPU, torch.float32)
    with torch.no_grad():
        expected = resident(x, t, ctx, return_dict=False)[0]
    full_bytes = tensor_bytes(model_tensors(resident))
    del resident

    source = ExpertSource(ref, "high", torch.float32)
    granularity, resident_units = ("phase", 2) if kind in ("wan", "fp8") else ("block", 0)
    model = source.skeleton(granularity)
    units = stream_units(model, granularity)
    in_units = {id(t) for _, m in units for t in model_tensors(m)}
    # nothing of any unit is loaded by the skeleton: every unit tensor is on the meta device
    assert all(t.is_meta for _, m in units for t in model_tensors(m) if t is not None)
    outside = tensor_bytes(t for t in model_tensors(model) if id(t) not in in_units)
    streamer = BlockStreamer(model, CPU, granularity, resident_units=resident_units, lazy_source=source)
    with torch.no_grad():
        outs = [model(x, t, ctx, return_dict=False)[0] for _ in range(2)]
    for out in outs:
        assert torch.equal(out, expected), kind
    # RAM: the non-block weights (the skeleton loaded none of the units) and two staging buffers of one unit;
    # the two slots are the device's (VRAM on a GPU)
    unit = max(u.nbytes for u in streamer.streamed)
    assert streamer.host_bytes <= 2 * unit
    assert sum(s.numel() for s in streamer.slots) <= 2 * unit
    assert outside < full_bytes - 0.95 * sum(u.nbytes for u in streamer.units)
    assert streamer.bytes_streamed >= 2 * sum(u.nbytes for u in streamer.streamed)
    streamer.remove()
    source.close()


def test_source_reads_the_experts_own_file_not_the_base_model(tiny_root, tmp_path):
    """A separate checkpoint replaces the base model's weights: what streams is that file's tensors."""
    from safetensors.torch import save_file

    t2v = tiny_root / "t2v"
    state = standins.wan_dit_state(t2v / "transformer_2")  # the LOW expert's weights as the high expert's file
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "other.safetensors"))
    ref = resolve_model(parse_config({"model_path": str(t2v),
                                      "high_noise_original_ckpt": str(tmp_path / "other.safetensors")}), "t2v")
    low = load_component(resolve_model(parse_config({"model_path": str(t2v)}), "t2v"), "low", CPU, torch.float32)
    source = ExpertSource(ref, "high", torch.float32)
    key = "blocks.1.attn1.to_q.weight"
    assert torch.equal(source([key])[key], low.get_parameter(key))


@pytest.mark.parametrize("kind", KINDS)
def test_streamed_output_with_a_lora_equals_the_resident_model(kind, tiny_root, tmp_path, wan_t2v):  # noqa: F811
    """A LoRA is applied to each streamed tensor as the resident loader applies it at load: merged into plain
    weights, side branches on quantized linears (the `.diff` / `.diff_b` entries too), two LoRAs in order."""
    t2v = tiny_root / "t2v"
    first, second = tmp_path / "lora_a.safetensors", tmp_path / "lora_b.safetensors"
    standins.write_lora(t2v / "transformer", first, scale=0.1)
    standins.write_lora(t2v / "transformer", second, style="kohya", seed=5, alpha=2.0, diffs=False)
    cfg = {**source_config(kind, tiny_root, tmp_path, wan_t2v), "cpu_offload": True,
           "offload_granularity": "block", "lazy_load": True,
           "lora_configs": [{"name": "high_noise_model", "path": str(first), "strength": 0.8, "alpha": 2.0},
                            {"name": "high_noise_model", "path": str(second), "strength": 0.5}]}
    ref = resolve_model(parse_config(cfg), "t2v")  # accepted when the config is read, as run accepts it
    x, t, ctx = inputs()
    with torch.no_grad():
        expected = load_component(ref, "high", CPU, torch.float32)(x, t, ctx, return_dict=False)[0]
        plain = load_component(replace(ref, loras={}), "high", CPU, torch.float32)(x, t, ctx, return_dict=False)[0]
    assert not torch.allclose(expected, plain, atol=1e-4)  # the LoRA changes the output: the check can fail

    source = ExpertSource(ref, "high", torch.float32)
    model = source.skeleton("block")
    units = stream_units(model, "block")
    assert all(t.is_meta for _, m in units for t in model_tensors(m) if t is not None)
    streamer = BlockStreamer(model, CPU, "block", resident_units=1, lazy_source=source)
    with torch.no_grad():
        outs = [model(x, t, ctx, return_dict=False)[0] for _ in range(2)]
    for out in outs:
        assert torch.equal(out, expected), kind
    assert streamer.host_bytes <= 2 * max(u.nbytes for u in streamer.streamed)
    streamer.remove()
    source.close()


def test_lazy_load_with_a_lora_for_another_model_is_refused_as_the_resident_loader_refuses_it(tiny_root, tmp_path):
    from safetensors.torch import save_file

    t2v = tiny_root / "t2v"
    lora = tmp_path / "other_model_lora.safetensors"
    save_file({"diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight": torch.zeros(4, 8),
               "diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight": torch.zeros(8, 4)}, str(lora))
    cfg = {"model_path": str(t2v), "cpu_offload": True, "offload_granularity": "block", "lazy_load": True,
           "lora_configs": [{"name": "high_noise_model", "path": str(lora), "strength": 1.0}]}
    ref = resolve_model(parse_config(cfg), "t2v")
    with pytest.raises(CheckpointError, match="other_model_lora") as resident:
        load_component(ref, "high", CPU, torch.float32)
    with pytest.raises(CheckpointError, match="other_model_lora") as lazy:
        ExpertSource(ref, "high", torch.float32)
    assert str(lazy.value) == str(resident.value)
