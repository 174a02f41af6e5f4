"""wan-batch rerun: invalidate one stage of one job (and what depends on it, for that job) and run it again."""
from __future__ import annotations

import uuid
from pathlib import Path

from ..stages.registry import job_stage_names
from .run import add_model_path


def register(sub) -> None:
    p = sub.add_parser("rerun", help="re-run one stage of one job and everything downstream of it")
    p.add_argument("--job", required=True, help="job_id of the row")
    p.add_argument("--stage", required=True, help=", ".join(job_stage_names()))
    p.add_argument("--manifest", required=True)
    p.add_argument("--config", default="")
    add_model_path(p)
    p.add_argument("--store", default="wan-store")
    p.add_argument("--output-dir", help="also publish the new video as <output-dir>/<job_id>.mp4")
    p.add_argument("--no-run", action="store_true", help="only invalidate (then e.g. luigi ... RunStage)")
    p.add_argument("--dry-run", action="store_true", help="list what would be invalidated, change nothing")
    p.set_defaults(func=main)


def main(args) -> int:
    from ..errors import WanBatchError
    from ..inspect import chain_from_plan, find_job, inspect_chain
    from tasks.build import run_job

    from ..rerun import downstream, invalidate, stage_spec
    from ..store import ArtifactStore

    store = ArtifactStore(args.store)
    try:
        plan = find_job(args.manifest, args.config or None, args.job, args.model_path)
        spec = stage_spec(plan, args.stage)
    except WanBatchError as e:
        print(f"error: {e}")
        return 2
    targets = downstream(plan, spec)
    names = {s.key: n for n, s in plan.stages().items()}
    listing = ", ".join(f"{names[s.key]} {s.key[:12]}" for s in targets)
    if args.dry_run:
        print(f"would invalidate {len(targets)} artifact(s) of job {args.job}: {listing}")
        return 0
    removed = invalidate(store, targets)
    print(f"invalidated {len(removed)} of {len(targets)} artifact(s) of job {args.job}: {listing}")
    if args.no_run:
        return 0
    run_id = uuid.uuid4().hex[:12]
    ok = run_job(plan, str(store.root), run_id)
    infos, _ = inspect_chain(store, chain_from_plan(plan), with_stats=False)
    for info in infos:
        state = "recomputed" if info.run_id == run_id else ("reused" if info.status == "ok" else info.status)
        wall = f"{info.wall_s:.2f} s" if info.wall_s is not None and state == "recomputed" else ""
        print(f"  {info.name:<15}{info.ref.key[:12]}  {state:<11}{wall}" + (f"  {info.detail}" if info.detail else ""))
    if not ok:
        print(f"job {args.job}: the video was not produced")
        return 1
    if args.output_dir:
        from tasks.run_manifest import publish

        dest = Path(args.output_dir) / f"{plan.job.job_id}.mp4"
        dest.parent.mkdir(parents=True, exist_ok=True)
        publish(store.payload_path(plan.decode.ref), dest)
        print(f"video: {dest}")
    return 0
