"""A batch: config -> validated manifest -> plans, the one sequence every entry point uses (`wan-batch run`,
`validate`, `workers`, `inspect`, `diagnose`, the service and Luigi's RunManifest), so they agree on what is
valid and on every cache key."""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from .config import GenerationConfig, load_config
from .errors import WanBatchError
from .manifest import Job, read_manifest
from .plan import JobPlan, Planner
from .stages.image import check_image


@dataclass
class Batch:
    manifest: str
    config: GenerationConfig
    jobs: list[Job]

    @cached_property
    def planner(self) -> Planner:
        return Planner(self.config)

    @cached_property
    def plans(self) -> list[JobPlan]:
        """One plan per row (rows with problems carry their error and no specs)."""
        return [self.planner.plan(job) for job in self.jobs]

    @property
    def problems(self) -> list[str]:
        return [j.error for j in self.jobs if j.error]

    def job(self, job_id: str) -> Job:
        for job in self.jobs:
            if job.job_id == job_id:
                return job
        some = ", ".join(j.job_id for j in self.jobs[:8]) + (", ..." if len(self.jobs) > 8 else "")
        raise WanBatchError(f"manifest {self.manifest} has no job_id {job_id!r} (its jobs: {some})")

    def plan_of(self, job_id: str) -> JobPlan:
        """The plan of one job (by job_id), without planning the others."""
        return self.planner.plan(self.job(job_id))


def load_batch(manifest: str | os.PathLike, config: str | os.PathLike | GenerationConfig | None = None,
               strict: bool = False, model_path: str | None = None) -> Batch:
    """Read the config (a path, '' / None for the embedded tiny model, or a GenerationConfig already read) and
    the manifest, validated against it with every image opened. Raises WanBatchError (ConfigError,
    ManifestError) for a problem that stops the whole batch; row problems stay on their jobs (all of them,
    with `strict`, raise). `model_path` is the --model-path option (LightX2V's --model_path)."""
    if not isinstance(config, GenerationConfig):
        config = load_config(config or None, model_path or None)
    jobs = read_manifest(manifest, config, strict=strict, check_image=check_image)
    return Batch(manifest=str(Path(manifest)), config=config, jobs=jobs)
