"""The background writer (pipeline/writer.py): in a batch, decode's H.264 encode runs after its task returned.

- the MP4s are byte-identical to the synchronous writer's (WAN_BATCH_BACKGROUND_WRITES=0), and write_mp4's
  bytes are those of the writer it replaced (ffmpeg-python's run with the frames as one bytes object);
- RunManifest waits for a video still being encoded when it starts: its outputs exist and decode when it
  returns (made certain, not left to timing: the last encode is held until RunManifest has started);
- an ffmpeg failure fails that row, with ffmpeg's message, named by its job; nothing partial is left;
- the store's reads wait for a pending write, the artifact's lock stays held until it ends, and at most
  max_pending writes are queued.
The kill with encodes pending is tests/test_fault_injection.py's `decode:3:queued` case.
"""
from __future__ import annotations

import fcntl
import logging
import threading
from pathlib import Path

import numpy as np
import pytest

from conftest import read_results, run_batch, write_config, write_manifest
from pipeline import faults
from pipeline.store import ArtifactRef, ArtifactStore
from pipeline.writer import ENV, WRITER, BackgroundWriter

ROWS = [{"job_id": f"v{i}", "prompt": p, "seed": i} for i, p in
        enumerate(["a red circle moving left", "a blue square moving up", "a green triangle"])]
CONFIG = dict(infer_steps=2, target_video_length=9, target_height=32, target_width=48, text_len=16,
              enable_cfg=False)


def _videos(out: Path) -> dict[str, bytes]:
    return {r["job_id"]: (out / f"{r['job_id']}.mp4").read_bytes() for r in ROWS}


def _store_videos(store: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (store / "decode").rglob("*.mp4") if not p.name.startswith(".")}


@pytest.fixture
def mux_threads(monkeypatch):
    """Names of the threads that reached decode's `mux` point (where ffmpeg starts)."""
    real, names = faults.point, []

    def point(stage, where, *args):
        if stage == "decode" and where == "mux":
            names.append(threading.current_thread().name)
        real(stage, where, *args)

    monkeypatch.setattr(faults, "point", point)
    return names


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_root):
    """A batch written synchronously (the writer as it was): its videos and store payloads."""
    tmp = tmp_path_factory.mktemp("sync")
    manifest, config = write_manifest(tmp / "m.parquet", ROWS), write_config(tmp / "c.json", **CONFIG)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(ENV, "0")
        assert run_batch(manifest, tmp, config=config)
    return {"manifest": manifest, "config": config, "videos": _videos(tmp / "outputs"),
            "store": _store_videos(tmp / "store")}


def test_background_writes_give_the_synchronous_bytes(tmp_path, reference, mux_threads):
    assert run_batch(reference["manifest"], tmp_path, config=reference["config"])
    assert mux_threads == ["wan-batch-writer"] * len(ROWS), mux_threads  # each encode ran in the background
    assert _videos(tmp_path / "outputs") == reference["videos"]
    assert _store_videos(tmp_path / "store") == reference["store"]


def _previous_write_mp4(frames: np.ndarray, fps: int, path: Path, crf: int = 18) -> None:
    """decode.write_mp4 as it was before the background writer: ffmpeg-python's run, frames as one bytes."""
    import ffmpeg

    from pipeline.stages.decode import ffmpeg_exe

    _, h, w, _ = frames.shape
    pad_h, pad_w = h % 2, w % 2
    stream = ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{w}x{h}", r=fps)
    if pad_h or pad_w:
        stream = stream.filter("pad", w + pad_w, h + pad_h)
    stream = ffmpeg.output(stream, str(path), format="mp4", vcodec="libx264", pix_fmt="yuv420p", crf=crf,
                           preset="medium", threads=4, movflags="+faststart", map_metadata=-1,
                           **{"fflags": "+bitexact", "flags:v": "+bitexact"})
    ffmpeg.run(stream, cmd=ffmpeg_exe(), input=np.ascontiguousarray(frames).tobytes(), quiet=True,
               overwrite_output=True)


