"""wan-batch bench-service: load-test a running service through LightX2V's task API, as the multi-device Wan
service's tests/benchmark.py does (`--quick`, `--concurrent --users N`, `--save results.json`).

Each simulated user submits a video task (POST /v1/tasks/video/), polls its status until it completes or fails,
then submits the next, until the requests are used up or the deadline passes; a sampler records the queue depth
(GET /v1/tasks/queue/status) meanwhile. Printed and saved: latency percentiles (submit to completed), success
rate, throughput and the queue depth over time. Bounded in requests, in time and per HTTP call, so it always
ends by itself.
"""
from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_PROMPT = "a red circle moving left on a blue background"


def register(sub) -> None:
    p = sub.add_parser("bench-service", help="load-test a running `wan-batch serve` (latency, success, throughput)")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the service's base URL")
    p.add_argument("--token", default=None, help="bearer token, when the service has one")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="one request (a smoke test)")
    mode.add_argument("--requests", type=int, default=3, help="requests in all (default 3, the seed's standard test)")
    p.add_argument("--concurrent", action="store_true", help="several users at once (with --users)")
    p.add_argument("--users", type=int, default=2, help="concurrent users with --concurrent (default 2)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--infer-steps", type=int, default=None, help="infer_steps per request (default: the server's)")
    p.add_argument("--deadline", type=float, default=600.0, help="seconds for the whole test (default 600)")
    p.add_argument("--poll", type=float, default=0.25, help="seconds between status polls")
    p.add_argument("--save", default=None, help="write the results as JSON here")
    p.set_defaults(func=main)


@dataclass
class Request:
    user: int
    task_id: str | None = None
    submitted: float = 0.0
    finished: float | None = None
    status: str = "not sent"
    error: str | None = None

    @property
    def latency(self) -> float | None:
        return None if self.finished is None else self.finished - self.submitted


