"""GPU benchmark: our fast paths against diffusers, side by side in one process, on the full-size Wan2.2 A14B
architecture with random weights built on the GPU (nothing is downloaded).

    python -m benchmarks.run                       # everything, full size (H100: see README "Performance")
    python -m benchmarks.run --size smoke          # the same code on the tiny architecture (CPU is fine)
    python -m benchmarks.run --sections dit,batch --jobs 8 --layers 20

Sections: micro (linear kernels; attention kernels cuDNN SDPA, FA3 bf16, FA3 fp8, each with its error against
float32 attention), compile (the compile warm-up of a new process with a cold and a warm Inductor cache under
WAN_BATCH_HOME), dit (one CFG step at 480p/720p: diffusers' two bf16 SDPA forwards vs ours, each fast path added
in turn, then the step with each attention kernel, with its error against the bf16 reference), offload (the same
step with the blocks streamed under a 24 GB and an 8 GB VRAM cap, and several jobs per streamed block), vae
(decode), batch (a 4-step distilled T2V+I2V batch through the staged Luigi pipeline vs a loop over diffusers'
WanPipeline / WanImageToVideoPipeline, in videos/hour). Every measurement is a JSON line (stdout, and
$OUT/bench.jsonl); the table comes last (also $OUT/table.md). Ratios are diffusers' time over ours.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .models import build_dit, build_t5, build_vae, dit_config, install_random_loader, skeleton_models

RES = {"480p": (480, 832, 81), "720p": (720, 1280, 81), "smoke": (64, 64, 17)}


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.size = args.size
        self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.out = Path(args.out or os.environ.get("OUT") or "bench-out")
        self.out.mkdir(parents=True, exist_ok=True)
        self.records: list[dict[str, Any]] = []
        self.rows: list[list[str]] = []
        self.best_attn = "native"
        self.state: dict[str, Any] = {}

    # ---- reporting ----
    def emit(self, **rec: Any) -> dict[str, Any]:
        rec = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in rec.items()}
        self.records.append(rec)
        line = json.dumps(rec, default=str)
        print("BENCH " + line, flush=True)
        with open(self.out / "bench.jsonl", "a") as f:
            f.write(line + "\n")
        return rec

    def row(self, work: str, ours: float | None, theirs: float | None, peak_ours: float | None = None,
            peak_theirs: float | None = None, note: str = "") -> None:
        ratio = f"{theirs / ours:.2f}x" if ours and theirs else "-"
        fmt = lambda v, d=3: "-" if v is None else f"{v:.{d}g}"  # noqa: E731
        self.rows.append([work, fmt(ours), fmt(theirs), ratio, fmt(peak_ours, 1), fmt(peak_theirs, 1), note])

    # ---- timing helpers ----
    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gb(self) -> float | None:
        return torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None

    def time(self, fn: Callable[[], Any], reps: int = 1, warmup: int = 0) -> tuple[float, float | None, Any]:
        """(median seconds of `reps` timed calls, seconds of the first warm-up call or None, last result)."""
        first = None
        out = None
        for i in range(warmup):
            self.sync()
            t0 = time.perf_counter()
            out = fn()
            self.sync()
            if i == 0:
                first = time.perf_counter() - t0
        times = []
        for _ in range(reps):
            self.sync()
            t0 = time.perf_counter()
            out = fn()
            self.sync()
            times.append(time.perf_counter() - t0)
        times.sort()
        return times[len(times) // 2], first, out

    def latent_shape(self, res: str) -> tuple[int, ...]:
        h, w, f = RES[res]
        return (1, 16, (f - 1) // 4 + 1, h // 8, w // 8)

    def tokens(self, res: str) -> int:
        _, _, t, h, w = self.latent_shape(res)
        return t * (h // 2) * (w // 2)

    def resolutions(self) -> list[str]:
        return ["smoke"] if self.size == "smoke" else [r for r in ("480p", "720p") if r in self.args.res]


# ---- micro: kernels alone -------------------------------------------------------------------------------------

def section_micro(b: Bench) -> None:
    if b.device.type != "cuda":
        b.emit(section="micro", skipped="needs CUDA")
        return
    from pipeline.fast.fp8_matmul import FP8, QuantLinear, probe

    b.emit(section="micro", kernels=probe(b.device))
    m = b.tokens("480p")
    for k, n in ((5120, 5120), (5120, 13824), (13824, 5120)):
        x = torch.randn(m, k, device=b.device, dtype=torch.bfloat16)
        lin = torch.nn.Linear(k, n, device=b.device, dtype=torch.bfloat16)
        flops = 2 * m * k * n
        res = {}
        for name, mod in (("bf16", lin), ("fp8", QuantLinear.from_linear(lin, FP8)),
                          ("int8", QuantLinear.from_linear(lin, torch.int8))):
            s, _, _ = b.time(lambda mod=mod: mod(x), reps=10, warmup=3)
            res[name] = s
            b.emit(section="micro", op="linear", shape=[m, k, n], kind=name, ms=s * 1e3, tflops=flops / s / 1e12)
        b.row(f"linear {m}x{k}->{n} (fp8 vs bf16)", res["fp8"], res["bf16"], note=f"int8 {res['int8']*1e3:.2f} ms")
    heads, dim = 40, 128
    for res_name in ("480p", "720p"):
        _attention_kernels(b, res_name, heads, dim)


ATTN_KERNELS = ("native", "_native_cudnn", "_native_flash", "fa3", "fa3_fp8")


def _attn_inputs(b: Bench, s_len: int, heads: int, dim: int, seed: int):
    """q, k, v [1, S, H, D] bf16 with what DiT attention inputs have and plain randn lacks: a shared per-channel
    offset in K (after QK-norm) and a few large channels, so K smoothing and the fp8 scales are exercised."""
    g = torch.Generator(b.device).manual_seed(seed)
    shape = (1, s_len, heads, dim)
    chan = 1 + 3 * (torch.rand(1, 1, heads, dim, device=b.device, generator=g) > 0.95)  # outlier channels
    q = torch.randn(shape, device=b.device, generator=g) * chan
    k = torch.randn(shape, device=b.device, generator=g) * chan + 2 * torch.randn(1, 1, heads, dim, device=b.device,
                                                                                 generator=g)
    v = torch.randn(shape, device=b.device, generator=g) + 0.5 * torch.randn(1, 1, heads, dim, device=b.device,
                                                                              generator=g)
    return [t.to(torch.bfloat16) for t in (q, k, v)]


def _attention_kernels(b: Bench, res_name: str, heads: int, dim: int) -> None:
    """Each self-attention kernel on one layer's shape: time, TFLOP/s, and its error against float32 attention
    (the memory-efficient kernel on float32 inputs) on the same inputs."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    from pipeline.fast.attention import resolve_backend

    s_len = b.tokens(res_name)
    q, k_, v = _attn_inputs(b, s_len, heads, dim, seed=11)
    flops = 4 * s_len * s_len * heads * dim
    ref = None
    if res_name == "480p":
        ref = dispatch_attention_fn(q.float(), k_.float(), v.float(), backend="_native_efficient").float()
    times, errs = {}, {}
    for backend in ATTN_KERNELS:
        choice = resolve_backend(backend, b.device)
        if choice.reason:
            b.emit(section="micro", op="attention", backend=backend, skipped=choice.reason)
            continue
        name = choice.diffusers_name
        try:
            s, _, out = b.time(lambda bk=name: dispatch_attention_fn(q, k_, v, backend=bk),
                               reps=5 if res_name == "480p" else 2, warmup=2)
        except RuntimeError as e:
            b.emit(section="micro", op="attention", backend=backend, error=str(e).splitlines()[0])
            continue
        times[backend] = s
        rec = {"section": "micro", "op": "attention", "res": res_name, "backend": backend, "ms": s * 1e3,
               "tflops": flops / s / 1e12}
        if ref is not None:
            errs[backend] = _compare(ref, out)
            rec.update(cos=errs[backend]["pred_cos"], rel_l2=errs[backend]["pred_rel_l2"])
        b.emit(**rec)
    if res_name == "480p":  # the quantization alone (fp8 without K/V smoothing, for the record)
        for smooth in (False, True):
            emu = _fp8_emulated(q, k_, v, smooth)
            b.emit(section="micro", op="attention fp8 emulated (float32 attention of e4m3-rounded inputs)",
                   smoothing=smooth, cos=_compare(ref, emu)["pred_cos"], rel_l2=_compare(ref, emu)["pred_rel_l2"])
    exact = [k for k in times if k != "fa3_fp8"]
    if res_name == "480p" and exact:
        b.best_attn = min(exact, key=times.get)
    base = times.get("_native_cudnn") or times.get("native")
    for backend in ("_native_cudnn", "fa3", "fa3_fp8"):
        if backend in times:
            err = errs.get(backend)
            b.row(f"self-attention 1 layer {res_name}: {backend}", times[backend], base,
                  note=(f"cos {err['pred_cos']:.6f}, rel L2 {err['pred_rel_l2']:.2e} vs fp32; " if err else "")
                  + f"{flops / times[backend] / 1e12:.0f} TFLOP/s; ratio vs cuDNN")
    del q, k_, v, ref


