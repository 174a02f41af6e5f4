"""wan-batch diagnose: environment, checkpoint health against the architecture, memory advice, and the
stage-by-stage run that names the first failing stage."""
from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import write_config
from pipeline.config import load_config
from pipeline.diagnose import (GB, check_health, check_memory, check_pipeline, check_quick, choose_plan,
                               component_bytes, failed, memory_plans)

SMALL = dict(target_height=32, target_width=32, target_video_length=5, infer_steps=4, text_len=32)


def texts(lines, level=None):
    return [ln.text for ln in lines if level is None or ln.level == level]


@pytest.fixture()
def model_copy(tmp_path, tiny_root):
    """A private copy of the tiny T2V model (diffusers layout) that a test may break."""
    dest = tmp_path / "model"
    shutil.copytree(tiny_root / "t2v", dest)
    return dest


def rewrite(folder, change):
    """Apply change(tensors) to the (single) safetensors file of a component folder."""
    (path,) = sorted(folder.glob("*.safetensors"))
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


def test_quick_reports_the_environment():
    lines = check_quick()
    assert not failed(lines), texts(lines, "fail")
    joined = "\n".join(texts(lines))
    assert f"torch {torch.__version__}" in joined and "luigi 3." in joined and "diffusers" in joined
    assert any(ln.level == "ok" and "libx264 available" in ln.text for ln in lines)


def test_health_of_the_tiny_models(tiny_root):
    lines = check_health(load_config(None))
    assert not failed(lines), texts(lines, "fail")
    ok = texts(lines, "ok")
    for task in ("t2v", "i2v"):
        for comp in ("text", "vae", "high", "low"):
            assert any(t.startswith(f"{task} {comp}:") and "match the architecture" in t for t in ok), (task, comp)


def test_health_names_missing_keys_and_wrong_shapes(tmp_path, model_copy):
    rewrite(model_copy / "transformer_2", lambda t: t.pop("proj_out.bias"))
    rewrite(model_copy / "text_encoder",
            lambda t: t.__setitem__("encoder.final_layer_norm.weight", torch.ones(7)))
    lines = check_health(load_config(write_config(tmp_path / "c.json", model_path=str(model_copy))))
    fails = texts(lines, "fail")
    assert any(t.startswith("t2v low:") and "missing" in t and "proj_out.bias" in t for t in fails), fails
    assert any(t.startswith("t2v text:") and "encoder.final_layer_norm.weight (7,)" in t for t in fails), fails
    assert any(t.startswith("t2v high:") for t in texts(lines, "ok"))  # the intact expert passes


def test_health_reports_an_unreadable_checkpoint(tmp_path, model_copy):
    (path,) = sorted((model_copy / "vae").glob("*.safetensors"))
    path.write_bytes(b"\xff" * 64)
    lines = check_health(load_config(write_config(tmp_path / "c.json", model_path=str(model_copy))))
    assert any(t.startswith("t2v vae:") and str(path.name) in t for t in texts(lines, "fail")), texts(lines)


def test_component_sizes_equal_the_loaded_modules(tiny_root):
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    from pipeline.models.loader import resolve_model

    ref = resolve_model(load_config(None), "t2v")
    dit = WanTransformer3DModel.from_pretrained(tiny_root / "t2v" / "transformer_2", torch_dtype=torch.float32)
    got = component_bytes(ref, "low", "float32")
    assert got["total"] == sum(t.numel() * 4 for t in dit.state_dict().values())
    assert got["blocks"] == len(dit.blocks)
    assert got["block"] == sum(p.numel() * 4 for p in dit.blocks[0].state_dict().values())
    assert component_bytes(ref, "low", "bfloat16")["total"] == got["total"] // 2
    vae = AutoencoderKLWan.from_pretrained(tiny_root / "t2v" / "vae")
    assert component_bytes(ref, "vae", "bfloat16")["total"] == sum(t.numel() * 4 for t in vae.state_dict().values())
    lines = check_memory(load_config(None))
    assert not failed(lines) and any("needs about" in t for t in texts(lines, "ok"))


