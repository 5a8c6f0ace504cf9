"""`/metrics` in Prometheus' text format: requests by how they ended, tokens, latencies (observed as requests
end), and at each scrape the engine's state (requests running and waiting, KV blocks, draft acceptance)."""
from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from specbeam.serve.admission import Admission

STATES = ("finished", "aborted", "failed", "rejected", "invalid")
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class _EngineCollector:
    """Read at each scrape: `engine.core.metrics()` and the server's own queue."""

    def __init__(self, core, admission: Admission):
        self.core, self.admission = core, admission

    def collect(self):
        m = self.core.metrics()
        waiting = m["requests_waiting"] + self.admission.waiting
        requests = GaugeMetricFamily("specbeam_num_requests", "Requests running in the engine, and waiting for "
                                     "it (in the server's queue or the engine's)", labels=["state"])
        requests.add_metric(["running"], m["requests_running"])
        requests.add_metric(["waiting"], waiting)
        yield requests
        yield GaugeMetricFamily("specbeam_queue_depth", "Requests waiting to run", value=waiting)
        yield GaugeMetricFamily("specbeam_kv_blocks_used", "KV cache blocks in use", value=m["kv_blocks_used"])
        yield GaugeMetricFamily("specbeam_kv_blocks_total", "KV cache blocks in the pool", value=m["kv_blocks_total"])
        accepted = CounterMetricFamily("specbeam_draft_accepted_tokens", "Drafted tokens accepted at draft depth d "
                                       "(speculative rounds that accepted at least d)", labels=["depth"])
        for depth, count in enumerate(m["accepted_by_depth"], start=1):
            accepted.add_metric([str(depth)], count)
        yield accepted
        yield CounterMetricFamily("specbeam_draft_tokens", "Tokens drafted", value=m["drafted_tokens"])


class ServerMetrics:
    def __init__(self, core, admission: Admission):
        disable_created_metrics()  # no `_created` series: the server owns its process
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("specbeam_requests", "Requests by how they ended", ["state"], registry=registry)
        for state in STATES:
            self.requests.labels(state)
        self.prompt_tokens = Counter("specbeam_prompt_tokens", "Prompt tokens of requests run", registry=registry)
        self.generation_tokens = Counter("specbeam_generation_tokens", "Tokens generated", registry=registry)
        self.ttft = Histogram("specbeam_time_to_first_token_seconds", "From arrival to the first generated token",
                              buckets=LATENCY_BUCKETS, registry=registry)
        self.per_token = Histogram("specbeam_time_per_output_token_seconds", "A request's mean time per generated "
                                   "token after its first", buckets=TOKEN_BUCKETS, registry=registry)
        self.e2e = Histogram("specbeam_e2e_request_latency_seconds", "From arrival to the last token",
                             buckets=LATENCY_BUCKETS, registry=registry)
        registry.register(_EngineCollector(core, admission))

    def count(self, state: str) -> None:
        self.requests.labels(state).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
