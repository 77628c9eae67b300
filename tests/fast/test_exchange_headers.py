"""Istio's metadata exchange headers in a response (``strip_peer_pairs``, ``note_response``): the
compiled twin (``call_c``, a byte loop) and the pure one (``exchange_py``) agree on generated
header lists -- str and bytes names in any case, near-miss names of the same lengths, repeats,
both headers, neither -- and on what they tell telemetry."""

from __future__ import annotations

import random
from importlib import import_module
from typing import Any, List, Tuple

import pytest

from meshcore._fast import call_py, exchange_py
from meshcore.telemetry import peer_metadata

NAMES = ["x-envoy-peer-metadata", "x-envoy-peer-metadata-id", "content-type", "date", "x-envoy-peer-metadatx",
         "y-envoy-peer-metadata-id", "x-envoy-peer-metadata-iD", "x-envoy-upstream-service-time", "server",
         "x-envoy-peer-metadat\u00e4", "x-envoy-peer-metadata-\u00efd"]  # (non-ASCII near misses, latin-1)


def _case(rng: random.Random, name: str) -> str:
    return "".join(ch.upper() if rng.random() < 0.3 else ch for ch in name)


def _pairs(rng: random.Random) -> Any:
    as_bytes = rng.random() < 0.5
    pairs: List[Tuple[Any, Any]] = []
    for _ in range(rng.randrange(0, 9)):
        name = _case(rng, rng.choice(NAMES))
        value = rng.choice(["", "v", "Cg0KBWxhYmVs", "é"])
        if as_bytes:
            pairs.append((name.encode("latin-1"), value.encode("latin-1")))
        else:
            pairs.append((name, value))
    return pairs if rng.random() < 0.8 else tuple(pairs)


def _reference(pairs: Any) -> Tuple[Any, Any]:
    """What the header rule says, written plainly: names compared lower-cased."""
    names = [(k if isinstance(k, str) else k.decode("latin-1")).lower() for k, _ in pairs]
    if not any(n in (exchange_py.PEER_HEADER, exchange_py.PEER_HEADER_ID) for n in names):
        return pairs, None
    values = [v for n, (_, v) in zip(names, pairs) if n == exchange_py.PEER_HEADER]
    value = values[0] if values else None
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    kept = [p for n, p in zip(names, pairs) if n not in (exchange_py.PEER_HEADER, exchange_py.PEER_HEADER_ID)]
    return kept, value


def test_constants_are_telemetrys(impl):
    mod = import_module(f"meshcore._fast.call_{impl}")
    assert (mod.PEER_HEADER, mod.PEER_HEADER_ID) == (peer_metadata.HEADER, peer_metadata.HEADER_ID)
    from meshcore import integrations
    from meshcore._fast import IMPLEMENTATION

    assert peer_metadata.strip_pairs is exchange_py.strip_peer_pairs is call_py.strip_peer_pairs
    assert integrations._strip_peer_pairs.__module__.endswith("call_c" if IMPLEMENTATION == "c" else "exchange_py")


def test_strip_matches_the_rule_and_the_other_twin(impl):
    mod = import_module(f"meshcore._fast.call_{impl}")
    rng = random.Random(16)
    found = 0
    for _ in range(3000):
        pairs = _pairs(rng)
        got = mod.strip_peer_pairs(pairs)
        assert got == _reference(pairs), pairs
        assert got == call_py.strip_peer_pairs(pairs)
        if got[0] is pairs:
            assert got[1] is None
        else:
            found += 1
            assert type(got[0]) is list
    assert found > 500  # (the generator makes both kinds)


def test_other_name_types(impl):
    mod = import_module(f"meshcore._fast.call_{impl}")

    class Name(str):
        pass

    pairs = [(Name("X-Envoy-Peer-Metadata"), "v"), (bytearray(b"x-envoy-peer-metadata-id"), b"id"),
             (memoryview(b"date"), b"d")]
    kept, value = mod.strip_peer_pairs(pairs)
    assert value == "v" and len(kept) == 1 and bytes(kept[0][0]) == b"date"
    with pytest.raises(TypeError):
        mod.strip_peer_pairs([(7, "x")])  # a name without a length: the caller's mistake, as before


