"""`wan-batch diagnose`: is this machine, this config and these checkpoints able to run a batch, and if not,
where exactly does it break.

quick     environment: Python, torch, CUDA devices, ffmpeg, the installed versions of our dependencies, Luigi mode
health    every component of the configured model(s): files found, headers readable, keys and shapes equal to
          the architecture the config describes (read from the headers: no weights are loaded)
memory    free RAM/VRAM against what the config needs, and the first offload setting that fits
pipeline  one job through every stage of the configured model, in order, in this process; stops at the first
          stage that fails and names it (the stage-by-stage component test as a command)

Each check returns a list of Lines (level ok/warn/fail/info + text); a check fails when any line is 'fail'.
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import WanBatchError

GB = 2**30


@dataclass
class Line:
    level: str  # ok | warn | fail | info
    text: str

    def __str__(self) -> str:
        return f"  [{self.level:^4}] {self.text}"


def failed(lines: list[Line]) -> bool:
    return any(line.level == "fail" for line in lines)


# -- quick -----------------------------------------------------------------------------------------------------
def _requirements() -> list[str]:
    try:
        reqs = importlib.metadata.requires("wan-batch") or []
    except importlib.metadata.PackageNotFoundError:
        reqs = []
    names = [re.split(r"[<>=!~; \[]", r, maxsplit=1)[0] for r in reqs if "extra ==" not in r]
    return names or ["torch", "luigi", "diffusers", "transformers", "safetensors", "pyarrow"]


def check_quick() -> list[Line]:
    lines = [Line("info", f"python {platform.python_version()} on {platform.platform()}"),
             Line("info", f"torch {torch.__version__}")]
    if torch.cuda.is_available():
        lines.append(Line("ok", f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
                                f"{torch.cuda.device_count()} device(s)"))
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            free, total = torch.cuda.mem_get_info(i)
            lines.append(Line("info", f"cuda:{i} {p.name}, compute {p.major}.{p.minor}, "
                                      f"{free / GB:.1f} of {total / GB:.1f} GiB free, bf16 "
                                      f"{'yes' if torch.cuda.is_bf16_supported() else 'no'}"))
    else:
        lines.append(Line("warn", "CUDA is not available: stages run on the CPU (fine for the tiny model only)"))
    lines.append(_check_ffmpeg())
    missing = []
    versions = []
    for name in _requirements():
        try:
            versions.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    lines.append(Line("info", "packages: " + ", ".join(versions)))
    if missing:
        lines.append(Line("fail", f"missing packages: {', '.join(missing)} (pip install -e .)"))
    lines.append(_luigi_mode())
    home = os.environ.get("WAN_BATCH_HOME")
    lines.append(Line("info", f"WAN_BATCH_HOME={home}" if home else "WAN_BATCH_HOME not set (tiny model cache in "
                                                                     "~/.cache/wan-batch)"))
    return lines


def _check_ffmpeg() -> Line:
    from .stages.decode import ffmpeg_exe

    try:
        exe = ffmpeg_exe()
        out = subprocess.run([exe, "-hide_banner", "-encoders"], capture_output=True, text=True, timeout=60)
        version = subprocess.run([exe, "-version"], capture_output=True, text=True, timeout=60).stdout
    except Exception as e:  # no binary at all, or one that cannot run here
        return Line("fail", f"ffmpeg: not usable ({e}); install ffmpeg or imageio-ffmpeg")
    first = version.splitlines()[0].split(" Copyright")[0] if version else "unknown version"
    if "libx264" not in out.stdout:
        return Line("fail", f"ffmpeg {exe} ({first}) has no libx264 encoder (needed for H.264 MP4s)")
    return Line("ok", f"ffmpeg {exe} ({first}), libx264 available")


def _luigi_mode() -> Line:
    import luigi.configuration

    cfg = luigi.configuration.get_config()
    try:
        local = cfg.getboolean("core", "local_scheduler", False)
    except Exception:
        local = False
    if local:
        return Line("info", "luigi: local scheduler (no luigid); retcodes set for non-zero exits on failure")
    host = cfg.get("core", "scheduler_host", "localhost") if cfg.has_option("core", "scheduler_host") \
        else cfg.get("core", "default_scheduler_host", "localhost")
    return Line("info", f"luigi: central scheduler luigid at {host}")


# -- health ----------------------------------------------------------------------------------------------------
def _tasks_of(config) -> list[str]:
    from .config import BUILTIN_TINY

    tasks = [config.get("task", "t2v")]
    if config.get("i2v_model_path") or config.get("model_path") == BUILTIN_TINY:
        tasks.append("i2v")
    return list(dict.fromkeys(tasks))


def _components(ref) -> list[str]:
    return ["text", "vae", *ref.experts] + (["clip"] if getattr(ref, "image_encoder", False) else [])


def _dit_check(ref, expert: str) -> tuple[int, list[str], str]:
    from .models.dit import DitWeights, empty_model, expected_shapes
    from .models.loader import dit_config

    weights = DitWeights(ref.dits[expert]["weights"])
    try:
        problems = weights.check(expected_shapes(empty_model(dit_config(ref, expert))))
        encodings = ", ".join(f"{n} {k}" for k, n in sorted(weights.encodings().items()))
        return len(weights.entries), [f"{weights.path}: {p}" for p in problems], encodings
    finally:
        weights.close()


def check_health(config) -> list[Line]:
    """Each component's files against its architecture (models.verify, the checker check-config uses)."""
    from .models.loader import component_files, resolve_model
    from .models.verify import check_component

    lines: list[Line] = []
    for task in _tasks_of(config):
        try:
            ref = resolve_model(config, task)
        except WanBatchError as e:
            lines.append(Line("fail", f"{task}: {e}"))
            continue
        lines.append(Line("info", f"{task}: {ref.format} layout at {ref.path} ({getattr(ref, 'family', '?')}, "
                                  f"experts: {', '.join(ref.experts)})"))
        for comp in _components(ref) + (["tae"] if ref.tae else []):  # use_tae: the tiny VAE file too
            try:
                files = component_files(ref, comp)
                size = sum(f.stat().st_size for f in files)
                if comp in ref.experts:
                    n, problems, enc = _dit_check(ref, comp)
                    what = f"{n} tensors ({enc})"
                elif comp == "tae":
                    from .models.tae import check_tae

                    problems, what = [], check_tae(files[0])
                else:  # raises CheckpointError naming the file and keys on a mismatch: reported below
                    n = check_component(Path(ref.path), ref.format, comp, ref.encoders.get(comp)).tensors
                    problems = []
                    what = f"{n} tensors"
            except WanBatchError as e:
                lines.append(Line("fail", f"{task} {comp}: {e}"))
                continue
            except Exception as e:  # a file that exists but cannot be parsed at all
                lines.append(Line("fail", f"{task} {comp}: cannot be opened: {type(e).__name__}: {e}"))
                continue
            if problems:
                for p in problems:
                    lines.append(Line("fail", f"{task} {comp}: keys do not match the architecture: {p}"))
            else:
                lines.append(Line("ok", f"{task} {comp}: {len(files)} file(s), {size / 2**20:.1f} MiB, {what}, "
                                        f"keys and shapes match the architecture"))
    return lines


