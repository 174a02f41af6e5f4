"""The tiny model's synthetic world: clips of one shape in a named colour moving on a plain background.

Captions read "a red circle moving left on a blue background". The trainer (tools/train_tiny.py) draws its
data here; the demo draws its I2V first frame here; the semantic tests read videos back with
`describe_video` and check them against the prompt with `matches`. Captions in HELD_OUT never appear in
training, so a test that prompts with them shows the model follows the text rather than replaying a clip.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 225), "yellow": (240, 215, 40),
    "white": (240, 240, 240), "black": (20, 20, 20), "purple": (140, 50, 185), "cyan": (40, 205, 215),
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS: dict[str, tuple[float, float]] = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0),
                                               "down": (0.0, 1.0)}
# (colour, shape, direction, background): never in the training set; the semantic tests use these.
HELD_OUT: tuple[tuple[str, str, str, str], ...] = (
    ("red", "circle", "left", "blue"), ("green", "square", "right", "black"),
    ("yellow", "triangle", "up", "purple"), ("white", "circle", "down", "green"),
    ("cyan", "square", "left", "white"), ("blue", "triangle", "right", "yellow"),
    ("purple", "circle", "up", "cyan"), ("black", "square", "down", "red"),
)


SHAPE_RADIUS = (0.17, 0.23)  # of the frame size: the VAE's clips
TRAVEL = (0.28, 0.38)  # distance the shape moves over the clip, of the frame size
DIT_RADIUS = (0.10, 0.13)  # the denoisers' clips: smaller shapes that travel further (place_clip below)
DIT_TRAVEL = (0.38, 0.45)


def caption(colour: str, shape: str, direction: str, background: str) -> str:
    return f"a {colour} {shape} moving {direction} on a {background} background"


@dataclass(frozen=True)
class Clip:
    colour: str
    shape: str
    direction: str
    background: str
    x: float  # start centre, pixels
    y: float
    distance: float  # travelled over the clip, pixels
    radius: float

    @property
    def caption(self) -> str:
        return caption(self.colour, self.shape, self.direction, self.background)


def place_clip(colour: str, shape: str, direction: str, background: str, rng: np.random.Generator,
               size: int, radius: tuple[float, float] = SHAPE_RADIUS,
               travel: tuple[float, float] = TRAVEL) -> Clip:
    """Anywhere in the frame: a random size, speed and start such that the whole path stays inside.

    Random placement matters for the denoisers: Wan's DiT knows positions only relative to each other (RoPE),
    so it can learn "the shape moves left" (a relative offset from frame to frame) but not "starts on the
    right" (an absolute place). Clips on a fixed path through the centre taught it the axis of motion but
    not its sign: it drew the shape at both ends."""
    r = float(rng.uniform(*radius) * size)
    distance = float(rng.uniform(*travel) * size)
    margin = r * 1.2 + 1.0
    dx, dy = DIRECTIONS[direction]
    lo_x, hi_x = margin + max(0.0, -dx) * distance, size - margin - max(0.0, dx) * distance
    lo_y, hi_y = margin + max(0.0, -dy) * distance, size - margin - max(0.0, dy) * distance
    return Clip(colour, shape, direction, background, float(rng.uniform(lo_x, hi_x)), float(rng.uniform(lo_y, hi_y)),
                distance, r)


def dit_clip(colour: str, shape: str, direction: str, background: str, rng: np.random.Generator,
             size: int) -> Clip:
    """A clip as the denoisers learn them (and as the I2V tests and the demo draw their first frames)."""
    return place_clip(colour, shape, direction, background, rng, size, DIT_RADIUS, DIT_TRAVEL)


def all_combos() -> list[tuple[str, str, str, str]]:
    return [(c, s, d, b) for c in PALETTE for s in SHAPES for d in DIRECTIONS for b in PALETTE if b != c]


def sample_clips(n: int, seed: int, size: int, place=place_clip) -> list[Clip]:
    """n training clips: every allowed combination in turn (shuffled), each placed by `place`."""
    rng = np.random.default_rng(seed)
    held = set(HELD_OUT)
    combos = [c for c in all_combos() if c not in held]
    out: list[Clip] = []
    while len(out) < n:
        for i in rng.permutation(len(combos)):
            out.append(place(*combos[i], rng=rng, size=size))
            if len(out) == n:
                break
    return out


def _shape_mask(shape: str, xs: np.ndarray, ys: np.ndarray, cx: np.ndarray, cy: np.ndarray, r: float) -> np.ndarray:
    px, py = xs[None, None, :] - cx[:, None, None], ys[None, :, None] - cy[:, None, None]
    if shape == "circle":
        return px * px + py * py <= r * r
    if shape == "square":
        s = r * 0.88
        return (np.abs(px) <= s) & (np.abs(py) <= s)
    # triangle pointing up, circumradius 1.2 r, centred on its centroid
    R = r * 1.2
    half = R * math.sqrt(3) / 2
    top, base = -R, R / 2
    inside_base = py <= base
    # the two slanted sides: |px| <= half * (py - top) / (base - top)
    return inside_base & (np.abs(px) <= half * (py - top) / (base - top))


def render(clip: Clip, size: int, frames: int, supersample: int = 4,
           only: slice = slice(None)) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 video [F, H, W, 3], float32 coverage [F, H, W]) with anti-aliased edges; `only` draws just those
    frames of the clip (the same pixels as slicing the whole clip, at a fraction of the cost)."""
    n = size * supersample
    coords = (np.arange(n, dtype=np.float32) + 0.5) / supersample
    frac = np.linspace(0.0, 1.0, frames, dtype=np.float32)[only]
    frames = len(frac)
    dx, dy = DIRECTIONS[clip.direction]
    cx = clip.x + dx * clip.distance * frac
    cy = clip.y + dy * clip.distance * frac
    mask = _shape_mask(clip.shape, coords, coords, cx, cy, clip.radius).astype(np.float32)
    alpha = mask.reshape(frames, size, supersample, size, supersample).mean(axis=(2, 4))
    fg = np.array(PALETTE[clip.colour], np.float32)
    bg = np.array(PALETTE[clip.background], np.float32)
    video = bg + alpha[..., None] * (fg - bg)
    return np.clip(video + 0.5, 0, 255).astype(np.uint8), alpha


