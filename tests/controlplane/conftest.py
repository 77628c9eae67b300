"""Fixtures: a started control plane and raw ADS streams to it (closed at teardown)."""

from __future__ import annotations

from typing import Callable, Iterator, List

import pytest

from meshcore.controlplane import ControlPlane

from .ads_client import AdsStream


@pytest.fixture
def cp() -> Iterator[ControlPlane]:
    with ControlPlane() as plane:
        yield plane


@pytest.fixture
def open_stream(cp: ControlPlane) -> Iterator[Callable[..., AdsStream]]:
    streams: List[AdsStream] = []

    def open_(mode: str = "sotw", **kwargs) -> AdsStream:
        stream = AdsStream(cp.address, mode, **kwargs)
        streams.append(stream)
        return stream

    yield open_
    for stream in streams:
        stream.close()
