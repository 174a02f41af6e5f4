"""The durable task queue: one SQLite file in WAL mode, shared by the server (submit, status) and the worker
process (claim, finish).

A submission is committed (synchronous=FULL) before the server replies. Claiming moves a drain of queued tasks
(the oldest, then the cheapest that fit in a budget of denoise steps) to `running` under a fresh run id;
finishing updates only rows still `running` under that run id, so a task finishes exactly once even if a
stale worker or a timed-out run reports late, and a task cancelled while running stays cancelled. A worker
that starts finds the tasks a dead worker left `running` and puts them back in the queue (the artifact store
makes the re-run cheap and byte-identical); such a task is then claimed alone, and one whose worker died
`max_attempts` times fails, so one poisonous job can neither crash the worker forever nor take its group
down. Every transition is appended to `events`.
"""
from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

STATES = ("queued", "running", "done", "failed", "cancelled")
ACTIVE = ("queued", "running")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    api TEXT NOT NULL,
    job TEXT NOT NULL,
    state TEXT NOT NULL,
    attempt INTEGER NOT NULL DEFAULT 0,
    run_id TEXT,
    worker_pid INTEGER,
    plan TEXT,
    video TEXT,
    error TEXT,
    error_type TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS tasks_by_state ON tasks(state, seq);
