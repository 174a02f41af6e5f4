"""LightX2V's quantized T5 and CLIP encoders (t5_quantized / clip_quantized + *_quant_scheme + *_quantized_ckpt).

The fixtures are Wan's .pth files of the tiny models (bf16 T5, fp16 CLIP, as the real files) put through a
writer of LightX2V's converter (standins.converter_quantize: tools/convert/converter.py's algorithm). Our
encoders, loaded through the pipeline, are compared with a reference of LightX2V's encoders written here from
lightx2v/models/input_encoders/hf/wan/t5/model.py and xlm_roberta/model.py, reading the quantized state dict
directly, with the quantized linear math of q_linear.py (per-channel weight scale, per-token dynamic activation
quantization); and with the unquantized encoders, whose error is printed (pytest -s).
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import make_image
from pipeline.check_config import check_config
from pipeline.config import parse_config
from pipeline.errors import CheckpointError, ConfigError
from pipeline.manifest import Job
from pipeline.models import loader as ld
from pipeline.models import wan_layout as wl
from pipeline.plan import Planner
from pipeline.testing import standins

FP8 = torch.float8_e4m3fn
CPU = torch.device("cpu")
T5_NAME = "models_t5_umt5-xxl-enc-{}.pth"
CLIP_NAME = "models_clip_open-clip-xlm-roberta-large-vit-huge-14-{}.pth"


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def t5_model(tmp_path_factory, tiny_root) -> Path:
    """The tiny Wan2.2 T2V in Wan's layout with a bf16 T5 (as Wan ships it), plus LightX2V's quantized T5
    files where LightX2V looks for them: fp8/ and int8/ of the model folder."""
    folder = standins.write_wan_layout(tiny_root / "t2v", tmp_path_factory.mktemp("t5q") / "Wan2.2-T2V-A14B",
                                       torch.bfloat16)
    for kind in ("fp8", "int8"):
        (folder / kind).mkdir()
        standins.write_quantized_encoder(folder / wl.T5_FILE, folder / kind / T5_NAME.format(kind), kind)
    return folder


@pytest.fixture(scope="module")
def clip_model(tmp_path_factory) -> Path:
    """A tiny Wan2.1 I2V in Wan's layout with an fp16 CLIP .pth and its quantized files at the folder's top."""
    root = tmp_path_factory.mktemp("clipq")
    diffusers = standins.build_tiny_wan21_i2v(root / "Wan2.1-I2V-14B-480P-Diffusers")
    folder = standins.write_wan_layout(diffusers, root / "Wan2.1-I2V-14B-480P", torch.bfloat16)
    sd = torch.load(folder / wl.CLIP_FILE, weights_only=True)
    torch.save({k: v.half() for k, v in sd.items()}, folder / wl.CLIP_FILE)
    for kind in ("fp8", "int8"):
        standins.write_quantized_encoder(folder / wl.CLIP_FILE, folder / CLIP_NAME.format(kind), kind)
    return folder


def _ref(folder: Path, task: str = "t2v", **cfg):
    return ld.resolve_model(parse_config({"model_path": str(folder), **cfg}), task)


def _t5(folder: Path, dtype=torch.float32, **cfg):
    return ld.load_component(_ref(folder, **cfg), "text", CPU, dtype)[1]


def _clip(folder: Path, **cfg):
    return ld.load_component(_ref(folder, "i2v", **cfg), "clip", CPU, torch.float32)[1]


def _errors(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    a, b = a.float().flatten(), b.float().flatten()
    return float((a - b).abs().max()), float(F.cosine_similarity(a, b, dim=0))


# ------------------------------------------------------------------ a reference of LightX2V's quantized encoders
def lx_act_quant(x: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token dynamic activation quantization of LightX2V's kernels (sgl_per_token_quant_fp8 /
    vllm scaled_fp8_quant per token; vllm scaled_int8_quant symmetric): scale = row absmax / qmax in float32."""
    x = x.float()
    absmax = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-10)
    if kind == "fp8":
        scale = absmax / 448.0
        return torch.clamp(x / scale, -448.0, 448.0).to(FP8), scale
    return torch.round(x * (127.0 / absmax)).clamp(-128, 127).to(torch.int8), absmax / 127.0


