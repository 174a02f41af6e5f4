"""Train the embedded tiny demo model on synthetic clips, so the default model makes recognisable videos.

    python -m tools.train_tiny --device cuda --workers 16 --work W   # writes pipeline/tiny/weights
    python -m tools.train_tiny --quick --out /tmp/tiny   # a smoke run of every phase (CPU, ~1.5 min)
    python -m tools.train_tiny --eval                    # how well the shipped model follows prompts

The data: clips of one shape (circle, square, triangle) in a named colour moving left/right/up/down on a
plain background of another named colour, captioned "a red circle moving left on a blue background".
Captions in HELD_OUT never appear in training; the semantic tests prompt with them.

Phases, in the order Wan's models were made (all with the real diffusers classes):
1. VAE (AutoencoderKLWan, small base_dim) as an autoencoder on short clips; then the per-channel latent
   mean/std over the data set go into its config as `latents_mean`/`latents_std` (what the pipelines use).
2. T2V: the UMT5 encoder and both WanTransformer3DModel experts, trained jointly by flow matching
   (x_t = (1 - s) x0 + s eps, target eps - x0, timestep 1000 s), s drawn with the inference shift; the
   high-noise expert only on s >= boundary, the low-noise one only below, so each is a specialist as in
   Wan2.2 A14B. The text encoder is trained (lightly, lower learning rate) rather than left random: with a
   random encoder the colour of the shape and the colour of the background differ only by weak position
   mixing, and the experts learn to tell them apart much faster with a trained one. 10% of captions are
   replaced by the negative prompt so classifier-free guidance works.
3. I2V: experts initialised from the T2V ones (the 20 extra input channels of the patch embedding start at
   zero), trained with the pipeline's own first-frame condition (4 mask + 16 latent channels); the text
   encoder and VAE are shared with T2V and frozen.

The DiT attends over the text context zero-padded to text_len (512) tokens, like Wan. Training uses a
compact context (the real tokens plus a few zero tokens) with a log-count bias on the zero tokens, which is
exactly the same attention (all padding tokens are identical); `check_compact_context` verifies it.

Where it runs: `--device cuda` is the way. On one H200: latents 70 s (`--workers 16`), T2V 4018 steps in 363 s
(86 ms a step: bf16 autocast and compiled blocks, 2.4x the eager TF32 step, `benchmarks/bench_train_tiny.py`),
I2V 903 steps in 63 s; the VAE phase took 210 s on an H100. About 12 minutes in all: `--work` keeps finished
phases, so a run can be split over two device calls of 10 minutes, and `--vae FOLDER` takes a trained model's
VAE instead of training one (the shipped denoisers were trained that way, on the shipped VAE). On a CPU every
phase works (`--quick` is a smoke run in about a minute) but the full recipe would take many hours.

Deterministic: fixed seeds, fixed data order, deterministic kernels; samples and noise levels are drawn on
the CPU, the noise by a seeded generator on the device. On CUDA the denoisers' attention runs SDPA's math
kernel (`dit_math_attention`): flash attention's backward adds with atomics, and two runs of the same recipe
(300 + 100 steps, compiled, bf16, two processes on one H200) gave different experts with it and byte-identical
ones with the math kernel, at the same step time (81 ms). The VAE phase, re-run in a separate session on
another H100, came out byte-identical. The shipped experts were trained just before that switch (flash
attention, every other field as here), so a re-run gives experts of the same recipe, not the same bytes.
The experts are saved in bf16 (the modules diffusers keeps in fp32 stay fp32), as the Wan-AI/*-Diffusers
repos ship them.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.nn.attention import SDPBackend, sdpa_kernel

from pipeline.tiny import WEIGHTS
# the synthetic world (shared with the demo and the semantic tests), re-exported for the tests that read it here
from pipeline.tiny.world import (Clip, DIT_RADIUS, DIT_TRAVEL, HELD_OUT, PALETTE, SHAPE_RADIUS,
                                 TRAVEL, caption, describe_video, dit_clip, dominant_colour,
                                 matches, place_clip, render, sample_clips)


@dataclass(frozen=True)
class Recipe:
    size: int = 64  # the VAE's training clips (it is fully convolutional: any size works after)
    video_size: int = 64  # the denoisers' clips, and the tiny config's target_height/width
    frames: int = 17
    clips: int = 4000  # the VAE's training clips
    dit_clips: int = 16000  # the denoisers' clips (latents precomputed once)
    i2v_clips: int = 8000  # of those, the ones with a first-frame condition for I2V
    vae_image_steps: int = 2000
    vae_image_batch: int = 32
    vae_steps: int = 300  # video steps
    vae_batch: int = 8
    vae_frames: int = 9  # 1 + 2 chunks of 4: the encoder's cached-chunk path is exercised
    vae_crop: int = 64  # fully convolutional: it can train on crops (cheaper on a CPU), used on whole frames
    vae_lr: float = 2.5e-3
    vae_kl: float = 1e-4
    vae_noise: float = 0.1
    vae_shapes: str = "dit"  # the VAE's clips: "dit" (the denoisers' small shapes) or "large" (place_clip's)
    vae_arch: str = ""  # JSON overrides of tiny.VAE_CONFIG ("" = the shipped one)
    dit_steps: int = 4018
    dit_batch: int = 512
    dit_lr: float = 2e-3
    # CUDA only, speed and repeatability (on a CPU the step is plain fp32 whatever these say):
    dit_bf16: int = 1  # the denoisers' forward passes under bf16 autocast (the weights and the optimizer stay fp32)
    dit_compile: int = 1  # the experts' transformer blocks torch.compile'd (regional: one graph for all of them)
    dit_math_attention: int = 1  # SDPA's math kernel: flash attention's backward adds with atomics (not repeatable)
    t5_lr: float = 1e-3
    i2v_steps: int = 903
    ema: float = 0.995
    p_uncond: float = 0.1
    p_anchor: float = 0.5  # T2V samples with one latent frame less noisy than the rest (see anchor_sigmas)
    shift: float = 5.0
    seed: int = 0
    arch: str = ""  # JSON overrides of tiny.DIT_CONFIG, for trying other denoiser shapes ("" = the shipped one)
    report_seeds: int = 5  # after saving: held-out prompts x this many seeds, T2V and I2V (0: no report)
    check_clips: int = 96  # unseen clips the VAE's fidelity is measured (and logged) on


QUICK = Recipe(clips=96, dit_clips=96, i2v_clips=48, vae_image_steps=10, vae_image_batch=4, vae_steps=5, vae_batch=2,
               dit_steps=20, i2v_steps=10, dit_batch=8, check_clips=16)


class Log:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self, msg: str) -> None:
        r = resource.getrusage(resource.RUSAGE_SELF)
        print(f"[{time.perf_counter() - self.t0:7.1f}s wall {r.ru_utime + r.ru_stime:7.1f}s cpu] {msg}", flush=True)


def _lr(step: int, total: int, base: float, warmup: int = 30) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def _to_model_video(videos: np.ndarray) -> torch.Tensor:
    """uint8 [B, F, H, W, 3] -> float [B, 3, F, H, W] in [-1, 1] (what VideoProcessor gives the VAE)."""
    return torch.from_numpy(videos).float().div(127.5).sub(1.0).permute(0, 4, 1, 2, 3).contiguous()


def inflate_init(vae) -> None:
    """Start the video VAE as a per-frame image VAE (the usual 2D-to-3D inflation): every causal temporal
    convolution looks at the current frame only, the encoder's temporal downsampling keeps the latest frame
    and the decoder's temporal upsampling repeats it. Training on single images then teaches all the spatial
    work at a ninth of the cost of 9-frame clips, and the short video phase only has to learn motion."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanResample

    time_convs = {id(m.time_conv) for m in vae.modules() if isinstance(m, WanResample) and hasattr(m, "time_conv")}
    with torch.no_grad():
        for m in vae.modules():
            if isinstance(m, WanCausalConv3d) and m.kernel_size[0] > 1:
                m.weight[:, :, :-1] = 0.0
                if id(m) in time_convs:
                    eye = torch.eye(m.in_channels).repeat(m.out_channels // m.in_channels, 1)
                    m.weight[:, :, -1] = eye.view(m.out_channels, m.in_channels, 1, 1)
                    m.bias.zero_()


def _noise(shape, gen: torch.Generator, device) -> torch.Tensor:
    """Drawn on the CPU, so the random stream is the same on any device."""
    return torch.randn(shape, generator=gen).to(device)


def _vae_step(vae, opt, x: torch.Tensor, alpha: torch.Tensor, recipe: Recipe, gen: torch.Generator, lr: float):
    post = vae.encode(x).latent_dist
    z = post.mean + post.std * _noise(post.mean.shape, gen, x.device)
    # plus noise at a tenth of each channel's spread: the decoder must draw well from the slightly-off latents
    # a denoiser produces, not only from the encoder's own
    spread = post.mean.detach().std(dim=(0, 2, 3, 4), keepdim=True)
    z = z + recipe.vae_noise * spread * _noise(z.shape, gen, x.device)
    y = vae.decode(z).sample
    err = ((y - x).abs() + (y - x).pow(2)).mean(1)  # [B, F, H, W]
    # the shape covers ~8% of the pixels: its error and the background's count equally
    fg = alpha.clamp(0, 1)
    rec = (err * (1 - fg)).sum() / (1 - fg).sum() + (err * fg).sum() / fg.sum().clamp_min(1.0)
    kl = 0.5 * (post.mean.pow(2) + post.var - 1.0 - post.logvar).mean()
    for g in opt.param_groups:
        g["lr"] = lr
    opt.zero_grad(set_to_none=True)
    (rec + recipe.vae_kl * kl).backward()
    torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
    opt.step()
    return rec.item(), kl.item()


def train_vae(recipe: Recipe, clips: list[Clip], log: Log, device: str = "cpu"):
    """Images first (single frames through the causal path), then short clips of `vae_frames` frames."""
    from diffusers import AutoencoderKLWan

    config = vae_config(recipe)
    torch.manual_seed(recipe.seed + 1)
    vae = AutoencoderKLWan(**config).train()
    inflate_init(vae)
    with torch.no_grad():  # start with a narrow posterior (std ~0.05): the decoder sees the signal from step 0
        vae.quant_conv.bias[config["z_dim"]:] = -6.0
    vae.to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    rng = np.random.default_rng(recipe.seed + 2)
    gen = torch.Generator().manual_seed(recipe.seed + 3)
    crop = min(recipe.vae_crop, recipe.size)
    total = recipe.vae_image_steps + recipe.vae_steps
    log(f"VAE: {sum(p.numel() for p in vae.parameters())} parameters, {recipe.vae_image_steps} image steps, "
        f"{recipe.vae_steps} video steps on {device}")
    for step in range(total):
        image_phase = step < recipe.vae_image_steps
        batch, frames = (recipe.vae_image_batch, 1) if image_phase else (recipe.vae_batch, recipe.vae_frames)
        idx = rng.integers(len(clips), size=batch)
        start = rng.integers(0, recipe.frames - frames + 1)
        cy, cx = rng.integers(0, recipe.size - crop + 1, size=2)
        window = (slice(None), slice(cy, cy + crop), slice(cx, cx + crop))
        rendered = [render(clips[i], recipe.size, recipe.frames, only=slice(start, start + frames)) for i in idx]
        video = np.stack([v[window] for v, _ in rendered])
        alpha = torch.from_numpy(np.stack([a[window] for _, a in rendered])).to(device)
        # each phase has its own schedule: the video phase starts gently, so it refines the image VAE
        lr = (_lr(step, recipe.vae_image_steps, recipe.vae_lr) if image_phase else
              _lr(step - recipe.vae_image_steps, recipe.vae_steps, recipe.vae_lr * 0.3))
        rec, kl = _vae_step(vae, opt, _to_model_video(video).to(device), alpha, recipe, gen, lr)
        if step % 250 == 0 or step == total - 1 or step == recipe.vae_image_steps:
            log(f"VAE {'image' if image_phase else 'video'} step {step}: rec {rec:.4f} kl {kl:.3f}")
    return vae.cpu().eval().requires_grad_(False)


@torch.no_grad()
def vae_fidelity(vae, size: int, n: int = 96) -> dict:
    """How faithfully the VAE passes the denoisers' clips through (encode, decode): the share whose shape keeps
    its palette colour (dominant_colour over the pixels the shape fully covers) and the mean abs
    error in 0..255, on n unseen clips plus the held-out ones. The I2V first frame is only as right as this."""
    clips = sample_clips(n, 777, size, place=dit_clip)
    clips += [dit_clip(*c, rng=np.random.default_rng(1000 + k), size=size) for k, c in enumerate(HELD_OUT)]
    device = next(vae.parameters()).device
    kept, errors, wrong = [], [], []
    for i in range(0, len(clips), 16):
        drawn = [render(c, size, 17) for c in clips[i:i + 16]]
        x = _to_model_video(np.stack([v for v, _ in drawn])).to(device)
        y = vae.decode(vae.encode(x).latent_dist.mode()).sample
        y = ((y.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).cpu().numpy()
        for clip, (video, alpha), out in zip(clips[i:i + 16], drawn, y):
            inside = alpha > 0.99
            ok = dominant_colour(out[inside].astype(np.float32), exclude=clip.background) == clip.colour
            kept.append(ok)
            if not ok:
                wrong.append(f"{clip.colour} on {clip.background}")
            errors.append(float(np.abs(out.astype(np.float32) - video.astype(np.float32)).mean()))
    return {"colour": round(float(np.mean(kept)), 3), "abs_error": round(float(np.mean(errors)), 2), "wrong": wrong[:12]}


def _render_video(args: tuple[Clip, int, int]) -> np.ndarray:
    return render(*args)[0]


def render_videos(clips: list[Clip], size: int, frames: int, workers: int) -> list[np.ndarray]:
    """The clips' videos, drawn by `workers` processes (drawing, not encoding, is what takes the time)."""
    jobs = [(c, size, frames) for c in clips]
    if workers <= 1 or len(clips) < 64:
        return [_render_video(j) for j in jobs]
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(workers) as pool:
        return pool.map(_render_video, jobs, chunksize=32)


@torch.no_grad()
def encode_latents(vae, clips: list[Clip], recipe: Recipe, batch: int = 32, workers: int = 1) -> torch.Tensor:
    """Raw (un-normalised) posterior means [N, 16, T', h, w] of the full-length clips."""
    device = next(vae.parameters()).device
    videos = render_videos(clips, recipe.video_size, recipe.frames, workers)
    out = []
    for i in range(0, len(clips), batch):
        video = _to_model_video(np.stack(videos[i:i + batch])).to(device)
        out.append(vae.encode(video).latent_dist.mode().cpu())
    return torch.cat(out)


@torch.no_grad()
def encode_conditions(vae, clips: list[Clip], recipe: Recipe, batch: int = 32) -> torch.Tensor:
    """I2V conditions [N, 20, T', h, w], batched but built exactly like pipeline.stages.image does."""
    from pipeline.stages.image import first_frame_mask

    device = next(vae.parameters()).device
    mean = torch.tensor(vae.config.latents_mean, device=device).view(1, -1, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std, device=device).view(1, -1, 1, 1, 1)
    out = []
    for i in range(0, len(clips), batch):
        first = np.stack([render(c, recipe.video_size, 1)[0] for c in clips[i:i + batch]])  # [B, 1, H, W, 3]
        x = _to_model_video(first).to(device)
        video = torch.cat([x, x.new_zeros(x.shape[0], 3, recipe.frames - 1, recipe.video_size, recipe.video_size)], dim=2)
        latent = (vae.encode(video).latent_dist.mode() - mean) * inv_std
        mask = first_frame_mask(recipe.frames, latent.shape[3], latent.shape[4]).to(device)
        out.append(torch.cat([mask.expand(latent.shape[0], -1, -1, -1, -1), latent], dim=1).cpu())
    return torch.cat(out)


# ---- compact text context: the same attention as the zero-padded text_len context, at a fraction of the cost --

class CompactContextAttn:
    """Cross-attention processor for training: attends over a compact context (real tokens, then zero tokens)
    with log(count) added to the logits of the zero tokens, so each stands for its share of the text_len - n
    identical padding tokens of the real, padded context. Equal to WanAttnProcessor on the padded context."""

    def __init__(self) -> None:
        from diffusers.models.transformers.transformer_wan import WanAttnProcessor

        self.inner = WanAttnProcessor()
        self.bias: torch.Tensor | None = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        return self.inner(attn, hidden_states, encoder_hidden_states, self.bias, rotary_emb)


def use_compact_context(model) -> CompactContextAttn:
    proc = CompactContextAttn()
    for block in model.blocks:
        block.attn2.set_processor(proc)
    return proc


def restore_processors(model) -> None:
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    for block in model.blocks:
        block.attn2.set_processor(WanAttnProcessor())


class TextBank:
    """Token ids of every caption (and of the negative prompt), encoded per batch by the (trainable) UMT5."""

    def __init__(self, tokenizer, captions: list[str], negative: str, text_len: int) -> None:
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        self.text_len = text_len
        texts = [prompt_clean(c) for c in captions] + [prompt_clean(negative)]
        enc = tokenizer(texts, padding="longest", add_special_tokens=True, return_attention_mask=True,
                        return_tensors="pt")
        self.ids, self.mask = enc.input_ids, enc.attention_mask
        self.null = len(captions)
        self.width = self.ids.shape[1] + 1  # at least one zero token stands for the padding

    def context(self, encoder, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(context [B, width, D] with zeros after the real tokens, bias [B, 1, 1, width])."""
        device = next(encoder.parameters()).device
        ids, mask = self.ids[rows].to(device, non_blocking=True), self.mask[rows].to(device, non_blocking=True)
        hidden = encoder(ids, mask).last_hidden_state * mask.unsqueeze(-1)
        ctx = F.pad(hidden, (0, 0, 0, self.width - ids.shape[1]))
        n = mask.sum(1, keepdim=True).float()
        pad_bias = torch.log((self.text_len - n) / (self.width - n))
        positions = torch.arange(self.width, device=device).unsqueeze(0)
        bias = torch.where(positions < n, torch.zeros((), device=device), pad_bias)
        return ctx, bias[:, None, None, :]


@torch.no_grad()
def check_compact_context(model, bank: TextBank, encoder, latents: torch.Tensor, cond: torch.Tensor | None) -> float:
    """Max |difference| between the compact and the zero-padded text_len context on two samples; must be ~0."""
    rows = torch.tensor([0, bank.null])
    ctx, bias = bank.context(encoder, rows)
    x = latents[:2] if cond is None else torch.cat([latents[:2], cond[:2]], 1)
    t = torch.tensor([900.0, 300.0], device=latents.device)
    proc = use_compact_context(model)
    proc.bias = bias
    compact = model(x, t, ctx, return_dict=False)[0]
    restore_processors(model)
    full_ctx = F.pad(ctx, (0, 0, 0, bank.text_len - ctx.shape[1]))
    full = model(x, t, full_ctx, return_dict=False)[0]
    return float((compact - full).abs().max())


# ---- flow matching --------------------------------------------------------------------------------------------

def sample_sigmas(n: int, lo: float, hi: float, shift: float, gen: torch.Generator) -> torch.Tensor:
    """Noise levels in [lo, hi) with the density of the shifted schedule s = k u / (1 + (k - 1) u), u uniform,
    the same warping the solver applies at inference (flow_shift)."""
    def unshift(s: float) -> float:
        return s / (shift - (shift - 1.0) * s)

    u_lo, u_hi = unshift(lo), unshift(hi)
    u = u_lo + (u_hi - u_lo) * torch.rand(n, generator=gen)
    return shift * u / (1.0 + (shift - 1.0) * u)


class Ema:
    def __init__(self, modules: list[torch.nn.Module], decay: float) -> None:
        self.decay = decay
        self.params = [p for m in modules for p in m.parameters() if p.requires_grad]
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - d)

    @torch.no_grad()
    def copy_to(self) -> None:
        for s, p in zip(self.shadow, self.params):
            p.copy_(s)


def train_experts(recipe: Recipe, experts: dict[str, torch.nn.Module], boundary: float, bank: TextBank,
                  encoder, rows: torch.Tensor, latents: torch.Tensor, cond: torch.Tensor | None, steps: int,
                  seed: int, log: Log, train_text: bool, seconds: float | None = None) -> dict:
    """Flow-matching training of the high- and low-noise experts, each on its own noise range, every step
    on an independent batch; the text encoder learns with them when `train_text`. With `seconds` (for trying
    recipes out) the step count is cut to what fits in that time, timed on steps 10-29 (after any compile).
    Returns the steps taken (what a recipe must say to reproduce the run) and the ms per step after step 10."""
    device = latents.device
    ranges = {"high": (boundary, 1.0), "low": (0.0, boundary)}
    procs = {name: use_compact_context(m.train()) for name, m in experts.items()}
    cuda = device.type == "cuda"
    if recipe.dit_compile and cuda:
        compile_blocks(experts.values())
    groups = [{"params": list(m.parameters()), "lr": recipe.dit_lr, "base": recipe.dit_lr} for m in experts.values()]
    trained = list(experts.values())
    if train_text:
        encoder.train().requires_grad_(True)
        groups.append({"params": list(encoder.parameters()), "lr": recipe.t5_lr, "base": recipe.t5_lr})
        trained.append(encoder)
    else:
        encoder.eval().requires_grad_(False)
    opt = torch.optim.AdamW(groups, weight_decay=0.01, fused=cuda)
    ema = Ema(trained, recipe.ema)
    # Samples, noise levels and captions are drawn on the CPU (the same choices on any device); the noise
    # itself is drawn where the model is. On CUDA nothing in a step waits for the GPU (no .item(), only
    # non-blocking copies), so the CPU queues the next kernels while the GPU runs: the step is launch-bound.
    gen = torch.Generator().manual_seed(seed)
    noise_gen = gen if device.type == "cpu" else torch.Generator(device).manual_seed(seed)
    n = latents.shape[0]
    step, began = 0, time.perf_counter()

    def clock() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    # flash and memory-efficient attention accumulate dQ with atomics in their backward; the math kernel does not
    attention = (sdpa_kernel([SDPBackend.MATH]) if recipe.dit_math_attention and cuda else contextlib.nullcontext())
    with attention:
        while step < steps:
            if step == 10:
                started = clock()
            if seconds is not None and step == 30:
                per_step = (clock() - started) / 20
                steps = max(31, min(steps, int((seconds - (started - began)) / per_step) + 10))
                peak = f", peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if cuda else ""
                log(f"  {per_step * 1000:.1f} ms per step{peak}: {steps} steps fit in {seconds:.0f} s")
            total = 0.0
            losses = {}
            for name, model in experts.items():
                idx = torch.randint(0, n, (recipe.dit_batch,), generator=gen)
                text_rows = rows[idx].clone()
                text_rows[torch.rand(recipe.dit_batch, generator=gen) < recipe.p_uncond] = bank.null
                ctx, procs[name].bias = bank.context(encoder, text_rows)
                idx_dev = idx.to(device, non_blocking=True)
                x0 = latents[idx_dev]
                sigma = sample_sigmas(recipe.dit_batch, *ranges[name], recipe.shift, gen)
                frame_sigma = sigma[:, None].expand(-1, x0.shape[2])  # [B, T']
                if cond is None and recipe.p_anchor > 0:
                    frame_sigma = anchor_sigmas(frame_sigma, recipe.p_anchor, gen)
                noise = torch.randn(x0.shape, generator=noise_gen, device=device)
                s = frame_sigma.to(device, non_blocking=True)[:, None, :, None, None]
                xt = (1.0 - s) * x0 + s * noise
                inp = xt if cond is None else torch.cat([xt, cond[idx_dev]], 1)
                with torch.autocast(device.type, torch.bfloat16, enabled=bool(recipe.dit_bf16) and cuda):
                    timesteps = token_timesteps(model, frame_sigma, x0.shape).to(device, non_blocking=True)
                    pred = model(inp, timesteps, ctx, return_dict=False)[0]
                loss = F.mse_loss(pred.float(), noise - x0)
                losses[name] = loss.detach()
                total = total + loss
            for g in opt.param_groups:
                g["lr"] = _lr(step, steps, g["base"])
            opt.zero_grad(set_to_none=True)
            total.backward()
            for g in opt.param_groups:
                torch.nn.utils.clip_grad_norm_(g["params"], 1.0)
            opt.step()
            ema.update(step)
            if step % 250 == 0 or step == steps - 1:
                log(f"  step {step}: " + " ".join(f"{k} {v.item():.4f}" for k, v in losses.items()))
            step += 1
    ms = (clock() - started) / (steps - 10) * 1000 if steps > 10 else float("nan")
    log(f"  {steps} steps in {time.perf_counter() - began:.0f} s, {ms:.1f} ms per step after the first 10")
    ema.copy_to()
    for model in experts.values():
        uncompile_blocks(model)
        restore_processors(model)
        model.eval().requires_grad_(False)
    encoder.eval().requires_grad_(False)
    return {"steps": steps, "ms_per_step": ms}


def compile_blocks(models) -> None:
    """torch.compile each expert's transformer blocks (diffusers' regional compile: the four blocks of both
    experts share one compiled forward and backward, parameters being inputs). Why: an eager step of these
    small models is bound by Python and kernel launches, which fused kernels cut (measured on an H200 at batch
    512: 154 ms eager in TF32, 63 ms compiled under bf16 autocast)."""
    for model in models:
        model.compile_repeated_blocks(dynamic=False)


def uncompile_blocks(model) -> None:
    """Back to eager blocks (what Module.compile set), so sampling after training does not compile again."""
    for block in model.blocks:
        block._compiled_call_impl = None


def anchor_sigmas(frame_sigma: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    """Per-frame noise levels [B, T'] where, in a share `p` of the samples, one random latent frame is cleaner
    than the rest (its sigma times u^2, u ~ U(0, 1): mostly much cleaner), the way Wan2.2's TI2V model sees a
    clean first frame.

    Why: with every frame equally noisy, the direction word is never worth learning. Where a T2V denoiser
    cannot yet see the shape (high noise) the word does not say where to draw it, and once it can, the noisy
    frames already show which way it moves. Measured: a T2V model trained that way drew the direction of the
    noisy clip whatever the prompt said (0 of 32 followed a contradicting prompt at sigma 0.83), while I2V
    experts, whose first frame is always clean, learned the word in a few hundred steps. A cleaner frame makes
    the word decide where every other frame's shape goes. Inference is unchanged (one sigma for all tokens)."""
    b, t = frame_sigma.shape
    anchored = torch.rand(b, generator=gen) < p
    frame = torch.randint(0, t, (b,), generator=gen)
    scale = torch.rand(b, generator=gen).square()
    out = frame_sigma.clone()
    rows = torch.arange(b)[anchored]
    out[rows, frame[anchored]] = frame_sigma[rows, frame[anchored]] * scale[anchored]
    return out


def token_timesteps(model, frame_sigma: torch.Tensor, shape) -> torch.Tensor:
    """Timesteps [B, tokens] (1000 sigma of each token's frame): WanTransformer3DModel accepts one timestep
    per token (Wan2.2 TI2V's interface); with every frame at one sigma it equals the usual [B] timestep."""
    _, ph, pw = model.config.patch_size
    per_frame = (shape[3] // ph) * (shape[4] // pw)
    return (frame_sigma * 1000.0).repeat_interleave(per_frame, dim=1)


def extend_patch_embedding(t2v, in_channels: int):
    """An I2V expert initialised from a T2V one: the extra condition channels start with zero weights."""
    from diffusers import WanTransformer3DModel

    cfg = {k: v for k, v in t2v.config.items() if not k.startswith("_")}
    i2v = WanTransformer3DModel(**{**cfg, "in_channels": in_channels})
    state = t2v.state_dict()
    w = state["patch_embedding.weight"]
    state["patch_embedding.weight"] = torch.cat([w, w.new_zeros(w.shape[0], in_channels - w.shape[1], *w.shape[2:])], 1)
    i2v.load_state_dict(state)
    return i2v.to(w.device)


# ---- sampling with the pipeline's own stage functions (for the report at the end of training) -------------------

@torch.no_grad()
def generate(parts: dict, task: str, prompt: str, seed: int | list[int], size: int, frames: int,
             steps: int | None = None, guide: tuple[float, float] | None = None, shift: float | None = None,
             image=None) -> np.ndarray | list[np.ndarray]:
    """One video [F, H, W, 3] uint8 (a list of them for a list of seeds, denoised as one batch), computed the way
    the staged pipeline computes it, on the device the models are on; steps, guidance, shift and text length
    default to the tiny model's own config (what the demo and the tests run)."""
    from pipeline.config import load_config
    from pipeline.stages.decode import decode_latents, to_uint8
    from pipeline.stages.denoise import denoise_steps, initial_noise
    from pipeline.stages.image import encode_image_condition
    from pipeline.stages.schedule import make_scheduler, split_index
    from pipeline.stages.text import encode_text
    from pipeline.tiny import BOUNDARY, SCHEDULER_CONFIG

    config = load_config(None)
    steps = steps or config["infer_steps"]
    guide = guide or tuple(config["sample_guide_scale"])
    shift = shift or config["sample_shift"]
    seeds = [seed] if isinstance(seed, int) else list(seed)
    ctx, _ = encode_text(parts["tokenizer"], parts["text_encoder"], prompt, config["text_len"])
    null, _ = encode_text(parts["tokenizer"], parts["text_encoder"], "", config["text_len"])
    cond = encode_image_condition(parts["vae"], image, frames) if image is not None else None
    schedule = {"kind": "unipc", "infer_steps": steps, "shift": shift, "boundary": BOUNDARY[task],
                "scheduler_config": SCHEDULER_CONFIG}
    sched = make_scheduler(schedule)
    split = split_index(schedule, sched.timesteps)
    device = next(parts[task]["high"].parameters()).device
    shape = (1, 16, (frames - 1) // 4 + 1, size // 8, size // 8)
    latents = torch.cat([initial_noise(s, shape) for s in seeds]).to(device)
    b = len(seeds)
    ctx, null = ctx.expand(b, -1, -1), null.expand(b, -1, -1)
    cond = None if cond is None else cond.expand(b, -1, -1, -1, -1)
    latents = denoise_steps(parts[task]["high"], sched, latents, range(0, split), ctx, null, guide[0], cond=cond)
    latents = denoise_steps(parts[task]["low"], sched, latents, range(split, steps), ctx, null, guide[1], cond=cond)
    videos = [to_uint8(decode_latents(parts["vae"], one[None])) for one in latents]
    return videos[0] if isinstance(seed, int) else videos


def report(parts: dict, recipe: Recipe, log: Log, seeds: int = 5, tasks=("t2v", "i2v"),
           steps: tuple[int | None, ...] = (None,)) -> dict[str, float]:
    """Share of held-out prompts x seeds whose video has the prompt's colour and direction, over all of them
    and for the weakest prompt (the semantic tests' two bars), logged for each prompt with how often colour,
    direction and background alone are right; `steps` None: the tiny config's."""
    from PIL import Image

    from pipeline.config import load_config

    rates = {}
    for n in (n or load_config(None)["infer_steps"] for n in steps):
        for task in tasks:
            per_prompt = []
            for k, combo in enumerate(HELD_OUT):
                image = None
                if task == "i2v":
                    clip = dit_clip(*combo, rng=np.random.default_rng(1000 + k), size=recipe.video_size)
                    image = Image.fromarray(render(clip, recipe.video_size, 1)[0][0])
                videos = generate(parts, task, caption(*combo), list(range(seeds)), recipe.video_size,
                                  recipe.frames, steps=n, image=image)
                descs = [describe_video(v) for v in videos]
                ok = np.mean([matches(d, combo[0], combo[2]) for d in descs])
                per_prompt.append(ok)
                log(f"{task}@{n} {caption(*combo)}: {ok:.0%} (colour "
                    f"{np.mean([d['colour'] == combo[0] for d in descs]):.0%}, direction "
                    f"{np.mean([d['direction'] == combo[2] for d in descs]):.0%}, background "
                    f"{np.mean([d['background'] == combo[3] for d in descs]):.0%})")
            rates[f"{task}@{n}"] = round(float(np.mean(per_prompt)), 3)
            rates[f"{task}@{n} weakest"] = round(float(min(per_prompt)), 3)
    log(f"held-out prompts following the prompt ({seeds} seeds each): {rates}")
    return rates


def load_parts(folder: Path) -> dict:
    """The trained components from a saved model folder (for `--eval`)."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5EncoderModel

    parts = {"tokenizer": AutoTokenizer.from_pretrained(folder / "t2v" / "tokenizer"),
             "text_encoder": UMT5EncoderModel.from_pretrained(folder / "t2v" / "text_encoder").eval(),
             "vae": AutoencoderKLWan.from_pretrained(folder / "t2v" / "vae").eval()}
    for task in ("t2v", "i2v"):
        parts[task] = {name: WanTransformer3DModel.from_pretrained(folder / task / sub, torch_dtype=torch.float32).eval()
                       for name, sub in (("high", "transformer"), ("low", "transformer_2"))}
    return parts


# ---- the whole run ---------------------------------------------------------------------------------------------

def bf16_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The expert as it ships: bf16 weights, as in the Wan-AI/*-Diffusers repos, except the modules diffusers
    keeps in fp32 (`_keep_in_fp32_modules`: norms, time embedder, modulation tables). Halves the files; the
    pipeline computes in fp32 on a CPU all the same."""
    import copy

    keep = set(model._keep_in_fp32_modules or [])
    out = copy.deepcopy(model)
    for name, param in out.named_parameters():
        if not keep & set(name.split(".")):
            param.data = param.data.to(torch.bfloat16)
    return out


def save_models(out: Path, tokenizer, encoder, vae, experts: dict[str, dict[str, torch.nn.Module]]) -> None:
    """Both models in the diffusers layout (each folder complete, like the real Wan-AI/*-Diffusers repos)."""
    from diffusers import UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline

    from pipeline.tiny import BOUNDARY, SCHEDULER_CONFIG

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for task, cls in (("t2v", WanPipeline), ("i2v", WanImageToVideoPipeline)):
            pipe = cls(tokenizer=tokenizer, text_encoder=encoder, vae=vae,
                       scheduler=UniPCMultistepScheduler(**SCHEDULER_CONFIG),
                       transformer=bf16_copy(experts[task]["high"]), transformer_2=bf16_copy(experts[task]["low"]),
                       boundary_ratio=BOUNDARY[task])
            pipe.save_pretrained(tmp / task, safe_serialization=True)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class Phases:
    """Optional checkpoints of finished phases in a work folder (`--work`), keyed by everything that phase
    depends on, so a re-run with later phases changed resumes instead of starting over."""

    def __init__(self, work: Path | None, recipe: Recipe, log: Log) -> None:
        self.work, self.recipe, self.log = work, recipe, log

    def run(self, name: str, fields: tuple[str, ...], extra: dict, compute, restore):
        if self.work is None:
            return compute()
        data = {"palette": PALETTE, "radius": SHAPE_RADIUS, "travel": TRAVEL, "held_out": HELD_OUT}
        key = json.dumps({"fields": {f: getattr(self.recipe, f) for f in fields}, "data": data, **extra},
                         sort_keys=True)
        path = self.work / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.safetensors"
        if path.is_file():
            self.log(f"{name}: resumed from {path}")
            return restore(_nest(load_file(path)))
        result = compute()
        self.work.mkdir(parents=True, exist_ok=True)
        save_file(_flat_state(result), path.with_suffix(".tmp"))
        os.replace(path.with_suffix(".tmp"), path)
        return result


def _flat_state(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    """Modules, tensors and dicts of them as one flat {"a/b/param": tensor} dict (a safetensors file: no pickle).
    Each tensor is copied: safetensors refuses storage shared between entries (UMT5's tied embeddings)."""
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, torch.Tensor):
        return {prefix: obj.detach().cpu().clone().contiguous()}
    return {k: v for key, value in obj.items()
            for k, v in _flat_state(value, f"{prefix}/{key}" if prefix else key).items()}


def _nest(flat: dict[str, torch.Tensor]) -> dict:
    out: dict = {}
    for key, tensor in flat.items():
        *path, leaf = key.split("/")
        node = out
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = tensor
    return out


def set_latent_statistics(vae, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean/std of raw latents [N, C, T, H, W] into the VAE's config (`latents_mean`/`latents_std`,
    rounded as written to config.json), which is the normalisation the pipelines apply; returns them."""
    dims = (0, 2, 3, 4)
    mean, std = raw.mean(dims), raw.std(dims)
    vae.register_to_config(latents_mean=[round(v, 5) for v in mean.tolist()],
                           latents_std=[round(v, 5) for v in std.tolist()])
    return mean, std


def _load(module: torch.nn.Module, state) -> torch.nn.Module:
    module.load_state_dict(state)
    return module.eval().requires_grad_(False)


VAE_FIELDS = ("size", "frames", "clips", "vae_image_steps", "vae_image_batch", "vae_steps", "vae_batch", "vae_frames",
              "vae_crop", "vae_lr", "vae_kl", "vae_noise", "vae_shapes", "vae_arch", "seed")
LATENT_FIELDS = VAE_FIELDS + ("video_size", "dit_clips", "i2v_clips")
T2V_FIELDS = LATENT_FIELDS + ("dit_steps", "dit_batch", "dit_lr", "dit_bf16", "dit_compile", "dit_math_attention",
                               "t5_lr", "ema", "p_uncond", "p_anchor", "shift")
I2V_FIELDS = T2V_FIELDS + ("i2v_steps",)


def dit_config(recipe: Recipe) -> dict:
    from pipeline.tiny import DIT_CONFIG

    return {**DIT_CONFIG, **(json.loads(recipe.arch) if recipe.arch else {})}


VAE_FILE = "diffusion_pytorch_model.safetensors"


def vae_config(recipe: Recipe) -> dict:
    from pipeline.tiny import VAE_CONFIG

    return {**VAE_CONFIG, **(json.loads(recipe.vae_arch) if recipe.vae_arch else {})}


def train(recipe: Recipe, out: Path, work: Path | None = None, device: str = "cpu", workers: int = 1,
          seconds: tuple[float, float] | None = None, vae_from: Path | None = None) -> None:
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from pipeline.tiny import BOUNDARY, T5_CONFIG, build_tokenizer

    # On CUDA a few backward kernels have no deterministic variant: warn there rather than stop
    torch.use_deterministic_algorithms(True, warn_only=device != "cpu")
    if device.startswith("cuda"):  # TF32 matmuls: faster, and the weights ship in bf16 anyway
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    log = Log()
    phases = Phases(work, recipe, log)
    log(f"recipe {json.dumps(asdict(recipe))} on {device}")
    place = {"dit": dit_clip, "large": place_clip}[recipe.vae_shapes]
    vae_clips = sample_clips(recipe.clips, recipe.seed, recipe.size, place=place)
    stage = {"vae": vae_config(recipe), "dit_data": [DIT_RADIUS, DIT_TRAVEL]}

    def vae_phase():
        return {"vae": train_vae(recipe, vae_clips, log, device)}

    def vae_restore(state):
        return {"vae": _load(AutoencoderKLWan(**vae_config(recipe)), state["vae"])}

    if vae_from is None:
        vae = phases.run("vae", VAE_FIELDS, stage, vae_phase, vae_restore)["vae"]
    else:  # a trained model's VAE in place of this phase (its latent statistics are set again below)
        vae = _load(AutoencoderKLWan(**vae_config(recipe)), load_file(vae_from / "t2v" / "vae" / VAE_FILE))
        log(f"VAE: taken from {vae_from}")
        stage["vae_from"] = hashlib.sha256((vae_from / "t2v" / "vae" / VAE_FILE).read_bytes()).hexdigest()
    log(f"VAE fidelity on the denoisers' clips: {vae_fidelity(vae.to(device), recipe.video_size, recipe.check_clips)}")
    vae.cpu()
    # the denoisers' own clips (dit_clip): their latents, their statistics (the VAE's normalisation, what the
    # pipelines use) and the I2V first-frame conditions, encoded once (kept by --work)
    clips = sample_clips(recipe.dit_clips, recipe.seed + 5, recipe.video_size, place=dit_clip)

    def latents_phase():
        vae.to(device)
        raw = encode_latents(vae, clips, recipe, batch=32 if device == "cpu" else 128, workers=workers)
        set_latent_statistics(vae, raw)  # the conditions are normalised like the latents
        cond = encode_conditions(vae, clips[:recipe.i2v_clips], recipe)
        vae.cpu()
        return {"raw": raw, "cond": cond}

    data = phases.run("latents", LATENT_FIELDS, stage, latents_phase, lambda state: state)
    raw, cond = data["raw"], data["cond"]
    mean, std = set_latent_statistics(vae, raw)  # again: a resumed latents phase did not set them
    m = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    s = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    latents = ((raw - m) / s).to(device)
    cond = cond.to(device)
    log(f"latents {tuple(latents.shape)}: |mean| {mean.abs().mean():.3f} avg, std {std.min():.3f}..{std.max():.3f}")

    tokenizer = build_tokenizer(Path(tempfile.mkdtemp()))
    torch.manual_seed(recipe.seed + 10)
    encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), **T5_CONFIG)).eval().to(device)
    captions = sorted({c.caption for c in clips})
    bank = TextBank(tokenizer, captions, negative="", text_len=512)
    rows = torch.tensor([captions.index(c.caption) for c in clips])

    def new_expert(seed: int):
        torch.manual_seed(seed)
        return WanTransformer3DModel(**dit_config(recipe)).to(device)

    def t2v_phase():
        experts = {"high": new_expert(recipe.seed + 20), "low": new_expert(recipe.seed + 21)}
        log(f"T2V experts: {sum(p.numel() for p in experts['high'].parameters())} parameters each; compact "
            f"context check {check_compact_context(experts['high'], bank, encoder, latents, None):.2e}")
        train_experts(recipe, experts, BOUNDARY["t2v"], bank, encoder, rows, latents, None, recipe.dit_steps,
                      recipe.seed + 30, log, train_text=True, seconds=seconds and seconds[0])
        return {"experts": experts, "text_encoder": encoder}

    def t2v_restore(state):
        _load(encoder, state["text_encoder"])
        return {"experts": {k: _load(new_expert(0), v) for k, v in state["experts"].items()}, "text_encoder": encoder}

    arch = {**stage, "dit": dit_config(recipe), "t5": T5_CONFIG, "seconds": seconds}
    t2v = phases.run("t2v", T2V_FIELDS, arch, t2v_phase, t2v_restore)["experts"]

    def i2v_phase():
        experts = {name: extend_patch_embedding(t2v[name], 36) for name in ("high", "low")}
        log(f"I2V: {cond.shape[0]} conditions; compact context check "
            f"{check_compact_context(experts['high'], bank, encoder, latents, cond):.2e}")
        train_experts(recipe, experts, BOUNDARY["i2v"], bank, encoder, rows[:len(cond)], latents[:len(cond)], cond,
                      recipe.i2v_steps, recipe.seed + 40, log, train_text=False, seconds=seconds and seconds[1])
        return experts

    def i2v_restore(state):
        return {k: _load(extend_patch_embedding(t2v[k], 36), v) for k, v in state.items()}

    i2v = phases.run("i2v", I2V_FIELDS, arch, i2v_phase, i2v_restore)

    parts = {"tokenizer": tokenizer, "text_encoder": encoder.cpu(), "vae": vae,
             "t2v": {k: v.cpu() for k, v in t2v.items()}, "i2v": {k: v.cpu() for k, v in i2v.items()}}
    # a fresh tokenizer: the training one remembers the padding TextBank asked for, and would save it
    fresh = build_tokenizer(Path(tempfile.mkdtemp()))
    save_models(out, fresh, parts["text_encoder"], vae, {"t2v": parts["t2v"], "i2v": parts["i2v"]})
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    log(f"saved {out} ({size / 2**20:.1f} MiB)")
    if recipe.report_seeds:
        report(parts_to(parts, device), recipe, log, seeds=recipe.report_seeds)


def parts_to(parts: dict, device: str) -> dict:
    """The components on `device` (the tokenizer stays as it is; "t2v"/"i2v" are dicts of experts)."""
    moved = {}
    for name, part in parts.items():
        if name == "tokenizer":
            moved[name] = part
        elif isinstance(part, dict):
            moved[name] = {expert: model.to(device) for expert, model in part.items()}
        else:
            moved[name] = part.to(device)
    return moved


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(WEIGHTS))
    p.add_argument("--quick", action="store_true", help="a few steps of every phase (smoke run)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override recipe fields")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the shipped weights used 1)")
    p.add_argument("--work", default=None, help="keep finished phases here and resume from them")
    p.add_argument("--device", default="cpu", help="where the models train (cuda: the same recipe, faster)")
    p.add_argument("--workers", type=int, default=1, help="processes drawing the denoisers' clips")
    p.add_argument("--seconds", default=None, metavar="T2V,I2V",
                   help="for trying recipes: train each for about this long (the log says the steps it took)")
    p.add_argument("--eval", action="store_true",
                   help="only report how well the model in --out follows prompts (report_seeds seeds each)")
    p.add_argument("--vae", default=None, metavar="FOLDER",
                   help="take the VAE of the model in FOLDER instead of training one (for denoiser recipes)")
    args = p.parse_args(argv)
    recipe = QUICK if args.quick else Recipe()
    for item in args.set:
        key, value = item.split("=", 1)
        recipe = replace(recipe, **{key: type(getattr(recipe, key))(value)})
    # One thread: float sums then do not depend on the machine's core count, and on a shared machine
    # two OpenMP threads spin at every barrier while the other is descheduled (measured 10x slower).
    torch.set_num_threads(args.threads)
    if args.eval:
        report(parts_to(load_parts(Path(args.out)), args.device), recipe, Log(), seeds=recipe.report_seeds or 5)
    else:
        seconds = tuple(float(v) for v in args.seconds.split(",")) if args.seconds else None
        train(recipe, Path(args.out), Path(args.work) if args.work else None, args.device, args.workers, seconds,
              Path(args.vae) if args.vae else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
