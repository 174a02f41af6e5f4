"""A large batch is declared to Luigi a wave at a time (tasks/waves.py). The waves must change nothing a user
sees: the same artifacts and byte-identical videos as a batch declared up front, stage-major order with each
model loaded once, one task per artifact, resume after kill -9, and several workers on one luigid sharing the
batch. `wave_tasks` is set small here so that a 6-row batch runs in many waves."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import luigi
import pytest

from conftest import REPO, make_image, read_results, write_config, write_manifest

SMALL = dict(target_height=16, target_width=16, target_video_length=1, infer_steps=2, text_len=16)
PROMPTS = ["a red circle moving left", "a blue square moving up", "a green triangle moving right"]
ROWS = [{"job_id": f"j{i}", "prompt": PROMPTS[i % 3], "seed": 100 + i} for i in range(6)]  # prompts shared


def _env(**extra) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", **extra}


def _sidecars(store: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in store.glob("*/*/*.json") if not p.name.endswith(".failed.json")]


def _build(manifest: Path, config: Path, out: Path, store: Path, wave_tasks: int, run_id: str):
    from tasks.run_manifest import RunManifest

    task = RunManifest(manifest=str(manifest), config=str(config), output_dir=str(out), store=str(store),
                       run_id=run_id, wave_tasks=wave_tasks)
    result = luigi.build([task], workers=1, local_scheduler=True, detailed_summary=True)
    return task, result


def test_segments_follow_the_priorities_and_hold_each_artifact_once(tmp_path, tiny_root):
    from pipeline.batch import load_batch
    from tasks.stages import task_priority
    from tasks.waves import count_artifacts, segments

    image = make_image(tmp_path / "first.png")
    rows = ROWS + [{"job_id": "i0", "prompt": PROMPTS[0], "seed": 1, "image": str(image)}]
    plans = load_batch(write_manifest(tmp_path / "m.parquet", rows), write_config(tmp_path / "c.json", **SMALL)).plans
    segs = segments(plans)
    order = [(s[0].stage, s[0].model["task"]) for s in segs]
    # the tiny I2V model shares the T2V text encoder: its row's prompt and negative are the same artifacts
    assert order == [("text", "t2v"), ("image", "i2v"), ("denoise-high", "t2v"),
                     ("denoise-high", "i2v"), ("denoise-low", "t2v"), ("denoise-low", "i2v"), ("decode", "t2v"),
                     ("decode", "i2v")]
    for seg in segs:  # one stage and one model per segment, so a wave never switches models
        assert len({(s.stage, task_priority(s)) for s in seg}) == 1
    keys = [s.key for seg in segs for s in seg]
    assert len(keys) == len(set(keys)) == count_artifacts(plans)
    assert [len(s) for s in segs] == [4, 1, 6, 1, 6, 1, 6, 1]  # 3 distinct prompts + the negative


@pytest.mark.slow
def test_a_batch_in_waves_matches_the_batch_declared_up_front(tmp_path, tiny_root):
    from pipeline.runtime import MODELS
    from pipeline.stages.registry import STAGES
    from tasks import waves

    manifest = write_manifest(tmp_path / "m.parquet", ROWS)
    config = write_config(tmp_path / "c.json", **SMALL)
    ref_task, ref = _build(manifest, config, tmp_path / "ref/out", tmp_path / "ref/store", 0, "up-front")
    assert ref.status.name == "SUCCESS" and not ref_task.in_waves

    MODELS.clear()
    task, result = _build(manifest, config, tmp_path / "w/out", tmp_path / "w/store", 3, "in-waves")
    assert result.status.name == "SUCCESS" and task.in_waves
    # each model loaded once for the whole batch, as up front: a stage's waves are consecutive
    assert MODELS.loads and set(MODELS.loads.values()) == {1}, MODELS.loads
    # waves of at most 3 tasks, each of one stage, together every artifact exactly once
    members = waves._MEMBERS["in-waves"].values()
    assert max(len(m) for m in members) == 3 and len(members) > 4
    assert all(len({t.spec.stage for t in m}) == 1 for m in members)
    keys = [t.key for m in members for t in m]
    sides = _sidecars(tmp_path / "w/store")
    assert len(keys) == len(set(keys)) == len(sides) == 4 + 6 + 6 + 6
    # stage-major: every artifact of a stage was written before any of the next stage
    order = list(STAGES)
    written = sorted(sides, key=lambda s: s["written_at"])
    ranks = [order.index(s["stage"]) for s in written]
    assert ranks == sorted(ranks)
    # the same results and byte-identical videos
    a, b = read_results(tmp_path / "ref/out"), read_results(tmp_path / "w/out")
    assert {r["status"] for r in b.values()} == {"ok"} and a.keys() == b.keys()
    for job_id in a:
        assert (tmp_path / "w/out" / f"{job_id}.mp4").read_bytes() == \
            (tmp_path / "ref/out" / f"{job_id}.mp4").read_bytes()


@pytest.mark.slow
def test_a_batch_in_waves_resumes_after_kill_9_with_identical_bytes(tmp_path, tiny_root):
    manifest = write_manifest(tmp_path / "m.parquet", ROWS)
    config = write_config(tmp_path / "c.json", **SMALL)
    _build(manifest, config, tmp_path / "ref/out", tmp_path / "ref/store", 0, "ref")
    cmd = [sys.executable, "-m", "luigi", "--module", "pipeline", "RunManifest", "--manifest", str(manifest),
           "--config", str(config), "--store", str(tmp_path / "store"), "--output-dir", str(tmp_path / "out"),
           "--wave-tasks", "3", "--local-scheduler"]
    # killed in the second wave of denoise-high, half-way through writing an artifact
    killed = subprocess.run(cmd, env=_env(WAN_BATCH_FAULT="denoise-high:5:payload-partial"), cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:] + killed.stderr[-2000:]
    assert not (tmp_path / "out" / "results.parquet").exists()
    done = {s["stage"] for s in _sidecars(tmp_path / "store")}
    assert "text" in done and "decode" not in done
    again = subprocess.run(cmd, env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    results = read_results(tmp_path / "out")
    assert {r["status"] for r in results.values()} == {"ok"} and len(results) == 6
    assert all("text" in r["cached_stages"] for r in results.values())  # made before the kill: reused
    for row in ROWS:
        assert (tmp_path / "out" / f"{row['job_id']}.mp4").read_bytes() == \
            (tmp_path / "ref/out" / f"{row['job_id']}.mp4").read_bytes()
    assert not [p for p in (tmp_path / "store").rglob("*") if ".tmp" in p.name]


RUNNING = re.compile(r"running\s+(\w+)\((?:key=([0-9a-f]+))?")


@pytest.mark.slow
def test_two_workers_on_luigid_share_a_batch_in_waves(tmp_path, tiny_root, monkeypatch):
    from pipeline.workers import WORKER_OK, BatchSpec, local_luigid, start_workers, wait_workers

    manifest = write_manifest(tmp_path / "m.parquet", ROWS)
    config = write_config(tmp_path / "c.json", **SMALL)
    _build(manifest, config, tmp_path / "ref/out", tmp_path / "ref/store", 0, "ref")
    batch = BatchSpec(manifest=str(manifest), config=str(config), output_dir=str(tmp_path / "out"),
                      store=str(tmp_path / "store"), run_id="shared", extra=["--wave-tasks", "3"])
    for name, value in _env().items():  # the workers inherit this environment
        monkeypatch.setenv(name, value)
    with local_luigid(2, state_dir=tmp_path / "luigid") as scheduler:
        runs = wait_workers(start_workers(batch, scheduler, ["", ""], tmp_path / "logs", 1))
    logs = [r.log.read_text() for r in runs]
    assert all(r.returncode in WORKER_OK for r in runs), "\n\n".join(t[-3000:] for t in logs)
    ran: Counter = Counter()
    per_worker = []
    for text in logs:
        found = [m.groups() for m in RUNNING.finditer(text)]
        per_worker.append([t for t in found if t[1]])  # stage tasks (they have a key)
        ran.update(t for t in found if t[1])
    assert all(per_worker), "both workers ran stage tasks"
    assert max(ran.values()) == 1, [t for t, n in ran.items() if n > 1]  # no artifact computed twice
    assert Counter(t[0] for t in ran) == {"EncodeText": 4, "Denoise": 12, "DecodeVideo": 6}
    assert all(re.search(r"running\s+Waves\(", t) for t in logs)  # each worker declared the waves itself
    results = read_results(tmp_path / "out")
    assert {r["status"] for r in results.values()} == {"ok"} and len(results) == 6
    for row in ROWS:
        assert (tmp_path / "out" / f"{row['job_id']}.mp4").read_bytes() == \
            (tmp_path / "ref/out" / f"{row['job_id']}.mp4").read_bytes()
