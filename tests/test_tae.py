"""LightX2V's tiny VAE (`use_tae`, `tae_path`, `need_scaled`): the TAEHV decoder loaded from its published
key layout, checked against a reference forward written here from LightX2V's tae.py; how the file is found,
checked and refused; the decode key; and a tiny-model run that decodes with it.

Why this reference can catch a wrong decoder: it is LightX2V's `decode_video(parallel=False)` written out
from lightx2v/models/video_encoders/hf/tae.py with functional ops, reading the weights by their published key
names from the state dict the test wrote, one frame at a time (the work-queue walk of
apply_model_with_memblocks: a MemBlock takes cat([x, its input of the previous frame]) with zeros before the
first, each TGrow hands its channel groups on as consecutive frames, the first 3 frames are dropped). Our
module shares no code with it and runs chunks of frames at once, carrying the MemBlock memory between chunks:
a wrong key mapping, concatenation order, memory (or its carry across a chunk boundary), TGrow frame order,
trim, clamp or upsampling changes the frames far beyond the 1e-5 tolerance, and `test_reference_tells_*`
shows that each such mistake made in the reference moves its output far from ours. The layer list below was
transcribed from LightX2V's Sequentials (not from our module), and our expected layout is compared with it.
Weights are random at full size (TAEHV's widths are fixed; ~11 M parameters), scaled so activations neither
vanish nor saturate the clamp: a degenerate all-0 or all-1 output would make every comparison pass.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import read_results, run_batch, write_config, write_manifest

# TAEHV's encoder and decoder Sequentials as LightX2V builds them for Wan2.1 (model_type "wan21", patch 1,
# 16 latent channels, decoder_time_upscale (True, True), space upscale (True, True, True)), layer by layer.
MB64, MB128, MB256 = [("mem", 64)] * 3, [("mem", 128)] * 3, [("mem", 256)] * 3
ENCODER = [("conv", 3, 64, True), ("relu",), ("pool", 64, 2), ("conv", 64, 64, False), *MB64,
           ("pool", 64, 2), ("conv", 64, 64, False), *MB64, ("pool", 64, 1), ("conv", 64, 64, False), *MB64,
           ("conv", 64, 16, True)]
DECODER = [("clamp",), ("conv", 16, 256, True), ("relu",), *MB256, ("up",), ("grow", 256, 1),
           ("conv", 256, 128, False), *MB128, ("up",), ("grow", 128, 2), ("conv", 128, 64, False), *MB64, ("up",),
           ("grow", 64, 2), ("conv", 64, 64, False), ("relu",), ("conv", 64, 3, True)]


def _conv_tensors(name: str, n_in: int, n_out: int, k: int, bias: bool, g: torch.Generator, gain: float = 1.0):
    w = torch.randn(n_out, n_in, k, k, generator=g) * gain * math.sqrt(2.0 / (n_in * k * k))
    out = {f"{name}.weight": w}
    if bias:
        out[f"{name}.bias"] = torch.randn(n_out, generator=g) * 0.05
    return out


def published_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A TAEHV state dict in the published key layout (`encoder.N...`, `decoder.N...`), random weights."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for part, layers in (("encoder", ENCODER), ("decoder", DECODER)):
        for i, layer in enumerate(layers):
            p = f"{part}.{i}"
            if layer[0] == "conv":
                sd.update(_conv_tensors(p, layer[1], layer[2], 3, layer[3], g))
            elif layer[0] == "mem":
                n = layer[1]
                sd.update(_conv_tensors(f"{p}.conv.0", 2 * n, n, 3, True, g))
                sd.update(_conv_tensors(f"{p}.conv.2", n, n, 3, True, g))
                sd.update(_conv_tensors(f"{p}.conv.4", n, n, 3, True, g, gain=0.4))  # a residual branch
            elif layer[0] == "pool":
                sd[f"{p}.conv.weight"] = torch.randn(layer[1], layer[1] * layer[2], 1, 1, generator=g) / layer[1] ** 0.5
            elif layer[0] == "grow":
                sd[f"{p}.conv.weight"] = torch.randn(layer[1] * layer[2], layer[1], 1, 1, generator=g) / layer[1] ** 0.5
    last = f"decoder.{len(DECODER) - 1}"
    sd[f"{last}.weight"] *= 0.1  # frames around mid-grey with visible structure, few clamped
    sd[f"{last}.bias"] = torch.full((3,), 0.5)
    return sd


def reference_decode(sd: dict[str, torch.Tensor], latents: torch.Tensor, memory_on: bool = True,
                     past_first: bool = False, grow_reversed: bool = False, trim_end: bool = False) -> torch.Tensor:
    """LightX2V's TAEHV.decode_video(parallel=False) for latents [1, 16, T, h, w] -> [1, 3, 4T-3, 8h, 8w].
    The keyword arguments plant one mistake each (for test_reference_tells_*)."""
    memory: dict[int, torch.Tensor] = {}
    out: list[torch.Tensor] = []

    def visit(x: torch.Tensor, start: int) -> None:
        for j in range(start, len(DECODER)):
            kind, p = DECODER[j][0], f"decoder.{j}"
            if kind == "clamp":
                x = torch.tanh(x / 3) * 3
            elif kind == "conv":
                x = F.conv2d(x, sd[f"{p}.weight"], sd.get(f"{p}.bias"), padding=1)
            elif kind == "relu":
                x = F.relu(x)
            elif kind == "up":
                x = F.interpolate(x, scale_factor=2, mode="nearest")
            elif kind == "mem":
                past = memory.get(j, torch.zeros_like(x)) if memory_on else torch.zeros_like(x)
                memory[j] = x
                h = torch.cat([past, x] if past_first else [x, past], 1)
                for k in (0, 2, 4):
                    h = F.conv2d(h, sd[f"{p}.conv.{k}.weight"], sd[f"{p}.conv.{k}.bias"], padding=1)
                    h = F.relu(h) if k < 4 else h
                x = F.relu(h + x)
            elif kind == "grow":
                parts = F.conv2d(x, sd[f"{p}.conv.weight"]).chunk(DECODER[j][2], 1)
                for part in (reversed(parts) if grow_reversed else parts):
                    visit(part, j + 1)
                return
        out.append(x)

    for t in range(latents.shape[2]):
        visit(latents[:, :, t], 0)
    video = torch.stack(out, 2).clamp(0, 1)
    return video[:, :, :-3] if trim_end else video[:, :, 3:]


@pytest.fixture(scope="module")
def sd():
    return published_state_dict()


@pytest.fixture(scope="module")
def tae_files(tmp_path_factory, sd):
    """The layout as madebyollin publishes it (taew2_1.pth, a torch.save'd state dict) and as LightX2V
    publishes lighttaew2_1.safetensors (fp16 here: any float dtype loads)."""
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("tae")
    torch.save(sd, d / "taew2_1.pth")
    save_file({k: v.half().contiguous() for k, v in sd.items()}, str(d / "lighttaew2_1.safetensors"))
    return d / "taew2_1.pth", d / "lighttaew2_1.safetensors"


@pytest.fixture(scope="module")
def latents():
    return torch.randn(1, 16, 5, 6, 8, generator=torch.Generator().manual_seed(1)) * 1.5


@pytest.fixture(scope="module")
def ours(tae_files):
    from pipeline.models.tae import load_tae

    return load_tae(tae_files[0], torch.device("cpu"), torch.float32)


# ------------------------------------------------------------------------------------------- layout
def test_expected_layout_is_lightx2vs_sequentials(sd):
    from pipeline.models.tae import expected_shapes

    assert expected_shapes() == {k: tuple(v.shape) for k, v in sd.items()}
    assert len(sd) == 128 and sum(v.numel() for v in sd.values()) > 10_000_000


def test_latent_statistics_are_the_wan21_vaes():
    """need_scaled's constants (LightX2V's WanVAE_tiny) are the Wan2.1 VAE's: diffusers' AutoencoderKLWan
    defaults, which are Wan-AI's vae/config.json."""
    import inspect

    from diffusers import AutoencoderKLWan

    from pipeline.models.tae import WAN21_LATENTS_MEAN, WAN21_LATENTS_STD

    params = inspect.signature(AutoencoderKLWan.__init__).parameters
    assert list(WAN21_LATENTS_MEAN) == params["latents_mean"].default
    assert list(WAN21_LATENTS_STD) == params["latents_std"].default