# ---- reading a generated video back (used by the report below and by tests/test_semantic.py) ----------------

def nearest_colour(rgb: np.ndarray) -> str:
    names = list(PALETTE)
    dist = [float(np.linalg.norm(rgb - np.array(PALETTE[n], np.float32))) for n in names]
    return names[int(np.argmin(dist))]


def dominant_colour(pixels: np.ndarray, exclude: str | None = None) -> str:
    """The palette colour most of these pixels [N, 3] are nearest to (`exclude`: the background's, which the
    soft edge of a shape leans towards). A vote, not a median: a median of a yellow shape with a bluish rim on
    purple lands between them and reads as another palette colour."""
    names = [n for n in PALETTE if n != exclude]
    ref = np.array([PALETTE[n] for n in names], np.float32)
    nearest = np.argmin(((pixels[:, None, :] - ref[None]) ** 2).sum(-1), axis=1)
    return names[int(np.bincount(nearest, minlength=len(names)).argmax())]


def describe_video(frames: np.ndarray, min_move: float = 0.1) -> dict:
    """What a viewer would say about a clip [F, H, W, 3] uint8: the background colour (median pixel), the
    colour of the shape (the palette colour most pixels of its body are nearest to), and where its centroid went
    (the direction of the largest displacement between the first and last quarter of the frames, if it is at
    least `min_move` of the frame size)."""
    video = frames.astype(np.float32)
    nf, h, w, _ = video.shape
    bg = np.median(video.reshape(nf, -1, 3), axis=1)  # [F, 3]
    diff = np.linalg.norm(video - bg[:, None, None, :], axis=-1)
    fg = diff > 60.0
    out = {"background": nearest_colour(np.median(bg, axis=0)), "colour": None, "direction": None,
           "displacement": (0.0, 0.0), "fg_fraction": float(fg.mean())}
    if fg.sum() < 4 * nf:
        return out
    # the colour of the shape's body: its pixels at least 70% as far from the background as its most distinct
    # ones. A soft rim mixes the two colours, and on a 64-pixel video the rim has as many pixels as the body:
    # a purple disc with a purple-cyan rim on cyan would otherwise be voted "blue"
    far = diff[fg]
    body = video[fg][far >= 0.7 * np.percentile(far, 90)]
    out["colour"] = dominant_colour(body, exclude=out["background"])
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    cents = []
    for i in range(nf):
        m = fg[i]
        cents.append((xs[m].mean(), ys[m].mean()) if m.sum() >= 3 else (np.nan, np.nan))
    cents = np.array(cents)
    q = max(1, nf // 4)
    first, last = cents[:q][np.isfinite(cents[:q, 0])], cents[-q:][np.isfinite(cents[-q:, 0])]
    if len(first) and len(last):
        disp = last.mean(axis=0) - first.mean(axis=0)
        out["displacement"] = (float(disp[0]), float(disp[1]))
        name, vec = max(DIRECTIONS.items(), key=lambda kv: kv[1][0] * disp[0] + kv[1][1] * disp[1])
        if vec[0] * disp[0] + vec[1] * disp[1] >= min_move * max(h, w):
            out["direction"] = name
    return out


def matches(desc: dict, colour: str, direction: str) -> bool:
    return desc["colour"] == colour and desc["direction"] == direction


# ---- training recipe ----------------------------------------------------------------------------------------
