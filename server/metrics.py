"""Prometheus metrics, one registry per app (so that several apps in one process stay apart)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# The text format generate_latest writes. Set as the whole header: Litestar would append a second charset to a
# text/ media type, and Prometheus 3 refuses to scrape a Content-Type with a duplicate parameter.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
RENDER_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("sdserve_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.render_seconds = Histogram("sdserve_render_seconds", "seconds per render, queue excluded", ["model"],
                                        buckets=RENDER_BUCKETS, registry=r)
        self.queue_depth = Gauge("sdserve_queue_depth", "requests waiting for a render slot", ["model"], registry=r)
        self.in_flight = Gauge("sdserve_renders_in_flight", "renders running now", ["model"], registry=r)
        self.model_load_failures = Counter("sdserve_model_load_failures", "models that failed to load", ["model"],
                                           registry=r)
        self.unet_batch_rows = Histogram("sdserve_unet_batch_rows", "UNet rows per step of the step-level "
                                         "batcher (calls of at most --max-batch rows)", ["model"],
                                         buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64), registry=r)
        self.batch_wait = Histogram("sdserve_batch_wait_seconds", "seconds from a batching render slot taking a "
                                    "request to its first UNet step (window and turns)", ["model"],
                                    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10), registry=r)
        self.images = Counter("sdserve_images", "images produced", ["model"], registry=r)
        # router role
        self.node_requests = Counter("sdserve_node_requests", "requests sent to each node", ["node"], registry=r)
        self.node_failures = Counter("sdserve_node_failures", "requests a node failed or refused", ["node"],
                                     registry=r)
        self.retries = Counter("sdserve_retries", "requests retried on another node", registry=r)
        self.node_latency = Histogram("sdserve_node_seconds", "seconds per request to each node", ["node"],
                                      buckets=RENDER_BUCKETS, registry=r)
        self.nodes_healthy = Gauge("sdserve_nodes_healthy", "nodes in rotation", registry=r)

    def text(self) -> bytes:
        return generate_latest(self.registry)
