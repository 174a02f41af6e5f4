"""`wan-batch download`: fetch a model (and optionally a distilled/quantized DiT or distill LoRAs) from the
Hugging Face Hub with huggingface_hub's snapshot_download, into `<dir>/<owner>/<repo>` (the layout the configs
in configs/ expect: `models/Wan-AI/Wan2.2-I2V-A14B`, `models/lightx2v/...`, `models/QuantStack/...`).

When a separate DiT is chosen (fp8, int8, distill, gguf-*), the base repo's bf16 DiT shards are skipped but its
`high_noise_model/*.json` / `low_noise_model/*.json` (or Wan2.1's top-level config.json) are kept: the loaders
read the architecture from them. snapshot_download resumes interrupted downloads and skips complete files.
The repo file names below are the ones published when this was written; the patterns use wildcards where the
publishers add date suffixes.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import WanBatchError

ALIASES = {
    "wan2.2-t2v": "Wan-AI/Wan2.2-T2V-A14B", "wan2.2-i2v": "Wan-AI/Wan2.2-I2V-A14B",
    "wan2.2-t2v-diffusers": "Wan-AI/Wan2.2-T2V-A14B-Diffusers",
    "wan2.2-i2v-diffusers": "Wan-AI/Wan2.2-I2V-A14B-Diffusers",
    "wan2.1-i2v-480p": "Wan-AI/Wan2.1-I2V-14B-480P", "wan2.1-i2v-720p": "Wan-AI/Wan2.1-I2V-14B-720P",
    "wan2.1-i2v-480p-diffusers": "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers",
    "wan2.1-i2v-720p-diffusers": "Wan-AI/Wan2.1-I2V-14B-720P-Diffusers",
}
KNOWN = set(ALIASES.values())
NON_MODEL = ["assets/*", "examples/*", "*.mp4", "*.png", "*.jpg", "*.gif"]
DIT_CHOICES = "bf16 (default: the repo's own DiT), distill, fp8, int8, gguf-Q4_K_M, gguf-Q8_0, gguf-<TYPE>"


@dataclass
class Fetch:
    repo: str
    allow: list[str] | None = None
    ignore: list[str] = field(default_factory=list)

    def describe(self) -> str:
        parts = [self.repo]
        if self.allow:
            parts.append("only " + ", ".join(self.allow))
        if self.ignore:
            parts.append("skipping " + ", ".join(self.ignore))
        return "; ".join(parts)


def _facts(repo: str) -> tuple[str, str, str]:
    """(family wan2.2|wan2.1, task t2v|i2v, resolution tag for Wan2.1 '480p'|'720p'|'')."""
    name = repo.split("/")[-1].lower()
    family = "wan2.2" if "wan2.2" in name else "wan2.1"
    task = "i2v" if "i2v" in name else "t2v"
    res = "720p" if "720p" in name else "480p" if "480p" in name else ""
    return family, task, res


def plan_download(model: str, dit: str = "bf16", lora: str | None = None) -> list[Fetch]:
    """The repos and patterns `wan-batch download` fetches (no network)."""
    repo = ALIASES.get(model.lower(), model)
    if "/" not in repo:
        raise WanBatchError(f"unknown model {model!r}: give a Hugging Face repo id (owner/name) or one of "
                            f"{', '.join(sorted(ALIASES))}")
    family, task, res = _facts(repo)
    diffusers = repo.lower().endswith("-diffusers")
    dit = (dit or "bf16").strip()
    if dit != "bf16" and diffusers:
        raise WanBatchError(f"--dit {dit} goes with Wan's original layout (e.g. {repo[:-len('-Diffusers')]}), "
                            f"not the diffusers layout")
    if dit != "bf16" and repo not in KNOWN:
        raise WanBatchError(f"--dit {dit} is only known for {', '.join(sorted(KNOWN))}")
    base = Fetch(repo, ignore=list(NON_MODEL))
    fetches = [base]
    if dit == "bf16":
        pass
    elif family == "wan2.2":
        base.ignore += ["high_noise_model/*.safetensors", "low_noise_model/*.safetensors"]
        if dit in ("distill", "fp8", "int8"):
            kind = {"distill": "lightx2v_4step", "fp8": "scaled_fp8_e4m3_lightx2v_4step",
                    "int8": "int8_lightx2v_4step"}[dit]
            fetches.append(Fetch("lightx2v/Wan2.2-Distill-Models",
                                 allow=[f"wan2.2_{task}_A14b_{n}_{kind}*.safetensors"
                                        for n in ("high_noise", "low_noise")], ignore=["*comfyui*"]))
        elif dit.startswith("gguf-"):
            quant = dit[len("gguf-"):]
            gguf_repo = f"QuantStack/Wan2.2-{task.upper()}-A14B-GGUF"
            fetches.append(Fetch(gguf_repo, allow=[f"HighNoise/*-{quant}.gguf", f"LowNoise/*-{quant}.gguf"]))
        else:
            raise WanBatchError(f"unknown --dit {dit!r}; choose {DIT_CHOICES}")
    else:
        if not res:
            raise WanBatchError(f"--dit {dit} for Wan2.1 needs a 480P or 720P model (got {repo})")
        base.ignore += ["diffusion_pytorch_model*.safetensors", "diffusion_pytorch_model*.index.json"]
        kind = {"distill": "lightx2v_4step", "fp8": "scaled_fp8_e4m3_lightx2v_4step",
                "int8": "int8_lightx2v_4step"}.get(dit)
        if kind is None:
            raise WanBatchError(f"--dit {dit!r} is not available for Wan2.1 here; choose bf16, distill, fp8 or int8")
        fetches.append(Fetch("lightx2v/Wan2.1-Distill-Models", allow=[f"wan2.1_i2v_{res}_{kind}*.safetensors"],
                             ignore=["*comfyui*"]))
    if lora == "distill":
        if family != "wan2.2":
            raise WanBatchError("--lora distill is for the Wan2.2 A14B models")
        fetches.append(Fetch("lightx2v/Wan2.2-Distill-Loras",
                             allow=[f"wan2.2_{task}_A14b_{n}_lora_rank64_lightx2v_4step*.safetensors"
                                    for n in ("high_noise", "low_noise")]))
    elif lora:
        raise WanBatchError(f"unknown --lora {lora!r}; the choice is 'distill'")
    return fetches


def offline_message(repo: str, target: Path, error: Exception) -> str:
    return (f"cannot download {repo}: the Hugging Face Hub is not reachable ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}).\n"
            f"Check the network (or unset HF_HUB_OFFLINE); files already in {target} are kept and the same "
            f"command resumes where it stopped. To use a model fetched elsewhere, copy it to {target}.")


RECORD = ".wan-batch-snapshot.json"


def remote_files(fetch: Fetch, revision: str | None) -> tuple[str, dict[str, int]]:
    """(commit, {file: size}) of the repo files this fetch selects, from the Hub's index of the repo."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import filter_repo_objects

    info = HfApi().model_info(fetch.repo, revision=revision, files_metadata=True)
    sizes = {s.rfilename: s.size for s in info.siblings or [] if s.size is not None}
    chosen = filter_repo_objects(list(sizes), allow_patterns=fetch.allow, ignore_patterns=fetch.ignore or None)
    return info.sha or "", {name: sizes[name] for name in sorted(chosen)}


