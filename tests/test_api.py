"""The Python API (pipeline/api.py) on the embedded model: a LightX2V example script ports by changing its
import and paths; its videos are the bytes RunManifest makes for the same rows; models load once across many
calls; a second identical call is a cache hit; switch_lora and back gives the bytes of never switching."""
from __future__ import annotations

import re

import pytest

from conftest import REPO, run_batch, write_config, write_manifest

CONFIG = dict(infer_steps=2, target_video_length=5, target_height=32, target_width=32, text_len=16)
ROWS = [{"job_id": "a", "prompt": "a red circle moving left on a blue background", "seed": 1},
        {"job_id": "b", "prompt": "a green square moving right on a black background", "seed": 2}]


@pytest.fixture
def pipe(tmp_path, tiny_root):
    from pipeline.api import LightX2VPipeline

    p = LightX2VPipeline(model_path="builtin:tiny", model_cls="wan2.2_moe", task="t2v", store=tmp_path / "store",
                         work_dir=tmp_path / "api")
    return p.create_generator(config_json=str(write_config(tmp_path / "c.json", **CONFIG)))


def test_a_lightx2v_example_ports_by_changing_its_import_and_paths(tmp_path, tiny_root, monkeypatch):
    script = (REPO / "tests/data/lightx2v_examples/wan_moe_t2v.py").read_text(encoding="utf-8")
    config = write_config(tmp_path / "wan_moe_t2v.json", **CONFIG)
    ported = script.replace("from lightx2v import LightX2VPipeline", "from pipeline.api import LightX2VPipeline")
    ported = re.sub(r'model_path="[^"]*"', 'model_path="builtin:tiny"', ported)
    ported = re.sub(r'config_json="[^"]*"', f'config_json="{config}"', ported)
    ported = re.sub(r'save_result_path = "[^"]*"', f'save_result_path = "{tmp_path / "out.mp4"}"', ported)
    assert ported.count("\n") == script.count("\n")  # the same script, line for line
    monkeypatch.chdir(tmp_path)
    exec(compile(ported, "wan_moe_t2v.py", "exec"), {"__name__": "__main__"})
    from pipeline.inspect import read_video

    frames = read_video(tmp_path / "out.mp4")
    assert frames.shape == (5, 32, 32, 3)


def test_api_videos_are_runmanifest_bytes_and_a_repeat_is_a_cache_hit(tmp_path, pipe):
    made = pipe.generate_batch(ROWS)
    assert [r.status for r in made] == ["ok", "ok"] and all(not r.cached_stages for r in made)
    ref = tmp_path / "ref"
    assert run_batch(write_manifest(ref / "m.parquet", ROWS), ref, config=pipe.config_path())
    for r in made:
        assert r.video.read_bytes() == (ref / "outputs" / f"{r.job_id}.mp4").read_bytes(), r.job_id
    one = pipe.generate(seed=1, prompt=ROWS[0]["prompt"], negative_prompt=None,
                        save_result_path=tmp_path / "one.mp4")
    assert one.video.read_bytes() == made[0].video.read_bytes()
    assert "decode" in one.cached_stages and "denoise-high" in one.cached_stages
    infos = pipe.inspect(one.decode_key)
    assert [i.name for i in infos][-1] == "decode" and all(i.status == "ok" for i in infos)


def test_models_load_once_across_generate_calls(tmp_path, pipe):
    from pipeline.runtime import MODELS

    MODELS.clear()
    for seed in (1, 2, 3):
        pipe.generate(seed=seed, prompt=f"a yellow triangle moving up, take {seed}",
                      save_result_path=tmp_path / f"{seed}.mp4")
    assert MODELS.loads and set(MODELS.loads.values()) == {1}, MODELS.loads
    assert {k[0] for k in MODELS.loads} >= {"text", "high", "low", "vae"}


