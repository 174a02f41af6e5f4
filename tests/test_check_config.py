"""`wan-batch check-config`: every config in configs/ passes against a folder of tiny stand-ins of the real
repos (same file names, layouts, key names); LightX2V's three seed configs load unchanged but for their model
paths; broken files give a non-zero exit listing every problem."""
from __future__ import annotations

import json
import shutil

import pytest

from conftest import REPO
from pipeline.cli import main as cli
from pipeline.check_config import check_config

# The three configs of LightX2V's Wan2.2 guide (seed 000), verbatim.
SEED_T2V_DISTILL_LORA = """{
    "infer_steps": 4, "target_video_length": 81, "text_len": 512, "target_height": 480, "target_width": 832,
    "self_attn_1_type": "flash_attn3", "cross_attn_1_type": "flash_attn3", "cross_attn_2_type": "flash_attn3",
    "sample_guide_scale": [4.0, 3.0], "sample_shift": 5.0, "enable_cfg": false, "cpu_offload": true,
    "offload_granularity": "model", "t5_cpu_offload": false, "vae_cpu_offload": false, "boundary_step_index": 2,
    "denoising_step_list": [1000, 750, 500, 250],
    "lora_configs": [
        {"name": "high_noise_model", "path": "lightx2v/Wan2.2-Distill-Loras/wan2.2_t2v_A14b_high_noise_lora_rank64_lightx2v_4step_1217.safetensors", "strength": 1.0},
        {"name": "low_noise_model", "path": "lightx2v/Wan2.2-Distill-Loras/wan2.2_t2v_A14b_low_noise_lora_rank64_lightx2v_4step_1217.safetensors", "strength": 1.0}
    ]
}"""
SEED_I2V_DISTILL = """{
    "infer_steps": 4, "target_video_length": 81, "text_len": 512, "target_height": 720, "target_width": 1280,
    "self_attn_1_type": "flash_attn3", "cross_attn_1_type": "flash_attn3", "cross_attn_2_type": "flash_attn3",
    "sample_guide_scale": [3.5, 3.5], "sample_shift": 5.0, "enable_cfg": false, "cpu_offload": true,
    "offload_granularity": "block", "t5_cpu_offload": false, "vae_cpu_offload": false, "use_image_encoder": false,
    "boundary_step_index": 2, "denoising_step_list": [1000, 750, 500, 250],
    "high_noise_original_ckpt": "lightx2v/Wan2.2-Distill-Models/wan2.2_i2v_A14b_high_noise_lightx2v_4step.safetensors",
    "low_noise_original_ckpt": "lightx2v/Wan2.2-Distill-Models/wan2.2_i2v_A14b_low_noise_lightx2v_4step.safetensors"
}"""
SEED_I2V_DISTILL_QUANT = """{
    "infer_steps": 4, "target_video_length": 81, "text_len": 512, "target_height": 720, "target_width": 1280,
    "self_attn_1_type": "flash_attn3", "cross_attn_1_type": "flash_attn3", "cross_attn_2_type": "flash_attn3",
    "sample_guide_scale": [3.5, 3.5], "sample_shift": 5.0, "enable_cfg": false, "cpu_offload": true,
    "offload_granularity": "block", "t5_cpu_offload": false, "vae_cpu_offload": false, "use_image_encoder": false,
    "boundary_step_index": 2, "denoising_step_list": [1000, 750, 500, 250],
    "dit_quantized": true, "dit_quant_scheme": "fp8-sgl", "t5_quantized": false, "t5_quant_scheme": "fp8-sgl",
    "high_noise_quantized_ckpt": "lightx2v/Wan2.2-Distill-Models/wan2.2_i2v_A14b_high_noise_scaled_fp8_e4m3_lightx2v_4step.safetensors",
    "low_noise_quantized_ckpt": "lightx2v/Wan2.2-Distill-Models/wan2.2_i2v_A14b_low_noise_scaled_fp8_e4m3_lightx2v_4step.safetensors"
}"""


@pytest.fixture(scope="module")
def tree(tmp_path_factory, tiny_root):
    """<root>/models: stand-ins of every repo the configs name; <root>/configs: a copy of configs/."""
    from pipeline.testing.standins import write_standin_tree

    root = tmp_path_factory.mktemp("tree")
    write_standin_tree(root / "models")
    shutil.copytree(REPO / "configs", root / "configs")
    return root


