"""Stage `image` (Luigi task EncodeImage, I2V): image file -> resized/cropped RGB -> the 20-channel condition
(4 mask + 16 latent). Needs the VAE (and CLIP for Wan2.1 I2V); writes `cond`, the input `image` as encoded
and, for Wan2.1, `clip`."""
from __future__ import annotations

import hashlib
import io
import time

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import StageFailed, WanBatchError
from ..runtime import get_model
from .common import check_finite, sidecar
from .registry import Stage

MIN_IMAGE_SIDE = 16


def load_image_rgb(path: str, data: bytes | None = None) -> Image.Image:
    """Open any common image as 8-bit RGB (EXIF orientation applied), or raise naming the file. With `data`,
    decode those bytes (read once from `path` and already checked) instead of opening the file again."""
    try:
        with Image.open(io.BytesIO(data) if data is not None else path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit greyscale: scale, don't clip
                arr = np.asarray(img, dtype=np.float64)
                peak = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
                img = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
            elif img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                img = Image.alpha_composite(background, rgba)
            img = img.convert("RGB")
    except FileNotFoundError:
        raise WanBatchError(f"image file not found: {path}") from None
    except IsADirectoryError:
        raise WanBatchError(f"image path is a folder, not a file: {path}") from None
    except UnidentifiedImageError:
        raise WanBatchError(f"not an image (unrecognised format): {path}") from None
    except Image.DecompressionBombError as e:  # a header claiming billions of pixels: refuse before decoding
        raise WanBatchError(f"image {path} is too large to open safely: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise WanBatchError(f"image file is damaged or truncated: {path} ({e})") from None
    if min(img.size) < MIN_IMAGE_SIDE:
        raise WanBatchError(f"image {path} is {img.size[0]}x{img.size[1]}, smaller than "
                            f"{MIN_IMAGE_SIDE} px on a side")
    return img


def check_image(path: str) -> None:
    load_image_rgb(path)


def resize_center_crop(img: Image.Image, width: int, height: int) -> Image.Image:
    """Scale so the image covers width x height, then crop the centre: any input size or aspect works."""
    scale = max(width / img.width, height / img.height)
    size = (max(width, round(img.width * scale)), max(height, round(img.height * scale)))
    img = img.resize(size, Image.Resampling.LANCZOS)
    left, top = (img.width - width) // 2, (img.height - height) // 2
    return img.crop((left, top, left + width, top + height))


def first_frame_mask(num_frames: int, latent_h: int, latent_w: int, temporal: int = 4) -> torch.Tensor:
    """[1, 4, T', h, w]: 1 where a latent frame is given by the image. Same construction as Wan's I2V."""
    mask = torch.ones(1, 1, num_frames, latent_h, latent_w)
    mask[:, :, 1:] = 0
    first = torch.repeat_interleave(mask[:, :, 0:1], dim=2, repeats=temporal)
    mask = torch.concat([first, mask[:, :, 1:]], dim=2)
    return mask.view(1, -1, temporal, latent_h, latent_w).transpose(1, 2)


@torch.no_grad()
def encode_image_condition(vae, image: Image.Image, num_frames: int) -> torch.Tensor:
    """cond [1, 20, T', H/8, W/8]: the first-frame mask and the normalised VAE latent of [image, zeros...]."""
    from diffusers.video_processor import VideoProcessor

    width, height = image.size
    device = next(vae.parameters()).device
    pixels = VideoProcessor(vae_scale_factor=8).preprocess(image, height=height, width=width)
    pixels = pixels.to(device, torch.float32).unsqueeze(2)
    video = torch.cat([pixels, pixels.new_zeros(1, 3, num_frames - 1, height, width)], dim=2)
    latent = vae.encode(video.to(vae.dtype)).latent_dist.mode().float()
    mean = torch.tensor(vae.config.latents_mean, device=device).view(1, -1, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std, device=device).view(1, -1, 1, 1, 1)
    latent = (latent - mean) * inv_std
    mask = first_frame_mask(num_frames, latent.shape[3], latent.shape[4]).to(device)
    return torch.cat([mask, latent], dim=1)


@torch.no_grad()
def encode_image_clip(processor, encoder, image: Image.Image) -> torch.Tensor:
    """clip [1, tokens, width] (Wan2.1 I2V: [1, 257, 1280]): the CLIP ViT's penultimate hidden states, as
    Wan (`use_31_block`) and diffusers' WanImageToVideoPipeline take them."""
    device = next(encoder.parameters()).device
    pixels = processor(images=image, return_tensors="pt")["pixel_values"].to(device, encoder.dtype)
    return encoder(pixel_values=pixels, output_hidden_states=True).hidden_states[-2].float()


class ImageConditioned:
    """A DiT called with CLIP image features added to every forward (`encoder_hidden_states_image`), so the
    denoise loop stays the same for Wan2.1 I2V; the features are repeated for a CFG batch."""

    def __init__(self, transformer, clip: torch.Tensor):
        self.transformer = transformer
        self.clip = clip.to(transformer.dtype)

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    def __call__(self, hidden_states: torch.Tensor, **kwargs):
        image = self.clip.expand(hidden_states.shape[0], -1, -1)
        return self.transformer(hidden_states=hidden_states, encoder_hidden_states_image=image, **kwargs)


VERSION = 1


def read_checked(path: str, sha256: str) -> bytes:
    """The image file's bytes, verified against the hash its cache key was made from: an image replaced
    between planning and this stage must not be filed under the original's hash."""
    try:
        data = open(path, "rb").read()
    except OSError as e:
        raise WanBatchError(f"cannot read image {path}: {e.strerror or e}") from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256:
        raise StageFailed(f"image {path} changed after the batch was planned (sha256 {actual[:12]}, planned "
                          f"{sha256[:12]}); run the batch again to use the new image")
    return data


def run(spec, store, run_id: str = "", on_step=None) -> dict:
    t0 = time.perf_counter()
    p = spec.params
    path = spec.model["image"]
    image = resize_center_crop(load_image_rgb(path, read_checked(path, p["image_sha256"])), p["width"], p["height"])
    vae = get_model(spec, p["vae"])
    cond = encode_image_condition(vae, image, p["num_frames"])
    check_finite("cond", cond, spec)
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(p["height"], p["width"], 3)
    extra = {}
    if p.get("clip"):  # Wan2.1 I2V: CLIP image features for the DiT's image cross-attention
        processor, encoder = get_model(spec, p["clip"], component="clip")
        extra["clip"] = encode_image_clip(processor, encoder, image)
        check_finite("clip", extra["clip"], spec)
    return store.write_tensors(spec.ref, {"cond": cond, "image": pixels, **extra},
                               sidecar(spec, VERSION, run_id, time.perf_counter() - t0))


STAGE = Stage(name="image", family="image", version=VERSION, priority=40, component="vae",
              fingerprint_param="vae", task="EncodeImage", run=run)
