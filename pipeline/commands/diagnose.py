"""wan-batch diagnose: environment, checkpoint health, memory fit, and a stage-by-stage run of one job."""
from __future__ import annotations

from .run import add_model_path


def register(sub) -> None:
    p = sub.add_parser("diagnose", help="check the environment, checkpoints, memory; run each stage once")
    p.add_argument("--config", default="", help="LightX2V-style JSON config (default: the embedded tiny model)")
    add_model_path(p)
    p.add_argument("--quick", action="store_true", help="environment: Python, torch/CUDA, ffmpeg, packages")
    p.add_argument("--health", action="store_true", help="checkpoints found and opened, keys match the architecture")
    p.add_argument("--memory", action="store_true", help="free RAM/VRAM vs. the config's needs; offload advice")
    p.add_argument("--pipeline", action="store_true",
                   help="run each stage once on a 1-row manifest, in order; stop at the first failing stage")
    p.add_argument("--manifest", help="with --pipeline: take the job from this manifest (default: a built-in row)")
    p.add_argument("--job", help="with --pipeline --manifest: the job_id (default: the first row)")
    p.add_argument("--i2v", action="store_true", help="with --pipeline and no manifest: an image-to-video row")
    p.add_argument("--store", help="with --pipeline: keep the artifacts in this store (default: a temp folder)")
    p.set_defaults(func=main)


def main(args) -> int:
    from ..config import load_config
    from ..diagnose import check_health, check_memory, check_pipeline, check_quick, failed
    from ..errors import WanBatchError

    chosen = [n for n in ("quick", "health", "memory", "pipeline") if getattr(args, n)]
    chosen = chosen or ["quick", "health", "memory"]
    config = None
    if set(chosen) - {"quick"}:
        try:
            config = load_config(args.config or None, args.model_path)
        except WanBatchError as e:
            print(f"error: {e}")
            return 2
    any_failed = False
    for name in chosen:
        print(f"== {name}")
        if name == "pipeline":
            lines = check_pipeline(config, args.manifest, args.job, args.i2v, args.store)  # prints as it goes
        else:
            lines = {"quick": check_quick, "health": lambda: check_health(config),
                     "memory": lambda: check_memory(config)}[name]()
            for line in lines:
                print(line)
        any_failed |= failed(lines)
    print("== result: " + ("FAILED (see [fail] lines)" if any_failed else "all checks passed"))
    return 1 if any_failed else 0