def _fp8_emulated(q, k, v, smooth: bool) -> torch.Tensor:
    """float32 attention of the e4m3-rounded inputs, in query chunks (the full score matrix would not fit)."""
    from pipeline.fast import fa3

    if smooth:
        (q8, k8, v8, qs, ks, vs), v_mean = fa3.smooth_and_quantize(q, k, v)
    else:
        (q8, qs), (k8, ks), (v8, vs) = (fa3.quantize_per_head(t.float()) for t in (q, k, v))
        v_mean = None
    deq = lambda t, s: (t.float() * s[:, None, :, None]).transpose(1, 2)  # noqa: E731
    qd, kd, vd = deq(q8, qs), deq(k8, ks), deq(v8, vs)
    out = torch.nn.functional.scaled_dot_product_attention(qd, kd, vd).transpose(1, 2)
    return out if v_mean is None else out + v_mean


# ---- dit: one denoising step ---------------------------------------------------------------------------------

def _inputs(b: Bench, res: str, seed: int = 7):
    g = torch.Generator("cpu").manual_seed(seed)
    x = torch.randn(b.latent_shape(res), generator=g).to(b.device)
    text_len = 512
    text_dim = 4096 if b.size == "full" else 32
    ctx = (torch.randn(1, text_len, text_dim, generator=g) * 0.1).to(b.device, b.dtype)
    ctx_null = (torch.randn(1, text_len, text_dim, generator=g) * 0.1).to(b.device, b.dtype)
    t = torch.tensor([900.0], device=b.device)
    return x, t, ctx, ctx_null


def _compare(ref: torch.Tensor, out: torch.Tensor) -> dict[str, float]:
    """Error of a noise prediction and of the latents after one Euler step (sigma 0.9 -> 0.8)."""
    r, o = ref.float(), out.float()
    cos = F.cosine_similarity(r.flatten(), o.flatten(), dim=0).item()
    x = torch.zeros_like(r)  # the latents term is common to both and cancels in the difference
    step_r, step_o = x - 0.1 * r, x - 0.1 * o
    return {"pred_max_abs": (r - o).abs().max().item(), "pred_cos": cos,
            "latent_step_max_abs": (step_r - step_o).abs().max().item(),
            "pred_rel_l2": ((r - o).norm() / r.norm()).item()}


