"""The worker process: models stay resident here while it drains the queue through the batch engine.

Loop: claim a drain under a fresh run id (the oldest queued task, then the cheapest others while the drain
holds at most drain_steps denoise steps and batch_max tasks: queue.claim) -> write them as a Parquet manifest
in <service>/inbox -> plan them (stored for /status) -> run_batch (RunManifest over Luigi, local scheduler,
one worker: the same tasks as `wan-batch run`, so the drain runs stage-major and shares the store's cache) ->
read results.parquet -> publish each video to <service>/videos/<task>.mp4 (a task whose video cannot be
written fails alone) -> mark every task done/failed in one transaction (exactly once). Tasks waiting meanwhile
are admitted at the next drain, so a short task waits for at most the drain in progress. A task cancelled
while it runs stops at its next solver step (faults.set_step_hook), unless a live task shares the artifact.
A worker starts by taking <service>/worker.lock, so it waits for a previous worker to be gone, and then
requeues what that worker left running.

Run by the server's supervisor: `python -m pipeline.service.worker --service-dir DIR --parent-pid PID`.
It dies with the server (PR_SET_PDEATHSIG), so a kill -9 of the server leaves no orphan computing.
"""
from __future__ import annotations

import argparse
import ctypes
import fcntl
import logging
import os
import shutil
import signal
import sys
import threading
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..store import ArtifactStore, atomic_path
from .inputs import RequestError
from .progress import plan_refs, ref
from .queue import TaskQueue, TaskRow
from .schemas import result_target
from .settings import ServiceSettings

log = logging.getLogger("wan_batch.service.worker")

MANIFEST_SCHEMA = pa.schema([
    ("job_id", pa.string()), ("prompt", pa.string()), ("negative_prompt", pa.string()), ("image", pa.string()),
    ("seed", pa.int64()), ("height", pa.int64()), ("width", pa.int64()), ("num_frames", pa.int64()),
    ("infer_steps", pa.int64()), ("guide_scale", pa.float64()), ("lora", pa.string()), ("lora_strength", pa.float64()),
])
HEARTBEAT_S = 1.0


def write_manifest(path: Path, tasks: list[TaskRow]) -> None:
    rows = []
    for t in tasks:
        job = t.job
        rows.append({"job_id": t.id, "prompt": job["prompt"], "negative_prompt": job.get("negative_prompt"),
                     "image": job.get("image"), "seed": job["seed"], "lora": job.get("lora"),
                     "lora_strength": job.get("lora_strength"), **job.get("overrides", {})})
    with atomic_path(path) as tmp:
        pq.write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), tmp)


class PublishError(Exception):
    """A finished video could not be put where the task asked: that task fails, with this message."""


def publish(src: Path, task: TaskRow, settings: ServiceSettings, move: bool = False) -> str:
    """Put a finished video at videos/<task>.mp4 (and at LightX2V's save_result_path); return its path.
    `move` renames `src` (a run folder's copy) instead of copying it (the store's own file). Raises
    PublishError naming the path when either cannot be written."""
    dest = settings.videos / f"{task.id}.mp4"
    try:
        if move:
            os.replace(src, dest)
        else:
            with atomic_path(dest) as tmp:
                shutil.copyfile(src, tmp)
    except OSError as e:
        raise PublishError(f"could not write the video to {dest}: {e.strerror or e}") from None
    extra = task.job.get("save_result_path")
    if extra:
        try:  # checked at submission; checked again here (a symlink may have changed since)
            target = result_target(settings, extra)
        except RequestError as e:
            raise PublishError(e.message) from None
        try:
            with atomic_path(target) as tmp:
                shutil.copyfile(dest, tmp)
        except OSError as e:
            raise PublishError(f"could not write save_result_path {extra!r}: {e.strerror or e}") from None
    return str(dest)


def run_engine(manifest: Path, settings: ServiceSettings, out_dir: Path) -> None:
    """The batch engine over one drain's manifest: the only place the worker calls it."""
    from tasks.build import run_batch

    run_batch(str(manifest), config=settings.config, output_dir=str(out_dir), store=settings.store,
              local_scheduler=True, model_path=settings.model_path or "")


class TaskCancelled(Exception):
    """Raised at a solver step of an artifact that only cancelled tasks need: the stage fails for them."""


# error_type of a failed task (LightX2V's status field): ValueError (the request's values were refused when
# the batch read them), StageError (a stage failed for this row), PublishError (the video could not be
# written where asked), TimeoutError (TASK_TIMEOUT), WorkerCrashed (the worker died max_attempts times while
# running it), InternalError (a bug or a disk problem failed the whole drain).


