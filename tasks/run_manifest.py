"""RunManifest: validate the manifest, require one DecodeVideo per row (a batch of more than `wave_tasks`
artifacts: its Waves, which declare the stage tasks a wave at a time, tasks/waves.py), then publish the videos
and results.parquet. Rows that failed (at validation or in any stage) are reported with their error; the
others finish; the task then fails so the process exits non-zero (see pipeline's Luigi retcodes).

Videos still being encoded by this process's background writer (pipeline/writer.py) are waited for before
anything is published: a row is reported only once its video is complete in the store, or its write failed."""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import uuid
from functools import cached_property
from pathlib import Path

import luigi
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import faults
from pipeline.errors import RowsFailed, WanBatchError
from pipeline.plan import JobPlan
from pipeline.stages.registry import job_stage_names
from pipeline.store import atomic_path, file_lock, sha256_file, stale_temps

from .stages import open_store, task_for
from .waves import DEFAULT_WAVE_TASKS, Waves, batch_plans, count_artifacts

log = logging.getLogger("wan_batch.tasks")

STAGE_COLUMNS = job_stage_names()  # seconds_<stage> columns of results.parquet


class RunManifest(luigi.Task):
    manifest = luigi.Parameter(description="Parquet manifest, one row per video")
    config = luigi.Parameter(default="", description="LightX2V-style JSON config (default: embedded tiny model)")
    model_path = luigi.Parameter(default="", description="model folder (LightX2V's --model_path); wins over the "
                                                         "config's model_path")
    output_dir = luigi.Parameter(default="outputs")
    store = luigi.Parameter(default="wan-store", description="artifact store, shared across batches")
    strict = luigi.BoolParameter(default=False, description="refuse the manifest on any row-level problem")
    run_id = luigi.Parameter(default="", significant=False)
    wave_tasks = luigi.IntParameter(default=DEFAULT_WAVE_TASKS, significant=False,
                                    description="a batch of more artifacts than this is scheduled in waves of "
                                                "this many stage tasks (0: always all at once)")
    slot = luigi.IntParameter(default=0, significant=False,
                              description="this worker's number among workers sharing the batch on one luigid")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.run_id = self.run_id or uuid.uuid4().hex[:12]
        self._finished = False

    @cached_property
    def plans(self) -> list[JobPlan]:
        return list(batch_plans(self.manifest, self.config, self.strict, self.run_id, self.model_path))

    @cached_property
    def in_waves(self) -> bool:
        return self.wave_tasks > 0 and count_artifacts(self.plans) > self.wave_tasks

    def requires(self):
        if self.in_waves:
            return Waves(manifest=self.manifest, config=self.config, model_path=self.model_path, store=self.store,
                         strict=self.strict, slot=self.slot, run_id=self.run_id, wave_tasks=self.wave_tasks)
        return [task_for(p.decode, self.store, self.run_id) for p in self.plans if p.decode is not None]

    def complete(self) -> bool:
        return self._finished  # re-checked on every invocation: cheap when all stages are cached

    def run(self) -> None:
        out = Path(self.output_dir)
        store = open_store(self.store)
        for plan in self.plans:  # the encodes still running here (the store's reads would wait for each too)
            if plan.decode is not None:
                store.settle(plan.decode.ref)
        try:
            out.mkdir(parents=True, exist_ok=True)
            with file_lock(out / ".wan-batch.lock"):  # one batch publishes into a folder at a time
                for name in ["results.parquet", *(f"{p.job.job_id}.mp4" for p in self.plans)]:
                    for tmp in stale_temps(out / name):  # left by a run killed while publishing
                        tmp.unlink(missing_ok=True)
                rows = [self._result(p, out) for p in self.plans]
                table = pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)
                with atomic_path(out / "results.parquet") as tmp:
                    pq.write_table(table, tmp)
                    faults.point("results", "payload-partial", tmp)
        except OSError as e:  # read-only, full or missing output folder: say where, not a traceback
            raise OutputFolderError(
                f"could not write into the output folder {out.resolve()}: {e.strerror or e} ({e.filename or out}); "
                f"results.parquet was not written. Finished videos stay in the store {self.store}: a run with "
                "a writable --output-dir publishes them without recomputing") from e
        self._finished = True
        failed = [r for r in rows if r["status"] != "ok"]
        for r in failed:
            log.error("job %s failed: %s", r["job_id"], r["error"])
        log.info("batch done: %d ok, %d failed; results in %s", len(rows) - len(failed), len(failed),
                 out / "results.parquet")
        if failed:
            raise RowsFailed(f"{len(failed)} of {len(rows)} rows failed, e.g. {failed[0]['job_id']}: "
                             f"{failed[0]['error']}")

    def _result(self, plan: JobPlan, out: Path) -> dict:
        job = plan.job
        row = {"job_id": job.job_id, "row": job.row, "task": job.task, "prompt": job.prompt, "seed": job.seed,
               "status": "failed", "video": None, "error": plan.error, "cached_stages": [],
               **{f"seconds_{s}": None for s in STAGE_COLUMNS}}
        if plan.decode is None:
            return row
        store = open_store(self.store)
        for name, spec in plan.stages().items():
            if name not in STAGE_COLUMNS:
                continue
            failure = store.failure(spec.ref)
            if failure and failure.get("run_id") == self.run_id:
                row["error"] = row["error"] or f"stage {spec.stage}: {failure['error']}"
                continue
            side = store.sidecar(spec.ref)
            if side:
                row[f"seconds_{name}"] = side.get("wall_s")
                if side.get("run_id") != self.run_id:
                    row["cached_stages"].append(name)
        if row["error"] is None and not store.is_complete(plan.decode.ref):
            self._heal(plan)  # the video was damaged or removed after its task completed: made again here
            failure = store.failure(plan.decode.ref)
            if failure and failure.get("run_id") == self.run_id:
                row["error"] = f"stage decode: {failure['error']}"
        if row["error"] is None and store.is_complete(plan.decode.ref):
            video = out.absolute() / f"{job.job_id}.mp4"  # usable from any folder, not only the run's
            try:
                publish(store.payload_path(plan.decode.ref), video)
                row.update(status="ok", video=str(video))
            except OSError as e:  # e.g. the output disk is full: this row fails, the batch reports it
                row["error"] = f"could not write {video}: {e.strerror or e}"
        elif row["error"] is None:
            row["error"] = "the video was not produced (the run was interrupted?)"
        return row


    def _heal(self, plan: JobPlan) -> None:
        task = task_for(plan.decode, self.store, self.run_id)
        log.warning("%s: its video %s is gone or damaged since it was made: making it again", plan.job.job_id,
                    plan.decode.key[:12])
        try:
            task.run()
        except Exception as e:  # noqa: BLE001 - the row reports it; the batch still publishes the others
            log.error("%s: could not make its video again: %s", plan.job.job_id, e)