def write_record(target: Path, repo: str, commit: str, files: dict[str, int]) -> None:
    """What a complete snapshot holds, so a later run (offline too) can tell it from an interrupted one."""
    from .store import atomic_write_text

    atomic_write_text(target / RECORD, json.dumps({"repo": repo, "commit": commit, "files": files}, indent=1))


def _safetensors_problem(path: Path) -> str | None:
    """A .safetensors file holds an 8-byte header length, a JSON header and the tensor data it declares."""
    try:
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
    except (OSError, ValueError):
        return f"{path.name}: not a complete safetensors file (unreadable header)"
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    size = path.stat().st_size
    if size != 8 + n + end:
        return f"{path.name}: {size} bytes, its header declares {8 + n + end}"
    return None


def snapshot_problems(target: Path) -> list[str]:
    """Why `target` is not a complete snapshot ([] when it is). With the record of a finished download: each
    file it names, at its size. Without one (a folder copied from elsewhere): each shard a `*.index.json`
    names is there, each JSON file parses, each safetensors file is as long as its header says."""
    record_path = target / RECORD
    if not target.is_dir() or not any(p.name != RECORD for p in target.iterdir()):
        return [f"{target} is empty or missing"]
    problems: list[str] = []
    if record_path.is_file():
        try:
            files = json.loads(record_path.read_text())["files"]
        except (OSError, ValueError, KeyError):
            return [f"{record_path.name} is unreadable: download again to rewrite it"]
        for name, size in files.items():
            path = target / name
            if not path.is_file():
                problems.append(f"{name}: missing")
            elif path.stat().st_size != size:
                problems.append(f"{name}: {path.stat().st_size} bytes, the repo's index says {size}")
        return problems
    for index in sorted(target.rglob("*.index.json")):
        try:
            shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        except (OSError, ValueError, AttributeError):
            continue  # reported below as a JSON file that does not parse
        problems += [f"{(index.parent / s).relative_to(target)}: missing (named by {index.name})"
                     for s in sorted(shards) if not (index.parent / s).is_file()]
    for path in sorted(target.rglob("*.json")):
        if ".cache" in path.relative_to(target).parts:
            continue
        try:
            json.loads(path.read_text())
        except (OSError, ValueError):
            problems.append(f"{path.relative_to(target)}: not complete JSON ({path.stat().st_size} bytes)")
    for path in sorted(target.rglob("*.safetensors")):
        problem = _safetensors_problem(path)
        if problem:
            problems.append(str(path.relative_to(target).parent / problem) if path.parent != target else problem)
    return problems


