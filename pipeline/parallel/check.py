"""Same-output check (and per-step timing) of the parallel DiT against the single-process one.

    python -m torch.distributed.run --standalone --nproc_per_node=2 -m pipeline.parallel.check \\
        --layouts 2x1,1x2 --frames 81 --height 480 --width 832 --arch full --out result.json

Layouts are `SEQxCFG` (seq_p_size x cfg_p_size); each must use all the launched processes. Every rank builds
the same random-weight WanTransformer3DModel (rank 0's weights are broadcast), computes one guided noise
prediction alone (the single-process reference, and its time per step), then the same prediction with the
layout (Ulysses and/or the CFG split), and rank 0 writes the largest differences to `--out`. Used by
tests/test_parallel.py on the tiny architecture (gloo, CPU) and by benchmarks/bench_multi_gpu.py at full size.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .layout import ParallelLayout

# Wan2.2 A14B's DiT (each expert); `tiny` is the embedded demo model's architecture.
A14B = dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
            text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)


def arch_config(arch: str, layers: int | None = None) -> dict[str, Any]:
    from ..tiny import DIT_CONFIG

    cfg = dict(A14B if arch == "full" else DIT_CONFIG)
    if layers:
        cfg["num_layers"] = layers
    return cfg


def parse_layouts(text: str) -> list[ParallelLayout]:
    out = []
    for item in text.split(","):
        seq, cfg = item.lower().split("x")
        out.append(ParallelLayout(seq=int(seq), cfg=int(cfg)))
    return out


def build_transformer(cfg: dict[str, Any], device: torch.device, dtype: torch.dtype, seed: int = 0):
    """Random weights built on `device` in `dtype` (the fp32 modules from_pretrained keeps, in fp32), then
    rank 0's copy broadcast so every rank holds exactly the same model."""
    from diffusers import WanTransformer3DModel

    old = torch.get_default_dtype()
    torch.manual_seed(seed)
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = WanTransformer3DModel(**cfg)
    finally:
        torch.set_default_dtype(old)
    keep = model._keep_in_fp32_modules or []
    for name, p in model.named_parameters():
        if any(k in name.split(".") for k in keep):
            p.data = p.data.float()
    model = model.eval().requires_grad_(False)
    if dist.is_initialized():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=0)
    return model


def _inputs(cfg: dict[str, Any], shape: list[int], device: torch.device, dtype: torch.dtype, seed: int):
    g = torch.Generator("cpu").manual_seed(seed)
    x = torch.randn(shape, generator=g).to(device, dtype)
    ctx = torch.randn(1, 512, cfg["text_dim"], generator=g).to(device, dtype)
    ctx_null = torch.randn(1, 512, cfg["text_dim"], generator=g).to(device, dtype)
    return x, torch.tensor([757.0], device=device), ctx, ctx_null


def _timed(fn, device: torch.device, reps: int) -> tuple[torch.Tensor, float | None]:
    """fn()'s result and its seconds per call (None when not timed: CPU runs are correctness checks)."""
    out = fn()
    if reps <= 0:
        return out, None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if dist.is_initialized():
        dist.barrier()
    t0 = time.perf_counter()
    for _ in range(reps):
        out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, (time.perf_counter() - t0) / reps


def check_layout(layout: ParallelLayout, cfg: dict[str, Any], shape: list[int], device_type: str,
                 dtype: torch.dtype, guide: float, batched: bool, reps: int) -> dict[str, Any]:
    from ..stages.denoise import predict_noise
    from .denoise import predict_noise_parallel
    from .group import init_group
    from .ulysses import check_divisible, enable_ulysses

    group = init_group(layout, device_type)
    model = build_transformer(cfg, group.device, dtype)
    x, t, ctx, ctx_null = _inputs(cfg, shape, group.device, dtype, seed=7)
    with torch.no_grad():
        ref, s_ref = _timed(lambda: predict_noise(model, x, t, ctx, ctx_null, guide, batched), group.device, reps)
        if layout.seq > 1:
            check_divisible(model, shape, layout.seq)
            enable_ulysses(model, group)
        par, s_par = _timed(lambda: predict_noise_parallel(model, x, t, ctx, ctx_null, guide, group, batched),
                            group.device, reps)
    diff = (par.float() - ref.float()).abs().max().reshape(1)
    if device_type == "cuda":
        peak = torch.tensor([torch.cuda.max_memory_allocated(group.device) / 2**30], device=group.device)
    else:
        peak = torch.zeros(1)
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)  # the worst rank
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    scale = ref.float().abs().max().item()
    del model
    if device_type == "cuda":
        torch.cuda.empty_cache()
    return {"layout": layout.as_dict(), "latent_shape": shape, "tokens": token_count_for(cfg, shape),
            "dtype": str(dtype).replace("torch.", ""), "batched_cfg_reference": batched,
            "max_abs_diff": diff.item(), "ref_abs_max": scale, "max_rel_diff": diff.item() / max(scale, 1e-12),
            "seconds_per_step_1_process": s_ref, "seconds_per_step_parallel": s_par,
            "speedup": (s_ref / s_par) if s_ref and s_par else None, "peak_gib_per_rank": round(peak.item(), 2)}


def token_count_for(cfg: dict[str, Any], shape: list[int]) -> int:
    p_t, p_h, p_w = cfg["patch_size"]
    return (shape[2] // p_t) * (shape[3] // p_h) * (shape[4] // p_w)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.parallel.check")
    parser.add_argument("--layouts", default="2x1,1x2", help="comma-separated SEQxCFG layouts")
    parser.add_argument("--arch", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--layers", type=int, default=None, help="fewer DiT layers (quick checks)")
    parser.add_argument("--frames", type=int, default=5)
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--dtype", default="auto", help="auto: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--guide-scale", type=float, default=5.0)
    parser.add_argument("--batched-cfg", choices=("auto", "on", "off"), default="auto",
                        help="reference (and seq-only layouts) run CFG as one batch-2 forward (auto: on CUDA)")
    parser.add_argument("--reps", type=int, default=0, help="timed repetitions per prediction (0: no timing)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"auto": torch.bfloat16 if device_type == "cuda" else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    batched = device_type == "cuda" if args.batched_cfg == "auto" else args.batched_cfg == "on"
    cfg = arch_config(args.arch, args.layers)
    shape = [1, cfg["in_channels"], (args.frames - 1) // 4 + 1, args.height // 8, args.width // 8]
    results = [check_layout(layout, cfg, shape, device_type, dtype, args.guide_scale, batched, args.reps)
               for layout in parse_layouts(args.layouts)]
    if dist.get_rank() == 0:
        from ..store import atomic_write_text

        atomic_write_text(Path(args.out), json.dumps({"arch": args.arch, "layers": cfg["num_layers"],
                                                      "device": device_type, "results": results}, indent=1))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