def section_dit(b: Bench) -> None:
    from pipeline.fast.accel import compile_blocks
    from pipeline.fast.attention import apply_attention
    from pipeline.fast.fp8_matmul import FP8, quantize_blocks
    from pipeline.stages.denoise import predict_noise

    full = b.size == "full"
    cfg = dit_config(b.size, "t2v", b.args.layers)
    t0 = time.perf_counter()
    model = build_dit(cfg, b.device, b.dtype)
    b.emit(section="dit", built_s=time.perf_counter() - t0, layers=cfg["num_layers"],
           params_b=sum(p.numel() for p in model.parameters()) / 1e9)
    g = 5.0
    base: dict[str, dict[str, Any]] = {}
    for res in b.resolutions():
        x, t, ctx, ctx_null = _inputs(b, res)
        xin = x.to(b.dtype)
        b.reset_peak()
        if res == "720p":  # one forward: 12 s each on an H100
            s, _, _ = b.time(lambda: model(xin, t, ctx, return_dict=False)[0], reps=1, warmup=0)
            s_step, pred = 2 * s, None
        else:
            s_step, _, pred = b.time(lambda: predict_noise(model, xin, t, ctx, ctx_null, g), reps=b.args.reps,
                                     warmup=1)
        base[res] = {"step_s": s_step, "peak": b.peak_gb(), "pred": None if pred is None else pred.float()}
        b.emit(section="dit", res=res, path="diffusers bf16 SDPA, 2 forwards", step_s=s_step,
               forward_s=s_step / 2, peak_gb=base[res]["peak"], tokens=b.tokens(res))
    res0 = b.resolutions()[0]
    x, t, ctx, ctx_null = _inputs(b, res0)
    xin = x.to(b.dtype)
    ref = base[res0]["pred"]

    def ours_step(label: str, warmup: int = 1, reps: int = 1, res: str = res0):
        xx, tt, cc, cn = (x, t, ctx, ctx_null) if res == res0 else _inputs(b, res)
        b.reset_peak()
        s, first, pred = b.time(lambda: predict_noise(model, xx.to(b.dtype), tt, cc, cn, g, batched_cfg=True),
                                reps=reps, warmup=warmup)
        rec = {"section": "dit", "res": res, "path": label, "step_s": s, "forward_s": s / 2,
               "warmup_s": first, "peak_gb": b.peak_gb(), "speedup": base[res]["step_s"] / s}
        if res == res0 and ref is not None:
            rec.update(_compare(ref, pred))
        b.emit(**rec)
        return s, rec

    apply_attention(model, b.best_attn, b.best_attn, b.device)
    s_bf16, rec_bf16 = ours_step(f"ours bf16, {b.best_attn}, batched CFG")
    b.state["unconstrained_step_s"] = s_bf16
    if b.device.type == "cuda" and not apply_attention(model, "fa3_fp8", b.best_attn, b.device)["self"]["reason"]:
        # fp8 attention's own error, bf16 weights (with fp8 linears below, theirs dominates the step's error)
        s_a, rec_a = ours_step("ours bf16, self-attention fa3_fp8, batched CFG")
        b.row(f"DiT CFG step {res0}, bf16 weights (eager): {b.best_attn} -> fa3_fp8 self-attention", s_a, s_bf16,
              note=f"cos {rec_a.get('pred_cos', 1):.5f} / rel L2 {rec_a.get('pred_rel_l2', 0):.4f} vs diffusers bf16 "
                   f"({b.best_attn}: cos {rec_bf16.get('pred_cos', 1):.5f} / {rec_bf16.get('pred_rel_l2', 0):.4f}); "
                   f"ratio vs {b.best_attn}")
        apply_attention(model, b.best_attn, b.best_attn, b.device)
    if "offload" in b.args.sections and b.device.type == "cuda":
        try:
            section_offload(b, model, (x, t, ctx, ctx_null), ref, base[res0]["step_s"])
        except Exception as e:  # noqa: BLE001 - report and go on with the other measurements
            b.emit(section="offload", error=f"{type(e).__name__}: {e}", trace=traceback.format_exc()[-2000:])
            torch.cuda.set_per_process_memory_fraction(1.0, _index(b))
            model.to(b.device)
    if b.args.no_fast:
        del model
        b.reset_peak()
        return
    if b.device.type == "cuda":
        quantize_blocks(model, FP8)
        gc.collect()
        torch.cuda.empty_cache()
        ours_step("ours fp8 (eager), batched CFG")
        report = compile_blocks(model)
        b.emit(section="dit", compile=report)
    s_fast, rec = ours_step(f"ours fp8 + compile, {b.best_attn}, batched CFG", warmup=1, reps=b.args.reps)
    b.row(f"DiT CFG step {res0} (2 forwards), fp8 linears + compile + {b.best_attn}", s_fast, base[res0]["step_s"],
          rec["peak_gb"], base[res0]["peak"],
          note=f"compile warm-up {rec['warmup_s'] or 0:.0f} s; cos {rec.get('pred_cos', 1):.5f} / rel L2 "
               f"{rec.get('pred_rel_l2', 0):.4f} vs bf16")
    attn_variants = [a for a in ("_native_cudnn", "fa3", "fa3_fp8") if a != b.best_attn]
    for attn in attn_variants if b.device.type == "cuda" else []:
        rep = apply_attention(model, attn, b.best_attn, b.device)
        if rep["self"]["reason"]:
            b.emit(section="dit", attention=attn, skipped=rep["self"]["reason"])
            continue
        for res in b.resolutions():
            s_a, rec_a = ours_step(f"ours fp8 + compile, self-attention {attn}", warmup=1,
                                   reps=b.args.reps if res == res0 else 1, res=res)
            err = (f"cos {rec_a['pred_cos']:.5f} / rel L2 {rec_a['pred_rel_l2']:.4f} vs bf16; "
                   if "pred_cos" in rec_a else "")
            b.row(f"DiT CFG step {res} (2 forwards), fp8 linears + compile + {attn}", s_a, base[res]["step_s"],
                  rec_a["peak_gb"], base[res]["peak"], note=err + f"recompile {rec_a['warmup_s'] or 0:.0f} s")
    apply_attention(model, b.best_attn, b.best_attn, b.device)
    if full and b.device.type == "cuda" and b.args.profile:
        try:
            _profile(b, lambda: predict_noise(model, xin, t, ctx, ctx_null, g, batched_cfg=True), f"dit_{res0}")
        except Exception as e:  # noqa: BLE001 - the profile is evidence, not a result
            b.emit(section="profile", error=f"{type(e).__name__}: {e}")
    for res in b.resolutions()[1:]:
        s, rec = ours_step("ours fp8 + compile, batched CFG", warmup=1, reps=1, res=res)
        b.row(f"DiT CFG step {res} (2 forwards)", s, base[res]["step_s"], rec["peak_gb"], base[res]["peak"],
              note=f"recompile {rec['warmup_s'] or 0:.0f} s; diffusers timed on 1 forward x2")
    del model
    if b.device.type == "cuda":
        from torch import _dynamo

        _dynamo.reset()  # compiled code can hold the model; Inductor's on-disk cache keeps the kernels
    b.reset_peak()


