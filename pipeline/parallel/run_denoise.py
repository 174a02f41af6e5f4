"""One rank of a parallel Denoise task: `torchrun --nproc_per_node=N -m pipeline.parallel.run_denoise ...`.

Started by pipeline.parallel.launch from inside the Denoise task (the Luigi side is unchanged). Every rank
loads the expert onto its own device, reads the same inputs from the store and runs the loop; rank 0 checks
the result is finite and writes the artifact (atomically, like every stage) and reports each finished step on
stdout for the task's progress bar. A rank that fails writes its error to `--error-dir` for the task to report.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from ..errors import StageFailed
from ..plan import StageSpec
from ..store import ArtifactStore, atomic_write_text
from .layout import ParallelLayout

log = logging.getLogger("wan_batch.parallel")
STEP_MARK = "wan-batch-parallel-step"


def run(spec: StageSpec, store: ArtifactStore, run_id: str, group) -> dict | None:
    from ..execute import _check_finite, _sidecar, get_model
    from ..models.perf import batched_cfg
    from ..stages.denoise import initial_noise
    from ..stages.schedule import export_state, import_state, make_scheduler
    from .denoise import denoise_steps_parallel
    from .ulysses import check_divisible, enable_ulysses

    t0 = time.perf_counter()
    p, device = spec.params, group.device
    # this rank's device; the key (params + upstream) is unchanged
    local = StageSpec(spec.stage, spec.params, spec.upstream, spec.model, {**spec.runtime, "device": str(device)})
    sched = make_scheduler(p["schedule"])
    if "prev" in spec.upstream:
        prev = spec.upstream["prev"]
        tensors = store.load_tensors(prev.ref, device)
        latents = tensors["latents"]
        import_state(sched, tensors, store.sidecar(prev.ref)["scheduler_state"], device)
    else:
        latents = initial_noise(p["seed"], tuple(p["latent_shape"])).to(device)
    transformer = get_model(local)
    report = {"layout": group.layout.as_dict(), "world_size": group.world}
    if group.layout.seq > 1:
        check_divisible(transformer, p["latent_shape"], group.layout.seq)
        report["ulysses"] = enable_ulysses(transformer, group)
    context = store.load_tensors(spec.upstream["text"].ref, device)["context"].to(transformer.dtype)
    context_null = None
    if p["cfg"]:
        context_null = store.load_tensors(spec.upstream["text_null"].ref, device)["context"].to(transformer.dtype)
    image = store.load_tensors(spec.upstream["image"].ref, device) if "image" in spec.upstream else {}
    cond = image.get("cond")
    if "clip" in image:  # Wan2.1 I2V: the DiT also attends to the CLIP image features (as execute.run_denoise)
        from ..stages.image import ImageConditioned

        transformer = ImageConditioned(transformer, image["clip"])
    steps = range(*p["steps"])

    def on_step(i: int) -> None:
        if group.writer:
            print(f"{STEP_MARK} {i}", flush=True)

    latents = denoise_steps_parallel(transformer, sched, latents, steps, context, context_null,
                                     p["guide_scale"] or 1.0, group, cond=cond, on_step=on_step,
                                     batched_cfg=batched_cfg(spec.runtime, device))
    if not group.writer:
        return None
    _check_finite("latents", latents, spec)
    state_tensors, state_meta = export_state(sched)
    return store.write_tensors(spec.ref, {"latents": latents, **state_tensors},
                               _sidecar(spec, run_id, time.perf_counter() - t0,
                                        {"scheduler_state": state_meta, "steps_run": len(steps), "parallel": report}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.parallel.run_denoise")
    parser.add_argument("--spec", required=True, help="the Denoise stage spec (JSON file)")
    parser.add_argument("--store", required=True)
    parser.add_argument("--run-id", default="")
    parser.add_argument("--error-dir", required=True, help="where a failing rank writes error-<rank>.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s rank %(process)d %(name)s: %(message)s")
    from .group import close_group, init_group

    spec = StageSpec.from_json(Path(args.spec).read_text(encoding="utf-8"))
    layout = ParallelLayout.from_runtime(spec.runtime)
    rank = int(os.environ.get("RANK", "0"))
    try:
        group = init_group(layout, torch.device(spec.runtime["device"]).type)
        run(spec, ArtifactStore(args.store), args.run_id, group)
        dist.barrier()  # rank 0 has written the artifact before any rank reports success
        return 0
    except BaseException as e:  # noqa: BLE001 - reported to the task, which records it for the row
        message = str(e) if isinstance(e, StageFailed) else f"{type(e).__name__}: {e}"
        doc = {"rank": rank, "error": message, "stage_failed": isinstance(e, StageFailed),
               "traceback": traceback.format_exc()}
        atomic_write_text(Path(args.error_dir) / f"error-{rank}.json", json.dumps(doc))
        print(traceback.format_exc(), file=sys.stderr, flush=True)
        return 1
    finally:
        close_group()


if __name__ == "__main__":
    sys.exit(main())
