"""GGUF DiT experts (QuantStack / ComfyUI-GGUF layout), read with the gguf package: memory-mapped, kept
quantized, dequantized per layer; Q8_0 / Q4_0 / Q4_K files written with gguf.GGUFWriter compared with the
float weights within the quant error; every type the gguf package can dequantize loads; experts in the form
city96's tools write run staged (the full-width Q4_K + Q6_K form is in test_formats_tools.py)."""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from _formats import CFG_RUN, baselines, first_frame, max_diff, staged_run, wan_i2v  # noqa: F401
from pipeline.testing import standins
from pipeline.models.dit import DitWeights, build_dit
from pipeline.models.gguf_loader import GGUFLinear, GGUFTensors, torch_dequantize

Q = gguf.GGMLQuantizationType
# Largest error of a dequantized weight, in units of the largest |w| of the tensor (random normal weights):
# Q8_0 steps are amax_block/127, Q4_0 amax_block/8 (one side can clip a full step), Q4_K ~amax_subblock/15.
QUANT_ERR = {Q.Q8_0: 0.005, Q.Q4_0: 0.13, Q.Q4_K: 0.07}
# Staged run from GGUF experts against the float experts' run: |latent difference| over |latents| (root mean
# square). Measured on the shipped tiny model (4-step CFG run): Q8_0 0.045, Q4_K_M 0.57: guidance multiplies the
# rounding at every step, and 4 bits on 128-wide rows change the tiny video outright. The same run against
# the GGUF files' own weights dequantized (what the GGUF path must compute) is held to float rounding, and
# the one-forward test below stays tight (2% / 20% of the max).
RUN_TOL = {"Q8_0": 0.1, "Q4_K_M": 1.0}


def _write(path, tensors: dict[str, tuple[np.ndarray, object]], shapes: dict[str, list[int]] | None = None):
    writer = gguf.GGUFWriter(str(path), arch="wan")
    for name, shape in (shapes or {}).items():
        writer.add_array(f"comfy.gguf.orig_shape.{name}", shape)
    for name, (data, qtype) in tensors.items():
        if qtype in (Q.F32, Q.F16):
            writer.add_tensor(name, data)
        else:
            writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_K])
def test_quantized_weight_is_within_quant_error(tmp_path, qtype):
    g = torch.Generator().manual_seed(int(qtype))
    w = torch.randn(64, 512, generator=g)
    path = _write(tmp_path / "w.gguf", {"blocks.0.ffn.0.weight": (standins.gguf_quantize(w.numpy(), qtype), qtype)})
    t = GGUFTensors(path)
    assert t.shape("blocks.0.ffn.0.weight") == (64, 512) and t.qtype("blocks.0.ffn.0.weight") == qtype
    raw = t.raw("blocks.0.ffn.0.weight")
    assert raw.dtype == torch.uint8 and raw.numel() < 2 * w.numel()  # stays quantized: fewer bytes than bf16
    deq = t.dequantize("blocks.0.ffn.0.weight")
    ref = gguf.quants.dequantize(raw.numpy(), qtype)
    assert np.array_equal(deq.numpy(), ref)  # exactly the gguf package's reference
    err = (deq - w).abs()
    assert 0 < err.max() <= QUANT_ERR[qtype] * w.abs().max()
    layer = GGUFLinear(raw, qtype, (64, 512), torch.zeros(64))
    x = torch.randn(3, 512, generator=g)
    assert torch.equal(layer(x), F.linear(x, deq, torch.zeros(64)))


