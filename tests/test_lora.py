"""Per-expert LoRA (lora_configs): the four key styles merge to the same weights, W' = W + strength *
(alpha/rank) * up @ down (+ .diff / .diff_b entries); strength 0 is no LoRA bit for bit; a LoRA that matches
fewer than 90% of its entries is refused naming them; quantized experts get the LoRA as a side branch; the
staged run with a LoRA equals a run from weights merged beforehand."""
from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import save_file

from _formats import DISTILL_RUN, max_diff, staged_run, wan_t2v  # noqa: F401
from pipeline.config import parse_config
from pipeline.errors import CheckpointError
from pipeline.models import loader as ld
from pipeline.testing import standins
from pipeline.models import wan_layout as wl
from pipeline.models.dit import DitWeights, build_dit
from pipeline.models.lora import LoraSpec, apply_loras
from pipeline.models.quant import QuantizedLinear


@pytest.fixture(scope="module")
def src(tiny_root):
    return tiny_root / "t2v" / "transformer"


def _model(src):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel.from_pretrained(src).eval()


def _manual_merge(src, lora: dict[str, torch.Tensor], strength: float, rank: int, alpha: float | None):
    """The expected weights, computed from the LightX2V-style file with plain torch."""
    sd = {k: v.float() for k, v in standins._state(src).items()}  # the model holds the bf16 file's values in fp32
    to_wan = {wl.dit_key_to_wan(k): k for k in sd}
    scale = (alpha / rank if alpha is not None else 1.0) * strength
    for key, down in lora.items():
        if key.endswith(".lora_down.weight"):
            base = key[len("diffusion_model."): -len(".lora_down.weight")]
            target = to_wan[base + ".weight"]
            up = lora[key.replace("lora_down", "lora_up")]
            sd[target] = sd[target] + (up @ down) * scale
        elif key.endswith(".diff") or key.endswith(".diff_b"):
            base, _, kind = key[len("diffusion_model."):].rpartition(".")
            target = to_wan[base + (".weight" if kind == "diff" else ".bias")]
            sd[target] = sd[target] + down * strength
    return sd


def test_all_key_styles_merge_to_the_same_weights(tmp_path, src):
    lora = standins.write_lora(src, tmp_path / "lightx2v.safetensors", "lightx2v", rank=4, seed=5, alpha=8.0)
    expected = _manual_merge(src, lora, 0.7, 4, 8.0)
    for style in standins.LORA_STYLES:
        path = tmp_path / f"{style}.safetensors"
        if style != "lightx2v":
            standins.write_lora(src, path, style, rank=4, seed=5, alpha=8.0)
        model = _model(src)
        entries = sum(k.endswith((".lora_down.weight", ".diff", ".diff_b")) for k in lora)
        assert apply_loras(model, [LoraSpec(str(path), 0.7)], "high") == entries
        got = model.state_dict()
        for k, v in expected.items():
            torch.testing.assert_close(got[k], v, atol=1e-6, rtol=1e-6, msg=lambda m: f"{style} {k}: {m}")


def test_strength_zero_is_exactly_no_lora(tmp_path, src, wan_t2v):
    standins.write_lora(src, tmp_path / "l.safetensors", seed=1)
    plain = _model(src)
    zero = _model(src)
    assert apply_loras(zero, [LoraSpec(str(tmp_path / "l.safetensors"), 0.0)], "high") == 0
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), zero.state_dict().values()))
    lora = [{"name": "high_noise_model", "path": str(tmp_path / "l.safetensors"), "strength": 0.0}]
    with_zero = ld.resolve_model(parse_config({"model_path": str(wan_t2v), "lora_configs": lora}), "t2v")
    without = ld.resolve_model(parse_config({"model_path": str(wan_t2v)}), "t2v")
    assert ld.fingerprint(with_zero, "high") == ld.fingerprint(without, "high")  # cached artifacts are shared
    one = ld.resolve_model(parse_config({"model_path": str(wan_t2v), "lora_configs": [{**lora[0], "strength": 1.0}]}),
                           "t2v")
    assert ld.fingerprint(one, "high") != ld.fingerprint(without, "high")
    assert ld.fingerprint(one, "low") == ld.fingerprint(without, "low")  # the other expert is untouched