CREATE INDEX IF NOT EXISTS tasks_by_run ON tasks(run_id);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id TEXT NOT NULL,
    at REAL NOT NULL,
    event TEXT NOT NULL,
    detail TEXT
);
CREATE INDEX IF NOT EXISTS events_by_task ON events(task_id);
CREATE TABLE IF NOT EXISTS stage_runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL,
    stage TEXT NOT NULL,
    key TEXT NOT NULL,
    seconds REAL NOT NULL,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS stage_uses (
    run_id TEXT NOT NULL,
    stage TEXT NOT NULL,
    uses INTEGER NOT NULL,
    computed INTEGER NOT NULL,
    PRIMARY KEY (run_id, stage)
);
CREATE TABLE IF NOT EXISTS kv (k TEXT PRIMARY KEY, v TEXT NOT NULL);
"""


class QueueFull(Exception):
    pass


class DuplicateTask(Exception):
    pass


@dataclass
class TaskRow:
    seq: int
    id: str
    api: str
    job: dict[str, Any]
    state: str
    attempt: int
    run_id: str | None
    worker_pid: int | None
    plan: dict[str, list] | None  # stage name -> [artifact stage, key, ext], set when the worker plans it
    video: str | None
    error: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    error_type: str | None = None  # LightX2V's error_type: what kind of failure (ERROR_TYPES in worker.py)

    @classmethod
    def from_row(cls, r: sqlite3.Row) -> "TaskRow":
        d = dict(r)
        d["job"] = json.loads(d["job"])
        d["plan"] = json.loads(d["plan"]) if d["plan"] else None
        return cls(**d)


class TaskQueue:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._conn().executescript(_SCHEMA)
        columns = {r[1] for r in self._conn().execute("PRAGMA table_info(tasks)")}
        if "error_type" not in columns:  # a queue file from before error_type
            self._conn().execute("ALTER TABLE tasks ADD COLUMN error_type TEXT")

    # -- connections -------------------------------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")  # a reply means the row survived a crash
            self._local.conn = conn
        return conn

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        c = self._conn()
        c.execute("BEGIN IMMEDIATE")
        try:
            yield c
        except BaseException:
            c.execute("ROLLBACK")
            raise
        c.execute("COMMIT")

    @staticmethod
    def _event(c: sqlite3.Connection, task_id: str, event: str, detail: str | None = None) -> None:
        c.execute("INSERT INTO events (task_id, at, event, detail) VALUES (?, ?, ?, ?)",
                  (task_id, time.time(), event, detail))

    # -- server side -------------------------------------------------------------------------------------
    def submit(self, task_id: str, api: str, job: dict[str, Any], max_active: int) -> TaskRow:
        """Commit a new queued task; QueueFull when `max_active` tasks are queued or running."""
        with self._tx() as c:
            active = c.execute(f"SELECT COUNT(*) FROM tasks WHERE state IN {ACTIVE}").fetchone()[0]
            if active >= max_active:
                raise QueueFull(active)
            try:
                c.execute("INSERT INTO tasks (id, api, job, state, created_at) VALUES (?, ?, ?, 'queued', ?)",
                          (task_id, api, json.dumps(job, sort_keys=True), time.time()))
            except sqlite3.IntegrityError:
                raise DuplicateTask(task_id) from None
            self._event(c, task_id, "submitted", api)
        return self.get(task_id)

    def get(self, task_id: str) -> TaskRow | None:
        r = self._conn().execute("SELECT * FROM tasks WHERE id = ?", (task_id,)).fetchone()
        return TaskRow.from_row(r) if r else None

    def recent(self, limit: int = 1000) -> list[TaskRow]:
        rows = self._conn().execute("SELECT * FROM tasks ORDER BY seq DESC LIMIT ?", (limit,)).fetchall()
        return [TaskRow.from_row(r) for r in rows]

    def position(self, task: TaskRow) -> int:
        """How many queued tasks are ahead of this one."""
        return self._conn().execute("SELECT COUNT(*) FROM tasks WHERE state = 'queued' AND seq < ?",
                                    (task.seq,)).fetchone()[0]

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(STATES, 0)
        for state, n in self._conn().execute("SELECT state, COUNT(*) FROM tasks GROUP BY state"):
            out[state] = n
        return out

    def cancel(self, task_id: str) -> bool:
        """Cancel a queued or running task. A running one stops at its next solver step: the worker sees the
        state at each step (cancelled_in_run) and abandons the artifacts only cancelled tasks need."""
        with self._tx() as c:
            cur = c.execute("UPDATE tasks SET state = 'cancelled', finished_at = ?, error = 'cancelled by the "
                            f"client' WHERE id = ? AND state IN {ACTIVE}", (time.time(), task_id))
            if cur.rowcount:
                self._event(c, task_id, "cancelled")
            return cur.rowcount == 1

    def cancel_all(self) -> list[str]:
        """Cancel every queued and running task (LightX2V's DELETE /v1/tasks/all/running)."""
        with self._tx() as c:
            ids = [r[0] for r in c.execute(f"SELECT id FROM tasks WHERE state IN {ACTIVE} ORDER BY seq")]
            c.execute(f"UPDATE tasks SET state = 'cancelled', finished_at = ?, error = 'cancelled by the client' "
                      f"WHERE state IN {ACTIVE}", (time.time(),))
            for task_id in ids:
                self._event(c, task_id, "cancelled")
        return ids

    def cancelled_in_run(self, run_id: str) -> set[str]:
        return {r[0] for r in self._conn().execute(
            "SELECT id FROM tasks WHERE run_id = ? AND state = 'cancelled'", (run_id,))}

    def finish_events(self) -> list[tuple[str, str]]:
        """(task id, event) of every finishing transition, in the order they were committed."""
        return [(t, e) for t, e in self._conn().execute(
            "SELECT task_id, event FROM events WHERE event NOT IN ('submitted', 'claimed', 'requeued') ORDER BY id")]

    def events(self, task_id: str) -> list[tuple[str, str | None]]:
        return [(e, d) for e, d in self._conn().execute(
            "SELECT event, detail FROM events WHERE task_id = ? ORDER BY id", (task_id,))]

    # -- worker side -------------------------------------------------------------------------------------
    def claim(self, limit: int, worker_pid: int, cost: Callable[[dict[str, Any]], int] | None = None,
              budget: int | None = None) -> tuple[str | None, list[TaskRow]]:
        """Move queued tasks to running under a new run id: the oldest queued task always (so every task
        reaches the front and runs), then the cheapest others (ties: oldest first) while the drain's total
        `cost(job)` stays within `budget` and it holds at most `limit` tasks. With no cost, FIFO up to `limit`.
        A task that was running when a worker died runs alone, so a job that kills the worker cannot fail its
        neighbours."""
        with self._tx() as c:
            rows = c.execute("SELECT id, attempt, job FROM tasks WHERE state = 'queued' ORDER BY seq").fetchall()
            if not rows:
                return None, []
            first = rows[0]
            ids = [first["id"]]
            if first["attempt"] == 0:
                rest = [r for r in rows[1:] if r["attempt"] == 0]
                if cost is None or budget is None:
                    ids += [r["id"] for r in rest[:limit - 1]]
                else:
                    costs = {r["id"]: cost(json.loads(r["job"])) for r in [first, *rest]}
                    total = costs[first["id"]]
                    for r in sorted(rest, key=lambda r: costs[r["id"]]):  # stable: ties stay oldest first
                        if len(ids) >= limit or total + costs[r["id"]] > budget:
                            break  # sorted by cost: no later task fits either
                        ids.append(r["id"])
                        total += costs[r["id"]]
            run_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:8]
            now = time.time()
            for task_id in ids:
                c.execute("UPDATE tasks SET state = 'running', attempt = attempt + 1, run_id = ?, worker_pid = ?, "
                          "started_at = ?, plan = NULL WHERE id = ?", (run_id, worker_pid, now, task_id))
                self._event(c, task_id, "claimed", run_id)
        return run_id, sorted((self.get(t) for t in ids), key=lambda t: t.seq)

    def set_plans(self, run_id: str, plans: dict[str, dict[str, list]]) -> None:
        with self._tx() as c:
            for task_id, plan in plans.items():
                c.execute("UPDATE tasks SET plan = ? WHERE id = ? AND run_id = ? AND state = 'running'",
                          (json.dumps(plan), task_id, run_id))

    def running(self, run_id: str | None = None, worker_pid: int | None = None) -> list[TaskRow]:
        sql, args = "SELECT * FROM tasks WHERE state = 'running'", []
        if run_id is not None:
            sql, args = sql + " AND run_id = ?", args + [run_id]
        if worker_pid is not None:
            sql, args = sql + " AND worker_pid = ?", args + [worker_pid]
        return [TaskRow.from_row(r) for r in self._conn().execute(sql + " ORDER BY seq", args)]

    def finish(self, run_id: str, outcomes: dict[str, tuple[str, str | None, str | None]],
               stage_runs: list[tuple[str, str, float]] = (), stage_uses: dict[str, tuple[int, int]] | None = None,
               event: str | None = None) -> int:
        """Mark tasks of `run_id` done/failed: outcomes[id] = (state, video, error[, error_type]). Only rows still
        running
        under this run id change (exactly once); returns how many did. Stage statistics are recorded in the
        same transaction, so they count each drain once too."""
        now = time.time()
        with self._tx() as c:
            changed = 0
            for task_id, (state, video, error, *kind) in outcomes.items():
                assert state in ("done", "failed"), state
                cur = c.execute("UPDATE tasks SET state = ?, video = ?, error = ?, error_type = ?, finished_at = ? "
                                "WHERE id = ? AND state = 'running' AND run_id = ?",
                                (state, video, error, (kind or [None])[0], now, task_id, run_id))
                if cur.rowcount:
                    changed += 1
                    self._event(c, task_id, state if state == "done" else (event or state), error)
            if changed:
                c.executemany("INSERT INTO stage_runs (run_id, stage, key, seconds, at) VALUES (?, ?, ?, ?, ?)",
                              [(run_id, stage, key, seconds, now) for stage, key, seconds in stage_runs])
                c.executemany("INSERT OR REPLACE INTO stage_uses (run_id, stage, uses, computed) VALUES (?, ?, ?, ?)",
                              [(run_id, stage, u, k) for stage, (u, k) in (stage_uses or {}).items()])
        return changed

    def requeue_orphans(self, max_attempts: int) -> tuple[list[str], list[str]]:
        """Tasks left running by a dead worker: back to queued, or failed after `max_attempts` tries.
        Call only while holding the worker lock (no live worker owns them)."""
        requeued, failed = [], []
        with self._tx() as c:
            for r in c.execute("SELECT id, attempt, run_id FROM tasks WHERE state = 'running'").fetchall():
                if r["attempt"] >= max_attempts:
                    c.execute("UPDATE tasks SET state = 'failed', finished_at = ?, error_type = 'WorkerCrashed', "
                              "error = ? WHERE id = ?",
                              (time.time(), f"the worker stopped {r['attempt']} times while running this task "
                               f"(last run {r['run_id']}); giving up", r["id"]))
                    self._event(c, r["id"], "failed", "attempts exhausted")
                    failed.append(r["id"])
                else:
                    c.execute("UPDATE tasks SET state = 'queued', run_id = NULL, worker_pid = NULL, "
                              "started_at = NULL, plan = NULL WHERE id = ?", (r["id"],))
                    self._event(c, r["id"], "requeued", r["run_id"])
                    requeued.append(r["id"])
        return requeued, failed

    # -- worker status (heartbeat, health) ---------------------------------------------------------------
    def put(self, key: str, value: Any) -> None:
        with self._tx() as c:
            c.execute("INSERT OR REPLACE INTO kv (k, v) VALUES (?, ?)", (key, json.dumps(value)))

    def fetch(self, key: str) -> Any:
        r = self._conn().execute("SELECT v FROM kv WHERE k = ?", (key,)).fetchone()
        return json.loads(r[0]) if r else None

    # -- metrics -----------------------------------------------------------------------------------------
    def stage_seconds(self) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {}
        for stage, seconds in self._conn().execute("SELECT stage, seconds FROM stage_runs ORDER BY id"):
            out.setdefault(stage, []).append(seconds)
        return out

    def stage_use_totals(self) -> dict[str, tuple[int, int]]:
        return {stage: (uses, computed) for stage, uses, computed in self._conn().execute(
            "SELECT stage, SUM(uses), SUM(computed) FROM stage_uses GROUP BY stage")}

    def task_seconds(self) -> list[float]:
        """Submission to finish, for done tasks."""
        return [r[0] for r in self._conn().execute(
            "SELECT finished_at - created_at FROM tasks WHERE state = 'done' AND finished_at IS NOT NULL")]
