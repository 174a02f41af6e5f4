"""Progress: per-stage counts and the Luigi hooks a running task reports through (what luigid's UI shows)."""
from __future__ import annotations

from pipeline.progress import StageProgress


class FakeTask:
    """Stands in for the hooks Luigi's worker attaches to a running task."""

    def __init__(self):
        self.messages, self.percentages = [], []
        self.set_status_message = self.messages.append
        self.set_progress_percentage = self.percentages.append


def test_denoise_steps_drive_the_percentage_and_the_message():
    progress = StageProgress()
    for key in ("k1" * 32, "k2" * 32):
        progress.expect("denoise-high", key)
    progress.expect("denoise-high", "k1" * 32)  # complete() is asked more than once: counted once
    task = FakeTask()
    with progress.track("denoise-high", "k1" * 32, task, steps=4) as on_step:
        for i in range(4):
            on_step(10 + i)  # global step indices: the callback counts calls
    assert task.percentages == [0, 25, 50, 75, 100, 100]
    assert task.messages[0] == f"denoise-high {'k1' * 6}: running (1 of 2 denoise-high tasks)"
    assert task.messages[1:5] == [f"denoise-high {'k1' * 6}: step {n}/4" for n in (1, 2, 3, 4)]
    assert task.messages[-1] == f"denoise-high {'k1' * 6}: done"
    assert progress.counts("denoise-high") == (1, 2)
    assert progress.bars["denoise-high"].total == 2  # the stage's bar is sized by the expected tasks
    progress.reset()


def test_stages_without_steps_and_tasks_outside_a_worker():
    progress = StageProgress()
    progress.expect("text", "a" * 64)
    with progress.track("text", "a" * 64, object(), steps=None) as on_step:  # no Luigi hooks: nothing breaks
        assert on_step is None
    task = FakeTask()
    with progress.track("decode", "b" * 64, task) as on_step:  # not expected (found incomplete late): counted
        assert on_step is None
    assert progress.counts("text") == (1, 1) and progress.counts("decode") == (1, 1)
    assert task.percentages == [0, 100]
    progress.expect("text", "c" * 64)
    try:
        with progress.track("text", "c" * 64, task):
            raise RuntimeError("stage failed")
    except RuntimeError:
        pass
    assert progress.counts("text") == (1, 2)  # a failed task is not counted as done
    progress.reset()
