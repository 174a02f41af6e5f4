"""Files in the forms the real tools write them, not only our own writers'.

LoRAs as LightX2V's extractor, Lightning, musubi-tuner (kohya) and diffusers (alpha only in the header's
`lora_adapter_metadata`) write them, each merged and compared with a reference merge written here from the
file's tensors with plain torch (W + strength * alpha / rank * up @ down; diff * strength [* config alpha]);
Wan2.1 image-conditioning entries on a model without them are skipped with a warning, a LoRA that fits little
is still refused; safetensors headers that lie are named when the file is checked (check-config and run alike).
GGUF as city96's convert.py + patched llama-quantize + fix_5d_tensors.py write it (Q4_K_M = Q4_K + Q6_K + F16
fallback, BF16/F32 plain tensors, a 5-D patch embedding, no orig_shape), against a dequantization written here.
"""
from __future__ import annotations

import json
import logging
import struct

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pipeline.errors import CheckpointError
from pipeline.models import wan_layout as wl
from pipeline.models.checkpoint import TensorFiles
from pipeline.models.dit import DitWeights, build_dit, empty_model, expected_shapes
from pipeline.models.lora import LoraSpec, apply_loras, check_lora
from pipeline.testing import standins


@pytest.fixture(scope="module")
def src(tiny_root):
    return tiny_root / "t2v" / "transformer"


def _model(src):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel.from_pretrained(src).eval()


def reference_merge(src, path, strength: float, config_alpha: float | None = None):
    """The weights a LoRA file should give, from its tensors and header alone (the reference tools' rule)."""
    sd = {k: v.float() for k, v in _model(src).state_dict().items()}
    by_wan = {wl.dit_key_to_wan(k): k for k in sd}
    by_kohya = {wl.dit_key_to_wan(k)[: -len(".weight")].replace(".", "_"): k for k in sd if k.endswith(".weight")}
    lora = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    meta_alpha = None
    if "lora_adapter_metadata" in meta:
        meta_alpha = json.loads(meta["lora_adapter_metadata"])["transformer.lora_alpha"]
    applied = 0
    for key, t in lora.items():
        for up_sfx, down_sfx in ((".lora_up.weight", ".lora_down.weight"), (".lora_B.weight", ".lora_A.weight")):
            if key.endswith(up_sfx):
                base = key[: -len(up_sfx)]
                if base.startswith("lora_unet_"):
                    target = by_kohya.get(base[len("lora_unet_"):])
                elif base.startswith("transformer."):
                    target = base[len("transformer."):] + ".weight"
                else:
                    target = by_wan.get(base[len("diffusion_model."):] + ".weight")
                if target not in sd:
                    break
                down = lora[base + down_sfx].float()
                alpha = float(lora[base + ".alpha"]) if base + ".alpha" in lora else meta_alpha or config_alpha
                scale = alpha / down.shape[0] if alpha is not None else 1.0
                sd[target] = sd[target] + strength * scale * (t.float() @ down)
                applied += 1
        for sfx, param in ((".diff_b", "bias"), (".diff_m", "modulation"), (".diff", "weight")):
            if key.endswith(sfx):
                base = key[len("diffusion_model."): -len(sfx)]
                target = by_wan.get(f"{base}.{param}")
                if target in sd:
                    sd[target] = sd[target] + t.float().reshape(sd[target].shape) * strength * (config_alpha or 1.0)
                    applied += 1
                break
    return sd, applied


def _assert_weights(model, expected, what):
    got = model.state_dict()
    for k, v in expected.items():
        torch.testing.assert_close(got[k].float(), v, atol=2e-6, rtol=1e-6, msg=lambda m, k=k: f"{what} {k}: {m}")


