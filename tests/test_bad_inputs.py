"""A corpus of bad inputs (manifests, images, configs, checkpoints), each checked for a message that names the
problem (row, column, key or file), and a failing run that never overwrites or deletes what earlier runs made.

Manifest-level problems refuse the manifest (ManifestError listing every problem); row-level problems mark the
row failed (Job.error) and let the others run. Config problems raise ConfigError naming the key; checkpoint
problems raise CheckpointError naming the file (or tensor key) when the model is resolved or loaded.
Seeds the pipeline cannot use (outside 0..2^63-1, NaN, fractional) are row problems that still give a report.
Hostile state and disks have corpora of their own: tests/test_luigid_state.py (luigid state folders others could
write) and tests/test_store_and_output_disks.py (a full store disk, a read-only output folder, file modes).
"""
from __future__ import annotations

import json
import logging
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import make_image, read_results, run_batch, write_config, write_manifest
from pipeline.config import load_config, parse_config
from pipeline.errors import CheckpointError, ConfigError, ManifestError
from pipeline.manifest import read_manifest
from pipeline.stages.image import check_image, load_image_rgb


def validate(path: Path, config=None):
    return read_manifest(path, config or load_config(), check_image=check_image)


def parquet(tmp: Path, columns: dict, name: str = "m.parquet") -> Path:
    """A manifest from explicit columns (pyarrow arrays or python lists), so types are what the case says."""
    path = tmp / name
    pq.write_table(pa.table(columns), path)
    return path


# ------------------------------------------------------------------------------------ images (files only)
def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def image_file(tmp: Path, kind: str) -> Path:
    """A bad (or unusual) image file of the given kind."""
    p = tmp / f"{kind}.png"
    if kind == "missing":
        return tmp / "no-such-image.png"
    if kind == "text":
        p.write_text("this is not an image\n")
    elif kind == "empty":
        p.write_bytes(b"")
    elif kind == "truncated":
        good = make_image(tmp / "whole.png", size=(64, 64))
        p.write_bytes(good.read_bytes()[:120])
    elif kind == "tiny-1x1":
        make_image(p, size=(1, 1))
    elif kind == "folder":
        p.mkdir()
    elif kind == "huge-header":  # a valid PNG header claiming 40000 x 40000 pixels: a decompression bomb
        ihdr = struct.pack(">IIBBBBB", 40000, 40000, 8, 0, 0, 0, 0)
        p.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) +
                      png_chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + png_chunk(b"IEND", b""))
    else:
        raise ValueError(kind)
    return p


# (kind, words the row's error must contain besides the file name)
BAD_IMAGES = [
    ("missing", ["image file not found"]),
    ("text", ["not an image"]),
    ("empty", ["not an image"]),
    ("truncated", ["damaged or truncated"]),
    ("tiny-1x1", ["1x1", "smaller than 16"]),
    ("folder", ["not a file"]),
    ("huge-header", ["too large", "1600000000 pixels"]),
]


@pytest.mark.parametrize("kind,words", BAD_IMAGES, ids=[k for k, _ in BAD_IMAGES])
def test_bad_image_fails_its_row_naming_row_column_and_file(tmp_path, kind, words):
    bad = image_file(tmp_path, kind)
    good = make_image(tmp_path / "good.png")
    jobs = validate(parquet(tmp_path, {"prompt": ["fine", "bad image"], "image": [str(good), str(bad)]}))
    assert jobs[0].error is None
    err = jobs[1].error
    assert err.startswith("row 1:") and "column 'image'" in err and bad.name in err, err
    for w in words:
        assert w in err, err


def test_cmyk_jpeg_is_converted_not_refused(tmp_path):
    from PIL import Image

    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[..., 0] = 255  # pure red
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=100)
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    out = np.asarray(load_image_rgb(str(tmp_path / "cmyk.jpg")))
    assert out.shape == (32, 32, 3)
    assert out[..., 0].mean() > 240 and out[..., 1:].mean() < 15  # still red after CMYK -> RGB


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    from PIL import Image

    grey = np.full((20, 20), 32768, np.uint16)  # half of 16-bit full scale
    Image.fromarray(grey).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    out = np.asarray(load_image_rgb(str(tmp_path / "g16.png")))
    assert out.shape == (20, 20, 3) and abs(int(out.mean()) - 128) <= 1  # 32768/65535*255, not 255


