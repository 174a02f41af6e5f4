"""Parquet manifest: schema, validation that lists every problem by row and column, job expansion.

Manifest-level problems (unreadable file, no `prompt` column, wrong column types, duplicate or unsafe job ids)
refuse the whole manifest. Row-level problems (missing image, bad override) mark that row failed and let the
others run; `strict=True` turns them into a refusal too.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .config import MAX_FRAMES, MAX_SEED, ROW_OVERRIDES, GenerationConfig, adjust_frames, check_values
from .errors import ManifestError, WanBatchError

log = logging.getLogger(__name__)

STRING_COLUMNS = ("prompt", "job_id", "negative_prompt", "image", "lora")
INT_COLUMNS = ("seed", "height", "width", "num_frames", "infer_steps")
FLOAT_COLUMNS = ("guide_scale", "shift", "lora_strength")
KNOWN_COLUMNS = set(STRING_COLUMNS) | set(INT_COLUMNS) | set(FLOAT_COLUMNS)
SAFE_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass
class Job:
    row: int
    job_id: str
    prompt: str
    negative_prompt: str | None
    image: str | None  # absolute path; a row with an image is image-to-video
    seed: int | None  # None only for a row whose seed was refused (error is set)
    overrides: dict[str, Any] = field(default_factory=dict)  # config key -> value
    error: str | None = None  # row-level problem: the row is reported failed, not run
    # the row's LoRA set (lora_configs items with absolute paths), in place of the config's; None: the config's
    loras: list[dict[str, Any]] | None = None

    @property
    def task(self) -> str:
        return "i2v" if self.image else "t2v"


def _slug(text: str, limit: int = 40) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", text.lower()).strip("-")
    return slug[:limit].rstrip("-") or "job"


def derive_job_id(values: dict[str, Any]) -> str:
    """Stable id from the row's content, so re-ordering a manifest does not rename its videos."""
    digest = hashlib.sha256(repr(sorted(values.items())).encode()).hexdigest()[:8]
    return f"{_slug(str(values.get('prompt') or ''))}-{digest}"


def _is_string(t: pa.DataType) -> bool:
    """Any Arrow type whose values are text: string, large_string, string_view, and dictionary-encoded text
    (pandas `category`, polars `Categorical`, pyarrow `dictionary_encode()`: one prompt over many seeds).
    Their Python values are plain str, so the rows read the same."""
    if pa.types.is_dictionary(t):
        return _is_string(t.value_type) and not pa.types.is_null(t.value_type)
    return (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)
            or getattr(pa.types, "is_string_view", lambda _: False)(t))