def task_cost(job: dict[str, Any], config: dict[str, Any]) -> int:
    """A task's share of a drain: its denoise steps (the request's infer_steps, else the config's)."""
    return int(job.get("overrides", {}).get("infer_steps") or config["infer_steps"])


class Worker:
    def __init__(self, settings: ServiceSettings):
        self.settings = settings
        self.queue = TaskQueue(settings.db_path)
        self.store = ArtifactStore(settings.store)
        self.state: dict[str, Any] = {"pid": os.getpid(), "started_at": time.time(), "run_id": None,
                                      "drains": 0}
        self._stop = threading.Event()
        self._drain: tuple[str, dict[str, set[str]]] | None = None  # (run id, artifact key -> task ids)
        self._current: str | None = None
        self._config = None
        import luigi

        from .. import faults

        luigi.Task.event_handler(luigi.Event.START)(self._on_task_start)
        faults.set_step_hook(self._check_cancelled)

    # -- health ------------------------------------------------------------------------------------------
    def check_models(self) -> None:
        """Can this config's models be found (and the tiny one built)? Reported by /health."""
        import torch

        from ..config import load_config
        from ..models.loader import fingerprint, resolve_model
        from ..runtime import resolve_device

        models: dict[str, str] = {}
        try:
            config = load_config(self.settings.config or None, self.settings.model_path or None)
            self.state["device"] = str(resolve_device(config["device"]))
            for task in ("t2v", "i2v"):
                try:
                    model = resolve_model(config, task)
                    for component in ("text", "vae", *model.experts):
                        fingerprint(model, component)  # every file the stages will load is there
                    models[task] = "ok"
                except Exception as e:  # reported, not fatal: the other task kind may still work
                    models[task] = f"{type(e).__name__}: {e}"
        except Exception as e:
            models["config"] = f"{type(e).__name__}: {e}"
        self.state["models"] = models
        self.state["cuda"] = {"available": torch.cuda.is_available(),
                              "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}

    def _heartbeat(self) -> None:
        from ..runtime import MODELS

        while not self._stop.wait(HEARTBEAT_S):
            try:
                self.queue.put("worker", {**self.state, "heartbeat": time.time(),
                                          "model_loads": {f"{k[0]}:{k[1]}": n for k, n in MODELS.loads.items()}})
            except Exception as e:  # a busy database must not kill the worker
                log.warning("heartbeat failed: %s", e)

    # -- main loop ---------------------------------------------------------------------------------------
    def run(self) -> None:
        requeued, failed = self.queue.requeue_orphans(self.settings.max_attempts)
        if requeued or failed:
            log.info("a previous worker left %d task(s) running: %d requeued, %d failed (attempts exhausted)",
                     len(requeued) + len(failed), len(requeued), len(failed))
        self.check_models()
        self.queue.put("worker", {**self.state, "heartbeat": time.time()})
        threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True).start()
        while True:
            if not self.run_once():
                time.sleep(self.settings.poll_interval)

    def run_once(self) -> bool:
        """Claim one drain (see queue.claim: the oldest task, then the cheapest that fit in drain_steps) and
        run it; False when nothing was waiting."""
        from ..config import load_config

        if self._config is None:  # read once: a poll every 0.2 s need not parse the config again
            self._config = load_config(self.settings.config or None)
        config = self._config
        run_id, tasks = self.queue.claim(self.settings.batch_max, os.getpid(),
                                         cost=lambda job: task_cost(job, config), budget=self.settings.drain_steps)
        if not tasks:
            return False
        self.state["run_id"] = run_id
        try:
            self.drain(run_id, tasks)
        except Exception as e:  # a bug or a disk problem: fail this group with the reason, keep serving
            log.error("drain %s failed: %s\n%s", run_id, e, traceback.format_exc())
            self.queue.finish(run_id, {t.id: ("failed", None, f"internal error: {type(e).__name__}: {e}",
                                              "InternalError") for t in tasks})
        finally:
            self.state["run_id"] = None
            self.state["drains"] += 1
        return True

    # -- cancelling a running task -----------------------------------------------------------------------
    def _on_task_start(self, task) -> None:
        """Luigi's START event (same process: one local worker): the artifact now being computed."""
        self._current = getattr(task, "key", None)

    def _check_cancelled(self, stage: str) -> None:
        """Before each solver step: stop if every task of this drain that needs the artifact was cancelled.
        Artifacts other tasks share keep running; what is already in the store stays valid."""
        drain = self._drain
        if drain is None or self._current is None:
            return
        run_id, needs = drain
        users = needs.get(self._current)
        if not users:
            return
        cancelled = self.queue.cancelled_in_run(run_id)
        if users <= cancelled:
            raise TaskCancelled(f"cancelled by the client (task {', '.join(sorted(users))})")

    def drain(self, run_id: str, tasks: list[TaskRow]) -> None:
        import luigi

        from ..batch import load_batch
        from ..errors import WanBatchError

        s = self.settings
        manifest, out_dir = s.inbox / f"{run_id}.parquet", s.runs / run_id
        write_manifest(manifest, tasks)
        log.info("run %s: %d task(s)", run_id, len(tasks))
        try:  # the same validation and planning RunManifest does, so the stored plans match its artifacts
            plans = {p.job.job_id: p for p in load_batch(manifest, s.config, model_path=s.model_path or None).plans}
        except WanBatchError as e:
            self.queue.finish(run_id, {t.id: ("failed", None, str(e), "ValueError") for t in tasks})
            return
        refs = {tid: plan_refs(p) for tid, p in plans.items() if p.decode is not None}
        self.queue.set_plans(run_id, refs)
        unique = {(r[0], r[1]): r for plan in refs.values() for r in plan.values()}
        before = {k for k, r in unique.items() if self.store.sidecar_path(ref(r)).is_file()}
        needs: dict[str, set[str]] = {}
        for tid, plan in refs.items():
            for r in plan.values():
                needs.setdefault(r[1], set()).add(tid)

        self._drain, self._current = (run_id, needs), None
        try:
            run_engine(manifest, s, out_dir)
        finally:
            self._drain = self._current = None

        results = {}
        if (out_dir / "results.parquet").is_file():
            results = {r["job_id"]: r for r in pq.read_table(out_dir / "results.parquet").to_pylist()}
        outcomes: dict[str, tuple] = {}
        for t in tasks:
            r = results.get(t.id)
            if r and r["status"] == "ok":
                try:  # one task's bad path or full disk fails that task, never its neighbours
                    outcomes[t.id] = ("done", publish(Path(r["video"]), t, s, move=True), None)
                except PublishError as e:
                    outcomes[t.id] = ("failed", None, str(e), "PublishError")
            else:
                planned = plans.get(t.id)
                if planned is not None and planned.error:  # the row's values were refused when read
                    outcomes[t.id] = ("failed", None, planned.error, "ValueError")
                else:
                    error = (r or {}).get("error") or ("the batch engine wrote no result for this task "
                                                       f"(see {s.root / 'worker.log'})")
                    outcomes[t.id] = ("failed", None, error, "StageError")
        stage_runs, uses = self._stage_stats(refs, unique, before)
        changed = self.queue.finish(run_id, outcomes, stage_runs, uses)  # cancelled rows stay cancelled
        log.info("run %s: %d done, %d failed (%d marked)", run_id,
                 sum(o[0] == "done" for o in outcomes.values()), sum(o[0] == "failed" for o in outcomes.values()),
                 changed)
        if manifest.is_file():  # the run folder keeps its manifest and results.parquet; videos are in videos/
            os.replace(manifest, out_dir / "manifest.parquet")
        luigi.task_register.Register.clear_instance_cache()  # a long-lived process must not keep every task

    def _stage_stats(self, refs, unique, before) -> tuple[list[tuple[str, str, float]], dict[str, tuple[int, int]]]:
        """Artifacts this drain computed (with their seconds) and, per stage, uses vs computations."""
        computed = []
        for k, r in unique.items():
            if k in before:
                continue
            side = self.store.sidecar(ref(r))
            if side is not None and side.get("wall_s") is not None:
                computed.append((r[0], r[1], float(side["wall_s"])))
        uses = Counter(r[0] for plan in refs.values() for r in plan.values())
        made = Counter(stage for stage, _, _ in computed)
        return computed, {stage: (uses[stage], made[stage]) for stage in uses}


def _die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when the server dies, even by kill -9 (Linux prctl PR_SET_PDEATHSIG)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        log.warning("cannot ask to die with the server on this platform")
    if parent_pid and os.getppid() != parent_pid:  # the server died before prctl took effect
        sys.exit(0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="wan-batch service worker (started by `wan-batch serve`)")
    p.add_argument("--service-dir", required=True)
    p.add_argument("--parent-pid", type=int, default=0)
    args = p.parse_args(argv)
    _die_with_parent(args.parent_pid)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(levelname)s %(name)s: %(message)s")
    import luigi.configuration

    cfg = luigi.configuration.get_config()
    if not cfg.has_section("core"):
        cfg.add_section("core")
    cfg.set("core", "no_configure_logging", "true")  # Luigi's messages go to this log once, not twice
    settings = ServiceSettings.load(args.service_dir)
    with open(Path(args.service_dir) / "worker.lock", "a+") as lock:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for the previous worker to exit")
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        Worker(settings).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
