"""The xDS bootstrap: which control plane to talk to, how, and who this node is.

:meth:`Bootstrap.load` reads the bootstrap the way gRPC does: ``GRPC_XDS_BOOTSTRAP`` (a file
path) wins over ``GRPC_XDS_BOOTSTRAP_CONFIG`` (the JSON itself). A path or an already-parsed
mapping can also be passed directly. Two formats are accepted:

* **gRPC bootstrap JSON** (grpc/grpc ``doc/grpc_xds_bootstrap_format.md``; gRFCs A27, A47, A65,
  A71): ``xds_servers`` (ordered: the first is the primary, the rest are A71 fallbacks),
  ``node``, ``certificate_providers``, ``server_listener_resource_name_template``,
  ``client_default_listener_resource_name_template`` and ``authorities``. Unknown fields are
  ignored at every level (A27), so Istio's generated files with ``"UserAgentVersionType": null``
  or the ``"localisty"`` typo load. One meshcore extension is read: a top-level
  ``"meshcore": {"api_type": "DELTA_GRPC"}`` asks for the incremental (delta) ADS variant;
  the default is ``"GRPC"`` (state of the world). gRPC itself ignores the key.
* **Envoy bootstrap** (JSON, or YAML when the file name ends in ``.yaml``/``.yml``; YAML needs
  pyyaml), recognised by ``dynamic_resources``/``static_resources`` without ``xds_servers``.
  ``dynamic_resources.ads_config`` is required. Its ``api_type`` (GRPC or DELTA_GRPC; the
  AGGREGATED_ variants map to those) becomes :attr:`Bootstrap.api_type`. The first
  ``grpc_services`` entry gives the server: ``envoy_grpc.cluster_name`` names a static cluster
  whose first endpoint address is used (``socket_address`` becomes ``host:port``, ``pipe``
  becomes ``unix:``), or ``google_grpc.target_uri`` is used as is. Credentials are insecure; a
  cluster with a TLS transport socket (or ``google_grpc`` channel credentials) is rejected,
  because Envoy's TLS settings do not map onto grpcio's. ``node`` is read as in gRPC bootstraps.

Every problem raises :class:`BootstrapError` (a :class:`~meshcore.errors.ConfigError`) whose
``resource`` is the bootstrap's source (the file path, ``"GRPC_XDS_BOOTSTRAP_CONFIG"`` or
``"<dict>"``) and whose ``field`` is the JSON path, e.g. ``xds_servers[0].channel_creds``.

Channel credentials: the first *supported* ``channel_creds`` entry wins, as in gRPC. meshcore
supports ``insecure`` and ``tls`` (A65: ``ca_certificate_file``, unset meaning grpcio's default
roots; ``certificate_file`` and ``private_key_file``, both or neither, for mTLS). The files are
read each time :meth:`XdsServer.channel_credentials` is called, so calling it again on reconnect
picks up rotated files; ``refresh_interval`` is not acted on here. ``google_default`` and
anything else is skipped. ``call_creds`` (A97) are not supported and are ignored with a warning.
Relative file paths are relative to the process's working directory, as in gRPC.

The node sent to the control plane is the bootstrap's ``id``, ``cluster``, ``locality`` and
``metadata`` (a ``google.protobuf.Struct``); meshcore fills ``user_agent_name``,
``user_agent_version`` and ``client_features`` itself (A27), ignoring any bootstrap values. It
does not send ``envoy.lb.does_not_support_overprovisioning``: meshcore honours the
overprovisioning factor.

**Node shapes.** :meth:`Bootstrap.for_shape` gives the bootstrap a node for one of
:data:`SHAPES`: ``"grpc"`` (the proxyless shape; the bootstrap unchanged, so an Istio agent's
``GENERATOR: grpc`` makes istiod use its gRPC generator) or ``"envoy"`` (meshcore consumes what
istiod writes for an Envoy *sidecar*): :func:`sidecar_node` drops ``GENERATOR`` and adds what
istio-agent puts in a sidecar's node (id ``sidecar~<ip>~<pod>.<ns>~<ns>.svc.cluster.local``,
``NAMESPACE``, ``LABELS``, ``ISTIO_VERSION``, ``INSTANCE_IPS``, ``SERVICE_ACCOUNT``, every
``ISTIO_META_*`` variable such as ``CLUSTER_ID``, ``MESH_ID``, ``WORKLOAD_NAME``, ``POD_PORTS``),
derived from the environment as the agent does it (istio/istio ``pkg/bootstrap/config.go``
``GetNodeMetaData``, ``pilot/cmd/pilot-agent/app/cmd.go`` ``initProxy``). Whatever the bootstrap
already has wins over the environment.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union
from urllib.parse import quote, unquote, urlsplit

from envoy.config.core.v3 import base_pb2
from google.protobuf import json_format

from ..errors import ConfigError

if TYPE_CHECKING:
    import grpc  # imported by channel_credentials (loading a bootstrap needs no grpc)

__all__ = [
    "API_TYPES",
    "CLIENT_FEATURES",
    "DEFAULT_ISTIO_VERSION",
    "POD_INFO_DIR",
    "SHAPES",
    "ENV_BOOTSTRAP_CONFIG",
    "ENV_BOOTSTRAP_FILE",
    "SUPPORTED_CHANNEL_CREDS",
    "Authority",
    "Bootstrap",
    "BootstrapError",
    "CertificateProvider",
    "ChannelCreds",
    "XdsServer",
    "node_for_shape",
    "sidecar_node",
]

logger = logging.getLogger(__name__)

ENV_BOOTSTRAP_FILE = "GRPC_XDS_BOOTSTRAP"
ENV_BOOTSTRAP_CONFIG = "GRPC_XDS_BOOTSTRAP_CONFIG"

#: Channel credential types meshcore can build, in no particular order (the bootstrap's order
#: decides which one is used).
SUPPORTED_CHANNEL_CREDS = ("insecure", "tls")

#: ADS variants: state of the world and incremental.
API_TYPES = ("GRPC", "DELTA_GRPC")

#: Sent in ``Node.client_features``. gRPC sends the first; Envoy's documented name is the second.
CLIENT_FEATURES = ("xds.config.resource-in-sotw", "xds.config.supports-resource-in-sotw")

USER_AGENT_NAME = "meshcore"

#: A47 default for an authority without ``client_listener_resource_name_template``.
_AUTHORITY_TEMPLATE = "xdstp://{}/envoy.config.listener.v3.Listener/%s"

#: RFC 3986 section 3.3 ``pchar`` characters plus "/" that are kept when a name is substituted
#: into an ``xdstp:`` template (gRPC C-core's ``URI::PercentEncodePath``). Letters, digits and
#: ``-._~`` are always kept by :func:`urllib.parse.quote`.
_PATH_SAFE = "/:@!$&'()*+,;="

#: ``field`` for errors about the document as a whole.
_ROOT = "(root)"

_ENVOY_API_TYPES = {
    "GRPC": "GRPC",
    "AGGREGATED_GRPC": "GRPC",
    "DELTA_GRPC": "DELTA_GRPC",
    "AGGREGATED_DELTA_GRPC": "DELTA_GRPC",
}
_TLS_TRANSPORT_SOCKET = "envoy.transport_sockets.tls"
_TLS_CONTEXT_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"


class BootstrapError(ConfigError):
    """The xDS bootstrap is missing or invalid.

    ``resource`` is where it came from (a file path, ``"GRPC_XDS_BOOTSTRAP_CONFIG"``,
    ``"<dict>"``, ...), ``field`` the JSON path of the offending value.
    """


def _freeze(value: Any) -> Any:
    """Deep read-only copy of parsed JSON: dicts become mapping proxies, lists tuples."""
    if isinstance(value, Mapping):
        return MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    """Inverse of :func:`_freeze`, for hashing and serialising."""
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


def _empty() -> Mapping[str, Any]:
    return MappingProxyType({})


def _read_file(path: str, resource: str, field_path: str) -> bytes:
    """Bytes of ``path``, or a :class:`BootstrapError` on ``field_path``."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise BootstrapError(resource, field_path, f"cannot read {path!r}: {e.strerror or e}") from None


