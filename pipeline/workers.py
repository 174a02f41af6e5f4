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
import stat
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
    """luigid answers HTTP: its event loop runs, so its signal handlers are installed (it binds its port
    before it installs them; a SIGTERM in between would end it without saving its state)."""
    import http.client

    conn = http.client.HTTPConnection(host, port, timeout=2.0)
    try:
        conn.request("GET", "/api/task_list?data=%7B%7D")
        conn.getresponse().read()
        return True
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


class StateDirError(ValueError):
    """A luigid state folder we cannot use: one someone other than this user could write (luigid unpickles
    its state file, so whoever can write it runs code as this user), or one we cannot create."""


STATE_FILES = ("state.pickle", "luigid.cfg", "luigid.log")  # what luigid reads from the folder, or we write


def _unsafe(st: os.stat_result, what: str, kind: str, check) -> str | None:
    if not check(st.st_mode):
        return f"{what} is not a {kind}" + (" (a symbolic link)" if stat.S_ISLNK(st.st_mode) else "")
    if st.st_uid != os.geteuid():
        return f"{what} is owned by uid {st.st_uid}, not by this user (uid {os.geteuid()})"
    if st.st_mode & 0o022:
        return f"{what} is writable by its group or by others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def _refusal(problem: str) -> str:
    return (f"--luigid-state: {problem}; luigid loads its state with pickle, which runs code, so the folder "
            "and its files must be yours alone (chmod go-w, a real folder, or another folder)")


def open_state_dir(path: str | os.PathLike) -> int:
    """Open luigid's state folder (created 0700 when missing) and return a descriptor of it, after checking
    that the folder and the files luigid reads from it are this user's and writable by nobody else; raise
    StateDirError naming the file otherwise. luigid then reaches the folder through the descriptor
    (/proc/self/fd), so the folder checked is the folder used, even if its path is swapped afterwards."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise StateDirError(f"--luigid-state: cannot create {path}: {e.strerror}") from None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as e:
        st = os.lstat(path) if os.path.lexists(path) else None
        reason = _unsafe(st, str(path), "folder", stat.S_ISDIR) if st else None
        if reason:
            raise StateDirError(_refusal(reason)) from None
        raise StateDirError(f"--luigid-state: cannot open {path}: {e.strerror}") from None
    try:
        problem = _unsafe(os.fstat(fd), str(path), "folder", stat.S_ISDIR)
        for name in STATE_FILES:
            if problem:
                break
            with contextlib.suppress(FileNotFoundError):
                problem = _unsafe(os.stat(name, dir_fd=fd, follow_symlinks=False), str(path / name), "regular file",
                                  stat.S_ISREG)
        if problem:
            raise StateDirError(_refusal(problem))
    except BaseException:
        os.close(fd)
        raise
    return fd


_PROC_FD = os.path.isdir("/proc/self/fd")


def _in_dir(fd: int, state: Path, name: str) -> str:
    """A path to `name` in the folder open as `fd`, valid in a child process that inherits fd (Linux; elsewhere
    the folder's path, checked moments before)."""
    return f"/proc/self/fd/{fd}/{name}" if _PROC_FD else str(state / name)


def _open_in(fd: int, name: str, flags: int) -> int:
    return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=fd)


@contextlib.contextmanager
def local_luigid(gpu_units: int, state_dir: str | os.PathLike | None = None, host: str = "127.0.0.1",
                 port: int | None = None, timeout_s: float = 120.0) -> Iterator[Scheduler]:
    """Start luigid on `host` (a free port unless given) with its state in `state_dir` (a temp folder unless
    given; see open_state_dir for what a given one must be) and `[resources] gpu = gpu_units`; stop it on
    exit."""
    own_tmp = None
    if state_dir is None:
        own_tmp = tempfile.TemporaryDirectory(prefix="wan-batch-luigid-")  # mkdtemp: 0700, new
        state_dir = own_tmp.name
    state = Path(state_dir)
    try:
        dir_fd = open_state_dir(state)
    except BaseException:
        if own_tmp is not None:
            own_tmp.cleanup()
        raise
    try:
        with _started_luigid(gpu_units, state, dir_fd, host, port or free_port(host), timeout_s) as scheduler:
            yield scheduler
    finally:
        os.close(dir_fd)
        if own_tmp is not None:
            own_tmp.cleanup()


@contextlib.contextmanager
def _started_luigid(gpu_units: int, state: Path, dir_fd: int, host: str, port: int,
                    timeout_s: float) -> Iterator[Scheduler]:
    pickle_path = _in_dir(dir_fd, state, "state.pickle")
    cfg = _open_in(dir_fd, "luigid.cfg", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    with os.fdopen(cfg, "w", encoding="utf-8") as f:
        f.write(f"[scheduler]\nstate_path = {pickle_path}\nrecord_task_history = false\n\n"
                f"[resources]\ngpu = {gpu_units}\n")
    env = {**os.environ, "LUIGI_CONFIG_PATH": _in_dir(dir_fd, state, "luigid.cfg")}
    cmd = [sys.executable, "-c", "import sys, luigi.cmdline; luigi.cmdline.luigid(sys.argv[1:])",
           "--address", host, "--port", str(port), "--state-path", pickle_path]
    log_fd = _open_in(dir_fd, "luigid.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:  # umask 077: the state luigid saves stays this user's alone, so the next run accepts it
        proc = subprocess.Popen(cmd, stdout=log_fd, stderr=subprocess.STDOUT, env=env, pass_fds=(dir_fd,),
                                umask=0o077)
    finally:
        os.close(log_fd)
    try:
        deadline = time.monotonic() + timeout_s
        while not _accepts(host, port):
            if proc.poll() is not None:
                log = Path(_in_dir(dir_fd, state, "luigid.log")).read_text(errors="replace")[-2000:]
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
    model_path: str = ""  # --model-path (absolute), passed on to every worker's RunManifest
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
    if batch.model_path:
        cmd += ["--model-path", batch.model_path]
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
