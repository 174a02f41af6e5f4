"""`wan-batch download`: which files of which repos are fetched (checked with huggingface_hub's own pattern
filter on the real repos' file names), and a clear message when the Hub cannot be reached. Nothing is
downloaded: the Hub is switched off with HF_HUB_OFFLINE."""
from __future__ import annotations

import json

import pytest
from huggingface_hub.utils import filter_repo_objects

from pipeline.cli import main as cli
from pipeline.errors import WanBatchError
from pipeline.hub import RECORD, plan_download, snapshot_problems, write_record

# File names of Wan-AI/Wan2.2-I2V-A14B (abridged: 2 of the 6 shards per expert).
WAN22_FILES = [
    "configuration.json", "README.md", "Wan2.1_VAE.pth", "models_t5_umt5-xxl-enc-bf16.pth",
    "google/umt5-xxl/spiece.model", "google/umt5-xxl/tokenizer.json", "google/umt5-xxl/tokenizer_config.json",
    "high_noise_model/config.json", "high_noise_model/diffusion_pytorch_model.safetensors.index.json",
    "high_noise_model/diffusion_pytorch_model-00001-of-00006.safetensors",
    "high_noise_model/diffusion_pytorch_model-00006-of-00006.safetensors",
    "low_noise_model/config.json", "low_noise_model/diffusion_pytorch_model.safetensors.index.json",
    "low_noise_model/diffusion_pytorch_model-00001-of-00006.safetensors",
    "assets/comp_effic.png", "examples/i2v_input.JPG",
]
DISTILL_FILES = [
    "wan2.2_i2v_A14b_high_noise_lightx2v_4step.safetensors", "wan2.2_i2v_A14b_low_noise_lightx2v_4step.safetensors",
    "wan2.2_i2v_A14b_high_noise_scaled_fp8_e4m3_lightx2v_4step.safetensors",
    "wan2.2_i2v_A14b_low_noise_scaled_fp8_e4m3_lightx2v_4step.safetensors",
    "wan2.2_i2v_A14b_high_noise_scaled_fp8_e4m3_lightx2v_4step_comfyui.safetensors",
    "wan2.2_i2v_A14b_high_noise_int8_lightx2v_4step.safetensors",
    "wan2.2_t2v_A14b_high_noise_scaled_fp8_e4m3_lightx2v_4step.safetensors",
]
GGUF_FILES = ["HighNoise/Wan2.2-I2V-A14B-HighNoise-Q4_K_M.gguf", "HighNoise/Wan2.2-I2V-A14B-HighNoise-Q8_0.gguf",
              "LowNoise/Wan2.2-I2V-A14B-LowNoise-Q4_K_M.gguf", "LowNoise/Wan2.2-I2V-A14B-LowNoise-Q8_0.gguf",
              "README.md"]


def kept(fetch, files):
    return sorted(filter_repo_objects(files, allow_patterns=fetch.allow, ignore_patterns=fetch.ignore or None))


def test_quantized_dit_skips_the_bf16_shards_but_keeps_their_json():
    base, fp8 = plan_download("wan2.2-i2v", dit="fp8")
    assert base.repo == "Wan-AI/Wan2.2-I2V-A14B"
    got = kept(base, WAN22_FILES)
    assert "high_noise_model/config.json" in got and "low_noise_model/diffusion_pytorch_model.safetensors.index.json" in got
    assert not any(f.endswith(".safetensors") for f in got)
    assert {"Wan2.1_VAE.pth", "models_t5_umt5-xxl-enc-bf16.pth", "google/umt5-xxl/spiece.model"} <= set(got)
    assert not any(f.startswith(("assets/", "examples/")) for f in got)
    assert fp8.repo == "lightx2v/Wan2.2-Distill-Models"
    assert kept(fp8, DISTILL_FILES) == ["wan2.2_i2v_A14b_high_noise_scaled_fp8_e4m3_lightx2v_4step.safetensors",
                                        "wan2.2_i2v_A14b_low_noise_scaled_fp8_e4m3_lightx2v_4step.safetensors"]


