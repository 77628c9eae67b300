"""``meshcore demo``: the whole scenario in a subprocess, its JSON results, and a clean exit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest


@pytest.fixture(scope="module")
def demo():
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "meshcore", "demo", "--json"], capture_output=True, text=True,
                          timeout=90, env=dict(os.environ, NO_COLOR="1"))
    wall = time.monotonic() - started
    return proc, wall


def test_demo_exits_zero_in_under_a_minute(demo):
    proc, wall = demo
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    assert wall < 60
    data = json.loads(proc.stdout)
    assert data["ok"] is True
    assert data["wall_seconds"] < 60
    assert data["leftover_threads"] == []


def test_every_check_holds(demo):
    data = json.loads(demo[0].stdout)
    assert set(data["scenarios"]) == {"canary_split", "header_routing", "least_request", "outlier_ejection",
                                      "live_push"}
    failed = {name: [c for c, ok in s["checks"].items() if not ok] for name, s in data["scenarios"].items()}
    assert not any(failed.values()), failed


def test_canary_and_header_routing(demo):
    s = json.loads(demo[0].stdout)["scenarios"]
    canary = s["canary_split"]
    assert abs(canary["canary_share"] - 0.10) <= 0.04
    assert sum(canary["counts"].values()) == canary["requests"] and canary["failures"] == 0
    header = s["header_routing"]
    assert header["v2"] == header["requests"] and header["routes"] == {"canary-header": header["requests"]}


def test_least_request_avoids_the_slow_instance(demo):
    lr = json.loads(demo[0].stdout)["scenarios"]["least_request"]
    assert lr["slow_share"] <= 0.15
    assert lr["round_robin"]["slow_share"] == pytest.approx(0.25, abs=0.02)
    assert lr["slow_share"] < lr["round_robin"]["slow_share"] / 2


def test_outlier_detection_ejects_and_traffic_moves(demo):
    od = json.loads(demo[0].stdout)["scenarios"]["outlier_ejection"]
    assert od["ejections_enforced_total"] >= 1
    assert od["attempts_to_failing_before_ejection"] == 3  # consecutive_5xx
    assert od["attempts_to_failing_after_ejection"] == 0
    assert od["upstream_rq_500"] >= 3 and od["upstream_rq_retry"] >= 3
    assert od["failures"] == 0
    assert od["returned_after_seconds"] is not None


def test_live_push_has_zero_failures(demo):
    push = json.loads(demo[0].stdout)["scenarios"]["live_push"]
    assert push["failures"] == 0 and push["requests"] > 0
    assert len(push["pushes"]) == 3 and all(p["applied_ms"] is not None for p in push["pushes"])
    final = push["phases"]["3"]
    assert set(final) <= {"reviews-v2-a", "reviews-v3-a"} and final.get("reviews-v3-a", 0) > 0
    assert all("reviews-v1-a" not in push["phases"].get(str(p), {}) for p in (2, 3))


def test_text_report():
    """The human report: every section and the verdict, no colour codes when not a terminal."""
    proc = subprocess.run([sys.executable, "-m", "meshcore", "demo", "--only", "header_routing"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "2. Header-based routing" in out and "[ok  ] 200/200 answered by v2" in out
    assert "all checks passed" in out and "\x1b[" not in out
