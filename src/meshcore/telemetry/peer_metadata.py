"""Istio's HTTP metadata exchange: ``x-envoy-peer-metadata`` / ``x-envoy-peer-metadata-id``.

A sidecar's ``io.istio.http.peer_metadata`` filter (istio/proxy source/extensions/filters/http/
peer_metadata/filter.cc, read at 9ba5437, the parent of the commit that moved the filters to
envoyproxy/envoy) sends, on every outbound request, its node ID in ``x-envoy-peer-metadata-id``
and its workload in ``x-envoy-peer-metadata``: standard base64 (Envoy's ``Base64::encode``, padded)
of a ``google.protobuf.Struct`` serialized deterministically (map keys sorted), built as
``convertWorkloadMetadataToStruct(convertStructToWorkloadMetadata(node.metadata, {}, node.locality))``
(extensions/common/metadata_object.cc):

* ``NAME`` (pod), ``NAMESPACE``, ``WORKLOAD_NAME``, ``CLUSTER_ID``, ``IDENTITY`` - each only when
  not empty;
* ``LABELS`` (always, possibly empty): ``service.istio.io/canonical-name``,
  ``service.istio.io/canonical-revision``, ``app`` (``app.kubernetes.io/name`` wins over ``app``
  on reading), ``version`` (``app.kubernetes.io/version`` wins);
* ``OWNER`` ``kubernetes://apis/apps/v1/namespaces/<ns>/<kind>s/<workload>`` when the node's
  OWNER names a pod, deployment, job or cronjob of that workload;
* ``REGION`` / ``AVAILABILITY_ZONE`` from the node's locality.

An inbound sidecar answers with its own pair only when the request carried them, and strips
them from what the application sees (``MXMethod::remove``). Readers decode without needing the
padding (``Base64::decodeWithoutPadding``).

:func:`local_exchange` makes the pair for this process's bootstrap node;
:func:`decode` / :func:`decode_cached` read a header value into the Struct as a dict (Istio's
keys); :func:`workload_of` turns such a dict (or an EDS endpoint's ``istio.workload``
``"name;namespace;canonical;revision;cluster"`` via :func:`from_endpoint`) into a
:class:`Workload`, the fields Istio's stats filter reads.
"""

from __future__ import annotations

import base64
import binascii
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple

from .._fast.exchange_py import PEER_HEADER, PEER_HEADER_ID, strip_peer_pairs as _strip_peer_pairs

__all__ = ["HEADER", "HEADER_ID", "Workload", "Exchange", "encode", "decode", "decode_cached", "workload_of",
           "from_endpoint", "struct_of", "local_workload", "local_exchange", "node_metadata", "strip_pairs"]

log = logging.getLogger(__name__)

#: the exchange's headers (lower-case; the request core's constants: it scans responses for them)
HEADER = PEER_HEADER
HEADER_ID = PEER_HEADER_ID

CANONICAL_NAME = "service.istio.io/canonical-name"
CANONICAL_REVISION = "service.istio.io/canonical-revision"
_APP_QUALIFIED = "app.kubernetes.io/name"
_VERSION_QUALIFIED = "app.kubernetes.io/version"
_OWNER_PREFIX = "kubernetes://apis/apps/v1/namespaces/"
_KINDS = ("pod", "deployment", "job", "cronjob")


@dataclass(frozen=True)
class Workload:
    """Istio's ``WorkloadMetadataObject``: what a peer's metadata says (empty string: not said)."""

    name: str = ""  # the instance (pod) name
    cluster_id: str = ""
    namespace: str = ""
    workload_name: str = ""
    canonical_name: str = ""
    canonical_revision: str = ""
    app_name: str = ""
    app_version: str = ""
    workload_type: str = ""  # "pod" | "deployment" | "job" | "cronjob" | "" (unknown)
    identity: str = ""
    region: str = ""
    zone: str = ""
    labels: Tuple[Tuple[str, str], ...] = field(default=())  # additional labels asked for

    @property
    def owner(self) -> Optional[str]:
        if not self.workload_type:
            return None
        return f"{_OWNER_PREFIX}{self.namespace}/{self.workload_type}s/{self.workload_name}"


def _parse_owner(owner: str, workload: str) -> str:
    """``parseOwner``: the kind in ``.../<kind>s/<workload>`` (``""`` when not one Istio knows)."""
    if len(owner) > len(workload) + 2:
        head = owner[:len(owner) - len(workload) - 2]
        last = head.rfind("/")
        if last >= 0:
            kind = head[last + 1:]
            if kind in _KINDS:
                return kind
    return ""


