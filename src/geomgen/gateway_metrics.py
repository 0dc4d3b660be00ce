"""GET /metrics: the broker's health figures (per backend and per stage) as
Prometheus metrics, read at each scrape, beside the gateway's own counters.
One registry per gateway app, so two apps in a process never collide.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from geomgen.errors import GeomgenError

if TYPE_CHECKING:
    from geomgen.gateway import BatchCounts
    from geomgen.gateway_app import Gateway

log = logging.getLogger("geomgen.gateway")

BROKER_COUNTERS = ("accepted", "rejected", "completed", "failed", "cancelled", "retried", "sdf_repushed",
                   "clients_lost", "jobs_dropped", "results_undelivered")
STAGE_MEANS = {"queue_wait": "avg_queue_wait_s", "generate": "avg_generate_s", "convert": "avg_convert_s",
               "total": "avg_total_s"}


class _BrokerCollector:
    """Asks the broker for its health at each scrape."""

    def __init__(self, gateway: "Gateway") -> None:
        self.gateway = gateway

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("geomgen_broker_up", "1 when the broker answered its health query")
        try:
            stats = self.gateway.health_stats()
        except GeomgenError as exc:
            log.warning("metrics: the broker did not answer: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        jobs = CounterMetricFamily("geomgen_broker_jobs", "Requests by outcome since the broker started",
                                   labels=["outcome"])
        for name in BROKER_COUNTERS:
            jobs.add_metric([name], stats.get(name, 0))
        yield jobs
        per_backend = CounterMetricFamily("geomgen_backend_jobs", "GPU jobs by backend and outcome",
                                          labels=["backend", "outcome"])
        workers = GaugeMetricFamily("geomgen_backend_workers", "GPU workers by backend and state",
                                    labels=["backend", "state"])
        queued = GaugeMetricFamily("geomgen_backend_queued", "Requests waiting for a worker", labels=["backend"])
        for backend, figures in sorted(stats.get("backends", {}).items()):
            for outcome in ("completed", "failed", "lost"):
                per_backend.add_metric([backend, outcome], figures.get(outcome, 0))
            for state in ("alive", "busy", "idle"):
                workers.add_metric([backend, state], figures.get(state, 0))
            queued.add_metric([backend], figures.get("queued", 0))
        yield per_backend
        yield workers
        yield queued
        stage = GaugeMetricFamily("geomgen_stage_seconds_mean", "Mean seconds per job, by stage", labels=["stage"])
        for name, key in STAGE_MEANS.items():
            stage.add_metric([name], stats.get(key, 0.0))
        yield stage
        yield GaugeMetricFamily("geomgen_queue_wait_seconds_max", "Longest queue wait seen",
                                value=stats.get("max_queue_wait_s", 0.0))
        in_flight = GaugeMetricFamily("geomgen_jobs_in_flight", "Jobs by state", labels=["state"])
        for state, count in stats.get("jobs", {}).items():
            in_flight.add_metric([state], count)
        yield in_flight
        yield GaugeMetricFamily("geomgen_sdf_slots", "SDF conversion slots", value=stats.get("sdf_slots", 0))
        yield GaugeMetricFamily("geomgen_sdf_free", "Free SDF conversion slots", value=stats.get("sdf_free", 0))
        yield GaugeMetricFamily("geomgen_broker_uptime_seconds", "Broker uptime", value=stats.get("uptime_s", 0.0))


class Metrics:
    """The gateway's own counters, and the registry that /metrics renders."""

    def __init__(self, gateway: "Gateway") -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("geomgen_gateway_http_requests", "HTTP requests by route, method and status",
                                ["route", "method", "status"], registry=self.registry)
        self.request_seconds = Histogram("geomgen_gateway_http_request_seconds", "HTTP request durations "
                                         "(a whole stream for /generate_geometries)", ["route"],
                                         registry=self.registry)
        self.items = Counter("geomgen_gateway_items", "Items answered, by outcome (cached: from a finished item)",
                             ["outcome"], registry=self.registry)
        self.item_seconds = Histogram("geomgen_gateway_item_seconds", "Seconds from a batch's start to an item's line",
                                      registry=self.registry, buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 120,
                                                                        300, 600, 1800, float("inf")))
        self.active = Gauge("geomgen_gateway_active_batches", "Batches streaming now", registry=self.registry)
        self.registry.register(_BrokerCollector(gateway))
        self.gateway = gateway
        self.totals = {"success": 0, "error": 0, "cached": 0}  # the same counts, for /health

    def request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.request_seconds.labels(route).observe(seconds)

    def batch(self, counts: "BatchCounts") -> None:
        for outcome in ("success", "error", "cached"):
            if getattr(counts, outcome):
                self.items.labels(outcome).inc(getattr(counts, outcome))
                self.totals[outcome] += getattr(counts, outcome)
        for seconds in counts.item_seconds:
            self.item_seconds.observe(seconds)

    def summary(self) -> dict:
        """The gateway's figures for /health."""
        return {"active_batches": len(self.gateway.stops), "items": dict(self.totals),
                "finished_remembered": len(self.gateway.finished)}

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text and its content type (blocking: asks the broker)."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
