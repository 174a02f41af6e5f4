"""Run Denoise specs on seq_p_size * cfg_p_size processes, started by torchrun from inside the Denoise task.

The first parallel Denoise task of a worker process starts a rank group,
`torchrun --standalone --nproc_per_node=N -m pipeline.parallel.run_denoise --serve DIR`, and later ones reuse
it: the task writes its spec to the FIFO DIR/commands and waits for rank 0 to report the artifact written, so
the task's contract (and the Luigi side) is unchanged while the ranks keep the expert resident across a
stage's tasks, as a one-GPU worker does. `--standalone` gives each group its own free rendezvous port, so
workers on one machine never collide. The group ends when this process closes the FIFO (at exit, or before
starting a group of another layout), when this process dies (the FIFO closes; torchrun also gets SIGTERM via
PR_SET_PDEATHSIG), or when a rank fails; a failed group is replaced by a fresh one at the next task.

Memory: every rank holds a whole expert (Ulysses splits activations, not weights), and rank 0 shares GPU 0
with this process, whose GPU models (text encoder, VAE) are evicted before each parallel task.
"""
from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import StageFailed
from ..spec import StageSpec
from ..store import ArtifactStore, atomic_write_text
from .layout import ParallelLayout
from .run_denoise import COMMANDS, DONE_MARK, STEP_MARK

log = logging.getLogger(__name__)
PACKAGE_ROOT = Path(__file__).resolve().parents[2]


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the task's process dies (Linux prctl PR_SET_PDEATHSIG)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)


def _free_gpu_models() -> None:
    """Evict this process's GPU-resident models (the text encoder, a VAE) so the ranks get the memory."""
    from ..runtime import MODELS

    MODELS.evict(lambda key: str(key[2]).startswith("cuda"), "to leave the GPUs to the parallel denoise ranks")


def _failure(error_dir: Path, log_file: Path, rc: int | None) -> str:
    for path in sorted(error_dir.glob("error-*.json"), key=lambda p: int(p.stem.split("-")[1])):
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        return doc["error"] if doc.get("stage_failed") else f"rank {doc['rank']}: {doc['error']}"
    tail = log_file.read_text(encoding="utf-8", errors="replace")[-2000:] if log_file.is_file() else ""
    return f"the rank group exited with {rc} and no rank reported an error; its output ends with:\n{tail}"


class RankGroupProcess:
    """A serving rank group (torchrun and its N ranks) and the FIFO that feeds it specs."""

    def __init__(self, layout: ParallelLayout, device_type: str):
        self.key = (layout, device_type)
        self.layout = layout
        self.folder = Path(tempfile.mkdtemp(prefix="wan-batch-ranks-"))
        os.mkfifo(self.folder / COMMANDS)
        # Opened read-write so this never blocks; not inherited (PEP 446), so the ranks see EOF when we close
        # it or die.
        self.fifo: int | None = os.open(self.folder / COMMANDS, os.O_RDWR)
        self.log_file = self.folder / "ranks.log"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_ROOT), env.get("PYTHONPATH")]))
        self.cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc_per_node={layout.world}", "-m", "pipeline.parallel.run_denoise",
                    "--serve", str(self.folder), "--layout", f"{layout.seq}x{layout.cfg}",
                    "--device-type", device_type]
        log.info("starting a rank group: %s", " ".join(self.cmd))
        with open(self.log_file, "wb") as ranks_log:
            self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=ranks_log, env=env, text=True,
                                         preexec_fn=_die_with_parent)
        self.tasks = 0

    def alive(self) -> bool:
        return self.proc.poll() is None

    def run(self, spec: StageSpec, store: ArtifactStore, run_id: str,
            on_step: Callable[[int], None] | None) -> None:
        """Have the ranks compute `spec`; returns when rank 0 reports it written, raises StageFailed if the
        group ends first."""
        self.tasks += 1
        task_id = self.tasks
        spec_file = self.folder / f"spec-{task_id}.json"
        atomic_write_text(spec_file, spec.to_json())
        cmd = {"id": task_id, "spec": str(spec_file), "store": str(store.root), "run_id": run_id}
        os.write(self.fifo, (json.dumps(cmd) + "\n").encode())
        try:
            for line in self.proc.stdout:
                if line.startswith(STEP_MARK):
                    if on_step is not None:
                        on_step(int(line.split()[1]))
                elif line.startswith(DONE_MARK) and int(line.split()[1]) == task_id:
                    spec_file.unlink(missing_ok=True)
                    return
                else:
                    log.debug("rank output: %s", line.rstrip())
        except BaseException:
            self.close(kill=True)  # the task is being torn down: take the ranks with it
            raise
        rc = self.proc.wait()
        message = _failure(self.folder, self.log_file, rc)
        self.close()
        raise StageFailed(f"parallel denoise ({self.layout.as_dict()}) failed: {message}")

    def close(self, kill: bool = False, timeout_s: float = 60.0) -> None:
        """End the group; safe to call again (a failed task closes it, the next task or exit finds it dead)."""
        if self.fifo is not None:  # once: a second os.close could hit an unrelated file that reused the number
            with contextlib.suppress(OSError):
                os.close(self.fifo)  # EOF for rank 0: the ranks leave their loop and exit
            self.fifo = None
        if kill and self.alive():
            self.proc.terminate()
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        with contextlib.suppress(Exception):
            self.proc.stdout.close()
        shutil.rmtree(self.folder, ignore_errors=True)


_GROUP: RankGroupProcess | None = None
_LOCK = threading.Lock()


def _group(layout: ParallelLayout, device_type: str) -> RankGroupProcess:
    global _GROUP
    if _GROUP is not None and (_GROUP.key != (layout, device_type) or not _GROUP.alive()):
        _GROUP.close()
        _GROUP = None
    if _GROUP is None:
        _GROUP = RankGroupProcess(layout, device_type)
    return _GROUP


@atexit.register
def close_groups() -> None:
    """End this process's rank group (the ranks free their GPUs)."""
    global _GROUP
    if _GROUP is not None:
        _GROUP.close()
        _GROUP = None


def run_denoise_parallel(spec: StageSpec, store: ArtifactStore, run_id: str,
                         on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    layout = ParallelLayout.from_runtime(spec.runtime)
    device = torch.device(spec.runtime["device"])
    if device.type == "cuda":
        visible = torch.cuda.device_count()
        if visible < layout.world:
            raise StageFailed(f"parallel {layout.as_dict()} needs {layout.world} GPUs, this worker sees {visible} "
                              f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')})")
        _free_gpu_models()
    with _LOCK:  # one task at a time per group; a group that failed is closed and replaced by _group
        _group(layout, device.type).run(spec, store, run_id, on_step)
    ok, reason = store.check(spec.ref)
    if not ok:
        raise StageFailed(f"the parallel denoise ranks reported success but the artifact is not usable: {reason}")
    return store.sidecar(spec.ref)
