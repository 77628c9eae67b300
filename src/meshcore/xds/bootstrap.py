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
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Tuple, Union
from urllib.parse import quote, unquote, urlsplit

from envoy.config.core.v3 import base_pb2

from ..errors import ConfigError

if TYPE_CHECKING:
    import grpc  # imported by channel_credentials (loading a bootstrap needs no grpc)

__all__ = [
    "API_TYPES",
    "CLIENT_FEATURES",
    "ENV_BOOTSTRAP_CONFIG",
    "ENV_BOOTSTRAP_FILE",
    "SUPPORTED_CHANNEL_CREDS",
    "Authority",
    "Bootstrap",
    "BootstrapError",
    "CertificateProvider",
    "ChannelCreds",
    "XdsServer",
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
