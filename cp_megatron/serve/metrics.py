"""Prometheus metrics of ``cp-megatron serve`` (``GET /metrics``, text exposition format).

    cp_megatron_ttft_seconds            histogram  submit -> first token, per request
    cp_megatron_ttit_seconds            histogram  time between a request's tokens
    cp_megatron_round_miss_rate         histogram  T / (T + P) of each prefill round
    cp_megatron_rounds_total            counter    rounds by kind and ring variant
    cp_megatron_round_sequences         histogram  sequences per round
    cp_megatron_kv_cache_bytes          gauge      K/V bytes held, per global rank
    cp_megatron_requests_in_flight      gauge      queued + generating requests
    cp_megatron_requests_running        gauge      generating requests (vLLM's num_requests_running)
    cp_megatron_requests_waiting        gauge      queued requests (vLLM's num_requests_waiting)
    cp_megatron_requests_total          counter    finished requests by finish_reason ("stop",
                                                   "length", "error": this request's sampling failed)
    cp_megatron_kv_offloads_total       counter    idle sequences moved to the host tier
    cp_megatron_kv_restores_total       counter    host-tier sequences restored onto the device
    cp_megatron_host_kv_evictions_total counter    host-tier entries dropped (its LRU, past its budget)
    cp_megatron_host_kv_cache_bytes     gauge      K/V bytes held in the host tier, per global rank
    cp_megatron_kv_offload_bytes_total  counter    K/V bytes copied device -> host, per global rank
    cp_megatron_kv_restore_bytes_total  counter    K/V bytes copied host -> device, per global rank
    cp_megatron_kv_restore_seconds_total counter   time spent restoring, per global rank (s)

Source: Prometheus exposition format (prometheus_client); TTFT / TTIT as in arXiv
2411.01783 §4.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_TIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServeMetrics:
    """One registry per server (not the process-global one)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.ttft = Histogram("cp_megatron_ttft_seconds", "Time to first token (s)", registry=r,
                              buckets=_TIME_BUCKETS)
        self.ttit = Histogram("cp_megatron_ttit_seconds", "Time between tokens of a request (s)",
                              registry=r, buckets=_TIME_BUCKETS)
        self.miss_rate = Histogram("cp_megatron_round_miss_rate", "Miss rate T/(T+P) of prefill rounds",
                                   registry=r, buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 0.99, 1.0))
        self.rounds = Counter("cp_megatron_rounds", "Rounds run, by kind and ring variant",
                              ["kind", "variant"], registry=r)
        self.round_seqs = Histogram("cp_megatron_round_sequences", "Sequences per round", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.kv_bytes = Gauge("cp_megatron_kv_cache_bytes", "K/V bytes held by each rank", ["rank"],
                              registry=r)
        self.kv_capacity = Gauge("cp_megatron_kv_cache_capacity_bytes",
                                 "K/V storage each rank has reserved (bytes)", ["rank"], registry=r)
        self.in_flight = Gauge("cp_megatron_requests_in_flight", "Requests queued or generating", registry=r)
        self.running = Gauge("cp_megatron_requests_running", "Requests generating", registry=r)
        self.waiting = Gauge("cp_megatron_requests_waiting", "Requests queued for admission", registry=r)
        self.requests = Counter("cp_megatron_requests", "Finished requests by finish reason",
                                ["finish_reason"], registry=r)
        self.offloads = Counter("cp_megatron_kv_offloads", "Idle sequences moved to the host tier", registry=r)
        self.restores = Counter("cp_megatron_kv_restores", "Host-tier sequences restored onto the device",
                                registry=r)
        self.host_evictions = Counter("cp_megatron_host_kv_evictions",
                                      "Host-tier entries dropped, least recently used first", registry=r)
        self.host_bytes = Gauge("cp_megatron_host_kv_cache_bytes", "K/V bytes held in the host tier by each rank",
                                ["rank"], registry=r)
        self.offload_bytes = Counter("cp_megatron_kv_offload_bytes", "K/V bytes copied device -> host by each rank",
                                     ["rank"], registry=r)
        self.restore_bytes = Counter("cp_megatron_kv_restore_bytes", "K/V bytes copied host -> device by each rank",
                                     ["rank"], registry=r)
        self.restore_seconds = Counter("cp_megatron_kv_restore_seconds", "Time each rank spent restoring (s)",
                                       ["rank"], registry=r)
        self._totals: dict[tuple[str, int], float] = {}     # last totals seen per (counter, rank)

    def on_first_token(self, ttft_s: float) -> None:
        self.ttft.observe(ttft_s)

    def on_token(self, ttit_s: float) -> None:
        self.ttit.observe(ttit_s)

    def on_round(self, kind: str, metrics, num_seqs: int) -> None:
        self.rounds.labels(kind, metrics.strategy).inc()
        self.round_seqs.observe(num_seqs)
        if kind == "prefill":
            self.miss_rate.observe(metrics.miss_rate)

    def on_finish(self, finish_reason: str) -> None:
        self.requests.labels(finish_reason).inc()

    def on_host_tier(self, offloads: int, restores: int, drops: int) -> None:
        """A round moved ``offloads`` sequences to the host tier, restored ``restores`` and
        dropped ``drops`` host entries."""
        self.offloads.inc(offloads)
        self.restores.inc(restores)
        self.host_evictions.inc(drops)

    def kv_cache_bytes(self, per_rank: list[tuple]) -> None:
        """``per_rank``: of each rank, (K/V bytes held, bytes reserved) and optionally
        (host-tier bytes held, bytes offloaded so far, bytes restored so far, restore time
        so far in ns): the totals become counter increments."""
        for rank, row in enumerate(per_rank):
            label = str(rank)
            self.kv_bytes.labels(label).set(row[0])
            self.kv_capacity.labels(label).set(row[1])
            if len(row) < 6:
                continue
            self.host_bytes.labels(label).set(row[2])
            for name, counter, total in (("offload", self.offload_bytes, row[3]),
                                         ("restore", self.restore_bytes, row[4]),
                                         ("seconds", self.restore_seconds, row[5] / 1e9)):
                key = (name, rank)
                delta = total - self._totals.get(key, 0)
                if delta > 0:
                    counter.labels(label).inc(delta)
                    self._totals[key] = total
                else:
                    counter.labels(label)             # the sample exists (0) from the start

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