def _dequantizable() -> list:
    out = []
    for t in Q:
        if t in (Q.F32, Q.F16):
            continue
        bs, ts = gguf.GGML_QUANT_SIZES[t]
        try:
            gguf.quants.dequantize(np.zeros((1, ts), dtype=np.uint8), t)
        except NotImplementedError:
            continue
        out.append(t)
    return out


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # random bytes make NaN/inf scales on purpose
def test_every_type_the_gguf_package_dequantizes_loads(tmp_path):
    types = _dequantizable()
    assert {Q.Q8_0, Q.Q4_0, Q.Q4_K, Q.Q6_K, Q.Q5_K, Q.IQ4_XS}.issubset(types)
    rng = np.random.default_rng(0)
    tensors = {}
    for t in types:
        bs, ts = gguf.GGML_QUANT_SIZES[t]
        tensors[f"w.{t.name}"] = (rng.integers(0, 256, (4, 2 * ts), dtype=np.uint8), t)
    path = _write(tmp_path / "all.gguf", tensors)
    reader = GGUFTensors(path)
    for t in types:
        key = f"w.{t.name}"
        bs, ts = gguf.GGML_QUANT_SIZES[t]
        assert reader.shape(key) == (4, 2 * bs), key
        ours = reader.dequantize(key).numpy()
        ref = gguf.quants.dequantize(tensors[key][0], t).astype(np.float32)
        assert np.array_equal(ours, ref, equal_nan=True), key  # random bytes: NaN/inf scales compare as such
        layer = GGUFLinear(reader.raw(key), reader.qtype(key), (4, 2 * bs), None)
        assert np.array_equal(layer.dequantized().numpy(), ref, equal_nan=True), key


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_K, Q.Q6_K])
def test_torch_kernels_used_on_gpu_agree_with_the_reference(qtype):
    """On CUDA the layer dequantizes with diffusers' torch kernels; they must give the gguf package's numbers
    (checked here on CPU tensors)."""
    bs, ts = gguf.GGML_QUANT_SIZES[qtype]
    if qtype in (Q.Q8_0, Q.Q4_0, Q.Q4_K):
        raw = standins.gguf_quantize(np.random.default_rng(1).standard_normal((8, 512)).astype(np.float32), qtype)
    else:  # no quantizer: random blocks with a sane fp16 super-scale (Q6_K keeps it in its last two bytes)
        raw = np.random.default_rng(1).integers(0, 256, (8, 2 * ts), dtype=np.uint8)
        raw.reshape(-1, ts)[:, -2:] = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)
    ref = gguf.quants.dequantize(raw, qtype)
    ours = torch_dequantize(torch.from_numpy(raw), qtype, ref.shape)
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-5, atol=1e-6)


def test_five_dimensional_tensor_comes_back_in_its_original_shape(tmp_path):
    w = torch.randn(64, 36, 1, 2, 2)  # the DiT's 3D patch embedding
    path = _write(tmp_path / "p.gguf", {"patch_embedding.weight": (w.reshape(-1, 256).numpy(), Q.F32)},
                  {"patch_embedding.weight": list(w.shape)})
    t = GGUFTensors(path)
    assert t.shape("patch_embedding.weight") == tuple(w.shape)
    assert torch.equal(t.dequantize("patch_embedding.weight"), w)


@pytest.mark.parametrize("quant", ["Q8_0", "Q4_K_M"])
def test_gguf_expert_builds_with_quantized_layers(tmp_path, tiny_root, quant):
    from diffusers import WanTransformer3DModel

    src = tiny_root / "i2v" / "transformer"
    standins.write_gguf_expert(src, tmp_path / "e.gguf", quant)
    weights = DitWeights(tmp_path / "e.gguf")
    assert weights.is_gguf and any(k.startswith("gguf:") for k in weights.encodings())
    import json

    cfg = {k: v for k, v in json.loads((src / "config.json").read_text()).items() if not k.startswith("_")}
    model = build_dit(cfg, weights, torch.float32)
    layers = [m for m in model.modules() if isinstance(m, GGUFLinear)]
    assert layers and all(m.qweight.dtype == torch.uint8 for m in layers)
    ref = WanTransformer3DModel.from_pretrained(src).eval()
    g = torch.Generator().manual_seed(0)
    x, c, t = torch.randn(1, 36, 2, 4, 4, generator=g), torch.randn(1, 9, cfg["text_dim"], generator=g), torch.tensor([500.0])
    with torch.no_grad():
        y, y_ref = model(x, t, c, return_dict=False)[0], ref(x, t, c, return_dict=False)[0]
    assert 0 < max_diff(y, y_ref) < {"Q8_0": 0.02, "Q4_K_M": 0.2}[quant] * float(y_ref.abs().max())


