"""Decode cost of LightX2V's tiny VAE (`use_tae`) against the Wan VAE, through the decode stage's own
functions (`decode_latents`, `decode_latents_tae`: latents in, float frames on the CPU out), random weights.

    python -m benchmarks.bench_tae                      # CPU, the tiny model's size (17 frames 64x64)
    python -m benchmarks.bench_tae --size 480p          # GPU: 81 frames 480x832 (and 720p with --size 720p)

Decoders: the TAE (TAEHV's Wan2.1 decoder, full size: its widths are fixed) in the run's dtype (bf16 on CUDA,
as LightX2V runs it, and fp32), at several `frames_per_chunk`; the Wan2.1 VAE's architecture (diffusers'
AutoencoderKLWan defaults) in fp32; at the tiny size also the tiny model's VAE. Each time is the best of
`--reps` after one warm-up; on CUDA with the peak memory. The TAE's bf16 frames are compared with its fp32
frames (PSNR): its random weights are scaled so the frames are not clamped flat. JSON lines on stdout and in
$OUT/bench_tae.jsonl.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch

SIZES = {"tiny": (64, 64, 17), "480p": (480, 832, 81), "720p": (720, 1280, 81)}


def random_tae(device: torch.device, dtype: torch.dtype, seed: int = 0):
    from pipeline.models.tae import TinyVaeDecoder

    torch.manual_seed(seed)
    tae = TinyVaeDecoder()
    last = tae.decoder[-1]
    with torch.no_grad():  # frames around mid-grey instead of mostly clamped to 0
        last.weight.mul_(0.1)
        last.bias.fill_(0.5)
    return tae.to(device, dtype).eval()


def best_time(fn: Callable[[], Any], device: torch.device, reps: int) -> tuple[float, float | None]:
    """(best seconds of `reps` after a warm-up, peak GiB on CUDA)."""
    fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return min(times), peak


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.float() - b.float()) ** 2).mean())
    return 10 * math.log10(1.0 / mse) if mse else float("inf")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="tiny", choices=sorted(SIZES))
    p.add_argument("--device", default=None)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default=os.environ.get("OUT") or "bench-out")
    args = p.parse_args()
    from benchmarks.models import build_vae
    from pipeline.stages.decode import decode_latents, decode_latents_tae

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    h, w, frames = SIZES[args.size]
    latents = torch.randn(1, 16, (frames - 1) // 4 + 1, h // 8, w // 8, generator=torch.Generator().manual_seed(1))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def emit(**rec: Any) -> None:
        rec = {"size": args.size, "device": str(device), **rec}
        line = json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in rec.items()})
        print("BENCH " + line, flush=True)
        with open(out / "bench_tae.jsonl", "a") as f:
            f.write(line + "\n")

    dtypes = [torch.bfloat16, torch.float32] if device.type == "cuda" else [torch.float32]
    frames_out: dict[str, torch.Tensor] = {}
    for dtype in dtypes:
        tae = random_tae(device, dtype)
        for chunk in (1, 4, latents.shape[2]):
            s, peak = best_time(lambda t=tae, c=chunk: decode_latents_tae(t, latents, frames_per_chunk=c), device,
                                args.reps)
            emit(decoder="tae", dtype=str(dtype).replace("torch.", ""), frames_per_chunk=chunk, seconds=s,
                 peak_gib=peak, params_m=sum(x.numel() for x in tae.parameters()) / 1e6)
        frames_out[str(dtype)] = decode_latents_tae(tae, latents)
        del tae
    if len(frames_out) == 2:
        a, b = frames_out.values()
        emit(decoder="tae", compare="bf16 vs fp32 frames", psnr_db=psnr(a, b), max_abs=float((a - b).abs().max()))
    for kind in ("full",) + (("tiny",) if args.size == "tiny" else ()):
        vae = build_vae(kind, device)
        s, peak = best_time(lambda v=vae: decode_latents(v, latents), device, 1 if kind == "full" else args.reps)
        emit(decoder=f"wan vae ({'Wan2.1 architecture' if kind == 'full' else 'tiny model'})", dtype="float32",
             seconds=s, peak_gib=peak, params_m=sum(x.numel() for x in vae.parameters()) / 1e6)
        del vae
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
