"""Config semantics as LightX2V has them (issue 17) and values checked when read (issue 19, case 5).

--model-path (LightX2V's --model_path), relative paths against the working directory with the config's
folder as fallback, the key table's refusals, LightX2V's defaults and adjustments, and every value that used
to fail deep in a run (dtype int8, device gpu, a LoRA path 5, NaN budgets, text_len 1e8, 10001 frames, NaN
guide_scale in a row) refused when read, naming the key or column, by validate and by run alike.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from conftest import write_config, write_manifest
from pipeline.cli import main as cli
from pipeline.config import adjust_frames, component_device, load_config, parse_config
from pipeline.config_keys import KEYS, markdown_table
from pipeline.errors import CheckpointError, ConfigError


def _config(tmp_path: Path, **raw) -> Path:
    path = tmp_path / "c.json"
    path.write_text(json.dumps(raw))
    return path


# ------------------------------------------------------------------------------------------ model path
def test_a_config_without_model_path_is_refused_naming_the_option(tmp_path):
    path = _config(tmp_path, infer_steps=4)
    with pytest.raises(ConfigError, match="--model-path"):
        load_config(path)
    with pytest.raises(CheckpointError, match="--model-path"):  # a dict config: refused at resolution, too
        from pipeline.models.loader import resolve_model

        resolve_model(parse_config({"infer_steps": 4}), "t2v")


def test_cli_refuses_a_config_without_a_model(tmp_path, capsys):
    path = _config(tmp_path, infer_steps=4)
    manifest = write_manifest(tmp_path / "m.parquet", [{"prompt": "a"}])
    assert cli(["validate", "--manifest", str(manifest), "--config", str(path)]) == 2
    assert "--model-path" in capsys.readouterr().out
    assert cli(["check-config", str(path)]) == 1
    assert "no model: pass --model-path" in capsys.readouterr().out
    assert cli(["run", "--manifest", str(manifest), "--config", str(path), "--store", str(tmp_path / "s"),
                "--output-dir", str(tmp_path / "o")]) == 2
    assert "--model-path" in capsys.readouterr().out
    assert not (tmp_path / "o").exists()


def test_model_path_option_wins_over_the_config(tmp_path, tiny_root):
    cfg = write_config(tmp_path / "c.json", model_path="no/such/folder")
    assert load_config(cfg, "builtin:tiny")["model_path"] == "builtin:tiny"
    assert load_config(cfg)["model_path"] == "no/such/folder"
    from pipeline.models.loader import resolve_model

    ref = resolve_model(load_config(_config(tmp_path, infer_steps=2), str(tiny_root / "t2v")), "t2v")
    assert Path(ref.path) == tiny_root / "t2v"


def test_no_config_is_the_tiny_models_own_config_and_says_so(caplog):
    caplog.set_level(logging.INFO)
    assert load_config(None)["model_path"] == "builtin:tiny"
    assert any("embedded tiny model's config" in r.getMessage() for r in caplog.records)


def test_relative_paths_resolve_in_the_working_directory_first(tmp_path, tiny_root, monkeypatch, capsys):
    work, cfgdir = tmp_path / "work", tmp_path / "cfgs"
    for base in (work, cfgdir):
        shutil.copytree(tiny_root / "t2v", base / "m")
    cfg = write_config(cfgdir / "c.json", model_path="m")
    monkeypatch.chdir(work)
    assert load_config(cfg).resolve_path("m") == str((work / "m").resolve())  # LightX2V: the cwd
    assert cli(["check-config", str(cfg)]) == 0
    assert "path model_path: m -> m [working directory]" in capsys.readouterr().out
    shutil.rmtree(work / "m")  # not in the working directory: the config's folder is the fallback
    assert load_config(cfg).resolve_path("m") == str((cfgdir / "m").resolve())
    assert cli(["check-config", str(cfg)]) == 0
    assert "[config's folder (fallback" in capsys.readouterr().out


def test_run_manifest_takes_model_path(tmp_path, tiny_root):
    from tasks import RunManifest

    manifest = write_manifest(tmp_path / "m.parquet", [{"prompt": "a"}])
    task = RunManifest(manifest=str(manifest), config=str(_config(tmp_path, infer_steps=2)),
                       model_path=str(tiny_root / "t2v"), store=str(tmp_path / "s"))
    assert {p.decode.model["path"] for p in task.plans} == {str(tiny_root / "t2v")}
    bare = RunManifest(manifest=str(manifest), config=str(_config(tmp_path, infer_steps=2)),
                       store=str(tmp_path / "s"))
    with pytest.raises(ConfigError, match="--model-path"):
        bare.plans


def test_workers_pass_model_path_to_each_worker():
    from pipeline.workers import BatchSpec, Scheduler, worker_command

    cmd = worker_command(BatchSpec(manifest="m.parquet", model_path="/models/wan"), Scheduler("h", 1), 1)
    assert cmd[cmd.index("--model-path") + 1] == "/models/wan"


# -------------------------------------------------------------------------------------- key classes
@pytest.mark.parametrize("raw,expected", [
    ({"feature_caching": "TaylorSeer"}, "config key 'feature_caching': must be NoCaching, Tea or Mag"),
    ({"feature_caching": "Tea"}, "config key 'teacache_thresh': required with feature_caching 'Tea'"),
    ({"changing_resolution": True}, "config key 'changing_resolution': not supported"),
    ({"teacache_thresh": 0.2}, "config key 'teacache_thresh': only read with feature_caching 'Tea'"),
    ({"t5_quantized": True, "t5_quant_scheme": "int8-tmo"}, "config key 't5_quant_scheme': int8-tmo is Cambricon"),
    ({"use_lightvae": True}, "config key 'use_lightvae': not supported: LightX2V's LightVAE"),
    ({"self_attn_1_type": "radial_attn"}, "sparse attention"),
    ({"model_cls": "wan2.2_animate"}, "Wan2.2 Animate model class"),
    ({"model_cls": "wan2.1_vace"}, "Wan2.1 VACE model class"),
    ({"model_cls": "wan2.2"}, "TI2V-5B"),
    ({"num_channels_latents": 48, "vae_stride": [4, 16, 16]}, "TI2V-5B"),
    ({"refert_num": 1, "replace_flag": False}, "'refert_num', 'replace_flag' belong to LightX2V's Wan2.2 Animate"),
    ({"ar_config": {}}, "Self-Forcing"),
])
def test_refused_keys_name_the_key_and_reason(raw, expected):
    with pytest.raises(ConfigError) as exc:
        parse_config({"model_path": "builtin:tiny", **raw}, source="c.json")
    assert expected in str(exc.value)


@pytest.mark.parametrize("raw", [
    {"rms_norm_type": "sgl-kernel", "modulate_type": "triton", "rope_type": "flashinfer_rope"},
    {"self_attn_1_type": "sage_attn2", "cross_attn_1_type": "npu_flash_attn"},
    {"feature_caching": "NoCaching", "t5_quantized": False, "t5_quant_scheme": "fp8", "use_31_block": True},
    {"model_cls": "wan2.2_moe_distill", "comment": "a note"},
])
def test_kernel_choices_and_inert_values_are_accepted(raw):
    parse_config({"model_path": "builtin:tiny", **raw})


def test_use_compile_is_torch_compile():
    assert parse_config({"use_compile": True})["torch_compile"] is True
    assert "torch_compile" in __import__("pipeline.fast.perf", fromlist=["x"]).perf_runtime(
        parse_config({"use_compile": True}).values)


def test_enable_cfg_defaults_to_false_as_lightx2v():
    assert parse_config({})["enable_cfg"] is False
    assert parse_config({"enable_cfg": True})["enable_cfg"] is True


@pytest.mark.parametrize("n,task,expected", [(80, "t2v", 77), (80, "i2v", 81), (82, "t2v", 81),
                                             (84, "i2v", 85), (81, "t2v", 81), (2, "t2v", 1)])
def test_frame_counts_are_adjusted_as_lightx2v(n, task, expected, caplog):
    assert adjust_frames(n, task) == expected
    caplog.set_level(logging.WARNING)
    cfg = parse_config({"target_video_length": n, "task": task}, source="c.json")
    assert cfg["target_video_length"] == expected
    assert (n != expected) == any("adjusted to" in r.getMessage() for r in caplog.records)


def test_component_device_follows_the_offload_keys():
    import torch

    gpu = torch.device("cuda")
    runtime = parse_config({"t5_cpu_offload": True, "vae_cpu_offload": False, "cpu_offload": True}).values
    from pipeline.fast.perf import perf_runtime

    rt = perf_runtime(runtime)
    assert component_device("text", rt, gpu) == torch.device("cpu")
    assert component_device("vae", rt, gpu) == gpu
    assert component_device("clip", rt, gpu) == gpu  # unset: stays (cpu_offload is DiT streaming here)
    assert component_device("high", rt, gpu) == gpu


def test_t5_on_cpu_gives_the_same_context(tiny_root):
    """t5_cpu_offload: the text stage's model is loaded on the CPU, whatever the run's device (this machine
    has no CUDA: loading it on the run's device would fail)."""
    from pipeline.runtime import get_model
    from pipeline.plan import Planner
    from pipeline.manifest import Job

    cfg = parse_config({"model_path": "builtin:tiny", "t5_cpu_offload": True, "device": "cpu", "infer_steps": 2,
                        "target_video_length": 5, "target_height": 64, "target_width": 64})
    plan = Planner(cfg).plan(Job(row=0, job_id="a", prompt="a red circle", negative_prompt=None, image=None,
                                 seed=1, overrides={}))
    from pipeline.plan import StageSpec

    spec = plan.stages()["text"].to_dict()
    spec["runtime"] = {**spec["runtime"], "device": "cuda:0"}  # the run's device; T5 must not go there
    spec = StageSpec.from_dict(spec)
    _, encoder = get_model(spec, spec.fingerprint)
    assert next(encoder.parameters()).device.type == "cpu"


def test_dit_quantized_finds_weights_under_model_path(tmp_path, tiny_root):
    """LightX2V loads a quantized DiT from model_path when no *_quantized_ckpt is given (Wan2.2: the
    high_noise_model/ and low_noise_model/ folders)."""
    from pipeline.models.loader import resolve_model
    from pipeline.testing.standins import write_single_file, write_wan_layout

    folder = write_wan_layout(tiny_root / "t2v", tmp_path / "Wan2.2-T2V-A14B")
    for sub, expert in (("transformer", "high_noise_model"), ("transformer_2", "low_noise_model")):
        for f in (folder / expert).glob("*.safetensors"):
            f.unlink()
        write_single_file(tiny_root / "t2v" / sub, folder / expert / "fp8.safetensors", "fp8")
    ref = resolve_model(parse_config({"model_path": str(folder), "dit_quantized": True,
                                      "dit_quant_scheme": "fp8-sgl"}), "t2v")
    assert ref.dits["high"]["weights"] == str(folder / "high_noise_model")
    assert ref.quant_scheme == "fp8-sgl"


def test_gguf_folder_as_quantized_ckpt_picks_the_file_named_with_the_type(tmp_path, tiny_root):
    from pipeline.models.loader import resolve_model
    from pipeline.testing.standins import write_gguf_expert

    folders = {}
    for sub, noise in (("transformer", "high"), ("transformer_2", "low")):
        folders[noise] = tmp_path / noise
        for quant in ("Q4_K_M", "Q8_0"):
            write_gguf_expert(tiny_root / "i2v" / sub, folders[noise] / f"Wan2.2-I2V-{noise}-{quant}.gguf", quant)
    raw = {"model_path": "builtin:tiny", "dit_quantized": True, "dit_quant_scheme": "gguf-Q8_0",
           "high_noise_quantized_ckpt": str(folders["high"]), "low_noise_quantized_ckpt": str(folders["low"])}
    ref = resolve_model(parse_config(raw), "i2v")
    assert ref.dits["high"]["weights"].endswith("Wan2.2-I2V-high-Q8_0.gguf")
    with pytest.raises(CheckpointError, match="high_noise_quantized_ckpt: folder .* must hold one .gguf file "
                                              "named with Q4_0"):
        resolve_model(parse_config({**raw, "dit_quant_scheme": "gguf-Q4_0"}), "i2v")


def test_docs_table_lists_every_key_once():
    table = markdown_table()
    for key in KEYS:
        assert table.count(f"| `{key}` |") == 1, key


# ------------------------------------------------------------- issue 19 case 5: checked when read
@pytest.mark.parametrize("raw,expected", [
    ({"dtype": "int8"}, "config key 'dtype': must be one of auto, float32, bfloat16, float16 (got 'int8')"),
    ({"device": "gpu"}, "config key 'device': must be auto, cpu, cuda or cuda:N (got 'gpu')"),
    ({"lora_configs": [{"path": 5}]}, "config key 'lora_configs[0].path': must be a file path (got 5)"),
    ({"lora_configs": [{"path": "a.safetensors", "strength": float("nan")}]}, "lora_configs[0].strength"),
    ({"ram_budget_gb": float("nan")}, "config key 'ram_budget_gb': must be a positive finite number of GB"),
    ({"vram_budget_gb": 0}, "config key 'vram_budget_gb'"),
    ({"text_len": 100000000}, "config key 'text_len': must be positive, at most 4096"),
    ({"target_video_length": 10001}, "config key 'target_video_length': frame count must be between 1 and 4093"),
    ({"target_height": 16 * 2000}, "config key 'target_height'"),
])
def test_values_that_failed_late_are_refused_when_read(tmp_path, raw, expected, capsys):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"model_path": "builtin:tiny", **raw}))  # json writes NaN as Python reads it
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert expected in str(exc.value)
    manifest = write_manifest(tmp_path / "m.parquet", [{"prompt": "a"}])
    assert cli(["validate", "--manifest", str(manifest), "--config", str(path)]) == 2  # validate and run agree
    assert expected in capsys.readouterr().out
    assert cli(["run", "--manifest", str(manifest), "--config", str(path), "--store", str(tmp_path / "s"),
                "--output-dir", str(tmp_path / "o")]) == 2
    assert expected in capsys.readouterr().out


