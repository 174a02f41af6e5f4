"""The FastAPI app: the seed service's routes (/submit, /status/{id}, /health, /metrics, /docs), the videos,
and LightX2V's /v1 routes (lightx2v_compat.py). Handlers that touch files, URLs or SQLite run in the thread
pool; the work itself is in the worker process."""
from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from .. import __version__
from .core import Service
from .inputs import RequestError, store_image
from .lightx2v_compat import lightx2v_router
from .metrics import render
from .schemas import (StatusResponse, SubmitRequest, SubmitResponse, build_job, parse_image_size, random_seed)
from .settings import ServiceSettings
from .web import BodyLimitMiddleware, GuardMiddleware, plain_errors, read_submission, validation_message

SEED_NAMES = {"target_width": "image_size (width)", "target_height": "image_size (height)",
              "target_video_length": "num_frames", "infer_steps": "infer_steps",
              "sample_guide_scale": "guidance_scale"}
UPLOAD_FIELDS = ("image", "image_file")


def _submit_openapi() -> dict:
    schema = SubmitRequest.model_json_schema()
    form = {"type": "object", "required": ["prompt"],
            "properties": {**schema["properties"], "image": {"type": "string", "format": "binary",
                                                             "description": "first frame (instead of image_url)"}}}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema},
                                                          "multipart/form-data": {"schema": form}}}}


def seed_job(service: Service, req: SubmitRequest, upload: tuple[str, bytes] | None) -> dict:
    """A /submit request -> job: the values checked, an uploaded image validated and stored (an image_url is
    resolved after this, by the caller, on the event loop)."""
    width = height = None
    if req.image_size is not None:
        width, height = parse_image_size(req.image_size)
    seed = req.seed if req.seed is not None else random_seed()
    job = build_job(service.settings, req.prompt, seed, req.negative_prompt, None, width, height, req.num_frames,
                    req.infer_steps, req.guidance_scale, names=SEED_NAMES)
    if upload and req.image_url:
        raise RequestError(422, "image_url: send an image URL or upload an image, not both")
    if upload:
        job["image"] = store_image(upload[1], service.settings, upload[0])
    return job


def create_app(settings: ServiceSettings, start_worker: bool = True) -> FastAPI:
    service = Service(settings, start_worker=start_worker)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if service.supervisor:
            service.supervisor.start()
        yield
        if service.supervisor:
            await run_in_threadpool(service.supervisor.stop)

    app = FastAPI(title="wan-batch service", version=__version__, lifespan=lifespan,
                  description="Wan2.1/2.2 video generation over the wan-batch engine: a durable queue, one worker "
                              "with resident models, jobs grouped stage-major, every stage cached in the store.")
    app.state.service = service
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes)
    # added last, so it runs first: refused requests never reach the body limit, the docs or a route
    app.add_middleware(GuardMiddleware, token=settings.token, origins=settings.own_origins(),
                       public_metrics=settings.public_metrics)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError):
        headers = {"Retry-After": "5"} if exc.status == 503 else None
        return JSONResponse({"detail": exc.message}, status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        errors = list(exc.errors())
        return JSONResponse({"detail": validation_message(errors), "errors": plain_errors(errors)}, status_code=422)

    def url(request: Request, name: str, **params) -> str:
        """An absolute URL from the configured public URL (never the request's Host header); the path alone
        when the server knows no public URL (in-process test clients)."""
        return settings.public_url.rstrip("/") + str(request.app.url_path_for(name, **params))

    @app.get("/", include_in_schema=False)
    def index():
        return {"service": "wan-batch", "version": __version__, "docs": "/docs",
                "endpoints": ["/submit", "/status/{task_id}", "/videos/{task_id}.mp4", "/health", "/metrics",
                              "/v1/tasks/video/"]}

    @app.post("/submit", response_model=SubmitResponse, openapi_extra=_submit_openapi(),
              summary="Submit a video job (JSON, or multipart with an uploaded image)")
    async def submit(request: Request):
        req, upload = await read_submission(request, SubmitRequest, UPLOAD_FIELDS, settings.max_image_bytes)
        job = await run_in_threadpool(seed_job, service, req, upload)  # cheap checks before any fetch
        if not upload and req.image_url:
            job["image"] = await service.images.resolve(req.image_url, "image_url")
        task = await run_in_threadpool(service.enqueue, job, "seed")
        return SubmitResponse(task_id=task.id, status=task.state,
                              status_url=url(request, "status", task_id=task.id),
                              queue_position=await run_in_threadpool(service.queue.position, task))

    @app.get("/status/{task_id}", name="status", response_model=StatusResponse,
             summary="queued/running (stage, progress), done (video_url) or failed (error)")
    def status(task_id: str, request: Request):
        task = service.get(task_id)
        body = service.describe(task)
        if service.video_file(task) is not None:
            body["video_url"] = url(request, "video", task_id=task.id)
        return body

    @app.get("/videos/{task_id}.mp4", name="video", response_class=FileResponse,
             summary="The finished MP4")
    def video(task_id: str):
        task = service.get(task_id)
        path = service.video_file(task)
        if path is None:
            raise RequestError(404, f"task {task_id} has no video (status {task.state})")
        return FileResponse(path, media_type="video/mp4", filename=f"{task_id}.mp4")

    @app.get("/health", summary="Worker, models, device and queue depth; 503 unless ready (no token needed)")
    def health():
        code, body = service.health()
        return JSONResponse(body, status_code=code)

    @app.get("/metrics", summary="Prometheus text format")
    def metrics():
        return Response(render(service), media_type=CONTENT_TYPE_LATEST)

    app.include_router(lightx2v_router(service))
    return app
