"""Per-row LoRA (manifest columns `lora` and `lora_strength`): part of the denoise keys, rows grouped by LoRA set
within each stage so each patched expert loads once, and rows without a LoRA give exactly the bytes of a batch
that never had one (switching between sets leaves no trace)."""
from __future__ import annotations

import json

import pytest

from conftest import read_results, run_batch, write_config, write_manifest

CONFIG = dict(infer_steps=2, target_video_length=5, target_height=32, target_width=32, text_len=16)
PROMPT = "a red circle moving left on a blue background"


@pytest.fixture(scope="module")
def loras(tmp_path_factory, tiny_root):
    from pipeline.testing import standins

    folder = tmp_path_factory.mktemp("loras")
    high, low = folder / "high.safetensors", folder / "low.safetensors"
    standins.write_lora(tiny_root / "t2v" / "transformer", high, rank=4, seed=3, alpha=4.0, scale=0.5)
    standins.write_lora(tiny_root / "t2v" / "transformer_2", low, rank=4, seed=4, alpha=4.0, scale=0.5)
    return high, low


def _contiguous(seq: list) -> bool:
    runs = [x for i, x in enumerate(seq) if i == 0 or seq[i - 1] != x]
    return len(runs) == len(set(runs))


def test_rows_with_and_without_loras(tmp_path, loras, monkeypatch):
    import pipeline.stages.denoise as denoise
    from pipeline.batch import load_batch
    from pipeline.runtime import MODELS

    order: list[tuple[str, str]] = []
    real = denoise.get_model

    def get_model(spec, fingerprint, *a, **k):
        order.append((spec.stage, fingerprint))
        return real(spec, fingerprint, *a, **k)

    monkeypatch.setattr(denoise, "get_model", get_model)

    high, low = loras
    both = json.dumps([{"path": str(high), "name": "high_noise_model", "strength": 1.0},
                       {"path": str(low), "name": "low_noise_model", "strength": 0.5}])
    rows = [{"job_id": "plain-1", "prompt": PROMPT, "seed": 1},
            {"job_id": "high-only", "prompt": PROMPT, "seed": 1, "lora": str(high), "lora_strength": 0.8},
            {"job_id": "plain-2", "prompt": PROMPT, "seed": 2},
            {"job_id": "both", "prompt": PROMPT, "seed": 1, "lora": both},
            {"job_id": "none", "prompt": PROMPT, "seed": 3, "lora": "[]"}]
    config = write_config(tmp_path / "c.json", **CONFIG)
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    MODELS.clear()
    assert run_batch(manifest, tmp_path, config=config)
    # the rows' LoRA sets alternate; within each stage the tasks ran grouped by set (as a GPU worker must, one
    # expert resident at a time), so each patched expert loaded once
    for stage in ("denoise-high", "denoise-low"):
        fps = [fp for s, fp in order if s == stage]
        assert len(fps) == 5 and _contiguous(fps), (stage, fps)
    assert set(MODELS.loads.values()) == {1}, MODELS.loads
    assert sum(1 for k in MODELS.loads if k[0] == "high") == 3  # base, high LoRA at 0.8, high LoRA at 1.0
    assert sum(1 for k in MODELS.loads if k[0] == "low") == 2  # base, low LoRA

    plain = [dict(r) for r in rows if "lora" not in r or r["lora"] == "[]"]
    for r in plain:
        r.pop("lora", None)
    ref = tmp_path / "ref"
    assert run_batch(write_manifest(ref / "m.parquet", plain), ref, config=config)
    out, ref_out = tmp_path / "outputs", ref / "outputs"
    for job in ("plain-1", "plain-2", "none"):
        assert (out / f"{job}.mp4").read_bytes() == (ref_out / f"{job}.mp4").read_bytes(), job
    assert (out / "high-only.mp4").read_bytes() != (out / "plain-1.mp4").read_bytes()
    assert (out / "both.mp4").read_bytes() != (out / "high-only.mp4").read_bytes()

    stages = {p.job.job_id: p.stages() for p in load_batch(manifest, config).plans}
    assert stages["high-only"]["text"].key == stages["plain-1"]["text"].key  # the prompt is encoded once
    assert stages["high-only"]["denoise-high"].key != stages["plain-1"]["denoise-high"].key
    # a LoRA on the high-noise expert only: the low-noise expert is the base one (same fingerprint)
    assert stages["high-only"]["denoise-low"].params["dit"] == stages["plain-1"]["denoise-low"].params["dit"]
    assert stages["none"]["denoise-high"].params["dit"] == stages["plain-1"]["denoise-high"].params["dit"]


@pytest.mark.parametrize("lora,strength,message", [
    ("missing.safetensors", None, "column 'lora' item 0: LoRA file not found"),
    ("[{\"path\": 3}]", None, "column 'lora' item 0 must be an object with a 'path'"),
    ("[not json", None, "column 'lora' is not a valid JSON list"),
    ("[{\"path\": \"HIGH\", \"name\": \"middle\"}]", None, "name 'middle' is not one of"),
    (None, 0.5, "column 'lora_strength' is set but column 'lora' is empty"),
    ("[{\"path\": \"HIGH\"}]", 0.5, "column 'lora_strength' goes with a single LoRA path"),
    ("HIGH", float("inf"), "strength must be a finite number"),
])
def test_bad_lora_columns_are_row_problems_naming_the_column(tmp_path, loras, lora, strength, message):
    from pipeline.cli import main

    high, _ = loras
    row = {"job_id": "bad", "prompt": PROMPT, "seed": 1, "lora": lora.replace("HIGH", str(high)) if lora else lora,
           "lora_strength": strength}
    manifest = write_manifest(tmp_path / "m.parquet", [row, {"job_id": "ok", "prompt": PROMPT, "seed": 2}])
    config = write_config(tmp_path / "c.json", **CONFIG)
    assert main(["validate", "--manifest", str(manifest), "--config", str(config)]) == 1
    assert not run_batch(manifest, tmp_path, config=config)
    results = read_results(tmp_path / "outputs")
    assert results["ok"]["status"] == "ok"
    assert results["bad"]["status"] == "failed" and message in results["bad"]["error"], results["bad"]["error"]