def _profile(b: Bench, fn: Callable[[], Any], name: str) -> None:
    """Top CUDA kernels of one call, by total time: which kernel dominates."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        b.sync()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA" or getattr(e, "self_device_time_total", 0)]
    key = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    events.sort(key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in events) or 1
    top = [{"kernel": e.key[:90], "share": getattr(e, key) / total, "ms": getattr(e, key) / 1e3, "calls": e.count}
           for e in events[:12]]
    b.emit(section="profile", name=name, total_ms=total / 1e3, top=top)
    (b.out / f"profile_{name}.txt").write_text(prof.key_averages().table(sort_by=key, row_limit=30))


def _index(b: Bench) -> int:
    return b.device.index if b.device.index is not None else torch.cuda.current_device()


# ---- offload: streamed blocks under a VRAM cap ----------------------------------------------------------------

def section_offload(b: Bench, model, inputs, ref, base_step_s: float) -> None:
    x, t, ctx, ctx_null = inputs
    xin = x.to(b.dtype)
    total = torch.cuda.get_device_properties(b.device).total_memory
    unconstrained = b.state["unconstrained_step_s"]
    for budget_gb, gran, batched, reserve_gb in ((24, "block", True, 12.0), (8, "phase", False, 4.5)):
        try:
            _offload_one(b, model, xin, t, ctx, ctx_null, ref, total, budget_gb, gran, batched, reserve_gb,
                         unconstrained if batched else base_step_s)
        except Exception as e:  # noqa: BLE001 - the next budget still runs
            b.emit(section="offload", budget_gb=budget_gb, error=f"{type(e).__name__}: {str(e)[:300]}")


def _offload_one(b: Bench, model, xin, t, ctx, ctx_null, ref, total: int, budget_gb: int, gran: str,
                 batched: bool, reserve_gb: float, ref_s: float) -> None:
    from pipeline.fast.offload import BlockStreamer, plan_resident_units
    from pipeline.stages.denoise import predict_noise

    t0 = time.perf_counter()
    budget = int(budget_gb * 2**30)
    resident = plan_resident_units(model, gran, budget, int(reserve_gb * 2**30))
    streamer = BlockStreamer(model, b.device, gran, resident_units=resident)
    gc.collect()
    torch.cuda.empty_cache()
    setup = time.perf_counter() - t0
    torch.cuda.reset_peak_memory_stats(b.device)
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), _index(b))
    try:
        s, _, pred = b.time(lambda: predict_noise(model, xin, t, ctx, ctx_null, 5.0, batched_cfg=batched),
                            reps=1, warmup=1)
        peak = b.peak_gb()
        rec = b.emit(section="offload", budget_gb=budget_gb, granularity=gran, batched_cfg=batched,
                     resident_units=resident, streamed_units=len(streamer.streamed), step_s=s, peak_gb=peak,
                     setup_s=setup, vs_unconstrained=s / ref_s,
                     gb_streamed_per_step=streamer.bytes_streamed / 2**30 / 2,
                     **(_compare(ref, pred) if ref is not None else {}))
        b.row(f"CFG step 480p, {budget_gb} GB cap ({gran} streaming, bf16)", s, ref_s, peak, None,
              note=f"ratio = unconstrained/capped; {rec['streamed_units']} units streamed")
        if budget_gb == 8:  # block-major across jobs: one fetched unit serves every job of the batch
            torch.cuda.set_per_process_memory_fraction(1.0, _index(b))  # the cap was for batch 1
            for jobs in (1, 2):
                streamer.bytes_streamed = 0
                xs = xin.expand(jobs, *xin.shape[1:]).contiguous()
                s_j, _, _ = b.time(lambda: model(xs, t.expand(jobs), ctx.expand(jobs, -1, -1),
                                                 return_dict=False)[0], reps=1)
                b.emit(section="offload", budget_gb=budget_gb, block_major_jobs=jobs, forward_s=s_j,
                       s_per_job=s_j / jobs, gb_streamed_per_job=streamer.bytes_streamed / 2**30 / jobs,
                       peak_gb=b.peak_gb())
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, _index(b))
        streamer.remove()
        model.to(b.device)  # streamed units' pinned copies -> GPU again
        del streamer
        gc.collect()
        torch.cuda.empty_cache()


# ---- vae decode ------------------------------------------------------------------------------------------------

def section_vae(b: Bench) -> None:
    from pipeline.stages.decode import decode_latents

    vae = build_vae(b.size, b.device)
    res = b.resolutions()[0]
    lat = torch.randn(b.latent_shape(res)).to(b.device)

    def theirs():  # what WanPipeline does after the denoising loop
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(b.device)
        std = 1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(b.device)
        return vae.decode(lat / std + mean, return_dict=False)[0]

    with torch.no_grad():
        b.reset_peak()
        s_t, _, _ = b.time(theirs, reps=1, warmup=1)
        p_t = b.peak_gb()
        b.reset_peak()
        s_o, _, _ = b.time(lambda: decode_latents(vae, lat), reps=1, warmup=0)
        p_o = b.peak_gb()
    b.emit(section="vae", res=res, ours_s=s_o, diffusers_s=s_t, peak_ours=p_o, peak_diffusers=p_t)
    b.row(f"VAE decode {res} {RES[res][2]} frames", s_o, s_t, p_o, p_t, note="same diffusers VAE; ours also copies frames to CPU")
    del vae
    b.reset_peak()


# ---- batch: staged Luigi pipeline vs a diffusers loop ------------------------------------------------------------

def _make_jobs(b: Bench, root: Path) -> tuple[Path, list[dict[str, Any]]]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image, ImageDraw

    h, w, _ = RES[b.resolutions()[0]]
    img = Image.new("RGB", (w, h), (30, 60, 150))
    ImageDraw.Draw(img).ellipse((w // 4, h // 4, w // 2, h // 2), fill=(220, 40, 40))
    img_path = root / "first_frame.png"
    img.save(img_path)
    prompts = ["a red circle moving left", "a cat walking on a beach at sunset", "a city street at night",
               "a blue square flying over mountains"]
    rows = []
    for i in range(b.args.jobs):
        row = {"job_id": f"job{i:02d}", "prompt": prompts[i % len(prompts)] + f" {i}", "seed": 100 + i}
        row["image"] = str(img_path) if i % 2 else None
        rows.append(row)
    manifest = root / "jobs.parquet"
    pq.write_table(pa.Table.from_pylist(rows), manifest)
    return manifest, rows


class GpuIdle:
    """The share of a stretch of wall time with no GPU kernel running: NVML's utilization (the percent of its
    last sample period in which a kernel was executing) polled every 50 ms; a poll reading 0 counts as idle.
    None when NVML cannot be read (no pynvml / nvidia-ml-py)."""

    def __init__(self, device):
        self.device, self.samples, self._stop = device, [], threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.wait(0.05):
            try:
                self.samples.append(torch.cuda.utilization(self.device))
            except Exception:  # noqa: BLE001 - NVML missing: no figure, not a failed benchmark
                return

    def __enter__(self) -> "GpuIdle":
        if self.device.type == "cuda":
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    @property
    def share(self) -> float | None:
        return sum(u == 0 for u in self.samples) / len(self.samples) if self.samples else None


def section_batch(b: Bench) -> None:
    import pyarrow.parquet as pq

    from tasks.build import run_batch
    from pipeline.runtime import MODELS

    import shutil

    from pipeline.fast.accel import compile_cache_dir

    root = Path(b.args.work) if b.args.work else b.out.parent / "bench-work"
    root.mkdir(parents=True, exist_ok=True)
    for old in ("store", "outputs", "diffusers-out"):  # a second invocation measures a whole batch again
        shutil.rmtree(root / old, ignore_errors=True)
    cache_dir = compile_cache_dir()
    warm = cache_dir.is_dir() and any(p.is_file() for p in cache_dir.rglob("*"))
    folders = skeleton_models(root / "models", b.size, b.args.layers)
    manifest, rows = _make_jobs(b, root)
    h, w, f = RES[b.resolutions()[0]]
    config = {"model_path": str(folders["t2v"]), "i2v_model_path": str(folders["i2v"]), "task": "t2v",
              "target_height": h, "target_width": w, "target_video_length": f, "infer_steps": 4,
              "denoising_step_list": [1000, 750, 500, 250], "boundary_step_index": 2, "sample_shift": 5.0,
              "enable_cfg": False, "fps": 16, "torch_compile": b.device.type == "cuda",
              # bf16 VAE decode on the GPU (54.7 dB PSNR against fp32 on the tiny model: docs/performance.md)
              **({"vae_dtype": "bf16"} if b.device.type == "cuda" else {})}
    if "micro" in b.args.sections:  # the kernel the micro section measured fastest; else the product's default
        config.update(self_attn_1_type=b.best_attn, cross_attn_1_type=b.best_attn)
    cfg_path = root / "config.json"
    cfg_path.write_text(json.dumps(config, indent=1))
    n = len(rows)
    # diffusers first: both experts + T5 + VAE resident (about 67 GB at full size), as its pipelines need
    theirs_rows = _spread(rows, b.args.diffusers_jobs) if b.args.diffusers_jobs else rows
    # its seconds for the whole batch at the rate it ran (the same jobs' kinds, in proportion)
    s_theirs = (_diffusers_loop(b, folders, theirs_rows, (h, w, f), root) * len(rows) / len(theirs_rows)
                if not b.args.skip_diffusers else None)
    gc.collect()
    if b.device.type == "cuda":
        torch.cuda.empty_cache()
    undo = install_random_loader(b.size, "fp8" if b.device.type == "cuda" else None)
    MODELS.clear()
    try:
        b.reset_peak()
        t0 = time.perf_counter()
        with GpuIdle(b.device) as idle:
            ok = run_batch(str(manifest), config=str(cfg_path), output_dir=str(root / "outputs"),
                           store=str(root / "store"), strict=False)
        wall = time.perf_counter() - t0
        loads = sum(MODELS.load_seconds.values())
        load_counts = {f"{k[0]}:{k[1]}": v for k, v in MODELS.loads.items()}
        perf = [getattr(m[0], "wan_batch_perf", None) for m in MODELS._models.values()]
        b.emit(section="batch", resident_perf_settings=[p for p in perf if p])
    finally:
        undo()
        MODELS.clear()
    results = pq.read_table(root / "outputs" / "results.parquet").to_pylist()
    done = sum(r["status"] == "ok" for r in results)
    s_ours = wall - loads
    stage_s = {k: sum((r.get(f"seconds_{k}") or 0) for r in results)
               for k in ("text", "image", "denoise-high", "denoise-low", "decode")}
    b.emit(section="batch", pipeline="ours (Luigi, fp8 + compile, one expert resident)", jobs=n, ok=done,
           all_ok=ok, wall_s=wall, model_build_s=loads, batch_s=s_ours, videos_per_hour=3600 * n / s_ours,
           loads=load_counts, peak_gb=b.peak_gb(), stage_s=stage_s, gpu_idle_share=idle.share,
           gpu_idle_samples=len(idle.samples), compile_cache_warm_at_start=warm,
           errors=[r["error"] for r in results if r["error"]][:3])
    if s_theirs and done == n:
        b.emit(section="batch", ratio_videos_per_hour=s_theirs / s_ours)
    elif done < n:
        b.emit(section="batch", error=f"only {done} of {n} videos were made: the timing is not comparable")
    b.row(f"4-step batch, {n} jobs {h}p (s; videos/h ours {3600 * n / s_ours:.0f}"
          + (f", diffusers {3600 * n / s_theirs:.0f})" if s_theirs else ")"), s_ours, s_theirs, b.peak_gb(),
          b.state.get("diffusers_batch_peak"), note=f"{done}/{n} MP4s; model builds excluded ({loads:.0f} s); "
          + ("compile cache warm at start; " if warm else "compile cache cold at start; ")
          + (f"diffusers timed on {len(theirs_rows)} of the jobs; " if s_theirs and len(theirs_rows) < n else "")
          + "GPU idle "
          + (f"{100 * idle.share:.0f}% of the wall time" if idle.share is not None else "not measured (no NVML)"))


def _spread(rows: list[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    """The first `k` rows keeping the batch's mix of T2V and I2V jobs (half each, as _make_jobs alternates)."""
    return rows[:max(2, min(k, len(rows)))]