def _meshcore_version() -> str:
    from .. import __version__  # late: meshcore/__init__ may one day import this module

    return __version__


@dataclass(frozen=True)
class ChannelCreds:
    """One ``channel_creds`` entry: a credential ``type`` and its (read-only) ``config``."""

    type: str
    config: Mapping[str, Any] = field(default_factory=_empty)

    def __post_init__(self) -> None:
        object.__setattr__(self, "config", _freeze(self.config))

    def __hash__(self) -> int:
        return hash((self.type, json.dumps(_thaw(self.config), sort_keys=True, default=str)))

    @property
    def supported(self) -> bool:
        """Whether meshcore can build this credential type."""
        return self.type in SUPPORTED_CHANNEL_CREDS


@dataclass(frozen=True)
class XdsServer:
    """One management server (``xds_servers[i]``).

    Equality and hash follow A47's de-duplication key (URI, credentials, features);
    ``source`` and ``path`` only locate the entry for error messages.
    """

    server_uri: str
    channel_creds: Tuple[ChannelCreds, ...]
    server_features: Tuple[str, ...] = ()
    source: str = field(default="<dict>", compare=False, repr=False)
    path: str = field(default="xds_servers[0]", compare=False, repr=False)

    def _selected(self) -> Tuple[int, ChannelCreds]:
        for i, creds in enumerate(self.channel_creds):
            if creds.supported:
                return i, creds
        raise BootstrapError(
            self.source,
            f"{self.path}.channel_creds",
            f"no supported type among {[c.type for c in self.channel_creds]}; "
            f"meshcore supports {', '.join(SUPPORTED_CHANNEL_CREDS)}",
        )

    @property
    def creds_type(self) -> str:
        """The first supported ``channel_creds`` type: ``"insecure"`` or ``"tls"``."""
        return self._selected()[1].type

    @property
    def ignore_resource_deletion(self) -> bool:
        """Server feature ``ignore_resource_deletion`` (A53)."""
        return "ignore_resource_deletion" in self.server_features

    @property
    def fail_on_data_errors(self) -> bool:
        """Server feature ``fail_on_data_errors`` (A88)."""
        return "fail_on_data_errors" in self.server_features

    @property
    def resource_timer_is_transient_error(self) -> bool:
        """Server feature ``resource_timer_is_transient_error`` (A88)."""
        return "resource_timer_is_transient_error" in self.server_features

    @property
    def trusted_xds_server(self) -> bool:
        """Server feature ``trusted_xds_server`` (A81)."""
        return "trusted_xds_server" in self.server_features

    def grpc_target(self) -> str:
        """The target to pass to ``grpc.secure_channel``/``grpc.insecure_channel``.

        ``server_uri`` is already gRPC target syntax (``host:port``, ``dns:///host:port``,
        ``unix:///abs/path``, ``unix:rel/path``, ``unix-abstract:name``, ``ipv4:``/``ipv6:``), so
        it is returned unchanged. Note Istio's ``unix:///./etc/istio/proxy/XDS``: grpcio (C-core)
        takes the URI path ``/./etc/istio/proxy/XDS``, i.e. the absolute ``/etc/istio/proxy/XDS``,
        not a path relative to the working directory (grpc-go does the same). That is what
        Istio means inside its containers, whose working directory is ``/``.
        """
        return self.server_uri

    def channel_credentials(self) -> Optional[grpc.ChannelCredentials]:
        """Credentials for the channel: ``None`` for insecure, else TLS from the files now on disk."""
        index, creds = self._selected()
        if creds.type == "insecure":
            return None
        base = f"{self.path}.channel_creds[{index}].config"
        _check_tls_config(creds.config, self.source, base)
        files: Dict[str, Optional[bytes]] = {}
        for key in ("ca_certificate_file", "certificate_file", "private_key_file"):
            path = creds.config.get(key)
            files[key] = None if path is None else _read_file(path, self.source, f"{base}.{key}")
        import grpc

        return grpc.ssl_channel_credentials(
            root_certificates=files["ca_certificate_file"],
            private_key=files["private_key_file"],
            certificate_chain=files["certificate_file"],
        )

    def channel_options(self) -> List[Tuple[str, Union[int, str]]]:
        """grpcio channel options for the ADS channel.

        * No message size limits: grpcio's default 4 MiB receive limit is too small for
          state-of-the-world responses in a large mesh (the stream would die with
          RESOURCE_EXHAUSTED before any response, which looks like a connectivity failure).
        * HTTP/2 keepalive every 5 minutes (20 s timeout) to notice dead peers on this
          long-lived stream. Five minutes is grpc-go's default server ``MinTime``, so control
          planes with default enforcement do not answer with ``too_many_pings``.
        """
        return [
            ("grpc.max_receive_message_length", -1),
            ("grpc.max_send_message_length", -1),
            ("grpc.keepalive_time_ms", 300_000),
            ("grpc.keepalive_timeout_ms", 20_000),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.primary_user_agent", f"{USER_AGENT_NAME}/{_meshcore_version()}"),
        ]


def _duration_seconds(value: Any, resource: str, field_path: str) -> float:
    """Proto3-JSON duration (``"900s"``, ``"1.5s"``) in seconds."""
    if isinstance(value, str) and value.endswith("s"):
        try:
            seconds = float(value[:-1])
        except ValueError:
            pass
        else:
            if seconds >= 0:
                return seconds
    raise BootstrapError(resource, field_path, f"expected a duration like \"600s\", got {value!r}")


