"""The service's worker in this process (no HTTP, no subprocess) on the tiny model: drains bounded in denoise
steps (a short task finishes with the first drain, not behind every long one), a running task cancelled
between two solver steps (it stops at the next one; its neighbour finishes), and one task's publish error
failing that task only. Orders are read from the queue's events, never from the clock."""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from pipeline import faults
from pipeline.service.settings import ServiceSettings
from pipeline.service.worker import Worker

SMALL = {"target_width": 64, "target_height": 64, "target_video_length": 5}
MAX_DRAINS = 12  # every loop below is bounded


def job(prompt: str, steps: int, seed: int = 1, save: str | None = None) -> dict:
    return {"prompt": prompt, "negative_prompt": None, "seed": seed,
            "overrides": {**SMALL, "infer_steps": steps}, "save_result_path": save}


@pytest.fixture
def worker(tmp_path, tiny_root, request):
    settings = ServiceSettings(service_dir=str(tmp_path / "svc"), store=str(tmp_path / "store"),
                               **getattr(request, "param", {})).resolved()
    settings.make_dirs()
    w = Worker(settings)
    yield w
    faults.set_step_hook(None)


def drain_all(w: Worker) -> list[list[str]]:
    """Run drains until the queue is empty; the task ids each drain claimed, drain by drain."""
    for _ in range(MAX_DRAINS):
        if not w.run_once():
            break
    else:
        raise AssertionError(f"queue not empty after {MAX_DRAINS} drains")
    with sqlite3.connect(w.settings.db_path) as conn:
        claims = conn.execute("SELECT task_id, detail FROM events WHERE event = 'claimed' ORDER BY id").fetchall()
    runs: dict[str, list[str]] = {}
    for task_id, run_id in claims:
        runs.setdefault(run_id, []).append(task_id)
    return list(runs.values())


@pytest.mark.parametrize("worker", [{"drain_steps": 10}], indirect=True)
def test_short_task_finishes_with_the_first_drain(worker):
    q = worker.queue
    for i in range(3):
        q.submit(f"long{i}", "seed", job(f"a long task {i}", 8, seed=i), max_active=100)
    q.submit("short", "seed", job("a short task", 2), max_active=100)
    drains = drain_all(worker)
    assert drains == [["long0", "short"], ["long1"], ["long2"]]  # 8 + 2 fit in 10; 8 + 8 does not
    finished = [t for t, e in q.finish_events()]
    assert finished.index("short") < finished.index("long1")
    assert all(q.get(t).state == "done" for t in ("long0", "long1", "long2", "short"))
    for t in ("short", "long2"):
        assert Path(q.get(t).video).stat().st_size > 0


def test_cancelling_a_running_task_stops_it_at_the_next_step(worker):
    q = worker.queue
    q.submit("victim", "lightx2v", job("the task that is cancelled", 6, seed=3), max_active=100)
    q.submit("neighbour", "lightx2v", job("the task that goes on", 2, seed=4), max_active=100)
    steps: dict[str, list[str]] = {"victim": [], "neighbour": []}
    check = worker._check_cancelled

    def client_cancels_during_a_step(stage: str) -> None:
        """Each step is counted for the task(s) needing the artifact; the client's DELETE lands during the
        victim's first step, as if the HTTP request had arrived then."""
        _, needs = worker._drain
        for t in needs.get(worker._current, ()):
            steps[t].append(stage)
        if steps["victim"] and q.get("victim").state == "running":
            assert q.cancel("victim")
        check(stage)

    faults.set_step_hook(client_cancels_during_a_step)
    assert worker.run_once()
    victim, neighbour = q.get("victim"), q.get("neighbour")
    assert victim.state == "cancelled" and victim.run_id == neighbour.run_id
    assert steps["victim"] == ["denoise-high"]  # the step in flight; the next one raised
    assert neighbour.state == "done" and Path(neighbour.video).stat().st_size > 0
    assert [e for e, _ in q.events("victim")] == ["submitted", "claimed", "cancelled"]
    # nothing of the victim's denoising reached the store; what it finished (its text) stays valid
    plan = victim.plan
    store = worker.store
    from pipeline.service.progress import ref

    assert not store.is_complete(ref(plan["denoise-high"])) and not store.is_complete(ref(plan["decode"]))
    assert store.is_complete(ref(plan["text"]))
    failure = store.failure(ref(plan["denoise-high"]))
    assert failure and "cancelled by the client" in failure["error"]


def test_a_bad_save_result_path_fails_only_its_task(worker):
    """col.mp4 and col.mp4/y.mp4 in one drain: the second cannot be written (col.mp4 is a file by then);
    the first and an unrelated /submit task are done, with their videos."""
    q = worker.queue
    q.submit("plain", "seed", job("an innocent task", 2, seed=7), max_active=100)
    q.submit("col", "lightx2v", job("a task saved as col", 2, seed=8, save="col.mp4"), max_active=100)
    q.submit("nested", "lightx2v", job("a task saved under col", 2, seed=9, save="col.mp4/y.mp4"), max_active=100)
    assert worker.run_once()
    plain, col, nested = q.get("plain"), q.get("col"), q.get("nested")
    assert plain.run_id == col.run_id == nested.run_id
    assert plain.state == "done" and col.state == "done", (plain.error, col.error)
    assert (worker.settings.outputs / "col.mp4").read_bytes() == Path(col.video).read_bytes()
    assert nested.state == "failed" and "col.mp4/y.mp4" in nested.error, nested.error
    assert json.loads(json.dumps(nested.error))  # a plain message, not a traceback
