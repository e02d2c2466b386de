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
        out = ["# HELP keyload_requests_total HTTP requests by route and status.",
               "# TYPE keyload_requests_total counter"]
        for (route, status), n in sorted(self.requests.items()):
            out.append(f'keyload_requests_total{{instance="{instance}",route="{route}",'
                       f'status="{status}"}} {n}')
        out += ["# HELP keyload_events_total Exports, receipts, replays, rate limits.",
                "# TYPE keyload_events_total counter"]
        for ev, n in sorted(self.events.items()):
            out.append(f'keyload_events_total{{instance="{instance}",event="{ev}"}} {n}')
        out += ["# HELP keyload_request_seconds Time to answer a request.",
                "# TYPE keyload_request_seconds histogram"]
        acc = 0
        for le, n in zip((*map(str, LATENCY_BUCKETS), "+Inf"), self.buckets, strict=True):
            acc += n
            out.append(f'keyload_request_seconds_bucket{{instance="{instance}",le="{le}"}} '
                       f'{acc}')
        out.append(f'keyload_request_seconds_sum{{instance="{instance}"}} '
                   f'{self.latency_sum:.6f}')
        out.append(f'keyload_request_seconds_count{{instance="{instance}"}} '
                   f'{self.latency_count}')
        return "\n".join(out) + "\n"


def commit_metrics(instance: str, gc: GroupCommit) -> str:
    return (
        "# HELP keyload_commit_batches_total Group commits (one transaction per database).\n"
        "# TYPE keyload_commit_batches_total counter\n"
        f'keyload_commit_batches_total{{instance="{instance}"}} {gc.batches}\n'
        "# HELP keyload_commit_requests_total Requests whose writes were group-committed.\n"
        "# TYPE keyload_commit_requests_total counter\n"
        f'keyload_commit_requests_total{{instance="{instance}"}} {gc.requests}\n'
        "# HELP keyload_commit_failed_total Batches that could not begin or commit "
        "(busy: a lock held elsewhere).\n"
        "# TYPE keyload_commit_failed_total counter\n"
        f'keyload_commit_failed_total{{instance="{instance}",reason="busy"}} {gc.busy}\n'
        f'keyload_commit_failed_total{{instance="{instance}",reason="error"}} '
        f'{gc.failed - gc.busy}\n')


__all__ = ["LATENCY_BUCKETS", "Metrics", "commit_metrics"]
