"""`wan-batch bench-service` against a local `wan-batch serve` on the embedded model (loopback only, bounded in
requests and time): every request completes, the numbers it prints and saves are consistent."""
from __future__ import annotations

import json

import pytest

from conftest import write_config
from test_service import Server

pytestmark = pytest.mark.slow


def test_bench_service_two_concurrent_users(tmp_path, tiny_root, capsys):
    from pipeline.cli import main
    from pipeline.commands.bench_service import percentile

    config = write_config(tmp_path / "small.json", target_video_length=5, target_height=32, target_width=32,
                          text_len=16)
    srv = Server(tmp_path / "svc", tmp_path / "store", "--config", str(config), "--batch-max", "4").start()
    try:
        code = main(["bench-service", "--url", srv.url, "--concurrent", "--users", "2", "--requests", "4",
                     "--infer-steps", "2", "--deadline", "300", "--save", str(tmp_path / "results.json")])
    finally:
        srv.stop()
    out = capsys.readouterr().out
    assert code == 0, out
    doc = json.loads((tmp_path / "results.json").read_text())
    s = doc["summary"]
    assert s["requests"] == s["completed"] == 4 and s["success_rate"] == 1.0 and s["users"] == 2
    lat = s["latency_s"]
    assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["max"]
    assert {r["user"] for r in doc["requests"]} == {0, 1}
    assert all(r["finished"] > r["submitted"] for r in doc["requests"])
    assert doc["queue_depth"] and s["max_queue_depth"] >= 1
    assert "completed             4 (100%)" in out and "latency p50/p90/p99" in out
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0 and percentile([1.0, 2.0, 3.0, 4.0], 99) == 4.0
