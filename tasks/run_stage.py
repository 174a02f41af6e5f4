"""RunStage: run one stage of one job directly with Luigi (and whatever it needs upstream that is missing).

    luigi --module pipeline RunStage --manifest jobs.parquet --job-id cat-1 --stage denoise-low

It runs without a run id, so an error in the stage fails the task with its traceback and a non-zero exit,
instead of being recorded for results.parquet. An artifact that is already in the store is not recomputed:
`wan-batch rerun --no-run` removes it (and what depends on it, for that job) first.
"""
from __future__ import annotations

from functools import cached_property

import luigi

from pipeline.stages.registry import job_stage_names

from .stages import task_for


class RunStage(luigi.WrapperTask):
    manifest = luigi.Parameter(description="Parquet manifest the job is in")
    job_id = luigi.Parameter(description="job_id of the row")
    stage = luigi.Parameter(description=", ".join(job_stage_names()))
    config = luigi.Parameter(default="", description="config the batch runs with (default: the tiny model)")
    model_path = luigi.Parameter(default="", description="the model folder (LightX2V's --model_path)")
    store = luigi.Parameter(default="wan-store")

    @cached_property
    def spec(self):
        from pipeline.inspect import find_job
        from pipeline.rerun import stage_spec

        return stage_spec(find_job(self.manifest, self.config or None, self.job_id, self.model_path or None), self.stage)

    def requires(self):
        return task_for(self.spec, self.store)