class _Response:
    def __init__(self, headers: Any) -> None:
        self.headers = headers


class _Attempt:
    telemetry: Any = None


def test_note_response(impl):
    mod = import_module(f"meshcore._fast.call_{impl}")
    rng = random.Random(7)
    for _ in range(500):
        pairs = _pairs(rng)
        strip = rng.random() < 0.7
        r, a = _Response(pairs), _Attempt()
        mod.note_response(a, r, 12, strip)
        kept, value = _reference(pairs) if strip else (pairs, None)
        assert r.headers == kept and (r.headers is pairs) == (kept is pairs)
        assert a.telemetry == {"peer_metadata": value, "request_bytes": None, "response_bytes": 12}


@pytest.mark.parametrize("pairs", [
    [("x-envoy-peer-metadata",)],  # a pair without a value
    [("date", "d"), ("x-envoy-peer-metadata", "v", "extra")],  # three items
    [("x-envoy-peer-metadata-id", "i"), ("date",)],
    [("x-envoy-peer-metadata", "v"), ""],  # an empty "pair"
])
def test_malformed_pairs_raise_value_error(impl, pairs):
    """A pair that is not two items is a ValueError on both twins (as the unpacking of the old
    ``strip_pairs``), not an IndexError nor silently truncated."""
    mod = import_module(f"meshcore._fast.call_{impl}")
    with pytest.raises(ValueError):
        mod.strip_peer_pairs(pairs)


@pytest.mark.parametrize("value", [10 ** 30, -1, 5, 1 << 40, 1.5, ["a"], object()])
def test_peer_value_not_str_or_bytes_like_is_type_error(impl, value):
    """The peer metadata value is a str or bytes-like: an int is not taken as ``bytes(size)`` (a
    huge one raised OverflowError or allocated that many zero bytes); both twins raise TypeError."""
    mod = import_module(f"meshcore._fast.call_{impl}")
    with pytest.raises(TypeError):
        mod.strip_peer_pairs([("x-envoy-peer-metadata", value), ("date", "d")])
    r, a = _Response([(b"X-Envoy-Peer-Metadata", value)]), _Attempt()
    with pytest.raises(TypeError):
        mod.note_response(a, r, 0, True)


def test_bytes_like_values(impl):
    mod = import_module(f"meshcore._fast.call_{impl}")
    for v in (b"\xe9v", bytearray(b"\xe9v"), memoryview(b"\xe9v")):
        assert mod.strip_peer_pairs([("x-envoy-peer-metadata", v)]) == ([], "\xe9v")


def test_request_scan_takes_no_int_for_a_size():
    """The request scan (telemetry's bytes and gRPC-ness of a request) on hostile header values:
    an int value is not a size (``bytes(n)``), an infinite content-length counts 0; never an
    exception other than the documented TypeError/ValueError to the caller, and no huge
    allocation."""
    from meshcore._fast._outcome import _scan_request, _scan_response, _text

    assert _scan_request([("content-length", float("inf")), ("content-type", 10**30)]) == (0, None, False)
    assert _scan_request([("x-request-id", 1 << 40)]) == (0, None, False)
    assert _scan_request({"content-length": "12", "content-type": b"application/grpc"}) == (12, None, True)
    with pytest.raises(TypeError):
        _text(5)

    class Resp:
        headers = {"content-length": float("inf")}

    assert _scan_response(Resp()) == (0, None)


REQUEST_NAMES = ["content-length", "content-type", "Content-Length", "CONTENT-TYPE", "content-lengtH",
                 "content-lenGth", "contenT-type", "x-custom-value", "x-req-id-value", "content_type",
                 "\u212aontent-type", "content-\u0130ype", "c\u0131ntent-type", "conte\u212at-type",
                 "x-envoy-peer-metadata", "te"]
