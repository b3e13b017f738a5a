"""Metrics: plain integers on the hot path, Prometheus text at scrape time.

Strategy: the fan-out and protocol code count in plain ``int`` attributes (no locks, no
label lookups, no mmap writes per event -- prometheus-client's multiprocess values take a
lock and write an mmap on every ``inc()``).  At scrape time a custom collector reads one
*snapshot* per worker (a flat dict of numbers) and emits the metric families, summing
across workers.  With one process there is one snapshot; a supervisor gathers one per
worker (plus its own: ``worker_restarts``, ``watchdog_misses``) and feeds the same
collector, so ``/metrics`` on the admin port always covers the whole host.

Every metric is declared once, here: ``METRICS`` (plain counters and gauges),
``LABELLED`` (counters with one label), ``HISTOGRAMS``.  The README's "Metrics" table
lists the same names; ``tests/test_metrics_honest.py`` checks the two agree.

Labels are bounded by construction: a labelled counter either has a fixed set of values
declared here (anything else a snapshot carries is folded into ``other``) or takes HTTP
status codes.  No label ever holds a topic, an address or a path.

Histograms observe only things that happened: a flush that wrote nothing is not a flush,
a publish that got no answer (its client left) has no duration.  Durations are float
seconds (``Histogram.observe`` takes floats), so ``_sum`` is exact, not a sum of truncated
milliseconds.  Weakness: timestamps that come from an event (``Event.ts_ms``) are whole
milliseconds of the wall clock of whoever numbered the event (this process with the
embedded broker, the Redis server with Redis), so the two event-age histograms have 1 ms
resolution and, with Redis on another host, include the clock offset between the hosts.

``process_*`` metrics are prometheus-client's ``ProcessCollector`` for the process that
answers ``/metrics``: the worker itself when there is one process, the *supervisor* when
there are several (per-worker memory and CPU are in ``/admin/stats``: ``rss_bytes``,
``cpu_seconds``).
"""

from __future__ import annotations

import platform
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from . import __version__

# -- histogram buckets ----------------------------------------------------------------------
# Counts per flush: socket writes (connections reached) and events carried.
FLUSH_WRITE_BUCKETS: tuple[float, ...] = (1, 10, 100, 1_000, 5_000, 10_000, 20_000, 50_000)
FLUSH_EVENT_BUCKETS: tuple[float, ...] = (1, 2, 5, 10, 20, 50, 100, 1_000)
# Seconds.  A sweep to a handful of streams takes tens of microseconds, one over 10,000
# streams 100-200 ms (tuning.md); the old millisecond boundaries are kept so dashboards
# built on them still line up.
FLUSH_SECONDS_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0)
# Event ages (flush delay, delivery lag): whole-millisecond timestamps, so nothing below 1 ms.
EVENT_AGE_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# A publish on the embedded broker is answered in ~30-100 us; through Redis in a round trip
# or two; an ambiguous one waits up to the broker's resolve timeout (tens of seconds).
PUBLISH_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0)
# The tick is a 50 ms timer; libuv fires timers on whole milliseconds, so an idle loop shows
# 0-1 ms.  Past 50 ms a tick was missed entirely.
LOOP_LAG_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

# -- metric declarations --------------------------------------------------------------------