def _str(v: Any) -> str:
    return v if isinstance(v, str) else ""


def workload_of(fields: Mapping[str, Any], additional_labels: Iterable[str] = (),
                locality: Optional[Tuple[str, str]] = None) -> Workload:
    """``convertStructToWorkloadMetadata``: a Struct (as a dict with Istio's keys: a decoded
    header, or a bootstrap node's metadata) as a :class:`Workload`. ``locality``: the node's
    ``(region, zone)``, used where the Struct has none."""
    labels = fields.get("LABELS")
    labels = labels if isinstance(labels, Mapping) else {}
    app = _str(labels.get(_APP_QUALIFIED)) or _str(labels.get("app"))
    version = _str(labels.get(_VERSION_QUALIFIED)) or _str(labels.get("version"))
    extra = tuple((k, _str(labels.get(k))) for k in additional_labels if k in labels)
    workload = _str(fields.get("WORKLOAD_NAME"))
    region, zone = _str(fields.get("REGION")), _str(fields.get("AVAILABILITY_ZONE"))
    if locality is not None:
        region = region or locality[0] or ""
        zone = zone or locality[1] or ""
    return Workload(name=_str(fields.get("NAME")), cluster_id=_str(fields.get("CLUSTER_ID")),
                    namespace=_str(fields.get("NAMESPACE")), workload_name=workload,
                    canonical_name=_str(labels.get(CANONICAL_NAME)),
                    canonical_revision=_str(labels.get(CANONICAL_REVISION)), app_name=app, app_version=version,
                    workload_type=_parse_owner(_str(fields.get("OWNER")), workload),
                    identity=_str(fields.get("IDENTITY")), region=region, zone=zone, labels=extra)


def struct_of(w: Workload) -> Dict[str, Any]:
    """``convertWorkloadMetadataToStruct``: the Struct (as a dict) a sidecar sends for ``w``."""
    out: Dict[str, Any] = {}
    if w.name:
        out["NAME"] = w.name
    if w.namespace:
        out["NAMESPACE"] = w.namespace
    if w.workload_name:
        out["WORKLOAD_NAME"] = w.workload_name
    if w.cluster_id:
        out["CLUSTER_ID"] = w.cluster_id
    if w.identity:
        out["IDENTITY"] = w.identity
    labels: Dict[str, str] = {}
    if w.canonical_name:
        labels[CANONICAL_NAME] = w.canonical_name
    if w.canonical_revision:
        labels[CANONICAL_REVISION] = w.canonical_revision
    if w.app_name:
        labels["app"] = w.app_name
    if w.app_version:
        labels["version"] = w.app_version
    for k, v in w.labels:
        labels[k] = v
    out["LABELS"] = labels
    owner = w.owner
    if owner is not None:
        out["OWNER"] = owner
    if w.region:
        out["REGION"] = w.region
    if w.zone:
        out["AVAILABILITY_ZONE"] = w.zone
    return out


def from_endpoint(encoding: str) -> Optional[Workload]:
    """``convertEndpointMetadata``: an EDS endpoint's ``filter_metadata.istio.workload``
    (``"workload;namespace;canonical-name;canonical-revision;cluster-id"``, istiod's
    ``AppendLbEndpointMetadata``); ``None`` with fewer than five fields."""
    parts = encoding.split(";")
    if len(parts) < 5:
        return None
    return Workload(cluster_id=parts[4], namespace=parts[1], workload_name=parts[0], canonical_name=parts[2],
                    canonical_revision=parts[3])


# -- the wire form -----------------------------------------------------------------------------------


def _to_value(v: Any, out: Any) -> None:
    if isinstance(v, str):
        out.string_value = v
    elif isinstance(v, bool):
        out.bool_value = v
    elif isinstance(v, (int, float)):
        out.number_value = float(v)
    elif v is None:
        out.null_value = 0
    elif isinstance(v, Mapping):
        st = out.struct_value
        st.SetInParent()
        for k, x in v.items():
            _to_value(x, st.fields[str(k)])
    elif isinstance(v, (list, tuple)):
        lv = out.list_value
        lv.SetInParent()
        for x in v:
            _to_value(x, lv.values.add())
    else:
        raise TypeError(f"not representable in a google.protobuf.Struct: {type(v).__name__}")


def _from_value(v: Any) -> Any:
    kind = v.WhichOneof("kind")
    if kind == "string_value":
        return v.string_value
    if kind == "struct_value":
        return {k: _from_value(x) for k, x in v.struct_value.fields.items()}
    if kind == "number_value":
        return v.number_value
    if kind == "bool_value":
        return v.bool_value
    if kind == "list_value":
        return [_from_value(x) for x in v.list_value.values]
    return None


