"""LightX2V distilled single files (`high_noise_original_ckpt` / `low_noise_original_ckpt`): Wan key names with
or without ComfyUI's `model.diffusion_model.` prefix, over either base layout, loaded losslessly (the staged
4-step video equals the one from the same weights in the diffusers layout, bit for bit)."""
from __future__ import annotations

import shutil

import torch
from safetensors.torch import save_file

from _formats import DISTILL_RUN, baselines, first_frame, staged_run, wan_t2v  # noqa: F401
from pipeline.testing import standins


def _singles(tiny_root, out, dtype=None, prefix=""):
    paths = {}
    for key, sub in (("high_noise_original_ckpt", "transformer"), ("low_noise_original_ckpt", "transformer_2")):
        paths[key] = str(out / f"wan2.2_t2v_A14b_{sub}_lightx2v_4step.safetensors")
        standins.write_single_file(tiny_root / "t2v" / sub, paths[key], dtype=dtype, prefix=prefix)
    return paths


def test_single_files_over_the_diffusers_layout_are_lossless(tmp_path, tiny_root, baselines):
    base = baselines("t2v-distill")
    ckpts = _singles(tiny_root, tmp_path, prefix="model.diffusion_model.")
    ours = staged_run(tmp_path / "run", {**DISTILL_RUN, "model_path": str(tiny_root / "t2v"), **ckpts})
    assert torch.equal(ours["latents"], base["latents"]) and ours["video"] == base["video"]
    dit = ours["plan"].stages()["denoise-high"]
    assert dit.params["dit"] != base["plan"].stages()["denoise-high"].params["dit"]  # another file, another key


def test_bf16_single_files_over_wan_layout_equal_bf16_diffusers_weights(tmp_path, tiny_root, wan_t2v):
    """A bf16 file run in float32 is upcast exactly: same video as a diffusers folder holding the same bf16."""
    ckpts = _singles(tiny_root, tmp_path, dtype=torch.bfloat16)
    ours = staged_run(tmp_path / "run", {**DISTILL_RUN, "model_path": str(wan_t2v), **ckpts})
    ref_root = tmp_path / "bf16-diffusers"
    shutil.copytree(tiny_root / "t2v", ref_root)
    for sub in ("transformer", "transformer_2"):
        sd = standins._state(ref_root / sub)
        for f in (ref_root / sub).glob("*.safetensors*"):
            f.unlink()
        save_file({k: v.to(torch.bfloat16) for k, v in sd.items()}, ref_root / sub / "diffusion_pytorch_model.safetensors")
    ref = staged_run(tmp_path / "ref", {**DISTILL_RUN, "model_path": str(ref_root)})
    assert torch.equal(ours["latents"], ref["latents"]) and ours["video"] == ref["video"]
