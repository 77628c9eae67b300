"""meshcore's upstream certificate checks decide exactly as real Envoy 1.40 does.

Differential test (``san_oracle.py``): every (SAN matcher set, server certificate) pair is one
Envoy cluster (``UpstreamTlsContext``: ``trusted_ca`` = the test root + the matchers) and one
``UpstreamTls`` in meshcore (roots = the same file, the same matchers as ``SanMatcherSpec``). A
verdict is "ok" or the ``ssl.*`` stat naming the rejection (``fail_verify_san`` for the SANs,
``fail_verify_error`` for the chain: expired, foreign CA), so the two tables must agree on the
reason as well as on accept/reject.

Envoy behaviours this pins (Envoy wins; meshcore's ``tls/san.py`` follows):

* DNS ``exact`` is ``dnsNameMatch``: ASCII case-insensitive whatever ``ignore_case`` says; the
  certificate's leftmost label may carry ONE ``*`` anywhere in it (``*.example.com``,
  ``ba*.example.net``, ``*z.example.io``), matching any run of characters in exactly one label,
  including an EMPTY one (``ba*`` accepts ``ba.example.net``; ``*.example.com`` accepts
  ``.example.com``); never in an A-label (``xn--*``), never with two ``*``, never a lone ``*``.
* IP SANs are compared as ``inet_ntop`` prints them, which for IPv4-mapped (``::ffff:a.b.c.d``)
  and IPv4-compatible (``::a.b.c.d``) addresses is the dotted form, not Python's hex form.
* typed and untyped matchers in one validation context: only the typed ones count (meshcore's
  decoder drops the untyped list; :func:`test_meshcore_decodes_the_same_matchers`).
"""

from __future__ import annotations

import ipaddress
import random
import socket
import sys
import time
from typing import Dict, List, Tuple

import pytest

from .pki import Pki
from .san_oracle import (CERTS, OK, MatcherSet, SanOracleEnvoy, TlsHttpServers, cluster_name, issue,
                         matcher_sets, meshcore_verdicts, san_specs, tls_cluster, write_leaf)


@pytest.fixture(scope="module")
def oracle(pki: Pki, tmp_path_factory: pytest.TempPathFactory):
    t0 = time.monotonic()
    d = str(tmp_path_factory.mktemp("san-oracle"))
    files = []
    for spec in CERTS:
        ca = pki.root if spec.issuer == "root" else pki.evil_root
        files.append((spec.name, *write_leaf(d, spec.name, issue(ca, spec))))
    servers = TlsHttpServers(files)
    sets = matcher_sets()
    pairs: List[Tuple[str, MatcherSet, int]] = []
    clusters = []
    where: Dict[str, Tuple[MatcherSet, int]] = {}
    for i, ms in enumerate(sets):
        vc = ms.validation_context(pki.root_file)
        for j, spec in enumerate(CERTS):
            name = cluster_name(i, j)
            port = servers.ports[spec.name]
            clusters.append(tls_cluster(name, port, vc))
            pairs.append((name, ms, port))
            where[name] = (ms, j)
    envoy = SanOracleEnvoy(clusters)
    try:
        envoy.start()
        names = [p[0] for p in pairs]
        theirs = envoy.verdicts(names)
        ours = meshcore_verdicts(pki.root_file, pairs)
        yield {"envoy": theirs, "meshcore": ours, "where": where, "sets": sets, "names": names,
               "seconds": time.monotonic() - t0}
    finally:
        envoy.close()
        servers.close()


def _row(name: str, where: Dict[str, Tuple[MatcherSet, int]]) -> str:
    ms, j = where[name]
    return f"{name}: set {ms.name!r} {ms.describe()} x cert {CERTS[j].name!r} {CERTS[j].describe()}"


@pytest.mark.envoy
def test_meshcore_decides_like_envoy(oracle) -> None:
    theirs, ours, where = oracle["envoy"], oracle["meshcore"], oracle["where"]
    harness = [f"{_row(n, where)}\n    envoy: {v}" for n, v in theirs.items()
               if v != OK and not v.startswith("ssl.")]
    assert not harness, "Envoy gave answers that are not a verdict:\n" + "\n".join(harness)
    diff = [f"{_row(n, where)}\n    envoy: {theirs[n]}   meshcore: {ours[n]}"
            for n in oracle["names"] if theirs[n] != ours[n]]
    accepted = sum(v == OK for v in theirs.values())
    print(f"\n{len(theirs)} pairs ({len(oracle['sets'])} matcher sets x {len(CERTS)} certificates): "
          f"{accepted} accepted, {len(theirs) - accepted} rejected; {oracle['seconds']:.1f}s")
    assert not diff, f"{len(diff)} disagreement(s) with Envoy:\n" + "\n".join(diff)
    # the table is not degenerate: plenty of both verdicts, both rejection reasons
    assert accepted > 60 and len(theirs) - accepted > 200
    assert {"ssl.fail_verify_san", "ssl.fail_verify_error"} <= set(theirs.values())