def test_bf16_keeps_the_shards_and_gguf_picks_one_quant():
    (base,) = plan_download("Wan-AI/Wan2.2-I2V-A14B")
    assert "high_noise_model/diffusion_pytorch_model-00001-of-00006.safetensors" in kept(base, WAN22_FILES)
    _, gguf = plan_download("wan2.2-i2v", dit="gguf-Q4_K_M")
    assert gguf.repo == "QuantStack/Wan2.2-I2V-A14B-GGUF"
    assert kept(gguf, GGUF_FILES) == ["HighNoise/Wan2.2-I2V-A14B-HighNoise-Q4_K_M.gguf",
                                      "LowNoise/Wan2.2-I2V-A14B-LowNoise-Q4_K_M.gguf"]
    _, distill = plan_download("wan2.2-i2v", dit="distill")
    assert kept(distill, DISTILL_FILES) == ["wan2.2_i2v_A14b_high_noise_lightx2v_4step.safetensors",
                                            "wan2.2_i2v_A14b_low_noise_lightx2v_4step.safetensors"]


def test_wan21_fp8_keeps_config_and_clip():
    base, fp8 = plan_download("wan2.1-i2v-480p", dit="fp8")
    files = ["config.json", "diffusion_pytorch_model-00001-of-00007.safetensors",
             "diffusion_pytorch_model.safetensors.index.json", "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth",
             "xlm-roberta-large/tokenizer.json", "Wan2.1_VAE.pth"]
    assert kept(base, files) == ["Wan2.1_VAE.pth", "config.json",
                                 "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth",
                                 "xlm-roberta-large/tokenizer.json"]
    assert kept(fp8, ["wan2.1_i2v_480p_scaled_fp8_e4m3_lightx2v_4step.safetensors",
                      "wan2.1_i2v_720p_scaled_fp8_e4m3_lightx2v_4step.safetensors"]) == [
        "wan2.1_i2v_480p_scaled_fp8_e4m3_lightx2v_4step.safetensors"]


def test_bad_choices_are_refused():
    for model, dit in (("wan2.2-i2v", "fp4"), ("wan2.2-i2v-diffusers", "fp8"), ("nonsense", "bf16")):
        with pytest.raises(WanBatchError):
            plan_download(model, dit=dit)
    assert cli(["download", "wan2.2-i2v", "--dit", "fp4"]) == 2


def test_offline_gives_a_clear_message(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    assert cli(["download", "wan2.2-i2v", "--dit", "gguf-Q8_0", "--dir", str(tmp_path)]) == 3
    out = capsys.readouterr().out
    assert "cannot download Wan-AI/Wan2.2-I2V-A14B: the Hugging Face Hub is not reachable" in out
    assert "resumes where it stopped" in out and str(tmp_path / "Wan-AI" / "Wan2.2-I2V-A14B") in out


def test_dry_run_lists_the_plan(capsys):
    assert cli(["download", "wan2.2-t2v", "--lora", "distill", "--dry-run", "--dir", "m"]) == 0
    out = capsys.readouterr().out
    assert "would fetch m/Wan-AI/Wan2.2-T2V-A14B" in out and "lightx2v/Wan2.2-Distill-Loras" in out


def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)


