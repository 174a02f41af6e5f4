"""Shared fixtures: the tiny model (built once per session), manifests, and running a batch in-process."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Build the tiny model in a folder of this test session unless the caller chose one (CI sets it).
os.environ.setdefault("WAN_BATCH_HOME", tempfile.mkdtemp(prefix="wan-batch-test-home-"))
# Test modules may import torch before the pipeline does: OpenMP must not spin there either (pipeline/threads.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_root() -> Path:
    from pipeline.tiny import ensure_tiny_models

    return ensure_tiny_models()


def write_manifest(path: Path, rows: list[dict], schema: pa.Schema | None = None) -> Path:
    """Write rows as a Parquet manifest (column types inferred unless a schema is given)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(k for row in rows for k in row))  # from_pylist looks at the first row only
    table = pa.Table.from_pylist([{k: row.get(k) for k in columns} for row in rows], schema=schema)
    pq.write_table(table, path)
    return path


def write_config(path: Path, **overrides) -> Path:
    """The embedded tiny config with some keys changed."""
    import json

    from pipeline.config import default_config_path

    cfg = json.loads(default_config_path().read_text())
    cfg.update(overrides)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg))
    return path


def read_results(output_dir: Path) -> dict[str, dict]:
    return {r["job_id"]: r for r in pq.read_table(output_dir / "results.parquet").to_pylist()}


def run_batch(manifest: Path, tmp: Path, config: Path | str = "", strict: bool = False,
              output_dir: Path | None = None, store: Path | None = None) -> bool:
    from tasks.build import run_batch as _run

    return _run(str(manifest), config=str(config), output_dir=str(output_dir or tmp / "outputs"),
                store=str(store or tmp / "store"), strict=strict)


def make_image(path: Path, size=(80, 60), color=(200, 30, 30), mode="RGB") -> Path:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", size, (20, 40, 160))
    ImageDraw.Draw(img).ellipse((size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2), fill=color)
    if mode != "RGB":
        img = img.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