@pytest.mark.parametrize("form", standins.TOOL_LORA_FORMS)
def test_tool_lora_forms_merge_to_the_reference(tmp_path, src, form):
    path = tmp_path / f"{form}.safetensors"
    standins.write_tool_lora(src, path, form, rank=4, seed=3, alpha=8.0, pair_min_params=10_000)
    expected, n = reference_merge(src, path, 0.7)
    model = _model(src)
    assert apply_loras(model, [LoraSpec(str(path), 0.7)], "high") == n > 0
    _assert_weights(model, expected, form)
    base = _model(src).state_dict()
    changed = [k for k in expected if not torch.equal(base[k].float(), expected[k])]
    assert changed, "the LoRA must change the weights"
    if form == "lightx2v-extractor":  # every tensor of the model is changed: pairs, .diff, .diff_b, .diff_m
        keys = load_file(str(path))
        assert any(k.endswith(".diff_m") for k in keys) and any(k.endswith(".lora_up.weight") for k in keys)
        assert set(changed) == set(expected)


def test_diffusers_metadata_alpha_is_applied(tmp_path, src):
    """alpha 8, rank 4 only in lora_adapter_metadata: scale 2, not 1."""
    path = tmp_path / "d.safetensors"
    standins.write_tool_lora(src, path, "diffusers", rank=4, seed=4, alpha=8.0)
    meta = json.loads(safe_open(str(path), "pt").metadata()["lora_adapter_metadata"])
    assert meta["transformer.lora_alpha"] == 8.0 and not any(k.endswith(".alpha") for k in load_file(str(path)))
    model = _model(src)
    apply_loras(model, [LoraSpec(str(path), 1.0)], "high")
    plain = _model(src).state_dict()
    key = "blocks.0.attn1.to_q.weight"
    lora = load_file(str(path))
    up, down = lora[f"transformer.{key[:-7]}.lora_B.weight"], lora[f"transformer.{key[:-7]}.lora_A.weight"]
    torch.testing.assert_close(model.state_dict()[key], plain[key] + 2.0 * (up @ down), atol=1e-6, rtol=1e-6)


def test_diffusers_metadata_alpha_pattern_and_dora(tmp_path, src):
    path = tmp_path / "d.safetensors"
    standins.write_tool_lora(src, path, "diffusers", rank=4, seed=4, alpha=8.0)
    tensors = load_file(str(path))
    meta = json.loads(safe_open(str(path), "pt").metadata()["lora_adapter_metadata"])
    meta["transformer.alpha_pattern"] = {"attn1.to_q": 2.0}  # peft: a per-module alpha, by name suffix
    save_file(tensors, str(tmp_path / "p.safetensors"), {"lora_adapter_metadata": json.dumps(meta)})
    model, plain = _model(src), _model(src).state_dict()
    apply_loras(model, [LoraSpec(str(tmp_path / "p.safetensors"), 1.0)], "high")
    for key, scale in (("blocks.1.attn1.to_q.weight", 0.5), ("blocks.1.attn1.to_k.weight", 2.0)):
        up, down = tensors[f"transformer.{key[:-7]}.lora_B.weight"], tensors[f"transformer.{key[:-7]}.lora_A.weight"]
        torch.testing.assert_close(model.state_dict()[key], plain[key] + scale * (up @ down), atol=1e-6, rtol=1e-6)
    meta["transformer.use_dora"] = True
    save_file(tensors, str(tmp_path / "dora.safetensors"), {"lora_adapter_metadata": json.dumps(meta)})
    with pytest.raises(CheckpointError, match=r"dora\.safetensors is a DoRA adapter"):
        check_lora(tmp_path / "dora.safetensors", expected_shapes(_model(src)), "high")
    save_file(tensors, str(tmp_path / "junk.safetensors"), {"lora_adapter_metadata": "{not json"})
    with pytest.raises(CheckpointError, match=r"junk\.safetensors: header metadata lora_adapter_metadata is not JSON"):
        check_lora(tmp_path / "junk.safetensors", expected_shapes(_model(src)), "high")


def test_config_alpha_scales_diff_entries_as_lightx2v(tmp_path, src):
    """LightX2V's LoRALoader.apply_lora(alpha=a): pairs without a file alpha a / rank, `.diff*` entries diff * a."""
    path = tmp_path / "x.safetensors"
    standins.write_tool_lora(src, path, "lightx2v-extractor", rank=4, seed=5, pair_min_params=10_000)
    expected, _ = reference_merge(src, path, 0.5, config_alpha=3.0)
    model = _model(src)
    apply_loras(model, [LoraSpec(str(path), 0.5, alpha=3.0)], "high")
    _assert_weights(model, expected, "config alpha")
    no_alpha, _ = reference_merge(src, path, 0.5)
    assert not torch.equal(no_alpha["blocks.0.norm2.weight"], expected["blocks.0.norm2.weight"])


