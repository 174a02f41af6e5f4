"""Safe loading: `.pth` files go through one helper (pipeline.models.checkpoint.load_pth, weights_only=True);
a pickle that carries code is refused with a clear error and its code never runs; nothing in the package
unpickles any other way. And no path taken from a manifest or config makes a run write outside its output
folder and store."""
from __future__ import annotations

import ast
import os
import pickle
from pathlib import Path

import pytest
import torch

from conftest import REPO, read_results, run_batch, write_config, write_manifest
from pipeline.errors import CheckpointError
from pipeline.models.checkpoint import load_pth


class _RunsCode:
    """Unpickling this calls os.system: what a booby-trapped checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _trapped_state_dict(marker: Path) -> dict:
    return {"blocks.0.weight": torch.ones(2, 2), "payload": _RunsCode(marker)}


@pytest.mark.parametrize("fmt", ["zip", "legacy", "plain-pickle"])
def test_pickle_with_code_is_refused_and_never_runs(tmp_path, fmt):
    marker = tmp_path / "code-ran"
    path = tmp_path / "model.pth"
    if fmt == "plain-pickle":
        path.write_bytes(pickle.dumps(_trapped_state_dict(marker)))
    else:
        torch.save(_trapped_state_dict(marker), path, _use_new_zipfile_serialization=fmt == "zip")
    try:
        with pytest.raises(CheckpointError) as exc:
            load_pth(path)
        assert str(path) in str(exc.value) and "weights-only" in str(exc.value), str(exc.value)
    finally:
        assert not marker.exists(), "the pickle's code ran"


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_plain_state_dict_loads(tmp_path, fmt):
    sd = {"a.weight": torch.randn(3, 4), "a.bias": torch.arange(3, dtype=torch.float32)}
    path = tmp_path / "ok.pth"
    torch.save(sd, path, _use_new_zipfile_serialization=fmt == "zip")
    got = load_pth(path)
    assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd)


@pytest.mark.parametrize("obj,words", [
    ([torch.ones(1)], "does not hold a flat state dict"),
    ({"a": torch.ones(1), "step": 3}, "does not hold a flat state dict"),
], ids=["list", "non-tensor-value"])
def test_pth_that_is_not_a_state_dict(tmp_path, obj, words):
    path = tmp_path / "x.pth"
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match=words):
        load_pth(path)


@pytest.mark.parametrize("content", [b"", b"not a zip nor a pickle", b"PK\x03\x04broken zip"],
                         ids=["empty", "garbage", "broken-zip"])
def test_unreadable_pth_names_the_file(tmp_path, content):
    path = tmp_path / "bad.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as exc:
        load_pth(path)
    assert str(path) in str(exc.value)


def test_missing_pth(tmp_path):
    with pytest.raises(CheckpointError, match="missing file"):
        load_pth(tmp_path / "none.pth")


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            owner = getattr(f.value, "id", "") if isinstance(f, ast.Attribute) else ""
            yield node, owner, name


def test_the_package_never_unpickles_except_through_weights_only_torch_load():
    """Every torch.load in pipeline/ and tasks/ passes weights_only=True; no pickle/marshal/dill loads."""
    offenders, torch_loads = [], 0
    for py in sorted([*(REPO / "pipeline").rglob("*.py"), *(REPO / "tasks").rglob("*.py")]):
        tree = ast.parse(py.read_text(encoding="utf-8"), filename=str(py))
        for node, owner, name in _calls(tree):
            where = f"{py.relative_to(REPO)}:{node.lineno}"
            if owner == "torch" and name == "load":
                torch_loads += 1
                kw = {k.arg: k.value for k in node.keywords}
                if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                    offenders.append(f"{where}: torch.load without weights_only=True")
            if owner in ("pickle", "cPickle", "dill", "marshal", "joblib") and name in ("load", "loads"):
                offenders.append(f"{where}: {owner}.{name}")
            if name == "Unpickler":
                offenders.append(f"{where}: Unpickler")
    assert torch_loads >= 1, "the .pth helper itself should have been found"
    assert not offenders, offenders


def test_pth_loading_goes_through_one_helper():
    """Every checkpoint .pth is read by pipeline/models/checkpoint.py's load_pth; no other loader calls
    torch.load."""
    where = set()
    for py in [*(REPO / "pipeline").rglob("*.py"), *(REPO / "tasks").rglob("*.py")]:
        tree = ast.parse(py.read_text(encoding="utf-8"))
        if any(owner == "torch" and name == "load" for _, owner, name in _calls(tree)):
            where.add(str(py.relative_to(REPO)))
    assert where == {"pipeline/models/checkpoint.py"}, where


# ------------------------------------------------------------------------------ where a run may write
def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_a_run_writes_only_into_its_output_folder_and_store(tmp_path, tiny_root):
    """Prompts that look like paths, a job id derived from one, a symlink planted at an output name: every
    file the run makes is inside outputs/ or store/, and the symlink's target is untouched."""
    work = tmp_path / "work"
    work.mkdir()
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    out = work / "outputs"
    out.mkdir()
    (out / "planted.mp4").symlink_to(outside)  # a later video of that name must replace the link only
    rows = [{"job_id": "planted", "prompt": "../../outside.txt", "seed": 1},
            {"prompt": "/etc/passwd ../../x", "seed": 2},  # no job_id: derived from the prompt
            {"job_id": "plain", "prompt": "a red circle", "seed": 3, "negative_prompt": "../../../tmp/evil"}]
    manifest = write_manifest(tmp_path / "jobs.parquet", rows)
    config = write_config(tmp_path / "c.json", infer_steps=2, target_video_length=5, target_height=32,
                          target_width=32, text_len=32)
    before_root = _tree(tmp_path)
    assert run_batch(manifest, work, config=config)
    results = read_results(out)
    assert all(r["status"] == "ok" for r in results.values())
    for r in results.values():
        video = Path(r["video"])
        assert video.parent == out and video.is_file() and not video.is_symlink(), video
        assert "/" not in r["job_id"] and ".." not in r["job_id"]
    assert outside.read_text() == "keep me"
    new = _tree(tmp_path) - before_root
    assert new and all(p.startswith(("work/outputs/", "work/store/", "work/outputs", "work/store")) for p in new), \
        sorted(p for p in new if not p.startswith(("work/outputs", "work/store")))
