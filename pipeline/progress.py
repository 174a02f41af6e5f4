"""Progress of a batch in the terminal and in luigid's web UI.

One tqdm bar per stage counts the stage's tasks this worker runs (total = the tasks it scheduled that were not
already in the store), with tqdm's rate and ETA; a denoise task adds a bar of its solver steps. The same numbers
go to Luigi: `set_status_message` ("denoise-high 18db9e13: step 3/8") and `set_progress_percentage`, which the
scheduler stores per task, so `luigid`'s task list shows them while the batch runs.

Bars go to stderr and are off when stderr is not a terminal (cron logs stay readable; tqdm's TQDM_DISABLE=1
turns them off everywhere). Luigi runs the tasks of one worker in its process (workers=1), so a module-level
tracker sees every task of the worker.
"""
from __future__ import annotations

import contextlib
import logging
import threading
from collections import defaultdict
from typing import Any, Callable, Iterator

from tqdm.auto import tqdm

from .stages.registry import STAGES

log = logging.getLogger(__name__)

STAGE_ORDER = tuple(STAGES)  # the bars' order: the order the stages run in


def _call(task: Any, name: str, value: Any) -> None:
    """Call a Luigi reporter hook if the task is running in a worker (outside one the hooks are None)."""
    hook = getattr(task, name, None) if task is not None else None
    if callable(hook):
        try:
            hook(value)
        except Exception as e:  # a scheduler that cannot be reached must not fail the stage
            log.debug("luigi %s failed: %s", name, e)


def report(task: Any, message: str | None = None, percentage: int | None = None) -> None:
    """Show a task's status message and percentage in luigid's UI (nothing outside a Luigi worker)."""
    if message is not None:
        _call(task, "set_status_message", message)
    if percentage is not None:
        _call(task, "set_progress_percentage", percentage)


class StageProgress:
    """Tasks expected / done per stage, the tqdm bars, and the Luigi hooks of the running task."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.expected: dict[str, set[str]] = defaultdict(set)
        self.done: dict[str, set[str]] = defaultdict(set)
        self.bars: dict[str, Any] = {}

    def reset(self) -> None:
        with self._lock:
            for bar in self.bars.values():
                bar.close()
            self.bars.clear()
            self.expected.clear()
            self.done.clear()

    def expect(self, stage: str, key: str) -> None:
        """A task of `stage` will run in this worker (called when its complete() is False)."""
        with self._lock:
            if key in self.expected[stage]:
                return
            self.expected[stage].add(key)
            bar = self.bars.get(stage)
            if bar is not None:
                bar.total = len(self.expected[stage])
                bar.refresh()

    def _bar(self, stage: str):
        if stage not in self.bars:
            position = STAGE_ORDER.index(stage) if stage in STAGE_ORDER else len(STAGE_ORDER)
            self.bars[stage] = tqdm(total=max(len(self.expected[stage]), 1), desc=f"{stage:<14}", unit="task",
                                    position=position, leave=True, disable=None, dynamic_ncols=True)
        return self.bars[stage]

    def finished(self, stage: str, key: str) -> None:
        with self._lock:
            self.expected[stage].add(key)
            bar = self._bar(stage)
            bar.total = max(bar.total or 0, len(self.expected[stage]))
            if key not in self.done[stage]:
                self.done[stage].add(key)
                bar.update(1)

    def counts(self, stage: str) -> tuple[int, int]:
        """(done, expected) for a stage in this process."""
        with self._lock:
            return len(self.done[stage]), len(self.expected[stage])

    @contextlib.contextmanager
    def track(self, stage: str, key: str, task: Any = None,
              steps: int | None = None) -> Iterator[Callable[[int], None] | None]:
        """Around one task's work. Yields an `on_step(i)` callback when the stage has `steps` solver steps
        (i is the global step index; the callback counts calls), else None."""
        with self._lock:
            self._bar(stage)  # the stage's bar appears (and its clock starts) with its first task
        done, total = self.counts(stage)
        label = f"{stage} {key[:12]}"
        _call(task, "set_status_message", f"{label}: running ({done + 1} of {total} {stage} tasks)")
        _call(task, "set_progress_percentage", 0)
        on_step = None
        step_bar = None
        if steps:
            step_bar = tqdm(total=steps, desc=f"  {label}", unit="step", position=len(STAGE_ORDER) + 1,
                            leave=False, disable=None, dynamic_ncols=True)
            counter = {"n": 0}

            def on_step(_index: int) -> None:
                counter["n"] += 1
                step_bar.update(1)
                _call(task, "set_progress_percentage", int(100 * counter["n"] / steps))
                _call(task, "set_status_message", f"{label}: step {counter['n']}/{steps}")

        try:
            yield on_step
        finally:
            if step_bar is not None:
                step_bar.close()
        self.finished(stage, key)
        _call(task, "set_progress_percentage", 100)
        _call(task, "set_status_message", f"{label}: done")


PROGRESS = StageProgress()