REQUEST_VALUES = ["application/grpc", "application/GRPC", "Application/Grpc+proto", "application/grpc;charset=x",
                  "application/grpcx", "application/grpc-web", "application/json", "APPLICATION/GRPC+",
                  "applicat\u0130on/grpc", "application/grp\u212a", "application/grpc\u0130", "application/grp",
                  "", "12", "0", "-3", " 7", "9007199254740993", "1e3", "abc", "\u0661\u0662"]


def _request_headers(rng: random.Random) -> Any:
    pairs = [(rng.choice(REQUEST_NAMES), rng.choice(REQUEST_VALUES)) for _ in range(rng.randrange(0, 6))]
    shape = rng.random()
    if shape < 0.4:
        return dict(pairs)
    return pairs if shape < 0.8 else tuple(pairs)


def _request_reference(headers: Any) -> Tuple[Any, bool]:
    """The rule written plainly: names and the content-type compared lower-cased; the last
    content-length / content-type wins."""
    pairs = headers.items() if isinstance(headers, dict) else headers
    length, grpc = 0, False
    for k, v in pairs:
        name = k.lower()
        if name == "content-length":
            try:
                n = int(v)
                length = n if 0 <= n < 2 ** 53 else 0
            except ValueError:
                pass
        elif name == "content-type":
            ct = v.lower()
            grpc = ct == "application/grpc" or ct.startswith(("application/grpc+", "application/grpc;"))
    return length, grpc


def test_request_facts_twins_agree():
    """The compiled request scan (no lowered copies: an ASCII compare with the Kelvin sign's and
    dotted I's lowering rules) and the pure one give the same (length, gRPC) as the plain rule on
    generated headers: dicts and pairs, names and content-types in any case, non-ASCII near misses."""
    from meshcore._fast import call_c

    rng = random.Random(1607)
    for _ in range(4000):
        headers = _request_headers(rng)
        want = _request_reference(headers)
        assert call_c.request_facts(headers) == want, headers
        assert call_py.request_facts(headers) == want, headers


class _Grows:
    """A content-length whose ``int()`` adds a header to the dict being scanned."""

    def __init__(self, headers: Any) -> None:
        self.headers = headers
        self.calls = 0

    def __int__(self) -> int:
        self.calls += 1
        self.headers[f"x-added-{self.calls}"] = "1"
        return 5

    __index__ = __int__


def _outcome(facts: Any, headers: Any) -> Any:
    try:
        return facts(headers)
    except Exception as e:  # noqa: BLE001
        return type(e).__name__


@pytest.mark.parametrize("make", [
    lambda: {"x-request-id": 5, "content-length": "10"},  # (the pure scan stops at a non-text request ID)
    lambda: [("X-Request-Id", None), ("content-type", "application/grpc")],
    lambda: (("x-request-id", b"id"), ("content-length", "3")),
    lambda: {"content-length": "3", "content-type": "application/grpc", "x-request-id": object()},
], ids=["dict", "pairs", "bytes-id", "id-last"])
def test_request_facts_read_a_request_id_as_the_pure_scan(make):
    from meshcore._fast import call_c

    assert _outcome(call_c.request_facts, make()) == _outcome(call_py.request_facts, make())


def test_request_facts_of_a_dict_changed_during_the_scan():
    """A content-length's own ``int()`` changing the dict: the pure scan's dict iteration raises
    RuntimeError, the compiled one too (the value's code runs once, in the Python walk)."""
    from meshcore._fast import call_c

    seen = []
    for facts in (call_c.request_facts, call_py.request_facts):
        headers = {"content-type": "application/grpc", "content-length": None, "te": "trailers"}
        value = headers["content-length"] = _Grows(headers)
        seen.append((_outcome(facts, headers), value.calls))
    assert seen[0] == seen[1] == ("RuntimeError", 1)
