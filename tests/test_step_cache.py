"""Step caching (`feature_caching`: Tea, Mag) on the embedded tiny model: what is skipped follows LightX2V's
rules, nothing skipped means the uncached bytes, the settings are part of the denoise key, and a kill
mid-stage resumes to the bytes of an uninterrupted cached run."""
from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from conftest import read_results, run_batch, write_config, write_manifest

STEPS = 20  # the embedded config's 20 UniPC steps: 9 high-noise, 11 low-noise
SMALL = dict(target_video_length=5, target_height=32, target_width=32, text_len=64)
ROWS = [{"job_id": "a", "prompt": "a red circle moving left", "seed": 1},
        {"job_id": "b", "prompt": "a blue square moving up", "seed": 2}]
# LightX2V's configs/caching/teacache/wan_t2v_1_3b_tea_480p.json coefficients
TEA_COEFFICIENTS = [[-5.21862437e04, 9.23041404e03, -5.28275948e02, 1.36987616e01, -4.99875664e-02],
                    [2.39676752e03, -1.31110545e03, 2.01331979e02, -8.29855975e00, 1.37887774e-01]]


# rescale(x) = x: the accumulated distance is a sum of relative L1 changes, never below 0
IDENTITY = [[1.0, 0.0], [1.0, 0.0]]


def tea(thresh: float, use_ret_steps: bool = True, coefficients=TEA_COEFFICIENTS) -> dict:
    return {"feature_caching": "Tea", "teacache_thresh": thresh, "use_ret_steps": use_ret_steps,
            "coefficients": coefficients}


def mag(thresh: float, k: int = 4, retention: float = 0.2, ratio: float = 0.99) -> dict:
    ratios = [1.0] + [ratio] * (STEPS - 1)
    return {"feature_caching": "Mag", "magcache_thresh": thresh, "magcache_K": k,
            "magcache_retention_ratio": retention, "magcache_ratios": [ratios, ratios],
            "magcache_calibration": False}


def run(tmp: Path, name: str, rows=ROWS, **keys) -> dict:
    """Run `rows` under the small tiny config plus `keys`; job_id -> (video bytes, {stage: sidecar})."""
    work = tmp / name
    config = write_config(work / "config.json", **SMALL, **keys)
    assert run_batch(write_manifest(work / "jobs.parquet", rows), work, config)
    return collect(work / "outputs", work / "store")


def collect(out: Path, store: Path) -> dict:
    results = read_results(out)
    got = {}
    for job_id, r in results.items():
        assert r["status"] == "ok", r
        sidecars = {}
        for stage in ("denoise-high", "denoise-low"):
            for p in (store / stage).glob("*/*.json"):
                meta = json.loads(p.read_text())
                if meta["params"]["seed"] == next(row["seed"] for row in ROWS if row["job_id"] == job_id):
                    sidecars[stage] = meta
        got[job_id] = (Path(r["video"]).read_bytes(), sidecars)
    return got


def skipped(result: dict) -> int:
    return sum(meta["feature_caching"]["forwards_skipped"] for _, metas in result.values() for meta in metas.values())


@pytest.fixture(scope="module")
def uncached(tmp_path_factory, tiny_root):
    return run(tmp_path_factory.mktemp("uncached"), "off")


def lightx2v_mag_skips(cfg: dict, steps: range) -> list[int]:
    """LightX2V's WanTransformerInferMagCaching.infer_main_blocks decision, re-stated for one branch of one
    expert (our expert's first step always computes: it has no residual yet)."""
    err, count, ratio, out = 0.0, 0, 1.0, []
    for i in steps:
        if i >= int(STEPS * cfg["magcache_retention_ratio"]):
            ratio *= cfg["magcache_ratios"][0][i]
            count += 1
            err += abs(1 - ratio)
            if i != steps.start and err < cfg["magcache_thresh"] and count <= cfg["magcache_K"]:
                out.append(i)
                continue
            err, count, ratio = 0.0, 0, 1.0
    return out