def _diffusers_loop(b: Bench, folders: dict[str, Path], rows: list[dict[str, Any]], hwf, root: Path) -> float:
    """A plain loop over diffusers' pipelines on the same jobs (bf16, its default attention), MP4s written with
    the same H.264 writer ours uses. Returns the seconds spent in the pipelines and the writing (builds excluded)."""
    from diffusers import UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline

    from pipeline.stages.decode import to_uint8, write_mp4
    from PIL import Image
    from transformers import AutoTokenizer

    h, w, f = hwf
    tok = AutoTokenizer.from_pretrained(folders["t2v"] / "tokenizer")
    t5 = build_t5(b.size, b.device, b.dtype, len(tok), seed=2)
    vae = build_vae(b.size, b.device, seed=1)
    out = root / "diffusers-out"
    out.mkdir(parents=True, exist_ok=True)
    spent, build = 0.0, 0.0
    b.reset_peak()
    for task, cls, boundary in (("t2v", WanPipeline, 0.875), ("i2v", WanImageToVideoPipeline, 0.9)):
        jobs = [r for r in rows if bool(r["image"]) == (task == "i2v")]
        if not jobs:
            continue
        t0 = time.perf_counter()
        cfg = dit_config(b.size, task, b.args.layers)
        high, low = build_dit(cfg, b.device, b.dtype, 0), build_dit(cfg, b.device, b.dtype, 10)
        sched = UniPCMultistepScheduler.from_pretrained(folders[task] / "scheduler")
        kwargs = dict(tokenizer=tok, text_encoder=t5, vae=vae, scheduler=sched, transformer=high, transformer_2=low,
                      boundary_ratio=boundary)
        pipe = cls(**kwargs, **({"image_encoder": None, "image_processor": None} if task == "i2v" else {}))
        build += time.perf_counter() - t0
        for r in jobs:
            b.sync()
            t0 = time.perf_counter()
            extra = {"image": Image.open(r["image"]).convert("RGB")} if task == "i2v" else {}
            video = pipe(prompt=r["prompt"], height=h, width=w, num_frames=f, num_inference_steps=4,
                         guidance_scale=1.0, guidance_scale_2=1.0,
                         generator=torch.Generator("cpu").manual_seed(r["seed"]), output_type="np", **extra).frames[0]
            write_mp4(to_uint8(torch.from_numpy(video)), 16, out / f"{r['job_id']}.mp4")
            b.sync()
            spent += time.perf_counter() - t0
        del pipe, high, low, kwargs
        gc.collect()
        if b.device.type == "cuda":
            torch.cuda.empty_cache()
    b.state["diffusers_batch_peak"] = b.peak_gb()
    b.emit(section="batch", pipeline="diffusers WanPipeline loop (bf16, SDPA)", jobs=len(rows), batch_s=spent,
           model_build_s=build, videos_per_hour=3600 * len(rows) / spent, peak_gb=b.peak_gb())
    del t5, vae
    return spent


