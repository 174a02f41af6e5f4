"""Exceptions that carry every problem found, so a user fixes a manifest or config in one pass."""


class WanBatchError(Exception):
    """Base class: a problem the user can fix (bad input, missing file), reported without a traceback."""


class ProblemList(WanBatchError):
    """Several problems found at once; `problems` lists each as a sentence naming row/column/key/file."""

    what = "input"

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{self.what} {source} has {len(self.problems)} problem(s):\n{lines}")


class ConfigError(ProblemList):
    what = "config"


class ManifestError(ProblemList):
    what = "manifest"


class CheckpointError(WanBatchError):
    """A model file is missing, unreadable, or does not fit the architecture."""


class StageFailed(WanBatchError):
    """A stage could not produce its artifact for one job (bad values, non-finite output, ...)."""


class RowsFailed(WanBatchError):
    """Raised at the end of a batch so the process exits non-zero when any row failed."""