class OutputFolderError(WanBatchError):
    """The output folder could not be written: results.parquet is not there (the run fails, exit non-zero)."""


def report_state(path: Path) -> tuple[int, int, int] | None:
    """(inode, mtime_ns, size) of a results.parquet, None if absent. Each write renames a new file into place,
    so a report this run wrote has a state other than the one taken before it started."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def output_folder_problem(out: Path) -> str | None:
    """Why a file cannot be created in `out` (the reason a report was not written), or None if it can."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".wan-batch-probe.", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return f"cannot write into {out}: {e.strerror or e}"
    return None


def publish(src: Path, dest: Path) -> None:
    """Copy a finished video into the output folder atomically (skipped when it is already identical). The
    folder's fsync that makes the rename durable is results.parquet's, written into it next."""
    if dest.is_file() and dest.stat().st_size == src.stat().st_size and sha256_file(dest) == sha256_file(src):
        return
    with atomic_path(dest, sync_dir=False) as tmp:
        shutil.copyfile(src, tmp)
        faults.point("publish", "payload-partial", tmp)


RESULT_SCHEMA = pa.schema([
    ("job_id", pa.string()), ("row", pa.int64()), ("task", pa.string()), ("prompt", pa.string()),
    ("seed", pa.int64()), ("status", pa.string()), ("video", pa.string()), ("error", pa.string()),
    ("cached_stages", pa.list_(pa.string())),
    *[(f"seconds_{s}", pa.float64()) for s in STAGE_COLUMNS],
])