def lx_linear(x: torch.Tensor, sd: dict, key: str, kind: str | None, bias: str | None = None) -> torch.Tensor:
    """q_linear.py's forward: (x_q @ w_q^T) * x_scale * w_scale (+ bias), accumulated in float32, returned in
    x's dtype; kind None: the plain nn.Linear of the unquantized file (kind 'a16': the quantized weight
    dequantized, the activation left alone: what a weight-only layer would compute)."""
    b = sd[bias].float() if bias else None
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if kind is None:
        y = x2.float() @ sd[key].float().t()
    elif kind == "a16":
        y = x2.float() @ (sd[key].float() * sd[key + "_scale"].float()).t()
    else:
        xq, xs = lx_act_quant(x2, kind)
        y = (xq.float() @ sd[key].float().t()) * xs * sd[key + "_scale"].float().t()
    if b is not None:
        y = y + b
    return y.to(x.dtype).reshape(*shape[:-1], -1)


def lx_t5(sd: dict, ids: torch.Tensor, mask: torch.Tensor, kind: str | None, arch: dict, dtype) -> torch.Tensor:
    """LightX2V's T5Encoder.forward_without_offload (t5/model.py): T5LayerNorm, un-scaled attention with each
    block's relative position bias, fc1(x) * tanh-GELU(gate(x)) -> fc2, all in `dtype` but the norms' and
    the softmax's float32 math, the linears per lx_linear."""
    heads, nb, max_dist, eps = (arch["num_heads"], arch["relative_attention_num_buckets"],
                                arch["relative_attention_max_distance"], arch["layer_norm_epsilon"])

    def norm(x, w):
        x = x * torch.rsqrt(x.float().pow(2).mean(dim=-1, keepdim=True) + eps)
        return w.to(dtype) * x.type_as(w.to(dtype))

    def bucket(rel):
        half = nb // 2
        out = (rel > 0).long() * half
        rel = rel.abs()
        exact = half // 2
        large = exact + (torch.log(rel.float() / exact) / math.log(max_dist / exact) * (half - exact)).long()
        large = torch.min(large, torch.full_like(large, half - 1))
        return out + torch.where(rel < exact, rel, large)

    x = sd["token_embedding.weight"].to(dtype)[ids]
    b, n = ids.shape
    rel = torch.arange(n)[None, :] - torch.arange(n)[:, None]
    layers = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(layers):
        p = f"blocks.{i}."
        pos = sd[p + "pos_embedding.embedding.weight"].to(dtype)[bucket(rel)].permute(2, 0, 1).unsqueeze(0)
        y = norm(x, sd[p + "norm1.weight"])
        q, k, v = (lx_linear(y, sd, p + f"attn.{t}.weight", kind).view(b, n, heads, -1) for t in "qkv")
        bias = x.new_zeros(b, heads, n, n) + pos
        bias = bias.masked_fill(mask.view(b, 1, 1, n) == 0, torch.finfo(dtype).min)
        att = torch.einsum("binc,bjnc->bnij", q, k) + bias
        att = F.softmax(att.float(), dim=-1).type_as(att)
        y = torch.einsum("bnij,bjnc->binc", att, v).reshape(b, n, -1)
        x = x + lx_linear(y, sd, p + "attn.o.weight", kind)
        y = norm(x, sd[p + "norm2.weight"])
        g = lx_linear(y, sd, p + "ffn.gate.0.weight", kind)
        g = 0.5 * g * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (g + 0.044715 * torch.pow(g, 3.0))))
        x = x + lx_linear(lx_linear(y, sd, p + "ffn.fc1.weight", kind) * g, sd, p + "ffn.fc2.weight", kind)
    return norm(x, sd["norm.weight"])