def encode(fields: Mapping[str, Any]) -> str:
    """A Struct (dict) as ``x-envoy-peer-metadata``'s value: base64 (padded) of its deterministic
    serialization, as ``MXPropagationMethod::computeValue``."""
    from google.protobuf import struct_pb2

    st = struct_pb2.Struct()
    for k, v in fields.items():
        _to_value(v, st.fields[k])
    return base64.b64encode(st.SerializeToString(deterministic=True)).decode("ascii")


def decode(value: Any) -> Optional[Dict[str, Any]]:
    """``x-envoy-peer-metadata``'s value as the Struct it carries (a dict; ``None``: not base64 of
    a Struct). Padding is optional, as with Envoy's ``Base64::decodeWithoutPadding``."""
    from google.protobuf import message, struct_pb2

    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("latin-1")
    if not isinstance(value, str):
        return None
    s = value.strip().rstrip("=")
    if not s:
        return None
    try:
        raw = base64.b64decode(s + "=" * (-len(s) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None
    st = struct_pb2.Struct()
    try:
        st.ParseFromString(raw)
    except message.DecodeError:
        return None
    return {k: _from_value(v) for k, v in st.fields.items()}


_CACHE_MAX = 1024
_cache: Dict[str, Optional[Dict[str, Any]]] = {}
_cache_lock = threading.Lock()


def decode_cached(value: Any) -> Optional[Dict[str, Any]]:
    """:func:`decode`, kept per header value (a peer sends the same value on every response; the
    sidecar keeps its decoded peers per ``x-envoy-peer-metadata-id``). The dict returned is shared:
    do not change it."""
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("latin-1")
    found = _cache.get(value, _cache)
    if found is not _cache:
        return found  # type: ignore[return-value]
    decoded = decode(value)
    with _cache_lock:
        if len(_cache) >= _CACHE_MAX:  # (values callers send: start again rather than stop caching;
            _cache.clear()            # the dicts already handed out stay valid where they are held)
        _cache[value] = decoded
    return decoded


# -- this process's side -------------------------------------------------------------------------------


def node_metadata(node: Any) -> Dict[str, Any]:
    """A bootstrap ``Node``'s metadata Struct as a dict (``{}`` without one)."""
    if node is None or not node.HasField("metadata"):
        return {}
    return {k: _from_value(v) for k, v in node.metadata.fields.items()}


def _locality(node: Any) -> Optional[Tuple[str, str]]:
    if node is None or not node.HasField("locality"):
        return None
    return node.locality.region, node.locality.zone


def local_workload(node: Any, metadata: Optional[Mapping[str, Any]] = None) -> Workload:
    """This process's :class:`Workload`: the bootstrap node's metadata (what pilot-agent writes for a
    proxyless pod: WORKLOAD_NAME, NAMESPACE, LABELS, CLUSTER_ID, OWNER, ...) and locality;
    ``metadata`` replaces the node's metadata when given."""
    md = dict(metadata) if metadata is not None else node_metadata(node)
    return workload_of(md, (), _locality(node))


class Exchange:
    """The pair of request headers this process sends (``headers``: ``(name, value)`` str pairs;
    ``headers_bytes``: the same as bytes), made once."""

    __slots__ = ("node_id", "value", "headers", "headers_bytes", "workload")

    def __init__(self, node_id: str, workload: Workload) -> None:
        self.node_id = node_id
        self.workload = workload
        self.value = encode(struct_of(workload))
        pairs = [(HEADER, self.value)]
        if node_id:
            pairs.insert(0, (HEADER_ID, node_id))
        self.headers: Tuple[Tuple[str, str], ...] = tuple(pairs)
        self.headers_bytes: Tuple[Tuple[bytes, bytes], ...] = tuple(
            (k.encode("ascii"), v.encode("latin-1")) for k, v in pairs)

    def __repr__(self) -> str:
        return f"Exchange({self.node_id!r}, {self.workload.workload_name!r})"


def local_exchange(node: Any, metadata: Optional[Mapping[str, Any]] = None) -> Exchange:
    """The :class:`Exchange` of the bootstrap ``node`` (its ID and metadata)."""
    return Exchange(node.id if node is not None else "", local_workload(node, metadata))


#: ``(pairs without the exchange headers, the x-envoy-peer-metadata value or None)`` of a response's
#: header pairs (str or bytes names, any case); the same list when it has neither (the pure twin's;
#: the client integrations use the compiled one where it is built: ``integrations._strip_peer_pairs``)
strip_pairs = _strip_peer_pairs
