"""Serve the endpoints of a mesh resource file on loopback, for trying the README's examples.

    python examples/upstreams.py [examples/mesh.yaml]

Every endpoint of every ClusterLoadAssignment in the file gets a server on its address and port:
an HTTP/1.1 server answering any request with ``<cluster> <ip:port> <METHOD> <path>``, or, for a
cluster configured for HTTP/2, a gRPC server whose every unary method answers those bytes
(``<cluster> <ip:port> <method>``). So each answer says which version (cluster) and which
instance served it. Ctrl-C stops them.
"""

from __future__ import annotations

import os
import sys
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, List, Tuple

from meshcore.xds.cluster_config import cluster_spec
from meshcore.xds.model import CLUSTER, ENDPOINT
from meshcore.xds.resource_file import load_resource_file

HERE = os.path.dirname(os.path.abspath(__file__))


def endpoints(path: str) -> List[Tuple[str, str, int, bool]]:
    """``(cluster, address, port, grpc)`` for every endpoint in the resource file ``path``."""
    resources = load_resource_file(path)
    grpc_clusters = {name for name, c in resources.get(CLUSTER, {}).items() if cluster_spec(c).http2}
    found = []
    for name, cla in resources.get(ENDPOINT, {}).items():
        for locality in cla.endpoints:
            for lb_endpoint in locality.lb_endpoints:
                sa = lb_endpoint.endpoint.address.socket_address
                found.append((name, sa.address, sa.port_value, name in grpc_clusters))
    return found


def serve_http(cluster: str, address: str, port: int) -> ThreadingHTTPServer:
    """An HTTP server on ``address:port`` (0: any free port) answering as ``cluster``; serving in a
    daemon thread. ``server.server_address`` has the port; ``server.shutdown()`` stops it."""

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            self.rfile.read(length)
            host, bound = self.server.server_address[:2]
            body = f"{cluster} {host}:{bound} {self.command} {self.path}".encode()
            self.send_response(200)
            self.send_header("content-type", "text/plain")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _answer
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request: Any, client_address: Any) -> None:
            if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that went away: quiet
                super().handle_error(request, client_address)

    server = Server((address, port), Handler)
    threading.Thread(target=server.serve_forever, name=f"upstream-{cluster}", daemon=True).start()
    return server


def serve_grpc(cluster: str, address: str, port: int) -> Tuple[Any, int]:
    """A gRPC server on ``address:port`` (0: any free port) whose every unary method answers
    ``b"<cluster> <ip:port> <method>"``; returns ``(server, port)``; ``server.stop(0)`` stops it."""
    import grpc

    class Any_(grpc.GenericRpcHandler):
        def service(self, details: Any) -> Any:
            method = details.method

            def answer(request: bytes, context: Any) -> bytes:
                return f"{cluster} {address}:{bound} {method}".encode()

            return grpc.unary_unary_rpc_method_handler(answer)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((Any_(),))
    bound = server.add_insecure_port(f"{address}:{port}")
    server.start()
    return server, bound


def main(argv: List[str]) -> int:
    path = argv[0] if argv else os.path.join(HERE, "mesh.yaml")
    stop = []
    for cluster, address, port, grpc in endpoints(path):
        if grpc:
            server, _ = serve_grpc(cluster, address, port)
            stop.append(lambda s=server: s.stop(0))
        else:
            stop.append(serve_http(cluster, address, port).shutdown)
        print(f"{cluster:12} {'gRPC' if grpc else 'HTTP'} {address}:{port}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    for s in stop:
        s()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
