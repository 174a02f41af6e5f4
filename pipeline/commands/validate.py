"""wan-batch validate: check a manifest and config without running anything; list every problem."""
from __future__ import annotations

from .run import add_model_path


def register(sub) -> None:
    p = sub.add_parser("validate", help="validate a manifest (and config) and list every problem")
    p.add_argument("--manifest", required=True)
    p.add_argument("--config", default="")
    add_model_path(p)
    p.add_argument("--strict", action="store_true")
    p.set_defaults(func=main)


def main(args) -> int:
    from ..config import load_config
    from ..errors import WanBatchError
    from ..manifest import read_manifest
    from ..stages.image import check_image

    try:
        jobs = read_manifest(args.manifest, load_config(args.config or None, args.model_path), strict=args.strict,
                             check_image=check_image)
    except WanBatchError as e:
        print(f"error: {e}")
        return 2
    bad = [j for j in jobs if j.error]
    for j in bad:
        print(f"row problem: {j.error}")
    print(f"{len(jobs)} rows, {len(jobs) - len(bad)} runnable, {len(bad)} with problems")
    return 1 if bad else 0