def _is_number(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_null(t)


def read_table(path: Path) -> pa.Table:
    if path.is_dir():
        raise ManifestError(str(path), ["is a folder, not a file (a Parquet manifest is one .parquet file)"])
    if not path.is_file():
        raise ManifestError(str(path), ["file not found"])
    try:
        return pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a non-Parquet file
        raise ManifestError(str(path), [f"not a readable Parquet file ({type(e).__name__}: {e})"]) from None


def _schema_problems(table: pa.Table) -> list[str]:
    problems = []
    names = table.schema.names
    if "prompt" not in names:
        problems.append(f"missing required column 'prompt' (columns present: {', '.join(names) or 'none'})")
    if len(set(names)) != len(names):
        problems.append("duplicate column names")
    for name in names:
        t = table.schema.field(name).type
        if name in STRING_COLUMNS and not _is_string(t):
            problems.append(f"column '{name}' must hold strings, not {t}")
        elif name in INT_COLUMNS + FLOAT_COLUMNS and not _is_number(t):
            problems.append(f"column '{name}' must hold numbers, not {t}")
    unknown = [n for n in names if n not in KNOWN_COLUMNS]
    if unknown:
        log.warning("manifest columns %s are not used (known: %s)", unknown, sorted(KNOWN_COLUMNS))
    if table.num_rows == 0 and not problems:
        problems.append("the manifest has no rows")
    return problems


def _int_value(value: Any, column: str) -> tuple[int | None, str | None]:
    if isinstance(value, float) and math.isnan(value):
        return None, f"column '{column}' is NaN, not a whole number"
    if isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            return None, f"column '{column}' must be a whole number, got {value!r}"
        value = int(value)
    return int(value), None


LORA_NAMES = ("high_noise_model", "low_noise_model", "dit")


def parse_row_lora(value: Any, strength: Any, folder: Path) -> tuple[list[dict[str, Any]] | None, list[str]]:
    """The `lora` / `lora_strength` columns of a row -> (lora_configs items, problems).

    `lora` is a LoRA file's path (for the high-noise expert of a two-expert model, or the DiT of a one-DiT model,
    as LightX2V's switch_lora(path, strength) applies it; `lora_strength`, default 1, is its strength), or a JSON
    list of LightX2V lora_configs items [{"path", "strength", "name": high_noise_model | low_noise_model}];
    "" or "[]" means no LoRA for this row. Relative paths are relative to the manifest's folder."""
    if value is None:
        if strength is not None and not (isinstance(strength, float) and math.isnan(strength)):
            return None, ["column 'lora_strength' is set but column 'lora' is empty"]
        return None, []
    text = str(value).strip()
    if text.startswith("["):
        try:
            items = json.loads(text)
        except ValueError as e:
            return None, [f"column 'lora' is not a valid JSON list: {e}"]
        if strength is not None and not (isinstance(strength, float) and math.isnan(strength)):
            return None, ["column 'lora_strength' goes with a single LoRA path; give each item's strength in the list"]
    elif text:
        items = [{"path": text, "strength": 1.0 if strength is None or (isinstance(strength, float)
                                                                         and math.isnan(strength)) else strength}]
    else:
        items = []
    problems, out = [], []
    if not isinstance(items, list):
        return None, ["column 'lora' must be a path or a JSON list of {path, strength, name}"]
    for n, item in enumerate(items):
        where = f"column 'lora' item {n}"
        if not isinstance(item, dict) or not isinstance(item.get("path"), str) or not item["path"].strip():
            problems.append(f"{where} must be an object with a 'path' (got {item!r})")
            continue
        unknown = sorted(set(item) - {"path", "strength", "name", "alpha"})
        if unknown:
            problems.append(f"{where} has unknown field(s) {unknown} (path, strength, name, alpha)")
        if item.get("name") is not None and item["name"] not in LORA_NAMES:
            problems.append(f"{where}: name {item['name']!r} is not one of {', '.join(LORA_NAMES)}")
        for key in ("strength", "alpha"):
            v = item.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
                problems.append(f"{where}: {key} must be a finite number, got {v!r}")
        lora_path = Path(item["path"])
        lora_path = (lora_path if lora_path.is_absolute() else folder / lora_path).resolve()
        if not lora_path.is_file():
            problems.append(f"{where}: LoRA file not found: {lora_path}")
        out.append({**item, "path": str(lora_path), "strength": float(item.get("strength", 1.0))
                    if isinstance(item.get("strength", 1.0), (int, float)) else item.get("strength")})
    return (None if problems else out), problems


def seed_value(value: Any) -> tuple[int | None, str | None]:
    """(seed, problem) for a manifest's seed cell. A refused seed is kept only when it is a 64-bit integer
    (results.parquet's `seed` column is int64, so it then shows what the row had), else None: a refused seed
    never reaches a stage or the report as a number it is not."""
    if isinstance(value, float) and math.isnan(value):
        return None, ("column 'seed' is NaN, not a whole number (pandas writes a missing integer as NaN: "
                      "leave the cell null, e.g. with the Int64 dtype, to use the config's seed)")
    if isinstance(value, float) and (not math.isfinite(value) or value != int(value)):
        return None, f"column 'seed' must be a whole number, got {value!r}"
    seed = int(value)
    if not 0 <= seed <= MAX_SEED:
        kept = seed if -2**63 <= seed < 2**63 else None
        return kept, f"column 'seed' must be between 0 and 2^63-1, got {value!r}"
    return seed, None


def read_manifest(path: str | Path, config: GenerationConfig, strict: bool = False,
                  check_image=None) -> list[Job]:
    """Validate and expand a manifest. `check_image(path) -> None` raises on an unusable image."""
    path = Path(path).resolve()
    table = read_table(path)
    problems = _schema_problems(table)
    if problems:
        raise ManifestError(str(path), problems)

    rows = table.to_pylist()
    jobs: list[Job] = []
    manifest_problems: list[str] = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(rows):
        errors: list[str] = []
        prompt = raw.get("prompt")
        if prompt is None or not str(prompt).strip():
            errors.append("column 'prompt' is empty")
        job_id = raw.get("job_id")
        if job_id is None:
            job_id = derive_job_id({k: v for k, v in raw.items() if k in KNOWN_COLUMNS})
        elif not SAFE_JOB_ID.match(job_id) or ".." in job_id:
            manifest_problems.append(
                f"row {i}, column 'job_id': {job_id!r} is not safe as a file name "
                "(use letters, digits, '.', '_', '-'; no path separators or '..')")
        if job_id in seen:
            manifest_problems.append(f"row {i}, column 'job_id': {job_id!r} duplicates row {seen[job_id]}")
        seen.setdefault(job_id, i)

        seed = config["seed"]
        if raw.get("seed") is not None:  # null means "the config's seed"; NaN is an error
            seed, err = seed_value(raw["seed"])
            if err:
                errors.append(err)

        overrides: dict[str, Any] = {}
        for column, key in ROW_OVERRIDES.items():
            if column not in raw or raw[column] is None:
                continue
            value = raw[column]
            if column in INT_COLUMNS:
                value, err = _int_value(value, column)
                if err:
                    errors.append(err)
                    continue
            elif isinstance(value, float) and not math.isfinite(value):
                # refused, not "use the config's value": a NaN is more likely a broken writer than a choice
                # (null is the way to say "the config's value")
                errors.append(f"column '{column}' is {value!r}: give a finite number, or null for the config's value")
                continue
            overrides[key] = value
        errors += check_values(overrides, where="column", names={k: c for c, k in ROW_OVERRIDES.items()})

        loras, lora_problems = parse_row_lora(raw.get("lora"), raw.get("lora_strength"), path.parent)
        errors += lora_problems

        image = raw.get("image")
        if image:
            image_path = Path(image)
            image_path = image_path if image_path.is_absolute() else (path.parent / image_path)
            image = str(image_path.resolve())
            if check_image is not None:
                try:
                    check_image(image)
                except WanBatchError as e:
                    errors.append(f"column 'image': {e}")
        n = overrides.get("target_video_length")
        if isinstance(n, int) and 1 <= n <= MAX_FRAMES and (n - 1) % 4:
            fixed = adjust_frames(n, "i2v" if image else "t2v")
            log.warning("manifest %s: row %d, column 'num_frames': %d is not of the form 4k+1; adjusted to %d "
                        "as LightX2V does", path.name, i, n, fixed)
            overrides["target_video_length"] = fixed
        jobs.append(Job(row=i, job_id=job_id, prompt=str(prompt or ""),
                        negative_prompt=raw.get("negative_prompt"), image=image or None, seed=seed,
                        overrides=overrides, loras=loras,
                        error="; ".join(f"row {i}: {e}" for e in errors) or None))

    if manifest_problems:
        raise ManifestError(str(path), manifest_problems)
    row_problems = [j.error for j in jobs if j.error]
    if strict and row_problems:
        raise ManifestError(str(path), row_problems)
    for msg in row_problems:
        log.warning("manifest %s: %s (this row is skipped and reported failed)", path.name, msg)
    return jobs
