"""What every stage's run shares: the output check and the sidecar's provenance fields."""
from __future__ import annotations

import os
import platform
import socket
from typing import Any

import torch

from ..version import __version__
from ..errors import StageFailed


def check_finite(name: str, tensor: torch.Tensor, spec) -> None:
    bad = (~torch.isfinite(tensor)).sum().item()
    if bad:
        raise StageFailed(f"{spec.stage} produced {bad} non-finite values in '{name}' "
                          f"(of {tensor.numel()}); the artifact was not written")


def sidecar(spec, version: int, run_id: str, seconds: float, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The sidecar fields a stage adds to the store's own (key, size, sha256, written_at)."""
    return {
        "stage_version": version, "params": spec.params,
        "upstream": {name: up.key for name, up in spec.upstream.items()},
        "model": spec.model, "wall_s": round(seconds, 4), "device": spec.runtime["device"], "run_id": run_id,
        "host": socket.gethostname(), "pid": os.getpid(),  # which worker computed it (multi-worker runs)
        "software": {"wan_batch": __version__, "torch": torch.__version__, "python": platform.python_version()},
        **(extra or {}),
    }
