"""LightX2V's server API (lightx2v/server/api), so its scripts/server/post.py and friends work unchanged.

POST /v1/tasks/video/ (and the older POST /v1/tasks/) take VideoTaskRequest; POST /v1/tasks/video/form takes
the same as a form with image_file. As in LightX2V, only the fields a request sets override the server
config, an unset seed is random, image_path is base64, an http(s) URL or a local path (here: only under the
allowed folders), and save_result_path is relative to the server's outputs folder (<service>/outputs) or
absolute inside it or an --output-root folder. Statuses are LightX2V's: pending, processing, completed, failed,
cancelled, with error and error_type; a completed task's save_result_path is the file's name, as there.
Features LightX2V has and this engine does not (prompt enhancer, audio, LoRA per request, frame
interpolation, fragments, masks, video input, super-resolution, presigned upload, reuse, disaggregation) are
refused with 422 naming the field when a request sets them; so are fields LightX2V does not know.
"""
from __future__ import annotations

import datetime as dt
import uuid
from pathlib import PurePosixPath
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse

from .core import Service
from .inputs import RequestError, store_image
from .queue import TaskRow
from .schemas import (LIGHTX2V_UNSUPPORTED, TaskResponse, VideoTaskRequest, build_job, check_save_result_path,
                      check_task_id, request_lora)
from .web import read_submission

STATUS = {"queued": "pending", "running": "processing", "done": "completed", "failed": "failed",
          "cancelled": "cancelled"}
NAMES = {"target_height": "target_shape[0] (height)", "target_width": "target_shape[1] (width)",
         "target_video_length": "target_video_length", "infer_steps": "infer_steps"}


def _iso(ts: float | None) -> str | None:
    return dt.datetime.fromtimestamp(ts).isoformat() if ts else None


def lightx2v_job(service: Service, req: VideoTaskRequest, upload: tuple[str, bytes] | None) -> tuple[str, dict]:
    given = req.model_fields_set
    for name, (default, why) in LIGHTX2V_UNSUPPORTED.items():
        if name in given and getattr(req, name) != default:
            raise RequestError(422, f"{name}: {why} on this server")
    if not req.prompt.strip():
        raise RequestError(422, "prompt: must not be empty")
    fps = service.config["fps"]
    if "target_fps" in given and req.target_fps not in (None, fps):
        raise RequestError(422, f"target_fps: frame interpolation is not available; this server writes {fps} fps")
    task_id = check_task_id(req.task_id) if req.task_id else uuid.uuid4().hex
    height = width = None
    if req.target_shape:
        if len(req.target_shape) != 2:
            raise RequestError(422, f"target_shape: expected [height, width], got {req.target_shape}")
        height, width = req.target_shape
    save = check_save_result_path(req.save_result_path or task_id, service.settings)
    job = build_job(service.settings, req.prompt, req.seed,
                    negative_prompt=req.negative_prompt if "negative_prompt" in given else None,
                    width=width, height=height,
                    num_frames=req.target_video_length if "target_video_length" in given else None,
                    infer_steps=req.infer_steps if "infer_steps" in given else None,
                    names=NAMES, save_result_path=save)
    job["requested_save_path"] = req.save_result_path or task_id  # status shows it until the file exists
    if "lora_strength" in given and "lora_name" not in given:
        raise RequestError(422, "lora_strength: goes with lora_name")
    job.update(request_lora(service.settings, req.lora_name if "lora_name" in given else None, req.lora_strength))
    if upload:
        job["image"] = store_image(upload[1], service.settings, upload[0])
    return task_id, job


def task_status(service: Service, task: TaskRow) -> dict[str, Any]:
    d = service.describe(task)
    saved = task.job.get("requested_save_path", task.job.get("save_result_path"))
    if task.state == "done" and task.job.get("save_result_path"):
        saved = PurePosixPath(task.job["save_result_path"]).name  # LightX2V reports the file name when done
    return {"task_id": task.id, "status": STATUS[task.state], "start_time": _iso(task.started_at or task.created_at),
            "end_time": _iso(task.finished_at), "error": task.error,
            "error_type": (task.error_type or "") if task.state == "failed" else "",
            "save_result_path": saved, "stage": d["stage"], "progress": d["progress"]}


def metadata(service: Service) -> dict[str, Any]:
    """LightX2V's GET /v1/service/metadata: processes per node, model class and path."""
    config = service.config
    layout = config.get("parallel") or {}
    nproc = int(layout.get("seq_p_size", 1) or 1) * int(layout.get("cfg_p_size", 1) or 1) if layout else 1
    return {"nproc_per_node": nproc, "model_cls": config.get("model_cls") or config.get("model_format"),
            "model_path": str(config["model_path"])}


