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


def _not_a_row_problem(record) -> bool:
    """read_manifest logs each row problem for `run` and Luigi; validate prints them itself, once each."""
    return not str(record.msg).endswith("(this row is skipped and reported failed)")


def main(args) -> int:
    import logging

    from ..batch import load_batch
    from ..errors import WanBatchError

    rows_log = logging.getLogger("pipeline.manifest")
    rows_log.addFilter(_not_a_row_problem)
    try:
        jobs = load_batch(args.manifest, args.config, strict=args.strict, model_path=args.model_path).jobs
    except WanBatchError as e:
        print(f"error: {e}")
        return 2
    finally:
        rows_log.removeFilter(_not_a_row_problem)
    bad = [j for j in jobs if j.error]
    for j in bad:
        print(f"row problem: {j.error}")
    print(f"{len(jobs)} rows, {len(jobs) - len(bad)} runnable, {len(bad)} with problems")
    return 1 if bad else 0