def test_mag_skips_what_lightx2v_skips(tmp_path, tiny_root):
    cfg = mag(0.5, k=3)
    got = run(tmp_path, "mag", rows=ROWS[:1], **cfg)
    _, metas = got["a"]
    split = metas["denoise-high"]["params"]["steps"][1]
    for stage, steps in (("denoise-high", range(0, split)), ("denoise-low", range(split, STEPS))):
        report = metas[stage]["feature_caching"]
        want = lightx2v_mag_skips(cfg, steps)
        assert want, "the settings must skip something for this test to mean anything"
        assert report["skipped_steps"] == {"cond": want, "uncond": want}, (stage, report)
        assert report["forwards"] == 2 * len(steps)  # CFG: two forwards a step
        assert report["forwards_skipped"] == 2 * len(want)


def test_loose_thresholds_skip_forwards_and_change_the_video(tmp_path, uncached):
    for name, keys in (("tea", tea(0.26)), ("mag", mag(0.5))):
        got = run(tmp_path, name, **keys)
        assert skipped(got) > 0, name
        assert all(got[j][0] != uncached[j][0] for j in got), f"{name}: skipping forwards changed nothing"


def test_tea_always_computes_its_retained_steps(tmp_path, tiny_root):
    """An unreachable threshold skips every step except the first 5 (use_ret_steps) and each expert's first."""
    got = run(tmp_path, "tea-all", rows=ROWS[:1], **tea(1e12))
    _, metas = got["a"]
    split = metas["denoise-high"]["params"]["steps"][1]
    assert metas["denoise-high"]["feature_caching"]["skipped_steps"]["cond"] == list(range(5, split))
    assert metas["denoise-low"]["feature_caching"]["skipped_steps"]["uncond"] == list(range(split + 1, STEPS))


@pytest.mark.parametrize("keys", [tea(0.0, coefficients=IDENTITY), tea(0.0, False, IDENTITY), mag(0.0)],
                         ids=["tea", "tea-noret", "mag"])
def test_threshold_zero_skips_nothing_and_gives_the_uncached_bytes(tmp_path, uncached, keys):
    """(With LightX2V's fitted TeaCache coefficients threshold 0 still skips: their polynomial is below 0 near
    0, e.g. -0.05 for the 1.3B ret-steps fit, and LightX2V compares the rescaled sum as it is.)"""
    got = run(tmp_path, "zero", **keys)
    assert skipped(got) == 0
    for job_id, (video, metas) in got.items():
        assert video == uncached[job_id][0], job_id
        assert all(m["feature_caching"]["forwards"] > 0 for m in metas.values())


def test_caching_settings_are_in_the_denoise_key_only(tiny_root):
    from pipeline.config import parse_config, load_config
    from pipeline.manifest import Job
    from pipeline.plan import plan_jobs

    base = {k: v for k, v in load_config(None).values.items() if v is not None}

    def keys(**extra) -> dict[str, str]:
        plan = plan_jobs([Job(row=0, job_id="a", prompt="a red circle", negative_prompt=None, image=None, seed=1)], parse_config({**base, **extra}))[0]
        assert plan.error is None, plan.error
        return {name: spec.key for name, spec in plan.stages().items()}

    off, nocaching = keys(), keys(feature_caching="NoCaching")
    assert nocaching == off  # LightX2V's off value is the uncached artifact, same key
    variants = [keys(**tea(0.26)), keys(**tea(0.1)), keys(**tea(0.26, use_ret_steps=False)), keys(**mag(0.5)),
                keys(**mag(0.5, k=2)), keys(**mag(0.5, ratio=0.98))]
    for v in variants:
        assert v["text"] == off["text"] and v["text-negative"] == off["text-negative"]
        assert v["denoise-high"] != off["denoise-high"] and v["denoise-low"] != off["denoise-low"]
    assert len({v["denoise-low"] for v in variants}) == len(variants)


