"""wan-batch inspect: the chain of a job's artifacts, numbers equal to the artifacts', statuses, previews."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import make_image, run_batch, write_config, write_manifest
from pipeline.errors import WanBatchError
from pipeline.inspect import (WAN21_LATENT_RGB_BIAS, WAN21_LATENT_RGB_FACTORS, chain_from_key, chain_from_plan,
                              find_job, inspect_chain, latent_to_rgb, locate, read_video, tensor_stats,
                              write_previews)
from pipeline.store import ArtifactStore

H, W, F = 32, 48, 5
SMALL = dict(target_height=H, target_width=W, target_video_length=F, infer_steps=4, text_len=32)


@pytest.fixture(scope="module")
def batch(tmp_path_factory, tiny_root):
    tmp = tmp_path_factory.mktemp("inspect")
    config = write_config(tmp / "config.json", **SMALL)
    image = make_image(tmp / "first.png", size=(70, 50))
    manifest = write_manifest(tmp / "jobs.parquet", [
        {"job_id": "t2v-job", "prompt": "a red circle moving left", "seed": 3, "image": None},
        {"job_id": "i2v-job", "prompt": "a white circle moving down", "seed": 4, "image": str(image)},
    ])
    assert run_batch(manifest, tmp, config=config)
    return tmp, str(manifest), str(config), ArtifactStore(tmp / "store")


def _reference_stats(t: torch.Tensor) -> dict:
    x = t.double().numpy()
    return {"min": x.min(), "max": x.max(), "mean": x.mean(), "std": x.std()}


def test_job_chain_numbers_match_the_artifacts(batch):
    tmp, manifest, config, store = batch
    plan = find_job(manifest, config, "i2v-job")
    infos, latest = inspect_chain(store, chain_from_plan(plan))
    assert [i.name for i in infos] == ["text", "text-negative", "image", "denoise-high", "denoise-low", "decode"]
    assert all(i.status == "ok" for i in infos), [(i.name, i.detail) for i in infos]
    assert latest and all(i.cache == "miss" and i.run_id == latest for i in infos)  # one run wrote them all
    for info in infos:
        side = json.loads(store.sidecar_path(info.ref).read_text())
        assert info.wall_s == side["wall_s"] and info.sidecar["sha256"] == side["sha256"]
        params = side["params"]
        assert info.model_fingerprint == (params.get("model") or params.get("dit") or params.get("vae"))
        if info.ref.ext == "mp4":
            frames = read_video(store.payload_path(info.ref))
            tensors = {"frames": torch.from_numpy(frames)}
            assert frames.shape == (F, H, W, 3)
        else:
            tensors = load_file(store.payload_path(info.ref))
        assert set(info.tensors) == set(tensors)
        for name, t in tensors.items():
            got, ref = info.tensors[name], _reference_stats(t)
            assert got["shape"] == list(t.shape) and got["dtype"] == str(t.dtype).replace("torch.", "")
            assert got["nan"] == 0 and got["inf"] == 0 and got["numel"] == t.numel()
            for k in ("min", "max", "mean", "std"):
                assert got[k] == pytest.approx(ref[k], rel=1e-9, abs=1e-12), (info.name, name, k)
    latents = infos[3].tensors["latents"]
    assert latents["shape"] == [1, 16, (F - 1) // 4 + 1, H // 8, W // 8]


def test_chain_from_a_key_is_the_jobs_chain(batch):
    tmp, manifest, config, store = batch
    plan = find_job(manifest, config, "t2v-job")
    by_plan = chain_from_plan(plan)
    assert [n for n, _ in by_plan] == ["text", "text-negative", "denoise-high", "denoise-low", "decode"]
    assert chain_from_key(store, plan.decode.key[:10]) == by_plan  # found back through the sidecars
    assert locate(store, plan.decode.upstream["latents"].key).stage == "denoise-low"


def test_bad_keys_and_jobs_are_named(batch):
    tmp, manifest, config, store = batch
    with pytest.raises(WanBatchError, match="no artifact with key 0000ffff"):
        locate(store, "0000ffff")
    with pytest.raises(WanBatchError, match="not a cache key"):
        locate(store, "zz-top")
    with pytest.raises(WanBatchError, match="no job_id 'nope'.*t2v-job"):
        find_job(manifest, config, "nope")


def test_stats_count_nan_and_inf_and_skip_them():
    t = torch.tensor([1.0, 3.0, float("nan"), float("inf"), -float("inf"), 5.0])
    s = tensor_stats(t)
    assert (s["nan"], s["inf"], s["min"], s["max"], s["mean"]) == (1, 2, 1.0, 5.0, 3.0)
    assert s["std"] == pytest.approx(np.std([1.0, 3.0, 5.0]))
    assert tensor_stats(torch.full((3,), float("nan")))["mean"] is None


def test_corrupt_missing_and_failed_artifacts_are_reported(batch, tmp_path):
    tmp, manifest, config, store = batch
    import shutil

    copy = tmp_path / "store"
    shutil.copytree(store.root, copy)
    store2 = ArtifactStore(copy)
    chain = chain_from_plan(find_job(manifest, config, "t2v-job"))
    refs = dict(chain)
    payload = store2.payload_path(refs["denoise-high"])
    data = bytearray(payload.read_bytes())
    data[-1] ^= 0xFF
    payload.write_bytes(bytes(data))
    store2.invalidate(refs["decode"])
    store2.record_failure(refs["decode"], "StageFailed: boom", "run-x")
    store2.invalidate(refs["text"])
    infos = {i.name: i for i in inspect_chain(store2, chain)[0]}
    assert infos["denoise-high"].status == "corrupt" and "sha256" in infos["denoise-high"].detail
    assert infos["decode"].status == "failed" and "boom" in infos["decode"].detail
    assert infos["text"].status == "missing"
    assert infos["denoise-low"].status == "ok"


def test_latent_preview_uses_wans_rgb_factors():
    z = torch.zeros(1, 16, 3, 2, 2)
    z[0, 6] = 1.0  # one channel on: RGB = factor row 6 + bias, mapped from [-1, 1] to [0, 255]
    rgb = latent_to_rgb(z)
    expected = (np.clip((np.array(WAN21_LATENT_RGB_FACTORS[6]) + WAN21_LATENT_RGB_BIAS + 1) / 2, 0, 1) * 255).round()
    assert rgb.shape == (3, 2, 2, 3) and rgb.dtype == np.uint8
    assert (rgb == expected.astype(np.uint8)).all()
    with pytest.raises(WanBatchError, match="16 channels"):
        latent_to_rgb(torch.zeros(1, 4, 1, 2, 2))


def test_previews_exist_with_the_right_sizes(batch, tmp_path):
    tmp, manifest, config, store = batch
    infos, _ = inspect_chain(store, chain_from_plan(find_job(manifest, config, "i2v-job")))
    files = {p.name: p for p in write_previews(store, infos, tmp_path / "prev")}
    expected = {"image_input.png": (W, H), "decode_frame_first.png": (W, H), "decode_frame_middle.png": (W, H),
                "decode_frame_last.png": (W, H), "denoise-high_latents.png": (3 * W, H),
                "denoise-low_latents.png": (3 * W, H), "denoise-high_x0.png": (3 * W, H),
                "denoise-low_x0.png": (3 * W, H)}
    assert set(files) == set(expected)
    for name, size in expected.items():
        with Image.open(files[name]) as img:
            assert img.size == size and img.mode == "RGB", name
    # the input preview is the stored resized/cropped image; the frames are the video's
    with Image.open(files["image_input.png"]) as img:
        stored = store.load_tensors(infos[2].ref)["image"].numpy()
        assert (np.asarray(img) == stored).all()
    frames = read_video(store.payload_path(infos[-1].ref))
    with Image.open(files["decode_frame_last.png"]) as img:
        assert (np.asarray(img) == frames[-1]).all()
    with Image.open(files["denoise-low_latents.png"]) as img:
        latents = store.load_tensors(infos[4].ref)["latents"]
        middle = latent_to_rgb(latents)[latents.shape[2] // 2]
        assert (np.asarray(img)[::8, W:2 * W:8] == middle).all()  # the middle panel, 8x nearest upscale


def test_cli_inspect_table_json_and_exit_codes(batch, tmp_path, capsys):
    from pipeline.cli import main

    tmp, manifest, config, store = batch
    assert main(["inspect", "t2v-job", "--manifest", manifest, "--config", config, "--store", str(store.root),
                 "--preview", str(tmp_path / "p")]) == 0
    out = capsys.readouterr().out
    for name in ("text-negative", "denoise-high", "denoise-low", "decode", "latents", "nan 0"):
        assert name in out
    assert (tmp_path / "p" / "decode_frame_middle.png").is_file()
    plan = find_job(manifest, config, "t2v-job")
    assert main(["inspect", plan.decode.key[:12], "--store", str(store.root), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in doc["stages"]][-1] == "decode" and doc["key"] == plan.decode.key
    assert main(["inspect", "abcdef12", "--store", str(store.root)]) == 2
    assert "no artifact with key abcdef12" in capsys.readouterr().out
