"""The batch report: one self-contained HTML page and a PNG contact sheet, from an output folder's results.parquet.

Per row: a thumbnail (the video's middle frame, embedded as a data: URI), the prompt, status and error, seconds
per stage and which stages came from the cache. On top: counts, per-stage totals and a stage timing chart (inline
SVG: one stacked bar per row, cached stages drawn pale). No scripts, styles or images from elsewhere: the page
can be mailed or archived with the batch.
"""
from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont

from .errors import WanBatchError
from .stages.registry import STAGES as REGISTRY
from .store import atomic_path, atomic_write_text

STAGES = tuple(REGISTRY)  # pipeline order; the negative prompt's text time is in seconds_text-negative
_PALETTE = ("#4e79a7", "#59a14f", "#e15759", "#f28e2b", "#b07aa1", "#76b7b2", "#edc948", "#ff9da7", "#9c755f")
STAGE_COLORS = {s: _PALETTE[i % len(_PALETTE)] for i, s in enumerate(STAGES)}
THUMB = 160


def load_results(output_dir: Path) -> list[dict[str, Any]]:
    path = output_dir / "results.parquet"
    if not path.is_file():
        raise WanBatchError(f"{path} not found (run the batch first, with --output-dir {output_dir})")
    return pq.read_table(path).to_pylist()


def _video_path(row: dict[str, Any], output_dir: Path) -> Path | None:
    """The row's video as an absolute path: the output folder's own file first (the batch writes it there;
    a copied or moved folder then shows its own videos), else the absolute path results.parquet holds.
    Older results hold a path relative to the folder the batch ran in: only the output folder's file fits."""
    if not row.get("video"):
        return None
    p = Path(row["video"])
    candidates = (output_dir / p.name, p) if p.is_absolute() else (output_dir / p.name,)
    for candidate in candidates:
        if candidate.is_file():
            return candidate.absolute()
    return None


def video_href(video: Path, output_dir: Path) -> str:
    """The link from report.html (written in `output_dir`) to a video: relative inside the output folder, so
    the folder can be moved, copied or served as it is; a file: URL for a video kept elsewhere."""
    try:
        rel = video.relative_to(output_dir)
    except ValueError:
        return video.as_uri()
    return quote(rel.as_posix())


def middle_frame(video: Path) -> np.ndarray:
    """The frame in the middle of an MP4 (seek by time: one decoded frame, not the whole video)."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(video), pix_fmt="rgb24")  # imageio-ffmpeg's own binary
    meta = next(reader)
    w, h = meta["size"]
    first = next(reader, None)
    reader.close()
    duration = float(meta.get("duration") or 0)
    if duration > 0:
        reader = imageio_ffmpeg.read_frames(str(video), pix_fmt="rgb24", input_params=["-ss", f"{duration / 2:.3f}"])
        next(reader)
        mid = next(reader, None)
        reader.close()
        if mid is not None:
            first = mid
    if first is None:
        raise WanBatchError(f"video {video} has no frames")
    return np.frombuffer(first, np.uint8).reshape(h, w, 3)


def placeholder(text: str, size: int = THUMB) -> Image.Image:
    img = Image.new("RGB", (size, size), (90, 90, 90))
    draw = ImageDraw.Draw(img)
    draw.line((0, 0, size, size), fill=(140, 60, 60), width=3)
    draw.line((0, size, size, 0), fill=(140, 60, 60), width=3)
    draw.text((8, size // 2 - 6), text, fill=(255, 255, 255), font=ImageFont.load_default())
    return img


def thumbnail(row: dict[str, Any], output_dir: Path, size: int = THUMB) -> Image.Image:
    video = _video_path(row, output_dir)
    if video is None:
        return placeholder("no video" if row.get("status") == "ok" else "failed", size)
    try:
        img = Image.fromarray(middle_frame(video))
    except Exception:  # an unreadable video must not stop the report: it shows as such
        return placeholder("unreadable video", size)
    scale = size / max(img.size)
    return img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                      Image.Resampling.NEAREST if scale >= 2 else Image.Resampling.LANCZOS)


def png_data_uri(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def present_stages(rows: list[dict[str, Any]]) -> list[str]:
    return [s for s in STAGES if any(r.get(f"seconds_{s}") is not None for r in rows)]


def stage_totals(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per stage: seconds computed in this batch, seconds reused from the cache, rows that hit the cache."""
    out = {}
    for s in present_stages(rows):
        computed = reused = hits = 0.0
        for r in rows:
            sec = r.get(f"seconds_{s}")
            if sec is None:
                continue
            if s in (r.get("cached_stages") or []):
                reused += sec
                hits += 1
            else:
                computed += sec
        out[s] = {"computed_s": computed, "reused_s": reused, "cache_hits": int(hits)}
    return out


