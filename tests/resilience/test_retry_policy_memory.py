"""A route's compiled retry policy lives with the policy: replaced route tables (every RDS push
makes new policies) leave nothing behind in a module-level cache."""

from __future__ import annotations

import gc
import sys

from meshcore._route_model import RetryPolicy
from meshcore.resilience.retry import RetryState, retriable


def test_compiled_policy_dies_with_its_policy():
    policy = RetryPolicy(retry_on=("5xx", "unavailable"), num_retries=2)
    assert retriable(policy, 503, None, None)
    assert retriable(policy, 200, 14, None)  # grpc UNAVAILABLE
    assert not retriable(policy, 404, None, None)
    compiled = policy.compiled
    assert compiled is not None
    assert RetryState(policy).max_retries == 2 and policy.compiled is compiled  # compiled once
    assert sys.getrefcount(policy) == 2  # this name and getrefcount's argument: no cache holds it


def test_many_policies_do_not_accumulate():
    gc.collect()
    before = len(gc.get_objects())
    for i in range(5000):
        retriable(RetryPolicy(retry_on=("5xx",), num_retries=i % 3), 503, None, None)
    gc.collect()
    assert len(gc.get_objects()) - before < 500


def test_explain_shows_a_compiled_policy_without_its_cache():
    import json

    from meshcore.explain import _retry_policy

    policy = RetryPolicy(retry_on=("5xx",), num_retries=2)
    retriable(policy, 503, None, None)
    shown = json.loads(json.dumps(_retry_policy(policy)))
    assert shown["retry_on"] == ["5xx"] and shown["num_retries"] == 2 and "compiled" not in shown