@pytest.mark.parametrize("form", standins.TOOL_LORA_FORMS)
def test_wan21_image_entries_on_a_model_without_them_are_skipped_with_a_warning(tmp_path, src, caplog, form):
    """LightX2V's Wan2.1 I2V LoRAs used on Wan2.2 carry k_img, v_img, norm_k_img and img_emb.*: at full size
    208 of 1303 entries. They are skipped, the rest applied, the warning says how many and of which family."""
    path = tmp_path / "wan21_i2v_lora.safetensors"
    standins.write_tool_lora(src, path, form, rank=4, seed=6, image_keys=True, pair_min_params=10_000)
    keys = [k for k in load_file(str(path)) if k.endswith((".lora_up.weight", ".lora_B.weight", ".diff", ".diff_b",
                                                            ".diff_m"))]  # one key per entry
    image = [k for k in keys if any(n in k for n in ("k_img", "v_img", "img_emb", "add_k_proj", "add_v_proj"))]
    assert len(image) / len(keys) > 0.1  # more than the 10% the coverage rule allows unmatched
    expected, n = reference_merge(src, path, 1.0)
    model = _model(src)
    with caplog.at_level(logging.WARNING, logger="pipeline.models.lora"):
        assert apply_loras(model, [LoraSpec(str(path), 1.0)], "high") == n == len(keys) - len(image)
    _assert_weights(model, expected, "image keys skipped")
    assert (f"{len(image)} of {len(keys)} entries are for Wan2.1 I2V's CLIP image conditioning" in caplog.text
            and "which the high expert does not have" in caplog.text)


def test_a_lora_that_fits_little_is_still_refused(tmp_path, src):
    path = tmp_path / "ok.safetensors"
    standins.write_tool_lora(src, path, "lightning", rank=4, seed=7)
    tensors = load_file(str(path))
    shapes = expected_shapes(_model(src))
    only_image = {  # all of it for parts the model lacks: nothing applies
        k.replace("cross_attn.k.", "cross_attn.k_img.").replace("cross_attn.v.", "cross_attn.v_img."): v
                  for k, v in tensors.items() if ".cross_attn.k." in k or ".cross_attn.v." in k}
    save_file(only_image, str(tmp_path / "img.safetensors"))
    with pytest.raises(CheckpointError, match=r"img\.safetensors matches only 0 of its 0 entries \(\d+ more are for "
                                              r"parts this model lacks\)"):
        check_lora(tmp_path / "img.safetensors", shapes, "high")
    other = {k.replace("blocks.", "blocks.9"): v.clone() for k, v in tensors.items()}  # another model's layers
    other.update({k: v for k, v in tensors.items()
                  if k.startswith(("diffusion_model.blocks.0.self_attn.q.", "diffusion_model.blocks.0.self_attn.k."))})
    save_file(other, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match=r"other\.safetensors matches only 2 of its \d+ entries .* "
                                              r"Unmatched: diffusion_model\.blocks\.9"):
        check_lora(tmp_path / "other.safetensors", shapes, "high")


