"""Artifact store: content-addressed stage outputs with a JSON sidecar, atomic writes, integrity checks.

Layout: <root>/<stage>/<key[:2]>/<key>.<ext> (the payload: safetensors, or mp4 for decode) and <key>.json
(the sidecar, written last: it marks completion and holds the payload's size and sha256). A payload without a
valid sidecar, or whose size/sha256 disagree with it, is never trusted: the stage is recomputed.

A file payload may be written by the background writer (pipeline/writer.py) after its task returned; every
read of an artifact here (check, sidecar, failure) first waits for a pending write of it in this process.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file, save_file

from . import faults
from .writer import WRITER

log = logging.getLogger(__name__)


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def cache_key(stage: str, version: int, params: dict[str, Any], upstream: dict[str, str]) -> str:
    """sha256 of everything that determines a stage's output: stage, its version, params, upstream keys."""
    doc = {"stage": stage, "version": version, "params": params, "upstream": upstream}
    return hashlib.sha256(canonical_json(doc).encode()).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK  # every file we write: what open() would give, 0644 under the usual umask


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(dest: Path, sync_dir: bool = True) -> Iterator[Path]:
    """Yield a temp path in dest's folder; on success fsync it and rename over dest, else remove it.
    `sync_dir=False` leaves the folder's fsync (which makes the rename durable) to a later write into the same
    folder: a payload's rename is made durable by its sidecar's, and without the sidecar it is not used."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp" + dest.suffix, dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # Set after the writer is done: mkstemp's 0600, or a writer that replaces the file (safetensors'
        # save_file does, as 0600), would make payloads and videos unreadable to the other users of a store.
        os.chmod(tmp_path, FILE_MODE)
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, dest)
        if sync_dir:
            _fsync_dir(dest.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def atomic_write_text(dest: Path, text: str) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_text(text, encoding="utf-8")


def stale_temps(dest: Path) -> list[Path]:
    """Temp files atomic_path made for `dest` that are still there: left by a writer that was killed."""
    # a listing, not Path.glob: glob compiles a pattern per call, a cost every stage task paid (issue 21)
    prefix = f".{dest.name}."
    try:
        names = os.listdir(dest.parent)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(dest.parent / n for n in names if n.startswith(prefix) and ".tmp" in n[len(prefix):])


@dataclass(frozen=True)
class ArtifactRef:
    stage: str
    key: str
    ext: str = "safetensors"


class ArtifactStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()
        self._verified: dict[Path, tuple[int, int, int]] = {}  # payload -> (size, mtime_ns, sidecar mtime)
        self._failures: dict[ArtifactRef, dict[str, Any]] = {}  # failure records the store had no room for

    # -- paths -----------------------------------------------------------------------------------------
    def folder(self, stage: str, key: str) -> Path:
        return self.root / stage / key[:2]

    def payload_path(self, ref: ArtifactRef) -> Path:
        return self.folder(ref.stage, ref.key) / f"{ref.key}.{ref.ext}"

    def sidecar_path(self, ref: ArtifactRef) -> Path:
        return self.folder(ref.stage, ref.key) / f"{ref.key}.json"

    def failure_path(self, ref: ArtifactRef) -> Path:
        return self.folder(ref.stage, ref.key) / f"{ref.key}.failed.json"

    # -- reading ---------------------------------------------------------------------------------------
    def settle(self, ref: ArtifactRef) -> None:
        """Wait until no background write of `ref` is pending in this process (pipeline/writer.py)."""
        WRITER.wait(self.payload_path(ref))

    def sidecar(self, ref: ArtifactRef) -> dict[str, Any] | None:
        self.settle(ref)
        try:
            return json.loads(self.sidecar_path(ref).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def check(self, ref: ArtifactRef) -> tuple[bool, str]:
        """(ok, reason). Verifies sidecar, payload size and sha256; the result is memoised per file state."""
        self.settle(ref)
        side_path, payload = self.sidecar_path(ref), self.payload_path(ref)
        try:
            side_stat = side_path.stat()
        except FileNotFoundError:
            return False, "missing"
        except OSError as e:
            return False, f"cannot read {side_path}: {e.strerror or e}"
        try:
            st = payload.stat()
        except FileNotFoundError:
            return False, f"payload {payload} is missing but its sidecar exists"
        except OSError as e:
            return False, f"cannot read {payload}: {e.strerror or e}"
        state = (st.st_size, st.st_mtime_ns, side_stat.st_mtime_ns)
        if self._verified.get(payload) == state:
            return True, "ok"
        side = self.sidecar(ref)
        if side is None or side.get("key") != ref.key or "sha256" not in side:
            return False, f"sidecar {side_path} is unreadable or belongs to another artifact"
        if side.get("size") != st.st_size:
            return False, f"{payload} has {st.st_size} bytes, its sidecar says {side.get('size')}"
        try:
            digest = sha256_file(payload)
        except OSError as e:  # e.g. a payload this process may not read: recomputed, never a crash
            return False, f"cannot read {payload}: {e.strerror or e}"
        if digest != side["sha256"]:
            return False, f"{payload} does not match the sha256 in its sidecar"
        self._verified[payload] = state
        return True, "ok"

    def is_complete(self, ref: ArtifactRef) -> bool:
        ok, reason = self.check(ref)
        if not ok and reason != "missing":
            log.warning("artifact %s/%s is corrupt and will be recomputed: %s", ref.stage, ref.key[:12], reason)
        return ok

    def load_tensors(self, ref: ArtifactRef, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        ok, reason = self.check(ref)
        if not ok:
            raise FileNotFoundError(f"artifact {ref.stage}/{ref.key} is not usable: {reason}")
        return load_file(self.payload_path(ref), device=str(device))

    # -- writing ---------------------------------------------------------------------------------------
    def _finish(self, ref: ArtifactRef, payload: Path, sidecar: dict[str, Any]) -> dict[str, Any]:
        faults.point(ref.stage, "payload-written")
        try:
            side = dict(sidecar, stage=ref.stage, key=ref.key, payload=payload.name,
                        size=payload.stat().st_size, sha256=sha256_file(payload), written_at=time.time())
            with atomic_path(self.sidecar_path(ref)) as tmp:
                tmp.write_text(json.dumps(side, indent=1, sort_keys=True, default=str), encoding="utf-8")
                faults.point(ref.stage, "sidecar-partial", tmp)
        except BaseException:
            payload.unlink(missing_ok=True)  # no sidecar: a payload left here would only be recomputed
            raise
        faults.point(ref.stage, "committed")
        with contextlib.suppress(FileNotFoundError):
            self.failure_path(ref).unlink()
        return side

    def write_tensors(self, ref: ArtifactRef, tensors: dict[str, torch.Tensor],
                      sidecar: dict[str, Any]) -> dict[str, Any]:
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        shapes = {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")} for k, v in tensors.items()}
        faults.point(ref.stage, "before-write")
        self.sidecar_path(ref).unlink(missing_ok=True)  # an old sidecar must not vouch for the new payload
        with atomic_path(self.payload_path(ref), sync_dir=False) as tmp:
            # one metadata entry: safetensors writes a metadata map in hash order, which differs per process,
            # and a re-run must give the same bytes
            save_file(tensors, str(tmp), metadata={"artifact": f"{ref.stage}/{ref.key}"})
            faults.point(ref.stage, "payload-partial", tmp)
        return self._finish(ref, self.payload_path(ref), dict(sidecar, tensors=shapes))

    def write_file(self, ref: ArtifactRef, produce, sidecar: dict[str, Any],
                   background: bool = False) -> dict[str, Any] | None:
        """`produce(tmp_path)` writes the payload (e.g. ffmpeg muxing an MP4) to a temp path first.

        `background`: when this thread holds `lock(ref)` and accepts deferred writes (WRITER.accepting), the
        write is queued on the background writer, which takes the lock over and releases it once the artifact
        is complete or its failure recorded; returns None then. Otherwise it writes now, as without it."""
        held = _HELD.get(self.lock_path(ref))
        if background and held is not None and held.owner == threading.get_ident() and WRITER.accepts():
            held.handed_over = True
            del _HELD[self.lock_path(ref)]
            WRITER.submit(self.payload_path(ref), lambda: self._write_file(ref, produce, sidecar), held.release)
            faults.point(ref.stage, "queued")
            return None
        return self._write_file(ref, produce, sidecar)

    def _write_file(self, ref: ArtifactRef, produce, sidecar: dict[str, Any]) -> dict[str, Any]:
        faults.point(ref.stage, "before-write")
        self.sidecar_path(ref).unlink(missing_ok=True)
        with atomic_path(self.payload_path(ref), sync_dir=False) as tmp:
            faults.point(ref.stage, "mux", tmp)
            produce(tmp)
            faults.point(ref.stage, "payload-partial", tmp)
        return self._finish(ref, self.payload_path(ref), sidecar)

    def record_failure(self, ref: ArtifactRef, error: str, run_id: str) -> None:
        """Record a stage's failure next to its artifact. When the store cannot take even that (its disk is
        full, it is read-only), the record is kept in this process, so this run still reports the row as
        failed with its reason and writes results.parquet; a later run retries the stage either way."""
        doc = {"stage": ref.stage, "key": ref.key, "error": error, "run_id": run_id, "at": time.time()}
        self._failures.pop(ref, None)
        try:
            with atomic_path(self.failure_path(ref)) as tmp:
                tmp.write_text(json.dumps(doc, indent=1), encoding="utf-8")
                faults.point(ref.stage, "failure-record", tmp)
        except OSError as e:
            log.warning("could not write the failure record of %s/%s into the store (%s); this run keeps it in "
                        "memory", ref.stage, ref.key[:12], e.strerror or e)
            self._failures[ref] = doc

    def failure(self, ref: ArtifactRef) -> dict[str, Any] | None:
        self.settle(ref)
        if ref in self._failures:
            return self._failures[ref]
        try:
            return json.loads(self.failure_path(ref).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def remove_stale_temps(self, ref: ArtifactRef) -> list[Path]:
        """Delete temp files of this artifact left by killed writers. Call it holding `lock(ref)`: the lock
        holder is the only live writer of these names."""
        removed = stale_temps(self.payload_path(ref)) + stale_temps(self.sidecar_path(ref)) + \
            stale_temps(self.failure_path(ref))
        for path in removed:
            path.unlink(missing_ok=True)
        if removed:
            log.info("removed %d temp file(s) left by an interrupted write of %s/%s", len(removed), ref.stage,
                     ref.key[:12])
        return removed

    def invalidate(self, ref: ArtifactRef) -> None:
        """Remove an artifact (sidecar first, so a crash in between leaves it incomplete, not trusted)."""
        for path in (self.sidecar_path(ref), self.payload_path(ref), self.failure_path(ref)):
            path.unlink(missing_ok=True)
        self._verified.pop(self.payload_path(ref), None)
        self._failures.pop(ref, None)

    def lock_path(self, ref: ArtifactRef) -> Path:
        return self.folder(ref.stage, ref.key) / f"{ref.key}.lock"

    @contextlib.contextmanager
    def lock(self, ref: ArtifactRef) -> Iterator[None]:
        """Exclusive per-artifact lock across processes (flock), so two runs never compute one artifact twice.
        A background write of the artifact started inside the block keeps it locked until it ends."""
        path = self.lock_path(ref)
        if not path.exists():
            faults.point(ref.stage, "lock")
        held = HeldLock(path)
        _HELD[path] = held
        try:
            yield
        finally:
            if _HELD.get(path) is held:
                del _HELD[path]
            if not held.handed_over:
                held.release()


class HeldLock:
    """An exclusive flock on `path` (created if needed; never deleted, so every process locks the same inode),
    taken when made. The kernel releases it when the holder dies, so a killed run never leaves a stale lock."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a+")  # noqa: SIM115 - held past this call: release() closes it
        self.owner = threading.get_ident()
        self.handed_over = False  # to the background writer, which releases it
        while True:
            try:
                fcntl.flock(self.file.fileno(), fcntl.LOCK_EX)
                break
            except OSError as e:  # EINTR
                if e.errno != errno.EINTR:
                    self.file.close()
                    raise

    def release(self) -> None:
        try:
            fcntl.flock(self.file.fileno(), fcntl.LOCK_UN)
        finally:
            self.file.close()


# lock file -> the lock this process holds on it through ArtifactStore.lock (one holder per process: a second
# flock of the same file waits for the first), so that a background write can take it over
_HELD: dict[Path, HeldLock] = {}


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive flock on `path` for the block (see HeldLock)."""
    held = HeldLock(path)
    try:
        yield
    finally:
        held.release()