def test_low_coverage_is_refused_naming_the_unmatched_entries(tmp_path, src):
    lora = standins.write_lora(src, tmp_path / "ok.safetensors", seed=2, diffs=False)
    pairs = len(lora) // 2
    bogus = {}
    for i in range(pairs):  # as many entries for layers this model does not have (e.g. another architecture)
        bogus[f"diffusion_model.blocks.{90 + i}.self_attn.q.lora_down.weight"] = torch.zeros(4, 8)
        bogus[f"diffusion_model.blocks.{90 + i}.self_attn.q.lora_up.weight"] = torch.zeros(8, 4)
    save_file({**lora, **bogus}, tmp_path / "half.safetensors")
    with pytest.raises(CheckpointError, match=r"matches only \d+ of its \d+ entries .* Unmatched: "
                                              r"diffusion_model\.blocks\.\d+\.self_attn\.q"):
        apply_loras(_model(src), [LoraSpec(str(tmp_path / "half.safetensors"))], "high")


def test_a_few_unmatched_entries_are_named_in_a_warning(tmp_path, src, caplog):
    lora = standins.write_lora(src, tmp_path / "ok.safetensors", seed=2, diffs=False)
    lora["diffusion_model.blocks.99.ffn.0.lora_down.weight"] = torch.zeros(4, 8)
    lora["diffusion_model.blocks.99.ffn.0.lora_up.weight"] = torch.zeros(8, 4)
    save_file(lora, tmp_path / "most.safetensors")  # all but one match: > 90%
    total = sum(k.endswith("lora_down.weight") for k in lora)
    with caplog.at_level(logging.WARNING, logger="pipeline.models.lora"):
        apply_loras(_model(src), [LoraSpec(str(tmp_path / "most.safetensors"))], "high")
    assert "diffusion_model.blocks.99.ffn.0" in caplog.text and f"1 of {total} entries" in caplog.text


def test_wrong_shapes_and_non_lora_files_are_refused(tmp_path, src):
    lora = standins.write_lora(src, tmp_path / "ok.safetensors", seed=2, diffs=False)
    key = next(k for k in lora if k.endswith("lora_up.weight"))
    lora[key] = torch.zeros(lora[key].shape[0] + 3, lora[key].shape[1])
    save_file(lora, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match="does not fit"):
        apply_loras(_model(src), [LoraSpec(str(tmp_path / "bad.safetensors"))], "high")
    save_file({"blocks.0.self_attn.q.weight": torch.zeros(2, 2)}, tmp_path / "dit.safetensors")
    with pytest.raises(CheckpointError, match="no LoRA entries"):
        apply_loras(_model(src), [LoraSpec(str(tmp_path / "dit.safetensors"))], "high")


def test_alpha_from_file_or_config(tmp_path, src):
    lora = standins.write_lora(src, tmp_path / "a.safetensors", rank=4, seed=3, alpha=2.0, diffs=False)
    plain = {k: v for k, v in lora.items() if not k.endswith(".alpha")}
    save_file(plain, tmp_path / "noalpha.safetensors")
    a, b, c = _model(src), _model(src), _model(src)
    apply_loras(a, [LoraSpec(str(tmp_path / "a.safetensors"))], "high")  # file alpha 2 / rank 4
    apply_loras(b, [LoraSpec(str(tmp_path / "noalpha.safetensors"), alpha=2.0)], "high")  # config alpha
    apply_loras(c, [LoraSpec(str(tmp_path / "noalpha.safetensors"), strength=0.5)], "high")  # no alpha: scale 1
    for x, y in ((a, b), (a, c)):
        assert all(torch.equal(p, q) for p, q in zip(x.state_dict().values(), y.state_dict().values()))


