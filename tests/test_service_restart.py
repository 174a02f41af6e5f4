"""Restart safety and TASK_TIMEOUT of `wan-batch serve`, over real HTTP on 127.0.0.1.

kill -9 of the server while one group of tasks is running and others are queued: the worker dies with it;
a restart on the same folder requeues the running tasks, and every accepted task finishes exactly once (one
'done' event each) with the same bytes as an uninterrupted run of the same jobs. A task running past
TASK_TIMEOUT fails with a message saying so, and a fresh worker takes over."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import requests

from conftest import read_results, run_batch, write_manifest
from test_service import SMALL, Server, db_rows, decode_mp4

pytestmark = pytest.mark.slow


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in state  # a zombie (not yet reaped) is gone for our purposes


def test_kill_9_while_running_and_queued_then_restart(tmp_path, tiny_root):
    args = ("--batch-max", "2", "--max-queue", "50")
    jobs = [{"prompt": f"restart test prompt {i % 2}", "seed": 100 + i, "image_size": "64*64", "num_frames": 5,
             "infer_steps": 3} for i in range(5)]
    srv = Server(tmp_path / "svc", tmp_path / "store", *args).start()
    try:
        ids = [srv.submit(**job) for job in jobs]
        deadline = time.monotonic() + 600
        while True:  # a group is part-way through its stages and another one waits
            states = {t: srv.status(t) for t in ids}
            running = [t for t, s in states.items() if s["status"] == "running" and 0 < s["progress"] < 1]
            queued = [t for t, s in states.items() if s["status"] == "queued"]
            if running and queued:
                break
            assert time.monotonic() < deadline, (states, srv.output())
            time.sleep(0.05)
        worker = srv.worker_pid()
        srv.kill9()
    except BaseException:
        srv.stop()
        raise
    deadline = time.monotonic() + 60
    while alive(worker):  # PR_SET_PDEATHSIG: no orphan keeps computing
        assert time.monotonic() < deadline, f"worker {worker} outlived the server"
        time.sleep(0.2)
    was_running = {t for (t,) in db_rows(srv.service_dir, "SELECT id FROM tasks WHERE state = 'running'")}
    assert set(running) <= was_running

    srv = Server(tmp_path / "svc", tmp_path / "store", *args).start()
    try:
        done = srv.wait(ids)
        assert all(s["status"] == "done" for s in done.values()), done
        events = db_rows(srv.service_dir, "SELECT task_id, event FROM events")
        for t in ids:
            assert [e for tid, e in events if tid == t].count("done") == 1, (t, events)
            assert "failed" not in [e for tid, e in events if tid == t]
        for t in was_running:
            assert ("requeued" in [e for tid, e in events if tid == t])
            (attempt,) = db_rows(srv.service_dir, "SELECT attempt FROM tasks WHERE id = ?", (t,))[0]
            assert attempt == 2
        videos = {t: (srv.service_dir / "videos" / f"{t}.mp4").read_bytes() for t in ids}
    finally:
        srv.stop()

    # the same jobs, uninterrupted, in a fresh store: byte-identical videos
    rows = [{"job_id": t, "prompt": j["prompt"], "seed": j["seed"], "height": 64, "width": 64, "num_frames": 5,
             "infer_steps": 3} for t, j in zip(ids, jobs)]
    ref = tmp_path / "reference"
    assert run_batch(write_manifest(ref / "m.parquet", rows), ref)
    for t, result in read_results(ref / "outputs").items():
        assert Path(result["video"]).read_bytes() == videos[t], t
    assert decode_mp4(srv.service_dir / "videos" / f"{ids[0]}.mp4") == (5, (64, 64))


def test_task_timeout_fails_the_task_and_a_fresh_worker_takes_over(tmp_path, tiny_root):
    # the worker wedges in its first denoise step (a hung driver call): no machine is fast enough to finish
    srv = Server(tmp_path / "svc", tmp_path / "store", "--task-timeout", "5",
                 env={"WAN_BATCH_FAULT": "denoise-high:1:step:hang"}).start()
    try:
        first_worker = srv.worker_pid()
        heavy = srv.submit(prompt="a wedged job", seed=1, **SMALL)
        st = srv.wait([heavy], timeout=600)[heavy]
        assert st["status"] == "failed" and "TASK_TIMEOUT=5" in st["error"], st
        assert os.path.exists(srv.service_dir / "worker.log")
        deadline = time.monotonic() + 300
        while True:
            health = requests.get(srv.url + "/health", timeout=30).json()
            if health["status"] == "ok" and health["worker"]["pid"] != first_worker:
                break
            assert time.monotonic() < deadline, (health, srv.output())
            time.sleep(0.5)
        assert health["worker"]["timeouts"] == 1 and health["worker"]["restarts"] == 0
        assert not alive(first_worker)
        events = [e for (e,) in db_rows(srv.service_dir, "SELECT event FROM events WHERE task_id = ?", (heavy,))]
        assert events == ["submitted", "claimed", "timeout"]
    finally:
        srv.stop()