# ---- caching: a 40-step CFG run with LightX2V's feature_caching ------------------------------------------------

# LightX2V's published 480p caching settings (configs/caching/magcache/wan_i2v_mag_480p.json and
# configs/caching/teacache/wan_i2v_tea_480p.json): the ratio tables and coefficients are theirs, calibrated on
# Wan2.1 I2V 14B; MagCache's decisions follow the table alone, TeaCache's also the modulation of each step.
MAG_480P = {"feature_caching": "Mag", "magcache_calibration": False, "magcache_K": 6, "magcache_thresh": 0.24,
            "magcache_retention_ratio": 0.2, "magcache_ratios": [
                [1.0, 0.98783, 0.97559, 0.98311, 0.98202, 0.9888, 0.98762, 0.98957, 0.99052, 0.99383, 0.98857,
                 0.99065, 0.98845, 0.99057, 0.98957, 0.98601, 0.98823, 0.98756, 0.98808, 0.98721, 0.98571, 0.98543,
                 0.98157, 0.98411, 0.97952, 0.98149, 0.9774, 0.97825, 0.97355, 0.97085, 0.97056, 0.96588, 0.96113,
                 0.9567, 0.94961, 0.93973, 0.93217, 0.91878, 0.90955, 0.92617],
                [1.0, 0.98993, 0.97593, 0.98319, 0.98225, 0.98878, 0.98759, 0.98971, 0.99043, 0.99384, 0.9886,
                 0.99068, 0.98847, 0.99057, 0.98961, 0.9861, 0.98823, 0.98759, 0.98814, 0.98724, 0.98572, 0.98544,
                 0.98165, 0.98413, 0.97953, 0.9815, 0.97742, 0.97826, 0.97361, 0.97087, 0.97055, 0.96587, 0.96124,
                 0.95681, 0.94969, 0.93988, 0.93224, 0.91896, 0.90954, 0.92616]]}
