"""wan-batch: Parquet manifest -> staged, cached, resumable Wan2.1/Wan2.2 video generation on Luigi.

Importing this package (as `luigi --module pipeline RunManifest ...` does) configures Luigi so the product's
command works as written: the local scheduler unless a scheduler host is configured, and exit codes that are
non-zero when a row or task failed (Luigi's defaults are 0)."""
from .version import __version__

import logging  # noqa: E402

# Before anything imports torch: OpenMP reads its wait policy once, when torch loads it (pipeline/threads.py).
from . import threads as _threads  # noqa: E402

_threads.configure_environment()

from .luigi_setup import configure_luigi  # noqa: E402

configure_luigi()

# Submodules, not `from tasks import ...`: `luigi --module tasks` imports tasks/__init__ first, which imports
# this package while `tasks` is still half-initialised.
from tasks.run_manifest import RunManifest  # noqa: E402
from tasks.run_stage import RunStage  # noqa: E402
from tasks.stages import DecodeVideo, Denoise, EncodeImage, EncodeText  # noqa: E402

_threads.configure_threads()


def _quiet_third_party_progress() -> None:
    """Our progress lines report each stage; transformers' and diffusers' per-load bars ("Loading weights")
    would interleave with them. (`wan-batch download` turns huggingface_hub's download bars back on.)"""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()


_quiet_third_party_progress()


class ManifestWarningsOnce(logging.Filter):
    """For a handler that prints to the user: a manifest warning once per process. `wan-batch run`
    validates up front and Luigi calls RunManifest.requires() several times, each reading the manifest, but
    a row problem is one event. On handlers only (not the logger): other handlers, such as a test's log
    capture, still get every record."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: set[tuple[int, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != "pipeline.manifest":
            return True
        key = (record.levelno, record.getMessage())
        if key in self._seen:
            return False
        self._seen.add(key)
        return True


# `luigi --module pipeline ...` configures no handler for our loggers: warnings reach Python's last resort.
if logging.lastResort is not None:
    logging.lastResort.addFilter(ManifestWarningsOnce())

__all__ = ["RunManifest", "RunStage", "EncodeText", "EncodeImage", "Denoise", "DecodeVideo", "__version__"]