def dequantized_model(model: Path, experts: dict[str, Path], out: Path) -> Path:
    """A copy of the diffusers model folder `model` whose experts (subfolder -> GGUF file) hold the GGUF
    weights dequantized to float32: what a run from the GGUF files must compute."""
    import json
    import shutil

    from pipeline.models.dit import set_module

    shutil.copytree(model, out)
    for sub, path in experts.items():
        cfg = {k: v for k, v in json.loads((model / sub / "config.json").read_text()).items() if not k.startswith("_")}
        dit = build_dit(cfg, DitWeights(path), torch.float32)
        for name, layer in [(n, m) for n, m in dit.named_modules() if isinstance(m, GGUFLinear)]:
            plain = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
            plain.weight.data = layer.dequantized()
            if layer.bias is not None:
                plain.bias.data = layer.bias.data.float()
            set_module(dit, name, plain)
        shutil.rmtree(out / sub)
        dit.save_pretrained(out / sub, safe_serialization=True)
    return out


@pytest.mark.parametrize("quant", ["Q8_0", "Q4_K_M"])
def test_staged_run_from_gguf_experts_is_within_tolerance(tmp_path, tiny_root, baselines, wan_i2v, first_frame, quant):
    """wan_moe_i2v_gguf_*.json: GGUF experts over Wan's layout (json-only expert folders would do), against the
    run of their dequantized weights (float rounding apart) and the float model's run (quantization error)."""
    base = baselines("i2v-cfg")
    for expert, sub in (("high", "transformer"), ("low", "transformer_2")):
        standins.write_gguf_expert(tiny_root / "i2v" / sub, tmp_path / f"{expert}.gguf", quant)
    q = staged_run(tmp_path / "run", {**CFG_RUN, "model_path": str(wan_i2v), "dit_quantized": True,
                                      "dit_quant_scheme": f"gguf-{quant}",
                                      "high_noise_quantized_ckpt": str(tmp_path / "high.gguf"),
                                      "low_noise_quantized_ckpt": str(tmp_path / "low.gguf")}, first_frame)
    ref = dequantized_model(tiny_root / "i2v", {"transformer": tmp_path / "high.gguf",
                                                "transformer_2": tmp_path / "low.gguf"}, tmp_path / "dequantized")
    exact = staged_run(tmp_path / "exact", {**CFG_RUN, "model_path": str(ref)}, first_frame)
    assert max_diff(q["latents"], exact["latents"]) <= 1e-5 * float(exact["latents"].abs().max())
    diff = float((q["latents"] - base["latents"]).norm() / base["latents"].norm())
    assert 0 < diff < RUN_TOL[quant]


def test_staged_run_from_city96_form_experts(tmp_path, tiny_root, baselines, wan_i2v, first_frame):
    """Experts as city96's tools write them (bf16 source; Q4_K_M: Q6_K where the rows fill 256-value blocks and
    the name asks for it, F16 fallback where they do not, BF16 / F32 plain tensors, the 5-D patch embedding
    without orig_shape) run through wan_moe_i2v_gguf_q4_k_m.json's keys like any GGUF file."""
    base = baselines("i2v-cfg")
    for expert, sub in (("high", "transformer"), ("low", "transformer_2")):
        types = standins.write_gguf_city96(standins.wan_dit_state(tiny_root / "i2v" / sub, torch.bfloat16),
                                           tmp_path / f"{expert}.gguf", "Q4_K_M")
        assert {"Q6_K", "F16", "BF16", "F32"} <= set(types.values())
    weights = DitWeights(tmp_path / "high.gguf")
    assert weights.encodings()["gguf:Q6_K"] > 0 and weights.entries["patch_embedding.weight"].shape[2:] == (1, 1, 1)
    q = staged_run(tmp_path / "run", {**CFG_RUN, "model_path": str(wan_i2v), "dit_quantized": True,
                                      "dit_quant_scheme": "gguf-Q4_K_M",
                                      "high_noise_quantized_ckpt": str(tmp_path / "high.gguf"),
                                      "low_noise_quantized_ckpt": str(tmp_path / "low.gguf")}, first_frame)
    ref = dequantized_model(tiny_root / "i2v", {"transformer": tmp_path / "high.gguf",
                                                "transformer_2": tmp_path / "low.gguf"}, tmp_path / "dequantized")
    exact = staged_run(tmp_path / "exact", {**CFG_RUN, "model_path": str(ref)}, first_frame)
    assert max_diff(q["latents"], exact["latents"]) <= 1e-5 * float(exact["latents"].abs().max())
    diff = float((q["latents"] - base["latents"]).norm() / base["latents"].norm())
    # measured 0.092: on 128-wide rows only ffn.2 (512 wide) takes Q6_K, the rest falls back to F16 / stays BF16
    assert 0 < diff < 0.3
