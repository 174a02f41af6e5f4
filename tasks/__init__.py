"""Luigi tasks of wan-batch. `luigi --module tasks RunManifest ...` works as well as `--module pipeline`."""
import pipeline  # noqa: F401  (configures Luigi: local scheduler by default, non-zero exit codes)

from .run_manifest import RunManifest
from .run_stage import RunStage
from .stages import DecodeVideo, Denoise, EncodeImage, EncodeText, StageTask, task_for

__all__ = ["RunManifest", "RunStage", "EncodeText", "EncodeImage", "Denoise", "DecodeVideo", "StageTask", "task_for"]