def _listing(problems: list[str], limit: int = 10) -> str:
    more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
    return "".join(f"\n  - {p}" for p in problems[:limit]) + more


def download(fetches: list[Fetch], root: Path, revision: str | None = None) -> list[tuple[Path, str]]:
    """Run the fetches into `<root>/<owner>/<repo>`; returns (target, how it was checked). Raises
    WanBatchError with a clear message when the Hub is unreachable and the folder is not complete, or when
    a download ends incomplete."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    unreachable = (LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError, TimeoutError,
                   *_transport_errors())
    out = []
    for f in fetches:
        target = Path(root) / f.repo
        target.mkdir(parents=True, exist_ok=True)
        rev = revision if f is fetches[0] else None
        try:
            # the index first: offline, snapshot_download returns an existing folder as it is
            commit, files = remote_files(f, rev)
            snapshot_download(repo_id=f.repo, local_dir=str(target), allow_patterns=f.allow,
                              ignore_patterns=f.ignore or None, revision=commit or rev)
        except unreachable as e:
            problems = snapshot_problems(target)
            if (target / RECORD).is_file() and not problems:
                out.append((target, "complete (checked offline against the record of its download)"))
                continue
            why = (_listing(problems) if problems else
                   "\n  - no record of a finished download here (only `wan-batch download` online writes one)")
            raise WanBatchError(offline_message(f.repo, target, e) + f"\n{target} is not known complete:" + why) \
                from None
        except HfHubHTTPError as e:
            raise WanBatchError(f"cannot download {f.repo}: {e}") from None
        write_record(target, f.repo, commit, files)
        problems = snapshot_problems(target)
        if problems:
            raise WanBatchError(f"{f.repo} is incomplete in {target} after the download; run the same command "
                                f"again to resume:" + _listing(problems))
        out.append((target, f"complete ({len(files)} files, sizes as the repo's index says)"))
    return out


def _transport_errors() -> tuple[type[Exception], ...]:
    """Network errors of the HTTP client huggingface_hub uses (httpx in 1.x+, requests before)."""
    out: list[type[Exception]] = []
    try:
        import httpx

        out.append(httpx.TransportError)
    except ImportError:
        pass
    try:
        import requests

        out += [requests.ConnectionError, requests.Timeout]
    except ImportError:
        pass
    return tuple(out)