@pytest.mark.parametrize("fmt", ["fp8", "gguf"])
def test_quantized_experts_get_a_side_branch_equal_to_merging(tmp_path, src, fmt):
    standins.write_lora(src, tmp_path / "l.safetensors", seed=4, alpha=4.0)
    path = tmp_path / ("e.gguf" if fmt == "gguf" else "e.safetensors")
    if fmt == "gguf":
        standins.write_gguf_expert(src, path, "Q8_0")
    else:
        standins.write_single_file(src, path, "fp8")
    cfg = {k: v for k, v in json.loads((src / "config.json").read_text()).items() if not k.startswith("_")}
    side = build_dit(cfg, DitWeights(path), torch.float32)
    apply_loras(side, [LoraSpec(str(tmp_path / "l.safetensors"), 0.8)], "high")
    branches = [m for m in side.modules() if isinstance(m, QuantizedLinear) and m.lora_scales]
    assert branches and all(m.lora_down_0.shape[0] == 4 for m in branches)
    merged = build_dit(cfg, DitWeights(path), torch.float32)  # the same weights dequantized, then merged
    for name, mod in list(merged.named_modules()):
        if isinstance(mod, QuantizedLinear):
            lin = torch.nn.Linear(mod.in_features, mod.out_features)
            lin.weight.data, lin.bias.data = mod.dequantized(), mod.bias.data.clone()
            parent, _, child = name.rpartition(".")
            setattr(merged.get_submodule(parent), child, lin)
    apply_loras(merged, [LoraSpec(str(tmp_path / "l.safetensors"), 0.8)], "high")
    g = torch.Generator().manual_seed(0)
    x, c, t = torch.randn(1, 16, 2, 4, 4, generator=g), torch.randn(1, 9, cfg["text_dim"], generator=g), torch.tensor([400.0])
    with torch.no_grad():
        assert max_diff(side(x, t, c, return_dict=False)[0], merged(x, t, c, return_dict=False)[0]) < 1e-5


def test_lora_configs_must_name_the_expert(tmp_path, src, wan_t2v, caplog):
    standins.write_lora(src, tmp_path / "wan2.2_t2v_A14b_high_noise_lora.safetensors", seed=1)
    lora = {"path": str(tmp_path / "wan2.2_t2v_A14b_high_noise_lora.safetensors"), "strength": 1.0}
    with pytest.raises(CheckpointError, match=r"lora_configs\[0\] .* has no name"):
        ld.resolve_model(parse_config({"model_path": str(wan_t2v), "lora_configs": [lora]}), "t2v")
    with pytest.raises(CheckpointError, match="LoRA file not found"):
        ld.resolve_model(parse_config({"model_path": str(wan_t2v), "lora_configs": [
            {**lora, "name": "low_noise_model", "path": str(tmp_path / "missing.safetensors")}]}), "t2v")
    with caplog.at_level(logging.WARNING, logger="pipeline.models.lora"):  # a high-noise LoRA on the low expert
        apply_loras(_model(src), [LoraSpec(lora["path"])], "low")
    assert "looks made for the high-noise expert but is applied to the low-noise expert" in caplog.text


def test_staged_run_with_lora_equals_premerged_weights(tmp_path, tiny_root, wan_t2v):
    """wan_moe_t2v_distill_lora.json's shape: per-expert LoRAs on Wan's layout == a model whose weights were
    merged beforehand (plain torch) and saved in the diffusers layout."""
    loras, merged_root = [], tmp_path / "merged"
    shutil.copytree(tiny_root / "t2v", merged_root)
    for name, sub, seed in (("high_noise_model", "transformer", 11), ("low_noise_model", "transformer_2", 12)):
        path = tmp_path / f"{name}.safetensors"
        lora = standins.write_lora(tiny_root / "t2v" / sub, path, rank=4, seed=seed, alpha=4.0, scale=0.2)
        for old in (merged_root / sub).glob("*.safetensors*"):
            old.unlink()
        save_file(_manual_merge(tiny_root / "t2v" / sub, lora, 1.0, 4, 4.0),
                  merged_root / sub / "diffusion_pytorch_model.safetensors")
        loras.append({"name": name, "path": str(path), "strength": 1.0})
    a = staged_run(tmp_path / "lora", {**DISTILL_RUN, "model_path": str(wan_t2v), "lora_configs": loras})
    b = staged_run(tmp_path / "pre", {**DISTILL_RUN, "model_path": str(merged_root)})
    base = staged_run(tmp_path / "base", {**DISTILL_RUN, "model_path": str(wan_t2v)})
    assert torch.equal(a["latents"], b["latents"]) and a["video"] == b["video"]
    assert max_diff(a["latents"], base["latents"]) > 1e-3  # and the LoRA did change the video