@pytest.mark.envoy
def test_chain_failures_are_rejected_whatever_the_matchers(oracle) -> None:
    theirs, ours, where = oracle["envoy"], oracle["meshcore"], oracle["where"]
    for name, (ms, j) in where.items():
        spec = CERTS[j]
        if spec.expired or spec.issuer != "root":
            assert theirs[name] == ours[name] == "ssl.fail_verify_error", _row(name, where)
        elif not ms.matchers:
            assert theirs[name] == ours[name] == OK, _row(name, where)  # no matchers: chain only


@pytest.mark.envoy
def test_spot_checks(oracle) -> None:
    """A few verdicts spelled out (what the table says, readable)."""
    theirs, ours = oracle["envoy"], oracle["meshcore"]
    index = {ms.name: i for i, ms in enumerate(oracle["sets"])}
    cert = {c.name: j for j, c in enumerate(CERTS)}

    def verdict(set_name: str, cert_name: str) -> str:
        n = cluster_name(index[set_name], cert[cert_name])
        assert theirs[n] == ours[n]
        return theirs[n]

    san = "ssl.fail_verify_san"
    assert verdict("dns-under-wildcard", "dns_wild") == OK
    assert verdict("dns-wildcard-misses", "dns_wild") == san
    assert verdict("dns-empty-label", "dns_wild") == OK               # '*' covers an empty label
    assert verdict("dns-partial-wildcard-head", "dns_partial") == OK  # ba*.example.net
    assert verdict("dns-partial-wildcard-empty", "dns_partial") == OK
    assert verdict("dns-wildcard-never", "dns_partial") == verdict("dns-wildcard-never", "dns_odd") == san
    assert verdict("dns-exact-casemiss", "dns_case") == OK            # DNS exact ignores case
    assert verdict("dns-suffix-casemiss", "dns_case") == san          # other kinds do not
    assert verdict("dns-prefix-casemiss-ic", "dns_case") == OK
    assert verdict("ip-v6-long", "ipv6") == san                       # text, not address, compare
    assert verdict("ip-v6-long-upper-ic", "ipv6") == san
    assert verdict("ip_address-exact-ic", "ipv6") == OK
    assert verdict("ip-v4-mapped-dotted", "ipv6_v4") == OK            # inet_ntop, not ipaddress
    assert verdict("ip-v4-mapped-hex", "ipv6_v4") == san
    assert verdict("ip-v4-compat-dotted", "ipv6_v4") == OK
    assert verdict("ip-low-hex", "ipv6_v4") == OK
    assert verdict("ip-nat64", "ipv6_v4") == OK
    assert verdict("dns-cn-only", "cn_only") == "ssl.fail_verify_san"
    assert verdict("empty", "cn_only") == OK
    assert verdict("typed-and-untyped", "dns_case") == san            # the untyped list is ignored


def test_meshcore_decodes_the_same_matchers() -> None:
    """The matchers the differential hands meshcore are what its xDS decoder makes of the very
    validation context Envoy got (roots from a provider instead of ``trusted_ca``, which meshcore
    does not take), including the typed-and-untyped case where the untyped list is ignored."""
    from meshcore.xds.cluster_config import cluster_spec

    for ms in matcher_sets():
        vc = ms.validation_context("/unused")
        del vc["trusted_ca"]
        vc["ca_certificate_provider_instance"] = {"instance_name": "root"}
        spec = cluster_spec(tls_cluster("c", 1, vc), {"root"})
        assert spec.tls is not None and spec.tls.san_matchers == san_specs(ms), ms.name


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc inet_ntop is the reference")
def test_ip_san_text_is_glibc_inet_ntop() -> None:
    """meshcore formats IPv6 SANs with its own copy of glibc's ``inet_ntop`` (Envoy's formatter
    on Linux), so it does not depend on the platform's or on ``ipaddress``'s (which prints
    ``::ffff:a00:1`` where glibc prints ``::ffff:10.0.0.1``)."""
    from meshcore.tls.san import peer_sans

    rnd = random.Random(5952)
    for _ in range(20000):
        packed = b"".join(rnd.choice((0, 0, 0, 1, 0xFFFF, rnd.randrange(65536))).to_bytes(2, "big") for _ in range(8))
        addr = ipaddress.IPv6Address(packed)
        shown = ":".join(f"{int.from_bytes(packed[i:i + 2], 'big'):X}" for i in range(0, 16, 2)) + "\n"  # _ssl's form
        got = peer_sans({"subjectAltName": (("IP Address", shown),)})["IP_ADDRESS"]
        assert got == [socket.inet_ntop(socket.AF_INET6, packed)], addr
