"""GET /metrics: Prometheus text built at scrape time from the queue's tables (so the numbers survive a
restart and include what the worker process did): queue depth, tasks by state, per-stage seconds of every
artifact computed, cache hit ratio per stage, submission-to-done seconds, worker up/restarts/timeouts."""
from __future__ import annotations

import bisect
import time
from typing import Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


def histogram(values: Iterable[float]) -> tuple[list[tuple[str, int]], float]:
    """Cumulative bucket counts (Prometheus 'le' buckets, +Inf last) and the sum."""
    values = sorted(values)
    buckets = [(repr(float(b)), bisect.bisect_right(values, b)) for b in BUCKETS]
    return buckets + [("+Inf", len(values))], float(sum(values))


class ServiceCollector:
    def __init__(self, service):
        self.service = service

    def collect(self):
        q, s = self.service.queue, self.service.settings
        counts = q.counts()
        depth = GaugeMetricFamily("wan_batch_queue_depth", "Tasks waiting for the worker (state queued)")
        depth.add_metric([], counts["queued"])
        yield depth
        limit = GaugeMetricFamily("wan_batch_queue_limit", "MAX_CONCURRENT_TASKS: queued + running tasks accepted")
        limit.add_metric([], s.max_queue)
        yield limit
        tasks = GaugeMetricFamily("wan_batch_tasks", "Tasks by state", labels=["state"])
        for state, n in counts.items():
            tasks.add_metric([state], n)
        yield tasks

        seconds = HistogramMetricFamily("wan_batch_stage_seconds",
                                        "Wall time of each stage artifact the worker computed", labels=["stage"])
        for stage, values in sorted(q.stage_seconds().items()):
            buckets, total = histogram(values)
            seconds.add_metric([stage], buckets, total)
        yield seconds

        totals = q.stage_use_totals()
        uses = CounterMetricFamily("wan_batch_stage_uses", "Stage artifacts needed by tasks (one per task and stage)",
                                   labels=["stage"])
        made = CounterMetricFamily("wan_batch_stage_computed", "Stage artifacts computed (the rest came from the "
                                                               "store's cache)", labels=["stage"])
        ratio = GaugeMetricFamily("wan_batch_cache_hit_ratio", "Share of stage uses served from the artifact store "
                                                               "(stage=\"all\": every stage)", labels=["stage"])
        for stage, (u, k) in sorted(totals.items()):
            uses.add_metric([stage], u)
            made.add_metric([stage], k)
            if u:
                ratio.add_metric([stage], 1.0 - k / u)
        all_uses, all_made = sum(u for u, _ in totals.values()), sum(k for _, k in totals.values())
        if all_uses:
            ratio.add_metric(["all"], 1.0 - all_made / all_uses)
        yield uses
        yield made
        yield ratio

        done = HistogramMetricFamily("wan_batch_task_seconds", "Submission to done, per task")
        buckets, total = histogram(q.task_seconds())
        done.add_metric([], buckets, total)
        yield done

        sup = self.service.supervisor
        worker = q.fetch("worker") or {}
        up = GaugeMetricFamily("wan_batch_worker_up", "1 when the worker process is alive and its heartbeat fresh")
        up.add_metric([], 1.0 if self.service.worker_alive(worker) else 0.0)
        yield up
        restarts = CounterMetricFamily("wan_batch_worker_restarts", "Worker restarts after it exited unexpectedly")
        restarts.add_metric([], sup.restarts if sup else 0)
        yield restarts
        timeouts = CounterMetricFamily("wan_batch_worker_timeouts", "Worker stops because a run passed TASK_TIMEOUT")
        timeouts.add_metric([], sup.timeouts if sup else 0)
        yield timeouts
        loads = CounterMetricFamily("wan_batch_model_loads", "Model loads in the current worker process",
                                    labels=["model"])
        for name, n in sorted((worker.get("model_loads") or {}).items()):
            loads.add_metric([name], n)
        yield loads
        age = GaugeMetricFamily("wan_batch_worker_heartbeat_age_seconds", "Seconds since the worker's last heartbeat")
        if worker.get("heartbeat"):
            age.add_metric([], max(0.0, time.time() - worker["heartbeat"]))
        yield age


def render(service) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServiceCollector(service))
    return generate_latest(registry)
