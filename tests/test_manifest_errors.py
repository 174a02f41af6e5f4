"""Manifest and config errors: a clear message naming the row/column/key, and nothing written."""
from __future__ import annotations

import json
import logging
import subprocess
import sys

import pyarrow as pa
import pytest

from conftest import REPO, make_image, read_results, run_batch, write_config, write_manifest
from pipeline.config import load_config, parse_config
from pipeline.errors import ConfigError, ManifestError
from pipeline.manifest import read_manifest
from pipeline.stages.image import check_image


def validate(path, strict=False, config=None):
    return read_manifest(path, config or load_config(), strict=strict, check_image=check_image)


def refused(tmp_path, rows, schema=None, strict=False) -> str:
    manifest = write_manifest(tmp_path / "m.parquet", rows, schema)
    with pytest.raises(ManifestError) as exc:
        validate(manifest, strict=strict)
    # ... and the batch command refuses it too, writing nothing
    assert not run_batch_safely(manifest, tmp_path, strict)
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "store").exists()
    return str(exc.value)


def run_batch_safely(manifest, tmp_path, strict):
    try:
        return run_batch(manifest, tmp_path, strict=strict)
    except ManifestError:
        return False


def test_missing_prompt_column(tmp_path):
    msg = refused(tmp_path, [{"text": "hello", "seed": 1}])
    assert "missing required column 'prompt'" in msg and "text" in msg


def test_duplicate_job_id_names_both_rows(tmp_path):
    msg = refused(tmp_path, [{"job_id": "a", "prompt": "x"}, {"job_id": "b", "prompt": "y"},
                             {"job_id": "a", "prompt": "z"}])
    assert "row 2, column 'job_id': 'a' duplicates row 0" in msg


@pytest.mark.parametrize("job_id", ["../x", "a/b", "..", ".hidden", "a b"])
def test_unsafe_job_id(tmp_path, job_id):
    msg = refused(tmp_path, [{"job_id": job_id, "prompt": "x"}])
    assert "row 0, column 'job_id'" in msg and "not safe as a file name" in msg


def test_every_problem_is_listed_not_just_the_first(tmp_path):
    schema = pa.schema([("prompt", pa.int64()), ("seed", pa.string())])
    msg = refused(tmp_path, [{"prompt": 1, "seed": "x"}], schema=schema)
    assert "column 'prompt' must hold strings" in msg and "column 'seed' must hold numbers" in msg


def test_not_parquet(tmp_path):
    path = tmp_path / "m.parquet"
    path.write_text("prompt\nhello\n")
    with pytest.raises(ManifestError, match="not a readable Parquet file"):
        validate(path)


def test_missing_image_fails_only_that_row(tmp_path, tiny_root):
    image = make_image(tmp_path / "ok.png")
    rows = [{"job_id": "good", "prompt": "a cat", "image": str(image)},
            {"job_id": "bad", "prompt": "a dog", "image": "nope/missing.png"}]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    assert not run_batch(manifest, tmp_path)  # a failed row makes the batch fail...
    results = read_results(tmp_path / "outputs")
    assert results["good"]["status"] == "ok"  # ...but the other rows still run
    assert results["bad"]["status"] == "failed"
    assert "row 1" in results["bad"]["error"] and "column 'image'" in results["bad"]["error"]
    assert "missing.png" in results["bad"]["error"]


def test_strict_refuses_row_problems(tmp_path):
    msg = refused(tmp_path, [{"prompt": "a", "image": "missing.png"}], strict=True)
    assert "row 0" in msg and "image file not found" in msg


