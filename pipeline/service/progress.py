"""A job's stage and progress, read from the artifact store.

When the worker plans a drain it stores each task's stage artifacts (pipeline.plan.JobPlan.stages(): stage
name -> artifact stage, cache key, extension). An artifact counts as done when its sidecar exists (the
sidecar is written last), so progress is the share of the job's artifacts present and the stage is the first
missing one in pipeline order. A job whose prompt was already encoded starts with the text stages done.
"""
from __future__ import annotations

from pathlib import Path

from ..plan import JobPlan
from ..stages.registry import job_stage_names
from ..store import ArtifactRef, ArtifactStore

STAGE_ORDER = job_stage_names()


def plan_refs(plan: JobPlan) -> dict[str, list[str]]:
    return {name: [spec.ref.stage, spec.ref.key, spec.ref.ext] for name, spec in plan.stages().items()}


def ref(entry: list[str]) -> ArtifactRef:
    return ArtifactRef(entry[0], entry[1], entry[2])


def _order(name: str) -> int:
    return STAGE_ORDER.index(name) if name in STAGE_ORDER else len(STAGE_ORDER)


def stage_progress(refs: dict[str, list[str]], store: ArtifactStore) -> tuple[str | None, float, list[str]]:
    """(first missing stage or None, share of artifacts present, names of the stages present)."""
    names = sorted(refs, key=_order)
    done = [n for n in names if store.sidecar_path(ref(refs[n])).is_file()]
    current = next((n for n in names if n not in done), None)
    return current, (len(done) / len(names) if names else 0.0), done


def decode_payload(refs: dict[str, list[str]] | None, store: ArtifactStore) -> Path | None:
    """The finished MP4 in the store for this plan, if it is there and verified."""
    if not refs or "decode" not in refs:
        return None
    r = ref(refs["decode"])
    return store.payload_path(r) if store.is_complete(r) else None
