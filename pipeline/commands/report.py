"""wan-batch report: an HTML page and a PNG contact sheet of a batch, from its output folder."""
from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("report", help="write report.html and contact_sheet.png for a finished batch")
    p.add_argument("--output-dir", default="outputs", help="the batch's output folder (with results.parquet)")
    p.set_defaults(func=main)


def main(args) -> int:
    from ..errors import WanBatchError
    from ..report import write_report

    try:
        html_path, sheet_path, rows = write_report(Path(args.output_dir))
    except WanBatchError as e:
        print(f"error: {e}")
        return 2
    failed = [r for r in rows if r.get("status") != "ok"]
    print(f"{len(rows)} rows: {len(rows) - len(failed)} ok, {len(failed)} failed")
    for r in failed:
        print(f"  failed {r['job_id']}: {r.get('error')}")
    print(f"report: {html_path}\ncontact sheet: {sheet_path}")
    return 1 if failed else 0