@dataclass(frozen=True)
class CertificateProvider:
    """A ``certificate_providers`` instance (A29). ``file_watcher`` config has accessors."""

    plugin_name: str
    config: Mapping[str, Any] = field(default_factory=_empty)

    def __post_init__(self) -> None:
        object.__setattr__(self, "config", _freeze(self.config))

    @property
    def certificate_file(self) -> Optional[str]:
        """``file_watcher``: the certificate chain file (PEM), if any."""
        return self.config.get("certificate_file")

    @property
    def private_key_file(self) -> Optional[str]:
        """``file_watcher``: the private key file (PEM), if any."""
        return self.config.get("private_key_file")

    @property
    def ca_certificate_file(self) -> Optional[str]:
        """``file_watcher``: the root CA file (PEM), if any."""
        return self.config.get("ca_certificate_file")

    @property
    def spiffe_trust_bundle_map_file(self) -> Optional[str]:
        """``file_watcher``: a SPIFFE trust bundle map (A87); when set, ``ca_certificate_file`` is ignored."""
        return self.config.get("spiffe_trust_bundle_map_file")

    @property
    def refresh_interval(self) -> float:
        """``file_watcher``: how often to re-read the files, in seconds (default 600)."""
        raw = self.config.get("refresh_interval")
        return 600.0 if raw is None else _duration_seconds(raw, "<certificate provider>", "refresh_interval")


@dataclass(frozen=True)
class Authority:
    """A federation authority (A47). Empty ``xds_servers`` means the top-level servers."""

    name: str
    client_listener_resource_name_template: str
    xds_servers: Tuple[XdsServer, ...] = ()


