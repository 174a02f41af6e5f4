"""Fault injection for the reliability tests: `WAN_BATCH_FAULT=<stage>:<n>:<where>[:<action>]`.

The store, the stage runner and RunManifest call `point(stage, where)` at named places (see POINTS). When the
variable names that place, its n-th hit in this process triggers the action:
  kill    (default) SIGKILL this process, as an OOM killer or `kill -9` would;
  enospc  raise OSError(ENOSPC), as a full disk would;
  hang    block forever, as a wedged GPU driver or NFS mount would (for the service's TASK_TIMEOUT).
  full    the store's disk fills up: this hit and every later write into the store (payload, sidecar, mux,
          failure record, new lock file) raise OSError(ENOSPC), while the output folder (stages `publish`
          and `results`) keeps working, as when the store and the outputs are on different disks.
At a point that is given a file (a temp file being written), the file is first cut to half its length, so
the state left behind is the one of a write interrupted midway. `mux` kills while the ffmpeg child is
encoding (the child is left running, as it would be). `stage` may be `*` (any stage). A point reached on the
background writer's thread (decode's writes in a batch) counts and acts there; `kill` kills the process.

Unset (always, outside tests), `point` returns on its first line: the cost is one global lookup.
"""
from __future__ import annotations

import errno
import os
import signal
import threading
import time
from pathlib import Path
from typing import Callable

ENV = "WAN_BATCH_FAULT"

# where -> when it is reached
POINTS = {
    "start": "a stage begins (inputs not loaded yet)",
    "step": "after a denoise step",
    "before-write": "the output is computed, nothing written yet",
    "payload-partial": "the payload's temp file is written (cut to half before the fault)",
    "payload-written": "the payload is renamed into place, its sidecar not yet written",
    "sidecar-partial": "the sidecar's temp file is written (cut to half before the fault)",
    "committed": "the sidecar is in place (the artifact is complete), the task not yet marked done",
    "mux": "ffmpeg is encoding the MP4 into its temp file",
    "queued": "a video's write is handed to the background writer (the task returns next; its encode may not "
              "have started)",
    "failure-record": "a stage's failure record is written to its temp file (cut to half before the fault)",
    "lock": "a new lock file is about to be created in the store",
}
ACTIONS = ("kill", "enospc", "hang", "full")
STORE_WRITES = ("payload-partial", "sidecar-partial", "mux", "failure-record", "lock")
OUTPUT_STAGES = ("publish", "results")  # points in the output folder, not the store

_armed: tuple[str, int, str, str] | None = None
_hits = 0
_count = threading.Lock()  # the background writer's thread reaches points too
_full = False  # set once a `full` fault fired: the store's disk stays full


def configure(spec: str | None = None) -> None:
    """Arm from `spec` (or the environment variable); an empty spec disarms. Raises on a malformed spec."""
    global _armed, _hits, _full
    spec = os.environ.get(ENV, "") if spec is None else spec
    _hits = 0
    _full = False
    if not spec:
        _armed = None
        return
    parts = spec.split(":")
    if len(parts) not in (3, 4) or not parts[1].isdigit() or int(parts[1]) < 1:
        raise ValueError(f"{ENV}={spec!r}: expected <stage>:<n>:<where>[:<action>] with n >= 1")
    action = parts[3] if len(parts) == 4 else "kill"
    if parts[2] not in POINTS or action not in ACTIONS:
        raise ValueError(f"{ENV}={spec!r}: where must be one of {sorted(POINTS)}, action one of {ACTIONS}")
    _armed = (parts[0], int(parts[1]), parts[2], action)


def point(stage: str, where: str, path: Path | str | None = None) -> None:
    """A named place in the code; does nothing unless armed for it."""
    if _armed is None:
        return
    global _hits, _full
    want_stage, n, want_where, action = _armed
    if _full and where in STORE_WRITES and stage not in OUTPUT_STAGES:
        _half(where, path)
        raise _enospc(path)
    if where != want_where or want_stage not in ("*", stage):
        return
    with _count:
        _hits += 1
        hit = _hits
    if hit != n:
        return
    _half(where, path)
    _full = action == "full"
    if action in ("enospc", "full"):
        raise _enospc(path)
    if action == "hang":
        while True:
            time.sleep(3600)
    if where == "mux":
        _kill_when_child_writes(str(Path(path).resolve()))
        return
    os.kill(os.getpid(), signal.SIGKILL)


def _half(where: str, path: Path | str | None) -> None:
    """Cut a temp file being written to half its length: the state a write interrupted midway leaves."""
    if path is not None and where != "mux" and Path(path).is_file():
        os.truncate(path, Path(path).stat().st_size // 2)


def _enospc(path: Path | str | None) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path) if path else None)


_step_hook: Callable[[str], None] | None = None


def set_step_hook(hook: Callable[[str], None] | None) -> None:
    """Run `hook(stage)` before every solver step's callback (None removes it). The service's worker uses it
    to stop a cancelled task at its next step: the hook raises, and the stage fails for that row only."""
    global _step_hook
    _step_hook = hook


def wrap_step(stage: str, on_step: Callable[[int], None] | None) -> Callable[[int], None] | None:
    """`on_step` with a `step` fault point (and the step hook, if set) in front of it; `on_step` itself when
    neither is armed."""
    if _armed is None and _step_hook is None:
        return on_step

    def step(i: int) -> None:
        if _step_hook is not None:
            _step_hook(stage)
        point(stage, "step")
        if on_step is not None:
            on_step(i)

    return step


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _child_writes(pid: int, path: str) -> bool:
    """Whether a child of `pid` has `path` open (ffmpeg opens its output before it encodes a frame)."""
    for child in _children(pid):
        for fd in Path(f"/proc/{child}/fd").glob("*"):
            try:
                if os.readlink(fd) == path:
                    return True
            except OSError:
                pass
    return False


def _kill_when_child_writes(path: str) -> None:
    """SIGKILL this process from a thread once a child process (the encoder the caller is about to start)
    has `path` open. Linux only (/proc), as the tests are."""
    me = os.getpid()

    def watch() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not _child_writes(me, path):
            time.sleep(0.0005)
        os.kill(me, signal.SIGKILL)

    threading.Thread(target=watch, daemon=True).start()


configure()
