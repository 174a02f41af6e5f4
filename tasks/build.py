"""Run a batch in this process: RunManifest through `luigi.build`, as `wan-batch run` and the service do."""
from __future__ import annotations

import uuid

import luigi

from pipeline.writer import WRITER

from .run_manifest import RunManifest


def run_batch(manifest: str, config: str = "", output_dir: str = "outputs", store: str = "wan-store",
              strict: bool = False, workers: int = 1, local_scheduler: bool | None = None,
              model_path: str = "", wave_tasks: int | None = None) -> bool:
    """Run RunManifest in this process; True when every row succeeded. `wave_tasks`: RunManifest's (a batch
    of more artifacts is scheduled in waves of that many tasks; None: its default or luigi.cfg's)."""
    waves = {} if wave_tasks is None else {"wave_tasks": wave_tasks}
    task = RunManifest(manifest=manifest, config=config, model_path=model_path or "", output_dir=output_dir,
                       store=store, strict=strict, run_id=uuid.uuid4().hex[:12], **waves)
    kwargs = {} if local_scheduler is None else {"local_scheduler": local_scheduler}
    result = luigi.build([task], workers=workers, detailed_summary=True, **kwargs)
    WRITER.flush()  # RunManifest waited for its videos; this covers a run that stopped before it
    return result.status.name in ("SUCCESS", "SUCCESS_WITH_RETRY")


def run_job(plan, store_root: str, run_id: str) -> bool:
    """Build one job's DecodeVideo (and whatever is missing upstream) with one worker, in this process; True
    when its video is in the store."""
    from pipeline.store import ArtifactStore

    from .stages import task_for

    luigi.build([task_for(plan.decode, store_root, run_id)], workers=1, detailed_summary=False)
    WRITER.flush()
    return ArtifactStore(store_root).is_complete(plan.decode.ref)
