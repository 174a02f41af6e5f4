"""A large batch scheduled a wave at a time, so Luigi's scheduler never holds more than one wave of pending
stage tasks.

Luigi's scheduler answers each `get_work` in time proportional to its pending tasks (spotify/luigi#1750,
#1492): a batch that declares all its tasks up front pays a cost that grows with the square of its size. A
batch of more than `wave_tasks` distinct artifacts is therefore declared in waves: `Waves` walks the batch's
artifacts in the order Luigi's priorities would run them (stage by stage; within a stage the T2V model's
tasks first, then manifest order), and yields one `Wave` (at most `wave_tasks` stage tasks that are not yet
in the store) at a time as a dynamic dependency. A stage's waves are consecutive, so each model is still
loaded once per stage in a worker, as with the whole graph up front.

Luigi re-runs `Waves.run()` from the start after each yield; the segments (the ordered artifacts) are planned
once per process and each segment's waves are fixed the first time it is reached, so every re-run yields the
same waves and skips, through each Wave's remembered completeness, those already done.

Several workers on one luigid share a batch through their own `Waves` (one per `slot`, `wan-batch workers`
numbers them): each yields the same waves, so every worker is a stakeholder of every pending stage task and
the scheduler hands each task to one of them. `RunManifest` requires whichever worker's `Waves` it was
scheduled with last; any one of them finishing means the whole batch's artifacts are settled.
"""
from __future__ import annotations

import hashlib
from functools import cached_property, lru_cache

import luigi

from pipeline.batch import load_batch
from pipeline.plan import JobPlan
from pipeline.progress import report
from pipeline.spec import StageSpec

from .stages import ArtifactTarget, StageTask, open_store, task_for, task_priority

DEFAULT_WAVE_TASKS = 1000  # benchmarks/bench_scale.py: flat per-task cost up to here, a fraction of a stage's


@lru_cache(maxsize=2)  # RunManifest and Waves of one run share one planning; a long-lived service keeps two
def batch_plans(manifest: str, config: str, strict: bool, run_id: str, model_path: str = "") -> tuple[JobPlan, ...]:
    """The batch's plans, planned once per process and run (a new run_id plans again)."""
    return tuple(load_batch(manifest, config, strict=strict, model_path=model_path or None).plans)


def segments(plans: tuple[JobPlan, ...] | list[JobPlan]) -> list[list[StageSpec]]:
    """The batch's distinct artifacts, one list per (stage, priority) in the order Luigi's priorities run them:
    higher priority first, then manifest order; identical specs (shared prompts) once."""
    specs: dict[str, StageSpec] = {}
    for plan in plans:
        if plan.decode is not None:
            for spec in plan.decode.chain():
                specs.setdefault(spec.key, spec)
    ordered = sorted(enumerate(specs.values()), key=lambda e: (-task_priority(e[1]), e[0]))
    out: list[list[StageSpec]] = []
    last = None
    for _, spec in ordered:
        group = (spec.stage, task_priority(spec))
        if group != last:
            out.append([])
            last = group
        out[-1].append(spec)
    return out


def count_artifacts(plans: tuple[JobPlan, ...] | list[JobPlan]) -> int:
    return len({s.key for p in plans if p.decode is not None for s in p.decode.chain()})


# run_id -> Wave digest -> its stage tasks, in the process that planned it. Kept after the waves are done (Luigi's
# execution summary walks the waves' requirements at the end); the two latest runs are kept.
_MEMBERS: dict[str, dict[str, list[StageTask]]] = {}