def lx_vit(sd: dict, pixels: torch.Tensor, kind: str | None, heads: int, eps: float = 1e-5) -> torch.Tensor:
    """LightX2V's CLIP VisionTransformer.forward(use_31_block=True) (xlm_roberta/model.py): patch conv, cls +
    positions, pre-norm, every block but the last (norm1 -> to_qkv -> SDPA -> proj, norm2 -> mlp.0 -> GELU ->
    mlp.2), with to_qkv, proj, mlp.0 and mlp.2 as lx_linear (one activation quantization for q, k and v)."""
    w = sd["visual.patch_embedding.weight"].float()
    x = F.conv2d(pixels, w, stride=w.shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([sd["visual.cls_embedding"].float().expand(x.shape[0], -1, -1), x], dim=1)
    x = x + sd["visual.pos_embedding"].float()
    d = x.shape[-1]

    def ln(x, name):
        return F.layer_norm(x.float(), (d,), sd[name + ".weight"].float(), sd[name + ".bias"].float(), eps)

    x = ln(x, "visual.pre_norm")
    layers = len({k.split(".")[2] for k in sd if k.startswith("visual.transformer.")})
    for i in range(layers - 1):
        p = f"visual.transformer.{i}."
        b, s = x.shape[:2]
        qkv = lx_linear(ln(x, p + "norm1"), sd, p + "attn.to_qkv.weight", kind, p + "attn.to_qkv.bias")
        q, k, v = (t.transpose(1, 2) for t in qkv.view(b, s, 3, heads, -1).unbind(2))
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, d)
        x = x + lx_linear(y, sd, p + "attn.proj.weight", kind, p + "attn.proj.bias")
        y = F.gelu(lx_linear(ln(x, p + "norm2"), sd, p + "mlp.0.weight", kind, p + "mlp.0.bias"))
        x = x + lx_linear(y, sd, p + "mlp.2.weight", kind, p + "mlp.2.bias")
    return x


# ------------------------------------------------------------------------------------ the converter's files
def test_fixture_rounds_fp8_as_qtorch_does():
    """The converter rounds with qtorch (half away from zero, subnormals on e4m3's grid), not torch's cast
    (half to even): the writer must too, or its files are not the converter's."""
    e4m3 = torch.arange(256, dtype=torch.uint8).view(FP8).float()
    e4m3 = e4m3[e4m3.isfinite()]
    assert torch.equal(standins.qtorch_e4m3(e4m3), e4m3)  # representable values stay
    ties = torch.tensor([1.0625, -1.0625, 2.0 ** -10, 3 * 2.0 ** -10, 440.0])
    assert standins.qtorch_e4m3(ties).tolist() == [1.125, -1.125, 2.0 ** -9, 2.0 ** -8, 448.0]
    assert ties.to(FP8).float().tolist() == [1.0, -1.0, 0.0, 2.0 ** -8, 448.0]  # torch's cast differs on ties


@pytest.mark.parametrize("kind", ["fp8", "int8"])
def test_quantized_t5_file_is_what_the_converter_writes(t5_model, kind):
    src = torch.load(t5_model / wl.T5_FILE, weights_only=True)
    q = torch.load(t5_model / kind / T5_NAME.format(kind), weights_only=True)
    linears = {k for k in src if k.split(".")[2:3] in (["attn"], ["ffn"])}
    assert len(linears) == 7 * 2  # q, k, v, o, gate.0, fc1, fc2 of both blocks
    assert set(q) == set(src) | {k + "_scale" for k in linears}
    for k in linears:
        w, s = src[k].float(), q[k + "_scale"]
        assert q[k].dtype == (FP8 if kind == "fp8" else torch.int8)
        assert s.dtype == torch.bfloat16 and s.shape == (w.shape[0], 1)  # the source's dtype, one per row
        peaks = q[k].float().abs().amax(dim=1)  # each row's largest weight maps to the top of the range
        if kind == "fp8":
            assert torch.all(peaks == 448)
        else:  # 127, or 126 / 128 where the bf16 division rounds (the converter computes in the source dtype)
            assert torch.all((peaks >= 126) & (peaks <= 128)) and (peaks == 127).float().mean() > 0.5
        torch.testing.assert_close(q[k].float() * s.float(), w, atol=float(s.float().max()), rtol=0.07)
    assert all(q[k].dtype == torch.bfloat16 for k in src if k not in linears)