def _nice_step(span: float) -> float:
    raw = span / 5 if span > 0 else 1
    mag = 10 ** math.floor(math.log10(raw))
    return next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)


def timing_svg(rows: list[dict[str, Any]], width: int = 900) -> str:
    """Stacked horizontal bars, one per row: seconds per stage in pipeline order; cached stages pale."""
    stages = present_stages(rows)
    label_w, bar_h, gap, top = 200, 16, 6, 34
    plot_w = width - label_w - 20
    totals = [sum(r.get(f"seconds_{s}") or 0 for s in stages) for r in rows]
    span = max(totals + [1e-9])
    step = _nice_step(span)
    span = math.ceil(span / step) * step
    height = top + len(rows) * (bar_h + gap) + 30
    scale = plot_w / span
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="stage timing chart" '
             f'font-family="sans-serif" font-size="11">']
    x = label_w  # legend
    for s in stages:
        parts.append(f'<rect x="{x}" y="6" width="12" height="12" fill="{STAGE_COLORS[s]}"/>'
                     f'<text x="{x + 16}" y="16">{html.escape(s)}</text>')
        x += 24 + 7 * len(s)
    parts.append(f'<rect x="{x}" y="6" width="12" height="12" fill="#999" fill-opacity="0.3"/>'
                 f'<text x="{x + 16}" y="16">pale = reused from the cache</text>')
    y_axis = top + len(rows) * (bar_h + gap)
    tick = 0.0
    while tick <= span + 1e-9:
        tx = label_w + tick * scale
        parts.append(f'<line x1="{tx:.1f}" y1="{top - 4}" x2="{tx:.1f}" y2="{y_axis}" stroke="#ddd"/>'
                     f'<text x="{tx:.1f}" y="{y_axis + 14}" text-anchor="middle">{tick:g} s</text>')
        tick += step
    for i, row in enumerate(rows):
        y = top + i * (bar_h + gap)
        label = html.escape(str(row.get("job_id"))[:30])
        parts.append(f'<text x="{label_w - 6}" y="{y + bar_h - 4}" text-anchor="end">{label}</text>')
        x = label_w
        cached = set(row.get("cached_stages") or [])
        for s in stages:
            sec = row.get(f"seconds_{s}")
            if not sec:
                continue
            w = sec * scale
            opacity = "0.3" if s in cached else "1"
            title = f"{s}: {sec:.2f} s" + (" (cache hit)" if s in cached else "")
            parts.append(f'<rect x="{x:.1f}" y="{y}" width="{max(w, 0.5):.1f}" height="{bar_h}" '
                         f'fill="{STAGE_COLORS[s]}" fill-opacity="{opacity}" data-stage="{s}">'
                         f'<title>{html.escape(title)}</title></rect>')
            x += w
        if row.get("status") != "ok":
            parts.append(f'<text x="{x + 4:.1f}" y="{y + bar_h - 4}" fill="#c00">failed</text>')
    parts.append("</svg>")
    return "".join(parts)


CSS = """
body { font-family: sans-serif; margin: 24px; color: #222; }
h1 { font-size: 20px; margin: 0 0 4px 0; }
.summary span { display: inline-block; margin-right: 18px; }
.ok { color: #1a7f37; } .failed { color: #c00; font-weight: bold; }
table { border-collapse: collapse; margin-top: 12px; }
th, td { border-bottom: 1px solid #ddd; padding: 6px 8px; text-align: left; vertical-align: top; font-size: 13px; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.prompt { max-width: 360px; }
td.job { white-space: nowrap; }
.err { color: #c00; font-family: monospace; font-size: 12px; white-space: pre-wrap; max-width: 360px; }
.hit { color: #888; }
img.thumb { display: block; image-rendering: auto; }
"""