@dataclass(frozen=True)
class Bootstrap:
    """A parsed bootstrap. ``node`` is shared: copy it before modifying."""

    xds_servers: Tuple[XdsServer, ...]
    node: base_pb2.Node = field(repr=False)
    certificate_providers: Mapping[str, CertificateProvider] = field(default_factory=_empty)
    server_listener_resource_name_template: Optional[str] = None
    client_default_listener_resource_name_template: str = "%s"
    authorities: Mapping[str, Authority] = field(default_factory=_empty)
    source: str = "<dict>"
    api_type: str = "GRPC"

    def __post_init__(self) -> None:
        if not self.xds_servers:
            raise BootstrapError(self.source, "xds_servers", "at least one server is required")
        if self.api_type not in API_TYPES:
            raise BootstrapError(self.source, "api_type", f"must be one of {API_TYPES}, got {self.api_type!r}")
        object.__setattr__(self, "certificate_providers", MappingProxyType(dict(self.certificate_providers)))
        object.__setattr__(self, "authorities", MappingProxyType(dict(self.authorities)))

    @property
    def node_id(self) -> str:
        """``node.id`` (empty if the bootstrap has none)."""
        return self.node.id

    @property
    def delta(self) -> bool:
        """Whether the incremental ADS variant is requested."""
        return self.api_type == "DELTA_GRPC"

    def listener_name(self, target: str) -> str:
        """The LDS resource name for a data-plane ``target`` (A47).

        ``xds://<authority>/<name>`` uses that authority's template (the authority must be in
        ``authorities``, else :class:`BootstrapError`); ``xds:///<name>``, ``xds:<name>`` and a
        bare ``<name>`` use ``client_default_listener_resource_name_template``. ``%s`` is
        replaced by the name, percent-encoded (RFC 3986 path characters, ``/`` kept) when the
        template starts with ``xdstp:``. Targets of other schemes raise :class:`ValueError`.
        """
        authority, name = _split_target(target)
        if authority:
            entry = self.authorities.get(authority)
            if entry is None:
                raise BootstrapError(
                    self.source,
                    f"authorities[{authority}]",
                    f"target {target!r} names authority {authority!r}, which the bootstrap does not define",
                )
            template = entry.client_listener_resource_name_template
        else:
            template = self.client_default_listener_resource_name_template
        if template.startswith("xdstp:"):
            name = quote(name, safe=_PATH_SAFE)
        return template.replace("%s", name)

    def servers_for(self, resource_name: str) -> Tuple[XdsServer, ...]:
        """Servers for a resource: its ``xdstp://`` authority's, else the top-level ones.

        An ``xdstp:`` name whose authority the bootstrap does not define raises
        :class:`BootstrapError` (gRPC fails such a watch the same way).
        """
        if not resource_name.startswith("xdstp:"):
            return self.xds_servers
        authority = urlsplit(resource_name).netloc
        entry = self.authorities.get(authority)
        if entry is None:
            raise BootstrapError(
                self.source,
                f"authorities[{authority}]",
                f"resource {resource_name!r} names authority {authority!r}, which the bootstrap does not define",
            )
        return entry.xds_servers or self.xds_servers

    def for_shape(self, shape: str, environ: Optional[Mapping[str, str]] = None, **options: Any) -> "Bootstrap":
        """This bootstrap with the node a client of ``shape`` presents (see :func:`node_for_shape`):
        ``"grpc"`` returns ``self`` unchanged; ``"envoy"`` a copy whose node is
        :func:`sidecar_node` of this one (``environ`` defaults to ``os.environ``; ``options`` go to
        :func:`sidecar_node`)."""
        node = node_for_shape(self.node, shape, environ, source=self.source, **options)
        return self if node is self.node else dataclasses.replace(self, node=node)

    @classmethod
    def load(cls, source: Union[None, str, "os.PathLike[str]", Mapping[str, Any]] = None) -> "Bootstrap":
        """Load a bootstrap from ``source``, or from the environment when it is ``None``.

        Environment: ``GRPC_XDS_BOOTSTRAP`` (a file path) wins over ``GRPC_XDS_BOOTSTRAP_CONFIG``
        (inline JSON); empty values count as unset. A ``str`` or path-like ``source`` is a file
        path; a mapping is already-parsed JSON.
        """
        if source is None:
            path = os.environ.get(ENV_BOOTSTRAP_FILE)
            if path:
                if os.environ.get(ENV_BOOTSTRAP_CONFIG):
                    logger.debug("both %s and %s are set; the file wins", ENV_BOOTSTRAP_FILE, ENV_BOOTSTRAP_CONFIG)
                return cls._load_file(path)
            inline = os.environ.get(ENV_BOOTSTRAP_CONFIG)
            if inline:
                return cls.from_json(inline, source=ENV_BOOTSTRAP_CONFIG)
            raise BootstrapError(
                "<environment>",
                ENV_BOOTSTRAP_FILE,
                f"no xDS bootstrap configured: set {ENV_BOOTSTRAP_FILE} to the path of a bootstrap file, "
                f"or {ENV_BOOTSTRAP_CONFIG} to the bootstrap JSON itself",
            )
        if isinstance(source, Mapping):
            return cls.from_dict(source)
        if isinstance(source, (str, os.PathLike)):
            return cls._load_file(os.fspath(source))
        raise TypeError(f"bootstrap source must be None, a path or a mapping, not {type(source).__name__}")

    @classmethod
    def _load_file(cls, path: str) -> "Bootstrap":
        hint = " (inline JSON goes to Bootstrap.from_json)" if path.lstrip().startswith("{") else ""
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise BootstrapError(path, _ROOT, f"cannot read the bootstrap file: {reason}{hint}") from None
        if path.endswith((".yaml", ".yml")):
            return cls.from_dict(_parse_yaml(text, path), source=path)
        return cls.from_json(text, source=path)

    @classmethod
    def from_json(cls, text: str, source: str = "<json>") -> "Bootstrap":
        """Parse bootstrap JSON text."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            reason = f"not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
            raise BootstrapError(source, _ROOT, reason) from None
        return cls.from_dict(data, source=source)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<dict>") -> "Bootstrap":
        """Build from parsed JSON (gRPC or Envoy bootstrap format)."""
        bootstrap = _Reader(source).bootstrap(data)
        logger.info(
            "xDS bootstrap from %s: servers %s, node id %r, %s",
            source,
            [s.server_uri for s in bootstrap.xds_servers],
            bootstrap.node_id,
            bootstrap.api_type,
        )
        return bootstrap


def target_authority(target: str) -> str:
    """The data-plane authority of a target, used for virtual-host matching (A47): the path of
    an ``xds:`` URI without its leading ``/``, or the target itself (grpc-go#6997: not the LDS
    resource name)."""
    return _split_target(target)[1]


def _split_target(target: str) -> Tuple[str, str]:
    """``(authority, name)`` of a data-plane target; authority is ``""`` when absent."""
    if target.startswith("xds:"):
        parts = urlsplit(target)
        name = unquote(parts.path[1:] if parts.netloc or parts.path.startswith("/") else parts.path)
        if not name:
            raise ValueError(f"xDS target {target!r} has no listener name")
        return parts.netloc, name
    if "://" in target:
        raise ValueError(f"{target!r} is not an xds: target")
    if not target:
        raise ValueError("empty target")
    return "", target


def _parse_yaml(text: str, source: str) -> Any:
    try:
        import yaml
    except ImportError:  # pragma: no cover - pyyaml is a dependency
        raise BootstrapError(source, _ROOT, "YAML bootstraps need pyyaml") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise BootstrapError(source, _ROOT, f"not valid YAML: {problem}{where}") from None


def _get(obj: Mapping[str, Any], name: str) -> Any:
    """``obj[name]``, also under its camelCase spelling (proto3 JSON accepts both)."""
    if name in obj:
        return obj[name]
    head, *rest = name.split("_")
    return obj.get(head + "".join(p.title() for p in rest))


def _check_tls_config(config: Mapping[str, Any], resource: str, base: str) -> None:
    """A65 ``tls`` credential config: file names are strings; cert and key come together."""
    for key in ("ca_certificate_file", "certificate_file", "private_key_file"):
        value = config.get(key)
        if value is not None and (not isinstance(value, str) or not value):
            raise BootstrapError(resource, f"{base}.{key}", f"must be a non-empty string, got {value!r}")
    if (config.get("certificate_file") is None) != (config.get("private_key_file") is None):
        missing = "private_key_file" if config.get("private_key_file") is None else "certificate_file"
        raise BootstrapError(
            resource, f"{base}.{missing}", "certificate_file and private_key_file must be set together (or neither)"
        )
    if config.get("refresh_interval") is not None:
        _duration_seconds(config["refresh_interval"], resource, f"{base}.refresh_interval")
    bundle = config.get("spiffe_trust_bundle_map_file")
    if bundle is not None and (not isinstance(bundle, str) or not bundle):
        raise BootstrapError(resource, f"{base}.spiffe_trust_bundle_map_file", f"must be a non-empty string, got {bundle!r}")


class _Reader:
    """Validating walk over parsed bootstrap JSON; every error carries the field path."""

    def __init__(self, source: str) -> None:
        self.source = source

    def error(self, path: str, reason: str) -> BootstrapError:
        return BootstrapError(self.source, path or _ROOT, reason)

    def obj(self, value: Any, path: str) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise self.error(path, f"expected an object, got {_kind(value)}")
        return value

    def array(self, value: Any, path: str) -> List[Any]:
        if not isinstance(value, (list, tuple)):
            raise self.error(path, f"expected a list, got {_kind(value)}")
        return list(value)

    def string(self, value: Any, path: str, *, empty: bool = True) -> str:
        if not isinstance(value, str):
            raise self.error(path, f"expected a string, got {_kind(value)}")
        if not empty and not value:
            raise self.error(path, "must not be empty")
        return value

    # -- gRPC format -------------------------------------------------------------------------

    def bootstrap(self, data: Any) -> Bootstrap:
        data = self.obj(data, "")
        if "xds_servers" not in data and ("dynamic_resources" in data or "static_resources" in data
                                          or "dynamicResources" in data or "staticResources" in data):
            return self.envoy_bootstrap(data)
        if "xds_servers" not in data:
            raise self.error(
                "xds_servers",
                "is required (a gRPC bootstrap lists its management servers there; an Envoy bootstrap "
                "needs dynamic_resources.ads_config)",
            )
        servers = self.servers(data["xds_servers"], "xds_servers", required=True)
        templates: Dict[str, Optional[str]] = {}
        for key in ("server_listener_resource_name_template", "client_default_listener_resource_name_template"):
            value = data.get(key)
            templates[key] = None if value is None else self.string(value, key)
        return Bootstrap(
            xds_servers=servers,
            node=self.node(data.get("node"), "node"),
            certificate_providers=self.certificate_providers(data.get("certificate_providers")),
            server_listener_resource_name_template=templates["server_listener_resource_name_template"],
            client_default_listener_resource_name_template=(
                templates["client_default_listener_resource_name_template"] or "%s"
            ),
            authorities=self.authorities(data.get("authorities")),
            source=self.source,
            api_type=self.extension_api_type(data.get("meshcore")),
        )

    def servers(self, value: Any, path: str, *, required: bool) -> Tuple[XdsServer, ...]:
        if value is None and not required:
            return ()
        items = self.array(value, path)
        if required and not items:
            raise self.error(path, "must list at least one server")
        return tuple(self.server(item, f"{path}[{i}]") for i, item in enumerate(items))

    def server(self, value: Any, path: str) -> XdsServer:
        entry = self.obj(value, path)
        if entry.get("server_uri") is None:
            raise self.error(f"{path}.server_uri", "is required")
        uri = self.string(entry["server_uri"], f"{path}.server_uri", empty=False)
        if entry.get("channel_creds") is None:
            raise self.error(f"{path}.channel_creds", "is required")
        raw_creds = self.array(entry["channel_creds"], f"{path}.channel_creds")
        if not raw_creds:
            raise self.error(f"{path}.channel_creds", "must list at least one credential type")
        creds = tuple(self.channel_creds(c, f"{path}.channel_creds[{i}]") for i, c in enumerate(raw_creds))
        features: Tuple[str, ...] = ()
        if entry.get("server_features") is not None:
            raw = self.array(entry["server_features"], f"{path}.server_features")
            features = tuple(self.string(f, f"{path}.server_features[{i}]") for i, f in enumerate(raw))
        if entry.get("call_creds"):
            logger.warning("%s: %s.call_creds: call credentials are not supported; ignored", self.source, path)
        server = XdsServer(uri, creds, features, source=self.source, path=path)
        index, chosen = server._selected()  # raises when nothing is supported
        if chosen.type == "tls":
            _check_tls_config(chosen.config, self.source, f"{path}.channel_creds[{index}].config")
        return server

    def channel_creds(self, value: Any, path: str) -> ChannelCreds:
        entry = self.obj(value, path)
        if entry.get("type") is None:
            raise self.error(f"{path}.type", "is required")
        kind = self.string(entry["type"], f"{path}.type", empty=False)
        config = entry.get("config")
        return ChannelCreds(kind, {} if config is None else self.obj(config, f"{path}.config"))

    def node(self, value: Any, path: str) -> base_pb2.Node:
        node = base_pb2.Node()
        if value is not None:
            entry = self.obj(value, path)
            for key in ("id", "cluster"):
                if entry.get(key) is not None:
                    setattr(node, key, self.string(entry[key], f"{path}.{key}"))
            locality = _get(entry, "locality")
            if locality is not None:
                locality = self.obj(locality, f"{path}.locality")
                for key in ("region", "zone", "sub_zone"):
                    raw = _get(locality, key)
                    if raw is not None:
                        setattr(node.locality, key, self.string(raw, f"{path}.locality.{key}"))
            metadata = entry.get("metadata")
            if metadata is not None:
                metadata = self.obj(metadata, f"{path}.metadata")
                try:
                    node.metadata.update(metadata)
                except (ValueError, TypeError, AttributeError) as e:
                    raise self.error(f"{path}.metadata", f"not representable as google.protobuf.Struct: {e}") from None
        node.user_agent_name = USER_AGENT_NAME
        node.user_agent_version = f"{_meshcore_version()} python {sys.version_info[0]}.{sys.version_info[1]}"
        node.client_features.extend(CLIENT_FEATURES)
        return node

    def certificate_providers(self, value: Any) -> Dict[str, CertificateProvider]:
        if value is None:
            return {}
        providers: Dict[str, CertificateProvider] = {}
        for name, raw in self.obj(value, "certificate_providers").items():
            path = f"certificate_providers[{name}]"
            entry = self.obj(raw, path)
            if entry.get("plugin_name") is None:
                raise self.error(f"{path}.plugin_name", "is required")
            plugin = self.string(entry["plugin_name"], f"{path}.plugin_name", empty=False)
            config = entry.get("config")
            config = {} if config is None else self.obj(config, f"{path}.config")
            if plugin == "file_watcher":
                _check_tls_config(config, self.source, f"{path}.config")
                if (config.get("certificate_file") is None and config.get("ca_certificate_file") is None
                        and config.get("spiffe_trust_bundle_map_file") is None):
                    raise self.error(f"{path}.config", "file_watcher needs certificate_file, ca_certificate_file "
                                                       "or spiffe_trust_bundle_map_file")
            providers[name] = CertificateProvider(plugin, config)
        return providers

    def authorities(self, value: Any) -> Dict[str, Authority]:
        if value is None:
            return {}
        result: Dict[str, Authority] = {}
        for name, raw in self.obj(value, "authorities").items():
            path = f"authorities[{name}]"
            entry = self.obj(raw, path)
            key = "client_listener_resource_name_template"
            template = entry.get(key)
            if template is None:
                template = _AUTHORITY_TEMPLATE.format(name)
            else:
                template = self.string(template, f"{path}.{key}")
                if not template.startswith(f"xdstp://{name}/"):
                    raise self.error(f"{path}.{key}", f"must start with \"xdstp://{name}/\", got {template!r}")
            servers = self.servers(entry.get("xds_servers"), f"{path}.xds_servers", required=False)
            result[name] = Authority(name, template, servers)
        return result

    def extension_api_type(self, value: Any) -> str:
        if value is None:
            return "GRPC"
        entry = self.obj(value, "meshcore")
        if entry.get("api_type") is None:
            return "GRPC"
        api_type = self.string(entry["api_type"], "meshcore.api_type")
        if api_type not in API_TYPES:
            raise self.error("meshcore.api_type", f"must be one of {', '.join(API_TYPES)}, got {api_type!r}")
        return api_type

    # -- Envoy format ------------------------------------------------------------------------

    def envoy_bootstrap(self, data: Mapping[str, Any]) -> Bootstrap:
        dynamic = self.obj(_get(data, "dynamic_resources") or {}, "dynamic_resources")
        path = "dynamic_resources.ads_config"
        ads = _get(dynamic, "ads_config")
        if ads is None:
            raise self.error(path, "is required: meshcore talks to the control plane over ADS only")
        ads = self.obj(ads, path)
        raw_type = _get(ads, "api_type")
        api_type = "GRPC" if raw_type is None else self.string(raw_type, f"{path}.api_type")
        if api_type not in _ENVOY_API_TYPES:
            raise self.error(f"{path}.api_type", f"must be GRPC or DELTA_GRPC for ADS, got {api_type!r}")
        services = self.array(_get(ads, "grpc_services"), f"{path}.grpc_services")
        if not services:
            raise self.error(f"{path}.grpc_services", "must list the ADS server")
        if len(services) > 1:
            logger.warning("%s: %s.grpc_services: only the first entry is used", self.source, path)
        server = self.envoy_grpc_service(data, services[0], f"{path}.grpc_services[0]")
        return Bootstrap(
            xds_servers=(server,),
            node=self.node(_get(data, "node"), "node"),
            source=self.source,
            api_type=_ENVOY_API_TYPES[api_type],
        )

    def envoy_grpc_service(self, data: Mapping[str, Any], value: Any, path: str) -> XdsServer:
        service = self.obj(value, path)
        insecure = (ChannelCreds("insecure"),)
        envoy_grpc = _get(service, "envoy_grpc")
        if envoy_grpc is not None:
            envoy_grpc = self.obj(envoy_grpc, f"{path}.envoy_grpc")
            name = self.string(_get(envoy_grpc, "cluster_name"), f"{path}.envoy_grpc.cluster_name", empty=False)
            uri, cluster_path = self.envoy_cluster_target(data, name, f"{path}.envoy_grpc.cluster_name")
            return XdsServer(uri, insecure, (), source=self.source, path=cluster_path)
        google_grpc = _get(service, "google_grpc")
        if google_grpc is not None:
            google_grpc = self.obj(google_grpc, f"{path}.google_grpc")
            if _get(google_grpc, "channel_credentials") is not None:
                raise self.error(
                    f"{path}.google_grpc.channel_credentials",
                    "TLS in Envoy bootstraps is not supported; use a gRPC bootstrap with \"tls\" channel_creds",
                )
            uri = self.string(_get(google_grpc, "target_uri"), f"{path}.google_grpc.target_uri", empty=False)
            return XdsServer(uri, insecure, (), source=self.source, path=f"{path}.google_grpc")
        raise self.error(path, "needs envoy_grpc or google_grpc")

    def envoy_cluster_target(self, data: Mapping[str, Any], name: str, ref_path: str) -> Tuple[str, str]:
        """gRPC target of the first endpoint of static cluster ``name``, and the cluster's path."""
        static = self.obj(_get(data, "static_resources") or {}, "static_resources")
        clusters = self.array(_get(static, "clusters") or [], "static_resources.clusters")
        for i, raw in enumerate(clusters):
            path = f"static_resources.clusters[{i}]"
            cluster = self.obj(raw, path)
            if cluster.get("name") != name:
                continue
            self.reject_envoy_tls(cluster, path)
            assignment = self.obj(_get(cluster, "load_assignment") or {}, f"{path}.load_assignment")
            endpoints = self.array(_get(assignment, "endpoints") or [], f"{path}.load_assignment.endpoints")
            for j, locality in enumerate(endpoints):
                lpath = f"{path}.load_assignment.endpoints[{j}]"
                raw_lb_endpoints = _get(self.obj(locality, lpath), "lb_endpoints") or []
                lb_endpoints = self.array(raw_lb_endpoints, f"{lpath}.lb_endpoints")
                for k, lb_endpoint in enumerate(lb_endpoints):
                    epath = f"{lpath}.lb_endpoints[{k}].endpoint"
                    endpoint = _get(self.obj(lb_endpoint, f"{lpath}.lb_endpoints[{k}]"), "endpoint")
                    if endpoint is not None and _get(self.obj(endpoint, epath), "address") is not None:
                        return self.envoy_address(_get(endpoint, "address"), f"{epath}.address"), path
            raise self.error(f"{path}.load_assignment", f"static cluster {name!r} has no endpoint address")
        raise self.error(ref_path, f"no static cluster named {name!r}")

    def reject_envoy_tls(self, cluster: Mapping[str, Any], path: str) -> None:
        socket = _get(cluster, "transport_socket")
        if socket is None:
            return
        socket = self.obj(socket, f"{path}.transport_socket")
        typed = _get(socket, "typed_config")
        type_url = typed.get("@type") if isinstance(typed, Mapping) else None
        if socket.get("name") == _TLS_TRANSPORT_SOCKET or type_url == _TLS_CONTEXT_TYPE:
            raise self.error(
                f"{path}.transport_socket",
                "TLS in Envoy bootstraps is not supported; use a gRPC bootstrap with \"tls\" channel_creds",
            )

    def envoy_address(self, value: Any, path: str) -> str:
        address = self.obj(value, path)
        pipe = _get(address, "pipe")
        if pipe is not None:
            pipe_path = self.string(_get(self.obj(pipe, f"{path}.pipe"), "path"), f"{path}.pipe.path", empty=False)
            if pipe_path.startswith("@"):
                return f"unix-abstract:{pipe_path[1:]}"
            return f"unix://{pipe_path}" if pipe_path.startswith("/") else f"unix:{pipe_path}"
        socket = _get(address, "socket_address")
        if socket is None:
            raise self.error(path, "needs socket_address or pipe")
        socket = self.obj(socket, f"{path}.socket_address")
        host = self.string(_get(socket, "address"), f"{path}.socket_address.address", empty=False)
        port = _get(socket, "port_value")
        if isinstance(port, str) and port.isdigit():
            port = int(port)
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise self.error(f"{path}.socket_address.port_value", f"expected a port number, got {port!r}")
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# -- the node a client presents, per shape -----------------------------------------------------