@pytest.mark.parametrize("keys,error", [
    ({"feature_caching": "TaylorSeer"}, "'feature_caching': must be NoCaching, Tea or Mag (got 'TaylorSeer')"),
    ({"feature_caching": "Tea", "teacache_thresh": 0.2, "use_ret_steps": True}, "'coefficients': required"),
    ({**tea(0.2), "coefficients": [[1.0, 2.0]]}, "'coefficients': must be two non-empty lists"),
    ({**mag(0.2), "magcache_K": -1}, "'magcache_K': must be >= 0"),
    ({**mag(0.2), "magcache_retention_ratio": 1.5}, "'magcache_retention_ratio': must be between 0 and 1"),
    ({**tea(0.2), "parallel": {"cfg_p_size": 2}}, "'feature_caching': not available with parallel"),
])
def test_bad_caching_keys_are_refused_by_name(keys, error):
    from pipeline.config import load_config, parse_config
    from pipeline.errors import ConfigError

    base = {k: v for k, v in load_config(None).values.items() if v is not None}
    with pytest.raises(ConfigError, match=error.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        parse_config({**base, **keys})


def test_mag_ratios_shorter_than_the_schedule_fail_the_row(tiny_root):
    from pipeline.config import load_config, parse_config
    from pipeline.manifest import Job
    from pipeline.plan import plan_jobs

    base = {k: v for k, v in load_config(None).values.items() if v is not None}
    keys = mag(0.5)
    keys["magcache_ratios"] = [r[:10] for r in keys["magcache_ratios"]]
    plan = plan_jobs([Job(row=3, job_id="a", prompt="x", negative_prompt=None, image=None, seed=1)], parse_config({**base, **keys}))[0]
    assert plan.error and plan.error.startswith("row 3:") and "magcache_ratios has 10 ratios" in plan.error


def test_kill_mid_cached_stage_resumes_to_the_uninterrupted_bytes(tmp_path, tiny_root):
    from test_fault_injection import BatchRunner

    config = write_config(tmp_path / "config.json", **SMALL, **tea(0.26))
    manifest = write_manifest(tmp_path / "jobs.parquet", ROWS)
    runner = BatchRunner(tmp_path / "batches.log")
    try:
        ref = runner.run(manifest, config, tmp_path / "ref" / "out", tmp_path / "ref" / "store")
        assert ref == {"signal": None, "code": 0}
        # killed after the 4th step of the second low-noise stage: caching state had skipped steps by then
        killed = runner.run(manifest, config, tmp_path / "out", tmp_path / "store", fault="denoise-low:16:step")
        assert killed["signal"] == signal.SIGKILL, killed
        assert not (tmp_path / "out" / "results.parquet").exists()
        assert runner.run(manifest, config, tmp_path / "out", tmp_path / "store") == {"signal": None, "code": 0}
    finally:
        runner.close()
    want = collect(tmp_path / "ref" / "out", tmp_path / "ref" / "store")
    got = collect(tmp_path / "out", tmp_path / "store")
    assert skipped(want) > 0
    for job_id in want:
        assert got[job_id][0] == want[job_id][0], job_id
        for stage, meta in want[job_id][1].items():
            assert got[job_id][1][stage]["feature_caching"] == meta["feature_caching"], (job_id, stage)


def test_batched_cfg_follows_the_same_decisions_per_branch(tmp_path, tiny_root):
    """Batched CFG (the default on CUDA) runs both branches in one forward: with different ratio tables the
    branches disagree on some steps, and each branch still gets exactly the two-forward run's decisions and
    (up to the floating-point reordering of a batch of 2) its output."""
    from safetensors.torch import load_file
    import torch

    keys = mag(0.05)  # conditional (0.99): skips 2 steps of 3; unconditional (0.97): 1 of 2
    keys["magcache_ratios"][1] = [1.0] + [0.97] * (STEPS - 1)
    two = run(tmp_path, "two", rows=ROWS[:1], batched_cfg=False, **keys)
    one = run(tmp_path, "one", rows=ROWS[:1], batched_cfg=True, **keys)
    reports = {}
    for name, got in (("two", two), ("one", one)):
        reports[name] = {stage: meta["feature_caching"] for stage, meta in got["a"][1].items()}
    low = reports["one"]["denoise-low"]
    assert low["skipped_steps"]["cond"] != low["skipped_steps"]["uncond"], "the branches must disagree somewhere"
    for stage in reports["two"]:
        assert reports["one"][stage]["skipped_steps"] == reports["two"][stage]["skipped_steps"], stage
    # a step where only one branch skips still runs the batch once
    assert low["block_stack_runs"] < reports["two"]["denoise-low"]["block_stack_runs"]
    latents = [load_file(next((tmp_path / name / "store" / "denoise-low").glob("*/*.safetensors")))["latents"]
               for name in ("two", "one")]
    assert torch.allclose(latents[0], latents[1], atol=1e-4, rtol=1e-4), (latents[0] - latents[1]).abs().max()
