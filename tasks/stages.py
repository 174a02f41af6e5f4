"""Thin Luigi tasks, one per (stage, cache key): EncodeText, EncodeImage, Denoise(expert), DecodeVideo, one
class per registry entry's `task` (pipeline/stages/registry.py).

A task knows its spec (what to compute, from what) and the store; the work is the stage's run
(pipeline.execute.run_spec). Its output() is an ArtifactTarget, so complete() is Luigi's own. A row-level
failure (bad values, non-finite output, a model that fails to load) is recorded next to the artifact for this
run, so the tasks downstream fail fast with the reason and RunManifest still writes results.parquet for the
batch; the run's exit code is then non-zero. Run directly (no run_id), a task raises instead.

An upstream artifact damaged or deleted after its task finished and before this one runs is recomputed here,
in this run (Luigi's own pre-run check of the dependencies is off for this reason: pipeline.luigi_setup).

In a run (a run id), a stage may hand its artifact's write to the background writer (pipeline/writer.py:
decode's H.264 encode) and the task returns before the artifact is in the store; Luigi counts the task done
then (its complete() is not checked after run: check_complete_on_run is off, Luigi's default). Whatever reads
the artifact later (this target's exists(), the consumer's heal check, RunManifest) waits for that write
first, and the artifact's lock stays held until it ends, so another process waits too. A write that fails
records the row's failure like any stage error.
"""
from __future__ import annotations

import contextlib
import logging
import traceback
from functools import cached_property

import luigi

from pipeline.errors import StageFailed
from pipeline.execute import run_spec
from pipeline.progress import PROGRESS
from pipeline.spec import StageSpec
from pipeline.stages.registry import STAGES, stage_of
from pipeline.store import ArtifactRef, ArtifactStore
from pipeline.writer import WRITER

log = logging.getLogger("wan_batch.tasks")

_STORES: dict[str, ArtifactStore] = {}


class wan_batch(luigi.Config):  # noqa: N801  (the class name is the section name: [wan_batch] in luigi.cfg)
    """Luigi resources claimed by every stage task. The scheduler runs a task only while its resources are
    free: with `[resources] gpu=N` in luigid's config (N = GPUs of all workers) at most N stage tasks run at
    once, one per GPU; an undefined resource counts as 1. gpu_per_task=0 claims nothing."""
    gpu_resource = luigi.Parameter(default="gpu", description="name of the Luigi resource a stage task claims")
    gpu_per_task = luigi.IntParameter(default=1, description="units of it per stage task (0: none)")


def task_priority(spec: StageSpec) -> float:
    """Luigi priority of a spec's task: its stage's, +1 for the T2V model, so within a stage tasks of the same
    model run back to back: a batch mixing T2V and I2V rows loads each 14B expert once instead of alternating
    between the two models. Within one model, tasks of the same expert fingerprint (its per-row LoRA set) run
    back to back too: a fraction below 0.5 from the fingerprint, so each patched expert is loaded once per
    stage. Waves (tasks/waves.py) follow the same order."""
    group = int(spec.fingerprint[:6], 16) / 16**6 / 2 if spec.family == "denoise" and spec.fingerprint else 0.0
    return stage_of(spec.stage).priority + (1 if spec.model.get("task") == "t2v" else 0) + group


def open_store(root: str) -> ArtifactStore:
    """One ArtifactStore per root per process, so integrity checks are memoised across tasks."""
    if root not in _STORES:
        _STORES[root] = ArtifactStore(root)
    return _STORES[root]


