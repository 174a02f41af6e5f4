"""LightX2V's published Wan configs, as a LightX2V user brings them (issue 17).

tests/data/lightx2v_configs/ holds copies of every Wan config in LightX2V's configs/ folder (its index.json
names the commit; model_cls and task come from the scripts/ that run each config). A LightX2V user runs
`lightx2v.infer --model_cls C --task T --model_path M --config_json X`: here C and T go into the config (LightX2V
merges its command line into the config the same way) and M is --model-path, pointed at a stand-in tree of
the right model. Each config must either pass check-config with every key implemented or a documented kernel
choice, or be refused naming a key or the model class; none may target the tiny model; and what check-config
accepts, a run must accept too (load_config + planning a row, which resolves every checkpoint and LoRA).
"""
from __future__ import annotations

import collections
import json
import re
import shutil
from pathlib import Path

import pytest

from pipeline.check_config import check_config
from pipeline.config import load_config
from pipeline.config_keys import IMPLEMENTED, KERNEL, KEYS, OURS, classify
from pipeline.errors import WanBatchError

DATA = Path(__file__).parent / "data" / "lightx2v_configs"
INDEX = json.loads((DATA / "index.json").read_text())["configs"]
NAMES = sorted(INDEX)


def lightx2v_args(name: str) -> tuple[str, str]:
    """(model_cls, task) a LightX2V user passes for this config: its script's, else read from its name."""
    entry = INDEX[name]
    base = Path(name).name
    task = entry["task"][0] if len(entry["task"]) == 1 else (
        "flf2v" if "flf2v" in base else "i2v" if "i2v" in base else "t2v")
    if len(entry["model_cls"]) == 1:
        return entry["model_cls"][0], task
    if "ti2v" in base:
        cls = "wan2.2"
    elif "moe" in base or name.startswith(("wan22/", "distill/wan22/")):
        cls = "wan2.2_moe_distill" if "distill" in base else "wan2.2_moe"
    else:
        cls = "wan2.1_distill" if "distill" in name else "wan2.1"
    return cls, task


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_root):
    from pipeline.testing.standins import write_standin_tree
    from pipeline.tiny import ensure_tiny_models

    root = write_standin_tree(tmp_path_factory.mktemp("lx") / "models")
    # a tiny Wan2.1 T2V (one DiT, no image encoder): the tiny T2V model with its high-noise expert only
    t2v = root / "Wan-AI" / "Wan2.1-T2V-Diffusers"
    shutil.copytree(ensure_tiny_models() / "t2v", t2v)
    shutil.rmtree(t2v / "transformer_2")
    idx = json.loads((t2v / "model_index.json").read_text())
    idx.update(transformer_2=[None, None], boundary_ratio=None)
    (t2v / "model_index.json").write_text(json.dumps(idx))
    return root


def quantized_copy(models: Path, cls: str, task: str, kind: str) -> Path:
    """The stand-in model with its DiT quantized in place (fp8 / int8), as LightX2V's quantized releases hold
    it: the folder a dit_quantized config with no *_quantized_ckpt points --model_path at."""
    from pipeline.testing.standins import write_single_file
    from pipeline.tiny import ensure_tiny_models

    base = model_for(models, cls, task)
    out = base.with_name(f"{base.name}-{kind}")
    if out.is_dir():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(base, tmp)
    tiny = ensure_tiny_models()
    task = "i2v" if task == "i2v" else "t2v"  # as model_for picks the base
    if cls.startswith("wan2.2_moe"):
        parts = {"high_noise_model": tiny / task / "transformer", "low_noise_model": tiny / task / "transformer_2"}
    elif task == "i2v":
        parts = {".": models / "Wan-AI" / "Wan2.1-I2V-14B-480P-Diffusers" / "transformer"}
    else:
        parts = {"transformer": tiny / "t2v" / "transformer"}
    for sub, src in parts.items():
        for f in [*(tmp / sub).glob("*.safetensors"), *(tmp / sub).glob("*.safetensors.index.json")]:
            f.unlink()
        write_single_file(src, tmp / sub / f"dit_{kind}.safetensors", kind)
    tmp.rename(out)
    return out


