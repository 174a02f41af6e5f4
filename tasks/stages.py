"""Thin Luigi tasks, one per (stage, cache key): EncodeText, EncodeImage, Denoise(expert), DecodeVideo.

A task knows its spec (what to compute, from what) and the store; the work is in pipeline.execute. A row-level
failure (bad values, non-finite output, a model that fails to load) is recorded next to the artifact for this
run, so the tasks downstream fail fast with the reason and RunManifest still writes results.parquet for the
batch; the run's exit code is then non-zero. Run directly (no run_id), a task raises instead.
"""
from __future__ import annotations

import logging
import traceback
from functools import cached_property

import luigi

from pipeline.errors import StageFailed
from pipeline.execute import run_spec
from pipeline.plan import StageSpec
from pipeline.progress import PROGRESS
from pipeline.store import ArtifactStore

log = logging.getLogger("wan_batch.tasks")

# Stage-major order: Luigi runs the highest-priority runnable task first, so a worker finishes one stage
# (while its model is resident) before it starts the next.
PRIORITY = {"text": 50, "image": 40, "denoise-high": 30, "denoise-single": 30, "denoise-low": 20, "decode": 10}
_STORES: dict[str, ArtifactStore] = {}


class wan_batch(luigi.Config):  # noqa: N801  (the class name is the section name: [wan_batch] in luigi.cfg)
    """Luigi resources claimed by every stage task. The scheduler runs a task only while its resources are
    free: with `[resources] gpu=N` in luigid's config (N = GPUs of all workers) at most N stage tasks run at
    once, one per GPU; an undefined resource counts as 1. gpu_per_task=0 claims nothing."""
    gpu_resource = luigi.Parameter(default="gpu", description="name of the Luigi resource a stage task claims")
    gpu_per_task = luigi.IntParameter(default=1, description="units of it per stage task (0: none)")


def open_store(root: str) -> ArtifactStore:
    """One ArtifactStore per root per process, so integrity checks are memoised across tasks."""
    if root not in _STORES:
        _STORES[root] = ArtifactStore(root)
    return _STORES[root]


class StageTask(luigi.Task):
    key = luigi.Parameter(description="cache key of the artifact this task produces")
    spec_json = luigi.Parameter(significant=False, description="the stage spec (JSON)")
    store = luigi.Parameter(significant=False, default="wan-store")
    run_id = luigi.Parameter(significant=False, default="")

    @cached_property
    def spec(self) -> StageSpec:
        spec = StageSpec.from_json(self.spec_json)
        if spec.key != self.key:
            raise ValueError(f"spec does not hash to key {self.key}")
        return spec

    @property
    def artifact_store(self) -> ArtifactStore:
        return open_store(self.store)

    @property
    def priority(self) -> int:
        # Within a stage, tasks of the same model run back to back (+1 for the T2V model): a batch mixing
        # T2V and I2V rows loads each 14B expert once instead of alternating between the two models.
        return PRIORITY[self.spec.stage] + (1 if self.spec.model.get("task") == "t2v" else 0)

    @property
    def resources(self) -> dict[str, int]:
        cfg = wan_batch()
        return {cfg.gpu_resource: cfg.gpu_per_task} if cfg.gpu_per_task > 0 else {}

    def requires(self):
        return [task_for(up, self.store, self.run_id) for up in self.spec.upstream.values()]

    def failure(self) -> dict | None:
        """The failure recorded for this artifact by this run, if any."""
        rec = self.artifact_store.failure(self.spec.ref)
        return rec if rec and self.run_id and rec.get("run_id") == self.run_id else None

    def complete(self) -> bool:
        done = self.artifact_store.is_complete(self.spec.ref) or self.failure() is not None
        if not done:
            PROGRESS.expect(self.spec.stage, self.key)  # sizes this stage's progress bar
        return done

    def run(self) -> None:
        try:
            self._run()
        except OSError as e:  # the store itself failed (full disk, read-only, unreadable): this row fails
            if not self.run_id:
                raise
            log.error("%s %s failed: the store could not be used: %s", self.spec.stage, self.key[:12], e)
            self._fail(f"the store could not be used: {e.strerror or e} ({e.filename or self.store})")

    def _run(self) -> None:
        store, ref = self.artifact_store, self.spec.ref
        with store.lock(ref):  # another process may be computing the same artifact
            if store.is_complete(ref):  # the winner of a race wrote it while we waited: reuse
                log.info("%s %s was computed by another run meanwhile: reused", ref.stage, ref.key)
                return
            store.remove_stale_temps(ref)  # left by a killed writer; we hold the lock, so none is live
            upstream_failures = [t.failure() for t in self.requires() if t.failure()]
            if upstream_failures:
                self._fail(f"upstream {upstream_failures[0]['stage']} failed: {upstream_failures[0]['error']}")
                return
            steps = len(range(*self.spec.params["steps"])) if self.spec.family == "denoise" else None
            with PROGRESS.track(ref.stage, ref.key, self, steps) as on_step:
                try:
                    run_spec(self.spec, store, self.run_id, **({"on_step": on_step} if on_step else {}))
                except Exception as e:  # recorded per row, see module doc
                    if not self.run_id:
                        raise
                    log.error("%s %s failed: %s\n%s", ref.stage, ref.key[:12], e, traceback.format_exc())
                    self._fail(f"{type(e).__name__}: {e}" if not isinstance(e, StageFailed) else str(e))

    def _fail(self, message: str) -> None:
        self.artifact_store.record_failure(self.spec.ref, message, self.run_id)
        hook = getattr(self, "set_status_message", None)
        if callable(hook):
            hook(f"{self.spec.stage} {self.key[:12]}: failed: {message[:200]}")


class EncodeText(StageTask):
    pass


class EncodeImage(StageTask):
    pass


class Denoise(StageTask):
    expert = luigi.Parameter(default="high", description="high, low or single")


class DecodeVideo(StageTask):
    pass


def task_for(spec: StageSpec, store: str, run_id: str = "") -> StageTask:
    common = dict(key=spec.key, spec_json=spec.to_json(), store=store, run_id=run_id)
    if spec.family == "denoise":
        return Denoise(expert=spec.stage.split("-")[1], **common)
    return {"text": EncodeText, "image": EncodeImage, "decode": DecodeVideo}[spec.family](**common)
