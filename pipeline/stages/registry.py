"""The stage registry: one entry per stage, and every list of stages derives from it.

An entry says what the stage is (name, family, version), when it runs (priority: Luigi runs the highest
runnable first, so a worker finishes one stage while its model is resident before starting the next), what it
writes (ext), which model it needs (component, and the params entry holding that model's fingerprint), which
Luigi task class runs it, and its `run(spec, store, run_id, on_step=None)`: load inputs, get the model, call
the pure function, check the output, write the artifact. Each stage module defines its own entry next to its
pure function; this module only lists them, in pipeline order.

Adding a stage: a module pipeline/stages/<name>.py with the pure function, `run` and `STAGE`; its entry in
`STAGES` below; and the step of `plan.Planner._plan` that builds its spec (docs/architecture.md walks
through one).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import WanBatchError


@dataclass(frozen=True, eq=False)
class Stage:
    name: str  # the artifact folder in the store and the stage's name everywhere (CLI, results, inspect)
    family: str  # stages that share a run function and version (denoise-high/low/single)
    version: int  # part of every cache key: bump it when the stage's output changes for the same inputs
    priority: int  # Luigi priority: stage-major order
    component: str | None  # the model component it loads (models.loader.COMPONENTS); None: no model
    fingerprint_param: str | None  # the params entry holding that model's fingerprint
    task: str  # the Luigi task class that runs it (tasks/stages.py)
    run: Callable[..., dict[str, Any]]
    ext: str = "safetensors"  # payload file type
    # display names of this stage's artifact in a job, by the upstream name its consumer gives it
    # (the negative prompt's text artifact is 'text-negative')
    roles: dict[str, str] = field(default_factory=dict)
    steps: Callable[[dict[str, Any]], int] | None = None  # solver steps of a spec's params (progress bars)


def _entries() -> list[Stage]:
    from . import decode, denoise, image, text

    return [text.STAGE, image.STAGE, *denoise.STAGES, decode.STAGE]


STAGES: dict[str, Stage] = {s.name: s for s in _entries()}  # in pipeline order


def stage_of(name: str) -> Stage:
    try:
        return STAGES[name]
    except KeyError:
        raise WanBatchError(f"unknown stage {name!r} (stages: {', '.join(STAGES)})") from None


def job_stage_names() -> tuple[str, ...]:
    """The names a job's artifacts go by, in pipeline order (results columns, inspect, progress):
    each stage's name, or the display names of its roles."""
    names: list[str] = []
    for s in STAGES.values():
        for name in dict.fromkeys([s.name, *s.roles.values()]):
            names.append(name)
    return tuple(names)


def role_name(role: str, stage: str) -> str:
    """Display name of an upstream artifact of `stage` referenced as `role` by its consumer."""
    return stage_of(stage).roles.get(role, stage) if stage in STAGES else stage


def stage_of_name(name: str) -> Stage:
    """The stage behind a job-level display name ('text-negative' -> text)."""
    for s in STAGES.values():
        if name == s.name or name in s.roles.values():
            return s
    raise WanBatchError(f"unknown stage {name!r} (stages: {', '.join(job_stage_names())})")
