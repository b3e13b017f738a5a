"""Metrics: plain integers on the hot path, Prometheus text at scrape time.

Strategy: the fan-out and protocol code count in plain ``int`` attributes (no locks, no
label lookups, no mmap writes per event -- prometheus-client's multiprocess values take a
lock and write an mmap on every ``inc()``).  At scrape time a custom collector reads one
*snapshot* per worker (a flat dict of numbers) and emits the metric families, summing
across workers.  With one process there is one snapshot; a supervisor gathers one per
worker and feeds the same collector, so ``/metrics`` on the admin port always covers the
whole host.

Every metric is declared once in ``METRICS``: name, type, help and the snapshot key.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

# Buckets of the flush histograms: writes (connections) per flush and events per flush.
FLUSH_WRITE_BUCKETS = (1, 10, 100, 1_000, 5_000, 10_000, 20_000, 50_000)
FLUSH_EVENT_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 1_000)
# Milliseconds, exposed in seconds: flush duration and publish-to-flush delay.
FLUSH_MS_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 150, 250, 500, 1_000, 2_500)

# (name, kind, help, snapshot key); kind is "counter" or "gauge".  Counter names are given
# without the ``_total`` suffix; the exposition adds it.
METRICS: tuple[tuple[str, str, str, str], ...] = (
    ("ssegw_connections_open", "gauge", "Open client connections on the public listener.", "connections_open"),
    ("ssegw_streams_open", "gauge", "Open SSE streams.", "streams_open"),
    ("ssegw_slots_in_use", "gauge", "Connection-table slots in use.", "slots_in_use"),
    ("ssegw_topics_active", "gauge", "Topics with at least one local subscriber.", "topics_active"),
    ("ssegw_connections_accepted", "counter", "Accepted client connections.", "connections_accepted"),
    ("ssegw_streams_opened", "counter", "SSE streams opened.", "streams_opened"),
    ("ssegw_events_published", "counter", "Events accepted by /publish (this worker).", "events_published"),
    ("ssegw_events_delivered", "counter", "Events written to subscribers (one per subscriber).", "events_delivered"),
    ("ssegw_events_replayed", "counter", "Events sent from history on resume/since.", "events_replayed"),
    ("ssegw_bytes_written", "counter", "Bytes of event streams written to sockets.", "bytes_written"),
    ("ssegw_flushes", "counter", "Batched flushes.", "flushes"),
    ("ssegw_socket_writes", "counter", "transport.write calls made by flushes.", "writes"),
    ("ssegw_heartbeats_sent", "counter", "Heartbeat comments sent on silent streams.", "heartbeats"),
    ("ssegw_resets_sent", "counter", "ssegw.reset events sent (history gap not covered).", "resets"),
    ("ssegw_events_held", "counter", "Events held for a paused (slow) connection.", "held"),
    ("ssegw_events_conflated", "counter", "Held events replaced by a newer one with the same key.", "conflated"),
    ("ssegw_publish_requests", "counter", "Successful /publish requests.", "publish_requests"),
    ("ssegw_streams_paced", "counter", "Stream starts that waited for the start pacer (reconnect storms).", "paced"),
    ("ssegw_head_timeouts", "counter", "Connections closed for not sending a request head in time.", "head_timeouts"),
    ("ssegw_protocol_errors", "counter", "Malformed requests (garbage, oversized heads).", "protocol_errors"),
    ("ssegw_streams_closed_lifetime", "counter", "Streams closed by max_lifetime.", "closed_lifetime"),
    ("ssegw_streams_closed_expired", "counter", "Streams closed because their token expired.", "closed_expired"),
    ("ssegw_broker_up", "gauge", "Workers whose broker is reachable (Redis up).", "broker_up"),
    ("ssegw_broker_reconnects", "counter", "Broker (Redis) reconnects.", "broker_reconnects"),
    ("ssegw_broker_publish_errors", "counter", "Publishes the broker could not accept (answered 503, or 504 when unresolved).", "broker_publish_errors"),
    ("ssegw_broker_publish_retries", "counter", "Publish calls re-sent with their request token after a lost reply.", "broker_publish_retries"),
    ("ssegw_broker_gap_fills", "counter", "Gap fills from history after a broker reconnect.", "broker_gap_fills"),
    ("ssegw_broker_gap_events", "counter", "Events delivered by gap fills.", "broker_gap_events"),
    ("ssegw_broker_gaps_lost", "counter", "Gaps history could not fill (streams closed to resume).", "broker_gap_lost"),
    ("ssegw_workers", "gauge", "Worker processes running (1 without a supervisor).", "workers"),
    ("ssegw_worker_restarts", "counter", "Workers restarted by the supervisor after a crash.", "worker_restarts"),
)

LABELLED: tuple[tuple[str, str, str, str], ...] = (
    ("ssegw_http_responses", "Error responses by status code.", "status", "responses"),
    ("ssegw_slow_consumer_closed", "Connections closed by the slow-consumer policy, by reason.", "reason", "slow_closed"),
)


class SnapshotCollector(Collector):
    """Emits every metric from a list of per-worker snapshots (summed)."""

    def __init__(self, snapshots: Callable[[], Iterable[dict[str, object]]]) -> None:
        self._snapshots = snapshots

    def collect(self):  # type: ignore[no-untyped-def]
        snaps = list(self._snapshots())
        for name, kind, help_, key in METRICS:
            total = sum(float(s.get(key, 0) or 0) for s in snaps)  # type: ignore[arg-type]
            if kind == "counter":
                yield CounterMetricFamily(name, help_, value=total)
            else:
                yield GaugeMetricFamily(name, help_, value=total)
        for name, help_, label, key in LABELLED:
            fam = CounterMetricFamily(name, help_, labels=[label])
            merged: dict[str, float] = {}
            for s in snaps:
                for k, v in (s.get(key) or {}).items():  # type: ignore[union-attr]
                    merged[str(k)] = merged.get(str(k), 0) + v
            for k in sorted(merged):
                fam.add_metric([k], merged[k])
            yield fam
        for name, help_, key, bounds, scale in (
            ("ssegw_flush_batch_writes", "Socket writes per flush.", "hist_writes", FLUSH_WRITE_BUCKETS, 1),
            ("ssegw_flush_batch_events", "Events per flush.", "hist_events", FLUSH_EVENT_BUCKETS, 1),
            ("ssegw_flush_duration_seconds", "Time one flush (sweep) takes.", "hist_flush_ms", FLUSH_MS_BUCKETS,
             1000),
            ("ssegw_flush_delay_seconds", "Age of the oldest event when its flush starts (publish to sweep).",
             "hist_delay_ms", FLUSH_MS_BUCKETS, 1000),
        ):
            counts = [0] * (len(bounds) + 1)
            total_sum = 0.0
            for s in snaps:
                h = s.get(key)
                if not h:
                    continue
                for i, c in enumerate(h["counts"]):  # type: ignore[index]
                    counts[i] += c
                total_sum += h["sum"]  # type: ignore[index]
            cum = 0
            buckets = []
            for b, c in zip(bounds, counts, strict=False):
                cum += c
                buckets.append((str(b / scale) if scale != 1 else str(b), cum))
            cum += counts[-1]
            buckets.append(("+Inf", cum))
            yield HistogramMetricFamily(name, help_, buckets=buckets, sum_value=total_sum / scale)


class Histogram:
    """A fixed-bucket histogram of ints kept as plain counts (observed on every flush)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[int, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0

    def observe(self, v: int) -> None:
        self.sum += v
        for i, b in enumerate(self.bounds):
            if v <= b:
                self.counts[i] += 1
                return
        self.counts[-1] += 1

    def snapshot(self) -> dict[str, object]:
        return {"counts": list(self.counts), "sum": self.sum}


def make_registry(snapshots: Callable[[], Iterable[dict[str, object]]]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snapshots))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
