"""Corrupted artifacts: a truncated, zero-filled or swapped payload or sidecar is detected by the size and
sha256 in the sidecar, reported with a warning naming the file, and recomputed together with the stages that
need it; the batch then gives the same videos as an undamaged run."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch

from conftest import make_image, read_results, run_batch, write_config, write_manifest
from pipeline.store import ArtifactRef, ArtifactStore

# -- unit level: every kind of damage, on tensor and file artifacts ----------------------------------------


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _zero_fill(p: Path) -> None:
    p.write_bytes(bytes(p.stat().st_size))


def _swap(a: Path, b: Path) -> None:
    tmp = a.with_name(a.name + ".swap")
    os.replace(a, tmp)
    os.replace(b, a)
    os.replace(tmp, b)


@pytest.fixture
def store(tmp_path):
    """Three artifacts of one stage (two tensor payloads of equal size, one file payload)."""
    store = ArtifactStore(tmp_path / "store")
    a, b = ArtifactRef("text", "a" * 64), ArtifactRef("text", "b" * 64)
    store.write_tensors(a, {"context": torch.arange(64, dtype=torch.float32)}, {"params": {}})
    store.write_tensors(b, {"context": torch.arange(64, dtype=torch.float32) * 2}, {"params": {}})
    v = ArtifactRef("decode", "c" * 64, "mp4")
    store.write_file(v, lambda tmp: tmp.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8), {})
    assert all(store.check(r)[0] for r in (a, b, v))
    assert store.payload_path(a).stat().st_size == store.payload_path(b).stat().st_size
    return store, a, b, v


def _damage(store: ArtifactStore, a: ArtifactRef, b: ArtifactRef, v: ArtifactRef, kind: str):
    """Apply one kind of damage; return (damaged ref, the file a warning must name)."""
    pa, sa = store.payload_path(a), store.sidecar_path(a)
    if kind == "truncate payload":
        _truncate(pa)
    elif kind == "zero-fill payload":
        _zero_fill(pa)
    elif kind == "swap payloads":
        _swap(pa, store.payload_path(b))
    elif kind == "swap sidecars":
        _swap(sa, store.sidecar_path(b))
        return a, sa
    elif kind == "truncate sidecar":
        _truncate(sa)
        return a, sa
    elif kind == "zero-fill sidecar":
        _zero_fill(sa)
        return a, sa
    elif kind == "sidecar lies about size":
        side = json.loads(sa.read_text())
        side["size"] += 1
        sa.write_text(json.dumps(side))
    elif kind == "payload deleted":
        pa.unlink()
    elif kind == "truncate video":
        _truncate(store.payload_path(v))
        return v, store.payload_path(v)
    elif kind == "zero-fill video":
        _zero_fill(store.payload_path(v))
        return v, store.payload_path(v)
    elif kind == "swap video and tensor sidecars":
        _swap(store.sidecar_path(v), sa)
        return v, store.sidecar_path(v)
    else:
        raise ValueError(kind)
    return a, pa


DAMAGE = ["truncate payload", "zero-fill payload", "swap payloads", "swap sidecars", "truncate sidecar",
          "zero-fill sidecar", "sidecar lies about size", "payload deleted", "truncate video", "zero-fill video",
          "swap video and tensor sidecars"]


@pytest.mark.parametrize("kind", DAMAGE)
def test_damage_is_detected_with_a_warning_naming_the_file(store, kind, caplog):
    store, a, b, v = store
    damaged, named = _damage(store, a, b, v, kind)
    for s in (store, ArtifactStore(store.root)):  # the same process (memoised checks) and a new one
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="pipeline.store"):
            assert not s.is_complete(damaged)
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and str(named) in warnings[0] and "recomputed" in warnings[0], warnings
        with pytest.raises(FileNotFoundError, match="not usable"):
            s.load_tensors(damaged)


def test_rewriting_a_damaged_artifact_heals_it(store):
    store, a, b, v = store
    good = store.payload_path(a).read_bytes()
    _zero_fill(store.payload_path(a))
    assert not store.is_complete(a)
    store.write_tensors(a, {"context": torch.arange(64, dtype=torch.float32)}, {"params": {}})
    assert store.is_complete(a) and store.payload_path(a).read_bytes() == good


def test_payload_without_sidecar_is_incomplete_not_corrupt(store, caplog):
    """The state a kill between payload and sidecar leaves: silently recomputed (it is not damage)."""
    store, a, b, v = store
    store.sidecar_path(a).unlink()
    with caplog.at_level(logging.WARNING, logger="pipeline.store"):
        assert not store.is_complete(a)
    assert not caplog.records


# -- batch level: damaged artifacts in a half-finished and in a finished store -----------------------------

CONFIG = dict(infer_steps=4, target_video_length=5, target_height=32, target_width=32, text_len=64)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_root):
    """A 4-row batch (two I2V rows) run undamaged: its videos are what every damaged run must give."""
    tmp = tmp_path_factory.mktemp("corruption-ref")
    images = [make_image(tmp / f"img{i}.png", size=(40, 36), color=(40 * i, 200, 90)) for i in range(2)]
    rows = [{"job_id": "a", "prompt": "a red circle", "seed": 1},
            {"job_id": "b", "prompt": "a blue square", "seed": 2},
            {"job_id": "c", "prompt": "a dog", "seed": 3, "image": str(images[0])},
            {"job_id": "d", "prompt": "a cat", "seed": 4, "image": str(images[1])}]
    manifest = write_manifest(tmp / "m.parquet", rows)
    config = write_config(tmp / "c.json", **CONFIG)
    assert run_batch(manifest, tmp, config=config)
    videos = {r: (tmp / "outputs" / f"{r}.mp4").read_bytes() for r in "abcd"}
    return manifest, config, videos


def _plans(manifest, config):
    from pipeline.config import load_config
    from pipeline.manifest import read_manifest
    from pipeline.plan import plan_jobs

    cfg = load_config(config)
    return {p.job.job_id: p for p in plan_jobs(read_manifest(manifest, cfg), cfg)}


def _fresh_process_view():
    from tasks.stages import _STORES

    _STORES.clear()  # what a new run sees: no integrity check memoised


def _warned_about(caplog, path: Path) -> bool:
    return any(str(path) in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


def test_damage_in_a_half_finished_store_is_recomputed_and_the_batch_finishes(tmp_path, reference, caplog):
    import luigi

    from tasks.stages import task_for

    manifest, config, videos = reference
    plans = _plans(manifest, config)
    store_dir = tmp_path / "store"
    # Run every job up to denoise-high, as a batch stopped there would.
    highs = [task_for(p.stages()["denoise-high"], str(store_dir)) for p in plans.values()]
    assert luigi.build(highs, local_scheduler=True, log_level="WARNING")
    store = ArtifactStore(store_dir)
    ref = {j: {name: spec.ref for name, spec in p.stages().items()} for j, p in plans.items()}
    before = {j: {n: store.payload_path(r).read_bytes() for n, r in refs.items() if store.check(r)[0]}
              for j, refs in ref.items()}

    text_a = store.payload_path(ref["a"]["text"])
    image_c = store.payload_path(ref["c"]["image"])
    high_a, high_b = store.payload_path(ref["a"]["denoise-high"]), store.payload_path(ref["b"]["denoise-high"])
    side_c, side_d = store.sidecar_path(ref["c"]["denoise-high"]), store.sidecar_path(ref["d"]["denoise-high"])
    _truncate(text_a)
    _zero_fill(image_c)
    _swap(high_a, high_b)
    _swap(side_c, side_d)

    _fresh_process_view()
    caplog.set_level(logging.WARNING)
    assert run_batch(manifest, tmp_path, config=config, store=store_dir)
    for path in (text_a, image_c, high_a, high_b, side_c, side_d):  # all read by denoise-low: warned
        assert _warned_about(caplog, path), path
    results = read_results(tmp_path / "outputs")
    assert all(r["status"] == "ok" for r in results.values())
    for job, video in videos.items():
        assert (tmp_path / "outputs" / f"{job}.mp4").read_bytes() == video
        assert "denoise-low" not in results[job]["cached_stages"]
    # every damaged artifact was recomputed to its original bytes and verifies again
    for job, name in [("a", "text"), ("c", "image"), *((j, "denoise-high") for j in "abcd")]:
        assert store.payload_path(ref[job][name]).read_bytes() == before[job][name], (job, name)
        assert ArtifactStore(store_dir).check(ref[job][name])[0]


def test_damaged_inputs_of_new_work_are_recomputed(tmp_path, reference, caplog):
    """A new seed for a prompt whose text artifact is damaged: the text stage is recomputed, then the rest."""
    manifest, config, videos = reference
    store_dir = tmp_path / "store"
    assert run_batch(manifest, tmp_path, config=config, store=store_dir)
    plans = _plans(manifest, config)
    store = ArtifactStore(store_dir)
    text_c = store.payload_path(plans["c"].stages()["text"].ref)
    image_c = store.payload_path(plans["c"].stages()["image"].ref)
    good_text, good_image = text_c.read_bytes(), image_c.read_bytes()
    _truncate(text_c)
    _zero_fill(image_c)

    import pyarrow.parquet as pq

    rows = pq.read_table(manifest).to_pylist()
    rows[2]["seed"] = 33
    reseeded = write_manifest(tmp_path / "reseeded.parquet", rows)
    _fresh_process_view()
    caplog.set_level(logging.WARNING)
    assert run_batch(reseeded, tmp_path, config=config, store=store_dir, output_dir=tmp_path / "out2")
    assert _warned_about(caplog, text_c) and _warned_about(caplog, image_c)
    assert text_c.read_bytes() == good_text and image_c.read_bytes() == good_image
    results = read_results(tmp_path / "out2")
    assert all(r["status"] == "ok" for r in results.values())
    assert not {"text", "image"} & set(results["c"]["cached_stages"])
    for job in "abd":
        assert (tmp_path / "out2" / f"{job}.mp4").read_bytes() == videos[job]


def test_damaged_video_is_recomputed_and_republished(tmp_path, reference, caplog):
    manifest, config, videos = reference
    store_dir, out = tmp_path / "store", tmp_path / "outputs"
    assert run_batch(manifest, tmp_path, config=config, store=store_dir)
    plans = _plans(manifest, config)
    store = ArtifactStore(store_dir)
    mp4_a = store.payload_path(plans["a"].decode.ref)
    low_b = store.payload_path(plans["b"].stages()["denoise-low"].ref)
    mp4_b = store.payload_path(plans["b"].decode.ref)
    _truncate(mp4_a)
    _zero_fill(low_b)
    _zero_fill(mp4_b)
    (out / "c.mp4").write_bytes(b"not a video")  # a damaged published copy is replaced too

    _fresh_process_view()
    caplog.set_level(logging.WARNING)
    assert run_batch(manifest, tmp_path, config=config, store=store_dir)
    for path in (mp4_a, low_b, mp4_b):
        assert _warned_about(caplog, path), path
    for job, video in videos.items():
        assert (out / f"{job}.mp4").read_bytes() == video
    assert mp4_a.read_bytes() == videos["a"] and mp4_b.read_bytes() == videos["b"]