@pytest.mark.parametrize("column,value,expected", [
    ("num_frames", 10001, "frame count must be between 1 and 4093"),  # 10 is adjusted to 9, as LightX2V does
    ("height", 100, "positive multiple of 16"),
    ("width", -16, "positive multiple of 16"),
    ("seed", 1.5, "column 'seed' must be a whole number"),
    ("seed", float("nan"), "column 'seed' is NaN"),
    ("prompt", "   ", "column 'prompt' is empty"),
])
def test_bad_row_values_name_row_and_column(tmp_path, column, value, expected):
    row = {"prompt": "ok", column: value}
    jobs = validate(write_manifest(tmp_path / "m.parquet", [{"prompt": "fine"}, row]))
    assert jobs[0].error is None
    assert jobs[1].error.startswith("row 1:") and expected in jobs[1].error
    if column not in ("prompt", "seed"):
        assert f"column '{column}'" in jobs[1].error


def test_unknown_config_key_warns(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    cfg = load_config(write_config(tmp_path / "c.json", not_a_key=1))
    assert "not_a_key" not in cfg.values
    assert any("unknown key 'not_a_key'" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("raw,expected", [
    ({"infer_steps": "40"}, "config key 'infer_steps': expected a positive integer, got str"),
    ({"enable_cfg": 1}, "config key 'enable_cfg': expected true or false"),
    ({"target_video_length": 10001}, "'target_video_length': frame count must be between 1 and 4093"),
    ({"denoising_step_list": [1000, 750], "boundary_step_index": 5}, "'boundary_step_index': must be between 0 and 2"),
    ({"sample_guide_scale": [1, 2, 3]}, "[high_noise_scale, low_noise_scale]"),
])
def test_bad_config_values(raw, expected):
    with pytest.raises(ConfigError) as exc:
        parse_config(raw, source="c.json")
    assert expected in str(exc.value) and "c.json" in str(exc.value)


def test_config_not_json(tmp_path):
    path = tmp_path / "c.json"
    path.write_text("{infer_steps: 4")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(path)


def test_lightx2v_distill_config_loads_unchanged():
    raw = {"infer_steps": 4, "target_video_length": 81, "text_len": 512, "target_height": 480, "target_width": 832,
           "self_attn_1_type": "flash_attn3", "cross_attn_1_type": "flash_attn3", "cross_attn_2_type": "flash_attn3",
           "sample_guide_scale": [4.0, 3.0], "sample_shift": 5.0, "enable_cfg": False, "cpu_offload": True,
           "offload_granularity": "model", "t5_cpu_offload": False, "vae_cpu_offload": False,
           "boundary_step_index": 2, "denoising_step_list": [1000, 750, 500, 250]}
    cfg = parse_config(raw)
    assert cfg.is_distilled and cfg["enable_cfg"] is False and cfg["boundary_step_index"] == 2


def test_cli_reports_refused_manifest_with_exit_code(tmp_path):
    manifest = write_manifest(tmp_path / "m.parquet", [{"job_id": "../evil", "prompt": "x"}])
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "--manifest", str(manifest),
                           "--output-dir", str(tmp_path / "o"), "--store", str(tmp_path / "s")],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    assert "'../evil' is not safe as a file name" in proc.stdout
    assert not (tmp_path / "o").exists() and not (tmp_path / "s").exists()


def test_luigi_exit_code_is_nonzero_when_a_row_fails(tmp_path, tiny_root):
    rows = [{"job_id": "ok", "prompt": "a", "num_frames": 5, "infer_steps": 2},
            {"job_id": "bad", "prompt": "b", "image": "missing.png"}]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    proc = subprocess.run([sys.executable, "-m", "luigi", "--module", "pipeline", "RunManifest", "--manifest",
                           str(manifest), "--output-dir", str(tmp_path / "o"), "--store", str(tmp_path / "s")],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 30, proc.stdout + proc.stderr
    results = read_results(tmp_path / "o")
    assert results["ok"]["status"] == "ok" and results["bad"]["status"] == "failed"


def test_default_config_file_in_configs_is_the_embedded_one():
    from pipeline.config import default_config_path

    assert json.loads((REPO / "configs" / "wan22_moe_tiny.json").read_text()) == json.loads(
        default_config_path().read_text())