def test_quantized_clip_file_drops_the_text_tower(clip_model):
    q = torch.load(clip_model / CLIP_NAME.format("fp8"), weights_only=True)
    assert not any("textual" in k for k in q)
    assert q["visual.transformer.0.attn.to_qkv.weight"].dtype == FP8
    assert q["visual.transformer.0.attn.to_qkv.weight_scale"].dtype == torch.float16
    assert q["visual.transformer.0.attn.to_qkv.bias"].dtype == torch.float16  # 1-D: not quantized
    assert q["visual.patch_embedding.weight"].dtype == torch.float16
    assert {k.rsplit(".", 2)[-2] for k in q if k.endswith("weight_scale")} == {"to_qkv", "proj", "0", "2"}


# --------------------------------------------------------------------------------------------- the encoders
def _t5_inputs(arch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, arch["vocab_size"], (2, 70), generator=g)  # 70 tokens: log-spaced buckets too
    mask = torch.ones(2, 70, dtype=torch.long)
    mask[1, 40:] = 0
    return ids, mask


@pytest.mark.parametrize("scheme", ["fp8-sgl", "int8-vllm"])
def test_quantized_t5_matches_lightx2vs_math(t5_model, scheme):
    kind = scheme.split("-")[0]
    encoder = _t5(t5_model, t5_quantized=True, t5_quant_scheme=scheme)
    assert sum(type(m).__name__ == "W8A8Linear" for m in encoder.modules()) == 14
    qsd = torch.load(t5_model / kind / T5_NAME.format(kind), weights_only=True)
    arch = json.loads((t5_model / (wl.T5_FILE + ".config.json")).read_text())
    ids, mask = _t5_inputs(arch)
    with torch.no_grad():
        ours = encoder(ids, mask).last_hidden_state
        plain = _t5(t5_model)(ids, mask).last_hidden_state
    valid = mask.bool()
    ours, plain = ours[valid], plain[valid]
    to_ref = _errors(ours, lx_t5(qsd, ids, mask, kind, arch, torch.float32)[valid])
    to_a16 = _errors(ours, lx_t5(qsd, ids, mask, "a16", arch, torch.float32)[valid])
    to_plain = _errors(ours, plain)
    print(f"\nT5 {scheme}: vs LightX2V's math max abs {to_ref[0]:.2e} cos {to_ref[1]:.7f}; "
          f"vs unquantized max abs {to_plain[0]:.3f} cos {to_plain[1]:.5f}; vs weight-only {to_a16[0]:.3f}")
    assert to_ref[0] <= 1e-5 and to_ref[1] > 0.999999
    # quantization is real (it moves the output) and the activation is quantized too (not weight-only)
    assert to_plain[0] > 100 * to_ref[0] and to_plain[1] > (0.998 if kind == "fp8" else 0.9998)
    assert to_a16[0] > 100 * to_ref[0]


@pytest.mark.parametrize("scheme", ["fp8-sgl", "int8-vllm"])
def test_quantized_t5_in_bf16(t5_model, scheme):
    """In bf16 (a CUDA run's dtype, LightX2V's T5 dtype) the quantized encoder stays close to its fp32 self;
    its distance to the unquantized bf16 encoder is printed. (Bit-level agreement with the reference is checked
    in fp32: in bf16 a rounding step of either side moves values across quantization boundaries.)"""
    arch = json.loads((t5_model / (wl.T5_FILE + ".config.json")).read_text())
    ids, mask = _t5_inputs(arch)
    cfg = {"t5_quantized": True, "t5_quant_scheme": scheme}
    with torch.no_grad():
        ours = _t5(t5_model, torch.bfloat16, **cfg)(ids, mask).last_hidden_state
        fp32 = _t5(t5_model, **cfg)(ids, mask).last_hidden_state
        plain = _t5(t5_model, torch.bfloat16)(ids, mask).last_hidden_state
    valid = mask.bool()
    assert ours.dtype == torch.bfloat16
    to_fp32, to_plain = _errors(ours[valid], fp32[valid]), _errors(ours[valid], plain[valid])
    print(f"\nT5 {scheme} bf16: vs its fp32 run max abs {to_fp32[0]:.3f} cos {to_fp32[1]:.5f}; "
          f"vs unquantized bf16 max abs {to_plain[0]:.3f} cos {to_plain[1]:.5f}")
    assert to_fp32[1] > 0.999 and to_plain[1] > 0.998


