"""How many CPU threads torch uses, and OpenMP that sleeps instead of spinning.

torch's default is one intra-op thread per core the machine has, each spinning while it waits for the next
parallel region. On a shared or quota-limited machine that oversubscribes: a parallel region waits for its
slowest thread, and a thread whose core another process holds is the slowest by a whole scheduler slice
(measured on 2 cores with one taken: the demo 2.5x slower than idle). So:

- threads = the cores this process may run on (its CPU affinity, capped by a cgroup v2 `cpu.max` or v1 CFS
  quota), and one thread while every model loaded in the process is small (the tiny model's ops are too
  small to gain from a second thread, and lose a lot when it waits for a busy core);
- OMP_WAIT_POLICY=PASSIVE: idle OpenMP threads sleep. libgomp reads it once, when torch loads it, so
  `configure_environment()` runs before `import torch` (pipeline/__init__.py) and the environment carries
  it to every subprocess;
- the user decides when they said so: WAN_BATCH_THREADS=N fixes the count; OMP_NUM_THREADS or
  MKL_NUM_THREADS set by the user leave torch's count as they chose it; OMP_WAIT_POLICY set by the user wins.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path

log = logging.getLogger(__name__)

ENV = "WAN_BATCH_THREADS"
USER_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
# Below this many bytes of weights a model's matmuls and convolutions are too small to split across cores
# with profit (the tiny model is ~7 MB a component; the smallest real Wan component, the VAE, is ~250 MB).
SMALL_MODEL_BYTES = 64 * 2**20

_largest_model = 0


def configure_environment(environ=os.environ) -> None:
    """Before torch loads OpenMP: idle threads sleep (the user's own OMP_WAIT_POLICY wins)."""
    environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _cgroup_v2_limit(cgroup_root: Path, rel: str) -> float | None:
    """The tightest `cpu.max` from this process's cgroup up to the root, in cores."""
    limit = None
    folder = (cgroup_root / rel.lstrip("/")).resolve()
    root = cgroup_root.resolve()
    while True:
        try:
            quota, period = (folder / "cpu.max").read_text().split()[:2]
            if quota != "max" and int(period) > 0:
                cores = int(quota) / int(period)
                limit = cores if limit is None else min(limit, cores)
        except (OSError, ValueError):
            pass
        if folder == root or root not in folder.parents:
            return limit
        folder = folder.parent


def _cgroup_v1_limit(cgroup_root: Path, rel: str) -> float | None:
    """The CFS quota of this process's cpu cgroup, in cores (the mount's own files when the container sees
    its cgroup as the root of the mount)."""
    for mount in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        base = cgroup_root / mount
        for folder in (base / rel.lstrip("/"), base):
            try:
                quota = int((folder / "cpu.cfs_quota_us").read_text())
                period = int((folder / "cpu.cfs_period_us").read_text())
            except (OSError, ValueError):
                continue
            return quota / period if quota > 0 and period > 0 else None
    return None


def cgroup_cpu_limit(proc_cgroup: Path = Path("/proc/self/cgroup"),
                     cgroup_root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """Cores this process's cgroup may use (quota / period), or None when unlimited or unknown."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        if controllers == "":  # cgroup v2's unified hierarchy
            limits.append(_cgroup_v2_limit(cgroup_root, rel))
        elif "cpu" in controllers.split(","):
            limits.append(_cgroup_v1_limit(cgroup_root, rel))
    limits = [x for x in limits if x is not None]
    return min(limits) if limits else None


def usable_cores() -> int:
    """The cores this process may run on: its affinity mask, capped by its cgroup's CPU quota (a quota of
    1.5 cores gives 1 thread: a second one would be throttled half the time)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_limit()
    if quota is not None:
        cores = min(cores, max(1, math.floor(quota)))
    return max(1, cores)


def user_threads(environ=os.environ) -> int | None:
    """WAN_BATCH_THREADS as a positive int, None when unset; a bad value is refused with its name."""
    raw = environ.get(ENV, "").strip()
    if not raw:
        return None
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"{ENV}={raw!r}: expected a positive whole number of threads")
    return n


def user_chose(environ=os.environ) -> bool:
    """True when the thread count is the user's: WAN_BATCH_THREADS, or OpenMP/MKL's own variables."""
    return bool(environ.get(ENV, "").strip()) or any(environ.get(v, "").strip() for v in USER_THREAD_VARS)


def choose_threads(cores: int, largest_model_bytes: int | None) -> int:
    """The policy: one thread while every model loaded is small, else every usable core. Before any model
    is loaded (None), every usable core."""
    if largest_model_bytes is not None and largest_model_bytes < SMALL_MODEL_BYTES:
        return 1
    return cores


def _set(n: int) -> None:
    import torch

    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
        log.info("torch uses %d CPU thread%s", n, "" if n == 1 else "s")


def configure_threads(environ=os.environ) -> None:
    """Apply the policy when the pipeline is imported (torch is loaded by then)."""
    fixed = user_threads(environ)
    if fixed is not None:
        _set(fixed)
    elif not user_chose(environ):
        _set(choose_threads(usable_cores(), None))


def fit_to_model(nbytes: int, environ=os.environ) -> None:
    """A model of `nbytes` was loaded: the thread count follows the largest one so far (a count the user
    chose stays)."""
    global _largest_model
    _largest_model = max(_largest_model, int(nbytes))
    if not user_chose(environ):
        _set(choose_threads(usable_cores(), _largest_model))
