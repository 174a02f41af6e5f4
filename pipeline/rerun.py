"""Re-run one stage of one job: invalidate that artifact and everything downstream of it for this job (other
jobs' artifacts are left alone, even those that share an upstream artifact with it), then run the job again;
only the invalidated stages are computed, the rest comes from the store."""
from __future__ import annotations

from .errors import WanBatchError
from .plan import JobPlan
from .spec import StageSpec
from .store import ArtifactStore


def stage_spec(plan: JobPlan, stage: str) -> StageSpec:
    """The spec of one stage of a job, by its job-level name (stages.registry.job_stage_names)."""
    if plan.decode is None:
        raise WanBatchError(f"job {plan.job.job_id} cannot run: {plan.error}")
    stages = plan.stages()
    if stage not in stages:
        raise WanBatchError(f"job {plan.job.job_id} has no stage {stage!r} (its stages: {', '.join(stages)})")
    return stages[stage]


def downstream(plan: JobPlan, spec: StageSpec) -> list[StageSpec]:
    """`spec` and every stage of this job that depends on it, upstream first."""
    return [s for s in plan.decode.chain() if any(c.key == spec.key for c in s.chain())]


def invalidate(store: ArtifactStore, specs: list[StageSpec]) -> list[StageSpec]:
    """Remove the artifacts (under their locks, so a running writer finishes first); returns those removed."""
    removed = []
    for spec in specs:
        with store.lock(spec.ref):
            present = store.sidecar_path(spec.ref).exists() or store.payload_path(spec.ref).exists() \
                or store.failure_path(spec.ref).exists()
            store.invalidate(spec.ref)
        if present:
            removed.append(spec)
    return removed
