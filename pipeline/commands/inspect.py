"""wan-batch inspect: one job's (or one cache key's) chain of stage artifacts, with numbers and previews."""
from __future__ import annotations

from pathlib import Path
from .run import add_model_path


def register(sub) -> None:
    p = sub.add_parser("inspect", help="show a job's stage artifacts: status, tensor stats, timings, previews")
    p.add_argument("target", help="a job_id of --manifest, or a cache key (or a prefix of one, 4+ hex digits)")
    p.add_argument("--store", default="wan-store", help="artifact store")
    p.add_argument("--manifest", help="the manifest the job is in (needed for a job_id)")
    p.add_argument("--config", default="", help="the config the batch ran with (default: the tiny model)")
    add_model_path(p)
    p.add_argument("--preview", metavar="DIR", help="write PNG previews (input image, latents, frames) here")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=main)


def main(args) -> int:
    from ..errors import WanBatchError
    from ..inspect import chain_from_key, chain_from_plan, find_job, format_chain, inspect_chain, to_json, \
        write_previews
    from ..store import ArtifactStore

    store = ArtifactStore(args.store)
    if not store.root.is_dir():
        print(f"error: store {store.root} does not exist")
        return 2
    try:
        if args.manifest:
            plan = find_job(args.manifest, args.config or None, args.target, args.model_path)
            if plan.decode is None:
                print(f"job {args.target}: not runnable: {plan.error}")
                return 1
            chain = chain_from_plan(plan)
            job = plan.job
            header = f"job {job.job_id}  (row {job.row}, {job.task}, seed {job.seed})  store {store.root}"
            extra = {"job_id": job.job_id, "row": job.row, "prompt": job.prompt}
        elif not all(c in "0123456789abcdefABCDEF" for c in args.target):
            print(f"error: {args.target!r} is not a cache key, so it is a job id: --manifest is missing "
                  f"(the manifest the job is in, e.g. wan-batch inspect {args.target} --manifest jobs.parquet)")
            return 2
        else:
            chain = chain_from_key(store, args.target)
            header = f"artifact {chain[-1][1].stage}/{chain[-1][1].key}  store {store.root}"
            extra = {"key": chain[-1][1].key}
        infos, latest = inspect_chain(store, chain)
    except WanBatchError as e:
        print(f"error: {e}")
        return 2
    print(to_json(infos, latest, extra) if args.json else format_chain(infos, latest, header))
    if args.preview:
        files = write_previews(store, infos, Path(args.preview))
        if not args.json:
            print(f"\npreviews in {args.preview}: " + (", ".join(f.name for f in files) or "none (nothing computed)"))
    return 0 if all(i.status == "ok" for i in infos) else 1
