"""The service against hostile and careless clients, in this process (the app under uvicorn on 127.0.0.1, no
worker): the token on every route, an empty token file, cross-origin browser requests, the Host header,
deeply nested JSON, NUL bytes in paths, image URLs that trickle their headers or name internal addresses,
and LightX2V's routes and fields. Every socket is on loopback; every wait has a bound."""
from __future__ import annotations

import io
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from conftest import REPO

WAIT_S = 60  # the bound on every wait below; none is expected to take more than a second or two


def png_bytes() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (48, 40), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


class LiveApp:
    """create_app(settings) served by uvicorn on 127.0.0.1 in a thread (no worker process)."""

    def __init__(self, tmp_path: Path, **settings):
        import uvicorn

        from pipeline.service.app import create_app
        from pipeline.service.settings import ServiceSettings

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.settings = ServiceSettings(service_dir=str(tmp_path / "svc"), store=str(tmp_path / "store"),
                                        port=port, public_url=self.url, **settings).resolved()
        self.app = create_app(self.settings, start_worker=False)
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "LiveApp":
        self.thread.start()
        deadline = time.monotonic() + WAIT_S
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(WAIT_S)
        self.sock.close()

    @property
    def queue(self):
        return self.app.state.service.queue


# -- the token --------------------------------------------------------------------------------------------
def test_every_route_but_health_needs_the_token(tmp_path):
    with LiveApp(tmp_path, token="s3cret") as live:
        bearer = {"Authorization": "Bearer s3cret"}
        for path in ("/", "/docs", "/redoc", "/openapi.json", "/metrics", "/v1/service/status",
                     "/v1/service/metadata", "/v1/tasks/", "/status/x", "/no/such/route"):
            r = requests.get(live.url + path, timeout=WAIT_S)
            assert r.status_code == 401 and "bearer token" in r.json()["detail"], (path, r.status_code)
            assert r.headers["www-authenticate"] == "Bearer"
            assert requests.get(live.url + path, headers={"Authorization": "Bearer wrong"},
                                timeout=WAIT_S).status_code == 401
        assert requests.get(live.url + "/health", timeout=WAIT_S).status_code in (200, 503)  # no worker: 503
        assert requests.get(live.url + "/openapi.json", headers=bearer, timeout=WAIT_S).status_code == 200
        assert requests.get(live.url + "/metrics", headers=bearer, timeout=WAIT_S).status_code == 200
        r = requests.post(live.url + "/submit", json={"prompt": "x"}, timeout=WAIT_S)
        assert r.status_code == 401
        assert live.queue.counts()["queued"] == 0


def test_public_metrics_opens_metrics_only(tmp_path):
    with LiveApp(tmp_path, token="s3cret", public_metrics=True) as live:
        assert requests.get(live.url + "/metrics", timeout=WAIT_S).status_code == 200
        assert requests.get(live.url + "/docs", timeout=WAIT_S).status_code == 401


@pytest.mark.parametrize("content", ["", "  \n\t "])
def test_an_empty_token_file_is_an_error(tmp_path, content):
    token = tmp_path / "token"
    token.write_text(content)
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "serve", "--port", "0", "--token-file", str(token),
                           "--service-dir", str(tmp_path / "svc"), "--store", str(tmp_path / "store")],
                          cwd=REPO, capture_output=True, text=True, timeout=WAIT_S * 5)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "is empty" in proc.stderr and str(token) in proc.stderr
    assert not (tmp_path / "svc" / "server.json").exists()  # it never served


