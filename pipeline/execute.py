"""Run one stage spec: the registry names the stage's run (load inputs, get the model, call the pure function,
check the output, write the artifact atomically). Luigi tasks call `run_spec`; so do the debugging commands.

A denoise spec whose config asks for sequence/CFG parallelism is handed to a rank group instead
(pipeline/parallel/launch.py), which runs the same stage run on every rank."""
from __future__ import annotations

from typing import Any, Callable

from . import faults
from .parallel.layout import ParallelLayout
from .spec import StageSpec
from .stages.registry import stage_of
from .store import ArtifactStore


def run_spec(spec: StageSpec, store: ArtifactStore, run_id: str = "",
             on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    faults.point(spec.stage, "start")
    on_step = faults.wrap_step(spec.stage, on_step)
    stage = stage_of(spec.stage)
    if stage.family == "denoise" and ParallelLayout.from_runtime(spec.runtime).enabled:
        from .parallel.launch import run_denoise_parallel  # config `parallel`: torchrun ranks compute it

        return run_denoise_parallel(spec, store, run_id, on_step)
    return stage.run(spec, store, run_id, on_step=on_step)