TEA_480P = {"feature_caching": "Tea", "use_ret_steps": True, "teacache_thresh": 0.26, "coefficients": [
    [2.57151496e05, -3.54229917e04, 1.40286849e03, -1.35890334e01, 1.32517977e-01],
    [-3.02331670e02, 2.23948934e02, -5.25463970e01, 5.87348440e00, -2.01973289e-01]]}


def section_caching(b: Bench) -> None:
    """A `--cache-steps`-step CFG run (guide 5, shift 5, UniPC) with one expert: diffusers' bf16 step time x the
    step count (its loop does nothing else per step), against ours (fp8 linears + compile + the default
    attention) run uncached, with MagCache and with TeaCache; the final latents of each cached run are compared
    with our uncached run's."""
    from diffusers import UniPCMultistepScheduler

    from pipeline.fast.accel import compile_blocks
    from pipeline.fast.attention import apply_attention
    from pipeline.fast.fp8_matmul import FP8, quantize_blocks
    from pipeline.fast.step_cache import StepCache, cache_params
    from pipeline.stages.denoise import denoise_steps, predict_noise

    n = b.args.cache_steps
    res = b.resolutions()[0]
    model = build_dit(dit_config(b.size, "t2v", b.args.layers), b.device, b.dtype)
    x, t, ctx, ctx_null = _inputs(b, res)
    s_theirs_step, _, _ = b.time(lambda: predict_noise(model, x.to(b.dtype), t, ctx, ctx_null, 5.0), warmup=1)
    s_theirs = n * s_theirs_step
    b.emit(section="caching", path="diffusers bf16 SDPA, 2 forwards a step", step_s=s_theirs_step,
           steps=n, run_s=s_theirs)
    attention = apply_attention(model, None, None, b.device)["self"]["backend"]
    if b.device.type == "cuda":
        quantize_blocks(model, FP8)
        compile_blocks(model)
        b.time(lambda: predict_noise(model, x.to(b.dtype), t, ctx, ctx_null, 5.0, batched_cfg=True), warmup=1)

    def run(values: dict[str, Any] | None):
        sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        num_train_timesteps=1000, flow_shift=5.0)
        sched.set_timesteps(n)
        cache = StepCache(cache_params(values, n), 0) if values else None
        predict = cache.predict(predict_noise) if cache else None
        with cache.install(model) if cache else contextlib.nullcontext():
            b.sync()
            t0 = time.perf_counter()
            out = denoise_steps(model, sched, x.clone(), range(n), ctx, ctx_null, 5.0, batched_cfg=True,
                                predict=predict)
            b.sync()
        return time.perf_counter() - t0, out.float(), cache.report() if cache else None

    s_plain, ref, _ = run(None)
    b.emit(section="caching", path=f"ours uncached ({attention})", steps=n, run_s=s_plain,
           speedup=s_theirs / s_plain)
    b.row(f"{n}-step CFG run {res}, ours uncached ({attention}) vs diffusers' step x {n}", s_plain, s_theirs,
          note="one expert over every step")
    for name, values in (("Mag", MAG_480P), ("Tea", TEA_480P)):
        s_c, out, rep = run(values)
        err = _compare(ref, out)
        b.emit(section="caching", path=f"ours {name} ({attention})", steps=n, run_s=s_c, speedup=s_theirs / s_c,
               forwards=rep["forwards"], forwards_skipped=rep["forwards_skipped"],
               block_stack_runs=rep["block_stack_runs"], latents_cos_vs_uncached=err["pred_cos"],
               latents_rel_l2_vs_uncached=err["pred_rel_l2"])
        b.row(f"{n}-step CFG run {res}, feature_caching {name} (LightX2V's 480p settings)", s_c, s_theirs,
              note=f"{rep['forwards_skipped']}/{rep['forwards']} branch forwards skipped; final latents cos "
                   f"{err['pred_cos']:.4f} / rel L2 {err['pred_rel_l2']:.3f} vs ours uncached")
    del model
    if b.device.type == "cuda":
        from torch import _dynamo

        _dynamo.reset()
    b.reset_peak()


