"""Wan2.1 I2V (one DiT + CLIP ViT image encoder): the CLIP .pth mapping against a reference of Wan's ViT, the
staged pipeline against diffusers' WanImageToVideoPipeline, and Wan's original layout against the diffusers
layout (bit for bit)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from _formats import CFG_RUN, DISTILL_RUN, first_frame, max_diff, staged_run  # noqa: F401
from pipeline.testing import standins
from pipeline.models import wan_layout as wl

PROMPT = "a red circle moving left on a blue background"


@pytest.fixture(scope="module")
def wan21(tmp_path_factory, tiny_root):
    root = tmp_path_factory.mktemp("wan21")
    diffusers = standins.build_tiny_wan21_i2v(root / "Wan2.1-I2V-14B-480P-Diffusers")
    return diffusers, standins.write_wan_layout(diffusers, root / "Wan2.1-I2V-14B-480P")


def ref_vit(sd, x, heads, eps=1e-5):
    """Wan's open-clip VisionTransformer (pre-norm, no post-norm) up to its 31st of 32 blocks (`use_31_block`),
    written from its definition with Wan's key names."""
    w = sd["visual.patch_embedding.weight"]
    x = F.conv2d(x, w, stride=w.shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([sd["visual.cls_embedding"].expand(x.shape[0], -1, -1), x], dim=1) + sd["visual.pos_embedding"]
    d = x.shape[-1]
    x = F.layer_norm(x, (d,), sd["visual.pre_norm.weight"], sd["visual.pre_norm.bias"], eps)
    layers = len({k.split(".")[2] for k in sd if k.startswith("visual.transformer.")})
    for i in range(layers - 1):
        p = f"visual.transformer.{i}."
        y = F.layer_norm(x, (d,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps)
        q, k, v = F.linear(y, sd[p + "attn.to_qkv.weight"], sd[p + "attn.to_qkv.bias"]).chunk(3, dim=-1)
        b, n = y.shape[:2]
        q, k, v = (t.view(b, n, heads, -1).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + F.linear(y, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        y = F.layer_norm(x, (d,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps)
        x = x + F.linear(F.gelu(F.linear(y, sd[p + "mlp.0.weight"], sd[p + "mlp.0.bias"])),
                         sd[p + "mlp.2.weight"], sd[p + "mlp.2.bias"])
    return x


def test_clip_mapping_matches_a_reference_of_wans_vit(wan21):
    _, wan = wan21
    sd = torch.load(wan / wl.CLIP_FILE, weights_only=True)
    assert "textual.token_embedding.weight" in sd and "visual.transformer.0.attn.to_qkv.weight" in sd
    _, encoder = wl.load_clip(wan, torch.float32)
    pixels = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = encoder(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    expected = ref_vit(sd, pixels, encoder.config.num_attention_heads)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_clip_key_map_covers_the_full_size_vit_h():
    from accelerate import init_empty_weights
    from transformers import CLIPVisionConfig, CLIPVisionModel

    with init_empty_weights():
        model = CLIPVisionModel(CLIPVisionConfig(**wl.CLIP_VIT_H14))
    pre = wl.clip_prefix(model)
    fused = (".q_proj.", ".k_proj.", ".v_proj.")  # Wan stores them as one to_qkv
    keys = [k for k, _ in model.named_parameters() if "post_layernorm" not in k and not any(f in k for f in fused)]
    wan = {wl.clip_key_to_wan(k) for k in keys}
    assert None not in wan and len(wan) == len(keys)
    assert f"{pre}encoder.layers.31.self_attn.q_proj.weight" in dict(model.named_parameters())


@pytest.mark.slow
def test_staged_wan21_i2v_matches_diffusers_pipeline(tmp_path, wan21, first_frame):
    from diffusers import UniPCMultistepScheduler, WanImageToVideoPipeline

    from pipeline.stages.image import load_image_rgb, resize_center_crop

    diffusers, _ = wan21
    v = {**CFG_RUN, "sample_guide_scale": 5.0, "sample_shift": 3.0, "model_path": str(diffusers)}
    ours = staged_run(tmp_path, v, first_frame)
    assert ours["image"]["clip"].shape == (1, 17, 32)  # [1, 257, 1280] at full size
    pipe = WanImageToVideoPipeline.from_pretrained(diffusers, torch_dtype=torch.float32)
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config, flow_shift=3.0)
    h, w = v["target_height"], v["target_width"]
    image = resize_center_crop(load_image_rgb(str(first_frame)), w, h)
    ref = pipe(image=image, prompt=PROMPT, negative_prompt="", height=h, width=w,
               num_frames=v["target_video_length"], num_inference_steps=v["infer_steps"], guidance_scale=5.0,
               max_sequence_length=512, generator=torch.Generator("cpu").manual_seed(7), output_type="latent").frames
    assert max_diff(ours["latents"], ref) < 1e-4  # same ops on the same CPU: float32 rounding at most


def test_wan21_original_layout_equals_diffusers_layout_bitwise(tmp_path, wan21, first_frame):
    diffusers, wan = wan21
    v = {**DISTILL_RUN, "sample_guide_scale": 5.0}
    a = staged_run(tmp_path / "d", {**v, "model_path": str(diffusers)}, first_frame)
    b = staged_run(tmp_path / "w", {**v, "model_path": str(wan)}, first_frame)
    assert torch.equal(a["image"]["clip"], b["image"]["clip"])
    assert torch.equal(a["latents"], b["latents"])
    assert a["video"] == b["video"]


def test_wan21_distilled_fp8_single_file_runs_within_tolerance(tmp_path, wan21, first_frame):
    """wan_i2v_480p_distill_fp8.json's shape: a LightX2V scaled-fp8 DiT file over Wan2.1's original layout."""
    diffusers, wan = wan21
    fp8 = tmp_path / "wan2.1_i2v_480p_scaled_fp8_e4m3_lightx2v_4step.safetensors"
    standins.write_single_file(diffusers / "transformer", fp8, "fp8")
    base = staged_run(tmp_path / "b", {**DISTILL_RUN, "model_path": str(wan)}, first_frame)
    q = staged_run(tmp_path / "q", {**DISTILL_RUN, "model_path": str(wan), "dit_quantized": True,
                                     "dit_quant_scheme": "fp8-sgl", "dit_quantized_ckpt": str(fp8)}, first_frame)
    scale = float(base["latents"].abs().max())
    assert 0 < max_diff(q["latents"], base["latents"]) < 0.02 * scale  # as in test_quant.RUN_TOL["fp8"]
