"""wan-batch run: RunManifest through Luigi (the same as `luigi --module pipeline RunManifest ...`)."""
from __future__ import annotations

import argparse


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


def absolute_model_path(path: str | None) -> str:
    """The --model-path as an absolute path (the Luigi task and worker processes see the same folder)."""
    import os

    return "" if not path or path.startswith("builtin:") else os.path.abspath(os.path.expanduser(path))


def main(args) -> int:
    from tasks.build import run_batch

    from ..batch import load_batch
    from ..errors import WanBatchError

    # Validate up front so a bad manifest or config is reported plainly, before Luigi starts.
    try:
        load_batch(args.manifest, args.config, strict=args.strict, model_path=args.model_path)
    except WanBatchError as e:
        print(f"error: {e}")
        return 2
    from pathlib import Path

    from tasks.run_manifest import output_folder_problem, report_state

    results = Path(args.output_dir) / "results.parquet"
    before = report_state(results)
    ok = run_batch(args.manifest, args.config, args.output_dir, args.store, args.strict, args.workers,
                   model_path=absolute_model_path(args.model_path))
    if report_state(results) in (None, before):  # never point at a report this run did not write
        problem = output_folder_problem(Path(args.output_dir))
        print(f"error: {results} was not written: {problem or 'see the log above'}")
        return 1
    print(f"results: {results}")
    return 0 if ok else 1