def lightx2v_router(service: Service) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["LightX2V-compatible"])
    settings = service.settings

    async def create(request: Request, file_fields: tuple[str, ...]) -> TaskResponse:
        req, upload = await read_submission(request, VideoTaskRequest, file_fields, settings.max_image_bytes)
        task_id, job = await run_in_threadpool(lightx2v_job, service, req, upload)  # cheap checks first
        if not upload and req.image_path:  # a URL is fetched on the event loop, not on a request thread
            job["image"] = await service.images.resolve(req.image_path, "image_path")
        task = await run_in_threadpool(service.enqueue, job, "lightx2v", task_id)
        return TaskResponse(task_id=task.id, task_status="pending", save_result_path=req.save_result_path or task.id)

    @router.post("/tasks/video/", response_model=TaskResponse, summary="LightX2V: create a video task (JSON)",
                 openapi_extra={"requestBody": {"required": True, "content": {
                     "application/json": {"schema": VideoTaskRequest.model_json_schema()}}}})
    async def create_video_task(request: Request):
        return await create(request, ())

    router.post("/tasks/video", response_model=TaskResponse, include_in_schema=False)(create_video_task)
    router.post("/tasks/", response_model=TaskResponse, deprecated=True, summary="LightX2V: older create route"
                )(create_video_task)

    @router.post("/tasks/video/form", response_model=TaskResponse,
                 summary="LightX2V: create a video task from a form with image_file")
    async def create_video_task_form(request: Request):
        return await create(request, ("image_file",))

    @router.get("/tasks/", summary="LightX2V: the latest 1000 tasks")
    def list_tasks():
        return {t.id: task_status(service, t) for t in service.queue.recent(1000)}

    @router.get("/tasks/queue/status", summary="LightX2V: queue status")
    def queue_status():
        counts = service.queue.counts()
        running = service.queue.running()
        active = counts["queued"] + counts["running"]
        return {"is_processing": bool(running), "current_task": running[0].id if running else None,
                "pending_count": counts["queued"], "active_count": active, "queue_size": settings.max_queue,
                "queue_available": max(0, settings.max_queue - active)}

    @router.get("/tasks/{task_id}/status", summary="LightX2V: task status")
    def get_task_status(task_id: str):
        return task_status(service, service.get(task_id))

    @router.get("/tasks/{task_id}/result", summary="LightX2V: the finished video")
    def get_task_result(task_id: str):
        task = service.get(task_id)
        path = service.video_file(task)
        if path is None:
            raise RequestError(404, "Task not completed")
        return FileResponse(path, media_type="video/mp4", filename=f"{task.id}.mp4")

    @router.delete("/tasks/all/running", summary="LightX2V: cancel every queued and running task")
    def stop_all_running_tasks():
        service.queue.cancel_all()
        return {"stop_status": "success", "reason": "All tasks stopped successfully."}

    @router.delete("/tasks/{task_id}", summary="LightX2V: cancel a task (a running one stops at its next step)")
    def stop_task(task_id: str):
        if service.queue.cancel(task_id):
            return {"stop_status": "success", "reason": "Task stopped successfully."}
        return {"stop_status": "do_nothing", "reason": "Task not found or already completed."}

    @router.get("/service/status", summary="LightX2V: service status")
    def service_status():
        counts = service.queue.counts()
        running = [t.id for t in service.queue.running()]
        return {"service_status": "busy" if running else "idle", "current_task": running[0] if running else None,
                "active_tasks": running, "pending_tasks": counts["queued"], "queue_size": settings.max_queue,
                "total_tasks": sum(counts.values()), "completed_tasks": counts["done"],
                "failed_tasks": counts["failed"]}

    @router.get("/service/metadata", summary="LightX2V: processes per node, model class and path")
    def service_metadata():
        return metadata(service)

    @router.get("/files/download/{file_path:path}", summary="LightX2V: download a file from the outputs folder")
    def download_file(file_path: str):
        if "\0" in file_path:
            raise RequestError(404, "File not found (the path holds a NUL byte)")
        root = settings.outputs.resolve()
        path = (root / file_path).resolve()
        if not path.is_relative_to(root):
            raise RequestError(403, "Access to this file is not allowed")
        if not path.is_file():
            raise RequestError(404, f"File not found: {file_path}")
        return FileResponse(path, media_type="video/mp4", filename=path.name)

    return router