def render_html(rows: list[dict[str, Any]], output_dir: Path, title: str,
                thumbs: list[Image.Image]) -> str:
    stages = present_stages(rows)
    ok = sum(1 for r in rows if r.get("status") == "ok")
    totals = stage_totals(rows)
    e = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{e(title)}</title><style>{CSS}</style></head><body>",
           f"<h1>{e(title)}</h1>",
           f'<p class="summary"><span>{len(rows)} rows</span><span class="ok">{ok} ok</span>'
           f'<span class="{"failed" if ok < len(rows) else "ok"}">{len(rows) - ok} failed</span>'
           f'<span>output folder: {e(str(output_dir))}</span></p>']
    out.append("<table><tr><th>stage</th><th>seconds computed</th><th>seconds reused</th><th>cache hits</th></tr>")
    for s, t in totals.items():
        out.append(f'<tr><td>{e(s)}</td><td class="num">{t["computed_s"]:.2f}</td>'
                   f'<td class="num">{t["reused_s"]:.2f}</td><td class="num">{t["cache_hits"]}</td></tr>')
    out.append("</table><p style='font-size:12px;color:#666'>Sums over rows: an artifact shared by several rows "
               "(an identical prompt) counts in each.</p>")
    out.append("<h2 style='font-size:16px'>Stage timing</h2>")
    out.append(timing_svg(rows))
    out.append("<h2 style='font-size:16px'>Rows</h2><table><tr><th>preview</th><th>job</th><th>prompt</th>"
               "<th>status</th>" + "".join(f"<th>{e(s)} s</th>" for s in stages) + "</tr>")
    for row, thumb in zip(rows, thumbs):
        cached = set(row.get("cached_stages") or [])
        video = _video_path(row, output_dir)
        job = e(str(row.get("job_id")))
        job_cell = f'<a href="{e(video_href(video, output_dir))}">{job}</a>' if video else job
        status = row.get("status")
        status_cell = f'<span class="{"ok" if status == "ok" else "failed"}">{e(str(status))}</span>'
        if row.get("error"):
            status_cell += f'<div class="err">{e(str(row["error"]))}</div>'
        cells = []
        for s in stages:
            sec = row.get(f"seconds_{s}")
            if sec is None:
                cells.append('<td class="num">-</td>')
            elif s in cached:
                cells.append(f'<td class="num hit" title="reused from the cache">{sec:.2f} (cached)</td>')
            else:
                cells.append(f'<td class="num">{sec:.2f}</td>')
        out.append(f'<tr><td><img class="thumb" alt="{job}" src="{png_data_uri(thumb)}" width="{thumb.width}" '
                   f'height="{thumb.height}"></td><td class="job">{job_cell}<br><small>row {row.get("row")}, '
                   f'{e(str(row.get("task")))}, seed {row.get("seed")}</small></td>'
                   f'<td class="prompt">{e(str(row.get("prompt") or ""))}</td><td>{status_cell}</td>'
                   + "".join(cells) + "</tr>")
    out.append("</table></body></html>")
    return "\n".join(out)


def contact_sheet(rows: list[dict[str, Any]], thumbs: list[Image.Image], columns: int = 5) -> Image.Image:
    """A grid of thumbnails with the job id and status under each (failed in red)."""
    font = ImageFont.load_default()
    cols = max(1, min(columns, len(rows)))
    cell_w, cell_h, pad = THUMB + 16, THUMB + 44, 8
    n_rows = math.ceil(len(rows) / cols) if rows else 1
    sheet = Image.new("RGB", (cols * cell_w + pad, n_rows * cell_h + pad), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (row, thumb) in enumerate(zip(rows, thumbs)):
        x, y = pad + (i % cols) * cell_w, pad + (i // cols) * cell_h
        sheet.paste(thumb, (x + (THUMB - thumb.width) // 2, y + (THUMB - thumb.height) // 2))
        ok = row.get("status") == "ok"
        draw.text((x, y + THUMB + 4), str(row.get("job_id"))[:26], fill=(0, 0, 0), font=font)
        draw.text((x, y + THUMB + 18), "ok" if ok else "FAILED", fill=(20, 120, 40) if ok else (200, 0, 0),
                  font=font)
    return sheet


def write_report(output_dir: Path, html_name: str = "report.html",
                 sheet_name: str = "contact_sheet.png") -> tuple[Path, Path, list[dict[str, Any]]]:
    """Write the HTML report and the contact sheet into the output folder; returns their paths and the rows."""
    output_dir = Path(output_dir).resolve()
    rows = load_results(output_dir)
    thumbs = [thumbnail(r, output_dir) for r in rows]
    page = render_html(rows, output_dir, f"wan-batch report: {output_dir.name}", thumbs)
    html_path, sheet_path = output_dir / html_name, output_dir / sheet_name
    atomic_write_text(html_path, page)
    with atomic_path(sheet_path) as tmp:
        contact_sheet(rows, thumbs).save(tmp, format="PNG")
    return html_path, sheet_path, rows