def _safetensors(path, nbytes=16):
    import torch
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.zeros(nbytes // 4)}, str(path))
    return path


def _snapshot(target):
    """A small Wan2.2-like folder: configs, a shard index and its shards."""
    (target / "high_noise_model").mkdir(parents=True)
    (target / "high_noise_model" / "config.json").write_text('{"dim": 5120, "num_layers": 40}')
    shards = ["diffusion_pytorch_model-00001-of-00002.safetensors",
              "diffusion_pytorch_model-00002-of-00002.safetensors"]
    for s in shards:
        _safetensors(target / "high_noise_model" / s)
    (target / "high_noise_model" / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": shards[0], "b": shards[1]}}))
    (target / "Wan2.1_VAE.pth").write_bytes(b"\0" * 100)
    return {str(p.relative_to(target)): p.stat().st_size for p in target.rglob("*") if p.is_file()}


def test_offline_complete_snapshot_is_done(tmp_path, monkeypatch, capsys):
    target = tmp_path / "Wan-AI" / "Wan2.2-I2V-A14B"
    target.mkdir(parents=True)
    write_record(target, "Wan-AI/Wan2.2-I2V-A14B", "abc", _snapshot(target))
    _offline(monkeypatch)
    assert cli(["download", "wan2.2-i2v", "--dir", str(tmp_path)]) == 0
    assert f"done: {target}: complete (checked offline" in capsys.readouterr().out


def test_offline_interrupted_download_is_not_done(tmp_path, monkeypatch, capsys):
    """The issue's case: a folder that exists but whose config.json stopped after 3 bytes."""
    target = tmp_path / "Wan-AI" / "Wan2.2-I2V-A14B"
    target.mkdir(parents=True)
    files = _snapshot(target)
    write_record(target, "Wan-AI/Wan2.2-I2V-A14B", "abc", files)
    (target / "high_noise_model" / "config.json").write_text('{"d')
    (target / "Wan2.1_VAE.pth").unlink()
    _offline(monkeypatch)
    assert cli(["download", "wan2.2-i2v", "--dir", str(tmp_path)]) == 3
    out = capsys.readouterr().out
    assert "done:" not in out and "is not known complete" in out
    assert f"high_noise_model/config.json: 3 bytes, the repo's index says {files['high_noise_model/config.json']}" in out
    assert "Wan2.1_VAE.pth: missing" in out


def test_without_a_record_the_index_and_headers_tell_what_is_missing(tmp_path):
    target = tmp_path / "copied"
    target.mkdir()
    _snapshot(target)
    assert snapshot_problems(target) == []
    (target / "high_noise_model" / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    shard = target / "high_noise_model" / "diffusion_pytorch_model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-5])  # cut short
    (target / "high_noise_model" / "config.json").write_text("{}}")
    problems = snapshot_problems(target)
    assert "high_noise_model/diffusion_pytorch_model-00002-of-00002.safetensors: missing (named by " \
           "diffusion_pytorch_model.safetensors.index.json)" in problems
    assert any(p.startswith("high_noise_model/diffusion_pytorch_model-00001-of-00002.safetensors: ")
               and "its header declares" in p for p in problems)
    assert "high_noise_model/config.json: not complete JSON (3 bytes)" in problems


def test_offline_without_a_record_is_not_done(tmp_path, monkeypatch, capsys):
    target = tmp_path / "Wan-AI" / "Wan2.2-I2V-A14B"
    target.mkdir(parents=True)
    _snapshot(target)
    _offline(monkeypatch)
    assert cli(["download", "wan2.2-i2v", "--dir", str(tmp_path)]) == 3
    assert "no record of a finished download" in capsys.readouterr().out


def test_online_download_records_the_index_and_checks_sizes(tmp_path, monkeypatch, capsys):
    """The Hub stood in for by its two calls: the repo's index (names, sizes) and the snapshot itself."""
    import pipeline.hub as hub

    source = tmp_path / "source"
    source.mkdir()
    files = _snapshot(source)
    monkeypatch.setattr(hub, "remote_files", lambda fetch, rev: ("abc123", dict(files)))

    def fake_snapshot(repo_id, local_dir, **kw):
        import shutil

        shutil.copytree(source, local_dir, dirs_exist_ok=True)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    assert cli(["download", "wan2.2-i2v", "--dir", str(tmp_path / "m")]) == 0
    target = tmp_path / "m" / "Wan-AI" / "Wan2.2-I2V-A14B"
    assert json.loads((target / RECORD).read_text()) == {"repo": "Wan-AI/Wan2.2-I2V-A14B", "commit": "abc123",
                                                          "files": files}
    assert "sizes as the repo's index says" in capsys.readouterr().out
    # a download that ends with a file shorter than the index says is reported, not "done"
    monkeypatch.setattr(hub, "remote_files", lambda fetch, rev: ("abc123", {**files, "Wan2.1_VAE.pth": 101}))
    assert cli(["download", "wan2.2-i2v", "--dir", str(tmp_path / "m")]) == 3
    assert "Wan2.1_VAE.pth: 100 bytes, the repo's index says 101" in capsys.readouterr().out