#: Node shapes: ``"grpc"`` (proxyless, istiod's gRPC generator) and ``"envoy"`` (a sidecar).
SHAPES = ("grpc", "envoy")

#: ``ISTIO_VERSION`` claimed when neither the bootstrap nor ``ISTIO_META_ISTIO_VERSION`` says:
#: the release whose sidecar configuration meshcore's Envoy shape follows (istio/istio master of
#: 2026-08, ``VERSION`` 1.32; see ``meshcore.controlplane.istio_sidecar``). istiod gates some
#: configuration on it; an empty or unparsable value means "newest" there.
DEFAULT_ISTIO_VERSION = "1.32.0"

#: Where Istio's injection mounts the downward-API pod labels and annotations (``labels``,
#: ``annotations``; ``pkg/config/constants`` ``PodInfoLabelsPath``, relative to the agent's ``/``).
POD_INFO_DIR = "/etc/istio/pod"

_META_PREFIX = "ISTIO_META_"
_METAJSON_PREFIX = "ISTIO_METAJSON_"
_ENV_SOURCE = "<environment>"
_LOCALITY_LABEL = "istio-locality"
_POD_TEMPLATE_HASH = "pod-template-hash"

# The typed fields of istio's BootstrapNodeMetadata (pkg/model/proxy.go) whose JSON is not a
# plain string. The agent round-trips the metadata through that struct: a value of the wrong JSON
# type fails there (the agent does not start), and these values come out re-encoded.
_MAP_FIELDS = frozenset({"LABELS", "STATIC_LABELS", "ANNOTATIONS", "PLATFORM_METADATA"})
_INT_FIELDS = frozenset({"ENVOY_STATUS_PORT", "ENVOY_PROMETHEUS_PORT", "ENVOY_SECURE_METRICS_PORT",
                         "ENVOY_SECURE_MERGED_METRICS_PORT"})