def _configs() -> list[str]:
    return sorted(p.name for p in (REPO / "configs").glob("*.json"))


def test_the_model_configs_exist():
    names = set(_configs())
    for name in ("wan_moe_t2v.json", "wan_moe_i2v.json", "wan_moe_t2v_distill_lora.json", "wan_moe_i2v_distill.json",
                 "wan_moe_i2v_distill_quant.json", "wan_moe_i2v_gguf_q4_k_m.json", "wan_moe_i2v_gguf_q8_0.json",
                 "wan_i2v_480p.json", "wan_i2v_720p.json", "wan_i2v_480p_distill.json", "wan_i2v_720p_distill_fp8.json"):
        assert name in names


@pytest.mark.parametrize("name", _configs())
def test_every_config_passes_against_standins(tree, name):
    report = check_config(tree / "configs" / name)
    assert report.problems == [], report.text()
    assert not any("unknown" in line for line in report.lines), report.text()


def test_seed_configs_load_unchanged_but_for_paths(tree, capsys):
    models = tree / "models"
    for text, model, name in ((SEED_T2V_DISTILL_LORA, "Wan2.2-T2V-A14B", "t2v_lora"),
                              (SEED_I2V_DISTILL, "Wan2.2-I2V-A14B", "i2v_distill"),
                              (SEED_I2V_DISTILL_QUANT, "Wan2.2-I2V-A14B", "i2v_quant")):
        # the repo-relative paths LightX2V resolves from its working dir become paths under our models folder
        raw = json.loads(text.replace('"lightx2v/', f'"{models}/lightx2v/'))
        raw["model_path"] = str(models / "Wan-AI" / model)
        path = tree / f"seed_{name}.json"
        path.write_text(json.dumps(raw))
        assert cli(["check-config", str(path)]) == 0
        out = capsys.readouterr().out
        assert "OK: every file exists" in out and "keys (unknown)" not in out
        assert "keys (ours): model_path\n" in out  # the only key that is not LightX2V's


def test_problems_are_all_listed_and_exit_non_zero(tree, tmp_path, capsys):
    models = tmp_path / "models"
    shutil.copytree(tree / "models" / "Wan-AI" / "Wan2.2-I2V-A14B", models / "Wan-AI" / "Wan2.2-I2V-A14B")
    shutil.copytree(tree / "models" / "lightx2v", models / "lightx2v")
    (models / "lightx2v" / "Wan2.2-Distill-Models" / "wan2.2_i2v_A14b_low_noise_scaled_fp8_e4m3_lightx2v_4step.safetensors").unlink()
    vae = models / "Wan-AI" / "Wan2.2-I2V-A14B" / "Wan2.1_VAE.pth"
    vae.write_bytes(b"not a checkpoint")
    raw = json.loads((REPO / "configs" / "wan_moe_i2v_distill_quant.json").read_text())
    raw["model_path"] = str(models / "Wan-AI" / "Wan2.2-I2V-A14B")
    for key in ("high_noise_quantized_ckpt", "low_noise_quantized_ckpt"):
        raw[key] = raw[key].replace("../models", str(models))
    raw["high_noise_quantized_ckpt"] = raw["high_noise_quantized_ckpt"].replace("scaled_fp8_e4m3", "int8")
    raw["not_a_key"] = 1
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(raw))
    assert cli(["check-config", str(path)]) == 1
    out = capsys.readouterr().out
    assert "Wan2.1_VAE.pth" in out  # unreadable VAE
    assert "low-noise DiT" in out and "not found" in out  # missing checkpoint
    assert "dit_quant_scheme is fp8-sgl but" in out and "int8" in out  # wrong quantization for the scheme
    assert "keys (unknown): not_a_key" in out
    assert "3 problem(s)" in out


def test_wrong_lora_target_is_reported(tree, tmp_path, capsys):
    raw = json.loads((tree / "configs" / "wan_moe_t2v_distill_lora.json").read_text())
    raw["lora_configs"][0]["name"] = "dit"  # a Wan2.1 target on a Wan2.2 model
    path = tree / "configs" / "bad_lora.json"
    path.write_text(json.dumps(raw))
    assert cli(["check-config", str(path)]) == 1
    assert "name 'dit' does not fit this model" in capsys.readouterr().out
