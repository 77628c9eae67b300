"""Review: gunicorn's RAW_URI keeps an absolute-form request target (``GET http://h/admin``)
while PATH_INFO is ``/admin``; RBAC must see ``/admin`` as Envoy's HTTP/1 codec does, not the
whole URL (a DENY on ``/admin`` would otherwise let the request through to the app)."""

from __future__ import annotations

from .test_integrations_local import deny, engine, wsgi_call, wsgi_echo
from meshcore.integrations.wsgi import MeshWsgiMiddleware


def test_absolute_form_raw_uri_is_denied_by_path_rule() -> None:
    mw = MeshWsgiMiddleware(wsgi_echo, rbac=engine(deny([{"url_path": {"path": {"prefix": "/admin"}}}])))
    assert wsgi_call(mw, "/admin")[0] == "403 Forbidden"
    assert wsgi_call(mw, "/admin", RAW_URI="/admin")[0] == "403 Forbidden"
    for raw in ("http://example.com/admin", "HTTP://example.com:80/admin?x=1", "https://example.com/admin"):
        assert wsgi_call(mw, "/admin", RAW_URI=raw)[0] == "403 Forbidden", raw
        assert wsgi_call(mw, "/admin", REQUEST_URI=raw)[0] == "403 Forbidden", raw
    assert wsgi_call(mw, "/ok", RAW_URI="http://example.com/ok")[0] == "200 OK"
