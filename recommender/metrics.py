"""The recommender app's Prometheus metrics, in one CollectorRegistry per app (tests run several apps in a process).

`GET /metrics` serves them (Prometheus text format):

    productlens_recommender_request_duration_seconds  {method, endpoint, status}  histogram: each HTTP request from
                                       the app receiving it to its last byte sent; endpoint is the route's path
                                       template (/v1/products/{product_id}), "(unmatched)" for no route
    productlens_recommender_hop_duration_seconds  {endpoint, hop}  histogram: the time a request spent in each hop:
                                       upload (form + image checks), model (the gRPC call), db, rank (the
                                       Server-Timing header's hops, which are the same numbers)
    productlens_recommender_model_calls_total  {label, version, outcome}  model calls by the version label asked for
                                       (stable, canary; latest when none, pinned with PRODUCTLENS_MODEL_VERSION), the
                                       version that answered ("" when none did) and outcome: ok, or the gRPC code
    productlens_recommender_canary_fallbacks_total  {reason}  requests sent to canary and answered by the stable label
                                       because the server had no canary (label_unknown) or not its version (not_loaded)
    productlens_recommender_canary_share  gauge: the share of requests sent to the canary label (configured)
    productlens_recommender_kb_cache_total  {result}  candidate-row reads: hit (from the ranking cache) or miss (the
                                       database)
    productlens_recommender_kb_builds_total  knowledge-base builds the app has seen (1 at start, +1 per rebuild)

The model server's own metrics (serving/metrics.py) use TF Serving's names; serving/k8s/monitoring/ has the
Prometheus scrape config and the Grafana dashboard that read both.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

PREFIX = "productlens_recommender_"
REQUEST_DURATION = f"{PREFIX}request_duration_seconds"
HOP_DURATION = f"{PREFIX}hop_duration_seconds"
MODEL_CALLS = f"{PREFIX}model_calls"
CANARY_FALLBACKS = f"{PREFIX}canary_fallbacks"
CANARY_SHARE = f"{PREFIX}canary_share"
KB_CACHE = f"{PREFIX}kb_cache"
KB_BUILDS = f"{PREFIX}kb_builds"
UNMATCHED = "(unmatched)"
OK = "ok"
# A request takes milliseconds (a cached ranking) to seconds (a model server under load); hops go lower.
REQUEST_BUCKETS_S = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
HOP_BUCKETS_S = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)


class RecommenderMetrics:
    """Every metric of one recommender app; thread-safe (prometheus-client's own locks)."""

    def __init__(self, canary_share: float = 0.0) -> None:
        self.registry = CollectorRegistry()
        self._requests = Histogram(
            REQUEST_DURATION,
            "HTTP requests of the recommender app, by route and status: time from receiving the request to the "
            "last byte of the answer.",
            ("method", "endpoint", "status"),
            buckets=REQUEST_BUCKETS_S,
            registry=self.registry,
        )
        self._hops = Histogram(
            HOP_DURATION,
            "Time a request spent in each hop: upload (form and image checks), model (gRPC call), db, rank.",
            ("endpoint", "hop"),
            buckets=HOP_BUCKETS_S,
            registry=self.registry,
        )
        self._model_calls = Counter(
            MODEL_CALLS,
            "Model server calls by the version label asked for, the version that answered, and the outcome (ok or "
            "the gRPC status code).",
            ("label", "version", "outcome"),
            registry=self.registry,
        )
        self._fallbacks = Counter(
            CANARY_FALLBACKS,
            "Requests routed to the canary label that the stable label answered: the server had no canary label "
            "(label_unknown) or no loaded version for it (not_loaded).",
            ("reason",),
            registry=self.registry,
        )
        share = Gauge(
            CANARY_SHARE, "The configured share of requests sent to the canary label.", registry=self.registry
        )
        share.set(canary_share)
        self._cache = Counter(
            KB_CACHE,
            "Candidate-row reads by result: hit (the ranking cache) or miss (the knowledge base).",
            ("result",),
            registry=self.registry,
        )
        self._builds = Counter(KB_BUILDS, "Knowledge-base builds this app has seen.", registry=self.registry)

    def request(self, method: str, endpoint: str, status: int, seconds: float, hops_ms: dict[str, float]) -> None:
        self._requests.labels(method, endpoint, str(status)).observe(seconds)
        for hop, ms in hops_ms.items():
            self._hops.labels(endpoint, hop).observe(ms / 1000)

    def model_call(self, label: str, version: int | None, outcome: str) -> None:
        self._model_calls.labels(label, "" if version is None else str(version), outcome).inc()

    def canary_fallback(self, reason: str) -> None:
        self._fallbacks.labels(reason).inc()

    def kb_cache(self, hits: int, misses: int) -> None:
        if hits:
            self._cache.labels("hit").inc(hits)
        if misses:
            self._cache.labels("miss").inc(misses)

    def kb_build(self) -> None:
        self._builds.inc()

    def page(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_PLAIN_0_0_4
