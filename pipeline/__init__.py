"""wan-batch: Parquet manifest -> staged, cached, resumable Wan2.1/Wan2.2 video generation on Luigi.

Importing this package (as `luigi --module pipeline RunManifest ...` does) configures Luigi so the product's
command works as written: the local scheduler unless a scheduler host is configured, and exit codes that are
non-zero when a row or task failed (Luigi's defaults are 0)."""
__version__ = "0.1.0"

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

__all__ = ["RunManifest", "RunStage", "EncodeText", "EncodeImage", "Denoise", "DecodeVideo", "__version__"]
