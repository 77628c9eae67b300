"""requests ``MeshAdapter``: what a Session does around the adapter keeps working -- cookies under
the logical host, auth, redirects from the upstream, retried bodies, the logical Host (also over a
user's Host header and a route's host rewrite), connection reuse per endpoint."""

from __future__ import annotations

import pytest
import requests

from meshcore.integrations.requests import MeshAdapter

from .conftest import HOST, TARGET, URL, resources, route
from .echo_upstream import EchoUpstream, header_values


@pytest.fixture
def echo():
    ups = [EchoUpstream() for _ in range(2)]
    yield ups
    for u in ups:
        u.close()


@pytest.fixture
def session(echo, make_mesh):
    routes = [
        {"name": "rewrite", "match": {"prefix": "/rewrite"},
         "route": {"cluster": "echo", "host_rewrite_literal": "rewritten.internal"}},
        route("/fail-once", "echo", retry={"retry_on": "5xx", "num_retries": 2}),
        route("/", "echo", timeout="5s", retry={"retry_on": "connect-failure", "num_retries": 2}),
    ]
    mesh = make_mesh(resources({"echo": [u.port for u in echo]}, routes))
    s = requests.Session()
    s.trust_env = False
    adapter = MeshAdapter(mesh)
    s.mount(URL, adapter)
    s.adapter = adapter  # type: ignore[attr-defined]
    yield s
    s.close()


def test_cookies_are_kept_under_the_logical_host_and_sent_back(session):
    r = session.get(f"{URL}/set-cookie/sid/abc")
    assert r.status_code == 200 and r.cookies.get("sid") == "abc"
    assert [(c.name, c.value, c.domain) for c in session.cookies] == [("sid", "abc", HOST)]
    for _ in range(2):  # both endpoints get the cookie: it belongs to the service, not an address
        body = session.get(f"{URL}/echo").json()
        assert header_values(body, "Cookie") == ["sid=abc"]


def test_auth_survives_a_same_host_redirect(session):
    session.auth = ("user", "secret")
    r = session.get(f"{URL}/redirect", params={"to": f"{URL}/landed"})
    assert r.status_code == 200 and r.url == f"{URL}/landed"
    assert [h.status_code for h in r.history] == [302] and r.history[0].url.startswith(f"{URL}/redirect?to=")
    body = r.json()
    assert body["path"] == "/landed" and header_values(body, "Host") == [TARGET]
    assert header_values(body, "Authorization") == ["Basic dXNlcjpzZWNyZXQ="]  # requests keeps it: same host
    r = session.get(f"{URL}/redirect", params={"to": "/relative"})  # relative Location: resolved on the logical URL
    assert r.url == f"{URL}/relative" and r.json()["path"] == "/relative"


def test_logical_host_replaces_a_users_host_header_and_follows_host_rewrite(session):
    body = session.get(f"{URL}/x", headers={"host": "spoofed.example"}).json()
    assert header_values(body, "Host") == [TARGET]
    body = session.get(f"{URL}/rewrite").json()
    assert header_values(body, "Host") == ["rewritten.internal"]


def test_retried_post_resends_the_body(session, echo):
    # each upstream fails its first one: the retry goes to the other host (fails too), the third succeeds
    r = session.post(f"{URL}/fail-once/a", data=b"payload", headers={"X-Trace": "1"})
    assert r.status_code == 200 and r.meshcore["attempts"] == 3
    sent = [(m, p, b) for u in echo for (m, p, _, b) in u.requests if p == "/fail-once/a"]
    assert sent == [("POST", "/fail-once/a", b"payload")] * 3
    assert header_values(r.json(), "X-Trace") == ["1"]


def test_one_kept_alive_connection_per_endpoint(session, echo):
    for i in range(10):
        assert session.get(f"{URL}/n/{i}").status_code == 200
    assert [u.connections for u in echo] == [1, 1]
    manager = session.adapter._pools.pools()["echo"]
    assert sorted(manager.by_attempt) == sorted(f"127.0.0.1:{u.port}" for u in echo)
    assert len(manager.pools) == 2


def test_timeout_argument_is_capped_by_the_route_and_keeps_requests_forms(session):
    # the tuple, float and urllib3 Timeout forms all reach urllib3 (as HTTPAdapter passes them)
    from urllib3.util import Timeout

    for t in (None, 3, (1, 2), Timeout(connect=1, read=2)):
        assert session.get(f"{URL}/t", timeout=t).status_code == 200
    with pytest.raises(ValueError):
        session.get(f"{URL}/t", timeout=(1, 2, 3))


def test_pool_settings_of_an_adapter_subclass_apply_to_endpoint_pools(tls_scenario, tls_files):
    """``build_connection_pool_key_attributes`` (requests' documented hook, e.g. for an
    ``ssl_context``) shapes the endpoint pools; the logical host stays the TLS name."""
    import ssl

    from .conftest import TLS_URL

    mesh, _ = tls_scenario
    ctx = ssl.create_default_context(cafile=tls_files["ca"])
    used = []

    class Custom(MeshAdapter):
        def build_connection_pool_key_attributes(self, request, verify, cert=None):
            host_params, kw = super().build_connection_pool_key_attributes(request, verify, cert)
            kw["ssl_context"] = ctx
            used.append(kw)
            return host_params, kw

    with requests.Session() as s:
        s.trust_env = False
        s.mount("https://", Custom(mesh))
        for _ in range(4):
            body = s.get(f"{TLS_URL}/secure").json()  # verified with the context's CA
            assert body["sni"] == HOST and body["host"] == f"{HOST}:8443"
    assert len(used) == 2  # once per endpoint pool, not per request
