"""The demo manifest: a few T2V rows and one I2V row whose image is drawn here (no files to download).

The prompts are captions the embedded tiny model never saw in training (pipeline.tiny.world.HELD_OUT),
so the videos show that it follows the prompt rather than replaying a training clip. Regenerate the manifest
with `python -m pipeline.demo`."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from .store import atomic_path

DEMO_ROWS = [
    {"job_id": "red-circle-left", "prompt": "a red circle moving left on a blue background", "seed": 1},
    {"job_id": "green-square-right", "prompt": "a green square moving right on a black background", "seed": 2},
    {"job_id": "yellow-triangle-up", "prompt": "a yellow triangle moving up on a purple background", "seed": 3},
    {"job_id": "red-circle-left-seed7", "prompt": "a red circle moving left on a blue background", "seed": 7},
    {"job_id": "i2v-white-circle-down", "prompt": "a white circle moving down on a green background", "seed": 4,
     "image": "demo_first_frame.png"},
]


def draw_first_frame(path: Path, size: int = 128) -> None:
    """A white circle near the top of a green frame, with room below it to move down (the
    pipeline scales the image to the model's size)."""
    import numpy as np

    from .tiny.world import dit_clip, render

    clip = dit_clip("white", "circle", "down", "green", rng=np.random.default_rng(0), size=size)
    with atomic_path(path) as tmp:
        Image.fromarray(render(clip, size, 1)[0][0]).save(tmp, format="PNG")


def write_demo_manifest(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    draw_first_frame(folder / "demo_first_frame.png")
    columns = {k: [row.get(k) for row in DEMO_ROWS] for k in ("job_id", "prompt", "seed", "image")}
    table = pa.table({"job_id": pa.array(columns["job_id"], pa.string()),
                      "prompt": pa.array(columns["prompt"], pa.string()),
                      "seed": pa.array(columns["seed"], pa.int64()),
                      "image": pa.array(columns["image"], pa.string())})
    pq.write_table(table, folder / "demo.parquet")
    return folder / "demo.parquet"


if __name__ == "__main__":
    print(write_demo_manifest(Path(__file__).resolve().parents[1] / "manifests"))