@pytest.mark.parametrize("scheme", ["fp8-q8f", "int8-torchao"])
def test_quantized_clip_matches_lightx2vs_math(clip_model, scheme):
    kind = scheme.split("-")[0]
    encoder = _clip(clip_model, clip_quantized=True, clip_quant_scheme=scheme)
    assert sum(type(m).__name__ == "W8A8Linear" for m in encoder.modules()) == 3 * 6  # q, k, v, out, fc1, fc2
    qsd = torch.load(clip_model / CLIP_NAME.format(kind), weights_only=True)
    pixels = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = encoder(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        plain = _clip(clip_model)(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    heads = encoder.config.num_attention_heads
    to_ref = _errors(ours, lx_vit(qsd, pixels, kind, heads))
    to_plain = _errors(ours, plain)
    to_a16 = _errors(ours, lx_vit(qsd, pixels, "a16", heads))
    print(f"\nCLIP {scheme}: vs LightX2V's math max abs {to_ref[0]:.2e} cos {to_ref[1]:.6f}; "
          f"vs unquantized max abs {to_plain[0]:.3f} cos {to_plain[1]:.5f}")
    assert to_ref[0] <= 1e-5 and to_ref[1] > 0.999999
    assert to_plain[0] > 1e-3 and to_plain[1] > 0.999
    assert to_a16[0] > 1e-3


def test_kernel_suffixes_load_the_same_encoder(t5_model, tmp_path):
    """fp8, fp8-sgl, fp8-q8f, ... name LightX2V's kernels for one weight file and one computation; the
    converter's .safetensors output (named by t5_quantized_ckpt) loads the same numbers as its .pth."""
    ids, mask = torch.randint(3, 200, (1, 12)), torch.ones(1, 12, dtype=torch.long)
    st = standins.write_quantized_encoder(t5_model / wl.T5_FILE, tmp_path / "t5-fp8.safetensors", "fp8")
    outs = []
    for cfg in ({"t5_quant_scheme": "fp8"}, {"t5_quant_scheme": "fp8-q8f"}, {"t5_quant_scheme": "fp8-triton"},
                {"t5_quant_scheme": "fp8-vllm", "t5_quantized_ckpt": str(st)}):
        with torch.no_grad():
            outs.append(_t5(t5_model, t5_quantized=True, **cfg)(ids, mask).last_hidden_state)
    assert all(torch.equal(outs[0], o) for o in outs[1:])


def test_a_diffusers_layout_model_takes_the_same_quantized_file(t5_model, tiny_root):
    """The quantized file is in Wan's names whatever the model folder's layout; with a diffusers-layout folder
    the tokenizer and architecture come from its tokenizer/ and text_encoder/config.json."""
    ckpt = str(t5_model / "int8" / T5_NAME.format("int8"))
    ids, mask = torch.randint(3, 200, (1, 12)), torch.ones(1, 12, dtype=torch.long)
    cfg = {"t5_quantized": True, "t5_quant_scheme": "int8", "t5_quantized_ckpt": ckpt}
    ref = _ref(tiny_root / "t2v", **cfg)
    assert ref.format == "diffusers" and ref.encoders["text"]["weights"] == ckpt
    with torch.no_grad():
        a = ld.load_component(ref, "text", CPU, torch.float32)[1](ids, mask).last_hidden_state
        b = _t5(t5_model, **cfg)(ids, mask).last_hidden_state
    assert torch.equal(a, b)


def test_text_and_image_keys_follow_the_quantized_encoders(t5_model, clip_model, tmp_path):
    """A quantized encoder gives other numbers: its artifacts get their own keys (per weight format: the
    kernel suffix does not change them); the bf16 keys stay what they were."""
    def keys(folder, task="t2v", **cfg):
        config = parse_config({"model_path": str(folder), "infer_steps": 2, "target_video_length": 5,
                               "target_height": 32, "target_width": 32, "device": "cpu", **cfg})
        image = str(make_image(tmp_path / "in.png")) if task == "i2v" else None
        plan = Planner(config).plan(Job(row=0, job_id="a", prompt="a red circle", negative_prompt=None,
                                        image=image, seed=1))
        assert plan.decode is not None, plan.error
        stages = plan.stages()
        return stages["text"].key, stages.get("image") and stages["image"].key

    plain = keys(t5_model)
    fp8 = keys(t5_model, t5_quantized=True, t5_quant_scheme="fp8-sgl")
    assert fp8[0] != plain[0]
    assert keys(t5_model, t5_quantized=True, t5_quant_scheme="fp8-q8f") == fp8
    assert keys(t5_model, t5_quantized=True, t5_quant_scheme="int8")[0] not in (plain[0], fp8[0])
    assert keys(t5_model, t5_quantized=False, t5_quant_scheme="int8-npu") == plain  # not read when off
    i2v = keys(clip_model, "i2v")
    clip8 = keys(clip_model, "i2v", clip_quantized=True, clip_quant_scheme="fp8")
    assert clip8[0] == i2v[0] and clip8[1] != i2v[1]


def test_text_stage_writes_the_quantized_context(t5_model, tmp_path):
    from pipeline.execute import run_spec
    from pipeline.stages.text import encode_text
    from pipeline.store import ArtifactStore

    config = parse_config({"model_path": str(t5_model), "device": "cpu", "t5_quantized": True,
                           "t5_quant_scheme": "int8-q8f", "text_len": 32})
    plan = Planner(config).plan(Job(row=0, job_id="a", prompt="a red circle", negative_prompt=None, image=None,
                                    seed=1))
    spec = plan.stages()["text"]
    store = ArtifactStore(tmp_path / "store")
    run_spec(spec, store)
    context = store.load_tensors(spec.ref)["context"]
    tokenizer, encoder = ld.load_component(ld.ModelRef.from_dict(spec.model), "text", CPU, torch.float32)
    expected, _ = encode_text(tokenizer, encoder, "a red circle", 32)
    plain, _ = encode_text(tokenizer, _t5(t5_model), "a red circle", 32)
    assert torch.equal(context, expected) and not torch.equal(context, plain)


def test_image_stage_writes_the_quantized_clip_features(clip_model, tmp_path):
    from pipeline.execute import run_spec
    from pipeline.stages.image import encode_image_clip, load_image_rgb, resize_center_crop
    from pipeline.store import ArtifactStore

    image = make_image(tmp_path / "in.png")
    config = parse_config({"model_path": str(clip_model), "device": "cpu", "clip_quantized": True,
                           "clip_quant_scheme": "int8-q8f", "target_video_length": 5, "target_height": 32,
                           "target_width": 32})
    plan = Planner(config).plan(Job(row=0, job_id="a", prompt="a red circle", negative_prompt=None,
                                    image=str(image), seed=1))
    spec = plan.stages()["image"]
    store = ArtifactStore(tmp_path / "store")
    run_spec(spec, store)
    clip = store.load_tensors(spec.ref)["clip"]
    frame = resize_center_crop(load_image_rgb(str(image)), 32, 32)
    processor, encoder = ld.load_component(ld.ModelRef.from_dict(spec.model), "clip", CPU, torch.float32)
    assert torch.equal(clip, encode_image_clip(processor, encoder, frame))
    assert not torch.equal(clip, encode_image_clip(processor, _clip(clip_model), frame))


# ------------------------------------------------------------------------------- finding the files, refusing
def test_found_where_lightx2v_looks_first(t5_model, tmp_path):
    """find_torch_model_path's order: distill_int8/, distill_fp8/, distill_models/, int8/, fp8/, original/,
    then the model folder itself; *_quantized_ckpt wins over all of them."""
    folder = tmp_path / "model"
    shutil.copytree(t5_model, folder)
    name = T5_NAME.format("fp8")

    def found():
        return _ref(folder, t5_quantized=True, t5_quant_scheme="fp8").encoders["text"]["weights"]

    assert found() == str(folder / "fp8" / name)
    for sub in ("original", "distill_models"):
        (folder / sub).mkdir()
        shutil.copy(folder / "fp8" / name, folder / sub / name)
    assert found() == str(folder / "distill_models" / name)
    ckpt = tmp_path / "elsewhere.pth"
    shutil.copy(folder / "fp8" / name, ckpt)
    src = _ref(folder, t5_quantized=True, t5_quant_scheme="fp8", t5_quantized_ckpt=str(ckpt)).encoders["text"]
    assert src["weights"] == str(ckpt) and src["kind"] == "fp8"


def _check(tmp_path: Path, model: Path, **cfg):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    return check_config(path, str(model))


def test_check_config_refuses_a_missing_quantized_t5_naming_the_file(t5_model, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(t5_model, folder, ignore=shutil.ignore_patterns("fp8"))
    report = _check(tmp_path, folder, t5_quantized=True, t5_quant_scheme="fp8-sgl")
    assert len(report.problems) == 1, report.text()
    problem = report.problems[0]
    assert "models_t5_umt5-xxl-enc-fp8.pth" in problem and "fp8/" in problem and "t5_quantized_ckpt" in problem
    with pytest.raises(CheckpointError) as run:  # a run refuses it with the same words
        _ref(folder, t5_quantized=True, t5_quant_scheme="fp8-sgl")
    assert str(run.value) in problem
    report = _check(tmp_path, folder, t5_quantized=True, t5_quant_scheme="fp8", t5_quantized_ckpt="no/t5.pth")
    assert "no/t5.pth (from t5_quantized_ckpt)" in report.problems[0]


def test_check_config_reports_the_resolved_quantized_files(t5_model, clip_model, tmp_path):
    report = _check(tmp_path, t5_model, t5_quantized=True, t5_quant_scheme="int8-q8f")
    assert not report.problems, report.text()
    line = next(x for x in report.lines if x.strip().startswith("text"))
    assert "int8/models_t5_umt5-xxl-enc-int8.pth" in line and "14 W8A8 linears" in line
    report = _check(tmp_path, clip_model, clip_quantized=True, clip_quant_scheme="fp8-sgl",
                    t5_quantized_ckpt=str(t5_model / "fp8" / T5_NAME.format("fp8")))
    assert not report.problems, report.text()
    assert any(x.strip().startswith("clip") and CLIP_NAME.format("fp8") in x and "18 W8A8" in x for x in report.lines)
    assert any("t5_quantized_ckpt is set but t5_quantized is not true" in w for w in report.warnings)


@pytest.mark.parametrize("cfg, words", [
    ({"t5_quantized": True}, "no t5_quant_scheme"),
    ({"t5_quantized": True, "t5_quant_scheme": "int8-npu"}, "Ascend NPU"),
    ({"t5_quantized": True, "t5_quant_scheme": "fp8-intel-xpu"}, "weight-only"),
    ({"clip_quantized": True, "clip_quant_scheme": "int8-tmo"}, "Cambricon"),
    ({"t5_quantized": True, "t5_quant_scheme": "nvfp4"}, "NotImplementedError"),
])
def test_schemes_we_do_not_run_are_refused_naming_the_key(t5_model, tmp_path, cfg, words):
    key = next(k for k in cfg if k.endswith("_quantized")).replace("_quantized", "_quant_scheme")
    report = _check(tmp_path, t5_model, **cfg)
    assert report.problems and report.problems[0].startswith(f"config key '{key}'") and words in report.problems[0]
    with pytest.raises(ConfigError):
        parse_config({"model_path": str(t5_model), **cfg})


def test_a_file_that_does_not_fit_the_scheme_is_refused(t5_model, tmp_path):
    int8 = str(t5_model / "int8" / T5_NAME.format("int8"))
    report = _check(tmp_path, t5_model, t5_quantized=True, t5_quant_scheme="fp8-sgl", t5_quantized_ckpt=int8)
    assert "t5_quant_scheme is fp8-sgl but models_t5_umt5-xxl-enc-int8.pth holds int8 weights" in report.problems[0]
    bf16 = str(t5_model / wl.T5_FILE)
    report = _check(tmp_path, t5_model, t5_quantized=True, t5_quant_scheme="int8", t5_quantized_ckpt=bf16)
    assert "holds no quantized weights" in report.problems[0]
    with pytest.raises(CheckpointError, match="holds no quantized weights"):
        _t5(t5_model, t5_quantized=True, t5_quant_scheme="int8", t5_quantized_ckpt=bf16)
