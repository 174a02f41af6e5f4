"""Disk full: a write that fails with ENOSPC (simulated with pipeline.faults at the named write points: a
temp file half-written, then OSError(ENOSPC)) fails that job cleanly: its row says "No space left on device",
the other rows finish, no partial artifact, temp file or half-published video is left, and a re-run once
there is space again completes with the same videos."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import read_results, run_batch, write_config, write_manifest
from pipeline import faults
from pipeline.store import ArtifactRef, ArtifactStore

ROWS = [{"job_id": f"r{i}", "prompt": p, "seed": i} for i, p in
        enumerate(["a red circle", "a blue square", "a green triangle"])]
# No CFG, so no negative-prompt artifact shared by every row: one failed write fails one row.
CONFIG = dict(infer_steps=4, target_video_length=5, target_height=32, target_width=32, text_len=32,
              enable_cfg=False)


@pytest.fixture
def armed():
    yield faults.configure
    faults.configure("")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_root):
    tmp = tmp_path_factory.mktemp("diskfull-ref")
    manifest = write_manifest(tmp / "m.parquet", ROWS)
    config = write_config(tmp / "c.json", **CONFIG)
    assert run_batch(manifest, tmp, config=config)
    return manifest, config, {r["job_id"]: (tmp / "outputs" / f"{r['job_id']}.mp4").read_bytes() for r in ROWS}


def _store_is_clean(store: Path) -> None:
    """Every payload has a sidecar that vouches for it; no temp file anywhere."""
    assert not [p for p in store.rglob("*") if ".tmp" in p.name]
    for p in store.rglob("*"):
        if p.suffix in (".safetensors", ".mp4"):
            ok, reason = ArtifactStore(store).check(ArtifactRef(p.parent.parent.name, p.stem, p.suffix[1:]))
            assert ok, f"partial artifact left: {reason}"


WRITE_POINTS = [
    ("text", 2, "payload-partial"),
    ("denoise-high", 1, "payload-partial"),
    ("denoise-low", 3, "sidecar-partial"),  # the payload is already in place: it must go too
    ("decode", 1, "mux"),  # the encoder cannot write its output
    ("decode", 2, "payload-partial"),
    ("publish", 2, "payload-partial"),  # copying the finished video into the output folder
]


@pytest.mark.parametrize("stage,n,where", WRITE_POINTS, ids=[f"{s}:{n}:{w}" for s, n, w in WRITE_POINTS])
def test_enospc_fails_one_job_cleanly(tmp_path, reference, armed, stage, n, where):
    manifest, config, videos = reference
    out, store = tmp_path / "outputs", tmp_path / "store"
    armed(f"{stage}:{n}:{where}:enospc")
    assert not run_batch(manifest, tmp_path, config=config)  # a failed row: the batch reports failure
    armed("")

    results = read_results(out)
    failed = [r for r in results.values() if r["status"] == "failed"]
    assert len(failed) == 1, results
    assert "No space left on device" in failed[0]["error"], failed[0]["error"]
    if stage != "publish":
        assert f"stage {stage}" in failed[0]["error"] or "upstream" in failed[0]["error"], failed[0]["error"]
    for r in results.values():
        video = out / f"{r['job_id']}.mp4"
        if r["status"] == "ok":
            assert video.read_bytes() == videos[r["job_id"]]
        else:
            assert not video.exists()  # never a half-published video under its final name
    _store_is_clean(store)
    assert not [p for p in out.iterdir() if ".tmp" in p.name]

    # Space again: the same command finishes the batch with the same videos.
    assert run_batch(manifest, tmp_path, config=config)
    assert all(r["status"] == "ok" for r in read_results(out).values())
    for job, data in videos.items():
        assert (out / f"{job}.mp4").read_bytes() == data
    _store_is_clean(store)


def test_enospc_writing_results_keeps_the_previous_report(tmp_path, reference, armed):
    manifest, config, videos = reference
    assert run_batch(manifest, tmp_path, config=config)
    report = (tmp_path / "outputs" / "results.parquet").read_bytes()
    armed("results:1:payload-partial:enospc")
    assert not run_batch(manifest, tmp_path, config=config)
    armed("")
    assert (tmp_path / "outputs" / "results.parquet").read_bytes() == report  # old report intact, not half-new
    assert not [p for p in (tmp_path / "outputs").iterdir() if ".tmp" in p.name]


def test_failed_sidecar_write_removes_the_payload(tmp_path, armed):
    """Unit level: the payload is renamed into place before its sidecar is written; if that write fails the
    payload is removed, so no unverifiable file stays behind."""
    import torch

    store = ArtifactStore(tmp_path)
    ref = ArtifactRef("text", "d" * 64)
    armed("text:1:sidecar-partial:enospc")
    with pytest.raises(OSError, match="No space left on device"):
        store.write_tensors(ref, {"context": torch.ones(4)}, {})
    assert not store.payload_path(ref).exists() and not store.sidecar_path(ref).exists()
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]
