"""`wan-batch serve` over real HTTP on 127.0.0.1: a server subprocess (uvicorn + the worker process) on the
tiny model. Round trips through /submit (JSON, image URL from a local HTTP server, upload), LightX2V's
post.py request, 50 concurrent submissions (all accepted and finished, each distinct prompt encoded once),
bad requests (4xx with a message), and /metrics parsed by prometheus_client. Auth and the queue limit are
checked in-process (FastAPI's TestClient, no worker)."""
from __future__ import annotations

import base64
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from conftest import REPO

SMALL = {"image_size": "64*64", "num_frames": 5, "infer_steps": 2}
STARTUP_S = 300  # importing torch/diffusers twice on a loaded 2-core CI machine


# -- helpers shared with test_service_restart.py ------------------------------------------------------------
class Server:
    """`wan-batch serve --port 0` in a subprocess; its URL comes from <service_dir>/server.json."""

    def __init__(self, service_dir: Path, store: Path, *args: str, env: dict[str, str] | None = None):
        self.service_dir, self.store, self.args = Path(service_dir), Path(store), list(args)
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self) -> "Server":
        (self.service_dir / "server.json").unlink(missing_ok=True)
        self.service_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.service_dir / "server.out", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "serve", "--port", "0", "--service-dir", str(self.service_dir),
             "--store", str(self.store), *self.args], cwd=REPO, env=self.env, stdout=log,
            stderr=subprocess.STDOUT)
        log.close()
        deadline, health = time.monotonic() + STARTUP_S, None
        try:
            while time.monotonic() < deadline:
                assert self.proc.poll() is None, f"server exited: {self.output()}"
                info = self.service_dir / "server.json"
                if info.is_file() and json.loads(info.read_text())["pid"] == self.proc.pid:
                    self.url = json.loads(info.read_text())["url"]
                    try:
                        health = requests.get(self.url + "/health", timeout=5)
                        if health.status_code == 200:
                            return self
                        if health.json()["status"] == "degraded" and health.json()["models"]:
                            break  # the worker is up and says the models cannot run: waiting will not help
                    except requests.ConnectionError:
                        pass
                time.sleep(0.5)
        except BaseException:
            self.stop()
            raise
        self.stop()
        raise AssertionError(f"server not healthy: {health.text if health is not None else 'no answer'}\n"
                             f"{self.output()}")

    def output(self) -> str:
        tails = []
        for name in ("server.out", "worker.log"):
            p = self.service_dir / name
            if p.is_file():
                tails.append(f"--- {name}\n" + p.read_text(errors="replace")[-4000:])
        return "\n".join(tails)

    def worker_pid(self) -> int | None:
        return requests.get(self.url + "/health", timeout=10).json()["worker"]["pid"]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def submit(self, **fields) -> str:
        r = requests.post(self.url + "/submit", json=fields, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["task_id"]

    def status(self, task_id: str) -> dict:
        r = requests.get(f"{self.url}/status/{task_id}", timeout=30)
        assert r.status_code == 200, r.text
        return r.json()

    def wait(self, task_ids, timeout: float = 600) -> dict[str, dict]:
        """Poll until every task is done/failed/cancelled; a deadline, not a timing assertion. One task at a
        time (they finish roughly in order), so polling does not compete with the worker for the CPU."""
        out = {}
        deadline = time.monotonic() + timeout
        for t in task_ids:
            while True:
                st = self.status(t)
                if st["status"] in ("done", "failed", "cancelled"):
                    out[t] = st
                    break
                assert time.monotonic() < deadline, f"task {t} unfinished: {st}\n{self.output()}"
                time.sleep(0.3)
        return out


def db_rows(service_dir: Path, sql: str, args=()) -> list[tuple]:
    with sqlite3.connect(f"file:{service_dir / 'queue.sqlite'}?mode=ro", uri=True) as conn:
        return conn.execute(sql, args).fetchall()


def decode_mp4(path: Path) -> tuple[int, tuple[int, int]]:
    """(frame count, (width, height)) by decoding every frame with ffmpeg."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    return sum(1 for _ in reader), tuple(meta["size"])


def png_bytes(size=(48, 40), color=(220, 40, 40)) -> bytes:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", size, (20, 40, 160))
    ImageDraw.Draw(img).ellipse((size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2), fill=color)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# -- a local HTTP server for image URLs (127.0.0.1 only) -----------------------------------------------------
class ImageHandler(BaseHTTPRequestHandler):
    routes: dict[str, tuple[int, str, bytes]] = {}

    def do_GET(self):
        if self.path == "/slow.png":
            time.sleep(3)
        code, ctype, body = self.routes.get(self.path.split("?")[0], (404, "text/plain", b"no such file"))
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_server():
    ImageHandler.routes = {
        "/frame.png": (200, "image/png", png_bytes()),
        "/slow.png": (200, "image/png", png_bytes()),
        "/notimage.png": (200, "image/png", b"this is not an image at all, only text" * 4),
        "/big.png": (200, "image/png", b"\x89PNG\r\n\x1a\n" + b"\0" * (600 * 1024)),
    }
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), ImageHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_root):
    root = tmp_path_factory.mktemp("service")
    allowed = root / "allowed"
    allowed.mkdir()
    (allowed / "frame.png").write_bytes(png_bytes(color=(30, 200, 30)))
    (root / "outside.png").write_bytes(png_bytes())
    srv = Server(root / "svc", root / "store", "--max-queue", "200", "--batch-max", "64", "--max-body-mb", "1",
                 "--max-image-mb", "0.5", "--url-timeout", "1.5", "--allow-image-dir", str(allowed),
                 "--allow-private-urls")  # the image server of these tests is on 127.0.0.1
    srv.root = root
    srv.start()
    yield srv
    srv.stop()


# -- round trips ------------------------------------------------------------------------------------------
def test_submit_status_video_round_trip(server):
    r = requests.post(server.url + "/submit", json={"prompt": "a red circle moving left", "seed": 5, **SMALL},
                      timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    task = body["task_id"]
    assert body["status"] == "queued" and body["status_url"].endswith(f"/status/{task}")
    progress = []
    deadline = time.monotonic() + 600
    while True:
        st = server.status(task)
        if st["status"] in ("done", "failed"):
            break
        assert st["status"] in ("queued", "running") and st["stage"], st  # stage: queued, planning, text, ...
        progress.append(st["progress"])
        assert time.monotonic() < deadline, server.output()
        time.sleep(0.1)
    assert progress == sorted(progress) and all(0.0 <= p <= 1.0 for p in progress)
    assert st["status"] == "done", st
    assert st["progress"] == 1.0 and st["seed"] == 5 and st["error"] is None
    assert sorted(st["stages_done"]) == ["decode", "denoise-high", "denoise-low", "text", "text-negative"]
    assert st["video_url"].endswith(f"/videos/{task}.mp4")

    video = requests.get(st["video_url"], timeout=60)
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
    path = server.root / "fetched.mp4"
    path.write_bytes(video.content)
    assert decode_mp4(path) == (5, (64, 64))
    # the published file is the store's artifact, byte for byte
    (decode_key,) = db_rows(server.service_dir, "SELECT plan FROM tasks WHERE id = ?", (task,))[0]
    stage, key, ext = json.loads(decode_key)["decode"]
    assert (server.store / stage / key[:2] / f"{key}.{ext}").read_bytes() == video.content


def test_image_to_video_from_url_upload_and_allowed_path(server, image_server):
    by_url = server.submit(prompt="a circle moving down", image_url=image_server + "/frame.png", seed=1, **SMALL)
    files = {"image": ("frame.png", png_bytes(), "image/png")}
    form = {"prompt": "a circle moving down", "seed": "2", **{k: str(v) for k, v in SMALL.items()}}
    r = requests.post(server.url + "/submit", data=form, files=files, timeout=60)
    assert r.status_code == 200, r.text
    uploaded = r.json()["task_id"]
    local = server.submit(prompt="a circle moving down", image_url=str(server.root / "allowed" / "frame.png"),
                          seed=1, **SMALL)
    done = server.wait([by_url, uploaded, local])
    assert all(s["status"] == "done" for s in done.values()), done
    for t in (by_url, uploaded, local):
        assert "image" in done[t]["stages_done"]
        assert decode_mp4(server.service_dir / "videos" / f"{t}.mp4") == (5, (64, 64))
    # URL and upload carry the same image and seed 1 vs 2: same image artifact, different videos
    plans = {t: json.loads(p) for t, p in db_rows(server.service_dir, "SELECT id, plan FROM tasks WHERE id IN "
                                                  "(?, ?, ?)", (by_url, uploaded, local))}
    assert plans[by_url]["image"] == plans[uploaded]["image"] != plans[local]["image"]
    assert plans[by_url]["decode"] != plans[uploaded]["decode"]


def test_lightx2v_post_py_request(server):
    """The request of LightX2V's scripts/server/post.py, sent the way it sends it (requests, json=...)."""
    url = server.url + "/v1/tasks/video/"
    message = {
        "prompt": "Two anthropomorphic cats in comfy boxing gear and bright gloves fight intensely on a stage.",
        "negative_prompt": "blurry, static, low quality",
        "image_path": "",
        "seed": 42,
        "save_result_path": "./cat_boxing_seed42.mp4",
    }
    response = requests.post(url, json=message)
    assert response.status_code == 200, response.text
    reply = response.json()
    assert set(reply) == {"task_id", "task_status", "save_result_path"}
    assert reply["task_status"] == "pending" and reply["save_result_path"] == "./cat_boxing_seed42.mp4"
    task = reply["task_id"]

    deadline = time.monotonic() + 600
    while True:
        st = requests.get(f"{server.url}/v1/tasks/{task}/status", timeout=30).json()
        assert st["status"] in ("pending", "processing", "completed"), st
        if st["status"] == "completed":
            break
        assert time.monotonic() < deadline, server.output()
        time.sleep(0.3)
    assert st["save_result_path"] == "cat_boxing_seed42.mp4" and st["error_type"] == ""  # the name, as LightX2V
    saved = server.service_dir / "outputs" / "cat_boxing_seed42.mp4"
    result = requests.get(f"{server.url}/v1/tasks/{task}/result", timeout=60)
    assert result.status_code == 200 and result.content == saved.read_bytes()
    # fields the request left out take the server config's values
    from pipeline.config import load_config

    cfg = load_config()
    assert decode_mp4(saved) == (cfg["target_video_length"], (cfg["target_width"], cfg["target_height"]))
    listed = requests.get(f"{server.url}/v1/tasks/", timeout=30).json()
    assert listed[task]["status"] == "completed"
    dl = requests.get(f"{server.url}/v1/files/download/cat_boxing_seed42.mp4", timeout=30)
    assert dl.status_code == 200 and dl.content == saved.read_bytes()


def test_lightx2v_multi_server_client_flow(server):
    """What post_multi_servers_t2v.py does with --save-folder set to an absolute folder: find an idle server
    by /v1/service/status, POST /v1/tasks/ with an absolute save_result_path, poll the status until completed;
    the file is then at that absolute path (here inside the outputs folder; elsewhere: --output-root)."""
    status = requests.get(server.url + "/v1/service/status", timeout=30).json()
    assert status["service_status"] in ("idle", "busy")
    save = (server.service_dir / "outputs" / "multi").resolve() / "output_lightx2v_wan_t2v_1.mp4"
    message = {"seed": 42, "prompt": "A cat walks on the grass, realistic style.", "negative_prompt": "blurry",
               "image_path": "", "save_result_path": str(save)}
    r = requests.post(server.url + "/v1/tasks/", json=message)
    assert r.status_code == 200, r.text
    task = r.json()["task_id"]
    deadline = time.monotonic() + 600
    while True:
        st = requests.get(f"{server.url}/v1/tasks/{task}/status", timeout=30).json()
        if st["status"] in ("completed", "failed"):
            break
        assert time.monotonic() < deadline, server.output()
        time.sleep(0.3)
    assert st["status"] == "completed" and st["save_result_path"] == save.name, st
    result = requests.get(f"{server.url}/v1/tasks/{task}/result", timeout=60)
    assert result.status_code == 200 and save.read_bytes() == result.content
    outside = requests.post(server.url + "/v1/tasks/", json={**message, "save_result_path": str(server.root / "x.mp4")})
    assert outside.status_code == 422 and "--output-root" in outside.json()["detail"]


def test_lightx2v_base64_image_and_form(server):
    """post_i2v.py sends a base64 image to the older POST /v1/tasks/; the form route takes image_file."""
    b64 = base64.b64encode(png_bytes(color=(250, 250, 0))).decode()
    r = requests.post(server.url + "/v1/tasks/", json={"prompt": "a yellow ball", "image_path": b64,
                                                      "target_video_length": 5, "infer_steps": 2,
                                                      "target_shape": [48, 80], "seed": 3}, timeout=60)
    assert r.status_code == 200, r.text
    as_json = r.json()["task_id"]
    r = requests.post(server.url + "/v1/tasks/video/form",
                      data={"prompt": "a yellow ball", "target_video_length": "5", "infer_steps": "2", "seed": "3",
                            "target_shape": "[48, 80]"},
                      files={"image_file": ("x.png", png_bytes(color=(250, 250, 0)), "image/png")}, timeout=60)
    assert r.status_code == 200, r.text
    as_form = r.json()["task_id"]
    done = server.wait([as_json, as_form])
    assert all(s["status"] == "done" for s in done.values()), done
    a = (server.service_dir / "videos" / f"{as_json}.mp4").read_bytes()
    b = (server.service_dir / "videos" / f"{as_form}.mp4").read_bytes()
    assert a == b  # same image, prompt, seed and shape -> the same cached video
    assert decode_mp4(server.service_dir / "videos" / f"{as_json}.mp4") == (5, (80, 48))


def test_fifty_concurrent_submissions(server):
    """50 requests at once, 10 distinct jobs (5 prompts x 2 seeds), each sent 5 times: every request is
    accepted and finishes, each prompt is encoded once and each distinct video computed once."""
    prompts = [f"concurrency test prompt number {i}" for i in range(5)]
    jobs = [{"prompt": prompts[i % 5], "seed": 1000 + (i // 5) % 2, **SMALL} for i in range(50)]
    barrier = threading.Barrier(50)

    def post(job):
        barrier.wait()
        return requests.post(server.url + "/submit", json=job, timeout=120)

    with ThreadPoolExecutor(50) as pool:
        replies = list(pool.map(post, jobs))
    assert [r.status_code for r in replies] == [200] * 50, [r.text for r in replies if r.status_code != 200]
    ids = [r.json()["task_id"] for r in replies]
    assert len(set(ids)) == 50
    done = server.wait(ids, timeout=900)
    assert all(s["status"] == "done" for s in done.values()), [s for s in done.values() if s["status"] != "done"]

    # each distinct prompt has one text artifact in the store, computed once
    texts = [json.loads(p.read_text()) for p in (server.store / "text").glob("*/*.json")
             if not p.name.endswith(".failed.json")]
    ours = [t for t in texts if t["params"]["prompt"] in prompts]
    assert sorted(t["params"]["prompt"] for t in ours) == sorted(prompts)

    def computed(stage, keys):
        return db_rows(server.service_dir, f"SELECT key, COUNT(*) FROM stage_runs WHERE stage = ? AND key IN "
                                           f"({','.join('?' * len(keys))}) GROUP BY key", (stage, *keys))

    assert sorted(n for _, n in computed("text", [t["key"] for t in ours])) == [1] * 5
    plans = [json.loads(p) for (p,) in db_rows(server.service_dir, f"SELECT plan FROM tasks WHERE id IN "
                                                                  f"({','.join('?' * 50)})", ids)]
    decode_keys = sorted({p["decode"][1] for p in plans})
    assert len(decode_keys) == 10 and sorted(n for _, n in computed("decode", decode_keys)) == [1] * 10
    # the same job gives the same bytes whichever request asked; 10 distinct videos, every one decodable
    videos = {}
    for job, t in zip(jobs, ids):
        data = (server.service_dir / "videos" / f"{t}.mp4").read_bytes()
        assert videos.setdefault((job["prompt"], job["seed"]), data) == data
    assert len(set(videos.values())) == 10
    assert decode_mp4(server.service_dir / "videos" / f"{ids[-1]}.mp4") == (5, (64, 64))
    # the worker kept its models resident: each loaded once since it started
    loads = requests.get(server.url + "/health", timeout=30).json()["worker"]["model_loads"]
    assert loads and set(loads.values()) == {1}, loads


# -- bad requests -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("body, status, words", [
    ({"image_size": "64*64"}, 422, ["prompt", "required"]),
    ({"prompt": "   "}, 422, ["prompt", "empty"]),
    ({"prompt": "x", "image_size": "64x"}, 422, ["image_size", "W*H"]),
    ({"prompt": "x", "image_size": "60*64"}, 422, ["image_size (width)", "multiple of 16"]),
    ({"prompt": "x", "num_frames": 0}, 422, ["num_frames"]),  # 6 is adjusted to 5, as LightX2V does
    ({"prompt": "x", "image_size": "4096*64"}, 422, ["image_size (width)", "at most 2048"]),
    ({"prompt": "x", "seed": -1}, 422, ["seed"]),
    ({"prompt": "x", "num_frame": 5}, 422, ["num_frame", "extra"]),
    ({"prompt": "x", "image_url": "ftp://127.0.0.1/a.png"}, 422, ["image_url", "http(s)"]),
    ({"prompt": "x", "image_url": "relative/a.png"}, 422, ["image_url", "absolute"]),
])
def test_bad_fields_get_4xx_with_a_message(server, body, status, words):
    r = requests.post(server.url + "/submit", json=body, timeout=30)
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert all(w.lower() in detail.lower() for w in words), detail


def test_bad_images_get_4xx_with_a_message(server, image_server):
    cases = [
        (str(server.root / "outside.png"), 403, "outside the allowed image folders"),
        (str(server.root / "allowed" / ".." / "outside.png"), 403, "outside the allowed image folders"),
        (str(server.root / "allowed" / "missing.png"), 422, "not found"),
        (image_server + "/missing.png", 400, "HTTP 404"),
        (image_server + "/notimage.png", 422, "not an image"),
        (image_server + "/big.png", 413, "limit"),
        (image_server + "/slow.png", 400, "timed out"),
        ("http://127.0.0.1:9/nothing.png", 400, "could not fetch"),
    ]
    for url, status, words in cases:
        r = requests.post(server.url + "/submit", json={"prompt": "x", "image_url": url}, timeout=60)
        assert r.status_code == status, (url, r.text)
        assert words.lower() in r.json()["detail"].lower(), (url, r.text)
    r = requests.post(server.url + "/submit", data={"prompt": "x"},
                      files={"image": ("a.png", b"GIF89a not really", "image/gif")}, timeout=30)
    assert r.status_code == 422 and "image" in r.json()["detail"]


def test_huge_and_malformed_bodies(server):
    r = requests.post(server.url + "/submit", data=b"{" + b" " * (2 << 20) + b"}",
                      headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 413 and "limit" in r.json()["detail"]

    def chunks():  # no Content-Length: the limit applies while reading
        yield b'{"prompt": "'
        for _ in range(40):
            yield b"x" * 65536
        yield b'"}'

    r = requests.post(server.url + "/submit", data=chunks(), headers={"Content-Type": "application/json"},
                      timeout=60)
    assert r.status_code == 413 and "limit" in r.json()["detail"]
    r = requests.post(server.url + "/submit", data=b"{not json", headers={"Content-Type": "application/json"},
                      timeout=30)
    assert r.status_code == 422 and "JSON" in r.json()["detail"]
    r = requests.post(server.url + "/submit", data=b"prompt", headers={"Content-Type": "text/plain"}, timeout=30)
    assert r.status_code == 415 and "application/json" in r.json()["detail"]


def test_lightx2v_bad_requests(server):
    cases = [
        ({"prompt": "x", "lora_name": "style"}, 422, "lora"),
        ({"prompt": "x", "save_result_path": "../escape.mp4"}, 422, "save_result_path"),
        ({"prompt": "x", "save_result_path": "/tmp/abs.mp4"}, 422, "save_result_path"),
        ({"prompt": "x", "target_shape": [64]}, 422, "target_shape"),
        ({"prompt": "x", "target_fps": 30}, 422, "target_fps"),
        ({"prompt": ""}, 422, "prompt"),
        ({"prompt": "x", "task_id": "../x"}, 422, "task_id"),
    ]
    for body, status, word in cases:
        r = requests.post(server.url + "/v1/tasks/video/", json=body, timeout=30)
        assert r.status_code == status, (body, r.text)
        assert word in r.json()["detail"], (body, r.text)
    assert requests.get(server.url + "/v1/tasks/nope/status", timeout=30).status_code == 404
    assert requests.get(server.url + "/status/nope", timeout=30).status_code == 404
    assert requests.get(server.url + "/videos/nope.mp4", timeout=30).status_code == 404
    assert requests.get(server.url + "/v1/files/download/../queue.sqlite", timeout=30).status_code in (403, 404)


# -- metrics, health, docs -----------------------------------------------------------------------------------
def test_metrics_parse_and_agree_with_the_queue(server):
    from prometheus_client.parser import text_string_to_metric_families

    server.wait([server.submit(prompt="metrics prompt", seed=9, **SMALL)])
    server.wait([server.submit(prompt="metrics prompt", seed=10, **SMALL)])  # text stages come from the cache
    text = requests.get(server.url + "/metrics", timeout=30).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("wan_batch_queue_depth", "wan_batch_tasks", "wan_batch_stage_seconds", "wan_batch_cache_hit_ratio",
                 "wan_batch_stage_uses", "wan_batch_stage_computed", "wan_batch_task_seconds", "wan_batch_worker_up"):
        assert name in families, sorted(families)
    assert families["wan_batch_stage_seconds"].type == "histogram"
    tasks = {s.labels["state"]: s.value for s in families["wan_batch_tasks"].samples}
    counts = dict(db_rows(server.service_dir, "SELECT state, COUNT(*) FROM tasks GROUP BY state"))
    assert tasks["done"] == counts["done"] and tasks["queued"] == counts.get("queued", 0)
    seconds = {(s.name, s.labels["stage"], s.labels.get("le")): s.value for s in families["wan_batch_stage_seconds"].samples}
    runs = dict(db_rows(server.service_dir, "SELECT stage, COUNT(*) FROM stage_runs GROUP BY stage"))
    for stage, n in runs.items():
        assert seconds[("wan_batch_stage_seconds_count", stage, None)] == n
        assert seconds[("wan_batch_stage_seconds_bucket", stage, "+Inf")] == n
    uses = {s.labels["stage"]: s.value for s in families["wan_batch_stage_uses"].samples if s.name.endswith("_total")}
    made = {s.labels["stage"]: s.value for s in families["wan_batch_stage_computed"].samples
            if s.name.endswith("_total")}
    ratio = {s.labels["stage"]: s.value for s in families["wan_batch_cache_hit_ratio"].samples}
    assert ratio["text"] == pytest.approx(1 - made["text"] / uses["text"]) and ratio["text"] > 0
    assert families["wan_batch_worker_up"].samples[0].value == 1.0


def test_health_and_docs(server):
    h = requests.get(server.url + "/health", timeout=30)
    assert h.status_code == 200
    body = h.json()
    assert body["status"] == "ok" and body["worker"]["alive"] and body["device"] == "cpu"
    assert body["models"] == {"t2v": "ok", "i2v": "ok"} and body["queue_depth"] >= 0
    assert requests.get(server.url + "/docs", timeout=30).status_code == 200
    paths = requests.get(server.url + "/openapi.json", timeout=30).json()["paths"]
    for path in ("/submit", "/status/{task_id}", "/health", "/metrics", "/v1/tasks/video/"):
        assert path in paths


# -- in-process: auth and the queue limit (no worker) --------------------------------------------------------
def _app(tmp_path, **settings):
    from pipeline.service.app import create_app
    from pipeline.service.settings import ServiceSettings

    return create_app(ServiceSettings(service_dir=str(tmp_path / "svc"), store=str(tmp_path / "store"),
                                      **settings).resolved(), start_worker=False)


def test_bearer_token(tmp_path):
    from fastapi.testclient import TestClient

    with TestClient(_app(tmp_path, token="s3cret")) as client:
        job = {"prompt": "x", **SMALL}
        r = client.post("/submit", json=job)
        assert r.status_code == 401 and "bearer token" in r.json()["detail"]
        assert client.post("/submit", json=job, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.post("/v1/tasks/video/", json={"prompt": "x"}).status_code == 401
        ok = client.post("/submit", json=job, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200, ok.text
        assert client.get(f"/status/{ok.json()['task_id']}").status_code == 401
        assert client.get("/metrics").status_code == 401  # only /health is open (see test_service_security.py)


def test_queue_limit_gives_503_and_cancel_frees_a_slot(tmp_path):
    from fastapi.testclient import TestClient

    with TestClient(_app(tmp_path, max_queue=2)) as client:
        first = client.post("/submit", json={"prompt": "a"}).json()["task_id"]
        assert client.post("/submit", json={"prompt": "b"}).status_code == 200
        full = client.post("/submit", json={"prompt": "c"})
        assert full.status_code == 503 and "MAX_CONCURRENT_TASKS=2" in full.json()["detail"]
        assert full.headers["retry-after"]
        assert client.delete(f"/v1/tasks/{first}").json()["stop_status"] == "success"
        assert client.get(f"/status/{first}").json()["status"] == "cancelled"
        assert client.post("/submit", json={"prompt": "c"}).status_code == 200
