"""``python -m bench smoke`` (bench/suite.py): every load scenario at a tiny size, Locust's
included, must pass -- and must fail when one event is missing (the self-check publishes one
ticker message to a topic nobody reads, and makes Locust's publisher skip one number), so
that a counting that stopped seeing gaps cannot pass unnoticed.

Runs the real thing: a gateway on core 0, subscriber processes and Locust on core 1."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def smoke(out: Path, *extra: str) -> tuple[int, dict[str, object], str]:
    p = subprocess.run([sys.executable, "-m", "bench", "smoke", "--out", str(out), *extra], cwd=ROOT,
                       capture_output=True, text=True, timeout=170)
    doc = json.loads((out / "smoke.json").read_text()) if (out / "smoke.json").exists() else {}
    return p.returncode, doc, p.stderr[-4000:]


@pytest.mark.timeout(180)
def test_smoke_passes_with_every_scenario(tmp_path: Path) -> None:
    code, doc, err = smoke(tmp_path)
    assert code == 0, err
    runs = doc["runs"]
    assert {r["scenario"] for r in runs} >= {"RateSweepUser", "DirectedUser", "StormUser", "TickerUser"}
    assert {r["target"] for r in runs} == {"ssegw", "sse-starlette", "aiohttp-sse"}
    for r in runs:
        assert r["ok"], r
        windows = r["result"].get("steps") or [r["result"]]
        for w in windows:
            assert w["received_events"] == w["expected_events"] > 0, (r["scenario"], r["target"], w)
            assert w["seq_gaps"] == w["seq_dups"] == 0
    loc = doc["locust"]
    names = {s["Name"] for s in loc["stats"] if s["Type"] == "SSE" and int(s["Request Count"]) > 0}
    assert {"ticker", "user.*", "churn:ticker"} <= names, loc["stats"]
    assert loc["sse_failures"] == 0 and loc["exit_code"] == 0
    assert (tmp_path / "report.md").exists()
    assert {p.name for p in tmp_path.glob("*.png")} >= {"latency_vs_rate.png", "storm_timeline.png"}


@pytest.mark.timeout(180)
def test_smoke_fails_when_an_event_is_missing(tmp_path: Path) -> None:
    code, doc, err = smoke(tmp_path, "--inject-gap", "--targets", "ssegw")
    assert code == 1, err
    failed = "\n".join(doc["failed"])
    assert "RateSweepUser on ssegw" in failed and "missing" in failed, failed
    assert "locust" in failed and "SSE failures" in failed, failed
    gaps = [f for f in doc["locust"]["failures"] if "gap" in f["Error"]]
    assert gaps, doc["locust"]["failures"]