# ------------------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_decode_matches_the_reference(ours, sd, latents, chunk):
    want = reference_decode(sd, latents)
    got = ours(latents, frames_per_chunk=chunk)
    assert got.shape == (1, 3, 17, 48, 64) == want.shape
    assert want.std() > 0.05 and ((want > 0) & (want < 1)).float().mean() > 0.9  # not a degenerate output
    assert (got - want).abs().max() < 1e-5


@pytest.mark.parametrize("mistake", ["memory_on", "past_first", "grow_reversed", "trim_end"])
def test_reference_tells_a_planted_mistake(ours, sd, latents, mistake):
    planted = reference_decode(sd, latents, **{mistake: mistake != "memory_on"})
    assert (ours(latents) - planted).abs().max() > 1e-2, mistake


def test_pth_and_safetensors_load_the_same_decoder(tae_files, latents):
    from pipeline.models.tae import load_tae

    a = load_tae(tae_files[0], torch.device("cpu"), torch.float32)
    b = load_tae(tae_files[1], torch.device("cpu"), torch.float32)
    assert all(torch.equal(x.half().float(), y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert (a(latents) - b(latents)).abs().max() < 5e-3  # fp16 rounding of the weights only


def test_need_scaled_unnormalizes_with_the_wan21_statistics(ours, latents):
    from pipeline.models.tae import WAN21_LATENTS_MEAN, WAN21_LATENTS_STD
    from pipeline.stages.decode import decode_latents_tae

    raw = latents * torch.tensor(WAN21_LATENTS_STD).view(1, -1, 1, 1, 1) + torch.tensor(
        WAN21_LATENTS_MEAN).view(1, -1, 1, 1, 1)
    scaled = decode_latents_tae(ours, latents, need_scaled=True)
    plain = decode_latents_tae(ours, latents, need_scaled=False)
    assert scaled.shape == (17, 48, 64, 3)
    assert torch.allclose(scaled, ours(raw)[0].permute(1, 2, 3, 0), atol=1e-6)
    assert torch.allclose(plain, ours(latents)[0].permute(1, 2, 3, 0), atol=1e-6)
    assert (scaled - plain).abs().max() > 1e-2


# ------------------------------------------------------------------------------------------- files
def test_a_file_off_the_layout_is_refused_naming_key_and_file(tmp_path, sd):
    from pipeline.errors import CheckpointError
    from pipeline.models.tae import check_tae, load_tae

    no_encoder = {k: v for k, v in sd.items() if k != "encoder.17.weight"}
    torch.save(no_encoder, tmp_path / "a.pth")
    with pytest.raises(CheckpointError, match=r"a\.pth does not fit the architecture: 1 missing key\(s\): encoder\.17"):
        check_tae(tmp_path / "a.pth")
    wrong = dict(sd, **{"decoder.13.conv.weight": torch.zeros(128, 128, 1, 1)})
    torch.save(wrong, tmp_path / "b.pth")
    with pytest.raises(CheckpointError, match=r"decoder\.13\.conv\.weight \(128, 128, 1, 1\) \(expected \(256, 128"):
        load_tae(tmp_path / "b.pth", torch.device("cpu"), torch.float32)
    (tmp_path / "c.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="must be .pth or .safetensors"):
        check_tae(tmp_path / "c.bin")


class _Cfg(dict):
    """Just what find_tae reads of a GenerationConfig."""

    def locate(self, value):
        return str(Path(value).resolve()), "absolute"


def test_tae_is_found_as_lightx2v_finds_it(tmp_path, tae_files):
    import shutil

    from pipeline.errors import CheckpointError
    from pipeline.models.tae import find_tae

    folder = tmp_path / "model"
    folder.mkdir()
    with pytest.raises(CheckpointError, match=r"config key 'use_tae': no tae_path and no taew2_1\.pth under the "
                                              r"model folder .* distill_int8/taew2_1\.pth, .* taew2_1\.pth\)"):
        find_tae(_Cfg(), folder)
    shutil.copy(tae_files[0], folder / "taew2_1.pth")
    assert find_tae(_Cfg(), folder)[0] == str(folder / "taew2_1.pth")
    for sub in ("original", "fp8", "distill_int8"):  # find_torch_model_path tries distill_int8 first
        (folder / sub).mkdir()
        shutil.copy(tae_files[0], folder / sub / "taew2_1.pth")
    assert find_tae(_Cfg(), folder) == (str(folder / "distill_int8" / "taew2_1.pth"),
                                        "found under the model folder as distill_int8/taew2_1.pth")
    assert find_tae(_Cfg(tae_path=str(tae_files[1])), folder)[0] == str(tae_files[1])  # tae_path wins
    with pytest.raises(CheckpointError, match=r"config key 'tae_path': tiny VAE file not found: .*nope\.pth"):
        find_tae(_Cfg(tae_path=str(tmp_path / "nope.pth")), folder)


# ------------------------------------------------------------------------------------------- config keys
def test_config_keys(caplog):
    from pipeline.config import parse_config
    from pipeline.errors import ConfigError

    parse_config({"model_path": "builtin:tiny", "use_tae": True, "tae_path": "t.pth", "need_scaled": True,
                  "use_lightvae": False})
    with pytest.raises(ConfigError, match="config key 'use_lightvae': not supported: LightX2V's LightVAE"):
        parse_config({"model_path": "builtin:tiny", "use_lightvae": True})
    with pytest.raises(ConfigError, match="config key 'use_tiny_vae': not supported: LightX2V's former name of use_tae"):
        parse_config({"model_path": "builtin:tiny", "use_tiny_vae": True})
    with caplog.at_level("WARNING"):
        parse_config({"model_path": "builtin:tiny", "need_scaled": True})
        parse_config({"model_path": "builtin:tiny", "use_tae": True, "tae_path": "x/lighttaew2_1.safetensors"})
    assert "config key 'need_scaled' is only read with use_tae true" in caplog.text
    assert "lighttaew2_1.safetensors is LightX2V's lighttae" in caplog.text


def test_api_enable_lightvae_sets_need_scaled_for_a_lighttae_file(tmp_path):
    from pipeline.api import LightX2VPipeline

    pipe = LightX2VPipeline(model_path="builtin:tiny", model_cls="wan2.2_moe", task="t2v", store=tmp_path / "s",
                            work_dir=tmp_path)
    pipe.enable_lightvae(use_tae=True, tae_path="taew2_1.pth")
    assert not pipe.values.get("need_scaled")
    pipe.enable_lightvae(use_tae=True, tae_path="/m/lighttaew2_1.safetensors")
    assert pipe.values["need_scaled"] is True and pipe.values["tae_path"] == "/m/lighttaew2_1.safetensors"


# ------------------------------------------------------------------------------------------- check-config
def test_check_config_reports_where_the_tae_is_and_refuses_a_missing_one(tmp_path, tae_files, tiny_root,
                                                                          monkeypatch):
    from pipeline.check_config import check_config

    monkeypatch.chdir(tmp_path)
    good = write_config(tmp_path / "good.json", use_tae=True, tae_path=str(tae_files[1]), need_scaled=True)
    report = check_config(good)
    assert not report.problems, report.text()
    text = report.text()
    assert f"path tae_path: {tae_files[1]} -> {tae_files[1]} [absolute]" in text  # (not below the cwd)
    assert "tae    " in text and "TAEHV tiny VAE, Wan2.1 latents (128 tensors, float16" in text
    assert text.count(f"tae    {tae_files[1]} [") == 2  # the T2V and the I2V model folder
    assert "need_scaled: the latents un-normalized first" in text
    assert "vae    not used: use_tae decodes with the tiny VAE" in text  # the T2V folder
    assert "vae    vae/ [AutoencoderKLWan]" in text  # the I2V folder: the image encode keeps the VAE
    missing = write_config(tmp_path / "missing.json", use_tae=True, tae_path="gone/taew2_1.pth")
    report = check_config(missing)
    assert any("config key 'tae_path': tiny VAE file not found" in p and "gone/taew2_1.pth" in p
               for p in report.problems), report.text()
    unfound = write_config(tmp_path / "unfound.json", use_tae=True)
    assert any("config key 'use_tae': no tae_path and no taew2_1.pth" in p for p in check_config(unfound).problems)


# ------------------------------------------------------------------------------------------- plan + run
def _plan(config_path: Path):
    from pipeline.config import load_config
    from pipeline.manifest import Job
    from pipeline.plan import Planner

    job = Job(row=0, job_id="a", prompt="a red circle moving left", negative_prompt=None, image=None, seed=1)
    plan = Planner(load_config(config_path)).plan(job)
    assert plan.error is None, plan.error
    return plan


def test_the_decode_key_follows_the_tae_file_and_need_scaled(tmp_path, tae_files, sd):
    torch.save(published_state_dict(seed=5), tmp_path / "other.pth")
    plans = {name: _plan(write_config(tmp_path / f"{name}.json", **kw)).stages() for name, kw in {
        "vae": {}, "tae": {"use_tae": True, "tae_path": str(tae_files[0])},
        "scaled": {"use_tae": True, "tae_path": str(tae_files[0]), "need_scaled": True},
        "other": {"use_tae": True, "tae_path": str(tmp_path / "other.pth")}}.items()}
    keys = {name: {s: spec.key for s, spec in p.items()} for name, p in plans.items()}
    assert len({k["decode"] for k in keys.values()}) == 4
    assert len({k["denoise-low"] for k in keys.values()}) == 1  # only the decode changes
    decode = plans["tae"]["decode"]
    assert decode.params["decoder"] == "tae" and decode.params["need_scaled"] is False
    assert decode.model["component"] == "tae" and decode.model["tae"] == str(tae_files[0])


SMALL = {"target_video_length": 9, "target_height": 64, "target_width": 64, "text_len": 64}


def test_a_tiny_model_run_decodes_with_the_tae(tmp_path, tae_files, tiny_root):
    from pipeline.stages.decode import read_video

    manifest = write_manifest(tmp_path / "jobs.parquet", [{"job_id": "a", "prompt": "a red circle moving left",
                                                           "seed": 1}])
    store = tmp_path / "store"
    assert run_batch(manifest, tmp_path, write_config(tmp_path / "vae.json", **SMALL), output_dir=tmp_path / "o1",
                     store=store)
    tae = write_config(tmp_path / "tae.json", **SMALL, use_tae=True, tae_path=str(tae_files[0]))
    assert run_batch(manifest, tmp_path, tae, output_dir=tmp_path / "o2", store=store)
    r1, r2 = read_results(tmp_path / "o1")["a"], read_results(tmp_path / "o2")["a"]
    assert set(r2["cached_stages"]) == {"text", "text-negative", "denoise-high", "denoise-low"}, r2
    a, b = read_video(Path(r1["video"])), read_video(Path(r2["video"]))
    assert a.shape == b.shape == (9, 64, 64, 3)
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 10  # random TAE weights: not the VAE's frames
    sidecars = [json.loads(p.read_text()) for p in (store / "decode").glob("*/*.json")]
    assert sorted(str(c["params"].get("decoder")) for c in sidecars) == ["None", "tae"]  # one per decoder
    assert all((c["frames"], c["height"], c["width"]) == (9, 64, 64) for c in sidecars)


def test_diagnose_health_checks_the_tae_file(tmp_path, tae_files, sd, tiny_root):
    from pipeline.config import load_config
    from pipeline.diagnose import check_health

    lines = check_health(load_config(write_config(tmp_path / "ok.json", use_tae=True, tae_path=str(tae_files[0]))))
    assert any(ln.level == "ok" and ln.text.startswith("t2v tae: 1 file(s)") and "TAEHV tiny VAE" in ln.text
               for ln in lines), [ln.text for ln in lines]
    torch.save({k: v for k, v in sd.items() if k != "decoder.22.bias"}, tmp_path / "broken.pth")
    lines = check_health(load_config(write_config(tmp_path / "bad.json", use_tae=True,
                                                  tae_path=str(tmp_path / "broken.pth"))))
    assert any(ln.level == "fail" and ln.text.startswith("t2v tae:") and "decoder.22.bias" in ln.text
               for ln in lines), [ln.text for ln in lines]