def _lying(path, header: dict, data: bytes):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def test_safetensors_headers_that_lie_are_named_when_checked(tmp_path, src):
    """Issue 19 case 6: list-valued entries and offsets too small for the shape, at check time, naming the file."""
    shapes = expected_shapes(_model(src))
    key = "diffusion_model.blocks.0.self_attn.q"
    cases = {
        "list": ({f"{key}.lora_down.weight": ["F32", [4, 128], [0, 2048]]}, b"\0" * 2048,
                 r"list\.safetensors: header entry .* is a JSON list"),
        "short": ({f"{key}.lora_down.weight": {"dtype": "F32", "shape": [4, 128], "data_offsets": [0, 64]},
                   f"{key}.lora_up.weight": {"dtype": "F32", "shape": [128, 4], "data_offsets": [64, 2112]}},
                  b"\0" * 2112, (r"short\.safetensors: tensor .*lora_down\.weight' \(F32 \[4, 128\]\) needs "
                                 r"2048 bytes but its data_offsets span 64")),
        "array": ([1, 2, 3], b"", r"array\.safetensors: the safetensors header is a JSON list"),
        "overlap": ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                     "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, b"\0" * 24,
                    r"overlap\.safetensors: tensor 'b' starts at byte 8"),
        "meta": ({"__metadata__": ["x"], "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4,
                 r"meta\.safetensors: the header's __metadata__"),
        "shape": ({"a": {"dtype": "F32", "shape": "4", "data_offsets": [0, 16]}}, b"\0" * 16,
                  r"shape\.safetensors: tensor 'a' has shape '4'"),
    }
    for name, (header, data, msg) in cases.items():
        path = _lying(tmp_path / f"{name}.safetensors", header, data)
        with pytest.raises(CheckpointError, match=msg):
            check_lora(path, shapes, "high")
        with pytest.raises(CheckpointError, match=msg):  # the run's path: the same error, before any weight
            apply_loras(_model(src), [LoraSpec(str(path), 1.0)], "high")
        with pytest.raises(CheckpointError, match=msg):  # any safetensors file we open
            TensorFiles.open(path)


def test_check_config_names_the_lying_lora(tmp_path, tiny_root):
    from pipeline.check_config import check_config

    key = "diffusion_model.blocks.0.self_attn.q"
    bad = _lying(tmp_path / "bad_lora.safetensors",
                 {f"{key}.lora_down.weight": {"dtype": "F32", "shape": [4, 128], "data_offsets": [0, 64]},
                  f"{key}.lora_up.weight": ["F32", [128, 4], [64, 2112]]}, b"\0" * 2112)
    from pipeline.config import default_config_path

    cfg = json.loads(default_config_path().read_text())
    cfg["lora_configs"] = [{"name": "high_noise_model", "path": str(bad), "strength": 1.0}]
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg))
    report = check_config(path)
    assert any("bad_lora.safetensors" in p and "needs 2048 bytes but its data_offsets span 64" in p
               for p in report.problems), report.text()


