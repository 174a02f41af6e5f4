"""luigid loads its state file with pickle: `wan-batch workers --luigid-state DIR` must never let it load one that
anyone but this user could have written. A booby-trapped state file (unpickling it creates a marker file, as
any code would run) in a folder or file others can write, behind a symbolic link, or in a folder of another
user: the command refuses with exit 2 naming the folder or file, starts nothing, and the marker never appears.
A private folder is used (created 0700 when missing) and the state luigid saves there stays private."""
from __future__ import annotations

import os
import pickle
import stat
from pathlib import Path

import pytest

from conftest import write_manifest
from pipeline.cli import main as cli


class Trap:
    """Unpickling this calls open(marker, "w"): the marker file appears iff the pickle was loaded."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _trap(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps(Trap(marker)))


def _world_writable(d: Path, marker: Path) -> tuple[Path, str]:
    d.mkdir()
    _trap(d / "state.pickle", marker)
    d.chmod(0o777)
    return d, f"{d} is writable by its group or by others (mode 0777)"


def _group_writable(d: Path, marker: Path) -> tuple[Path, str]:
    d.mkdir(mode=0o700)
    _trap(d / "state.pickle", marker)
    d.chmod(0o770)
    return d, f"{d} is writable by its group or by others (mode 0770)"


def _state_file_writable(d: Path, marker: Path) -> tuple[Path, str]:
    d.mkdir(mode=0o700)
    _trap(d / "state.pickle", marker)
    (d / "state.pickle").chmod(0o666)
    return d, f"{d / 'state.pickle'} is writable by its group or by others (mode 0666)"


def _state_file_symlink(d: Path, marker: Path) -> tuple[Path, str]:
    d.mkdir(mode=0o700)
    _trap(d.parent / "elsewhere.pickle", marker)  # e.g. in a shared folder
    (d / "state.pickle").symlink_to(d.parent / "elsewhere.pickle")
    return d, f"{d / 'state.pickle'} is not a regular file (a symbolic link)"


def _folder_symlink(d: Path, marker: Path) -> tuple[Path, str]:
    real, _ = _world_writable(d.parent / "shared", marker)
    d.symlink_to(real)
    return d, f"{d} is not a folder (a symbolic link)"


def _other_users_folder(d: Path, marker: Path) -> tuple[Path, str]:
    d.mkdir(mode=0o755)
    _trap(d / "state.pickle", marker)
    if os.geteuid() != 0:
        pytest.skip("only root can make a folder owned by another user")
    os.chown(d / "state.pickle", 65534, 65534)
    os.chown(d, 65534, 65534)
    return d, f"{d} is owned by uid 65534, not by this user (uid 0)"


UNSAFE = [_world_writable, _group_writable, _state_file_writable, _state_file_symlink, _folder_symlink,
          _other_users_folder]


@pytest.mark.parametrize("make", UNSAFE, ids=[m.__name__.strip("_") for m in UNSAFE])
def test_luigid_state_others_could_write_is_refused_and_never_unpickled(tmp_path, capsys, make):
    marker = tmp_path / "code-ran"
    state, reason = make(tmp_path / "state", marker)
    manifest = write_manifest(tmp_path / "m.parquet", [{"job_id": "a", "prompt": "a red circle", "seed": 1}])
    try:
        code = cli(["workers", "--manifest", str(manifest), "--workers", "1", "--luigid-state", str(state),
                    "--output-dir", str(tmp_path / "out"), "--store", str(tmp_path / "store")])
    except Exception as e:  # e.g. luigid dying on what the trap's code returned: the marker says more
        code = e
    out = capsys.readouterr().out
    assert not marker.exists(), "luigid unpickled a state file someone else could write"
    assert code == 2, out
    assert f"error: --luigid-state: {reason}" in out and "pickle" in out, out
    assert not (tmp_path / "out").exists()  # nothing started


def test_private_state_folder_is_created_used_and_kept_private(tmp_path):
    from pipeline.workers import local_luigid

    state = tmp_path / "new" / "luigid"
    with local_luigid(gpu_units=1, state_dir=state) as scheduler:
        assert scheduler.process.poll() is None
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    saved = state / "state.pickle"  # luigid saves its state when it stops
    assert saved.is_file() and stat.S_IMODE(saved.stat().st_mode) == 0o600
    for name in ("luigid.cfg", "luigid.log"):
        assert stat.S_IMODE((state / name).stat().st_mode) == 0o600, name
    with local_luigid(gpu_units=1, state_dir=state):  # the next run accepts what the last one saved
        pass
    log = (state / "luigid.log").read_text()
    assert "Attempting to load state from" in log and "Error when loading state" not in log, log[-2000:]
