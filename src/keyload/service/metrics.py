"""The service's Prometheus text (``GET /v1/metrics``): counters of one process (each
instance is scraped on its own)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .commit import GroupCommit

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


@dataclass
class Metrics:
    """Per-process counters (each instance is scraped on its own)."""

    requests: dict[tuple[str, int], int] = field(default_factory=dict)
    events: dict[str, int] = field(default_factory=dict)
    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    latency_sum: float = 0.0
    latency_count: int = 0

    def observe(self, route: str, status: int, seconds: float) -> None:
        k = (route, status)
        self.requests[k] = self.requests.get(k, 0) + 1
        i = 0
        while i < len(LATENCY_BUCKETS) and seconds > LATENCY_BUCKETS[i]:
            i += 1
        self.buckets[i] += 1
        self.latency_sum += seconds
        self.latency_count += 1

    def count(self, event: str) -> None:
        self.events[event] = self.events.get(event, 0) + 1

    def render(self, instance: str) -> str:
        out = _head("keyload_requests_total", "counter",
                    "HTTP requests by route and status.")
        for (route, status), n in sorted(self.requests.items()):
            out.append(_sample("keyload_requests_total", instance, n, route=route,
                               status=str(status)))
        out += _head("keyload_events_total", "counter",
                     "Exports, receipts, replays, rate limits.")
        for ev, n in sorted(self.events.items()):
            out.append(_sample("keyload_events_total", instance, n, event=ev))
        out += _head("keyload_request_seconds", "histogram", "Time to answer a request.")
        acc = 0
        for le, n in zip((*map(str, LATENCY_BUCKETS), "+Inf"), self.buckets, strict=True):
            acc += n
            out.append(_sample("keyload_request_seconds_bucket", instance, acc, le=le))
        out.append(_sample("keyload_request_seconds_sum", instance, f"{self.latency_sum:.6f}"))
        out.append(_sample("keyload_request_seconds_count", instance, self.latency_count))
        return _text(out)


def commit_metrics(instance: str, gc: GroupCommit) -> str:
    """The group commit's counters (:mod:`.commit`)."""
    return _text([
        *_head("keyload_commit_batches_total", "counter",
               "Group commits (one transaction per database)."),
        _sample("keyload_commit_batches_total", instance, gc.batches),
        *_head("keyload_commit_requests_total", "counter",
               "Requests whose writes were group-committed."),
        _sample("keyload_commit_requests_total", instance, gc.requests),
        *_head("keyload_commit_failed_total", "counter",
               "Batches that could not begin or commit (busy: a lock held elsewhere)."),
        _sample("keyload_commit_failed_total", instance, gc.busy, reason="busy"),
        _sample("keyload_commit_failed_total", instance, gc.failed - gc.busy, reason="error"),
    ])


def connection_metrics(instance: str, counts: dict[str, int]) -> str:
    """Open connections by pool, and the refused and evicted ones (:mod:`.guard`)."""
    return _text([*_head("keyload_connections", "gauge",
                         "Open connections by pool; refused and evicted since start."),
                  *(_sample("keyload_connections", instance, v, kind=k)
                    for k, v in counts.items())])


# -- the text exposition format, one place -----------------------------------------------
def _head(name: str, kind: str, help_text: str) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]


def _sample(name: str, instance: str, value: object, **labels: str) -> str:
    more = "".join(f',{k}="{v}"' for k, v in labels.items())
    return f'{name}{{instance="{instance}"{more}}} {value}'


def _text(lines: list[str]) -> str:
    return "\n".join(lines) + "\n"


__all__ = ["LATENCY_BUCKETS", "Metrics", "commit_metrics", "connection_metrics"]
