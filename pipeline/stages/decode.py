"""Stage `decode` (Luigi task DecodeVideo): final latents -> RGB frames (VAE) -> H.264 MP4 (ffmpeg-python +
imageio-ffmpeg's binary). Needs the VAE, or with `use_tae` LightX2V's tiny VAE decoder (the params' `decoder`
is then "tae" and `vae` its fingerprint); writes the MP4 as the artifact's payload.

In a batch the encode runs on the background writer (pipeline/writer.py): the task returns once the frames
are made, and the GPU goes on with the next task while ffmpeg encodes on the CPU."""
from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import StageFailed, WanBatchError
from ..runtime import get_model
from .common import check_finite, sidecar
from .registry import Stage


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, bf16: bool = False) -> torch.Tensor:
    """Frames [F, H, W, 3] float in [0, 1], as diffusers' pipelines return them (output_type='np').

    `bf16` (config `vae_dtype: "bf16"`): the decoder's convolutions run in bfloat16 under autocast, the
    weights stay float32 (the resident VAE is shared with the image stage's encode) and autocast keeps the
    norms in float32; measured on the tiny model at 54 dB PSNR against float32 (docs/performance.md)."""
    if bf16:
        device = next(vae.parameters()).device
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return decode_latents(vae, latents)
    device = next(vae.parameters()).device
    latents = latents.to(device, vae.dtype)
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(device, latents.dtype)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(device, latents.dtype)
    video = vae.decode(latents / inv_std + mean, return_dict=False)[0]  # [1, 3, F, H, W] in [-1, 1]
    video = (video.float() / 2 + 0.5).clamp(0, 1)
    return video[0].permute(1, 2, 3, 0).cpu()


@torch.no_grad()
def decode_latents_tae(tae, latents: torch.Tensor, need_scaled: bool = False, **kw) -> torch.Tensor:
    """Frames [F, H, W, 3] float in [0, 1] from the tiny VAE decoder, as LightX2V's WanVAE_tiny.decode: the
    latents go in as the DiT made them (normalized by the Wan VAE's statistics) unless `need_scaled`
    (lighttaew2_1), which first un-normalizes them with the Wan2.1 VAE's mean and std. LightX2V maps the
    TAE's [0, 1] output to [-1, 1] and its writer maps it back; here it stays in [0, 1]."""
    from ..models.tae import WAN21_LATENTS_MEAN, WAN21_LATENTS_STD

    param = next(tae.parameters())
    latents = latents.float()
    if need_scaled:
        mean = torch.tensor(WAN21_LATENTS_MEAN).view(1, -1, 1, 1, 1)
        std = torch.tensor(WAN21_LATENTS_STD).view(1, -1, 1, 1, 1)
        latents = latents * std + mean
    video = tae(latents.to(param.device, param.dtype), **kw)  # [1, 3, F, H, W]; kw: frames_per_chunk
    return video[0].float().permute(1, 2, 3, 0).cpu()


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    return (frames * 255.0).round().clamp(0, 255).to(torch.uint8).numpy()


def ffmpeg_exe() -> str:
    """The system ffmpeg if there is one, else the binary that ships inside imageio-ffmpeg."""
    system = shutil.which("ffmpeg")
    if system:
        return system
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def mp4_command(shape: tuple[int, ...], fps: int, path: Path, crf: int = 18) -> list[str]:
    """ffmpeg's command line for write_mp4: raw rgb24 frames of `shape` [F, H, W, 3] on stdin -> `path`."""
    import ffmpeg

    _, h, w, _ = shape
    pad_h, pad_w = h % 2, w % 2  # yuv420p needs even sizes
    stream = ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{w}x{h}", r=fps)
    if pad_h or pad_w:
        stream = stream.filter("pad", w + pad_w, h + pad_h)
    stream = ffmpeg.output(stream, str(path), format="mp4", vcodec="libx264", pix_fmt="yuv420p", crf=crf,
                           preset="medium", threads=4, movflags="+faststart", map_metadata=-1,
                           **{"fflags": "+bitexact", "flags:v": "+bitexact"})
    return ffmpeg.compile(stream, cmd=ffmpeg_exe(), overwrite_output=True)


def write_mp4(frames: np.ndarray, fps: int, path: Path, crf: int = 18) -> None:
    """H.264 yuv420p MP4. Bit-exact flags and a fixed x264 thread count (x264 output depends on the thread
    count only) make a re-run give the same bytes on any machine. Raises StageFailed with ffmpeg's own last
    words when it fails."""
    frames = np.ascontiguousarray(frames)
    cmd = mp4_command(frames.shape, fps, path, crf)
    # The frames go to ffmpeg in one write from C (a copy-free view), not in the 4 KiB steps of
    # Popen.communicate, each of which takes the GIL from the thread driving the GPU; ffmpeg's messages go to
    # a file, so a chatty ffmpeg can never block on a full pipe.
    with tempfile.TemporaryFile() as log:
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=log)
        except OSError as e:  # not the store's fault: say which program
            raise StageFailed(f"ffmpeg {cmd[0]} could not be started: {e.strerror or e}") from None
        try:
            proc.stdin.write(memoryview(frames).cast("B"))
            proc.stdin.close()
        except BrokenPipeError:  # ffmpeg stopped reading: its exit code and messages say why
            pass
        code = proc.wait()
        if code != 0:
            log.seek(0)
            lines = [ln.strip() for ln in log.read().decode("utf-8", "replace").splitlines() if ln.strip()]
            said = "; ".join(lines[-3:]) or "no message"
            raise StageFailed(f"ffmpeg could not encode the video ({frames.shape[0]} frames of "
                              f"{frames.shape[2]}x{frames.shape[1]}; exit code {code}): {said}")


def read_video(path: Path) -> np.ndarray:
    """All frames of an MP4 as uint8 [F, H, W, 3]."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")  # imageio-ffmpeg's own binary
    meta = next(reader)
    w, h = meta["size"]
    frames = [np.frombuffer(buf, np.uint8).reshape(h, w, 3) for buf in reader]
    if not frames:
        raise WanBatchError(f"video {path} has no frames")
    return np.stack(frames)


VERSION = 1


def run(spec, store, run_id: str = "", on_step=None) -> dict | None:
    """Decode and write the MP4; None when the write was handed to the background writer (in a batch)."""
    t0 = time.perf_counter()
    latents = store.load_tensors(spec.upstream["latents"].ref)["latents"]
    decoder = get_model(spec, spec.params["vae"])
    if spec.params.get("decoder") == "tae":
        frames = decode_latents_tae(decoder, latents, need_scaled=bool(spec.params.get("need_scaled")))
    else:
        frames = decode_latents(decoder, latents, bf16=spec.params.get("vae_dtype") == "bfloat16")
    check_finite("frames", frames, spec)
    pixels = to_uint8(frames)
    del frames
    fps, crf = spec.params["fps"], spec.params["crf"]
    side = sidecar(spec, VERSION, run_id, time.perf_counter() - t0,
                   {"frames": int(pixels.shape[0]), "height": int(pixels.shape[1]), "width": int(pixels.shape[2])})

    def produce(tmp: Path) -> None:
        t1 = time.perf_counter()
        write_mp4(pixels, fps, tmp, crf)
        side["encode_s"] = round(time.perf_counter() - t1, 4)  # not in wall_s: it may run after the task

    return store.write_file(spec.ref, produce, side, background=True)


STAGE = Stage(name="decode", family="decode", version=VERSION, priority=10, component="vae",
              fingerprint_param="vae", task="DecodeVideo", run=run, ext="mp4")
