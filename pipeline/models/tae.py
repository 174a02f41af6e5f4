"""LightX2V's tiny VAE decoder (config `use_tae`): madebyollin's TAEHV for Wan2.1's latent space, as
LightX2V's WanVAE_tiny runs it (lightx2v/models/video_encoders/hf/tae.py, wan/vae_tiny.py).

The published files are `taew2_1.pth` (madebyollin/taehv, a plain state dict) and LightX2V's
`lighttaew2_1.safetensors` (the same architecture, trained on un-normalized latents: `need_scaled`). Both hold
the whole TAEHV state dict, `encoder.N...` and `decoder.N...` named by the index of each layer in its
nn.Sequential; LightX2V loads them strictly, so a file here must hold exactly those keys and shapes. Only the
decoder runs: LightX2V's use_tae replaces the Wan VAE's decoder and keeps the full VAE for the I2V encode.

The decoder is causal in time: each MemBlock sees its own input of the previous frame (zeros before the
first), and two TGrow layers turn each latent frame into 4 frames. LightX2V walks that graph one frame at a
time (parallel=False); `TinyVaeDecoder` runs chunks of latent frames at once and carries each MemBlock's last
input frame from one chunk to the next, which is the same computation with fewer, larger convolutions.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError

TAE_FILE = "taew2_1.pth"  # LightX2V's tiny_vae_name for Wan2.1 and Wan2.2 A14B (wan_runner.py)
# find_torch_model_path's sub-folders of model_path, in the order it tries them (each is inserted at the
# front of the list, so the last named is tried first), then model_path itself
SEARCH_DIRS = ("distill_int8", "distill_fp8", "distill_models", "int8", "fp8", "original", ".")
LATENT_CHANNELS = 16
WIDTHS = (256, 128, 64, 64)  # TAEHV's decoder n_f
ENCODER_WIDTH = 64
TIME_UPSCALE = 4  # two TGrow(stride 2) layers
FRAMES_TO_TRIM = TIME_UPSCALE - 1  # 2 ** sum(decoder_time_upscale) - 1: T latent frames -> 4T - 3 frames
# WanVAE_tiny's need_scaled statistics: the Wan2.1 VAE's latent mean / std (those of diffusers'
# AutoencoderKLWan defaults and Wan-AI's vae/config.json)
WAN21_LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                      0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                     3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


def _conv(n_in: int, n_out: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, bias=bias)


class Clamp(nn.Module):
    """Soft clamp of the latents to (-3, 3)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class MemBlock(nn.Module):
    """Residual block that also reads its input of the previous frame (`past`). Widths never change inside
    the Wan decoder, so its skip is the identity (TAEHV's 1x1 skip conv exists only for n_in != n_out)."""

    def __init__(self, n: int):
        super().__init__()
        self.conv = nn.Sequential(_conv(2 * n, n), nn.ReLU(), _conv(n, n), nn.ReLU(), _conv(n, n))

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(torch.cat([x, past], 1)) + x)