# -- cross-origin requests and the Host header ----------------------------------------------------------------
def test_cross_origin_browser_requests_are_refused(tmp_path):
    with LiveApp(tmp_path) as live:
        form = {"prompt": "queued by a web page"}
        for headers in ({"Origin": "http://evil.example"}, {"Origin": "null"},
                        {"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"},
                        {"Origin": live.url.replace("127.0.0.1", "127.0.0.2")}):
            r = requests.post(live.url + "/submit", data=form, headers=headers, timeout=WAIT_S)
            assert r.status_code == 403 and "cross-origin" in r.json()["detail"], (headers, r.text)
            r = requests.post(live.url + "/v1/tasks/video/form", data=form, headers=headers, timeout=WAIT_S)
            assert r.status_code == 403, headers
        assert live.queue.counts()["queued"] == 0
        # this server's own pages (its /docs), same-origin fetches, and clients that are not browsers
        for headers in ({"Origin": live.url}, {"Origin": live.url.replace("127.0.0.1", "localhost")},
                        {"Sec-Fetch-Site": "same-origin", "Origin": live.url}, {}):
            r = requests.post(live.url + "/submit", data=form, headers=headers, timeout=WAIT_S)
            assert r.status_code == 200, (headers, r.text)
        task = r.json()["task_id"]
        r = requests.delete(f"{live.url}/v1/tasks/{task}", headers={"Origin": "http://evil.example"},
                            timeout=WAIT_S)
        assert r.status_code == 403 and live.queue.get(task).state == "queued"
        # reading is not a change: a cross-origin GET is answered (the browser keeps it from the page)
        assert requests.get(f"{live.url}/status/{task}", headers={"Origin": "http://evil.example"},
                            timeout=WAIT_S).status_code == 200


def test_the_host_header_is_not_echoed(tmp_path):
    with LiveApp(tmp_path) as live:
        r = requests.post(live.url + "/submit", json={"prompt": "x"}, headers={"Host": "evil.example:1"},
                          timeout=WAIT_S)
        assert r.status_code == 200, r.text
        assert r.json()["status_url"] == f"{live.url}/status/{r.json()['task_id']}"


# -- malformed input that used to be a 500 ----------------------------------------------------------------------
def test_deeply_nested_json_and_nul_paths_are_4xx(tmp_path):
    with LiveApp(tmp_path) as live:
        deep = b'{"prompt": "x", "seed": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        for path in ("/submit", "/v1/tasks/video/"):
            r = requests.post(live.url + path, data=deep, headers={"Content-Type": "application/json"},
                              timeout=WAIT_S)
            assert r.status_code == 422 and "nested too deeply" in r.json()["detail"], (path, r.text[:300])
        r = requests.post(live.url + "/v1/tasks/video/form",
                          data={"prompt": "x", "target_shape": "[" * 100_000 + "]" * 100_000}, timeout=WAIT_S)
        assert r.status_code == 422 and "target_shape" in r.json()["detail"], r.text[:300]
        for path in ("/v1/files/download/a%00b.mp4", "/status/a%00b", "/videos/a%00b.mp4",
                     "/v1/tasks/a%00b/status", "/v1/tasks/a%00b/result"):
            r = requests.get(live.url + path, timeout=WAIT_S)
            assert r.status_code == 404, (path, r.status_code, r.text)
        r = requests.post(live.url + "/v1/tasks/video/", json={"prompt": "x", "save_result_path": "a\x00b.mp4"},
                          timeout=WAIT_S)
        assert r.status_code == 422 and "save_result_path" in r.json()["detail"]