# --------------------------------------------------------------------------------------------------- GGUF
def _reference_gguf_state(path) -> dict[str, torch.Tensor]:
    """Each tensor dequantized with the gguf package, in torch order (ggml lists dimensions innermost first)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        out[t.name] = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
                                       ).reshape(shape)
    return out


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    return standins.build_wide_dit(tmp_path_factory.mktemp("wide") / "transformer")


def test_city96_q4_k_m_expert_loads_as_its_tensors_dequantized(tmp_path, wide):
    import gguf

    state = standins.wan_dit_state(wide)
    assert all(v.dtype == torch.bfloat16 for v in state.values())
    path = tmp_path / "wan2.2_i2v_high_noise_14B_Q4_K_M.gguf"
    types = standins.write_gguf_city96(state, path, "Q4_K_M")
    reader = gguf.GGUFReader(str(path))
    stored = {t.name: t.tensor_type.name for t in reader.tensors}
    assert stored == types
    assert {"Q4_K", "Q6_K", "BF16", "F32"} <= set(stored.values())
    assert stored["blocks.0.self_attn.q.weight"] == "Q4_K" and stored["blocks.0.self_attn.v.weight"] == "Q6_K"
    assert stored["blocks.0.ffn.2.weight"] == "Q6_K" and stored["text_embedding.0.weight"] == "BF16"
    assert not [f for f in reader.fields if f.startswith("comfy.gguf.orig_shape")]
    patch = next(t for t in reader.tensors if t.name == "patch_embedding.weight")
    assert len(patch.shape) == 5 and patch.tensor_type.name == "F32"

    weights = DitWeights(path)
    assert weights.quant_scheme() == "gguf"
    assert weights.encodings()["gguf:Q4_K"] > 0 and weights.encodings()["gguf:Q6_K"] > 0
    cfg = {k: v for k, v in json.loads((wide / "config.json").read_text()).items() if not k.startswith("_")}
    ours = build_dit(cfg, weights, torch.float32)
    ref = empty_model(cfg)
    deq = _reference_gguf_state(path)
    mapping = wl.dit_key_map(list(deq))
    ref.load_state_dict({mapping[k]: v for k, v in deq.items()}, strict=True, assign=True)
    orig = empty_model(cfg)
    orig.load_state_dict({mapping[k]: v.float() for k, v in state.items()}, strict=True, assign=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 2, 4, 4, generator=g)
    c, t = torch.randn(1, 9, cfg["text_dim"], generator=g), torch.tensor([400.0])
    with torch.no_grad():
        a, b, o = (m.eval()(x, t, c, return_dict=False)[0] for m in (ours, ref, orig))
    assert float((a - b).abs().max()) < 1e-5
    err = float((a - o).abs().max()) / float(o.abs().max())
    assert 0 < err < 0.05  # Q4_K/Q6_K rounding of the bf16 weights (measured 0.012 of the max), nothing more


def test_diff_entries_on_quantized_layers_take_the_config_alpha_too(tmp_path, src):
    """An all-diff extractor LoRA (every tensor under the tool's 1M-value threshold, as at tiny size) on an fp8
    expert: the dense deltas of the quantized linears are scaled like the merged ones (diff * alpha * strength)."""
    from pipeline.models.dit import set_module
    from pipeline.models.quant import QuantizedLinear

    lora = tmp_path / "x.safetensors"
    standins.write_tool_lora(src, lora, "lightx2v-extractor", seed=8)
    assert not any(k.endswith(".lora_up.weight") for k in load_file(str(lora)))
    fp8 = tmp_path / "e.safetensors"
    standins.write_single_file(src, fp8, "fp8")
    cfg = {k: v for k, v in json.loads((src / "config.json").read_text()).items() if not k.startswith("_")}

    def run(alpha, dequantize: bool):
        model = build_dit(cfg, DitWeights(fp8), torch.float32)
        if dequantize:
            for name, mod in [(n, m) for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]:
                lin = torch.nn.Linear(mod.in_features, mod.out_features)
                lin.weight.data, lin.bias.data = mod.dequantized(), mod.bias.data.clone()
                set_module(model, name, lin)
        apply_loras(model, [LoraSpec(str(lora), 0.5, alpha=alpha)], "high")
        g = torch.Generator().manual_seed(0)
        x, c = torch.randn(1, 16, 2, 4, 4, generator=g), torch.randn(1, 9, cfg["text_dim"], generator=g)
        with torch.no_grad():
            return model(x, torch.tensor([400.0]), c, return_dict=False)[0]

    side, merged, plain = run(2.0, False), run(2.0, True), run(None, False)
    assert float((side - merged).abs().max()) < 1e-5
    assert float((side - plain).abs().max()) > 1e-3


def test_a_run_with_a_lying_lora_fails_its_rows_naming_the_lora(tmp_path, tiny_root):
    """Issue 19 case 6 at run time: the rows fail with the LoRA file's name and the reason (before: an
    AttributeError, or a safetensors error blaming the model folder), results.parquet is written."""
    from conftest import read_results, run_batch, write_config, write_manifest

    key = "diffusion_model.blocks.0.self_attn.q"
    bad = _lying(tmp_path / "lying_lora.safetensors",
                 {f"{key}.lora_down.weight": ["F32", [4, 128], [0, 2048]],
                  f"{key}.lora_up.weight": {"dtype": "F32", "shape": [128, 4], "data_offsets": [2048, 4096]}},
                 b"\0" * 4096)
    config = write_config(tmp_path / "c.json", target_video_length=5, target_height=32, target_width=32,
                          infer_steps=2, lora_configs=[{"name": "high_noise_model", "path": str(bad)}])
    manifest = write_manifest(tmp_path / "jobs.parquet", [{"job_id": "a", "prompt": "a dog", "seed": 1}])
    assert not run_batch(manifest, tmp_path, config=config)
    row = read_results(tmp_path / "outputs")["a"]
    assert row["status"] == "failed", row
    assert "lying_lora.safetensors" in row["error"] and "is a JSON list" in row["error"], row["error"]