class ArtifactTarget(luigi.Target):
    """One artifact of the store, as seen by one run. It exists when its payload and sidecar pass the store's
    integrity check (size and sha256), or when this run recorded the stage's failure (the row is settled: it
    will be reported failed, and the batch goes on). A missing target tells the progress tracker that its
    task will run, which sizes the stage's progress bar."""

    def __init__(self, store: ArtifactStore, ref: ArtifactRef, run_id: str = ""):
        self.store, self.ref, self.run_id = store, ref, run_id

    def failure(self) -> dict | None:
        """The failure recorded for this artifact by this run, if any."""
        rec = self.store.failure(self.ref)
        return rec if rec and self.run_id and rec.get("run_id") == self.run_id else None

    def exists(self) -> bool:
        done = self.store.is_complete(self.ref) or self.failure() is not None
        if not done:
            PROGRESS.expect(self.ref.stage, self.ref.key)
        return done


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
    def priority(self) -> float:
        return task_priority(self.spec)

    @property
    def resources(self) -> dict[str, int]:
        cfg = wan_batch()
        return {cfg.gpu_resource: cfg.gpu_per_task} if cfg.gpu_per_task > 0 else {}

    @cached_property
    def _upstream_tasks(self) -> list["StageTask"]:
        # made once: Luigi, the heal check and the failure check each ask, and making a task costs Luigi's
        # parameter parsing (a large batch's worker asks this hundreds of thousands of times)
        return [task_for(up, self.store, self.run_id) for up in self.spec.upstream.values()]

    def requires(self):
        return list(self._upstream_tasks)

    def output(self) -> ArtifactTarget:
        return ArtifactTarget(self.artifact_store, self.spec.ref, self.run_id)

    def run(self) -> None:
        try:
            self._run()
        except OSError as e:  # the store itself failed (full disk, read-only, unreadable): this row fails
            if not self.run_id:
                raise
            log.error("%s %s failed: the store could not be used: %s", self.spec.stage, self.key[:12], e)
            self._fail(self._store_error(e))

    def _store_error(self, e: OSError) -> str:
        return f"the store could not be used: {e.strerror or e} ({e.filename or self.store})"

    def _write_failed(self, e: BaseException) -> None:
        """The background write of this task's artifact failed (on the writer's thread, after run returned)."""
        message = self._store_error(e) if isinstance(e, OSError) else \
            str(e) if isinstance(e, StageFailed) else f"{type(e).__name__}: {e}"
        log.error("%s %s failed: writing its artifact: %s", self.spec.stage, self.key[:12], message)
        self.artifact_store.record_failure(self.spec.ref, message, self.run_id)

    def _run(self) -> None:
        store, ref = self.artifact_store, self.spec.ref
        if not store.is_complete(ref):
            self._heal_upstream()  # before our lock: an upstream task takes its own
        with store.lock(ref):  # another process may be computing the same artifact
            if store.is_complete(ref):  # the winner of a race wrote it while we waited: reuse
                log.info("%s %s was computed by another run meanwhile: reused", ref.stage, ref.key)
                return
            store.remove_stale_temps(ref)  # left by a killed writer; we hold the lock, so none is live
            upstream_failures = [f for f in (t.output().failure() for t in self.requires()) if f]
            if upstream_failures:
                self._fail(f"upstream {upstream_failures[0]['stage']} failed: {upstream_failures[0]['error']}")
                return
            stage = stage_of(self.spec.stage)
            steps = stage.steps(self.spec.params) if stage.steps else None
            with PROGRESS.track(ref.stage, ref.key, self, steps) as on_step:
                try:
                    with WRITER.accepting(self._write_failed) if self.run_id else contextlib.nullcontext():
                        run_spec(self.spec, store, self.run_id, on_step=on_step)
                except Exception as e:  # recorded per row, see module doc
                    if not self.run_id:
                        raise
                    log.error("%s %s failed: %s\n%s", ref.stage, ref.key[:12], e, traceback.format_exc())
                    self._fail(f"{type(e).__name__}: {e}" if not isinstance(e, StageFailed) else str(e))

    def _heal_upstream(self) -> None:
        """Recompute, in this process and run, any upstream artifact that is no longer usable (damaged or
        removed since its task completed); each one heals its own upstream first."""
        for task in self.requires():
            if not task.output().exists():
                log.warning("%s %s: upstream %s %s is gone or damaged since it was computed: recomputing it",
                            self.spec.stage, self.key[:12], task.spec.stage, task.key[:12])
                task.run()

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


# A stage added to the registry with a task name of its own gets its class here, with no code of its own.
TASKS: dict[str, type[StageTask]] = {cls.__name__: cls for cls in (EncodeText, EncodeImage, Denoise, DecodeVideo)}
for _stage in STAGES.values():
    if _stage.task not in TASKS:
        TASKS[_stage.task] = type(_stage.task, (StageTask,), {"__module__": __name__,
                                                               "__doc__": f"Runs the {_stage.name} stage."})
        globals()[_stage.task] = TASKS[_stage.task]


def task_for(spec: StageSpec, store: str, run_id: str = "") -> StageTask:
    common = dict(key=spec.key, spec_json=spec.to_json(), store=store, run_id=run_id)
    cls = TASKS[stage_of(spec.stage).task]
    if cls is Denoise:
        return Denoise(expert=spec.stage.split("-", 1)[1], **common)
    return cls(**common)
