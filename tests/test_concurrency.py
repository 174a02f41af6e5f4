"""Two RunManifest processes (the product's Luigi command, local scheduler, no luigid) on overlapping manifests
and one artifact store, at the same time: both finish, no artifact is corrupted or computed twice, and the
loser of a race for an artifact reuses the winner's.

The race is made certain, not left to timing: the test holds the per-artifact lock of an artifact both runs
need, waits until both processes are blocked on it, then lets go."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from conftest import REPO, read_results, write_config, write_manifest
from pipeline.store import ArtifactRef, ArtifactStore

pytestmark = pytest.mark.slow

RUNNING = re.compile(r"running\s+\w+\(key=([0-9a-f]{64})")
REUSED = re.compile(r"\S+ ([0-9a-f]{64}) was computed by another run meanwhile: reused")


# Luigi's default logging shows only its own logger; this also shows the stage tasks' INFO lines (reuses).
LOGGING = """
[loggers]
keys=root,luigi,tasks
[handlers]
keys=stderr
[formatters]
keys=plain
[logger_root]
level=WARNING
handlers=stderr
[logger_luigi]
level=INFO
handlers=stderr
qualname=luigi-interface
propagate=0
[logger_tasks]
level=INFO
handlers=stderr
qualname=wan_batch.tasks
propagate=0
[handler_stderr]
class=StreamHandler
formatter=plain
args=(sys.stderr,)
[formatter_plain]
format=%(levelname)s: %(message)s
"""


def _luigi(manifest: Path, config: Path, out: Path, store: Path, log: Path) -> subprocess.Popen:
    conf = log.with_suffix(".logging.ini")
    conf.write_text(LOGGING)
    cmd = [sys.executable, "-m", "luigi", "--module", "pipeline", "RunManifest", "--manifest", str(manifest),
           "--config", str(config), "--output-dir", str(out), "--store", str(store),
           "--logging-conf-file", str(conf)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two processes on two cores: one thread each
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def _waiters_on_my_lock() -> int:
    """Processes blocked in flock() on the lock this process holds. /proc/locks lists each lock as
    `N: FLOCK ADVISORY WRITE <pid> <dev:inode> 0 EOF`, the ones waiting for it with `->` in front."""
    lines = [line.split() for line in Path("/proc/locks").read_text().splitlines()]
    mine = {t[-3] for t in lines if "->" not in t and t[-4] == str(os.getpid())}
    return sum(1 for t in lines if "->" in t and t[-3] in mine)


def test_two_runs_on_overlapping_manifests_share_one_store(tmp_path, tiny_root):
    shared = [{"job_id": "s0", "prompt": "a red circle moving left", "seed": 1},
              {"job_id": "s1", "prompt": "a blue square", "seed": 2}]
    rows_a = shared + [{"job_id": "a0", "prompt": "a cat", "seed": 3},
                       {"job_id": "a1", "prompt": "a red circle moving left", "seed": 4}]
    rows_b = [{"job_id": "b0", "prompt": "a dog", "seed": 5}] + shared + \
             [{"job_id": "b1", "prompt": "a blue square", "seed": 6}]
    config = write_config(tmp_path / "c.json", infer_steps=4, target_video_length=5, target_height=32,
                          target_width=32, text_len=32)
    man_a = write_manifest(tmp_path / "a.parquet", rows_a)
    man_b = write_manifest(tmp_path / "b.parquet", rows_b)
    store_dir = tmp_path / "store"

    # The artifact to race for: the negative prompt's text, which every row of both runs needs.
    from pipeline.config import load_config
    from pipeline.manifest import read_manifest
    from pipeline.plan import plan_jobs

    cfg = load_config(config)
    plans = plan_jobs(read_manifest(man_a, cfg), cfg)
    contested: ArtifactRef = plans[0].stages()["text-negative"].ref
    store = ArtifactStore(store_dir)

    with store.lock(contested):
        procs = {"a": _luigi(man_a, config, tmp_path / "out_a", store_dir, tmp_path / "a.log"),
                 "b": _luigi(man_b, config, tmp_path / "out_b", store_dir, tmp_path / "b.log")}
        deadline = time.monotonic() + 300
        while _waiters_on_my_lock() < 2:
            assert time.monotonic() < deadline, "the two runs never both waited for the contested artifact"
            assert all(p.poll() is None for p in procs.values()), "a run ended while the lock was held"
            time.sleep(0.1)
    for name, p in procs.items():
        assert p.wait(timeout=600) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]

    logs = {n: (tmp_path / f"{n}.log").read_text() for n in procs}
    running = {n: Counter(RUNNING.findall(text)) for n, text in logs.items()}
    reused = {n: Counter(REUSED.findall(text)) for n, text in logs.items()}
    # Exactly one of the two computed the contested artifact; the other waited for it, then reused it.
    assert reused["a"][contested.key] + reused["b"][contested.key] == 1, reused
    # Every artifact in the store was computed exactly once (run() entered minus reuses, over both runs).
    payloads = [p for p in store_dir.rglob("*") if p.suffix in (".safetensors", ".mp4")]
    assert payloads
    for p in payloads:
        key = p.stem
        computed = sum(running[n][key] - reused[n][key] for n in procs)
        assert computed == 1, (p.relative_to(store_dir), computed)
        ok, reason = ArtifactStore(store_dir).check(ArtifactRef(p.parent.parent.name, key, p.suffix[1:]))
        assert ok, reason
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]

    res_a, res_b = read_results(tmp_path / "out_a"), read_results(tmp_path / "out_b")
    assert all(r["status"] == "ok" for r in [*res_a.values(), *res_b.values()])
    for job in ("s0", "s1"):
        assert (tmp_path / "out_a" / f"{job}.mp4").read_bytes() == (tmp_path / "out_b" / f"{job}.mp4").read_bytes()

    # Same videos as one run alone on its own store: the race changed nothing.
    both = write_manifest(tmp_path / "both.parquet", rows_a + [r for r in rows_b if r not in shared])
    alone = _luigi(both, config, tmp_path / "alone", tmp_path / "alone_store", tmp_path / "alone.log")
    assert alone.wait(timeout=600) == 0, (tmp_path / "alone.log").read_text()[-3000:]
    for job in [r["job_id"] for r in rows_a + rows_b]:
        out = tmp_path / ("out_a" if job in res_a else "out_b") / f"{job}.mp4"
        assert out.read_bytes() == (tmp_path / "alone" / f"{job}.mp4").read_bytes(), job