def test_write_mp4_gives_the_bytes_of_the_writer_it_replaced(tmp_path):
    from pipeline.stages.decode import write_mp4

    rng = np.random.default_rng(0)
    for shape in [(1, 16, 16, 3), (9, 33, 47, 3), (25, 120, 208, 3)]:  # odd sizes take the pad filter
        frames = rng.integers(0, 256, shape, dtype=np.uint8)
        write_mp4(frames, 16, tmp_path / "new.mp4")
        _previous_write_mp4(frames, 16, tmp_path / "old.mp4")
        assert (tmp_path / "new.mp4").read_bytes() == (tmp_path / "old.mp4").read_bytes(), shape
    smooth = np.broadcast_to(np.linspace(0, 255, 64, dtype=np.uint8)[None, None, :, None], (17, 48, 64, 3))
    write_mp4(smooth[:, :, ::-1], 16, tmp_path / "new.mp4", crf=23)  # a view that is not C-contiguous
    _previous_write_mp4(smooth[:, :, ::-1], 16, tmp_path / "old.mp4", crf=23)
    assert (tmp_path / "new.mp4").read_bytes() == (tmp_path / "old.mp4").read_bytes()


def test_run_manifest_waits_for_the_last_encode(tmp_path, reference, monkeypatch, caplog):
    import tasks.run_manifest
    from pipeline.stages import decode

    started, held = threading.Event(), []
    real_run, real_point = tasks.run_manifest.RunManifest.run, faults.point

    def run(self):
        started.set()
        return real_run(self)

    def point(stage, where, *args):
        real_point(stage, where, *args)
        if stage == "decode" and where == "mux" and held.append(stage) is None and len(held) == len(ROWS):
            # the last video: its encode starts only once every decode task has returned and RunManifest runs
            assert started.wait(120), "RunManifest never started while the last encode was held"

    decodes = []
    real_decode = decode.decode_latents
    monkeypatch.setattr(decode, "decode_latents", lambda *a, **k: decodes.append(1) or real_decode(*a, **k))
    monkeypatch.setattr(tasks.run_manifest.RunManifest, "run", run)
    monkeypatch.setattr(faults, "point", point)
    with caplog.at_level(logging.WARNING):
        assert run_batch(reference["manifest"], tmp_path, config=reference["config"])
    assert started.is_set() and len(held) == len(ROWS)
    assert len(decodes) == len(ROWS)  # waited for, not made again by RunManifest's heal
    assert "gone or damaged" not in caplog.text
    from pipeline.stages.decode import read_video

    results = read_results(tmp_path / "outputs")
    for job, data in reference["videos"].items():
        assert results[job]["status"] == "ok" and results[job]["seconds_decode"] is not None
        video = tmp_path / "outputs" / f"{job}.mp4"
        assert video.read_bytes() == data
        assert read_video(video).shape == (CONFIG["target_video_length"], CONFIG["target_height"],
                                           CONFIG["target_width"], 3)


def test_ffmpeg_failure_fails_its_row_naming_the_job(tmp_path, reference, monkeypatch, caplog):
    from pipeline.stages import decode

    fake = tmp_path / "ffmpeg"
    fake.write_text("#!/bin/sh\necho 'x264 [error]: malloc of size 4096 failed' >&2\nexit 1\n")
    fake.chmod(0o755)
    real_exe, calls = decode.ffmpeg_exe, []

    def ffmpeg_exe():
        calls.append(threading.current_thread().name)
        return str(fake) if len(calls) == 2 else real_exe()

    monkeypatch.setattr(decode, "ffmpeg_exe", ffmpeg_exe)
    with caplog.at_level(logging.ERROR):
        assert not run_batch(reference["manifest"], tmp_path, config=reference["config"])
    assert calls == ["wan-batch-writer"] * len(ROWS)
    results = read_results(tmp_path / "outputs")
    failed = [r for r in results.values() if r["status"] == "failed"]
    assert len(failed) == 1, results
    job = failed[0]["job_id"]
    assert failed[0]["error"].startswith("stage decode: ffmpeg could not encode the video"), failed[0]["error"]
    assert "malloc of size 4096 failed" in failed[0]["error"] and "exit code 1" in failed[0]["error"]
    assert f"job {job} failed: stage decode: ffmpeg could not encode" in caplog.text
    assert not (tmp_path / "outputs" / f"{job}.mp4").exists()
    for r in results.values():
        if r["status"] == "ok":
            assert (tmp_path / "outputs" / f"{r['job_id']}.mp4").read_bytes() == reference["videos"][r["job_id"]]
    # nothing partial: two complete videos, one failure record, no temp file
    store = tmp_path / "store"
    assert len(_store_videos(store)) == len(ROWS) - 1
    assert len(list((store / "decode").rglob("*.failed.json"))) == 1
    assert not [p for p in store.rglob("*") if ".tmp" in p.name]

    monkeypatch.setattr(decode, "ffmpeg_exe", real_exe)
    assert run_batch(reference["manifest"], tmp_path, config=reference["config"])  # retried, not cached
    assert _videos(tmp_path / "outputs") == reference["videos"]
    assert not list((store / "decode").rglob("*.failed.json"))


