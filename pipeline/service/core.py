"""What both APIs share: enqueue a job, describe a task, find its video, report health."""
from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

from ..config import load_config
from ..store import ArtifactStore
from .inputs import ImageFetcher, RequestError
from .progress import stage_progress
from .queue import DuplicateTask, QueueFull, TaskQueue, TaskRow
from .settings import ServiceSettings
from .supervisor import Supervisor

HEARTBEAT_STALE_S = 30.0


class Service:
    def __init__(self, settings: ServiceSettings, start_worker: bool = True):
        settings.make_dirs()
        self.settings = settings
        self.queue = TaskQueue(settings.db_path)
        self.config = load_config(settings.config or None, settings.model_path or None)
        self.store = ArtifactStore(settings.store)
        self.images = ImageFetcher(settings)
        self.supervisor = Supervisor(settings, self.queue) if start_worker else None

    # -- submission --------------------------------------------------------------------------------------
    def enqueue(self, job: dict[str, Any], api: str, task_id: str | None = None) -> TaskRow:
        self._check_task_kind(job)
        task_id = task_id or uuid.uuid4().hex
        try:
            return self.queue.submit(task_id, api, job, self.settings.max_queue)
        except QueueFull as e:
            raise RequestError(503, f"the queue is full: {e.args[0]} tasks are queued or running "
                                    f"(MAX_CONCURRENT_TASKS={self.settings.max_queue}); retry later") from None
        except DuplicateTask:
            raise RequestError(409, f"task_id {task_id!r} already exists") from None

    def _check_task_kind(self, job: dict[str, Any]) -> None:
        """Refuse I2V (or T2V) up front when the worker found this config cannot run it."""
        models = (self.queue.fetch("worker") or {}).get("models") or {}
        kind = "i2v" if job.get("image") else "t2v"
        if models.get(kind, "ok") != "ok":
            what = "image-to-video" if kind == "i2v" else "text-to-video"
            raise RequestError(422, f"this server cannot run {what} with its config: {models[kind]}")

    # -- status ------------------------------------------------------------------------------------------
    def describe(self, task: TaskRow) -> dict[str, Any]:
        stage, progress, done = None, 0.0, []
        if task.state == "done":
            progress = 1.0
            done = list(task.plan or [])
        elif task.plan:
            stage, progress, done = stage_progress(task.plan, self.store)
            if task.state == "running" and stage is None:
                stage = "publishing"
        elif task.state in ("queued", "running"):
            stage = "queued" if task.state == "queued" else "planning"
        return {"task_id": task.id, "status": task.state, "stage": stage, "progress": round(progress, 4),
                "stages_done": done, "queue_position": self.queue.position(task) if task.state == "queued" else None,
                "error": task.error, "seed": task.job["seed"], "created_at": task.created_at,
                "started_at": task.started_at, "finished_at": task.finished_at}

    def video_file(self, task: TaskRow) -> Path | None:
        if task.state != "done" or not task.video:
            return None
        path = Path(task.video)
        return path if path.is_file() else None

    def get(self, task_id: str) -> TaskRow:
        task = self.queue.get(task_id)
        if task is None:
            raise RequestError(404, f"no task {task_id!r}")
        return task

    # -- health ------------------------------------------------------------------------------------------
    def worker_alive(self, worker: dict[str, Any]) -> bool:
        pid = self.supervisor.pid if self.supervisor else None
        return bool(pid and worker.get("pid") == pid and time.time() - worker.get("heartbeat", 0) < HEARTBEAT_STALE_S)

    def health(self) -> tuple[int, dict[str, Any]]:
        worker = self.queue.fetch("worker") or {}
        pid = self.supervisor.pid if self.supervisor else None
        current = bool(pid and worker.get("pid") == pid)
        alive = self.worker_alive(worker)
        models = worker.get("models", {}) if current else {}
        if alive and "ok" in (models.get("t2v"), models.get("i2v")):
            status = "ok"
        elif pid and not current:
            status = "starting"
        else:
            status = "degraded"
        counts = self.queue.counts()
        body = {
            "status": status,
            "worker": {"alive": alive, "pid": pid, "restarts": self.supervisor.restarts if self.supervisor else 0,
                       "timeouts": self.supervisor.timeouts if self.supervisor else 0,
                       "heartbeat_age_s": round(time.time() - worker["heartbeat"], 2)
                       if current and worker.get("heartbeat") else None,
                       "run_id": worker.get("run_id") if current else None,
                       "model_loads": worker.get("model_loads", {}) if current else {}},
            "models": models, "device": worker.get("device") if current else None,
            "cuda": worker.get("cuda") if current else None,
            "queue_depth": counts["queued"], "running": counts["running"], "max_queue": self.settings.max_queue,
            "tasks": counts,
        }
        return (200 if status == "ok" else 503), body
