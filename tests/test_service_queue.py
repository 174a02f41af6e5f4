"""The service's SQLite queue on its own (no server): FIFO claims in groups, claims bounded in denoise steps,
exactly-once finishing fenced by run id, requeue after a dead worker (alone, then failed after max_attempts),
the queue limit, cancel (queued, running, all)."""
from __future__ import annotations

import pytest

from pipeline.service.queue import DuplicateTask, QueueFull, TaskQueue


def job(i: int) -> dict:
    return {"prompt": f"p{i}", "seed": i, "overrides": {}}


@pytest.fixture
def queue(tmp_path):
    q = TaskQueue(tmp_path / "q.sqlite")
    for i in range(5):
        q.submit(f"t{i}", "seed", job(i), max_active=100)
    return q


def test_claims_are_fifo_groups_and_finish_exactly_once(queue):
    run_a, first = queue.claim(3, worker_pid=111)
    assert [t.id for t in first] == ["t0", "t1", "t2"] and all(t.state == "running" for t in first)
    run_b, rest = queue.claim(3, worker_pid=111)
    assert [t.id for t in rest] == ["t3", "t4"] and run_b != run_a
    assert queue.claim(3, worker_pid=111) == (None, [])

    assert queue.finish(run_b, {"t0": ("done", "/v/t0.mp4", None)}) == 0  # t0 belongs to run_a: fenced
    assert queue.finish(run_a, {"t0": ("done", "/v/t0.mp4", None), "t1": ("failed", None, "boom")},
                        stage_runs=[("text", "k1", 0.5)], stage_uses={"text": (4, 1)}) == 2
    assert queue.finish(run_a, {"t0": ("failed", None, "late report")}) == 0  # already finished
    assert queue.get("t0").state == "done" and queue.get("t0").video == "/v/t0.mp4"
    assert queue.get("t1").error == "boom"
    assert [e for e, _ in queue.events("t0")] == ["submitted", "claimed", "done"]
    assert queue.stage_seconds() == {"text": [0.5]} and queue.stage_use_totals() == {"text": (4, 1)}
    assert queue.counts() == {"queued": 0, "running": 3, "done": 1, "failed": 1, "cancelled": 0}


def test_tasks_of_a_dead_worker_are_requeued_alone_then_failed(queue):
    run, tasks = queue.claim(5, worker_pid=111)
    assert queue.requeue_orphans(max_attempts=2) == (["t0", "t1", "t2", "t3", "t4"], [])
    assert queue.finish(run, {"t0": ("done", "/v", None)}) == 0  # the dead worker's late report is ignored
    # requeued tasks run one per claim: a job that kills the worker cannot fail the others again
    run2, alone = queue.claim(5, worker_pid=222)
    assert [t.id for t in alone] == ["t0"] and alone[0].attempt == 2
    assert queue.requeue_orphans(max_attempts=2) == ([], ["t0"])  # second death: give up on t0
    assert "stopped 2 times" in queue.get("t0").error
    _, next_ = queue.claim(5, worker_pid=222)
    assert [t.id for t in next_] == ["t1"]
    assert [e for e, _ in queue.events("t0")] == ["submitted", "claimed", "requeued", "claimed", "failed"]


def test_queue_limit_duplicates_and_cancel(tmp_path):
    q = TaskQueue(tmp_path / "q.sqlite")
    q.submit("a", "seed", job(0), max_active=2)
    q.submit("b", "seed", job(1), max_active=2)
    with pytest.raises(QueueFull):
        q.submit("c", "seed", job(2), max_active=2)
    with pytest.raises(DuplicateTask):
        q.submit("a", "seed", job(0), max_active=10)
    assert q.position(q.get("b")) == 1
    assert q.cancel("a") and not q.cancel("a")
    q.submit("c", "seed", job(2), max_active=2)  # a cancelled task frees its slot
    _, claimed = q.claim(10, worker_pid=1)
    assert [t.id for t in claimed] == ["b", "c"]
    assert q.cancel("b") and q.get("b").state == "cancelled"  # running: cancelled (the worker stops its steps)
    assert q.cancelled_in_run(claimed[0].run_id) == {"b"}
    assert q.finish(claimed[0].run_id, {"b": ("done", "/v", None), "c": ("done", "/v", None)}) == 1  # b stays
    assert q.get("b").state == "cancelled" and q.get("c").state == "done"
    q.submit("d", "seed", job(3), max_active=10)
    q.submit("e", "seed", job(4), max_active=10)
    q.claim(1, worker_pid=1)
    assert q.cancel_all() == ["d", "e"] and q.counts()["cancelled"] == 4  # a, b, d, e
    # a second handle (another process) sees the same rows: the queue is the file
    assert TaskQueue(tmp_path / "q.sqlite").get("c").state == "done"


def steps_job(i: int, steps: int) -> dict:
    return {"prompt": f"p{i}", "seed": i, "overrides": {"infer_steps": steps}}


def test_a_short_task_is_not_held_behind_long_ones(tmp_path):
    """Ten 40-step tasks, then a 2-step one, with a drain budget of 80 steps: the oldest task always runs,
    the cheapest others fill the budget, so the short task is in the first drain, not the eleventh."""
    q = TaskQueue(tmp_path / "q.sqlite")
    for i in range(10):
        q.submit(f"long{i}", "seed", steps_job(i, 40), max_active=100)
    q.submit("short", "seed", steps_job(10, 2), max_active=100)
    cost = lambda job: job["overrides"]["infer_steps"]  # noqa: E731
    drains = []
    while True:
        run, tasks = q.claim(16, worker_pid=1, cost=cost, budget=80)
        if not tasks:
            break
        drains.append([t.id for t in tasks])
        q.finish(run, {t.id: ("done", "/v", None) for t in tasks})
    assert drains[0] == ["long0", "short"]  # 40 + 2; another 40 would make 82 > 80
    assert drains[1:] == [["long1", "long2"], ["long3", "long4"], ["long5", "long6"], ["long7", "long8"], ["long9"]]
    assert [t for t, e in q.finish_events()].index("short") == 1  # finished with the first drain


def test_no_task_starves_and_one_over_budget_runs_alone(tmp_path):
    """A long task at the front runs even though it alone exceeds the budget; short tasks submitted after
    it keep filling later drains, but the long ones behind them reach the front in submission order."""
    q = TaskQueue(tmp_path / "q.sqlite")
    q.submit("huge", "seed", steps_job(0, 500), max_active=100)
    q.submit("long", "seed", steps_job(1, 60), max_active=100)
    for i in range(3):
        q.submit(f"s{i}", "seed", steps_job(2 + i, 10), max_active=100)
    cost = lambda job: job["overrides"]["infer_steps"]  # noqa: E731
    run, tasks = q.claim(16, worker_pid=1, cost=cost, budget=80)
    assert [t.id for t in tasks] == ["huge"]  # 500 > 80: alone, but it runs
    q.finish(run, {t.id: ("done", "/v", None) for t in tasks})
    for i in range(3, 6):  # more short work arrives while "long" waits
        q.submit(f"s{i}", "seed", steps_job(2 + i, 10), max_active=100)
    run, tasks = q.claim(16, worker_pid=1, cost=cost, budget=80)
    assert [t.id for t in tasks] == ["long", "s0", "s1"]  # the oldest first, then what fits: 60 + 10 + 10
    q.finish(run, {t.id: ("done", "/v", None) for t in tasks})
    run, tasks = q.claim(2, worker_pid=1, cost=cost, budget=80)
    assert [t.id for t in tasks] == ["s2", "s3"]  # batch_max still caps the count
