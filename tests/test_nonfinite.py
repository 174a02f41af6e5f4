"""NaN/Inf: a stage whose output is not finite fails that job with a clear error in results.parquet (stage,
tensor, count), writes no artifact, and the other jobs finish. The failure is not sticky: a later run retries."""
from __future__ import annotations

import pytest
import torch

from conftest import make_image, read_results, run_batch, write_config, write_manifest
from pipeline.errors import StageFailed
from pipeline.store import ArtifactStore

CONFIG = dict(infer_steps=4, target_video_length=5, target_height=32, target_width=32, text_len=32)


def test_check_finite_counts_bad_values():
    from pipeline.spec import StageSpec
    from pipeline.stages.common import check_finite

    spec = StageSpec("denoise-high", {})
    check_finite("latents", torch.ones(3, 4), spec)
    bad = torch.ones(3, 4)
    bad[0, 0], bad[1, 2], bad[2, 3] = float("nan"), float("inf"), float("-inf")
    with pytest.raises(StageFailed, match=r"denoise-high produced 3 non-finite values in 'latents' \(of 12\)"):
        check_finite("latents", bad, spec)


def _rows(tmp):
    image = make_image(tmp / "img.png", size=(40, 40))
    return [{"job_id": "ok1", "prompt": "a red circle", "seed": 1},
            {"job_id": "bad", "prompt": "a poisoned blue square", "seed": 2, "image": str(image)},
            {"job_id": "ok2", "prompt": "a green triangle", "seed": 3}]


def _poison(fn, when):
    """`fn` whose tensor output gets a NaN and an Inf when `when(*args)` is true."""
    def wrapped(*args, **kwargs):
        out = fn(*args, **kwargs)
        if when(*args):
            tensor = out[0] if isinstance(out, tuple) else out
            tensor[(0,) * tensor.dim()] = float("nan")
            tensor[(-1,) * tensor.dim()] = float("inf")
        return out
    return wrapped


def _is_bad_prompt(*args):
    return any(isinstance(a, str) and "poisoned" in a for a in args)


# stage -> (function name in the stage's module, predicate on its arguments, tensor named in the error)
POISON = {
    "text": ("encode_text", _is_bad_prompt, "context"),
    "image": ("encode_image_condition", lambda *a: True, "cond"),  # only the I2V row has an image stage
}


@pytest.mark.parametrize("stage", ["text", "image", "denoise", "decode"])
def test_nonfinite_output_fails_only_that_job(tmp_path, tiny_root, monkeypatch, stage):
    import importlib

    manifest = write_manifest(tmp_path / "m.parquet", _rows(tmp_path))
    config = write_config(tmp_path / "c.json", **CONFIG)
    if stage in POISON:
        name, when, tensor = POISON[stage]
        module = importlib.import_module(f"pipeline.stages.{stage}")
        monkeypatch.setattr(module, name, _poison(getattr(module, name), when))
        expected = f"stage {stage}: {stage} produced 2 non-finite values in '{tensor}'"
    elif stage == "denoise":
        module = importlib.import_module("pipeline.stages.denoise")
        real = module.denoise_steps

        def denoise(transformer, sched, latents, steps, context, *a, **k):
            out = real(transformer, sched, latents, steps, context, *a, **k)
            if k.get("cond") is not None and steps.start == 0:  # the I2V row's high-noise expert
                out = out.clone().contiguous()
                out.view(-1)[:5] = float("nan")
            return out

        monkeypatch.setattr(module, "denoise_steps", denoise)
        expected = "stage denoise-high: denoise-high produced 5 non-finite values in 'latents'"
    else:
        calls = []
        module = importlib.import_module("pipeline.stages.decode")
        monkeypatch.setattr(module, "decode_latents", _poison(module.decode_latents, lambda *a: _first(calls)))
        expected = "stage decode: decode produced 2 non-finite values in 'frames'"

    assert not run_batch(manifest, tmp_path, config=config)
    results = read_results(tmp_path / "outputs")
    failed = {j: r for j, r in results.items() if r["status"] == "failed"}
    assert len(failed) == 1, results
    (job, row), = failed.items()
    if stage != "decode":
        assert job == "bad"
    assert expected in row["error"] and "the artifact was not written" in row["error"], row["error"]
    assert row["video"] is None and not (tmp_path / "outputs" / f"{job}.mp4").exists()
    assert all(r["status"] == "ok" for j, r in results.items() if j != job)

    # nothing non-finite was stored: every artifact in the store verifies and holds finite numbers
    store = ArtifactStore(tmp_path / "store")
    from safetensors.torch import load_file

    for p in (tmp_path / "store").rglob("*.safetensors"):
        assert all(torch.isfinite(t).all() for t in load_file(p).values() if t.is_floating_point()), p

    # the failure is recorded for that run only: once the cause is gone, the same command retries and succeeds
    monkeypatch.undo()
    assert run_batch(manifest, tmp_path, config=config)
    assert read_results(tmp_path / "outputs")[job]["status"] == "ok"
    assert store.root.is_dir()


def _first(calls: list) -> bool:
    calls.append(1)
    return len(calls) == 1


def test_guidance_that_overflows_fails_that_row(tmp_path, tiny_root):
    """No patching: a real per-row setting that overflows float32 (guide_scale 3e38) makes denoise non-finite."""
    rows = [{"job_id": "sane", "prompt": "a red circle", "seed": 1, "guide_scale": 4.0},
            {"job_id": "huge", "prompt": "a red circle", "seed": 1, "guide_scale": 3e38}]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    assert not run_batch(manifest, tmp_path, config=write_config(tmp_path / "c.json", **CONFIG))
    results = read_results(tmp_path / "outputs")
    assert results["sane"]["status"] == "ok"
    assert results["huge"]["status"] == "failed"
    assert "non-finite values in 'latents'" in results["huge"]["error"], results["huge"]["error"]