def with_quantized_encoders(base: Path, kinds: dict[str, str]) -> Path:
    """A copy of a stand-in model holding LightX2V's quantized T5 / CLIP files (written as its converter
    writes them) where LightX2V finds them for a config with t5_quantized / clip_quantized and no
    *_quantized_ckpt: here in the model folder's fp8/ or int8/."""
    from pipeline.models import wan_layout as wl
    from pipeline.testing.standins import write_clip, write_quantized_encoder, write_t5

    out = base.with_name(base.name + "".join(f"-{c}{k}" for c, k in sorted(kinds.items())))
    if out.is_dir():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(base, tmp)
    src = tmp / "wan-sources"  # a diffusers-layout model has no Wan .pth to convert: write it from its folders
    for comp, kind in kinds.items():
        name = wl.T5_FILE if comp == "t5" else wl.CLIP_FILE
        if comp == "clip" and not (tmp / name).is_file() and not (tmp / "image_encoder").is_dir():
            continue  # no image encoder: LightX2V loads none, so clip_quantized is not read
        original = tmp / name
        if not original.is_file():
            src.mkdir(exist_ok=True)
            original = src / name
            if comp == "t5":
                write_t5(tmp / "text_encoder", tmp / "tokenizer", src)
            else:
                write_clip(tmp / "image_encoder", src)
        target = (f"models_t5_umt5-xxl-enc-{kind}.pth" if comp == "t5"
                  else f"models_clip_open-clip-xlm-roberta-large-vit-huge-14-{kind}.pth")
        (tmp / kind).mkdir(exist_ok=True)
        write_quantized_encoder(original, tmp / kind / target, kind)
    shutil.rmtree(src, ignore_errors=True)
    tmp.rename(out)
    return out


def model_for(models: Path, cls: str, task: str, raw: dict | None = None) -> Path:
    """The stand-in --model-path for a config (a quantized one when it says dit_quantized and names no file;
    with quantized T5 / CLIP files when it says t5_quantized / clip_quantized and names none)."""
    raw = raw or {}
    base = _base_model(models, cls, task, raw)
    kinds = {comp: str(raw.get(f"{comp}_quant_scheme")).split("-")[0] for comp in ("t5", "clip")
             if raw.get(f"{comp}_quantized") is True and not raw.get(f"{comp}_quantized_ckpt")
             and str(raw.get(f"{comp}_quant_scheme")).startswith(("fp8", "int8"))}
    return with_quantized_encoders(base, kinds) if kinds else base


def _base_model(models: Path, cls: str, task: str, raw: dict) -> Path:
    scheme = str(raw.get("dit_quant_scheme") or "")
    if (raw.get("dit_quantized") and scheme.startswith(("fp8", "int8"))
            and not any(raw.get(k) for k in ("dit_quantized_ckpt", "high_noise_quantized_ckpt",
                                             "low_noise_quantized_ckpt"))):
        return quantized_copy(models, cls, task, scheme.split("-")[0])
    if cls.startswith("wan2.2_moe"):
        return models / "Wan-AI" / ("Wan2.2-I2V-A14B" if task == "i2v" else "Wan2.2-T2V-A14B")
    if task == "i2v":
        return models / "Wan-AI" / "Wan2.1-I2V-14B-480P"
    return models / "Wan-AI" / "Wan2.1-T2V-Diffusers"


def user_config(tmp_path: Path, name: str) -> tuple[Path, str, str]:
    raw = json.loads((DATA / "configs" / name).read_text())
    cls, task = lightx2v_args(name)
    raw.setdefault("model_cls", cls)
    raw.setdefault("task", task)
    path = tmp_path / Path(name).name
    path.write_text(json.dumps(raw))
    return path, cls, task