# (name, kind, help, snapshot key); kind is "counter" or "gauge".  Counter names are given
# without the ``_total`` suffix; the exposition adds it.
METRICS: tuple[tuple[str, str, str, str], ...] = (
    ("ssegw_connections_open", "gauge", "Open client connections on the public listener.", "connections_open"),
    ("ssegw_connections_max", "gauge",
     "Public connections taken before new ones are refused (max_connections, or the open-files budget if lower).",
     "connections_max"),
    ("ssegw_streams_open", "gauge", "Open SSE streams.", "streams_open"),
    ("ssegw_slots_in_use", "gauge", "Connection-table slots in use.", "slots_in_use"),
    ("ssegw_topics_active", "gauge", "Topics with at least one local subscriber.", "topics_active"),
    ("ssegw_connections_accepted", "counter", "Accepted client connections.", "connections_accepted"),
    ("ssegw_streams_opened", "counter", "SSE streams opened.", "streams_opened"),
    ("ssegw_events_published", "counter", "Events accepted by /publish (this worker).", "events_published"),
    ("ssegw_events_delivered", "counter", "Events written to subscribers (one per subscriber).", "events_delivered"),
    ("ssegw_events_replayed", "counter", "Events sent from history on resume/since.", "events_replayed"),
    ("ssegw_bytes_written", "counter", "Bytes of event streams written to sockets.", "bytes_written"),
    ("ssegw_flushes", "counter",
     "Flush sweeps completed, including sweeps that wrote nothing (every subscriber held).", "flushes"),
    ("ssegw_socket_writes", "counter", "transport.write calls made by flushes.", "writes"),
    ("ssegw_heartbeats_sent", "counter", "Heartbeat comments sent on silent streams.", "heartbeats"),
    ("ssegw_resets_sent", "counter", "ssegw.reset events sent (history gap not covered).", "resets"),
    ("ssegw_compacted_sent", "counter", "ssegw.compacted events sent (resumes replayed as changed keys).",
     "compacted"),
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
    ("ssegw_broker_publish_errors", "counter",
     "Publishes the broker could not accept (answered 503, or 504 when unresolved).", "broker_publish_errors"),
    ("ssegw_broker_publish_retries", "counter",
     "Publish calls re-sent with their request token after a lost reply.", "broker_publish_retries"),
    ("ssegw_broker_gap_fills", "counter", "Gap fills from history after a broker reconnect.", "broker_gap_fills"),
    ("ssegw_broker_gap_events", "counter", "Events delivered by gap fills.", "broker_gap_events"),
    ("ssegw_broker_gaps_lost", "counter", "Gaps history could not fill (streams closed to resume).", "broker_gap_lost"),
    ("ssegw_upstream_streams", "gauge", "Upstream streams of shared routes this gateway holds (their lease).",
     "upstream_streams"),
    ("ssegw_upstream_down", "gauge", "Held upstream streams that are down (reconnecting).", "upstream_down"),
    ("ssegw_upstream_connects", "counter", "Upstream streams opened (200 text/event-stream answers).",
     "upstream_connects"),
    ("ssegw_upstream_events", "counter", "Upstream events published into their topics.", "upstream_events"),
    ("ssegw_upstream_publish_errors", "counter", "Upstream events the broker could not take (lost).",
     "upstream_publish_errors"),
    ("ssegw_upstream_proxied_streams", "gauge", "Open proxied streams (proxy routes).", "upstream_proxied"),
    ("ssegw_upstream_proxy_opened", "counter", "Proxied streams the upstream accepted.", "upstream_proxy_opened"),
    ("ssegw_upstream_proxy_refused", "counter", "Proxied requests the upstream refused or failed (4xx, 502).",
     "upstream_proxy_refused"),
    ("ssegw_upstream_transitions", "counter", "Upstream status changes (down or up again).", "upstream_transitions"),
    ("ssegw_workers", "gauge", "Worker processes running (1 without a supervisor).", "workers"),
    ("ssegw_worker_restarts", "counter", "Workers restarted by the supervisor after a crash.", "worker_restarts"),
    ("ssegw_watchdog_misses", "counter",
     "Worker heartbeats the supervisor's watchdog found missing (0 without a supervisor).", "watchdog_misses"),
)

#: Why a token or credential was refused (``Unauthorized``/``Forbidden`` raised by
#: ``policy/auth.py`` carry one of these as ``reason``).
AUTH_REASONS = ("missing", "malformed", "bad_signature", "bad_key", "algorithm", "expired", "not_yet_valid",
                "bad_claims", "topic_denied", "publish_denied", "not_loopback", "other")
#: Why admission or the protocol guards refused a connection or request.
REFUSED_REASONS = ("capacity", "descriptors", "rate", "per_ip", "ip_denied", "draining", "head_timeout",
                   "bad_request", "too_large", "proxy_untrusted", "proxy_header", "tls_handshake", "other")
#: Why an upstream stream failed or ended (server/upstream_client.py FAILURE_REASONS).
UPSTREAM_FAILURE_REASONS = ("connect", "status", "content_type", "stall", "malformed", "too_large", "closed")
#: Which broker operation failed.
BROKER_ERROR_KINDS = ("publish", "replay", "reconnect", "gap_lost", "other")
#: Why a key's newest event left a topic's keyed state (max_keys, or history_ttl).
KEYED_EVICTION_REASONS = ("max_keys", "ttl")

# (name, help, label, snapshot key, fixed label values or None for open-ended-but-bounded
# values such as HTTP status codes).  A fixed set is always emitted in full (zeros
# included), so rate() and alerts see the series before the first increment.
LABELLED: tuple[tuple[str, str, str, str, tuple[str, ...] | None], ...] = (
    ("ssegw_http_responses", "Error responses by status code.", "status", "responses", None),
    ("ssegw_slow_consumer_closed", "Connections closed by the slow-consumer policy, by reason.", "reason",
     "slow_closed", None),
    ("ssegw_auth_failures", "Requests refused by authentication or topic authorization, by reason.", "reason",
     "auth_failures", AUTH_REASONS),
    ("ssegw_refused", "Connections or requests refused by admission or the protocol guards, by reason.",
     "reason", "refused", REFUSED_REASONS),
    ("ssegw_broker_errors", "Broker operations that failed, by kind.", "kind", "broker_errors",
     BROKER_ERROR_KINDS),
    ("ssegw_upstream_failures", "Upstream stream attempts or streams that failed or ended, by reason.", "reason",
     "upstream_failures", UPSTREAM_FAILURE_REASONS),
    ("ssegw_keyed_evictions", "Keys dropped from a topic's keyed state (since=snapshot, compacted resumes), "
     "by reason.", "reason", "keyed_evictions", KEYED_EVICTION_REASONS),
)

