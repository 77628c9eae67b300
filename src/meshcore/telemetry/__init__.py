"""Telemetry of the requests made (and served) through meshcore.

The request lifecycle fills a :class:`~meshcore.telemetry.record.RequestRecord` at the end of
every request and hands it to the sinks of ``mesh.telemetry`` (:class:`Telemetry`). Nothing is
built, sent or recorded while no sink is registered. Sinks: Istio's standard metrics
(``mesh.telemetry.enable_istio_metrics()`` or ``MESHCORE_ISTIO_METRICS=1``; exposed by
``mesh.prometheus_collector()``), access logs.

Modules: ``record`` (the record, ``Telemetry``), ``outcome`` (the hook: Envoy's response code and
flags), ``istio_metrics`` (the Istio sink), ``peer_metadata`` (Istio's x-envoy-peer-metadata
exchange), ``access_log``.

This package imports neither ``prometheus_client`` nor OpenTelemetry; the sinks that need them
import them when enabled.
"""

from __future__ import annotations

from .record import RequestRecord, Sink, Telemetry

__all__ = ["RequestRecord", "Sink", "Telemetry"]
