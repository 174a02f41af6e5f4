"""Request images -> a validated file in <service_dir>/inputs/, named by its sha256.

Sources: an http(s) URL (overall timeout, size cap, at most 3 redirects, each http(s)), a base64 string or
data: URL (LightX2V's image_path accepts both), an uploaded file, or a local path that must resolve (symlinks
followed) under one of the allowed folders. Every image is copied into the service folder before the
submission is committed, so a queued job never depends on a URL or a file that may change or vanish.
Problems raise RequestError with the HTTP status to answer and a message naming the field.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
import time
from pathlib import Path
from urllib.parse import urlparse

from PIL import Image, UnidentifiedImageError

from ..errors import WanBatchError
from ..stages.image import check_image
from ..store import atomic_path
from .settings import ServiceSettings

_DATA_URL = re.compile(r"^data:image/[A-Za-z0-9.+-]+;base64,(.*)$", re.S)
_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM")


class RequestError(Exception):
    """A request the server refuses: `status` is the HTTP status to answer, `message` says why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def store_image(data: bytes, settings: ServiceSettings, field: str) -> str:
    """Validate image bytes and write them (once) to inputs/<sha256>.<ext>; return the absolute path."""
    if len(data) > settings.max_image_bytes:
        raise RequestError(413, f"{field}: the image has {len(data)} bytes, over this server's limit of "
                              f"{settings.max_image_bytes}")
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            fmt = (img.format or "img").lower()
            if width * height > settings.max_image_pixels:
                raise RequestError(413, f"{field}: the image is {width}x{height}, over this server's limit of "
                                      f"{settings.max_image_pixels} pixels")
    except Image.DecompressionBombError:
        raise RequestError(413, f"{field}: the image is too large to decode safely") from None
    except UnidentifiedImageError:
        raise RequestError(422, f"{field}: not an image (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise RequestError(422, f"{field}: the image is damaged ({e})") from None
    dest = settings.inputs / f"{hashlib.sha256(data).hexdigest()}.{fmt}"
    if not dest.is_file():
        try:
            with atomic_path(dest) as tmp:
                tmp.write_bytes(data)
                check_image(str(tmp))  # the engine's own loader: truncated data, tiny images, odd modes
        except WanBatchError as e:
            raise RequestError(422, f"{field}: {str(e).replace(str(tmp), 'the image')}") from None
    return str(dest)


def fetch_url(url: str, settings: ServiceSettings, field: str) -> bytes:
    import httpx

    if urlparse(url).scheme not in ("http", "https"):
        raise RequestError(422, f"{field}: only http(s) URLs are fetched (got {url!r})")
    cap, deadline = settings.max_image_bytes, time.monotonic() + settings.url_timeout
    try:
        with httpx.Client(timeout=settings.url_timeout, follow_redirects=True, max_redirects=3,
                          trust_env=False) as client, client.stream("GET", url) as response:
            if response.status_code != 200:
                raise RequestError(400, f"{field}: fetching {url} gave HTTP {response.status_code}")
            declared = response.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > cap:
                raise RequestError(413, f"{field}: {url} is {declared} bytes, over this server's limit of {cap}")
            data = bytearray()
            for chunk in response.iter_bytes():
                data += chunk
                if len(data) > cap:
                    raise RequestError(413, f"{field}: {url} is over this server's limit of {cap} bytes")
                if time.monotonic() > deadline:
                    raise RequestError(400, f"{field}: fetching {url} took over {settings.url_timeout:g} s")
            return bytes(data)
    except httpx.TimeoutException:
        raise RequestError(400, f"{field}: fetching {url} timed out after {settings.url_timeout:g} s") from None
    except httpx.TooManyRedirects:
        raise RequestError(400, f"{field}: {url} redirects more than 3 times") from None
    except httpx.UnsupportedProtocol as e:
        raise RequestError(400, f"{field}: {url} redirects to a non-http(s) address ({e})") from None
    except httpx.HTTPError as e:
        raise RequestError(400, f"{field}: could not fetch {url} ({type(e).__name__}: {e})") from None


def decode_base64(value: str) -> bytes | None:
    """The image bytes if `value` is a data: URL or base64 of a PNG/JPEG/GIF/BMP/WebP file, else None."""
    m = _DATA_URL.match(value)
    text = m.group(1) if m else value
    if not m and (len(text) < 16 or len(text) % 4):
        return None
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    if m or data.startswith(_MAGIC) or (len(data) > 12 and data[8:12] == b"WEBP"):
        return data
    return None


def read_local(value: str, settings: ServiceSettings, field: str) -> bytes:
    path = Path(value[len("file://"):] if value.startswith("file://") else value).expanduser()
    if not settings.allowed_image_dirs:
        raise RequestError(403, f"{field}: local image paths are disabled on this server (start it with "
                              f"--allow-image-dir FOLDER); send an http(s) URL or upload the image")
    if not path.is_absolute():
        raise RequestError(422, f"{field}: a local image path must be absolute (got {value!r})")
    real = path.resolve()
    if not any(real.is_relative_to(d) for d in settings.allowed_image_dirs):
        raise RequestError(403, f"{field}: {value} is outside the allowed image folders "
                              f"({', '.join(settings.allowed_image_dirs)})")
    if not real.is_file():
        raise RequestError(422, f"{field}: image file not found: {value}")
    if real.stat().st_size > settings.max_image_bytes:
        raise RequestError(413, f"{field}: {value} has {real.stat().st_size} bytes, over this server's limit of "
                              f"{settings.max_image_bytes}")
    return real.read_bytes()


def resolve_image(value: str, settings: ServiceSettings, field: str) -> str:
    """Any accepted image reference -> the path of its validated copy in the service folder."""
    value = value.strip()
    if value.startswith(("http://", "https://")):
        return store_image(fetch_url(value, settings, field), settings, field)
    data = decode_base64(value)
    if data is not None:
        return store_image(data, settings, field)
    if "://" in value and not value.startswith("file://"):
        raise RequestError(422, f"{field}: only http(s) URLs are fetched (got {value[:80]!r})")
    return store_image(read_local(value, settings, field), settings, field)