# (name, help, snapshot key, bucket upper bounds).
HISTOGRAMS: tuple[tuple[str, str, str, tuple[float, ...]], ...] = (
    ("ssegw_flush_batch_writes", "Socket writes per flush (flushes that wrote something).", "hist_writes",
     FLUSH_WRITE_BUCKETS),
    ("ssegw_flush_batch_events", "Events per flush (flushes that wrote something).", "hist_events",
     FLUSH_EVENT_BUCKETS),
    ("ssegw_flush_duration_seconds",
     "Time from the start of a flush sweep to its last socket write (flushes that wrote something).",
     "hist_flush_s", FLUSH_SECONDS_BUCKETS),
    ("ssegw_flush_delay_seconds",
     "Age of a flush's oldest event when the sweep started (flushes that wrote something).",
     "hist_delay_s", EVENT_AGE_BUCKETS),
    ("ssegw_delivery_lag_seconds",
     "Event timestamp to the flush's last socket write, for the oldest event of each flush that wrote something.",
     "hist_lag_s", EVENT_AGE_BUCKETS),
    ("ssegw_publish_duration_seconds",
     "POST /publish: request head received to answer written, for every publish the handler answered.",
     "hist_publish_s", PUBLISH_BUCKETS),
    ("ssegw_event_loop_lag_seconds", "How late each worker tick fired after it was due.", "hist_loop_s",
     LOOP_LAG_BUCKETS),
)


class Histogram:
    """A fixed-bucket histogram kept as plain counts: ``observe`` is a C bisect and two adds.

    Args:
        bounds: ascending bucket upper bounds (``le``); one more count holds ``+Inf``.
    """

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, v: float) -> None:
        # bisect_left: the first bound >= v, i.e. the bucket with v <= le.
        self.counts[bisect_left(self.bounds, v)] += 1
        self.sum += v

    def snapshot(self) -> dict[str, object]:
        return {"counts": list(self.counts), "sum": self.sum}


def _num(v: object) -> float:
    return float(v) if isinstance(v, (int, float)) else 0.0


class SnapshotCollector(Collector):
    """Emits every metric from a list of per-worker snapshots (summed)."""

    def __init__(self, snapshots: Callable[[], Iterable[dict[str, object]]]) -> None:
        self._snapshots = snapshots

    def collect(self) -> Iterator[Metric]:
        snaps = list(self._snapshots())
        yield from self._plain(snaps)
        yield from self._labelled(snaps)
        yield from self._histograms(snaps)
        info = GaugeMetricFamily("ssegw_build_info", "ssegw version and Python version (value is always 1).",
                                 labels=["version", "python"])
        info.add_metric([__version__, platform.python_version()], 1)
        yield info

    @staticmethod
    def _plain(snaps: list[dict[str, object]]) -> Iterator[Metric]:
        for name, kind, help_, key in METRICS:
            total = sum(_num(s.get(key, 0)) for s in snaps)
            if kind == "counter":
                yield CounterMetricFamily(name, help_, value=total)
            else:
                yield GaugeMetricFamily(name, help_, value=total)

    @staticmethod
    def _labelled(snaps: list[dict[str, object]]) -> Iterator[Metric]:
        for name, help_, label, key, fixed in LABELLED:
            merged: dict[str, float] = dict.fromkeys(fixed, 0.0) if fixed else {}
            for s in snaps:
                d = s.get(key)
                if not isinstance(d, dict):
                    continue
                for raw, v in d.items():
                    k = str(raw)
                    if fixed and k not in merged:
                        k = "other"  # keeps the label set bounded whatever a snapshot holds
                    merged[k] = merged.get(k, 0.0) + _num(v)
            fam = CounterMetricFamily(name, help_, labels=[label])
            for k in (fixed or sorted(merged)):
                fam.add_metric([k], merged[k])
            yield fam

    @staticmethod
    def _histograms(snaps: list[dict[str, object]]) -> Iterator[Metric]:
        for name, help_, key, bounds in HISTOGRAMS:
            counts = [0] * (len(bounds) + 1)
            total_sum = 0.0
            for s in snaps:
                h = s.get(key)
                if not isinstance(h, dict):
                    continue
                hc = h.get("counts")
                if not isinstance(hc, list) or len(hc) != len(counts):
                    continue  # another version's buckets: not summable with ours
                for i, c in enumerate(hc):
                    counts[i] += int(c)
                total_sum += _num(h.get("sum"))
            cum = 0
            buckets = []
            for b, c in zip(bounds, counts, strict=False):
                cum += c
                buckets.append((floatToGoString(b), cum))
            buckets.append(("+Inf", cum + counts[-1]))
            yield HistogramMetricFamily(name, help_, buckets=buckets, sum_value=total_sum)


def make_registry(snapshots: Callable[[], Iterable[dict[str, object]]]) -> CollectorRegistry:
    """A registry of every ``ssegw_*`` metric (from ``snapshots``) plus ``process_*`` of the
    calling process."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snapshots))
    ProcessCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