_STRING_BOOL_FIELDS = frozenset({
    "ENABLE_SELF_DISCOVERY", "DNS_CAPTURE", "DNS_AUTO_ALLOCATE", "ENABLE_HBONE", "DISABLE_HBONE_SEND",
    "EXIT_ON_ZERO_ACTIVE_CONNECTIONS", "INBOUND_LISTENER_EXACT_BALANCE", "OUTBOUND_LISTENER_EXACT_BALANCE",
    "ENVOY_SKIP_DEPRECATED_LOGS", "METADATA_DISCOVERY",
})
_LIST_FIELDS = frozenset({"PILOT_SAN"})
_OBJECT_FIELDS = frozenset({"PROXY_CONFIG"})
_STRING_FIELDS = frozenset({
    "ISTIO_VERSION", "ISTIO_REVISION", "INSTANCE_IPS", "NAMESPACE", "NODE_NAME", "WORKLOAD_NAME",
    "INTERCEPTION_MODE", "SERVICE_ACCOUNT", "HTTP_PROXY_PORT", "MESH_ID", "CLUSTER_ID", "NETWORK",
    "REQUESTED_NETWORK_VIEW", "POD_PORTS", "TLS_SERVER_CERT_CHAIN", "TLS_SERVER_KEY", "TLS_SERVER_ROOT_CERT",
    "TLS_CLIENT_CERT_CHAIN", "TLS_CLIENT_KEY", "TLS_CLIENT_ROOT_CERT", "BASE", "IDLE_TIMEOUT", "HTTP10",
    "GENERATOR", "DNS_PROXY_ADDR", "AUTO_REGISTER_GROUP", "WORKLOAD_ENTRY", "UNPRIVILEGED_POD", "STS_PORT",
    "CLOUDRUN_ADDR", "WORKLOAD_IDENTITY_SOCKET_FILE", "NAME", "OWNER", "OUTLIER_LOG_PATH", "APP_CONTAINERS",
    "ISTIO_PROXY_SHA",
})
_GO_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_GO_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})


def node_for_shape(node: base_pb2.Node, shape: str, environ: Optional[Mapping[str, str]] = None,
                   **options: Any) -> base_pb2.Node:
    """The node a client of ``shape`` (one of :data:`SHAPES`) presents.

    ``"grpc"``: ``node`` itself, unchanged (the proxyless shape sends what the bootstrap says, an
    Istio agent's ``GENERATOR: grpc`` included). ``"envoy"``: :func:`sidecar_node`.
    """
    if shape == "grpc":
        return node
    if shape == "envoy":
        return sidecar_node(node, environ, **options)
    raise ValueError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")


