"""Damage to the store or to an input while a batch runs (issue 19, cases 1-3). Each case is made at a fixed
point of the run: right after an upstream artifact is committed (the store's `committed` fault point), so Luigi
has already counted that task done and its consumer has not started yet. No timing is involved.

- an upstream artifact damaged or removed mid-run is recomputed by its consumer in the same run: every row
  finishes, results.parquet is written, and the videos are the bytes of an undamaged run;
- an artifact the process cannot read is recomputed, never a crash of the whole batch;
- an image replaced between planning and its stage fails that row naming the file, writes nothing under the
  original image's hash, and the other rows publish.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from conftest import make_image, read_results, run_batch, write_config, write_manifest
from pipeline import faults

CONFIG = dict(infer_steps=2, target_video_length=5, target_height=32, target_width=32, text_len=16)


def _rows(tmp: Path) -> list[dict]:
    image = make_image(tmp / "img.png", size=(48, 48))
    return [{"job_id": "t2v-a", "prompt": "a red circle moving left on a blue background", "seed": 1},
            {"job_id": "t2v-b", "prompt": "a green square moving right on a black background", "seed": 2},
            {"job_id": "i2v", "prompt": "a white circle moving down on a green background", "seed": 3,
             "image": str(image)}]


def _on_commit(monkeypatch, stage: str, action, nth: int = 1, at: str = "committed") -> list:
    """Call action() when the nth artifact of `stage` reaches fault point `at` (once)."""
    real, hits = faults.point, []

    def point(s, where, *args):
        real(s, where, *args)
        if s == stage and where == at:
            hits.append(s)
            if len(hits) == nth:
                action()

    monkeypatch.setattr(faults, "point", point)
    return hits


def _newest(store: Path, stage: str, suffix: str) -> Path:
    files = [p for p in (store / stage).rglob(f"*{suffix}") if not p.name.endswith(".failed.json")]
    return max(files, key=lambda p: p.stat().st_mtime_ns)


def _payload(store: Path, stage: str) -> Path:
    return _newest(store, stage, ".mp4" if stage == "decode" else ".safetensors")


def _sidecar(store: Path, stage: str) -> Path:
    return _newest(store, stage, ".json")


DAMAGE = {
    "truncated": lambda s, st: _payload(s, st).write_bytes(_payload(s, st).read_bytes()[:100]),
    "deleted": lambda s, st: _payload(s, st).unlink(),
    "garbage-same-size": lambda s, st: _payload(s, st).write_bytes(b"\x07" * _payload(s, st).stat().st_size),
    "wrong-sha256": lambda s, st: _sidecar(s, st).write_text(
        json.dumps({**json.loads(_sidecar(s, st).read_text()), "sha256": "0" * 64})),
    "sidecar-unparseable": lambda s, st: _sidecar(s, st).write_text("{not json"),
}


@pytest.fixture(scope="module")
def clean(tmp_path_factory, tiny_root):
    tmp = tmp_path_factory.mktemp("clean")
    manifest = write_manifest(tmp / "m.parquet", _rows(tmp))
    assert run_batch(manifest, tmp, config=write_config(tmp / "c.json", **CONFIG))
    return {job: (tmp / "outputs" / f"{job}.mp4").read_bytes() for job in read_results(tmp / "outputs")}


# every kind of damage on a text artifact; two kinds on the later stages (a denoise artifact, the video)
CASES = [("text", d) for d in DAMAGE] + [(s, d) for s in ("denoise-high", "decode") for d in ("truncated", "wrong-sha256")]


@pytest.mark.parametrize("stage,damage", CASES)
def test_damage_mid_run_is_recomputed_in_the_same_run(tmp_path, clean, monkeypatch, caplog, stage, damage):
    manifest = write_manifest(tmp_path / "m.parquet", _rows(tmp_path))
    store = tmp_path / "store"
    hits = _on_commit(monkeypatch, stage, lambda: DAMAGE[damage](store, stage))
    with caplog.at_level(logging.WARNING):
        assert run_batch(manifest, tmp_path, config=write_config(tmp_path / "c.json", **CONFIG))
    assert hits, "the damage was never made"
    results = read_results(tmp_path / "outputs")
    assert {j: r["status"] for j, r in results.items()} == {j: "ok" for j in clean}, results
    for job, data in clean.items():
        assert (tmp_path / "outputs" / f"{job}.mp4").read_bytes() == data, job
    assert "gone or damaged since" in caplog.text


def test_unreadable_artifact_is_recomputed_not_fatal(tmp_path, clean, monkeypatch, caplog):
    """A payload the process may not read (chmod 000 as a non-root user): simulated at the store's read, so
    the test means the same as root as it does as a user."""
    import pipeline.store as store_module

    manifest = write_manifest(tmp_path / "m.parquet", _rows(tmp_path))
    victim: dict[str, Path] = {}
    _on_commit(monkeypatch, "text", lambda: victim.setdefault("path", _payload(tmp_path / "store", "text")))
    real = store_module.sha256_file

    def sha256_file(path, *a, **k):
        if victim.get("path") == Path(path) and not victim.get("raised"):
            victim["raised"] = True
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(store_module, "sha256_file", sha256_file)
    with caplog.at_level(logging.WARNING):
        assert run_batch(manifest, tmp_path, config=write_config(tmp_path / "c.json", **CONFIG))
    assert victim.get("raised")
    assert f"cannot read {victim['path']}" in caplog.text
    results = read_results(tmp_path / "outputs")
    assert all(r["status"] == "ok" for r in results.values()), results
    for job, data in clean.items():
        assert (tmp_path / "outputs" / f"{job}.mp4").read_bytes() == data, job


def test_image_replaced_mid_run_fails_its_row_and_poisons_nothing(tmp_path, clean, monkeypatch):
    rows = _rows(tmp_path)
    image = Path(rows[2]["image"])
    original = image.read_bytes()
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    config = write_config(tmp_path / "c.json", **CONFIG)
    # planned (hashed) with the original; replaced as its stage starts, before the stage reads it
    _on_commit(monkeypatch, "image", lambda: make_image(image, size=(48, 48), color=(30, 200, 30)), at="start")
    assert not run_batch(manifest, tmp_path, config=config)
    results = read_results(tmp_path / "outputs")
    assert results["t2v-a"]["status"] == results["t2v-b"]["status"] == "ok"
    assert results["i2v"]["status"] == "failed"
    assert str(image) in results["i2v"]["error"] and "changed after the batch was planned" in results["i2v"]["error"]
    assert not list((tmp_path / "store" / "image").rglob("*.safetensors")), "an image artifact was filed"
    # with the original image back, the same keys give the clean run's video, from the original image
    monkeypatch.undo()
    image.write_bytes(original)
    assert run_batch(manifest, tmp_path, config=config, output_dir=tmp_path / "again")
    assert (tmp_path / "again" / "i2v.mp4").read_bytes() == clean["i2v"]
