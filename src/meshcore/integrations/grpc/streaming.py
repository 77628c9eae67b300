"""Streaming RPCs (unary-stream, stream-unary, stream-stream): routed and picked once per call,
no retries (see :meth:`_MultiCallable._stream`)."""

from __future__ import annotations

from typing import Any, Iterator, Optional, Tuple

import grpc

from ._types import Metadata
from .multicallable import _MultiCallable


class _UnaryStream(_MultiCallable, grpc.UnaryStreamMultiCallable):
    _kind = "unary_stream"

    def __call__(self, request: Any, timeout: Optional[float] = None, metadata: Metadata = None,
                 credentials: Optional[grpc.CallCredentials] = None, wait_for_ready: Optional[bool] = None,
                 compression: Optional[grpc.Compression] = None) -> Any:
        return self._stream(lambda mc, t, md, req: mc(req, timeout=t, metadata=md, credentials=credentials,
                                                      wait_for_ready=wait_for_ready, compression=compression),
                            timeout, metadata, request, False, True)


class _StreamUnary(_MultiCallable, grpc.StreamUnaryMultiCallable):
    _kind = "stream_unary"

    def __call__(self, request_iterator: Iterator[Any], timeout: Optional[float] = None, metadata: Metadata = None,
                 credentials: Optional[grpc.CallCredentials] = None, wait_for_ready: Optional[bool] = None,
                 compression: Optional[grpc.Compression] = None) -> Any:
        return self.future(request_iterator, timeout, metadata, credentials, wait_for_ready, compression).result()

    def with_call(self, request_iterator: Iterator[Any], timeout: Optional[float] = None, metadata: Metadata = None,
                  credentials: Optional[grpc.CallCredentials] = None, wait_for_ready: Optional[bool] = None,
                  compression: Optional[grpc.Compression] = None) -> Tuple[Any, grpc.Call]:
        fut = self.future(request_iterator, timeout, metadata, credentials, wait_for_ready, compression)
        return fut.result(), fut

    def future(self, request_iterator: Iterator[Any], timeout: Optional[float] = None, metadata: Metadata = None,
               credentials: Optional[grpc.CallCredentials] = None, wait_for_ready: Optional[bool] = None,
               compression: Optional[grpc.Compression] = None) -> Any:
        return self._stream(lambda mc, t, md, req: mc.future(req, timeout=t, metadata=md,
                                                             credentials=credentials, wait_for_ready=wait_for_ready,
                                                             compression=compression),
                            timeout, metadata, request_iterator, True, False)


class _StreamStream(_MultiCallable, grpc.StreamStreamMultiCallable):
    _kind = "stream_stream"

    def __call__(self, request_iterator: Iterator[Any], timeout: Optional[float] = None, metadata: Metadata = None,
                 credentials: Optional[grpc.CallCredentials] = None, wait_for_ready: Optional[bool] = None,
                 compression: Optional[grpc.Compression] = None) -> Any:
        return self._stream(lambda mc, t, md, req: mc(req, timeout=t, metadata=md, credentials=credentials,
                                                      wait_for_ready=wait_for_ready, compression=compression),
                            timeout, metadata, request_iterator, True, True)