def test_switch_lora_and_back_gives_the_bytes_of_never_switching(tmp_path, pipe, tiny_root):
    from pipeline.testing import standins

    lora = tmp_path / "high_lora.safetensors"
    standins.write_lora(tiny_root / "t2v" / "transformer", lora, rank=4, seed=3, alpha=4.0, scale=0.5)
    prompt = ROWS[0]["prompt"]
    plain = pipe.generate(seed=5, prompt=prompt, save_result_path=tmp_path / "plain.mp4").video.read_bytes()
    pipe.switch_lora(str(lora), 1.0)  # LightX2V's MoE runner: the positional LoRA goes to the high-noise expert
    assert [c["name"] for c in pipe.values["lora_configs"]] == ["high_noise_model"]
    patched = pipe.generate(seed=5, prompt=prompt, save_result_path=tmp_path / "lora.mp4").video.read_bytes()
    assert patched != plain
    pipe.switch_lora("")  # removed
    back = pipe.generate(seed=5, prompt=prompt, save_result_path=tmp_path / "back.mp4").video.read_bytes()
    assert back == plain


def test_arguments_for_other_model_families_are_refused(tmp_path, pipe):
    from pipeline.api import LightX2VPipeline
    from pipeline.errors import WanBatchError

    with pytest.raises(WanBatchError, match="audio_path"):
        pipe.generate(prompt="x", audio_path="a.wav", save_result_path=tmp_path / "x.mp4")
    with pytest.raises(WanBatchError, match="wan2.2_animate"):
        LightX2VPipeline(model_path="builtin:tiny", model_cls="wan2.2_animate", task="t2v")
    with pytest.raises(WanBatchError, match="sr_ratio"):
        pipe.generate(prompt="x", sr_ratio=4.0, save_result_path=tmp_path / "x.mp4")
    with pytest.raises(WanBatchError, match="skip_fp8_block_index"):
        pipe.enable_quantize(skip_fp8_block_index=[0, 43])
    with pytest.raises(WanBatchError, match="text_encoder_quant_scheme"):
        pipe.enable_quantize(text_encoder_quantized=True, text_encoder_quant_scheme="int8")
    with pytest.raises(WanBatchError, match="support_tasks"):
        LightX2VPipeline(model_path="builtin:tiny", task="t2v", support_tasks=["t2av"])
    with pytest.raises(WanBatchError, match="resize_mode"):
        LightX2VPipeline(model_path="builtin:tiny", task="t2v", work_dir=tmp_path).create_generator(resize_mode="adaptive")


def test_enable_quantize_gives_the_encoders_quant_scheme(tmp_path):
    """LightX2V's Wan branch of enable_quantize: t5_quant_scheme and clip_quant_scheme are quant_scheme."""
    from pipeline.api import LightX2VPipeline

    pipe = LightX2VPipeline(model_path="builtin:tiny", task="t2v")
    pipe.enable_quantize(text_encoder_quantized=True, image_encoder_quantized=True, quant_scheme="int8-q8f")
    v = pipe.values
    assert (v["t5_quantized"], v["t5_quant_scheme"], v["clip_quantized"], v["clip_quant_scheme"]) == \
        (True, "int8-q8f", True, "int8-q8f")


def test_lora_dynamic_apply_is_kept_as_its_config_key_not_dropped(tmp_path):
    """enable_lora(lora_dynamic_apply=...) lands in the config as LightX2V's key, a documented kernel choice,
    and a value of the wrong type is refused when the config is read."""
    from pipeline.api import LightX2VPipeline
    from pipeline.config_keys import KEYS, KERNEL
    from pipeline.errors import ConfigError

    pipe = LightX2VPipeline(model_path="builtin:tiny", task="t2v")
    pipe.enable_lora([], lora_dynamic_apply=True)
    assert pipe.values["lora_dynamic_apply"] is True and KEYS["lora_dynamic_apply"].kind == KERNEL
    assert pipe.config()["lora_dynamic_apply"] is True
    pipe.values["lora_dynamic_apply"] = "yes"
    with pytest.raises(ConfigError, match="lora_dynamic_apply"):
        pipe.config()
