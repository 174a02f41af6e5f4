"""HTTP plumbing shared by both APIs: body size limit, bearer token, reading a JSON or multipart submission,
and turning validation errors into one readable message."""
from __future__ import annotations

import hmac
import json
from typing import Any

from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from .inputs import RequestError

JSON_TYPES = ("application/json", "text/json")
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


class BodyTooLarge(HTTPException):
    """An HTTPException, so FastAPI's body parsing passes it through instead of answering 400."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body over this server's limit of {limit} bytes")


class BodyLimitMiddleware:
    """Refuse bodies over `limit` bytes: at once from Content-Length, or while reading a chunked body."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            body = json.dumps({"detail": BodyTooLarge(self.limit).detail}).encode()
            await send({"type": "http.response.start", "status": 413,
                        "headers": [(b"content-type", b"application/json"), (b"connection", b"close"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        await self.app(scope, counted, send)


OPEN_PATHS = ("/health",)  # probes need no token; /metrics too when the operator says so
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
AUTH_HINT = "missing or wrong bearer token (send 'Authorization: Bearer <token>')"


def token_ok(header: str, token: str) -> bool:
    scheme, _, value = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode())


def _reply(status: int, detail: str, headers: list[tuple[bytes, bytes]] = ()):
    body = json.dumps({"detail": detail}).encode()
    return ({"type": "http.response.start", "status": status,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                         *headers]},
            {"type": "http.response.body", "body": body})


class GuardMiddleware:
    """Before any route (the docs and OpenAPI schema included): the bearer token when one is set, on every
    path but /health (and /metrics with public_metrics); and for state-changing methods, no cross-origin
    browser request (an Origin other than this server's own, or Sec-Fetch-Site cross-site/same-site), so a
    web page the local user opens cannot queue or cancel work. Clients that are not browsers send neither
    header and are unaffected."""

    def __init__(self, app, token: str | None, origins: list[str], public_metrics: bool = False):
        self.app, self.token, self.origins = app, token, set(origins)
        self.open = OPEN_PATHS + (("/metrics",) if public_metrics else ())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = None
        if scope["method"] not in SAFE_METHODS:
            origin, site = headers.get("origin"), headers.get("sec-fetch-site", "")
            if site in ("cross-site", "same-site") or (origin is not None and origin not in self.origins):
                refusal = _reply(403, f"cross-origin request refused (Origin {origin or '(none)'}, Sec-Fetch-Site "
                                      f"{site or '(none)'}): this server accepts changes only from clients that "
                                      "are not web pages of another site")
        if refusal is None and self.token and scope["path"] not in self.open:
            if not token_ok(headers.get("authorization", ""), self.token):
                refusal = _reply(401, AUTH_HINT, [(b"www-authenticate", b"Bearer")])
        if refusal is not None:
            for message in refusal:
                await send(message)
            return
        await self.app(scope, receive, send)


def parse_json(text: str | bytes, field: str) -> Any:
    """JSON text -> value; 422 for bad JSON, and for nesting deeper than the parser's recursion limit
    (json raises RecursionError there, before it uses much memory or time)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise RequestError(422, f"{field}: JSON nested too deeply") from None
    except ValueError as e:
        raise RequestError(422, f"{field}: not valid JSON ({str(e)[:200]})") from None


def validation_message(errors: list[dict[str, Any]]) -> str:
    parts = []
    for e in errors:
        loc = [str(x) for x in e.get("loc", ()) if x not in ("body", "query", "path", "form")]
        parts.append(f"{'.'.join(loc) or 'body'}: {e.get('msg')}")
    return "; ".join(parts)


def plain_errors(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pydantic errors without their (not always JSON-able) context objects."""
    return [{"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")} for e in errors]


async def read_upload(upload: UploadFile, limit: int, field: str) -> bytes:
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise RequestError(413, f"{field}: the uploaded image is over this server's limit of {limit} bytes")
    if not data:
        raise RequestError(422, f"{field}: the uploaded file is empty")
    return data


async def read_submission(request: Request, model: type[BaseModel], file_fields: tuple[str, ...],
                          image_limit: int) -> tuple[BaseModel, tuple[str, bytes] | None]:
    """The request as `model` (from JSON or form fields) and the uploaded image (field, bytes), if any."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    upload = None
    if ctype in JSON_TYPES or ctype.endswith("+json"):
        data = parse_json(await request.body(), "body")
        if not isinstance(data, dict):
            raise RequestError(422, f"body: expected a JSON object, got {type(data).__name__}")
    elif ctype in FORM_TYPES:
        form = await request.form(max_files=1, max_fields=64)
        data = {}
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key not in file_fields:
                    raise RequestError(422, f"{key}: unexpected file (upload the image as "
                                            f"{' or '.join(file_fields)})")
                if value.filename:
                    upload = (key, await read_upload(value, image_limit, key))
            elif value != "":
                data[key] = _form_value(model, key, value)
    else:
        raise RequestError(415, f"send application/json or multipart/form-data (got {ctype or 'no content type'})")
    try:
        return model.model_validate(data), upload
    except ValidationError as e:
        raise RequestValidationError(e.errors()) from None


def _form_value(model: type[BaseModel], key: str, value: str) -> Any:
    """Form fields are strings; a list-valued field arrives as JSON text (as LightX2V's form routes accept)."""
    field = model.model_fields.get(key)
    if field is not None and "list" in str(field.annotation).lower() and value.lstrip().startswith("["):
        return parse_json(value, key)
    return value
