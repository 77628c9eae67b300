"""Absolute http(s) URLs split into what routing needs, cached (services call few distinct URLs)."""

from __future__ import annotations

from typing import Dict, Tuple

__all__ = ["parse_url", "split_url"]


def split_url(url: str) -> Tuple[str, str, str]:
    """``(scheme, netloc, path with query)`` of an absolute http(s) URL."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("http", "https"):
        raise ValueError(f"not an http(s) URL: {url!r}")
    slash = rest.find("/")
    query = rest.find("?")
    cut = min(i for i in (slash, query, len(rest)) if i >= 0)
    netloc, path = rest[:cut], rest[cut:]
    if not path.startswith("/"):
        path = "/" + path
    return scheme, netloc, path.split("#", 1)[0]


#: url -> parse_url(url); read directly by the request path (one dict lookup per request)
URL_CACHE: Dict[str, Tuple[str, str, str, str]] = {}
_URL_CACHE_MAX = 4096


def parse_url(url: str) -> Tuple[str, str, str, str]:
    """``(scheme, netloc, path, target)``: :func:`split_url` plus the ``host:port`` target
    ``Mesh.request`` derives (default ports 80/443). Cached."""
    cached = URL_CACHE.get(url)
    if cached is not None:
        return cached
    scheme, netloc, path = split_url(url)
    target = netloc if ":" in netloc.rsplit("]", 1)[-1] else f"{netloc}:{443 if scheme == 'https' else 80}"
    if len(URL_CACHE) >= _URL_CACHE_MAX:
        URL_CACHE.clear()
    parsed = URL_CACHE[url] = (scheme, netloc, path, target)
    return parsed