@pytest.mark.parametrize("column,value,expected", [
    ("guide_scale", float("nan"), "row 1: column 'guide_scale' is nan: give a finite number, or null"),
    ("shift", float("inf"), "row 1: column 'shift' is inf"),
    ("num_frames", 10001, "row 1: column 'num_frames': frame count must be between 1 and 4093"),
])
def test_row_values_that_failed_late_name_the_column(tmp_path, column, value, expected):
    from pipeline.manifest import read_manifest

    jobs = read_manifest(write_manifest(tmp_path / "m.parquet", [{"prompt": "fine"}, {"prompt": "b", column: value}]),
                         load_config(None))
    assert jobs[0].error is None and expected in jobs[1].error


def test_row_guide_scale_null_keeps_the_config_value(tmp_path):
    import pyarrow as pa

    from pipeline.manifest import read_manifest

    schema = pa.schema([("prompt", pa.string()), ("guide_scale", pa.float64())])
    jobs = read_manifest(write_manifest(tmp_path / "m.parquet", [{"prompt": "a", "guide_scale": None}], schema),
                         load_config(None))
    assert jobs[0].error is None and "sample_guide_scale" not in jobs[0].overrides


def test_use_tiling_vae_tiles_the_vae_and_stays_close(tiny_root):
    """use_tiling_vae: get_model's VAE is diffusers' tiled AutoencoderKLWan; at 320x320 (tiles of 256 with a
    stride of 192) the decode differs from the whole-frame decode only by the blended seams."""
    import torch

    from pipeline.runtime import get_model
    from pipeline.manifest import Job
    from pipeline.plan import Planner, StageSpec
    from pipeline.stages.decode import decode_latents

    def vae(tiling: bool):
        cfg = parse_config({"model_path": "builtin:tiny", "device": "cpu", "use_tiling_vae": tiling,
                            "target_video_length": 5, "target_height": 64, "target_width": 64})
        plan = Planner(cfg).plan(Job(row=0, job_id="a", prompt="p", negative_prompt=None, image=None, seed=1))
        spec = StageSpec.from_dict(plan.stages()["decode"].to_dict())
        return get_model(spec, spec.fingerprint)

    tiled, whole = vae(True), vae(False)
    assert tiled is not whole and tiled.use_tiling and not whole.use_tiling
    y, x = torch.meshgrid(torch.linspace(-1, 1, 320), torch.linspace(-1, 1, 320), indexing="ij")
    image = torch.stack([x, y, x * y])[None, :, None]  # a smooth 320x320 frame, [1, 3, 1, H, W]
    with torch.no_grad():
        mean = torch.tensor(whole.config.latents_mean).view(1, -1, 1, 1, 1)
        std = torch.tensor(whole.config.latents_std).view(1, -1, 1, 1, 1)
        latents = (whole.encode(image).latent_dist.mode() - mean) / std
        a, b = decode_latents(tiled, latents), decode_latents(whole, latents)
    err = (a - b).abs()
    off = (err > 0.1).float().mean().item()
    print(f"\ntiled vs whole decode at 320x320 (tiny VAE): max {err.max():.3f}, mean {err.mean():.4f}, "
          f"{off:.2%} of values off by > 0.1")
    assert a.shape == b.shape == (1, 320, 320, 3)
    assert err.max() > 0  # the tiles were used
    assert err.mean() < 0.02 and off < 0.05  # the error sits at the seams


def test_model_cls_must_fit_the_model_folder(tiny_root, tmp_path, capsys):
    from pipeline.models.loader import resolve_model

    with pytest.raises(CheckpointError, match="'model_cls': wan2.1 needs a wan2.1 model, but .* is a wan2.2 model"):
        resolve_model(parse_config({"model_path": "builtin:tiny", "model_cls": "wan2.1"}), "t2v")
    assert resolve_model(parse_config({"model_path": "builtin:tiny", "model_cls": "wan2.2_moe"}), "t2v").family == "wan2.2"
    path = _config(tmp_path, model_cls="wan2.1_distill")
    assert cli(["check-config", str(path), "--model-path", str(tiny_root / "t2v")]) == 1
    assert "wan2.1_distill needs a wan2.1 model" in capsys.readouterr().out
