"""Decode's H.264 encode alone (pipeline.stages.decode.write_mp4): seconds per video at Wan's sizes, one at a
time and several at once, and what the store adds after it (sha256 of the MP4, fsync). CPU only.

    python -m benchmarks.bench_encode                                   # 480p and 720p, 81 frames
    python -m benchmarks.bench_encode --sizes 480x832x81 --concurrent 1,2,3 --out encode.jsonl

It tells what the background writer (pipeline/writer.py) can take off a GPU batch: an encode that runs while
the GPU decodes the next video costs the batch nothing, as long as the encodes keep up with the decodes
(`--concurrent`: how the time per video changes when the writer runs more than one at once). Three contents,
since x264's time depends on it: `smooth` (moving gradients, like the tiny model's videos), `detail` (the same
with pixel noise of sd 10, nearer to a real model's textures) and `noise` (uniform noise: the worst case, and
what a DiT with random weights gives, as in benchmarks/run.py's batch).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def frames(kind: str, f: int, h: int, w: int) -> np.ndarray:
    t = np.linspace(0, 1, f, dtype=np.float32)[:, None, None, None]
    y = np.linspace(0, 1, h, dtype=np.float32)[None, :, None, None]
    x = np.linspace(0, 1, w, dtype=np.float32)[None, None, :, None]
    phase = np.array([0.0, 2.0, 4.0], dtype=np.float32)[None, None, None, :]
    if kind == "noise":
        return np.random.default_rng(0).integers(0, 256, (f, h, w, 3), dtype=np.uint8)
    video = (np.sin(6 * x + 3 * t + phase) * np.cos(4 * y - 2 * t) * 0.5 + 0.5) * 255
    if kind == "detail":
        video = video + np.random.default_rng(0).normal(0, 10, video.shape).astype(np.float32)
    return np.clip(video, 0, 255).astype(np.uint8)


def encode(video: np.ndarray, path: Path) -> dict:
    from pipeline.stages.decode import write_mp4
    from pipeline.store import sha256_file

    t0 = time.perf_counter()
    write_mp4(video, 16, path)
    t1 = time.perf_counter()
    sha256_file(path)
    t2 = time.perf_counter()
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
    t3 = time.perf_counter()
    return {"encode_s": t1 - t0, "sha256_s": t2 - t1, "fsync_s": t3 - t2, "mb": path.stat().st_size / 1e6}


def measure(kind: str, size: str, concurrent: int, work: Path, reps: int) -> dict:
    h, w, f = (int(v) for v in size.split("x"))
    video = frames(kind, f, h, w)
    encode(video[:2], work / "warm.mp4")  # the binary and its libraries in the page cache
    walls, each = [], []
    for _ in range(reps):
        results: list[dict] = []
        threads = [threading.Thread(target=lambda i=i: results.append(encode(video, work / f"v{i}.mp4")))
                   for i in range(concurrent)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        walls.append(time.perf_counter() - t0)
        each += results
    wall = min(walls)
    return {"content": kind, "size": size, "concurrent": concurrent, "cores": os.cpu_count(),
            "video_s": round(wall / concurrent, 3),  # wall time per video when `concurrent` run at once
            "encode_s": round(min(r["encode_s"] for r in each), 3),
            "sha256_s": round(min(r["sha256_s"] for r in each), 4), "fsync_s": round(min(r["fsync_s"] for r in each), 4),
            "mp4_mb": round(each[0]["mb"], 2), "frames_mb": round(video.nbytes / 1e6, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="480x832x81,720x1280x81", help="HxWxF, comma-separated")
    p.add_argument("--contents", default="smooth,detail,noise")
    p.add_argument("--concurrent", default="1,2", help="encodes at once, comma-separated")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--out", default="", help="append the rows as JSON lines to this file")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-encode-") as tmp:
        for size in args.sizes.split(","):
            for kind in args.contents.split(","):
                for n in (int(c) for c in args.concurrent.split(",")):
                    row = measure(kind, size, n, Path(tmp), args.reps)
                    print(json.dumps(row), flush=True)
                    if args.out:
                        with open(args.out, "a") as f:
                            f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
