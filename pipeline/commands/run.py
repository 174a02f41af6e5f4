"""wan-batch run: RunManifest through Luigi (the same as `luigi --module pipeline RunManifest ...`)."""
from __future__ import annotations

import argparse
import uuid


MODEL_PATH_HELP = ("the model folder (LightX2V's --model_path); wins over the config's model_path. A config "
                   "with neither is refused")


def add_model_path(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-path", default=None, help=MODEL_PATH_HELP)


def add_batch_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest", required=True, help="Parquet manifest, one row per video")
    p.add_argument("--config", default="", help="LightX2V-style JSON config (default: the embedded tiny model's)")
    add_model_path(p)
    p.add_argument("--output-dir", default="outputs")
    p.add_argument("--store", default="wan-store", help="artifact store shared across batches")
    p.add_argument("--strict", action="store_true", help="refuse the manifest on any row-level problem")


def register(sub) -> None:
    p = sub.add_parser("run", help="run a manifest (Luigi RunManifest, local scheduler unless configured)")
    add_batch_arguments(p)
    p.add_argument("--workers", type=int, default=1, help="Luigi workers (1 keeps models resident in-process)")
    p.set_defaults(func=main)


def run_batch(manifest: str, config: str = "", output_dir: str = "outputs", store: str = "wan-store",
              strict: bool = False, workers: int = 1, local_scheduler: bool | None = None,
              model_path: str = "") -> bool:
    """Run RunManifest in this process; True when every row succeeded."""
    import luigi

    from tasks import RunManifest

    task = RunManifest(manifest=manifest, config=config, model_path=model_path or "", output_dir=output_dir,
                       store=store, strict=strict, run_id=uuid.uuid4().hex[:12])
    kwargs = {} if local_scheduler is None else {"local_scheduler": local_scheduler}
    result = luigi.build([task], workers=workers, detailed_summary=True, **kwargs)
    return result.status.name in ("SUCCESS", "SUCCESS_WITH_RETRY")


def _absolute(path: str | None) -> str:
    """The --model-path as an absolute path (the Luigi task and worker processes see the same folder)."""
    import os

    return "" if not path or path.startswith("builtin:") else os.path.abspath(os.path.expanduser(path))


def main(args) -> int:
    from ..errors import WanBatchError
    from ..manifest import read_manifest
    from ..config import load_config
    from ..stages.image import check_image

    # Validate up front so a bad manifest or config is reported plainly, before Luigi starts.
    try:
        read_manifest(args.manifest, load_config(args.config or None, args.model_path), strict=args.strict,
                      check_image=check_image)
    except WanBatchError as e:
        print(f"error: {e}")
        return 2
    ok = run_batch(args.manifest, args.config, args.output_dir, args.store, args.strict, args.workers,
                   model_path=_absolute(args.model_path))
    print(f"results: {args.output_dir}/results.parquet")
    return 0 if ok else 1