# ---- compile: warm-up in a fresh process, with a cold and a warm on-disk cache -----------------------------------

def section_compile(b: Bench) -> None:
    """The compile warm-up of the first CFG step in a new process: once with an empty WAN_BATCH_HOME (cold), then
    again in a second process on the same home (Inductor's caches there: accel.use_compile_cache)."""
    import subprocess
    import tempfile

    if b.device.type != "cuda":
        b.emit(section="compile", skipped="needs CUDA")
        return
    layers = min(b.args.layers or 40, 4)  # one graph serves every block: the warm-up does not grow with depth
    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "WAN_BATCH_HOME": home}
        for var in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
            env.pop(var, None)
        runs = []
        for attempt in ("cold", "warm"):
            cmd = [sys.executable, "-m", "benchmarks.run", "--sections", "compile_child", "--size", b.size,
                   "--layers", str(layers), "--res", b.resolutions()[0], "--out", str(Path(home) / f"bench_{attempt}")]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=480)
            wall = time.perf_counter() - t0
            rec = next((json.loads(line[6:]) for line in proc.stdout.splitlines()
                        if line.startswith("BENCH ") and '"compile_child"' in line and "warmup_s" in line), None)
            if rec is None:
                b.emit(section="compile", attempt=attempt, error=(proc.stderr or proc.stdout)[-1500:])
                return
            runs.append(rec)
            b.emit(section="compile", attempt=attempt, process_wall_s=wall, **{k: rec[k] for k in
                   ("warmup_s", "step_s", "attention", "cache")})
    cold, warm = runs
    b.row(f"compile warm-up, first CFG step {b.resolutions()[0]} ({layers} layers; new process)", warm["warmup_s"],
          cold["warmup_s"], note="ours = second process (caches under WAN_BATCH_HOME), diffusers column = cold "
                                 f"first process; steady step {cold['step_s']:.2f} s")


def section_compile_child(b: Bench) -> None:
    from pipeline.fast.accel import compile_blocks
    from pipeline.fast.attention import apply_attention
    from pipeline.fast.fp8_matmul import FP8, quantize_blocks
    from pipeline.stages.denoise import predict_noise

    res = b.resolutions()[0]
    model = build_dit(dit_config(b.size, "t2v", b.args.layers), b.device, b.dtype)
    attention = apply_attention(model, None, None, b.device)["self"]["backend"]  # the default: fa3 on Hopper
    quantize_blocks(model, FP8)
    report = compile_blocks(model)
    x, t, ctx, ctx_null = _inputs(b, res)
    xin = x.to(b.dtype)
    s, first, _ = b.time(lambda: predict_noise(model, xin, t, ctx, ctx_null, 5.0, batched_cfg=True), reps=2,
                         warmup=1)
    b.emit(section="compile_child", warmup_s=first - s, first_call_s=first, step_s=s, attention=attention,
           cache=report.get("cache"), compiled=report["compiled"])


SECTIONS = {"micro": section_micro, "dit": section_dit, "vae": section_vae, "batch": section_batch,
            "caching": section_caching,
            "compile": section_compile, "compile_child": section_compile_child}


def print_table(b: Bench, quiet: bool = False) -> str:
    dev = torch.cuda.get_device_name(b.device) if b.device.type == "cuda" else "CPU"
    head = ["work", "ours s", "diffusers s", "speed-up", "peak GB ours", "peak GB diffusers", "note"]
    lines = [f"device: {dev}; torch {torch.__version__}; size {b.size}"
             + (f", {b.args.layers} layers" if b.args.layers else ""),
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in b.rows]
    text = "\n".join(lines)
    (b.out / "table.md").write_text(text + "\n")
    if not quiet:
        print(text, flush=True)
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=("full", "smoke"), default="full")
    p.add_argument("--sections", default="micro,dit,offload,batch,vae")  # offload runs inside dit
    p.add_argument("--res", default="480p,720p")
    p.add_argument("--layers", type=int, default=None, help="DiT layers (default: the real 40)")
    p.add_argument("--jobs", type=int, default=4, help="jobs in the batch section (half T2V, half I2V)")
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--cache-steps", type=int, default=40, help="caching section: steps of the CFG run")
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--work", default=None, help="scratch folder for the batch section")
    p.add_argument("--no-profile", dest="profile", action="store_false")
    p.add_argument("--skip-diffusers", action="store_true", help="batch section: ours only")
    p.add_argument("--diffusers-jobs", type=int, default=0,
                   help="batch section: time the diffusers loop on this many of the jobs (T2V/I2V mix kept) and "
                        "scale its seconds to the whole batch (default: all)")
    p.add_argument("--no-fast", action="store_true", help="dit section: stop after the bf16 paths (and offload)")
    args = p.parse_args(argv)
    args.sections = args.sections.split(",")
    args.res = args.res.split(",")
    b = Bench(args)
    b.emit(section="env", device=torch.cuda.get_device_name(b.device) if b.device.type == "cuda" else "cpu",
           torch=torch.__version__, diffusers=__import__("diffusers").__version__, size=args.size,
           layers=args.layers, jobs=args.jobs)
    failed = False
    for name in args.sections:
        if name not in SECTIONS:
            continue  # offload runs inside dit (it needs the bf16 model before fp8 conversion)
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                SECTIONS[name](b)
        except Exception as e:  # noqa: BLE001 - one broken section must not lose the others' numbers
            failed = True
            b.emit(section=name, error=f"{type(e).__name__}: {e}", trace=traceback.format_exc()[-3000:])
        b.emit(section=name, section_wall_s=time.perf_counter() - t0)
        print_table(b, quiet=True)  # a run cut short still leaves its table
        gc.collect()
        if b.device.type == "cuda":
            torch.cuda.empty_cache()
    print_table(b)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
