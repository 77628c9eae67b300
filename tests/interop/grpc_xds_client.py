"""A proxyless gRPC client (grpcio's built-in xDS support) driven over stdin, for the interop tests.

Run with ``GRPC_XDS_BOOTSTRAP`` set: ``python grpc_xds_client.py xds:///greeter``. It prints
``ready``, then answers every stdin line with one stdout line: ``ok <reply>`` or
``err <status> <details>`` for one unary call of ``/meshcore.test.Echo/Hello`` (raw bytes).
"""

from __future__ import annotations

import sys

import grpc


def main(target: str) -> int:
    channel = grpc.insecure_channel(target)
    hello = channel.unary_unary("/meshcore.test.Echo/Hello")  # no serializers: bytes in, bytes out
    print("ready", flush=True)
    for _ in sys.stdin:
        try:
            reply = hello(b"hi", timeout=5)
            print("ok " + reply.decode(), flush=True)
        except grpc.RpcError as exc:
            details = (exc.details() or "").replace("\n", " ")
            print(f"err {exc.code().name} {details}", flush=True)
    channel.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
