"""Wan2.1 T2V (1.3B and 14B: one DiT, no image encoder, no expert switch): detected in the diffusers layout and
in Wan's original layout, the staged run equal to diffusers' WanPipeline on the same weights, the original
layout equal to the diffusers layout bit for bit, LightX2V's distilled single file, and a LoRA on its one DiT."""
from __future__ import annotations

import json

import pytest
import torch

from _formats import CFG_RUN, DISTILL_RUN, PROMPT, max_diff, staged_run
from pipeline.config import parse_config
from pipeline.errors import CheckpointError
from pipeline.models import loader as ld
from pipeline.testing import standins

REPO_CONFIGS = ("wan_t2v_1_3b.json", "wan_t2v_1_3b_diffusers.json", "wan_t2v_14b.json", "wan_t2v_14b_distill.json")


@pytest.fixture(scope="module")
def wan21_t2v(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan21t2v")
    diffusers = standins.build_tiny_wan21_t2v(root / "Wan2.1-T2V-1.3B-Diffusers")
    return diffusers, standins.write_wan_layout(diffusers, root / "Wan2.1-T2V-1.3B")


def test_both_layouts_are_detected_as_wan21_t2v(wan21_t2v):
    diffusers, wan = wan21_t2v
    assert (wan / "config.json").is_file() and not (wan / "high_noise_model").exists()
    assert json.loads((wan / "config.json").read_text())["model_type"] == "t2v"
    for folder, fmt in ((diffusers, "diffusers"), (wan, "wan")):
        ref = ld.resolve_model(parse_config({"model_path": str(folder)}), "t2v")
        assert (ref.format, ref.family, ref.experts, ref.task) == (fmt, "wan2.1", ("single",), "t2v")
        assert ref.boundary_ratio is None and not ref.image_encoder
        with pytest.raises(CheckpointError, match="is a text-to-video model: set i2v_model_path"):
            ld.resolve_model(parse_config({"model_path": str(folder)}), "i2v")


def test_staged_wan21_t2v_matches_diffusers_wan_pipeline(tmp_path, wan21_t2v):
    from diffusers import UniPCMultistepScheduler, WanPipeline

    diffusers, _ = wan21_t2v
    v = {**CFG_RUN, "sample_guide_scale": 5.0, "model_path": str(diffusers)}
    ours = staged_run(tmp_path, v)
    assert set(ours["plan"].stages()) >= {"text", "decode"} and "denoise-low" not in ours["plan"].stages()
    pipe = WanPipeline.from_pretrained(diffusers, torch_dtype=torch.float32)
    assert pipe.transformer_2 is None
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config, flow_shift=v["sample_shift"])
    ref = pipe(prompt=PROMPT, negative_prompt="", height=v["target_height"], width=v["target_width"],
               num_frames=v["target_video_length"], num_inference_steps=v["infer_steps"], guidance_scale=5.0,
               max_sequence_length=512, generator=torch.Generator("cpu").manual_seed(7), output_type="latent").frames
    assert ours["latents"].shape == ref.shape
    assert max_diff(ours["latents"], ref) < 1e-4  # same ops on the same CPU: float32 rounding at most
    assert max_diff(ref, torch.zeros_like(ref)) > 0.1


def test_wan21_t2v_original_layout_equals_diffusers_layout_bitwise(tmp_path, wan21_t2v):
    diffusers, wan = wan21_t2v
    v = {**DISTILL_RUN, "sample_guide_scale": 5.0}
    a = staged_run(tmp_path / "d", {**v, "model_path": str(diffusers)})
    b = staged_run(tmp_path / "w", {**v, "model_path": str(wan)})
    assert torch.equal(a["latents"], b["latents"]) and a["video"] == b["video"]


def test_distilled_single_file_and_lora_on_the_one_dit(tmp_path, wan21_t2v):
    """wan_t2v_14b_distill.json's shape (dit_original_ckpt over Wan's layout), and a LoRA with no name (or
    name dit) on Wan2.1's one DiT."""
    diffusers, wan = wan21_t2v
    single = tmp_path / "wan2.1_t2v_14b_lightx2v_4step.safetensors"
    standins.write_single_file(diffusers / "transformer", single)
    base = staged_run(tmp_path / "b", {**DISTILL_RUN, "model_path": str(wan)})
    d = staged_run(tmp_path / "s", {**DISTILL_RUN, "model_path": str(wan), "dit_original_ckpt": str(single)})
    assert torch.equal(base["latents"], d["latents"])  # the same weights from another file: the same video
    lora = tmp_path / "lora.safetensors"
    standins.write_tool_lora(diffusers / "transformer", lora, "lightning", rank=4, seed=2, alpha=4.0, scale=0.2)
    with_lora = staged_run(tmp_path / "l", {**DISTILL_RUN, "model_path": str(wan),
                                            "lora_configs": [{"path": str(lora), "strength": 1.0}]})
    named = staged_run(tmp_path / "n", {**DISTILL_RUN, "model_path": str(wan),
                                        "lora_configs": [{"name": "dit", "path": str(lora), "strength": 1.0}]})
    assert torch.equal(with_lora["latents"], named["latents"])
    assert max_diff(with_lora["latents"], base["latents"]) > 1e-3
    with pytest.raises(CheckpointError, match=r"name 'high_noise_model' does not fit this model; use dit"):
        ld.resolve_model(parse_config({"model_path": str(wan), "lora_configs": [
            {"name": "high_noise_model", "path": str(lora)}]}), "t2v")


def test_repo_configs_for_wan21_t2v_exist_with_lightx2v_keys():
    from conftest import REPO

    for name in REPO_CONFIGS:
        cfg = json.loads((REPO / "configs" / name).read_text())
        assert "Wan2.1-T2V-" in cfg["model_path"]
        assert cfg["sample_shift"] in (5, 8) and cfg["target_height"] == 480
