"""Run a Denoise spec on seq_p_size * cfg_p_size processes: torchrun, started from inside the Denoise task.

The task's process (a Luigi worker pinned to its GPUs with CUDA_VISIBLE_DEVICES) spawns
`torchrun --standalone --nproc_per_node=N -m pipeline.parallel.run_denoise` and waits; rank 0 writes the artifact
into the store, so the task's contract (and the Luigi side) is unchanged. `--standalone` gives every launch
its own free rendezvous port, so workers on one machine never collide. The child dies with the task
(PR_SET_PDEATHSIG), so a killed worker leaves no ranks holding GPUs.

Cost: each launch loads the expert again in every rank (from the page cache after the first time); that is
small next to a 40-step CFG video at 720p, the case model parallelism is for, but noticeable for a 4-step
distilled 480p one, where data parallelism (`wan-batch workers`) is the better use of the GPUs.
"""
from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import StageFailed
from ..plan import StageSpec
from ..store import ArtifactStore, atomic_write_text
from .layout import ParallelLayout
from .run_denoise import STEP_MARK

log = logging.getLogger(__name__)
PACKAGE_ROOT = Path(__file__).resolve().parents[2]


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the task's process dies (Linux prctl PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)
    except OSError:
        pass


def _free_gpu_models() -> None:
    """Evict this process's GPU-resident models (the text encoder, a VAE) so the ranks get the memory."""
    from ..runtime import MODELS

    with MODELS._lock:
        for key in [k for k in MODELS._models if str(k[2]).startswith("cuda")]:
            MODELS._drop(key, "to leave the GPUs to the parallel denoise ranks")


def torchrun_command(layout: ParallelLayout, spec_file: Path, store: ArtifactStore, run_id: str,
                     error_dir: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={layout.world}",
            "-m", "pipeline.parallel.run_denoise", "--spec", str(spec_file), "--store", str(store.root),
            "--run-id", run_id, "--error-dir", str(error_dir)]


def _failure(error_dir: Path, log_file: Path, rc: int) -> str:
    for path in sorted(error_dir.glob("error-*.json"), key=lambda p: int(p.stem.split("-")[1])):
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        return doc["error"] if doc.get("stage_failed") else f"rank {doc['rank']}: {doc['error']}"
    tail = log_file.read_text(encoding="utf-8", errors="replace")[-2000:] if log_file.is_file() else ""
    return f"torchrun exited with {rc} and no rank reported an error; its output ends with:\n{tail}"


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
    with tempfile.TemporaryDirectory(prefix="wan-batch-parallel-") as tmp:
        tmp_dir = Path(tmp)
        spec_file, log_file = tmp_dir / "spec.json", tmp_dir / "ranks.log"
        atomic_write_text(spec_file, spec.to_json())
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_ROOT), env.get("PYTHONPATH")]))
        cmd = torchrun_command(layout, spec_file, store, run_id, tmp_dir)
        log.info("%s %s: %s", spec.stage, spec.key[:12], " ".join(cmd))
        with open(log_file, "wb") as ranks_log:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=ranks_log, env=env, text=True,
                                    preexec_fn=_die_with_parent)
            try:
                for line in proc.stdout:
                    if line.startswith(STEP_MARK):
                        if on_step is not None:
                            on_step(int(line.split()[1]))
                    else:
                        log.debug("rank output: %s", line.rstrip())
                rc = proc.wait()
            except BaseException:
                proc.terminate()  # the task is being torn down: take the ranks with it
                proc.wait()
                raise
        if rc != 0:
            raise StageFailed(f"parallel denoise ({layout.as_dict()}) failed: {_failure(tmp_dir, log_file, rc)}")
    ok, reason = store.check(spec.ref)
    if not ok:
        raise StageFailed(f"parallel denoise ranks exited cleanly but the artifact is not usable: {reason}")
    return store.sidecar(spec.ref)
