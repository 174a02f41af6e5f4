"""Data parallelism: one Luigi worker process per GPU (or per GPU group), all against one luigid.

Each worker is the product's own command, `luigi --module pipeline RunManifest ... --workers 1`, pinned with
CUDA_VISIBLE_DEVICES, so tasks run in the worker process and its models stay resident; the central scheduler
hands each task to one worker, task priorities keep every worker stage-major, and the per-artifact flock in
the store keeps two processes from computing one artifact even across schedulers. Every stage task claims
`gpu_per_task` units of the Luigi resource `gpu` ([wan_batch] in tasks/stages.py); the scheduler started here
has `[resources] gpu = <GPUs of all workers>`, so the claims never hold a worker back. With a `parallel`
config (seq/CFG parallel Denoise, pipeline/parallel) a worker gets seq_p_size * cfg_p_size GPUs.
"""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

# Worker exit codes that mean "nothing wrong" (pipeline/luigi_setup.py): 10 already_running and 25 not_run are what
# Luigi reports for tasks (RunManifest, stages) that another worker ran. The batch outcome is results.parquet.
WORKER_OK = (0, 10, 25)


@dataclass
class Scheduler:
    host: str
    port: int
    process: subprocess.Popen | None = None  # set when we started it
    state_dir: Path | None = None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _accepts(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1.0):
        return True
    return False


@contextlib.contextmanager
def local_luigid(gpu_units: int, state_dir: str | os.PathLike | None = None, host: str = "127.0.0.1",
                 port: int | None = None, timeout_s: float = 120.0) -> Iterator[Scheduler]:
    """Start luigid on `host` (a free port unless given) with its state in `state_dir` (a temp folder unless
    given) and `[resources] gpu = gpu_units`; stop it on exit."""
    own_tmp = None
    if state_dir is None:
        own_tmp = tempfile.TemporaryDirectory(prefix="wan-batch-luigid-")
        state_dir = own_tmp.name
    state = Path(state_dir)
    state.mkdir(parents=True, exist_ok=True)
    port = port or free_port(host)
    cfg = state / "luigid.cfg"
    cfg.write_text(f"[scheduler]\nstate_path = {state / 'state.pickle'}\nrecord_task_history = false\n\n"
                   f"[resources]\ngpu = {gpu_units}\n", encoding="utf-8")
    env = {**os.environ, "LUIGI_CONFIG_PATH": str(cfg)}
    cmd = [sys.executable, "-c", "import sys, luigi.cmdline; luigi.cmdline.luigid(sys.argv[1:])",
           "--address", host, "--port", str(port), "--state-path", str(state / "state.pickle")]
    with open(state / "luigid.log", "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + timeout_s
        while not _accepts(host, port):
            if proc.poll() is not None:
                log = (state / "luigid.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"luigid exited with {proc.returncode} before listening on {host}:{port}:\n{log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"luigid did not listen on {host}:{port} within {timeout_s:.0f} s")
            time.sleep(0.2)
        yield Scheduler(host, port, proc, state)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if own_tmp is not None:
            own_tmp.cleanup()


def device_groups(gpus: list[str], per_worker: int) -> list[str]:
    """CUDA_VISIBLE_DEVICES of each worker: `per_worker` GPUs each, in order; 'cpu' entries are CPU workers
    (no GPU visible)."""
    if any(g == "cpu" for g in gpus):
        if not all(g == "cpu" for g in gpus):
            raise ValueError("--gpus: mix of 'cpu' and GPU ids; give only GPU ids or only 'cpu' entries")
        return [""] * len(gpus)
    for g in gpus:
        if not g.isdigit() and not g.startswith(("GPU-", "MIG-")):
            raise ValueError(f"--gpus: {g!r} is not a GPU index, UUID or 'cpu'")
    if len(set(gpus)) != len(gpus):
        raise ValueError(f"--gpus: a GPU is listed twice ({','.join(gpus)})")
    if len(gpus) % per_worker:
        raise ValueError(f"--gpus: {len(gpus)} GPUs do not split into workers of {per_worker} "
                         "(the config's parallel seq_p_size * cfg_p_size)")
    return [",".join(gpus[i:i + per_worker]) for i in range(0, len(gpus), per_worker)]


@dataclass
class WorkerRun:
    index: int
    devices: str
    log: Path
    process: subprocess.Popen
    returncode: int | None = None


@dataclass
class BatchSpec:
    manifest: str
    config: str = ""
    output_dir: str = "outputs"
    store: str = "wan-store"
    strict: bool = False
    run_id: str = ""
    module: str = "pipeline"  # the module Luigi imports for the tasks (benchmarks patch model loading in theirs)
    extra: list[str] = field(default_factory=list)


def worker_command(batch: BatchSpec, scheduler: Scheduler, gpu_per_task: int, slot: int = 0) -> list[str]:
    """The product's Luigi command for one worker. `slot` numbers the workers: a large batch is scheduled in
    waves (tasks/waves.py), and workers of distinct slots each declare the waves, so all of them share them."""
    cmd = [sys.executable, "-m", "luigi", "--module", batch.module, "RunManifest", "--manifest", batch.manifest,
           "--output-dir", batch.output_dir, "--store", batch.store, "--run-id", batch.run_id,
           "--scheduler-host", scheduler.host, "--scheduler-port", str(scheduler.port), "--workers", "1",
           "--worker-keep-alive", "--no-lock", "--wan-batch-gpu-per-task", str(gpu_per_task),
           "--slot", str(slot)]
    if batch.config:
        cmd += ["--config", batch.config]
    if batch.strict:
        cmd.append("--strict")
    return cmd + batch.extra


def start_workers(batch: BatchSpec, scheduler: Scheduler, groups: list[str], log_dir: Path,
                  gpu_per_task: int, cpu_threads: int | None = None) -> list[WorkerRun]:
    """Start one worker process per device group; each logs to log_dir/worker-<i>.log."""
    log_dir.mkdir(parents=True, exist_ok=True)
    runs = []
    for i, devices in enumerate(groups):
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": devices}
        if not devices and cpu_threads and "OMP_NUM_THREADS" not in os.environ:
            env["OMP_NUM_THREADS"] = str(cpu_threads)  # CPU workers share the cores instead of oversubscribing
        path = log_dir / f"worker-{i}.log"
        with open(path, "wb") as out:
            out.write(f"# worker {i} CUDA_VISIBLE_DEVICES={devices!r}\n".encode())
            out.flush()
            proc = subprocess.Popen(worker_command(batch, scheduler, gpu_per_task, slot=i), stdout=out,
                                    stderr=subprocess.STDOUT, env=env)
        runs.append(WorkerRun(i, devices, path, proc))
    return runs


def wait_workers(runs: list[WorkerRun]) -> list[WorkerRun]:
    try:
        for run in runs:
            run.returncode = run.process.wait()
    except BaseException:  # Ctrl-C: stop the workers we started, then re-raise
        for run in runs:
            if run.process.poll() is None:
                run.process.terminate()
        for run in runs:
            run.process.wait()
        raise
    return runs