def test_memory_advice_for_a14b_sized_models():
    # Wan2.2 A14B in bf16: experts 28.6 GB (40 blocks of 0.68 GB + 1.4 GB outside the blocks), UMT5-XXL 11.4 GB,
    # VAE 0.5 GB; 480p x 81 frames activations 8 GiB.
    block = int(0.68 * GB)
    expert = {"total": 40 * block + int(1.4 * GB), "block": block, "blocks": 40}
    sizes = {"text": {"total": int(11.4 * GB), "block": 0, "blocks": 0},
             "vae": {"total": int(0.5 * GB), "block": 0, "blocks": 0}, "high": expert, "low": expert}
    plans = memory_plans(sizes, ["high", "low"], 8 * GB)
    pick = lambda vram, ram: (choose_plan(plans, int(vram * GB), int(ram * GB)) or {}).get("name", "")  # noqa
    assert pick(141, 200).startswith("all resident")  # H200: 11.4 + 0.5 + 28.6 + 8 = 48.5 GiB
    assert pick(80, 200).startswith("all resident")  # H100 (72 GiB usable)
    assert pick(48, 200).startswith("one stage's model at a time")  # 43 GiB usable: one expert + activations
    assert pick(24, 64) == "stream DiT blocks from RAM"  # 4090: blocks streamed, the expert pinned in RAM
    assert pick(24, 16) == "stream DiT phases from disk"  # not enough RAM to pin a 28.6 GiB expert
    assert pick(8, 64) == ""  # the 11.4 GiB text encoder alone does not fit
    # with a quantized 5 GiB text encoder, 11 GiB is enough once the DiT streams phases
    sizes["text"]["total"] = 5 * GB
    plans = memory_plans(sizes, ["high", "low"], 8 * GB)
    assert pick(11, 64) == "stream DiT phases from RAM"
    chosen = choose_plan(plans, 24 * GB, 64 * GB)
    assert chosen["settings"] == {"cpu_offload": True, "offload_granularity": "block"}


def test_pipeline_runs_every_stage_in_order(tmp_path, tiny_root):
    config = load_config(write_config(tmp_path / "c.json", **SMALL))
    lines = check_pipeline(config, out=lambda s: None)
    assert not failed(lines), texts(lines, "fail")
    assert [t.split(":")[0] for t in texts(lines, "ok")] == [
        "stage text", "stage text-negative", "stage denoise-high", "stage denoise-low", "stage decode"]
    assert "latents [1, 16, 2, 4, 4] float32" in texts(lines, "ok")[2]


def test_pipeline_stops_at_the_broken_stage_and_names_it(tmp_path, model_copy, capsys):
    from pipeline.cli import main

    def poison(t):
        t["proj_out.weight"] = torch.full_like(t["proj_out.weight"], float("nan"))

    rewrite(model_copy / "transformer_2", poison)  # the low-noise expert outputs NaN
    cfg = write_config(tmp_path / "c.json", model_path=str(model_copy), **SMALL)
    lines = check_pipeline(load_config(cfg), out=lambda s: None)
    assert texts(lines, "fail")[-1].startswith("first failing stage: denoise-low")
    assert [t.split(":")[0] for t in texts(lines, "ok")] == ["stage text", "stage text-negative",
                                                               "stage denoise-high"]
    assert "non-finite" in texts(lines, "fail")[0] and "stage decode: not run" in texts(lines, "info")
    assert main(["diagnose", "--pipeline", "--config", str(cfg)]) == 1
    out = capsys.readouterr().out
    assert "stage denoise-low FAILED" in out and "first failing stage: denoise-low" in out
    assert main(["diagnose", "--quick", "--config", str(tmp_path / "nope.json")]) == 0  # quick needs no config
    assert main(["diagnose", "--health", "--config", str(tmp_path / "nope.json")]) == 2