# -- image URLs -----------------------------------------------------------------------------------------------
class TrickleServer:
    """A loopback HTTP server that sends one header line every `gap` seconds (at most `lines`), then a valid
    PNG: an old per-read timeout never fires on it. Counts the connections open at once."""

    def __init__(self, gap: float = 0.2, lines: int = 40, hold: threading.Event | None = None):
        self.gap, self.lines, self.hold = gap, lines, hold
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.open = self.most = self.served = 0
        self.arrived = threading.Condition(self.lock)
        self.stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self.listener.settimeout(0.2)
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with self.arrived:
            self.open += 1
            self.most = max(self.most, self.open)
            self.arrived.notify_all()
        body = png_bytes()
        try:
            conn.settimeout(WAIT_S)
            conn.recv(4096)
            if self.hold is not None:
                self.hold.wait(WAIT_S)
            conn.sendall(b"HTTP/1.1 200 OK\r\n")
            for i in range(self.lines):
                if self.stop.wait(self.gap):
                    return
                conn.sendall(f"X-Trickle-{i}: x\r\n".encode())
            conn.sendall(b"Content-Type: image/png\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            with self.lock:
                self.served += 1
        except OSError:
            pass
        finally:
            conn.close()
            with self.arrived:
                self.open -= 1

    def close(self) -> None:
        self.stop.set()
        self.listener.close()


def test_a_trickling_image_server_hits_one_overall_deadline(tmp_path):
    """One header line every 0.2 s for 8 s: a per-read timeout of 1.5 s never fires, so the fetch used to
    succeed after 8 s; the deadline from connect to the last byte ends it at 1.5 s."""
    srv = TrickleServer(gap=0.2, lines=40)
    try:
        with LiveApp(tmp_path, url_timeout=1.5, allow_private_urls=True) as live:
            r = requests.post(live.url + "/submit", json={"prompt": "x", "image_url": f"http://127.0.0.1:{srv.port}/a"},
                              timeout=WAIT_S)
            assert r.status_code == 400 and "timed out" in r.json()["detail"], r.text
            assert "1.5 s" in r.json()["detail"] and srv.served == 0
    finally:
        srv.close()


def test_slow_fetches_are_capped_and_do_not_starve_other_requests(tmp_path):
    """42 submissions whose image server holds every connection: at most max_fetches connect at once, and
    /health and a text-only submission are answered while all 42 are waiting."""
    hold = threading.Event()
    srv = TrickleServer(gap=0.0, lines=1, hold=hold)
    try:
        with LiveApp(tmp_path, url_timeout=30, max_fetches=3, allow_private_urls=True) as live:
            url = f"http://127.0.0.1:{srv.port}/a.png"
            with ThreadPoolExecutor(42) as pool:
                futures = [pool.submit(requests.post, live.url + "/submit", json={"prompt": f"p{i}", "image_url": url},
                                       timeout=WAIT_S) for i in range(42)]
                with srv.arrived:
                    assert srv.arrived.wait_for(lambda: srv.open >= 3, timeout=WAIT_S)
                for _ in range(3):  # while every fetch is held (none answered yet)
                    assert requests.get(live.url + "/health", timeout=WAIT_S).status_code == 503  # no worker
                    assert requests.post(live.url + "/submit", json={"prompt": "text only"},
                                         timeout=WAIT_S).status_code == 200
                assert not any(f.done() for f in futures) and srv.open == 3
                hold.set()
                replies = [f.result() for f in futures]
            assert [r.status_code for r in replies] == [200] * 42, [r.text for r in replies if r.status_code != 200]
            assert srv.most == 3 and srv.served == 42
    finally:
        hold.set()
        srv.close()


def test_internal_addresses_are_refused_by_default(tmp_path):
    srv = TrickleServer(gap=0.0, lines=1)
    try:
        with LiveApp(tmp_path) as live:
            for url in (f"http://127.0.0.1:{srv.port}/a.png", f"http://localhost:{srv.port}/a.png",
                        f"{live.url}/metrics", "http://[::1]/a.png", "http://169.254.169.254/latest/meta-data",
                        "http://10.0.0.1/a.png", "http://[::ffff:127.0.0.1]/a.png", "http://0.0.0.0/a.png"):
                r = requests.post(live.url + "/submit", json={"prompt": "x", "image_url": url}, timeout=WAIT_S)
                assert r.status_code == 403 and "--allow-private-urls" in r.json()["detail"], (url, r.text)
            r = requests.post(live.url + "/v1/tasks/video/", json={"prompt": "x", "image_path": f"{live.url}/health"},
                              timeout=WAIT_S)
            assert r.status_code == 403 and "image_path" in r.json()["detail"]
            assert srv.most == 0  # nothing was connected to
    finally:
        srv.close()


def test_fetch_errors_do_not_tell_open_ports_from_closed(tmp_path):
    closer = socket.socket()  # accepts, then closes without a word
    closer.bind(("127.0.0.1", 0))
    closer.listen(8)
    unused = socket.socket()
    unused.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
    stop = threading.Event()

    def drop():
        closer.settimeout(0.2)
        while not stop.is_set():
            try:
                closer.accept()[0].close()
            except OSError:
                pass

    threading.Thread(target=drop, daemon=True).start()
    try:
        with LiveApp(tmp_path, url_timeout=5, allow_private_urls=True) as live:
            details = []
            for port in (closer.getsockname()[1], unused.getsockname()[1]):
                r = requests.post(live.url + "/submit", json={"prompt": "x", "image_url": f"http://127.0.0.1:{port}/a"},
                                  timeout=WAIT_S)
                assert r.status_code == 400, r.text
                details.append(r.json()["detail"].replace(str(port), "PORT"))
            assert details[0] == details[1] and "no response" in details[0]
    finally:
        stop.set()
        closer.close()
        unused.close()


# -- LightX2V parity -------------------------------------------------------------------------------------------
def test_lightx2v_routes_and_fields(tmp_path):
    extra_root = tmp_path / "results"
    extra_root.mkdir()
    with LiveApp(tmp_path, output_roots=[str(extra_root)]) as live:
        v1 = live.url + "/v1"
        meta = requests.get(v1 + "/service/metadata", timeout=WAIT_S).json()
        assert meta["nproc_per_node"] == 1 and meta["model_path"] and "model_cls" in meta
        outputs = live.settings.outputs
        # absolute save_result_path: inside the outputs folder or an --output-root; elsewhere refused, naming them
        inside = requests.post(v1 + "/tasks/", json={"prompt": "x", "save_result_path": str(outputs / "a" / "b")},
                               timeout=WAIT_S)
        assert inside.status_code == 200, inside.text
        other = requests.post(v1 + "/tasks/", json={"prompt": "x", "save_result_path": str(extra_root / "c.mp4")},
                              timeout=WAIT_S)
        assert other.status_code == 200, other.text
        outside = requests.post(v1 + "/tasks/", json={"prompt": "x", "save_result_path": str(tmp_path / "d.mp4")},
                                timeout=WAIT_S)
        assert outside.status_code == 422 and str(outputs) in outside.json()["detail"]
        assert str(extra_root) in outside.json()["detail"]
        assert live.queue.get(inside.json()["task_id"]).job["save_result_path"] == str(outputs / "a" / "b.mp4")
        # a symlink inside the outputs folder that leads out of it is refused like the path it leads to
        (outputs / "link").symlink_to(tmp_path, target_is_directory=True)
        r = requests.post(v1 + "/tasks/", json={"prompt": "x", "save_result_path": "link/e.mp4"}, timeout=WAIT_S)
        assert r.status_code == 422 and "resolves outside" in r.json()["detail"]
        (outputs / "taken.mp4").write_bytes(b"")
        r = requests.post(v1 + "/tasks/", json={"prompt": "x", "save_result_path": "taken.mp4/f.mp4"}, timeout=WAIT_S)
        assert r.status_code == 422 and "a file of that name exists" in r.json()["detail"]
        r = requests.post(v1 + "/tasks/", json={"prompt": "x", "save_result_path": "n" * 300 + ".mp4"}, timeout=WAIT_S)
        assert r.status_code == 422 and "at most 200" in r.json()["detail"]
        # every LightX2V field is honoured or refused by name; a field LightX2V does not know is refused
        for field, value in (("image_mask_path", "m.png"), ("video_path", "v.mp4"), ("sr_ratio", 4.0),
                             ("presigned_url", "https://example.com/up"), ("reuse", True), ("lora_name", "style"),
                             ("lora_strength", 0.5), ("aspect_ratio", "1:1"), ("data_bootstrap_room", 3),
                             ("num_fragments", 2), ("no_such_field", 1)):
            r = requests.post(v1 + "/tasks/video/", json={"prompt": "x", field: value}, timeout=WAIT_S)
            assert r.status_code == 422 and field in r.json()["detail"], (field, r.text)
        r = requests.post(v1 + "/tasks/video/", json={"prompt": "x", "lora_name": "style"}, timeout=WAIT_S)
        assert "--lora-dir" in r.json()["detail"]  # per-request LoRA needs the server's LoRA folder
        # status: error_type, the request's save_result_path until done
        task = inside.json()["task_id"]
        st = requests.get(f"{v1}/tasks/{task}/status", timeout=WAIT_S).json()
        assert st["status"] == "pending" and st["error_type"] == ""
        assert st["save_result_path"] == str(outputs / "a" / "b")
        # cancel everything queued or running
        r = requests.delete(v1 + "/tasks/all/running", timeout=WAIT_S)
        assert r.json() == {"stop_status": "success", "reason": "All tasks stopped successfully."}
        assert live.queue.counts()["queued"] == 0 and live.queue.counts()["cancelled"] == 2
        assert requests.get(f"{v1}/tasks/{task}/status", timeout=WAIT_S).json()["status"] == "cancelled"


def test_lightx2v_status_of_finished_tasks(tmp_path):
    """A completed task reports its file's name (as LightX2V does); a failed one its error_type."""
    with LiveApp(tmp_path) as live:
        v1 = live.url + "/v1"
        ok = requests.post(v1 + "/tasks/", json={"prompt": "x", "save_result_path": "./sub/cat.mp4"}, timeout=WAIT_S)
        bad = requests.post(v1 + "/tasks/", json={"prompt": "y"}, timeout=WAIT_S)
        q = live.queue
        run, _ = q.claim(10, worker_pid=1)
        video = live.settings.videos / f"{ok.json()['task_id']}.mp4"
        video.write_bytes(b"mp4")
        q.finish(run, {ok.json()["task_id"]: ("done", str(video), None),
                       bad.json()["task_id"]: ("failed", None, "stage decode: boom", "StageError")})
        st = requests.get(f"{v1}/tasks/{ok.json()['task_id']}/status", timeout=WAIT_S).json()
        assert st["status"] == "completed" and st["save_result_path"] == "cat.mp4" and st["error_type"] == ""
        st = requests.get(f"{v1}/tasks/{bad.json()['task_id']}/status", timeout=WAIT_S).json()
        assert st["status"] == "failed" and st["error_type"] == "StageError" and st["error"] == "stage decode: boom"


def test_per_request_lora_from_the_lora_dir(tmp_path, tiny_root):
    """LightX2V's lora_name / lora_strength: a file of --lora-dir, carried to the batch engine as the row's
    lora columns (so it is in the denoise key); names outside the folder or missing are 422 naming the field."""
    from pipeline.batch import load_batch
    from pipeline.service.worker import write_manifest
    from pipeline.testing import standins

    loras = tmp_path / "loras"
    loras.mkdir()
    standins.write_lora(tiny_root / "t2v" / "transformer", loras / "style.safetensors", rank=4, seed=3, alpha=4.0)
    (tmp_path / "secret.safetensors").write_bytes(b"x")
    with LiveApp(tmp_path, lora_dir=str(loras)) as live:
        v1 = live.url + "/v1"
        for body, word in (({"lora_name": "../secret.safetensors"}, "lora_name"), ({"lora_name": "nope.safetensors"},
                           "no LoRA file"), ({"lora_strength": 0.5}, "goes with lora_name")):
            r = requests.post(v1 + "/tasks/video/", json={"prompt": "x", **body}, timeout=WAIT_S)
            assert r.status_code == 422 and word in r.json()["detail"], (body, r.text)
        ok = requests.post(v1 + "/tasks/video/", json={"prompt": "a red circle", "seed": 1,
                                                       "lora_name": "style.safetensors", "lora_strength": 0.7},
                           timeout=WAIT_S)
        plain = requests.post(v1 + "/tasks/video/", json={"prompt": "a red circle", "seed": 1}, timeout=WAIT_S)
        assert ok.status_code == plain.status_code == 200, ok.text
        tasks = [live.queue.get(ok.json()["task_id"]), live.queue.get(plain.json()["task_id"])]
    assert tasks[0].job["lora"] == str(loras / "style.safetensors") and tasks[0].job["lora_strength"] == 0.7
    manifest = tmp_path / "m.parquet"
    write_manifest(manifest, tasks)
    with_lora, without = load_batch(manifest, "").plans
    assert with_lora.job.loras == [{"path": str(loras / "style.safetensors"), "strength": 0.7}]
    assert with_lora.stages()["denoise-high"].key != without.stages()["denoise-high"].key
    assert with_lora.stages()["text"].key == without.stages()["text"].key
