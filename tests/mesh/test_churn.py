"""Under churn (EDS every 10 ms, RDS every 100 ms, a cluster removed/re-added every 500 ms) a
meshcore client that lags a little (8 ms per update) sees every change within a bound, loses no
subscription change, and the control plane never has two responses of a type outstanding.
Figures for longer runs: ``python -m tests.mesh.churn --seconds 10``."""

from __future__ import annotations

import pytest

from .churn import run_churn

BOUND = 0.5  # seconds from a store change to the mesh publishing it (before the fix: up to 6 s)


@pytest.mark.parametrize("mode", ["sotw", "delta"])
def test_churn_is_followed_promptly(mode):
    result = run_churn(mode, seconds=2.0, settle=0.5, lag=0.008)
    report = result.report()
    assert result.double_outstanding == [], report
    assert result.lost_subscriptions == [], report
    assert result.changes["EDS"] > 100 and result.changes["RDS"] >= 15 and result.changes["cluster re-added"] >= 2
    for kind in ("EDS", "RDS", "cluster re-added"):
        assert result.unseen[kind] == 0, report
        assert result.max_delay(kind) < BOUND, report