def sidecar_node(node: Optional[base_pb2.Node] = None, environ: Optional[Mapping[str, str]] = None, *,
                 istio_version: str = DEFAULT_ISTIO_VERSION, instance_ips: Sequence[str] = (),
                 dns_domain: Optional[str] = None, pod_info_dir: Optional[str] = POD_INFO_DIR,
                 source: str = _ENV_SOURCE) -> base_pb2.Node:
    """The node an Envoy sidecar's istio-agent would present, for meshcore's Envoy shape.

    Starts from a copy of ``node`` (the bootstrap's; ``None``: an empty one with meshcore's user
    agent and client features) and:

    * removes ``GENERATOR`` from the metadata (logged): with it istiod would pick its proxyless
      gRPC generator instead of the sidecar one (``pilot/pkg/xds/xdsgen.go`` ``findGenerator``);
    * adds the metadata istio-agent derives from ``environ`` (default ``os.environ``), for keys
      the node does not have yet (the bootstrap's values win):

      - every ``ISTIO_META_<KEY>=<value>`` as ``<KEY>: "<value>"`` (``CLUSTER_ID``, ``MESH_ID``,
        ``WORKLOAD_NAME``, ``POD_PORTS``, ``NETWORK``, ...), after the ``ISTIO_META_*`` entries
        of ``PROXY_CONFIG``'s ``proxyMetadata``; every ``ISTIO_METAJSON_<any>=<JSON object>``
        merged in at the top level; values are checked against the types istiod's node
        metadata struct has (``LABELS`` must be an object, ``POD_PORTS`` a string holding a JSON
        list, ...: :class:`BootstrapError` otherwise, where the agent would fail to start) and
        re-encoded as the agent does (``POD_PORTS`` compact, true string-bools as ``"true"``);
      - ``NAME`` from ``POD_NAME``, ``NAMESPACE`` from ``POD_NAMESPACE``, ``SERVICE_ACCOUNT``
        from ``SERVICE_ACCOUNT``; ``LABELS`` (and ``STATIC_LABELS``) from
        ``ISTIO_METAJSON_LABELS``, then the pod labels file ``<pod_info_dir>/labels`` (without
        ``pod-template-hash``), ``ANNOTATIONS`` from ``<pod_info_dir>/annotations``;
      - ``INSTANCE_IPS``: ``INSTANCE_IP`` then ``instance_ips`` (the agent adds the host's
        private addresses; pass them here if wanted), comma-separated;
      - ``ISTIO_VERSION``: ``istio_version`` unless set otherwise; ``PROXY_CONFIG`` from the
        ``PROXY_CONFIG`` variable (a JSON object) when set;
    * keeps the node id if it already is ``sidecar~<ip>~<pod>.<ns>~<domain>``, else builds it:
      ``sidecar~<first INSTANCE_IPS>~<POD_NAME>.<POD_NAMESPACE>~<dns_domain or
      <POD_NAMESPACE>.svc.cluster.local>`` (:class:`BootstrapError` naming what is missing);
    * sets ``cluster`` when empty as the agent does (``<app label>.<ns>``, else
      ``<WORKLOAD_NAME>.<ns>``, else ``istio-proxy.<ns>``) and ``locality`` when empty from the
      ``istio-locality`` label (``region.zone.subzone``).
    """
    env: Mapping[str, str] = os.environ if environ is None else environ
    out = base_pb2.Node()
    if node is None:
        out.CopyFrom(_Reader(source).node(None, "node"))
    else:
        out.CopyFrom(node)
    existing: Dict[str, Any] = json_format.MessageToDict(out.metadata) if out.HasField("metadata") else {}
    generator = existing.pop("GENERATOR", None)
    if generator is not None:
        logger.info("xDS node %r: metadata GENERATOR=%r removed for the Envoy shape (istiod's sidecar generator)",
                    out.id, generator)
    derived = _agent_metadata(env, istio_version, instance_ips, pod_info_dir)
    dropped = derived.pop("GENERATOR", None)
    if dropped is not None:
        logger.info("ISTIO_META_GENERATOR=%r ignored for the Envoy shape", dropped)
    metadata = {**derived, **existing}
    out.id = _sidecar_id(out.id, metadata, env, dns_domain)
    if not metadata.get("INSTANCE_IPS"):
        metadata["INSTANCE_IPS"] = out.id.split("~")[1]
    out.metadata.Clear()
    try:
        out.metadata.update(metadata)
    except (ValueError, TypeError, AttributeError) as e:  # pragma: no cover - JSON values only
        raise BootstrapError(source, "node.metadata", f"not representable as google.protobuf.Struct: {e}") from None
    labels = metadata.get("LABELS")
    labels = labels if isinstance(labels, Mapping) else {}
    if not out.cluster:
        out.cluster = _service_cluster(labels, metadata)
    if not out.HasField("locality") or not (out.locality.region or out.locality.zone or out.locality.sub_zone):
        raw = labels.get(_LOCALITY_LABEL)
        if isinstance(raw, str) and raw:
            parts = raw.replace(".", "/").split("/")
            for key, value in zip(("region", "zone", "sub_zone"), parts):
                setattr(out.locality, key, value)
    return out


def _agent_metadata(env: Mapping[str, str], istio_version: str, instance_ips: Sequence[str],
                    pod_info_dir: Optional[str]) -> Dict[str, Any]:
    """istio-agent's node metadata from the environment (``GetNodeMetaData``)."""
    raw: Dict[str, Any] = {}
    proxy_config = None
    if env.get("PROXY_CONFIG"):
        try:
            proxy_config = json.loads(env["PROXY_CONFIG"])
        except json.JSONDecodeError as e:
            logger.warning("PROXY_CONFIG is not JSON (%s); not sent", e.msg)
        if not isinstance(proxy_config, dict):
            proxy_config = None
    if proxy_config is not None:
        for key, value in (proxy_config.get("proxyMetadata") or {}).items():
            if isinstance(key, str) and key.startswith(_META_PREFIX) and len(key) > len(_META_PREFIX):
                raw[key[len(_META_PREFIX):]] = value
    for key, value in env.items():
        if key.startswith(_META_PREFIX) and len(key) > len(_META_PREFIX):
            raw[key[len(_META_PREFIX):]] = value
    static_labels: Optional[Dict[str, Any]] = None
    for key, value in env.items():
        if not key.startswith(_METAJSON_PREFIX):
            continue
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as e:
            logger.warning("%s is not JSON (%s); ignored", key, e.msg)
            continue
        if not isinstance(parsed, dict):
            logger.warning("%s is not a JSON object; ignored", key)
            continue
        raw.update(parsed)  # the agent merges every ISTIO_METAJSON_* object into the metadata
        if key == "ISTIO_METAJSON_LABELS" and parsed:
            static_labels = parsed
    meta = {key: _typed(key, value) for key, value in raw.items()}
    # the agent replaces INSTANCE_IPS with the addresses it found (an ISTIO_META_INSTANCE_IPS
    # only survives when there are none)
    fallback_ips = meta.pop("INSTANCE_IPS", None)
    if proxy_config is not None:
        meta["PROXY_CONFIG"] = proxy_config
    if not meta.get("ISTIO_VERSION"):
        meta["ISTIO_VERSION"] = istio_version
    ips: List[str] = []
    first = env.get("INSTANCE_IP", "")
    for ip in ([first] if first else []) + list(instance_ips):
        try:
            ip = str(ipaddress.ip_address(ip))
        except ValueError:
            logger.warning("instance address %r is not an IP address; ignored", ip)
            continue
        if ip not in ips:
            ips.append(ip)
    if ips:
        meta["INSTANCE_IPS"] = ",".join(ips)
    elif fallback_ips:
        meta["INSTANCE_IPS"] = fallback_ips
    for var, key in (("POD_NAME", "NAME"), ("POD_NAMESPACE", "NAMESPACE"), ("SERVICE_ACCOUNT", "SERVICE_ACCOUNT")):
        if var in env:
            meta[key] = env[var]
    if static_labels is not None:
        meta["LABELS"] = _typed("LABELS", static_labels)
        meta["STATIC_LABELS"] = meta["LABELS"]
    if pod_info_dir is not None:
        pod_labels = _downward_api(os.path.join(pod_info_dir, "labels"))
        if pod_labels is not None:
            labels = dict(meta.get("STATIC_LABELS") or {})
            labels.update((k, v) for k, v in pod_labels.items() if k != _POD_TEMPLATE_HASH)
            meta["LABELS"] = labels
        annotations = _downward_api(os.path.join(pod_info_dir, "annotations"))
        if annotations is not None:
            meta["ANNOTATIONS"] = {**(meta.get("ANNOTATIONS") or {}), **annotations}
    labels = meta.get("LABELS")
    if isinstance(labels, dict) and labels.get(_LOCALITY_LABEL):
        labels[_LOCALITY_LABEL] = labels[_LOCALITY_LABEL].replace(".", "/")
    return meta


