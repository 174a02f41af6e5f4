"""Runs the worker process for the server: start, restart after a crash, enforce TASK_TIMEOUT, stop.

The worker is a child process (not a thread) because stopping a stage in the middle is only possible by
ending the process: when the oldest task of the worker's current run has been running longer than
task_timeout, the worker's process group is killed, tasks whose video is already in the store are marked
done, the others failed with a timeout error, and a fresh worker starts (models load again, the store keeps
every finished stage). All tasks of a drain start running together, so size TASK_TIMEOUT for a whole drain
(at most --drain-steps denoise steps, or one longer task), not for one job.

Every spawn happens on the supervisor's own thread: the worker's PR_SET_PDEATHSIG is tied to the thread that
started it, and this thread lives as long as the server.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time

from ..store import ArtifactStore
from .progress import decode_payload, stage_progress
from .queue import TaskQueue
from .settings import ServiceSettings
from .worker import PublishError, publish

log = logging.getLogger("wan_batch.service")

CHECK_S = 0.5
MAX_BACKOFF_S = 30.0


class Supervisor:
    def __init__(self, settings: ServiceSettings, queue: TaskQueue):
        self.settings, self.queue = settings, queue
        self.store = ArtifactStore(settings.store)
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self.timeouts = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._spawned_at = 0.0

    # -- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="wan-batch-supervisor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def _spawn(self) -> None:
        logfile = open(self.settings.root / "worker.log", "ab")
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pipeline.service.worker", "--service-dir", self.settings.service_dir,
                 "--parent-pid", str(os.getpid())],
                stdin=subprocess.DEVNULL, stdout=logfile, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            logfile.close()
        self._spawned_at = time.monotonic()
        log.info("worker started (pid %d); its log is %s", self.proc.pid, self.settings.root / "worker.log")

    def _kill(self, sig: int, wait_s: float) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, sig)  # the group: the worker and the ffmpeg it may be running
        except ProcessLookupError:
            return
        try:
            self.proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def _loop(self) -> None:
        backoff = 1.0
        self._spawn()
        while not self._stop.wait(CHECK_S):
            code = self.proc.poll()
            if code is None and time.monotonic() - self._spawned_at > 60:
                backoff = 1.0  # it has been running fine: a later crash restarts quickly again
            if code is not None:
                log.error("worker (pid %d) exited with code %s; restarting in %.0f s (see %s)", self.proc.pid,
                          code, backoff, self.settings.root / "worker.log")
                if self._stop.wait(backoff):
                    break
                backoff = min(backoff * 2, MAX_BACKOFF_S)
                self.restarts += 1
                self._spawn()
                continue
            try:
                self._check_timeout()
            except Exception as e:  # never let the supervisor die: the server would stop processing
                log.error("timeout check failed: %s", e)
        self._kill(signal.SIGTERM, wait_s=10)

    # -- TASK_TIMEOUT ------------------------------------------------------------------------------------
    def _check_timeout(self) -> None:
        running = self.queue.running(worker_pid=self.proc.pid)
        if not running:
            return
        now, limit = time.time(), self.settings.task_timeout
        if now - min(t.started_at for t in running) <= limit:
            return
        log.error("run %s exceeded TASK_TIMEOUT (%g s): stopping the worker", running[0].run_id, limit)
        self._kill(signal.SIGKILL, wait_s=10)
        self.timeouts += 1
        self.settle_timed_out(running)
        self._spawn()

    def settle_timed_out(self, running) -> None:
        """After the worker was stopped: done if the store holds the video, else failed with the reason."""
        by_run: dict[str, dict] = {}
        for t in running:
            video = decode_payload(t.plan, self.store)
            if video is not None:
                try:
                    outcome = ("done", publish(video, t, self.settings), None)
                except PublishError as e:
                    outcome = ("failed", None, str(e), "PublishError")
            else:
                stage = stage_progress(t.plan, self.store)[0] if t.plan else "planning"
                outcome = ("failed", None, f"timed out: still running after TASK_TIMEOUT={self.settings.task_timeout:g}"
                                           f" s (stage {stage}); finished stages stay cached, so a resubmission "
                                           f"continues from there", "TimeoutError")
            by_run.setdefault(t.run_id, {})[t.id] = outcome
        for run_id, outcomes in by_run.items():
            self.queue.finish(run_id, outcomes, event="timeout")