class Wave(luigi.WrapperTask):
    """At most `wave_tasks` stage tasks of one stage; complete when all of them are in the store (or settled
    as failed by this run)."""
    stage = luigi.Parameter()
    index = luigi.IntParameter(description="its place among the segment's waves")
    size = luigi.IntParameter(description="how many stage tasks it holds")
    digest = luigi.Parameter(description="sha256 of its tasks' ids: a wave is what it holds")
    run_id = luigi.Parameter(significant=False, default="")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._done = False

    def members(self) -> list[StageTask] | None:
        """Its stage tasks; None in a process that did not plan it (Luigi hands a wave only to the workers
        whose Waves declared it, so that process never runs it)."""
        return _MEMBERS.get(self.run_id, {}).get(self.digest)

    def requires(self) -> list[StageTask]:
        return self.members() or []

    def complete(self) -> bool:
        # Once all its tasks were seen complete it stays complete: a later re-run of Waves.run() skips it
        # without re-checking, and an artifact damaged since is healed by the task that needs it.
        if not self._done:
            members = self.members()
            self._done = members is not None and all(t.complete() for t in members)
        return self._done


def make_wave(stage: str, index: int, tasks: list[StageTask], run_id: str) -> Wave:
    digest = hashlib.sha256("\n".join(t.task_id for t in tasks).encode()).hexdigest()
    if run_id not in _MEMBERS:
        while len(_MEMBERS) >= 2:  # a long-lived process (the service) keeps only the latest runs' waves
            _MEMBERS.pop(next(iter(_MEMBERS)))
        _MEMBERS[run_id] = {}
    _MEMBERS[run_id][digest] = tasks
    return Wave(stage=stage, index=index, size=len(tasks), digest=digest, run_id=run_id)


class Waves(luigi.Task):
    """Declares a batch's stage tasks to Luigi a wave at a time (module doc); RunManifest requires it for a
    batch of more than `wave_tasks` artifacts."""
    manifest = luigi.Parameter()
    config = luigi.Parameter(default="")
    store = luigi.Parameter(default="wan-store")
    strict = luigi.BoolParameter(default=False)
    model_path = luigi.Parameter(default="", description="the model folder (RunManifest's)")
    slot = luigi.IntParameter(default=0, description="this worker's number among the workers sharing the batch")
    run_id = luigi.Parameter(significant=False, default="")
    wave_tasks = luigi.IntParameter(significant=False, default=DEFAULT_WAVE_TASKS)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._chunks: dict[int, list[list[StageSpec]]] = {}
        self._waves: dict[tuple[int, int], Wave] = {}
        self._finished = False

    @cached_property
    def segments(self) -> list[list[StageSpec]]:
        return segments(batch_plans(self.manifest, self.config, self.strict, self.run_id, self.model_path))

    def complete(self) -> bool:
        return self._finished  # RunManifest decides what is cached; this only schedules

    def chunks(self, i: int) -> list[list[StageSpec]]:
        """Segment i's waves, as specs: its artifacts not yet in the store (nor failed in this run) when the
        segment is first reached, `wave_tasks` at a time. Checked through the tasks' own target, without making
        the tasks (a Luigi task costs its parameter parsing); checking also sizes the stage's progress bar."""
        if i not in self._chunks:
            store = open_store(self.store)
            pending = [s for s in self.segments[i] if not ArtifactTarget(store, s.ref, self.run_id).exists()]
            size = max(1, self.wave_tasks)
            self._chunks[i] = [pending[j:j + size] for j in range(0, len(pending), size)]
        return self._chunks[i]

    def wave(self, i: int, n: int) -> Wave:
        if (i, n) not in self._waves:  # its tasks are made when the wave is first reached
            chunk = self.chunks(i)[n]
            self._waves[i, n] = make_wave(chunk[0].stage, n, [task_for(s, self.store, self.run_id) for s in chunk],
                                          self.run_id)
        return self._waves[i, n]

    def run(self):
        for i, specs in enumerate(self.segments):
            chunks = self.chunks(i)
            for n in range(len(chunks)):
                wave = self.wave(i, n)
                if not wave.complete():
                    report(self, f"{specs[0].stage}: wave {n + 1} of {len(chunks)} ({wave.size} tasks); "
                                 f"segment {i + 1} of {len(self.segments)}",
                           int(100 * i / max(1, len(self.segments))))
                yield wave
        report(self, "all waves done", 100)
        self._finished = True