@dataclass
class Report:
    url: str
    users: int
    requests: list[Request] = field(default_factory=list)
    queue: list[tuple[float, int]] = field(default_factory=list)  # (seconds since start, active tasks)
    wall_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        done = [r for r in self.requests if r.status == "completed"]
        lat = sorted(r.latency for r in done)
        return {"url": self.url, "users": self.users, "requests": len(self.requests), "completed": len(done),
                "failed": sum(r.status == "failed" for r in self.requests),
                "success_rate": len(done) / len(self.requests) if self.requests else 0.0,
                "latency_s": {"p50": percentile(lat, 50), "p90": percentile(lat, 90), "p99": percentile(lat, 99),
                              "min": lat[0] if lat else None, "max": lat[-1] if lat else None,
                              "mean": sum(lat) / len(lat) if lat else None},
                "throughput_per_min": 60.0 * len(done) / self.wall_s if self.wall_s else 0.0,
                "max_queue_depth": max((d for _, d in self.queue), default=0), "wall_s": round(self.wall_s, 3)}

    def to_json(self) -> str:
        return json.dumps({"summary": self.summary(), "requests": [asdict(r) for r in self.requests],
                           "queue_depth": self.queue}, indent=1)

    def table(self) -> str:
        s = self.summary()
        lat = s["latency_s"]

        def f(v):
            return "-" if v is None else f"{v:.2f}"

        lines = [f"service {s['url']}: {s['requests']} request(s), {s['users']} user(s), {s['wall_s']:.1f} s",
                 f"{'completed':<22}{s['completed']} ({100 * s['success_rate']:.0f}%)",
                 f"{'failed':<22}{s['failed']}",
                 f"{'latency p50/p90/p99':<22}{f(lat['p50'])} / {f(lat['p90'])} / {f(lat['p99'])} s",
                 f"{'latency min/mean/max':<22}{f(lat['min'])} / {f(lat['mean'])} / {f(lat['max'])} s",
                 f"{'throughput':<22}{s['throughput_per_min']:.2f} videos/min",
                 f"{'max queue depth':<22}{s['max_queue_depth']}"]
        if self.queue:
            step = max(1, len(self.queue) // 8)
            lines.append("queue depth over time: " + ", ".join(f"{t:.1f}s:{d}" for t, d in self.queue[::step]))
        for r in self.requests:
            if r.error:
                lines.append(f"  user {r.user} task {r.task_id or '-'}: {r.status}: {r.error}")
        return "\n".join(lines)


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of sorted values."""
    if not values:
        return None
    return values[min(len(values) - 1, max(0, math.ceil(q / 100 * len(values)) - 1))]


def run(url: str, requests: int, users: int, prompt: str = DEFAULT_PROMPT, token: str | None = None,
        infer_steps: int | None = None, deadline_s: float = 600.0, poll_s: float = 0.25) -> Report:
    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    report = Report(url=url, users=users)
    t0 = time.monotonic()
    end = t0 + deadline_s
    lock = threading.Lock()
    left = [requests]
    stop = threading.Event()

    def take() -> bool:
        with lock:
            if left[0] <= 0 or time.monotonic() >= end:
                return False
            left[0] -= 1
            return True

    def user(index: int) -> None:
        with httpx.Client(base_url=url, headers=headers, timeout=30.0) as client:
            while take():
                req = Request(user=index, submitted=time.monotonic())
                with lock:
                    report.requests.append(req)
                    seed = len(report.requests)
                body: dict[str, Any] = {"prompt": prompt, "seed": seed}
                if infer_steps:
                    body["infer_steps"] = infer_steps
                try:
                    r = client.post("/v1/tasks/video/", json=body)
                    if r.status_code != 200:
                        req.status, req.error = "failed", f"submit: HTTP {r.status_code}: {r.text[:200]}"
                        continue
                    req.task_id, req.status = r.json()["task_id"], "pending"
                    while time.monotonic() < end:
                        st = client.get(f"/v1/tasks/{req.task_id}/status").json()
                        req.status = st.get("status", "?")
                        if req.status in ("completed", "failed", "cancelled"):
                            req.finished = time.monotonic()
                            req.error = st.get("error") if req.status != "completed" else None
                            break
                        time.sleep(poll_s)
                    else:
                        req.status, req.error = "timeout", f"not finished within the {deadline_s:.0f} s deadline"
                except httpx.HTTPError as e:
                    req.status, req.error = "failed", f"{type(e).__name__}: {e}"

    def sampler() -> None:
        with httpx.Client(base_url=url, headers=headers, timeout=10.0) as client:
            while not stop.is_set() and time.monotonic() < end:
                try:
                    q = client.get("/v1/tasks/queue/status").json()
                    report.queue.append((round(time.monotonic() - t0, 3), int(q.get("active_count", 0))))
                except (httpx.HTTPError, ValueError):
                    pass
                stop.wait(max(poll_s, 0.5))

    threads = [threading.Thread(target=user, args=(i,), daemon=True) for i in range(users)]
    watcher = threading.Thread(target=sampler, daemon=True)
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, end - time.monotonic()) + 35)  # a user blocked in one HTTP call ends with its timeout
    stop.set()
    watcher.join(15)
    report.requests.sort(key=lambda r: r.submitted)
    for r in report.requests:
        r.submitted = round(r.submitted - t0, 3)
        r.finished = None if r.finished is None else round(r.finished - t0, 3)
    report.wall_s = time.monotonic() - t0
    return report


def main(args) -> int:
    requests = 1 if args.quick else args.requests
    users = args.users if args.concurrent else 1
    if requests < 1 or users < 1:
        print("error: --requests and --users must be at least 1")
        return 2
    report = run(args.url, requests, users, args.prompt, args.token, args.infer_steps, args.deadline, args.poll)
    print(report.table())
    if args.save:
        from ..store import atomic_write_text

        atomic_write_text(Path(args.save), report.to_json())
        print(f"saved: {args.save}")
    return 0 if report.requests and all(r.status == "completed" for r in report.requests) else 1