def test_alpha_image_is_flattened_on_white(tmp_path):
    from PIL import Image

    Image.new("RGBA", (24, 24), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    out = np.asarray(load_image_rgb(str(tmp_path / "clear.png")))
    assert out.min() == 255  # transparent black becomes the white background, not black


# --------------------------------------------------------------------------------------- manifest level
def _not_parquet(tmp):
    p = tmp / "m.parquet"
    p.write_text("prompt,seed\nhello,1\n")
    return p


def _empty_file(tmp):
    p = tmp / "m.parquet"
    p.write_bytes(b"")
    return p


def _truncated_parquet(tmp):
    p = parquet(tmp, {"prompt": ["a"] * 50})
    p.write_bytes(p.read_bytes()[:-30])
    return p


def _folder(tmp):
    (tmp / "m.parquet").mkdir()
    return tmp / "m.parquet"


MANIFEST_LEVEL = [  # (id, builder, words the ManifestError must contain)
    ("not-parquet", _not_parquet, ["m.parquet", "not a readable Parquet file"]),
    ("empty-file", _empty_file, ["m.parquet", "not a readable Parquet file"]),
    ("truncated-parquet", _truncated_parquet, ["m.parquet", "not a readable Parquet file"]),
    ("missing-file", lambda t: t / "nope.parquet", ["nope.parquet", "file not found"]),
    ("folder-not-file", _folder, ["m.parquet", "not a file"]),
    ("no-rows", lambda t: parquet(t, {"prompt": pa.array([], pa.string())}), ["no rows"]),
    ("no-prompt-column", lambda t: parquet(t, {"text": ["a"], "seed": [1]}),
     ["missing required column 'prompt'", "text, seed"]),
    ("prompt-not-string", lambda t: parquet(t, {"prompt": [1, 2]}), ["column 'prompt' must hold strings", "int64"]),
    ("prompt-is-list", lambda t: parquet(t, {"prompt": [["a", "b"]]}), ["column 'prompt' must hold strings", "list"]),
    ("seed-not-number", lambda t: parquet(t, {"prompt": ["a"], "seed": ["42"]}),
     ["column 'seed' must hold numbers", "string"]),
    ("height-bool", lambda t: parquet(t, {"prompt": ["a"], "height": [True]}), ["column 'height' must hold numbers"]),
    ("image-not-string", lambda t: parquet(t, {"prompt": ["a"], "image": [3]}), ["column 'image' must hold strings"]),
    ("duplicate-job-id", lambda t: parquet(t, {"prompt": ["a", "b", "c"], "job_id": ["x", "y", "x"]}),
     ["row 2, column 'job_id': 'x' duplicates row 0"]),
    ("job-id-dotdot", lambda t: parquet(t, {"prompt": ["a"], "job_id": ["../x"]}),
     ["row 0, column 'job_id'", "'../x'", "not safe as a file name"]),
    ("job-id-slash", lambda t: parquet(t, {"prompt": ["a"], "job_id": ["a/b"]}),
     ["row 0, column 'job_id'", "'a/b'", "not safe"]),
    ("job-id-backslash", lambda t: parquet(t, {"prompt": ["a"], "job_id": ["a\\b"]}), ["'a\\\\b'", "not safe"]),
    ("job-id-absolute", lambda t: parquet(t, {"prompt": ["a"], "job_id": ["/etc/passwd"]}), ["not safe"]),
    ("job-id-empty", lambda t: parquet(t, {"prompt": ["a"], "job_id": [""]}), ["row 0, column 'job_id'", "not safe"]),
    ("job-id-too-long", lambda t: parquet(t, {"prompt": ["a"], "job_id": ["x" * 200]}), ["not safe"]),
    ("job-id-newline", lambda t: parquet(t, {"prompt": ["a"], "job_id": ["a\nb"]}), ["not safe"]),
    ("all-problems-listed", lambda t: parquet(t, {"prompt": ["a", "b"], "job_id": ["../x", "a/b"]}),
     ["2 problem(s)", "row 0", "row 1"]),
]


@pytest.mark.parametrize("case,build,words", MANIFEST_LEVEL, ids=[c for c, _, _ in MANIFEST_LEVEL])
def test_manifest_level_problem_refuses_the_manifest(tmp_path, case, build, words):
    path = build(tmp_path)
    with pytest.raises(ManifestError) as exc:
        validate(path)
    msg = str(exc.value)
    for w in words:
        assert w in msg, msg


# -------------------------------------------------------------------------------------------- row level
ROW_LEVEL = [  # (id, column, value, pyarrow type, words the row's error must contain)
    ("nan-seed", "seed", float("nan"), pa.float64(), ["column 'seed'", "NaN"]),
    ("inf-seed", "seed", float("inf"), pa.float64(), ["column 'seed'", "whole number"]),
    ("fractional-seed", "seed", 1.5, pa.float64(), ["column 'seed'", "whole number", "1.5"]),
    ("negative-seed", "seed", -1, pa.int64(), ["column 'seed'", "between 0 and 2^63-1", "-1"]),
    ("seed-too-big", "seed", 2**64 - 1, pa.uint64(), ["column 'seed'", "between 0 and 2^63-1"]),
    ("seed-2^63", "seed", 2**63, pa.uint64(), ["column 'seed'", "between 0 and 2^63-1", str(2**63)]),
    ("seed-1e30", "seed", 1e30, pa.float64(), ["column 'seed'", "between 0 and 2^63-1", "1e+30"]),
    ("negative-height", "height", -480, pa.int64(), ["column 'height'", "positive multiple of 16", "-480"]),
    ("zero-width", "width", 0, pa.int64(), ["column 'width'", "positive multiple of 16"]),
    ("width-not-16", "width", 100, pa.int64(), ["column 'width'", "multiple of 16", "100"]),
    ("height-not-16", "height", 40, pa.int64(), ["column 'height'", "multiple of 16", "40"]),
    ("frames-too-many", "num_frames", 10001, pa.int64(), ["column 'num_frames'", "between 1 and 4093", "10001"]),
    ("frames-zero", "num_frames", 0, pa.int64(), ["column 'num_frames'", "between 1 and"]),
    ("nan-guidance", "guide_scale", float("nan"), pa.float64(), ["column 'guide_scale'", "nan", "null"]),
    ("frames-fractional", "num_frames", 17.5, pa.float64(), ["column 'num_frames'", "whole number"]),
    ("zero-steps", "infer_steps", 0, pa.int64(), ["column 'infer_steps'", "must be positive"]),
    ("negative-steps", "infer_steps", -4, pa.int64(), ["column 'infer_steps'", "must be positive"]),
    ("infinite-guidance", "guide_scale", float("inf"), pa.float64(), ["column 'guide_scale'", "finite"]),
    ("negative-shift", "shift", -1.0, pa.float64(), ["column 'shift'", "positive"]),
    ("empty-prompt", "prompt", "", pa.string(), ["column 'prompt' is empty"]),
    ("blank-prompt", "prompt", " \t\n", pa.string(), ["column 'prompt' is empty"]),
    ("null-prompt", "prompt", None, pa.string(), ["column 'prompt' is empty"]),
]


@pytest.mark.parametrize("case,column,value,typ,words", ROW_LEVEL, ids=[c[0] for c in ROW_LEVEL])
def test_row_level_problem_fails_only_that_row(tmp_path, case, column, value, typ, words):
    good = {"prompt": "fine", "seed": 1, "height": 64, "width": 64, "num_frames": 5, "infer_steps": 2,
            "guide_scale": 4.0, "shift": 5.0}
    types = {"prompt": pa.string(), "seed": pa.int64(), "height": pa.int64(), "width": pa.int64(),
             "num_frames": pa.int64(), "infer_steps": pa.int64(), "guide_scale": pa.float64(),
             "shift": pa.float64()}
    types[column] = typ
    bad = dict(good, **{column: value})
    table = pa.table({c: pa.array([good[c], bad[c]], types[c]) for c in good})
    pq.write_table(table, tmp_path / "m.parquet")
    jobs = validate(tmp_path / "m.parquet")
    assert jobs[0].error is None, jobs[0].error
    assert jobs[1].error is not None and jobs[1].error.startswith("row 1:"), jobs[1].error
    for w in words:
        assert w in jobs[1].error, jobs[1].error
    with pytest.raises(ManifestError, match="row 1"):  # --strict refuses instead
        read_manifest(tmp_path / "m.parquet", load_config(), strict=True, check_image=check_image)


SEED_RUNS = [  # (id, seed column with a good row first, the refused seed as the error shows it, in results)
    ("uint64-2^64-1", pa.array([1, 2**64 - 1], pa.uint64()), str(2**64 - 1), None),
    ("uint64-2^63", pa.array([1, 2**63], pa.uint64()), str(2**63), None),
    ("float-1e30", pa.array([1.0, 1e30], pa.float64()), "1e+30", None),
    ("float-nan", pa.array([1.0, float("nan")], pa.float64()), "NaN", None),
    ("negative", pa.array([1, -5], pa.int64()), "-5", -5),  # fits int64: the report shows what the row had
]


@pytest.fixture(scope="module")
def seed_store(tmp_path_factory):
    return tmp_path_factory.mktemp("seed-store")  # shared: the good row is computed once for all cases


@pytest.mark.parametrize("case,seeds,shown,reported", SEED_RUNS, ids=[c[0] for c in SEED_RUNS])
def test_refused_seed_fails_its_row_and_results_are_written(tmp_path, tiny_root, seed_store, case, seeds, shown,
                                                            reported):
    """A seed the pipeline cannot use (torch's manual_seed and the int64 report both hold 0..2^63-1) fails its
    row; it never reaches a stage or results.parquet as a number (it used to overflow writing the report, so
    no row of the batch had a report). A null seed is the config's."""
    config = write_config(tmp_path / "c.json", infer_steps=2, target_video_length=5, target_height=32,
                          target_width=32, text_len=32, enable_cfg=False, seed=7)
    table = pa.table({"job_id": ["good", "bad", "default"], "prompt": ["a red circle", "a blue square", "a cat"],
                      "seed": pa.concat_arrays([seeds, pa.nulls(1, seeds.type)])})
    pq.write_table(table, tmp_path / "m.parquet")
    assert not run_batch(tmp_path / "m.parquet", tmp_path, config=config, store=seed_store)
    results = read_results(tmp_path / "outputs")
    assert results["good"]["status"] == "ok" and results["good"]["seed"] == 1
    assert results["default"]["status"] == "ok" and results["default"]["seed"] == 7  # the seed it was made with
    bad = results["bad"]
    assert bad["status"] == "failed" and bad["video"] is None
    assert bad["error"].startswith("row 1:") and "column 'seed'" in bad["error"] and shown in bad["error"], bad
    assert bad["seed"] == reported, bad  # never the config's seed, which the row did not ask for
    assert not (tmp_path / "outputs" / "bad.mp4").exists()


def test_unknown_manifest_column_is_named_in_a_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        jobs = validate(parquet(tmp_path, {"prompt": ["a"], "promt_2": ["typo"]}))
    assert jobs[0].error is None
    assert any("promt_2" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------------------------- configs
CONFIG_CASES = [  # (id, raw JSON object, words the ConfigError must contain)
    ("int-as-string", {"infer_steps": "40"}, ["'infer_steps'", "got str"]),
    ("bool-as-int", {"infer_steps": True}, ["'infer_steps'", "got bool"]),
    ("float-as-int", {"target_video_length": 81.0}, ["'target_video_length'", "got float"]),
    ("list-as-bool", {"enable_cfg": [True]}, ["'enable_cfg'", "true or false"]),
    ("boundary-index-past-steps", {"denoising_step_list": [1000, 750, 500, 250], "boundary_step_index": 7},
     ["'boundary_step_index'", "between 0 and 4", "7"]),
    ("negative-boundary-index", {"denoising_step_list": [1000, 500], "boundary_step_index": -1},
     ["'boundary_step_index'", "between 0 and 2"]),
    ("increasing-step-list", {"denoising_step_list": [250, 500, 750, 1000]},
     ["'denoising_step_list'", "strictly decreasing"]),
    ("empty-step-list", {"denoising_step_list": []}, ["'denoising_step_list'", "non-empty"]),
    ("step-out-of-range", {"denoising_step_list": [2000, 500]}, ["'denoising_step_list'", "(0, 1000]"]),
    ("boundary-above-1", {"boundary": 1.5}, ["'boundary'", "between 0 and 1"]),
    ("frames-too-many", {"target_video_length": 10001}, ["'target_video_length'", "between 1 and 4093"]),
    ("dtype-int8", {"dtype": "int8"}, ["'dtype'", "float32, bfloat16", "'int8'"]),
    ("device-gpu", {"device": "gpu"}, ["'device'", "cuda:N", "'gpu'"]),
    ("lora-path-int", {"lora_configs": [{"path": 5}]}, ["'lora_configs[0].path'", "file path"]),
    ("ram-budget-nan", {"ram_budget_gb": float("nan")}, ["'ram_budget_gb'", "finite"]),
    ("text-len-huge", {"text_len": 100000000}, ["'text_len'", "at most 4096"]),
    ("height-not-16", {"target_height": 470}, ["'target_height'", "multiple of 16"]),
    ("crf-out-of-range", {"video_crf": 99}, ["'video_crf'", "0..51"]),
    ("guidance-triple", {"sample_guide_scale": [1, 2, 3]}, ["'sample_guide_scale'", "[high_noise_scale"]),
    ("negative-shift", {"sample_shift": -1}, ["'sample_shift'", "positive"]),
    ("zero-text-len", {"text_len": 0}, ["'text_len'", "positive"]),
    ("unknown-task", {"task": "x2v"}, ["'task'", "t2v or i2v"]),
    ("lora-entry-without-path", {"lora_configs": [{"name": "high_noise_model"}]}, ["'lora_configs[0]'", "'path'"]),
    ("lora-bad-name", {"lora_configs": [{"name": "middle", "path": "x.safetensors"}]},
     ["'lora_configs[0].name'", "'middle'"]),
    ("two-problems", {"model_path": "builtin:tiny", "infer_steps": "x", "video_crf": 99},
     ["2 problem(s)", "'infer_steps'", "'video_crf'"]),
    ("no-model", {"infer_steps": 4}, ["no model", "--model-path"]),
    ("negative-seed", {"model_path": "builtin:tiny", "seed": -1}, ["'seed'", "between 0 and 2^63-1", "-1"]),
    ("seed-2^64-1", {"model_path": "builtin:tiny", "seed": 2**64 - 1}, ["'seed'", "between 0 and 2^63-1", str(2**64 - 1)]),
]


@pytest.mark.parametrize("case,raw,words", CONFIG_CASES, ids=[c for c, _, _ in CONFIG_CASES])
def test_bad_config_names_the_key_and_the_file(tmp_path, case, raw, words):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    msg = str(exc.value)
    assert str(path) in msg
    for w in words:
        assert w in msg, msg


@pytest.mark.parametrize("text,words", [
    ("{infer_steps: 4}", ["not valid JSON", "line 1 column 2"]),
    ('{"infer_steps": 4,\n "seed": }', ["not valid JSON", "line 2"]),
    ("", ["not valid JSON"]),
    ("[1, 2]", ["top level must be a JSON object"]),
    ('{"seed": NaN}', ["'seed'"]),  # Python's json reads NaN: it is then not an integer
], ids=["unquoted-key", "missing-value", "empty", "array", "nan"])
def test_config_file_that_is_not_a_json_object(tmp_path, text, words):
    path = tmp_path / "c.json"
    path.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    for w in [str(path), *words]:
        assert w in str(exc.value), str(exc.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load_config(tmp_path / "nope.json")
    assert "nope.json" in str(exc.value) and "cannot read the file: No such file" in str(exc.value)


def test_unknown_config_key_is_named_in_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        cfg = parse_config({"infer_stepz": 4}, source="c.json")
    assert cfg["infer_steps"] == 40  # the typo did not silently change anything
    assert any("'infer_stepz'" in r.getMessage() and "c.json" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------------- prompts (needs model)
def test_prompt_longer_than_text_len_is_truncated_with_a_warning(tiny_root, caplog):
    from transformers import AutoTokenizer, UMT5EncoderModel

    from pipeline.stages.text import encode_text

    tokenizer = AutoTokenizer.from_pretrained(tiny_root / "t2v" / "tokenizer")
    encoder = UMT5EncoderModel.from_pretrained(tiny_root / "t2v" / "text_encoder").eval()
    prompt = "a red circle moving left on a blue background with a cat and a dog on the beach at sunset"
    with caplog.at_level(logging.WARNING):
        context, n = encode_text(tokenizer, encoder, prompt, text_len=8)
    assert context.shape[1] == 8 and n == 8
    msgs = [r.getMessage() for r in caplog.records]
    assert any("more than text_len=8" in m and "truncated" in m and "a red circle" in m for m in msgs), msgs


# ------------------------------------------------------------------------------------------ checkpoints
W = "transformer/diffusion_pytorch_model.safetensors"
KEY = "blocks.0.attn1.to_q.weight"


def _copy_model(tiny_root: Path, dest: Path) -> Path:
    shutil.copytree(tiny_root / "t2v", dest)
    return dest


def _edit_weights(path: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    sd = load_file(path)
    edit(sd)
    save_file(sd, path)


def _break_missing_shard(d: Path) -> None:
    from safetensors.torch import load_file, save_file

    sd = load_file(d / W)
    (d / W).unlink()
    keys = sorted(sd)
    names = ["diffusion_pytorch_model-00001-of-00002.safetensors", "diffusion_pytorch_model-00002-of-00002.safetensors"]
    save_file({k: sd[k] for k in keys[: len(keys) // 2]}, d / "transformer" / names[0])
    index = {"metadata": {}, "weight_map": {k: names[i >= len(keys) // 2] for i, k in enumerate(keys)}}
    (d / "transformer" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


# (id, how to break a copy of the tiny T2V model, component to load, extra config, words the error must contain)
CHECKPOINTS = [
    ("missing-shard", _break_missing_shard, "high", {},
     ["diffusion_pytorch_model.safetensors.index.json", "missing", "00002-of-00002"]),
    ("wrong-shape", lambda d: _edit_weights(d / W, lambda sd: sd.__setitem__(KEY, torch.zeros(5, 7))), "high", {},
     ["model/transformer", KEY, "{tuple}", "(5, 7)"]),
    ("wrong-dtype", lambda d: _edit_weights(d / W, lambda sd: sd.__setitem__(KEY, sd[KEY].to(torch.int32))),
     "high", {}, [KEY, "int32"]),
    ("missing-key", lambda d: _edit_weights(d / W, lambda sd: sd.pop(KEY)), "high", {}, [KEY]),
    ("truncated-safetensors", lambda d: _truncate(d / W), "high", {}, ["diffusion_pytorch_model.safetensors"]),
    ("truncated-t5", lambda d: _truncate(d / "text_encoder" / "model.safetensors"), "text", {},
     ["text_encoder", "model.safetensors"]),
    ("no-model-index", lambda d: (d / "model_index.json").unlink(), "high", {}, ["model_index.json", "layout"]),
    ("model-index-not-json", lambda d: (d / "model_index.json").write_text("{"), "high", {},
     ["model_index.json", "cannot read"]),
    ("no-vae-folder", lambda d: shutil.rmtree(d / "vae"), "vae", {}, ["'vae' folder"]),
]


def _real_shape(tiny_root: Path, word: str) -> str:
    """Fill in the real shape of KEY in a message word ({tuple})."""
    from safetensors import safe_open

    with safe_open(str(tiny_root / "t2v" / W), framework="pt") as f:
        shape = f.get_slice(KEY).get_shape()
    return word.format(tuple=tuple(shape))


def _load_error(model: Path, component: str, extra: dict) -> str:
    from pipeline.models.loader import fingerprint, load_component, resolve_model

    cfg = parse_config({"model_path": str(model), **extra}, source="c.json", base_dir=model.parent)
    with pytest.raises(CheckpointError) as exc:
        ref = resolve_model(cfg, "t2v")
        fingerprint(ref, component)  # what planning does
        load_component(ref, component, torch.device("cpu"), torch.float32)  # what the stage does
    return str(exc.value)


@pytest.mark.parametrize("case,brk,component,extra,words", CHECKPOINTS,
                         ids=[c[0] for c in CHECKPOINTS])
def test_broken_checkpoint_names_the_file_or_key(tmp_path, tiny_root, case, brk, component, extra, words):
    model = _copy_model(tiny_root, tmp_path / "model")
    brk(model)
    msg = _load_error(model, component, extra)
    for w in words:
        assert _real_shape(tiny_root, w) in msg, msg


def test_model_folder_not_found(tmp_path):
    from pipeline.models.loader import resolve_model

    cfg = parse_config({"model_path": "no/such/model"}, source="c.json", base_dir=tmp_path)
    with pytest.raises(CheckpointError, match=r"model folder not found: .*no/such/model.*model_path"):
        resolve_model(cfg, "t2v")


def _single_file(tiny_root: Path, tmp: Path, edit=None) -> Path:
    """The high expert as one LightX2V-style safetensors file (Wan key names), optionally edited."""
    from pipeline.testing import standins

    path = tmp / "high.safetensors"
    standins.write_single_file(tiny_root / "t2v" / "transformer", path)
    if edit:
        _edit_weights(path, edit)
    return path


SQ = "blocks.0.self_attn.q.weight"  # Wan's name of KEY
SINGLE_FILES = [
    ("wrong-shape", lambda sd: sd.__setitem__(SQ, torch.zeros(5, 7)), ["high.safetensors", SQ, "(5, 7)", "{tuple}"]),
    ("missing-key", lambda sd: sd.pop(SQ), ["high.safetensors", "missing weight", KEY]),
    ("wrong-dtype", lambda sd: sd.__setitem__(SQ, sd[SQ].to(torch.int32)), ["high.safetensors", "int32"]),
    ("truncated", "truncate", ["high.safetensors"]),
]


@pytest.mark.parametrize("case,edit,words", SINGLE_FILES,
                         ids=[c[0] for c in SINGLE_FILES])
def test_broken_single_file_expert_names_the_file_or_key(tmp_path, tiny_root, case, edit, words):
    path = _single_file(tiny_root, tmp_path, None if edit == "truncate" else edit)
    if edit == "truncate":
        _truncate(path)
    msg = _load_error(tiny_root / "t2v", "high", {"high_noise_original_ckpt": str(path)})
    for w in words:
        assert _real_shape(tiny_root, w) in msg, msg


def _gguf_pair(tiny_root: Path, tmp: Path) -> dict:
    from pipeline.testing import standins

    for expert, sub in (("high", "transformer"), ("low", "transformer_2")):
        standins.write_gguf_expert(tiny_root / "t2v" / sub, tmp / f"{expert}.gguf", "Q8_0")
    return dict(dit_quantized=True, dit_quant_scheme="gguf-Q8_0", high_noise_quantized_ckpt=str(tmp / "high.gguf"),
                low_noise_quantized_ckpt=str(tmp / "low.gguf"))


def _set_gguf_type(path: Path, type_id: int) -> str:
    """Rewrite the ggml type of the first quantized tensor in a GGUF file's tensor table; returns its name."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    name = next(t.name for t in reader.tensors if t.tensor_type.name == "Q8_0")
    del reader
    data = bytearray(path.read_bytes())
    raw = name.encode()
    pos = data.find(struct.pack("<Q", len(raw)) + raw) + 8 + len(raw)  # name: u64 length + bytes
    n_dims = struct.unpack_from("<I", data, pos)[0]
    struct.pack_into("<I", data, pos + 4 + 8 * n_dims, type_id)  # then n_dims u32, dims u64 each, type u32
    path.write_bytes(bytes(data))
    return name


def test_gguf_with_an_unknown_quant_type_names_the_file(tmp_path, tiny_root):
    extra = _gguf_pair(tiny_root, tmp_path)
    _set_gguf_type(tmp_path / "high.gguf", 200)
    msg = _load_error(tiny_root / "t2v", "high", extra)
    assert "high.gguf" in msg and "200" in msg and "GGMLQuantizationType" in msg, msg


def test_gguf_scheme_that_does_not_fit_the_file(tmp_path, tiny_root):
    extra = _gguf_pair(tiny_root, tmp_path)
    extra["high_noise_quantized_ckpt"] = str(_single_file(tiny_root, tmp_path))
    msg = _load_error(tiny_root / "t2v", "high", extra)
    assert "gguf-Q8_0" in msg and "high.safetensors" in msg and "not a .gguf file" in msg, msg


def _lora_case(tiny_root: Path, tmp: Path, kind: str) -> tuple[Path, list[str]]:
    from safetensors.torch import save_file

    from pipeline.testing import standins

    path = tmp / f"{kind}.safetensors"
    if kind == "missing":
        return path, ["lora_configs[0]", "LoRA file not found", str(path)]
    if kind == "foreign-keys":  # entries for layers this model does not have
        save_file({"diffusion_model.blocks.99.self_attn.q.lora_down.weight": torch.zeros(4, 24),
                   "diffusion_model.blocks.99.self_attn.q.lora_up.weight": torch.zeros(24, 4),
                   "diffusion_model.head.extra.lora_down.weight": torch.zeros(4, 8),
                   "diffusion_model.head.extra.lora_up.weight": torch.zeros(8, 4)}, path)
        return path, [path.name, "high expert", "blocks.99.self_attn.q", "head.extra"]
    if kind == "wrong-rank-shape":  # a LoRA for a model with wider layers
        sd = standins.write_lora(tiny_root / "t2v" / "transformer", tmp / "base.safetensors", diffs=False)
        save_file({k: torch.zeros(v.shape[0], 7) if k.endswith("lora_down.weight") else v for k, v in sd.items()}, path)
        return path, [path.name, "does not fit the high expert", "blocks.0.attn2.to_k.weight"]
    if kind == "not-a-lora":
        save_file({"foo": torch.zeros(3)}, path)
        return path, [path.name, "has no LoRA entries", "'foo'"]
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["missing", "foreign-keys", "wrong-rank-shape", "not-a-lora"])
def test_bad_lora_names_the_file_and_the_keys(tmp_path, tiny_root, kind):
    path, words = _lora_case(tiny_root, tmp_path, kind)
    msg = _load_error(tiny_root / "t2v", "high", {"lora_configs": [{"name": "high_noise_model", "path": str(path)}]})
    for w in words:
        assert w in msg, msg


# ------------------------------------------------------------------ failing runs never destroy earlier work
def _refused(run) -> bool:
    """Luigi reports a manifest or config refused while scheduling as a failed build (or it raises)."""
    try:
        return not run()
    except (ManifestError, ConfigError):
        return True


def _snapshot(*folders: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p): (p.read_bytes(), p.stat().st_mtime_ns) for f in folders for p in f.rglob("*")
            if p.is_file() and not p.name.endswith(".lock")}


def test_failing_runs_never_overwrite_or_delete_earlier_work(tmp_path, tiny_root):
    """A good batch, then into the same output folder and store: a refused manifest, a refused config, a
    broken checkpoint (every row fails at load), and a row whose image is bad under a job id that already has a
    video. Every file the good run made is still there, byte for byte and untouched (mtime), except
    results.parquet, which is each run's own report (and is not even touched by a refused run)."""
    out, store = tmp_path / "outputs", tmp_path / "store"
    small = dict(infer_steps=2, target_video_length=5, target_height=32, target_width=32, text_len=32)
    config = write_config(tmp_path / "good.json", **small)
    rows = [{"job_id": "a", "prompt": "a red circle", "seed": 1}, {"job_id": "b", "prompt": "a cat", "seed": 2}]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    assert run_batch(manifest, tmp_path, config=config)
    before = _snapshot(out, store)
    report = str(out / "results.parquet")

    def unchanged(allow_report: bool) -> None:
        after = _snapshot(out, store)
        for path, state in before.items():
            if allow_report and path == report:
                continue
            assert after.get(path) == state, f"{path} was changed or deleted"

    refused = write_manifest(tmp_path / "refused.parquet", [{"job_id": "../a", "prompt": "x"}])
    assert _refused(lambda: run_batch(refused, tmp_path, config=config))
    unchanged(allow_report=False)

    bad_config = tmp_path / "bad.json"
    bad_config.write_text(json.dumps({"infer_steps": "two"}))
    assert _refused(lambda: run_batch(manifest, tmp_path, config=bad_config))
    unchanged(allow_report=False)

    model = _copy_model(tiny_root, tmp_path / "broken-model")
    _edit_weights(model / W, lambda sd: sd.__setitem__(KEY, torch.zeros(5, 7)))
    broken = write_config(tmp_path / "broken.json", model_path=str(model), **small)
    assert not run_batch(manifest, tmp_path, config=broken)
    results = read_results(out)
    assert all(r["status"] == "failed" and KEY in r["error"] for r in results.values()), results
    unchanged(allow_report=True)

    bad_image = write_manifest(tmp_path / "img.parquet", [{"job_id": "a", "prompt": "a dog",
                                                            "image": str(tmp_path / "missing.png")}])
    assert not run_batch(bad_image, tmp_path, config=config)
    assert "missing.png" in read_results(out)["a"]["error"]
    unchanged(allow_report=True)
