"""Prometheus metrics of the consumers of this process: ``pip install 'redcurrent[prometheus]'``.

.. code-block:: python

    from prometheus_client import start_http_server
    from redcurrent.prometheus import instrument

    instrument()             # before the consumers start; into prometheus_client.REGISTRY
    start_http_server(9100)  # or mount prometheus_client.make_asgi_app() in your web app
    # ... start consumers as usual

redcurrent serves no HTTP itself: expose the registry with prometheus_client's
``start_http_server``, ``make_asgi_app`` or ``make_wsgi_app``.

Metrics (labels ``stream`` and ``group``; the histogram also ``message_type``):

- ``redcurrent_messages_received_total``, ``..._handled_total``,
  ``..._failed_total``, ``..._retried_total``, ``..._dead_lettered_total``,
  ``..._claimed_total``: counters, the fields of :class:`~redcurrent.ConsumerStats`
  summed over the consumers of this process, the stopped ones included, so
  they never go down when a consumer stops or is replaced.
- ``redcurrent_handler_duration_seconds``: a histogram of handler calls
  (``message_type`` is the handler's registered type, ``"*"`` for the
  catch-all; a batch is one call), failed ones and :class:`~redcurrent.Retry`
  included; a call cancelled by a stop is not observed.
- ``redcurrent_consumers_running``, ``redcurrent_handlers_running``,
  ``redcurrent_messages_held``: gauges of this process now (``running`` and
  ``held`` of :class:`~redcurrent.ConsumerStats`).
- ``redcurrent_group_lag`` (entries not yet delivered to the group) and
  ``redcurrent_group_pending`` (delivered, not yet acknowledged): gauges of the
  whole group, read from Redis, so every process reports the same figure
  (aggregate with ``max``, not ``sum``; this is the one to autoscale on, e.g.
  with KEDA's prometheus scaler). ``redcurrent_group_info_age_seconds``: how old
  those figures are. Only groups with a consumer running in this process are
  reported; a lag Redis cannot give cheaply (Redis < 7 with more than 1,000
  entries to count) has no sample.

The consumer name is no label on purpose: names carry a host and pid (or a
worker's number) and change with every deployment, and each one would leave
series behind. Per-process figures come from the scrape's ``instance`` label.

How the group figures are read: Prometheus collects synchronously, on the
exporter's thread, while the consumers' Redis clients live on their event
loop. A scrape that finds a stream's figures older than ``lag_cache_seconds``
sends one ``XINFO GROUPS`` per stream onto the loop of a running consumer of
that stream, with that consumer's own client (no second connection, same
credentials and TLS), and waits for the reply at most ``refresh_timeout``
seconds; then it serves what it has. So a scrape never hangs on a Redis that
is down or frozen: it serves the last figures, and
``redcurrent_group_info_age_seconds`` grows. Nothing is sent to Redis while
nobody scrapes. A scrape run on the consumers' own loop (``make_asgi_app``
mounted in the same application) cannot wait for that loop: it serves the
figures of the refresh the previous scrape started.

Consumers pick the instrumentation up when they start: call :func:`instrument`
before starting them (a consumer already running is not counted).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

from ._group_figures import GroupWatch
from ._instrument import CONSUMER_OBSERVERS, MIDDLEWARE, Handler, HandlerInfo
from ._tally import COUNTED, ConsumerTally
from .errors import ConfigurationError

try:
    from prometheus_client import REGISTRY, CollectorRegistry, Histogram
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    from prometheus_client.metrics_core import Metric
except ImportError as _missing:  # pragma: no cover - the extra is installed for the tests
    raise ImportError(
        "redcurrent.prometheus needs prometheus-client: pip install 'redcurrent[prometheus]'"
    ) from _missing

__all__ = ["DEFAULT_BUCKETS", "Instrumentation", "instrument", "uninstrument"]

#: Bucket bounds of ``redcurrent_handler_duration_seconds`` (prometheus_client's:
#: 5 ms to 10 s).
DEFAULT_BUCKETS: tuple[float, ...] = tuple(Histogram.DEFAULT_BUCKETS)

_LABELS = ("stream", "group")

_COUNTERS = {
    "received": "Entries delivered to the consumers (read, recovered, claimed or retried).",
    "handled": "Messages whose handler finished without error (acknowledged).",
    "failed": "Deliveries whose handler failed (a Retry is not a failure).",
    "claimed": "Entries taken over from idle consumers.",
    "retried": "Messages run again after a failure or a Retry, after their delay.",
    "dead_lettered": "Entries moved to the dead-letter stream.",
}
assert tuple(_COUNTERS) == COUNTED


class _ConsumerCollector:
    """Counters and gauges of this process, from ``consumer.stats`` at scrape time."""

    def __init__(self, tally: ConsumerTally) -> None:
        self._tally = tally

    def _families(self) -> tuple[list[CounterMetricFamily], list[GaugeMetricFamily]]:
        counters = [
            CounterMetricFamily(f"redcurrent_messages_{name}", doc, labels=_LABELS)
            for name, doc in _COUNTERS.items()
        ]
        gauges = [
            GaugeMetricFamily(
                "redcurrent_consumers_running",
                "Consumers running in this process.",
                labels=_LABELS,
            ),
            GaugeMetricFamily(
                "redcurrent_handlers_running",
                "Handler calls running now in this process (a batch is one call).",
                labels=_LABELS,
            ),
            GaugeMetricFamily(
                "redcurrent_messages_held",
                "Entries held in memory by this process: running, waiting, kept aside.",
                labels=_LABELS,
            ),
        ]
        return counters, gauges

    def describe(self) -> Iterable[Metric]:
        counters, gauges = self._families()
        return [*counters, *gauges]

    def collect(self) -> Iterable[Metric]:
        counters, gauges = self._families()
        for (stream, group), totals in sorted(self._tally.totals().items()):
            labels = [stream, group]
            for counter, name in zip(counters, COUNTED, strict=True):
                counter.add_metric(labels, totals.counts[name])
            for gauge, value in zip(
                gauges, (totals.consumers, totals.running, totals.held), strict=True
            ):
                gauge.add_metric(labels, value)
        return [*counters, *gauges]


class _GroupCollector:
    """Lag and pending of the groups consumed here, as Redis counts them."""

    def __init__(self, watch: GroupWatch) -> None:
        self._watch = watch

    @staticmethod
    def _families() -> list[GaugeMetricFamily]:
        return [
            GaugeMetricFamily(
                "redcurrent_group_lag",
                "Entries of the stream not yet delivered to the group (the whole group's).",
                labels=_LABELS,
            ),
            GaugeMetricFamily(
                "redcurrent_group_pending",
                "Entries delivered to the group and not yet acknowledged (the whole group's).",
                labels=_LABELS,
            ),
            GaugeMetricFamily(
                "redcurrent_group_info_age_seconds",
                "Seconds since redcurrent_group_lag and _pending were read from Redis.",
                labels=_LABELS,
            ),
        ]

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        lag, pending, age = families = self._families()
        read = self._watch.read()
        now = time.monotonic()
        for stream, watched in sorted(read.items()):
            reading = watched.reading
            if reading is None:
                continue
            for group in sorted(watched.groups):
                figures = reading.groups.get(group)
                if figures is None:  # the group is gone (or not created yet)
                    continue
                labels = [stream, group]
                if figures.lag is not None:
                    lag.add_metric(labels, figures.lag)
                pending.add_metric(labels, figures.pending)
                age.add_metric(labels, max(0.0, now - reading.read_at))
        return families


class Instrumentation:
    """What :func:`instrument` installed into one registry; :meth:`uninstrument` removes it."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        lag_cache_seconds: float,
        refresh_timeout: float,
        buckets: Sequence[float],
    ) -> None:
        self.registry: CollectorRegistry = registry
        self.lag_cache_seconds: float = lag_cache_seconds
        self.refresh_timeout: float = refresh_timeout
        self.buckets: tuple[float, ...] = tuple(buckets)
        self._active = False
        self._tally = ConsumerTally()
        self._consumers = _ConsumerCollector(self._tally)
        self._groups = _GroupCollector(
            GroupWatch(self._tally, max_age=lag_cache_seconds, wait=refresh_timeout)
        )
        self._durations = Histogram(
            "redcurrent_handler_duration_seconds",
            "Duration of handler calls (a batch is one call), failed ones included.",
            ["stream", "group", "message_type"],
            registry=None,
            buckets=self.buckets,
        )

    def _install(self) -> None:
        registered: list[Any] = []
        try:
            for collector in (self._consumers, self._groups, self._durations):
                self.registry.register(collector)
                registered.append(collector)
        except BaseException:
            for collector in registered:
                self.registry.unregister(collector)
            raise
        MIDDLEWARE.append(self._time)
        CONSUMER_OBSERVERS.append(self._tally)
        self._active = True

    def uninstrument(self) -> None:
        """Unregister the metrics and stop instrumenting consumers that start
        from now on (running ones stop observing their handlers); idempotent."""
        with _LOCK:
            if not self._active:
                return
            self._active = False
            _INSTALLED.pop(id(self.registry), None)
            MIDDLEWARE.remove(self._time)
            CONSUMER_OBSERVERS.remove(self._tally)
            for collector in (self._consumers, self._groups, self._durations):
                self.registry.unregister(collector)

    def _time(self, info: HandlerInfo, handler: Handler) -> Handler:
        """Middleware: each handler call's duration, failures included; a
        cancelled call (a stop) is not one that took that long."""
        observe = self._durations.labels(info.stream, info.group, info.message_type).observe
        clock = time.perf_counter

        async def timed(arg: Any) -> Any:
            start = clock()
            try:
                result = await handler(arg)
            except Exception:
                if self._active:
                    observe(clock() - start)
                raise
            if self._active:
                observe(clock() - start)
            return result

        return timed

    def __repr__(self) -> str:
        return (
            f"Instrumentation(registry={self.registry!r}, "
            f"lag_cache_seconds={self.lag_cache_seconds!r}, active={self._active})"
        )


