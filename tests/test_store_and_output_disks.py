"""The store's disk and the output folder, each failing on its own: a store disk that fills up mid-batch (simulated
with pipeline.faults' `full` action: from that write on, every write into the store fails with ENOSPC, the
output folder keeps working) still gives results.parquet and publishes the videos already finished; an output
folder the run cannot write is named, the command exits non-zero and never prints `results: <path>`; every file
the store holds is as readable as the published MP4s (0666 less the umask), so several users can share a store.
"""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys

import pytest

from conftest import REPO, read_results, run_batch, write_config, write_manifest
from pipeline.store import FILE_MODE, ArtifactRef, ArtifactStore
from test_disk_full import ROWS, _store_is_clean, armed  # noqa: F401  (armed is a fixture)

CONFIG = dict(infer_steps=2, target_video_length=5, target_height=32, target_width=32, text_len=32,
              enable_cfg=False)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_root):
    tmp = tmp_path_factory.mktemp("disks-ref")
    manifest = write_manifest(tmp / "m.parquet", ROWS)
    config = write_config(tmp / "c.json", **CONFIG)
    assert run_batch(manifest, tmp, config=config)
    return manifest, config, {r["job_id"]: (tmp / "outputs" / f"{r['job_id']}.mp4").read_bytes() for r in ROWS}


# Luigi runs stage-major (text x3, denoise-high x3, denoise-low x3, decode x3): the 11th payload write is the
# second video, so the disk fills after one video is finished; the 2nd is a text artifact, before any video.
FULL_AT = [(11, 1), (2, 0)]  # (payload write at which the store's disk fills up, videos finished before)


@pytest.mark.parametrize("n,finished", FULL_AT, ids=[f"full-at-write-{n}" for n, _ in FULL_AT])
def test_full_store_disk_still_writes_results_and_publishes_finished_videos(tmp_path, reference, armed, n,
                                                                            finished):
    manifest, config, videos = reference
    out, store = tmp_path / "outputs", tmp_path / "store"
    armed(f"*:{n}:payload-partial:full")
    assert not run_batch(manifest, tmp_path, config=config)
    armed("")

    results = read_results(out)  # the report is there although the store could not take a failure record
    assert set(results) == {r["job_id"] for r in ROWS}
    ok = [r for r in results.values() if r["status"] == "ok"]
    assert len(ok) == finished, results
    for r in ok:  # finished before the disk filled: published, byte-identical
        assert (out / f"{r['job_id']}.mp4").read_bytes() == videos[r["job_id"]]
    for r in results.values():
        if r["status"] != "ok":
            assert "No space left on device" in r["error"], r["error"]
            assert str(store) in r["error"] or "upstream" in r["error"], r["error"]  # names where
            assert not (out / f"{r['job_id']}.mp4").exists()
    assert not [p for p in store.rglob("*.failed.json")]  # the store had no room for them: kept in memory
    _store_is_clean(store)

    # Space again: the failures were not cached, the same command finishes the batch with the same videos.
    assert run_batch(manifest, tmp_path, config=config)
    assert all(r["status"] == "ok" for r in read_results(out).values())
    for job, data in videos.items():
        assert (out / f"{job}.mp4").read_bytes() == data
    _store_is_clean(store)


def test_failure_record_the_store_has_no_room_for_is_kept_for_the_run(tmp_path, armed):
    store = ArtifactStore(tmp_path)
    ref = ArtifactRef("text", "e" * 64)
    armed("text:1:failure-record:full")
    store.record_failure(ref, "OSError: No space left on device", "run1")
    armed("")
    assert store.failure(ref)["error"] == "OSError: No space left on device"
    assert not store.failure_path(ref).exists() and not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]
    assert ArtifactStore(tmp_path).failure(ref) is None  # another process (a later run) retries the stage


# ------------------------------------------------------------------------------------ read-only output
def _unprivileged() -> list[str]:
    """A command prefix under which file modes are enforced: as root, drop the capabilities that bypass them."""
    if os.geteuid() != 0:
        return []
    if not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: a read-only folder cannot be made")
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"]


def test_read_only_output_folder_is_named_and_never_reported_as_written(tmp_path, reference):
    manifest, config, _ = reference
    out = tmp_path / "outputs"
    assert run_batch(manifest, tmp_path, config=config)  # the store holds every video, out/ a report
    report = (out / "results.parquet").read_bytes()
    out.chmod(0o555)
    try:
        cmd = [*_unprivileged(), sys.executable, "-m", "pipeline.cli", "run", "--manifest", str(manifest),
               "--config", str(config), "--output-dir", str(out), "--store", str(tmp_path / "store")]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    finally:
        out.chmod(0o755)
    assert proc.returncode != 0, proc.stdout
    assert "results: " not in proc.stdout, proc.stdout
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("error: ") and str(out / "results.parquet") in last, proc.stdout
    assert f"cannot write into {out}" in last and "Permission denied" in last, last
    assert f"could not write into the output folder {out}" in proc.stderr, proc.stderr[-3000:]  # the task's error
    assert (out / "results.parquet").read_bytes() == report  # the previous report, untouched


# ---------------------------------------------------------------------------------------------- modes
def test_store_files_are_as_readable_as_the_published_videos(tmp_path, reference):
    manifest, config, _ = reference
    assert run_batch(manifest, tmp_path, config=config)
    files = [p for p in (tmp_path / "store").rglob("*") if p.is_file() and p.suffix != ".lock"]
    assert {p.suffix for p in files} == {".safetensors", ".mp4", ".json"}
    videos = list((tmp_path / "outputs").glob("*.mp4"))
    assert len(videos) == len(ROWS)
    modes = {str(p): oct(stat.S_IMODE(p.stat().st_mode)) for p in files + videos}
    assert set(modes.values()) == {oct(FILE_MODE)}, modes  # safetensors payloads were 0600
