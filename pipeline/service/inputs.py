"""Request images -> a validated file in <service_dir>/inputs/, named by its sha256.

Sources: an http(s) URL (ImageFetcher: one deadline, size cap, concurrency cap, public addresses only unless
allowed, at most 3 redirects, each http(s)), a base64 string or
data: URL (LightX2V's image_path accepts both), an uploaded file, or a local path that must resolve (symlinks
followed) under one of the allowed folders. Every image is copied into the service folder before the
submission is committed, so a queued job never depends on a URL or a file that may change or vanish.
Problems raise RequestError with the HTTP status to answer and a message naming the field.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import io
import ipaddress
import re
import socket
from pathlib import Path

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


MAX_REDIRECTS = 3


def _refused_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Loopback, private, link-local (cloud metadata), multicast, reserved or unspecified: not the public
    internet. An IPv4-mapped IPv6 address is judged as its IPv4 address."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not ip.is_global or ip.is_multicast


class ImageFetcher:
    """Image URLs fetched on the server's event loop, never on a request thread: at most max_fetches at once,
    and one deadline (url_timeout) from waiting for a slot through DNS, connect, headers and the last byte,
    so a server that trickles its headers cannot hold a fetch past it. Each hop (at most 3 redirects, each
    http or https) is resolved once, checked, and connected to by that address (a DNS answer cannot change
    between the check and the connection): loopback, private and link-local addresses are refused unless
    allow_private_urls. Network failures all read the same ('no response'), so the errors do not tell an
    open port from a closed one."""

    def __init__(self, settings: ServiceSettings):
        self.settings = settings
        self._slots = asyncio.Semaphore(settings.max_fetches)

    async def resolve(self, value: str, field: str) -> str:
        """Any accepted image reference -> the path of its validated copy in the service folder."""
        from starlette.concurrency import run_in_threadpool

        value = value.strip()
        if value.startswith(("http://", "https://")):
            data = await self.fetch(value, field)
            return await run_in_threadpool(store_image, data, self.settings, field)
        return await run_in_threadpool(resolve_image, value, self.settings, field)

    async def fetch(self, url: str, field: str) -> bytes:
        limit = self.settings.url_timeout
        try:
            async with asyncio.timeout(limit):
                async with self._slots:
                    return await self._fetch(url, field)
        except TimeoutError:
            raise RequestError(400, f"{field}: fetching {url} timed out: not done within {limit:g} s (from "
                                    "connecting to the last byte)") from None

    async def _address(self, host: str, port: int, url: str, field: str) -> str:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError):
            raise RequestError(400, f"{field}: could not fetch {url} (the host name does not resolve)") from None
        addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
        if not self.settings.allow_private_urls and any(_refused_address(a) for a in addresses):
            raise RequestError(403, f"{field}: {url} names a loopback, private or link-local address; this "
                                    "server fetches only public addresses (start it with --allow-private-urls "
                                    "to allow them)")
        return str(addresses[0])

    async def _fetch(self, url: str, field: str) -> bytes:
        import httpx

        cap = self.settings.max_image_bytes
        async with httpx.AsyncClient(timeout=self.settings.url_timeout, follow_redirects=False,
                                     trust_env=False) as client:
            for _ in range(MAX_REDIRECTS + 1):
                try:
                    target = httpx.URL(url)
                except httpx.InvalidURL:
                    raise RequestError(422, f"{field}: not a valid URL ({url[:200]!r})") from None
                if target.scheme not in ("http", "https") or not target.host:
                    raise RequestError(400, f"{field}: {url} is not an http(s) URL")
                port = target.port or (443 if target.scheme == "https" else 80)
                ip = await self._address(target.host, port, url, field)
                pinned = target.copy_with(host=ip)
                request = client.build_request("GET", pinned, headers={"Host": target.netloc.decode("ascii")},
                                               extensions={"sni_hostname": target.host})
                try:
                    response = await client.send(request, stream=True)
                except httpx.HTTPError:
                    raise RequestError(400, f"{field}: could not fetch {url} (no response)") from None
                try:
                    if response.is_redirect:
                        location = response.headers.get("location", "")
                        url = str(target.join(location))
                        continue
                    if response.status_code != 200:
                        raise RequestError(400, f"{field}: fetching {url} gave HTTP {response.status_code}")
                    declared = response.headers.get("content-length")
                    if declared and declared.isdigit() and int(declared) > cap:
                        raise RequestError(413, f"{field}: {url} is {declared} bytes, over this server's limit "
                                                f"of {cap}")
                    data = bytearray()
                    try:
                        async for chunk in response.aiter_bytes():
                            data += chunk
                            if len(data) > cap:
                                raise RequestError(413, f"{field}: {url} is over this server's limit of {cap} "
                                                        "bytes")
                    except httpx.HTTPError:
                        raise RequestError(400, f"{field}: could not fetch {url} (the response broke off)") from None
                    return bytes(data)
                finally:
                    await response.aclose()
        raise RequestError(400, f"{field}: {url} redirects more than {MAX_REDIRECTS} times")


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
    """A base64 or local-path image reference -> the path of its validated copy in the service folder."""
    value = value.strip()
    if value.startswith(("http://", "https://")):  # fetched by ImageFetcher, on the event loop
        raise ValueError("http(s) URLs are fetched by ImageFetcher.resolve, on the event loop")
    data = decode_base64(value)
    if data is not None:
        return store_image(data, settings, field)
    if "://" in value and not value.startswith("file://"):
        raise RequestError(422, f"{field}: only http(s) URLs are fetched (got {value[:80]!r})")
    return store_image(read_local(value, settings, field), settings, field)
