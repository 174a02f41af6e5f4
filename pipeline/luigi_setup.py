"""Luigi settings the product relies on, applied at import unless the user configured them."""
from __future__ import annotations

import sys
import time

import luigi.configuration
import luigi.interface
import luigi.scheduler

# Exit codes of `luigi --module pipeline RunManifest ...` (Luigi's own defaults are 0 for failures).
RETCODES = {
    "unhandled_exception": 40,
    "scheduling_error": 35,
    "task_failed": 30,
    "not_run": 25,
    "missing_data": 20,
    "already_running": 10,
}
_SCHEDULER_OPTIONS = ("default_scheduler_host", "default-scheduler-host", "scheduler_host",
                      "default_scheduler_url", "default-scheduler-url", "local_scheduler", "local-scheduler")


# `luigi ... --scheduler-host H` on the command line must reach luigid: Luigi would let our config default
# (local_scheduler=true) win over it, so a scheduler named on the command line also keeps the default off.
_SCHEDULER_FLAGS = ("--scheduler-host", "--scheduler-port", "--scheduler-url", "--local-scheduler",
                    "--core-scheduler-host", "--core-scheduler-port", "--core-scheduler-url")


def _scheduler_on_command_line(argv: list[str]) -> bool:
    return any(arg.split("=", 1)[0] in _SCHEDULER_FLAGS for arg in argv)


def _has(cfg, section: str, option: str) -> bool:
    try:
        return cfg.has_option(section, option)
    except Exception:
        return False


def _set(cfg, section: str, option: str, value: str) -> None:
    if hasattr(cfg, "has_section") and not cfg.has_section(section):
        cfg.add_section(section)
    cfg.set(section, option, value)


PRUNE_INTERVAL_S = 60.0  # as often as luigid prunes its own state


class LocalScheduler(luigi.scheduler.Scheduler):
    """Luigi's local scheduler, with two costs that grew with the tasks a run holds taken out of get_work:
    - its task graph is pruned at most once a minute (as luigid does) instead of on every get_work: a prune
      walks every task the run has seen, done ones included (issue 21);
    - the worker's pending-task counts (count_pending: a walk over every pending task and its upstream) are
      made only when get_work hands out no task. The worker reads them only then (to decide whether to wait
      for more work, and for its summary); with a task it only logs the number at debug level, which here is
      the plain count of its pending tasks."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "prune_on_get_work": False})
        self._pruned_at = time.monotonic()
        self._in_get_work = self._counted = False

    def get_work(self, host=None, assistant=False, current_tasks=None, worker=None, **kwargs):
        if time.monotonic() - self._pruned_at >= PRUNE_INTERVAL_S:
            self._pruned_at = time.monotonic()
            self.prune()
        self._in_get_work, self._counted = True, False
        try:
            reply = super().get_work(host=host, assistant=assistant, current_tasks=current_tasks, worker=worker,
                                     **kwargs)
        finally:
            self._in_get_work = False
        if self._counted and reply.get("task_id") is None and "batch_id" not in reply:
            reply.update(self.count_pending(worker))  # nothing changed state since: the counts Luigi would give
        return reply

    def count_pending(self, worker):
        if not self._in_get_work:
            return super().count_pending(worker)
        self._counted = True
        state = self._state.get_worker(worker)
        pending = sum(1 for _ in state.get_tasks(self._state, luigi.scheduler.PENDING))
        return {"n_pending_tasks": pending, "n_unique_pending": 0, "n_pending_last_scheduled": 0,
                "worker_state": state.state, "running_tasks": []}


def _create_local_scheduler(self) -> LocalScheduler:
    return LocalScheduler(record_task_history=False)


def configure_luigi() -> None:
    # `luigi.build(..., local_scheduler=True)` and `luigi --local-scheduler` both make theirs here
    luigi.interface._WorkerSchedulerFactory.create_local_scheduler = _create_local_scheduler
    cfg = luigi.configuration.get_config()
    configured = any(_has(cfg, "core", opt) for opt in _SCHEDULER_OPTIONS)
    if not configured and not _scheduler_on_command_line(sys.argv[1:]):
        _set(cfg, "core", "local_scheduler", "true")  # no luigid needed; a configured host still wins
    for name, code in RETCODES.items():
        if not _has(cfg, "retcode", name):
            _set(cfg, "retcode", name, str(code))
    # An idle worker asks for work again within 0.2 s. Luigi's default (1 s plus up to 5 s of jitter) leaves a
    # GPU idle between tasks while the other workers on the same luigid take them.
    if not (_has(cfg, "worker", "wait_interval") or _has(cfg, "core", "worker-wait-interval")):
        _set(cfg, "worker", "wait_interval", "0.2")
    if not _has(cfg, "worker", "wait_jitter"):
        _set(cfg, "worker", "wait_jitter", "0")
    # A stage task heals its own upstream: an artifact damaged or removed after its task completed is
    # recomputed by the task that needs it, in the same run (tasks/stages.py). Luigi's pre-run check would
    # instead fail the consumer ("Unfulfilled dependency at run time") and, through it, the whole batch.
    if not _has(cfg, "worker", "check_unfulfilled_deps"):
        _set(cfg, "worker", "check_unfulfilled_deps", "false")
