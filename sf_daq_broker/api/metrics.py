"""Prometheus metrics of one broker instance (its own registry, so tests can run several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "BrokerMetrics"]


class BrokerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "sf_daq_http_requests",
            "HTTP requests by endpoint and outcome (ok, refused, error)",
            ["endpoint", "outcome"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "sf_daq_http_request_duration_seconds",
            "Time to answer an HTTP request",
            ["endpoint"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.jobs = Gauge(
            "sf_daq_jobs",
            "Jobs by source kind and state, from the broker's status store",
            ["kind", "state"],
            registry=self.registry,
        )
        self.refused = Gauge(
            "sf_daq_refused_messages",
            "Undecodable status messages this broker moved to the dead-letter queue",
            registry=self.registry,
        )

    def render(self, job_counts: dict[tuple[str, str], int], refused: int = 0) -> bytes:
        for (kind, state), count in job_counts.items():
            self.jobs.labels(kind, state).set(count)
        self.refused.set(refused)
        return generate_latest(self.registry)