def outcome(report, raw: dict) -> tuple[str, str]:
    """('accepted', '') or ('refused', reason class) from a check-config report."""
    if not report.problems:
        return "accepted", ""
    first = report.problems[0]
    if "model class" in first:
        return "refused", "model class"
    if "model_cls" in first:
        return "refused", "model class (model_cls)"
    m = re.search(r"config key(?:\(s\))? '([^']+)'", first) or re.search(r"config key '([^']+)'", first)
    if m:
        return "refused", f"key {m.group(1)}"
    if "dit_quantized is true" in first:
        return "refused", "key dit_quantized (the weights there are not quantized)"
    m = re.search(r"\(from (\w+)\)", first)
    if m:
        return "refused", f"file not found ({m.group(1)})"
    named = [k for k in (*raw, "model_path") if re.search(rf"(^|: ){re.escape(k)}(\[\d+\])?: ", first)]
    if named:
        return "refused", f"file not found ({named[0]})" if "not found" in first or "must hold" in first \
            else f"key {named[0]}"
    return "refused", f"other: {first[:80]}"


@pytest.mark.parametrize("name", NAMES)
def test_published_config_is_accepted_fully_or_refused_naming_why(models, tmp_path, name, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths resolve against the working directory, as in LightX2V
    path, cls, task = user_config(tmp_path, name)
    raw = json.loads(path.read_text())
    report = check_config(path, str(model_for(models, cls, task, raw)))
    kind, why = outcome(report, raw)
    if kind == "accepted":
        # every key implemented or a documented kernel choice, and the model is the one passed, not tiny
        for key, value in raw.items():
            assert classify(key, value)[0] in (IMPLEMENTED, KERNEL, OURS, "comment"), (name, key)
        assert "tiny" not in " ".join(report.lines).lower(), report.text()
        # and a run reads it the same way: the config loads and a row plans (every checkpoint resolved)
        config = load_config(path, str(model_for(models, cls, task, raw)))
        from pipeline.models.loader import resolve_model

        ref = resolve_model(config, "i2v" if task == "i2v" else "t2v")
        assert Path(ref.path) == model_for(models, cls, task, raw)
    else:
        assert not why.startswith("other"), f"{name}: refusal names no key or class: {report.problems}"
        with pytest.raises(WanBatchError):  # a run refuses it too
            config = load_config(path, str(model_for(models, cls, task, raw)))
            from pipeline.models.loader import resolve_model

            resolve_model(config, "i2v" if task == "i2v" else "t2v")


def test_counts_by_reason(models, tmp_path, monkeypatch, capsys):
    """The tally the issue asks for (printed with -s); the classes we do not run are all refused."""
    monkeypatch.chdir(tmp_path)
    counts: collections.Counter = collections.Counter()
    for name in NAMES:
        path, cls, task = user_config(tmp_path, name)
        raw = json.loads(path.read_text())
        kind, why = outcome(check_config(path, str(model_for(models, cls, task, raw))), raw)
        counts[kind if kind == "accepted" else f"refused: {why}"] += 1
        if cls not in ("wan2.1", "wan2.1_distill", "wan2.2_moe", "wan2.2_moe_distill"):
            assert kind == "refused" and "model class" in why or why.startswith("key"), (name, cls, why)
    with capsys.disabled():
        print(f"\n{len(NAMES)} LightX2V Wan configs:")
        for k, n in counts.most_common():
            print(f"  {n:4d}  {k}")
    assert counts["accepted"] > 0 and sum(counts.values()) == len(NAMES)


def test_every_published_key_has_a_class():
    keys = {k for name in NAMES for k in json.loads((DATA / "configs" / name).read_text())}
    missing = sorted(k for k in keys if k not in KEYS and not k.startswith(("_", "comment")))
    assert not missing, missing