# -- the writer and the store, unit level ------------------------------------------------------------------------
def _other_process_could_lock(store: ArtifactStore, ref: ArtifactRef) -> bool:
    """Whether a second flock of the artifact's lock file (another open file, as another process has) succeeds."""
    with open(store.lock_path(ref), "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        return True


def test_a_deferred_write_keeps_the_lock_and_readers_wait_for_it(tmp_path):
    store, ref = ArtifactStore(tmp_path), ArtifactRef("decode", "e" * 64, "mp4")
    go, errors = threading.Event(), []

    def produce(tmp: Path) -> None:
        assert go.wait(60)
        tmp.write_bytes(b"\x00\x00\x00\x18ftypmp42" * 100)

    with WRITER.accepting(errors.append), store.lock(ref):
        assert store.write_file(ref, produce, {}, background=True) is None  # queued, not written
    assert not _other_process_could_lock(store, ref)  # the writer holds it now
    seen = []
    reader = threading.Thread(target=lambda: seen.append(store.is_complete(ref)))
    reader.start()
    reader.join(0.5)
    assert reader.is_alive() and not seen  # the reader waits for the pending write, it does not say "missing"
    go.set()
    reader.join(60)
    assert seen == [True] and errors == []
    assert _other_process_could_lock(store, ref)


def test_writes_outside_a_task_or_without_the_lock_are_synchronous(tmp_path):
    store, errors = ArtifactStore(tmp_path), []
    first, second = ArtifactRef("decode", "a" * 64, "mp4"), ArtifactRef("decode", "b" * 64, "mp4")
    names = []

    def produce(tmp: Path) -> None:
        names.append(threading.current_thread().name)
        tmp.write_bytes(b"video")

    with store.lock(first):  # not in a task that accepts deferred writes (diagnose, RunStage)
        assert store.write_file(first, produce, {}, background=True)["size"] == 5
    with WRITER.accepting(errors.append):  # the lock not held: nothing would keep others out meanwhile
        assert store.write_file(second, produce, {}, background=True)["size"] == 5
    assert names == [threading.current_thread().name] * 2 and errors == []


def test_a_failed_deferred_write_reaches_the_task_and_leaves_nothing(tmp_path):
    store, ref, errors = ArtifactStore(tmp_path), ArtifactRef("decode", "f" * 64, "mp4"), []

    def produce(tmp: Path) -> None:
        tmp.write_bytes(b"half a vid")
        raise RuntimeError("encoder crashed")

    with WRITER.accepting(errors.append), store.lock(ref):
        store.write_file(ref, produce, {}, background=True)
    WRITER.flush()
    assert [str(e) for e in errors] == ["encoder crashed"]
    assert not store.is_complete(ref) and list(tmp_path.rglob("*.mp4")) == []
    assert _other_process_could_lock(store, ref)


def test_at_most_max_pending_writes_are_queued():
    writer = BackgroundWriter(threads=1, max_pending=2)
    gates = [threading.Event() for _ in range(3)]
    running, most = [], []

    def job(i: int):
        def work() -> None:
            running.append(i)
            most.append(writer.pending())
            assert gates[i].wait(60)
        return work

    submitted = []
    with writer.accepting(lambda e: None):
        writer.submit(Path("/v/0"), job(0))
        writer.submit(Path("/v/1"), job(1))

        def third() -> None:
            with writer.accepting(lambda e: None):
                writer.submit(Path("/v/2"), job(2))
            submitted.append(2)

        t = threading.Thread(target=third)
        t.start()
        t.join(0.5)
        assert t.is_alive() and submitted == [] and writer.pending() == 2  # the third waits for room
        gates[0].set()
        t.join(60)
        assert submitted == [2]
        gates[1].set()
        gates[2].set()
        writer.flush()
    assert running == [0, 1, 2] and max(most) <= 2 and writer.pending() == 0