_LOCK = threading.Lock()
_INSTALLED: dict[int, Instrumentation] = {}


def instrument(
    registry: CollectorRegistry = REGISTRY,
    *,
    lag_cache_seconds: float = 5.0,
    refresh_timeout: float = 1.0,
    buckets: Sequence[float] = DEFAULT_BUCKETS,
) -> Instrumentation:
    """Register redcurrent's metrics into ``registry`` and instrument every
    consumer that starts from now on.

    ``lag_cache_seconds``: how long the group figures read from Redis are
    served before a scrape reads them again. ``refresh_timeout``: how long a
    scrape waits for that read before serving the previous figures. ``buckets``:
    of the handler duration histogram.

    Idempotent: calling it again with the same registry and options returns the
    same :class:`Instrumentation`; other options for an instrumented registry
    are a :class:`~redcurrent.ConfigurationError` (uninstrument it first).
    """
    for name, value in (
        ("lag_cache_seconds", lag_cache_seconds),
        ("refresh_timeout", refresh_timeout),
    ):
        if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
            raise ConfigurationError(f"{name} must be a number >= 0, got {value!r}")
        if math.isinf(value):
            raise ConfigurationError(f"{name} must be finite, got {value!r}")
    with _LOCK:
        found = _INSTALLED.get(id(registry))
        wanted = (float(lag_cache_seconds), float(refresh_timeout), tuple(buckets))
        if found is not None:
            if (found.lag_cache_seconds, found.refresh_timeout, found.buckets) != wanted:
                raise ConfigurationError(
                    f"{registry!r} is already instrumented with other options ({found!r}): "
                    "call uninstrument() first"
                )
            return found
        instrumentation = Instrumentation(
            registry,
            lag_cache_seconds=float(lag_cache_seconds),
            refresh_timeout=float(refresh_timeout),
            buckets=buckets,
        )
        instrumentation._install()
        _INSTALLED[id(registry)] = instrumentation
        return instrumentation


def uninstrument(registry: CollectorRegistry = REGISTRY) -> None:
    """Undo :func:`instrument` for ``registry`` (nothing when it is not instrumented)."""
    with _LOCK:
        found = _INSTALLED.get(id(registry))
    if found is not None:
        found.uninstrument()