# -- memory ----------------------------------------------------------------------------------------------------
def available_ram() -> tuple[int, int]:
    """(available, total) bytes of RAM."""
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        return int(info["MemAvailable"].split()[0]) * 1024, int(info["MemTotal"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return total, total


def _dtype_bytes(name: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2}[name]


def component_bytes(ref, component: str, run_dtype: str) -> dict[str, int]:
    """Resident bytes of a component at the run's dtype: {'total', 'block' (largest DiT block), 'blocks'}."""
    from .models.loader import component_files

    files = component_files(ref, component)
    if component in ref.experts:
        from .models.dit import DitWeights

        weights = DitWeights(ref.dits[component]["weights"])
        try:
            per_block: dict[str, int] = {}
            total = 0
            for name, entry in weights.entries.items():
                numel = 1
                for d in entry.shape:
                    numel *= d
                # quantized linears stay quantized (1 byte or less per weight); the rest is cast to the run dtype
                size = numel * (1 if entry.encoding != "plain" else _dtype_bytes(run_dtype))
                total += size
                m = re.match(r"blocks\.(\d+)\.", name)
                if m:
                    per_block[m.group(1)] = per_block.get(m.group(1), 0) + size
        finally:
            weights.close()
        return {"total": total, "block": max(per_block.values(), default=0), "blocks": len(per_block)}
    numel_bytes = 0
    for f in files:
        if f.suffix == ".safetensors":
            from .models.checkpoint import TensorFiles

            tf = TensorFiles([f])
            for k in tf.keys():
                n = 1
                for d in tf.shape(k):
                    n *= d
                numel_bytes += n * (4 if component in ("vae", "clip") else _dtype_bytes(run_dtype))
        elif f.suffix in (".pth", ".bin"):
            numel_bytes += f.stat().st_size * (2 if component in ("vae", "clip") and run_dtype != "float32" else 1)
    return {"total": numel_bytes, "block": 0, "blocks": 0}


def activation_bytes(values: dict[str, Any]) -> int:
    """VRAM for one DiT forward's activations: the run's activation_reserve_gb, else the 8 GiB the perf helper
    reserves for 480p x 81 frames (32,760 tokens, CFG batch of 2), scaled by this config's token count."""
    from .fast.perf import DEFAULT_ACTIVATION_RESERVE_GB

    if values.get("activation_reserve_gb"):
        return int(float(values["activation_reserve_gb"]) * GB)
    frames = (values["target_video_length"] - 1) // 4 + 1
    tokens = frames * (values["target_height"] // 16) * (values["target_width"] // 16)
    return int(DEFAULT_ACTIVATION_RESERVE_GB * GB * tokens / 32760)


def memory_plans(sizes: dict[str, dict[str, int]], experts: list[str], act: int) -> list[dict[str, Any]]:
    """Candidate settings, from fastest to leanest, with the device memory and RAM each needs."""
    dit = max((sizes[e]["total"] for e in experts), default=0)
    block = max((sizes[e]["block"] for e in experts), default=0)
    non_block = max((sizes[e]["total"] - sizes[e]["block"] * sizes[e]["blocks"] for e in experts), default=0)
    others = max((sizes[c]["total"] for c in sizes if c not in experts), default=0)
    others_all = sum(s["total"] for c, s in sizes.items() if c not in experts)
    stream = lambda unit: non_block + 2 * unit + act  # noqa: E731  (two unit slots while streaming)
    return [
        {"name": "all resident (text encoder, VAE and the running expert; one expert at a time on a GPU)",
         "settings": {}, "device": others_all + dit + act, "ram": 0},
        {"name": "one stage's model at a time (default: the runtime evicts the previous stage's model)",
         "settings": {}, "device": max(dit + act, others), "ram": 0},
        {"name": "stream DiT blocks from RAM", "settings": {"cpu_offload": True, "offload_granularity": "block"},
         "device": max(stream(block), others), "ram": dit},
        {"name": "stream DiT phases from RAM", "settings": {"cpu_offload": True, "offload_granularity": "phase"},
         "device": max(stream(block // 3), others), "ram": dit},
        {"name": "stream DiT phases from disk",
         "settings": {"cpu_offload": True, "offload_granularity": "phase", "lazy_load": True},
         "device": max(stream(block // 3), others), "ram": 2 * block},
    ]


def fits_in(plan: dict[str, Any], vram_free: int, ram_free: int) -> bool:
    """A plan fits when it needs at most 90% of the free VRAM (allocator fragmentation, CUDA context) and the
    RAM that is available."""
    return plan["device"] <= 0.9 * vram_free and plan["ram"] <= ram_free


def choose_plan(plans: list[dict[str, Any]], vram_free: int, ram_free: int) -> dict[str, Any] | None:
    """The first (fastest) plan that fits, or None."""
    return next((p for p in plans if fits_in(p, vram_free, ram_free)), None)


def check_memory(config) -> list[Line]:
    from .models.loader import resolve_model
    from .runtime import resolve_device, resolve_dtype

    device = resolve_device(config["device"])
    dtype = str(resolve_dtype(config["dtype"], device)).replace("torch.", "")
    ram_free, ram_total = available_ram()
    lines = [Line("info", f"RAM: {ram_free / GB:.1f} of {ram_total / GB:.1f} GiB available")]
    vram_free = None
    if device.type == "cuda":
        vram_free, vram_total = torch.cuda.mem_get_info(device)
        lines.append(Line("info", f"VRAM ({device}): {vram_free / GB:.1f} of {vram_total / GB:.1f} GiB free"))
    try:
        ref = resolve_model(config, config.get("task", "t2v"))
        sizes = {c: component_bytes(ref, c, dtype) for c in _components(ref)}
    except WanBatchError as e:
        return lines + [Line("fail", f"cannot size the model: {e}")]
    for c, s in sizes.items():
        extra = f", {s['blocks']} blocks of {s['block'] / 2**20:.1f} MiB" if s["blocks"] else ""
        lines.append(Line("info", f"{c}: {s['total'] / 2**20:.1f} MiB at {dtype if c not in ('vae', 'clip') else 'float32'}"
                                  f"{extra}"))
    act = activation_bytes(config.values)
    lines.append(Line("info", f"DiT activations: about {act / 2**20:.1f} MiB for "
                              f"{config['target_width']}x{config['target_height']}x{config['target_video_length']} "
                              "(VAE decode activations are not estimated)"))
    experts = list(ref.experts)
    plans = memory_plans(sizes, experts, act)
    if device.type != "cuda":
        need = plans[1]["device"]
        level = "ok" if need <= ram_free else "fail"
        lines.append(Line(level, f"device {device}: needs about {need / GB:.2f} GiB of RAM "
                                 f"(one stage's model at a time); {ram_free / GB:.1f} GiB available"))
        return lines
    for plan in plans:
        fits = fits_in(plan, vram_free, ram_free)
        lines.append(Line("info", f"{'fits' if fits else 'too big':>8}: {plan['name']}: VRAM {plan['device'] / GB:.1f}"
                                  f" GiB, RAM {plan['ram'] / GB:.1f} GiB"))
    chosen = choose_plan(plans, vram_free, ram_free)
    if chosen is None:
        lines.append(Line("fail", "no offload setting fits this GPU and RAM: lower the resolution or frame count, "
                                  "or use a quantized checkpoint (dit_quantized)"))
    else:
        current = {k: config.get(k) for k in ("cpu_offload", "offload_granularity", "lazy_load")}
        setting = ", ".join(f'"{k}": {str(v).lower() if isinstance(v, bool) else repr(v)}'
                            for k, v in chosen["settings"].items()) or "no offload keys needed"
        lines.append(Line("ok", f"recommended: {chosen['name']} ({setting}); the config has {current}"))
    return lines


# -- pipeline --------------------------------------------------------------------------------------------------
DIAGNOSE_PROMPT = "a red circle moving left on a blue background"


def one_row_manifest(folder: Path, i2v: bool) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .demo import draw_first_frame

    row = {"job_id": "diagnose", "prompt": DIAGNOSE_PROMPT, "seed": 1, "image": None}
    if i2v:
        draw_first_frame(folder / "diagnose_first_frame.png")
        row["image"] = "diagnose_first_frame.png"
    table = pa.table({k: pa.array([v], pa.int64() if k == "seed" else pa.string()) for k, v in row.items()})
    pq.write_table(table, folder / "diagnose.parquet")
    return folder / "diagnose.parquet"


def check_pipeline(config, manifest: str | None = None, job_id: str | None = None, i2v: bool = False,
                   store_dir: str | None = None, out=print) -> list[Line]:
    """Run every stage of one job in order, in this process; stop at the first failing stage."""
    from .batch import load_batch
    from .execute import run_spec
    from .inspect import tensor_stats
    from .store import ArtifactStore

    work = Path(tempfile.mkdtemp(prefix="wan-batch-diagnose-"))
    manifest = manifest or str(one_row_manifest(work, i2v))
    batch = load_batch(manifest, config)
    job = next((j for j in batch.jobs if j.job_id == job_id), None) if job_id else batch.jobs[0]
    if job is None:
        return [Line("fail", f"manifest {manifest} has no job_id {job_id!r}")]
    plan = batch.planner.plan(job)
    if plan.decode is None:
        return [Line("fail", f"job {job.job_id} cannot run: {plan.error}")]
    store = ArtifactStore(store_dir or work / "store")
    names = {spec.key: name for name, spec in plan.stages().items()}
    lines = [Line("info", f"job {job.job_id} ({job.task}): {len(names)} stages, store {store.root}; a stage's "
                          "seconds include loading its model when it is not resident yet")]
    out(str(lines[0]))
    chain = plan.decode.chain()
    for i, spec in enumerate(chain):
        name = names.get(spec.key, spec.stage)
        t0 = time.perf_counter()
        try:
            side = run_spec(spec, store, run_id="diagnose")
        except Exception as e:  # the point of this check: name the stage and its error
            line = Line("fail", f"stage {name} FAILED after {time.perf_counter() - t0:.2f} s: "
                                f"{type(e).__name__}: {e}")
            lines.append(line)
            out(str(line))
            for rest in chain[i + 1:]:
                skipped = Line("info", f"stage {names.get(rest.key, rest.stage)}: not run")
                lines.append(skipped)
                out(str(skipped))
            lines.append(Line("fail", f"first failing stage: {name} (its inputs are kept in {store.root})"))
            out(str(lines[-1]))
            return lines
        seconds = time.perf_counter() - t0
        if spec.ref.ext == "mp4":
            summary = f"{side.get('frames')} frames {side.get('width')}x{side.get('height')}, " \
                      f"{store.payload_path(spec.ref).stat().st_size} bytes"
        else:
            stats = {k: tensor_stats(v) for k, v in store.load_tensors(spec.ref).items() if not k.startswith("sched.")}
            summary = "; ".join(f"{k} {s['shape']} {s['dtype']} mean {s['mean']:.4g} std {s['std']:.4g}"
                                for k, s in stats.items() if s["mean"] is not None)
        line = Line("ok", f"stage {name}: {seconds:.2f} s; {summary}")
        lines.append(line)
        out(str(line))
    if store_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    return lines