def _typed(key: str, value: Any) -> Any:
    """``value`` as the agent's round trip through istio's node metadata struct leaves it."""
    def wrong(expected: str) -> BootstrapError:
        return BootstrapError(_ENV_SOURCE, f"{_META_PREFIX}{key}",
                              f"istio's node metadata field {key} is {expected}, got {_kind(value)}")

    if key in _MAP_FIELDS:
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise wrong("an object of strings (use ISTIO_METAJSON_* for JSON values)")
        return dict(value)
    if key in _INT_FIELDS:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
            raise wrong("a number")
        return int(value)
    if key in _LIST_FIELDS:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise wrong("a list of strings")
        return list(value)
    if key in _OBJECT_FIELDS:
        if not isinstance(value, dict):
            raise wrong("an object")
        return value
    if key in _STRING_BOOL_FIELDS:
        if not isinstance(value, str) or value not in _GO_TRUE | _GO_FALSE:
            raise wrong("a boolean in a string (\"true\"/\"false\")")
        # true re-encodes as "true"; false is dropped by omitempty and the raw value comes back
        return "true" if value in _GO_TRUE else value
    if key in _STRING_FIELDS and not isinstance(value, str):
        raise wrong("a string")
    if key == "POD_PORTS":
        return _pod_ports(value)
    return value


def _pod_ports(value: str) -> str:
    """``POD_PORTS`` re-encoded as istio's ``PodPortList`` does: compact JSON of
    ``{name (omitted when empty), containerPort, protocol}`` objects, in a string."""
    def wrong(reason: str) -> BootstrapError:
        return BootstrapError(_ENV_SOURCE, "ISTIO_META_POD_PORTS", reason)

    try:
        ports = json.loads(value)
    except json.JSONDecodeError as e:
        raise wrong(f"not JSON: {e.msg}") from None
    if ports is None:
        ports = []
    if not isinstance(ports, list):
        raise wrong(f"expected a JSON list of ports, got {_kind(ports)}")
    out = []
    for i, port in enumerate(ports):
        if not isinstance(port, dict):
            raise wrong(f"port {i}: expected an object, got {_kind(port)}")
        name, number, protocol = port.get("name", ""), port.get("containerPort", 0), port.get("protocol", "")
        if not isinstance(name, str) or not isinstance(protocol, str) or isinstance(number, bool) \
                or not isinstance(number, (int, float)) or number != int(number):
            raise wrong(f"port {i}: name and protocol must be strings and containerPort a number")
        entry: Dict[str, Any] = {"name": name} if name else {}
        entry["containerPort"] = int(number)
        entry["protocol"] = protocol
        out.append(entry)
    return json.dumps(out, separators=(",", ":"))


def _downward_api(path: str) -> Optional[Dict[str, str]]:
    """A downward-API file (``key="quoted value"`` lines), or None if unreadable/invalid."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return None
    result: Dict[str, str] = {}
    for line in text.split("\n"):
        key, sep, quoted = line.partition("=")
        if not sep:
            continue
        try:
            value = json.loads(quoted)  # Go's strconv.Quote output is a JSON string for these values
        except json.JSONDecodeError:
            logger.warning("%s: cannot unquote %r; file ignored", path, quoted)
            return None
        if not isinstance(value, str):
            logger.warning("%s: %r is not a quoted string; file ignored", path, quoted)
            return None
        result[key] = value
    return result


def _valid_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _sidecar_id(current: str, metadata: Mapping[str, Any], env: Mapping[str, str], domain: Optional[str]) -> str:
    """The node id: ``current`` if it already is a sidecar's (4 ``~`` parts, an IP), else built."""
    parts = current.split("~")
    ips = [ip for ip in str(metadata.get("INSTANCE_IPS") or "").split(",") if ip]
    if len(parts) == 4 and parts[0] == "sidecar" and parts[2] and parts[3] and (
            _valid_ip(parts[1]) or (ips and all(_valid_ip(ip) for ip in ips))):
        return current
    pod, namespace = env.get("POD_NAME", ""), env.get("POD_NAMESPACE", "")
    ip = ips[0] if ips else ""
    missing = [what for what, ok in (("POD_NAME", pod), ("POD_NAMESPACE", namespace),
                                     ("INSTANCE_IP", ip and _valid_ip(ip))) if not ok]
    if missing:
        have = f"the bootstrap's node id {current!r} is not one" if current else "the bootstrap has no node id"
        raise BootstrapError(
            _ENV_SOURCE, "node.id",
            f"the Envoy shape needs a sidecar node id sidecar~<ip>~<pod>.<namespace>~<domain>; {have}, "
            f"and {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set",
        )
    new = f"sidecar~{ip}~{pod}.{namespace}~{domain or namespace + '.svc.cluster.local'}"
    if current:
        logger.info("xDS node id %r replaced by %r for the Envoy shape", current, new)
    return new


def _service_cluster(labels: Mapping[str, Any], metadata: Mapping[str, Any]) -> str:
    """istio-agent's default ``node.cluster`` (``serviceClusterOrDefault``)."""
    namespace = metadata.get("NAMESPACE") or ""
    if labels.get("app"):
        return f"{labels['app']}.{namespace}"
    if metadata.get("WORKLOAD_NAME"):
        return f"{metadata['WORKLOAD_NAME']}.{namespace}"
    return f"istio-proxy.{namespace}" if namespace else "istio-proxy"


def _kind(value: Any) -> str:
    """JSON type name of ``value`` for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__