class TGrow(nn.Module):
    """One frame -> `stride` frames: a 1x1 conv to stride x channels, channel group j is frame j."""

    def __init__(self, n: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n, n * stride, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, c, h, w = x.shape
        return self.conv(x).reshape(-1, c, h, w)


class TinyVaeDecoder(nn.Module):
    """TAEHV's Wan2.1 decoder; `decoder` keeps TAEHV's layer indices, so its state dict keys are the file's."""

    def __init__(self) -> None:
        super().__init__()
        a, b, c, d = WIDTHS
        self.decoder = nn.Sequential(
            Clamp(), _conv(LATENT_CHANNELS, a), nn.ReLU(),
            MemBlock(a), MemBlock(a), MemBlock(a), nn.Upsample(scale_factor=2), TGrow(a, 1), _conv(a, b, bias=False),
            MemBlock(b), MemBlock(b), MemBlock(b), nn.Upsample(scale_factor=2), TGrow(b, 2), _conv(b, c, bias=False),
            MemBlock(c), MemBlock(c), MemBlock(c), nn.Upsample(scale_factor=2), TGrow(c, 2), _conv(c, d, bias=False),
            nn.ReLU(), _conv(d, 3),
        )

    @torch.no_grad()
    def forward(self, latents: torch.Tensor, frames_per_chunk: int = 4) -> torch.Tensor:
        """Latents [N, 16, T, h, w] -> video [N, 3, 4T - 3, 8h, 8w] in [0, 1] (TAEHV's decode_video: clamp,
        then the first 3 frames dropped, as LightX2V returns 4k + 1 frames)."""
        x = latents.transpose(1, 2)  # N T C H W
        memory: list[torch.Tensor | None] = [None] * len(self.decoder)
        parts = [self._run(chunk, memory) for chunk in x.split(max(1, frames_per_chunk), dim=1)]
        video = torch.cat(parts, 1).clamp(0, 1)[:, FRAMES_TO_TRIM:]
        return video.transpose(1, 2)

    def _run(self, frames: torch.Tensor, memory: list[torch.Tensor | None]) -> torch.Tensor:
        """Consecutive latent frames [N, t, C, H, W] through every layer; `memory[i]` is MemBlock i's input of
        the frame before this chunk (updated here)."""
        n = frames.shape[0]
        x = frames.flatten(0, 1)  # each sample's frames in order
        for i, layer in enumerate(self.decoder):
            if isinstance(layer, MemBlock):
                seq = x.unflatten(0, (n, -1))
                prev = memory[i] if memory[i] is not None else torch.zeros_like(seq[:, :1])
                past = torch.cat([prev, seq[:, :-1]], 1).flatten(0, 1)
                memory[i] = seq[:, -1:].clone()
                x = layer(x, past)
            else:
                x = layer(x)
        return x.unflatten(0, (n, -1))


def _memblock_shapes(prefix: str, n: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.conv.0.weight": (n, 2 * n, 3, 3), f"{prefix}.conv.0.bias": (n,),
            f"{prefix}.conv.2.weight": (n, n, 3, 3), f"{prefix}.conv.2.bias": (n,),
            f"{prefix}.conv.4.weight": (n, n, 3, 3), f"{prefix}.conv.4.bias": (n,)}


def encoder_shapes() -> dict[str, tuple[int, ...]]:
    """The published file's encoder tensors (TAEHV's encoder Sequential: conv, ReLU, then three times
    TPool, stride-2 conv, 3 MemBlocks; a final conv to the latent channels). Not run here, but LightX2V's
    strict load needs them, so a file without them is not one LightX2V loads."""
    c = ENCODER_WIDTH
    shapes: dict[str, tuple[int, ...]] = {"encoder.0.weight": (c, 3, 3, 3), "encoder.0.bias": (c,)}
    for pool, stride in ((2, 2), (7, 2), (12, 1)):
        shapes[f"encoder.{pool}.conv.weight"] = (c, c * stride, 1, 1)
        shapes[f"encoder.{pool + 1}.weight"] = (c, c, 3, 3)
        for i in range(pool + 2, pool + 5):
            shapes.update(_memblock_shapes(f"encoder.{i}", c))
    shapes["encoder.17.weight"], shapes["encoder.17.bias"] = (LATENT_CHANNELS, c, 3, 3), (LATENT_CHANNELS,)
    return shapes


def expected_shapes() -> dict[str, tuple[int, ...]]:
    """Every key and shape of a published Wan2.1 tiny VAE file."""
    decoder = {k: tuple(v.shape) for k, v in _meta_decoder().state_dict().items()}
    return {**encoder_shapes(), **decoder}


def _meta_decoder() -> TinyVaeDecoder:
    with torch.device("meta"):
        return TinyVaeDecoder()


def _check_suffix(path: Path) -> None:
    if path.suffix.lower() not in (".pth", ".safetensors"):
        raise CheckpointError(f"tiny VAE file {path}: must be .pth or .safetensors (LightX2V's TAEHV loads "
                              f"only those)")


def read_shapes(path: Path) -> tuple[dict[str, tuple[int, ...]], set[torch.dtype]]:
    """(key -> shape, dtypes) of a tiny VAE file, from its header (.safetensors) or a memory map (.pth)."""
    from .checkpoint import TensorFiles, load_pth

    path = Path(path)
    _check_suffix(path)
    if not path.is_file():
        raise CheckpointError(f"tiny VAE file not found: {path}")
    if path.suffix.lower() == ".safetensors":
        with TensorFiles([path]) as files:
            return {k: files.shape(k) for k in files.keys()}, {files.dtype(k) for k in files.keys()}
    sd = load_pth(path)
    return {k: tuple(v.shape) for k, v in sd.items()}, {v.dtype for v in sd.values()}


def check_tae(path: Path) -> str:
    """Check a tiny VAE file's keys, shapes and dtypes against the published layout (nothing is built);
    returns a description for check-config, raises CheckpointError naming the file and keys."""
    from .wan_layout import check_shapes

    shapes, dtypes = read_shapes(path)
    expected = expected_shapes()
    check_shapes(shapes, expected, f"tiny VAE file {path}", shape_of=lambda s: s)
    bad = sorted(str(d).replace("torch.", "") for d in dtypes if not d.is_floating_point)
    if bad:
        raise CheckpointError(f"tiny VAE file {path}: tensors of dtype {', '.join(bad)} (expected floats)")
    names = ", ".join(sorted(str(d).replace("torch.", "") for d in dtypes))
    run = sum(1 for k in expected if k.startswith("decoder."))
    return f"TAEHV tiny VAE, Wan2.1 latents ({len(shapes)} tensors, {names}; the decoder's {run} run)"


def load_tae(path: Path, device: torch.device, dtype: torch.dtype) -> TinyVaeDecoder:
    """The decoder of a published tiny VAE file, in `dtype` on `device` (.pth with weights_only=True)."""
    from .checkpoint import TensorFiles, load_pth

    path = Path(path)
    check_tae(path)
    if path.suffix.lower() == ".safetensors":
        with TensorFiles([path]) as files:
            sd = {k: files.get(k) for k in files.keys() if k.startswith("decoder.")}
    else:
        sd = {k: v for k, v in load_pth(path).items() if k.startswith("decoder.")}
    model = TinyVaeDecoder()
    model.load_state_dict(sd, strict=True)
    return model.to(device, dtype).eval()


def find_tae(config: Any, folder: Path) -> tuple[str, str]:
    """(file, where it came from) of the tiny VAE, as LightX2V's find_torch_model_path(config, "tae_path",
    "taew2_1.pth") finds it: the config's tae_path, else taew2_1.pth in model_path's sub-folders (SEARCH_DIRS
    order), else in model_path itself. A missing file is refused here, naming it (LightX2V fails on load)."""
    value = config.get("tae_path")
    if value:
        where, how = config.locate(value)
        path = Path(where)
        _check_suffix(path)
        if not path.is_file():
            raise CheckpointError(f"config key 'tae_path': tiny VAE file not found: {where} [{how}]")
        return str(path), f"tae_path, {how}"
    tried = [folder / sub / TAE_FILE for sub in SEARCH_DIRS]
    for path in tried:
        if path.is_file():
            return str(path.resolve()), f"found under the model folder as {path.relative_to(folder)}"
    raise CheckpointError(f"config key 'use_tae': no tae_path and no {TAE_FILE} under the model folder {folder} "
                          f"(looked in {', '.join(str(p.relative_to(folder)) for p in tried)}): set tae_path to "
                          f"the tiny VAE file (taew2_1.pth or lighttaew2_1.safetensors)")
