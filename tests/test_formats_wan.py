"""Wan's original layout (models_t5_umt5-xxl-enc-bf16.pth, Wan2.1_VAE.pth, high_noise_model/ + low_noise_model/
shards): the key mappings against reference implementations and diffusers' own converters, the loaded modules
against the diffusers layout, and the staged pipeline's video from both layouts (bit for bit)."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from _formats import CFG_RUN, baselines, first_frame, staged_run, wan_i2v, wan_t2v  # noqa: F401
from conftest import read_results, run_batch, write_manifest
from pipeline.config import parse_config
from pipeline.errors import CheckpointError
from pipeline.models import loader as ld
from pipeline.testing import standins
from pipeline.models import wan_layout as wl


# ------------------------------------------------------------------ a reference of Wan's T5 encoder (wan/modules/t5.py)
class RefT5:
    """Wan's T5Encoder forward written from its definition, reading Wan's key names directly: pre-norm
    blocks, un-scaled attention with a per-block relative position bias, gated-tanh-GELU FFN (fc1 * gelu(gate))."""

    def __init__(self, sd, num_heads, num_buckets, max_dist, eps=1e-6):
        self.sd, self.h, self.nb, self.max_dist, self.eps = sd, num_heads, num_buckets, max_dist, eps
        self.layers = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})

    def norm(self, x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    def bucket(self, rel):
        half = self.nb // 2
        out = (rel > 0).long() * half
        rel = rel.abs()
        exact = half // 2
        large = exact + (torch.log(rel.float() / exact) / math.log(self.max_dist / exact) * (half - exact)).long()
        large = torch.minimum(large, torch.full_like(large, half - 1))
        return out + torch.where(rel < exact, rel, large)

    def __call__(self, ids, mask):
        sd = self.sd
        x = sd["token_embedding.weight"][ids]
        n = ids.shape[1]
        rel = torch.arange(n)[None, :] - torch.arange(n)[:, None]
        for i in range(self.layers):
            p = f"blocks.{i}."
            bias = sd[p + "pos_embedding.embedding.weight"][self.bucket(rel)].permute(2, 0, 1)[None]
            y = self.norm(x, sd[p + "norm1.weight"])
            b, c = y.shape[0], sd[p + "attn.q.weight"].shape[0] // self.h
            q, k, v = (F.linear(y, sd[p + f"attn.{t}.weight"]).view(b, n, self.h, c) for t in "qkv")
            att = torch.einsum("binc,bjnc->bnij", q, k) + bias
            att = att.masked_fill(mask.view(b, 1, 1, n) == 0, torch.finfo(x.dtype).min)
            y = torch.einsum("bnij,bjnc->binc", att.softmax(-1), v).reshape(b, n, -1)
            x = x + F.linear(y, sd[p + "attn.o.weight"])
            y = self.norm(x, sd[p + "norm2.weight"])
            g = F.linear(y, sd[p + "ffn.gate.0.weight"])
            g = 0.5 * g * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (g + 0.044715 * g.pow(3))))
            x = x + F.linear(F.linear(y, sd[p + "ffn.fc1.weight"]) * g, sd[p + "ffn.fc2.weight"])
        return self.norm(x, sd["norm.weight"])


def test_t5_mapping_matches_a_reference_of_wans_t5(wan_t2v):
    sd = torch.load(wan_t2v / wl.T5_FILE, weights_only=True)
    arch = json.loads((wan_t2v / (wl.T5_FILE + ".config.json")).read_text())
    _, encoder = wl.load_t5(wan_t2v, torch.float32)
    ref = RefT5(sd, arch["num_heads"], arch["relative_attention_num_buckets"],
                arch["relative_attention_max_distance"], arch["layer_norm_epsilon"])
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, arch["vocab_size"], (2, 70), generator=g)  # 70 tokens: log-spaced buckets too
    mask = torch.ones(2, 70, dtype=torch.long)
    mask[1, 40:] = 0
    with torch.no_grad():
        ours = encoder(ids, mask).last_hidden_state
    expected = ref(ids, mask)
    assert ours.shape == expected.shape
    torch.testing.assert_close(ours[0], expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours[1, :40], expected[1, :40], atol=1e-5, rtol=1e-5)


def test_t5_key_map_covers_full_size_umt5_xxl():
    from accelerate import init_empty_weights
    from transformers import UMT5Config, UMT5EncoderModel

    with init_empty_weights():
        model = UMT5EncoderModel(UMT5Config(**wl.UMT5_XXL))
    keys = [k for k in model.state_dict() if k != "encoder.embed_tokens.weight"]
    wan = [wl.T5_MAP.backward(k) for k in keys]
    assert None not in wan and len(set(wan)) == len(keys) == 24 * 10 + 2
    assert "blocks.23.ffn.gate.0.weight" in wan and "blocks.5.pos_embedding.embedding.weight" in wan
    assert [wl.T5_MAP.forward(k) for k in wan] == keys


def test_vae_key_map_agrees_with_diffusers_converter_on_the_full_size_vae():
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLWan
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    with init_empty_weights():
        vae = AutoencoderKLWan()  # Wan2.1's VAE
    keys = list(vae.state_dict())
    wan_keys = [wl.vae_key_to_wan(k, vae.config.num_res_blocks) for k in keys]
    assert "decoder.upsamples.4.shortcut.weight" in wan_keys and "encoder.downsamples.2.resample.1.weight" in wan_keys
    converted = convert_wan_vae_to_diffusers({w: w for w in wan_keys})
    assert {converted_key: src for converted_key, src in converted.items()} == dict(zip(keys, wan_keys))


def test_dit_key_map_round_trips_through_diffusers_converter_full_size():
    from pipeline.models.dit import empty_model, expected_shapes

    cfg = wl.dit_config_from_wan({"dim": 5120, "num_heads": 40, "in_dim": 36, "out_dim": 16, "ffn_dim": 13824,
                                  "freq_dim": 256, "num_layers": 40, "eps": 1e-6, "model_type": "i2v"},
                                 "wan2.1", "config.json")
    keys = list(expected_shapes(empty_model(cfg)))
    wan = [wl.dit_key_to_wan(k) for k in keys]
    assert "img_emb.proj.1.weight" in wan and "blocks.39.cross_attn.k_img.weight" in wan
    assert "blocks.0.norm3.weight" in wan and "head.modulation" in wan
    mapping = wl.dit_key_map(wan)
    assert [mapping[w] for w in wan] == keys
    # LightX2V / ComfyUI prefixes map the same way
    assert wl.dit_key_map(["model.diffusion_model." + wan[5]])["model.diffusion_model." + wan[5]] == keys[5]


def test_wan22_config_is_never_taken_for_wan21():
    wan_cfg = {"dim": 5120, "num_heads": 40, "in_dim": 36, "out_dim": 16, "ffn_dim": 13824, "freq_dim": 256,
               "num_layers": 40, "eps": 1e-6, "model_type": "i2v"}
    assert wl.dit_config_from_wan(wan_cfg, "wan2.2", "c")["image_dim"] is None  # same config.json, no CLIP
    assert wl.dit_config_from_wan(wan_cfg, "wan2.1", "c")["image_dim"] == 1280
    with pytest.raises(CheckpointError, match="lacks num_heads"):
        wl.dit_config_from_wan({k: v for k, v in wan_cfg.items() if k != "num_heads"}, "wan2.2", "cfg.json")


def _ref(folder, **cfg):
    return ld.resolve_model(parse_config({"model_path": str(folder), **cfg}), "i2v" if "I2V" in folder.name else "t2v")


def test_wan_layout_loads_the_same_modules_as_the_diffusers_layout(tiny_root, wan_t2v):
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5EncoderModel

    ref = _ref(wan_t2v)
    assert (ref.format, ref.family, ref.experts, ref.boundary_ratio) == ("wan", "wan2.2", ("high", "low"), 0.875)
    cpu = torch.device("cpu")
    _, t5 = ld.load_component(ref, "text", cpu, torch.float32)
    pairs = [(t5, UMT5EncoderModel.from_pretrained(tiny_root / "t2v" / "text_encoder")),
             (ld.load_component(ref, "vae", cpu, torch.float32), AutoencoderKLWan.from_pretrained(tiny_root / "t2v" / "vae"))]
    for dtype in (torch.float32, torch.bfloat16):  # bf16: diffusers' fp32-kept modules stay fp32 here too
        for expert, sub in (("high", "transformer"), ("low", "transformer_2")):
            pairs.append((ld.load_component(ref, expert, cpu, dtype),
                          WanTransformer3DModel.from_pretrained(tiny_root / "t2v" / sub, torch_dtype=dtype)))
    for ours, theirs in pairs:
        a, b = ours.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_wan_layout_t2v_video_equals_diffusers_layout_bitwise(tmp_path, baselines, wan_t2v):
    base = baselines("t2v-cfg")
    cfg = tmp_path / "wan.json"
    cfg.write_text(json.dumps({**CFG_RUN, "model_path": str(wan_t2v)}))
    manifest = write_manifest(tmp_path / "jobs.parquet", [{"prompt": base["plan"].job.prompt, "seed": 7,
                                                           "job_id": "job"}])
    assert run_batch(manifest, tmp_path, config=cfg)  # through Luigi's RunManifest this time
    result = read_results(tmp_path / "outputs")["job"]
    assert result["status"] == "ok"
    assert (tmp_path / "outputs" / "job.mp4").read_bytes() == base["video"]


def test_wan_layout_i2v_video_equals_diffusers_layout_bitwise(tmp_path, baselines, wan_i2v, first_frame):
    base = baselines("i2v-cfg")
    ours = staged_run(tmp_path, {**CFG_RUN, "model_path": str(wan_i2v)}, first_frame)
    assert torch.equal(ours["image"]["cond"], base["image"]["cond"])
    assert torch.equal(ours["latents"], base["latents"])
    assert ours["video"] == base["video"]


# ---------------------------------------------------------------------------------------------- bad files
def test_missing_shard_and_wrong_shapes_are_named(tmp_path, wan_t2v):
    broken = tmp_path / "broken"
    shutil.copytree(wan_t2v, broken)
    next((broken / "low_noise_model").glob("*-00002-of-00002.safetensors")).unlink()
    with pytest.raises(CheckpointError, match=r"names shard\(s\) that are missing: diffusion_pytorch_model-00002"):
        ld.load_component(_ref(broken), "low", torch.device("cpu"), torch.float32)
    # a high-noise shard with one tensor of the wrong shape
    shard = next((broken / "high_noise_model").glob("*-00001-of-00002.safetensors"))
    from safetensors.torch import load_file, save_file

    sd = load_file(shard)
    key = next(k for k in sd if k.endswith("self_attn.q.weight"))
    sd[key] = torch.zeros(sd[key].shape[0] + 1, sd[key].shape[1])
    save_file(sd, shard)
    with pytest.raises(CheckpointError, match=rf"shape mismatch.*{key.replace('.', '[.]')}"):
        ld.load_component(_ref(broken), "high", torch.device("cpu"), torch.float32)


def test_wan21_checkpoint_in_a_wan22_model_says_so(tmp_path, tiny_root, wan_i2v):
    """An image-embedder checkpoint (Wan2.1's img_emb.*) given as a Wan2.2 expert is refused with a hint."""
    sd = standins.wan_dit_state(tiny_root / "i2v" / "transformer")
    sd.update({"img_emb.proj.0.weight": torch.ones(8), "img_emb.proj.1.weight": torch.zeros(8, 8)})
    from safetensors.torch import save_file

    save_file(sd, tmp_path / "wan21.safetensors")
    ref = _ref(wan_i2v, high_noise_original_ckpt=str(tmp_path / "wan21.safetensors"))
    with pytest.raises(CheckpointError, match="Wan2.1's CLIP image embedder"):
        ld.load_component(ref, "high", torch.device("cpu"), torch.float32)


def test_pth_that_is_not_a_plain_state_dict_is_refused(tmp_path, wan_t2v):
    broken = tmp_path / "m"
    shutil.copytree(wan_t2v, broken)
    torch.save({"weights": {"a": torch.zeros(1)}, "note": {1, 2}}, broken / wl.VAE_FILE)  # not weights-only
    with pytest.raises(CheckpointError, match=r"Wan2.1_VAE.pth"):
        ld.load_component(_ref(broken), "vae", torch.device("cpu"), torch.float32)


def test_row_task_must_fit_the_model(wan_t2v):
    with pytest.raises(CheckpointError, match="text-to-video model: set i2v_model_path"):
        ld.resolve_model(parse_config({"model_path": str(wan_t2v)}), "i2v")


def test_fingerprints_follow_files_not_folders(tmp_path, wan_t2v):
    copy = tmp_path / "copy"
    shutil.copytree(wan_t2v, copy)
    a, b = _ref(wan_t2v), _ref(copy)
    for comp in ("text", "vae", "high", "low"):  # tiny files are identified by content: a copy is the same model
        assert ld.fingerprint(a, comp) == ld.fingerprint(b, comp)
    assert ld.fingerprint(a, "high") != ld.fingerprint(a, "low")
