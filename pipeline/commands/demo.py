"""wan-batch demo: write the demo manifest and run it on the embedded tiny model."""
from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("demo", help="run the demo manifest on the embedded tiny model (CPU is enough)")
    p.add_argument("--dir", default="demo", help="folder for the manifest, store and outputs")
    p.set_defaults(func=main)


def main(args) -> int:
    from ..demo import write_demo_manifest
    from tasks.build import run_batch

    folder = Path(args.dir)
    manifest = write_demo_manifest(folder)
    ok = run_batch(str(manifest), output_dir=str(folder / "outputs"), store=str(folder / "wan-store"))
    print(f"videos and results.parquet in {folder / 'outputs'}")
    return 0 if ok else 1
