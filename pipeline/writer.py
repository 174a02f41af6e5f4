"""The background writer: an artifact's write (decode's H.264 encode, its sha256 and fsyncs) runs on a thread
of its own after the task that produced the frames returned, so the GPU goes on with the next task meanwhile.

Only a thread inside `WRITER.accepting(on_error)` has its writes deferred (a Luigi stage task with a run id:
tasks/stages.py); every other caller (diagnose, RunStage, a test) writes synchronously, as before. The store
decides what may be deferred (ArtifactStore.write_file(background=True)): it hands the artifact's lock to the
job, so the artifact stays locked from the start of its computation until it is complete or has failed, and
every reader of the store (check, sidecar, failure: Luigi's complete(), RunManifest, a consumer stage) first
waits for a pending write of the artifact it reads. A write that fails calls the `on_error` of the task that
queued it (which records the row's failure), never silently.

Memory stays bounded: at most `max_pending` writes are queued or running (the frames of a 480p 81-frame video
are ~100 MB); a task that queues one more waits for the oldest to finish. The threads are not daemons: a
process that ends (`luigi --module pipeline ...`) finishes its queued writes first. A process killed with
writes pending leaves what the store's atomic writes leave: temp files and no sidecar, so those artifacts
are incomplete and the next run recomputes them (and only them).

WAN_BATCH_BACKGROUND_WRITES=0 writes synchronously everywhere (the benchmark's comparison, tests).
"""
from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ENV = "WAN_BATCH_BACKGROUND_WRITES"


def enabled(environ=os.environ) -> bool:
    # A task run by a multi-process Luigi worker (`--workers N`) runs in a child that exits when its task
    # returns: nobody there would wait for a deferred write, so those write synchronously.
    return environ.get(ENV, "1") != "0" and multiprocessing.parent_process() is None


class _Job:
    def __init__(self, key: Path, work: Callable[[], Any], release: Callable[[], None] | None,
                 on_error: Callable[[BaseException], None]):
        self.key, self.work, self.release, self.on_error = key, work, release, on_error
        self.thread: int | None = None

    def run(self) -> None:
        self.thread = threading.get_ident()
        try:
            self.work()
        except BaseException as e:  # noqa: BLE001 - reported through the task's handler, never lost
            try:
                self.on_error(e)
            except Exception:
                log.exception("recording the failure of the background write of %s failed", self.key)
        finally:
            self.work = None  # the frames it holds go now, not when the job object does
            if self.release is not None:
                self.release()


class BackgroundWriter:
    def __init__(self, threads: int = 1, max_pending: int = 2):
        self.threads, self.max_pending = max(1, threads), max(1, max_pending)
        self._local = threading.local()
        self._reset()
        os.register_at_fork(after_in_child=self._reset)  # a forked child owns none of its parent's writes

    def _reset(self) -> None:
        self._cond = threading.Condition()
        self._queue: deque[_Job] = deque()
        self._pending: dict[Path, _Job] = {}
        self._serving = 0
        self._local = threading.local()

    # -- who may defer ---------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def accepting(self, on_error: Callable[[BaseException], None]) -> Iterator[None]:
        """Within this block, writes this thread asks to defer are queued; a failed one calls on_error(exc)."""
        if not enabled():
            yield
            return
        previous = getattr(self._local, "on_error", None)
        self._local.on_error = on_error
        try:
            yield
        finally:
            self._local.on_error = previous

    def accepts(self) -> bool:
        return getattr(self._local, "on_error", None) is not None

    # -- queueing --------------------------------------------------------------------------------------------
    def submit(self, key: Path, work: Callable[[], Any], release: Callable[[], None] | None = None) -> None:
        """Queue `work()`, the write of the artifact whose payload is `key`; `release()` runs once it ended.
        Blocks while `max_pending` writes are queued or running. Call only where accepts() is true."""
        on_error = self._local.on_error
        with self._cond:
            while len(self._pending) >= self.max_pending or key in self._pending:
                self._cond.wait()
            job = _Job(key, work, release, on_error)
            self._pending[key] = job
            self._queue.append(job)
            if self._serving < self.threads:
                self._serving += 1
                threading.Thread(target=self._serve, name="wan-batch-writer", daemon=False).start()

    def _serve(self) -> None:
        while True:
            with self._cond:
                if not self._queue:
                    self._serving -= 1
                    return
                job = self._queue.popleft()
            try:
                job.run()
            finally:
                with self._cond:
                    del self._pending[job.key]
                    self._cond.notify_all()

    # -- waiting ---------------------------------------------------------------------------------------------
    def pending(self) -> int:
        return len(self._pending)

    def wait(self, key: Path) -> None:
        """Return once no write of `key` is queued or running in this process."""
        if key not in self._pending:  # the common case, without the lock
            return
        with self._cond:
            while (job := self._pending.get(key)) is not None and job.thread != threading.get_ident():
                self._cond.wait()

    def flush(self) -> None:
        """Return once every queued write of this process has ended (complete, or its failure recorded)."""
        with self._cond:
            while self._pending:
                self._cond.wait()


def _default_threads() -> int:
    from .threads import usable_cores

    # libx264 encodes on 4 threads of its own (decode.write_mp4): a second encode only where cores are spare
    return 2 if usable_cores() >= 8 else 1


_THREADS = _default_threads()
WRITER = BackgroundWriter(threads=_THREADS, max_pending=_THREADS + 1)  # one queued behind each running write
