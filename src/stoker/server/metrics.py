"""Server metrics in Prometheus' text exposition format (version 0.0.4), served at ``GET /metrics``.

A handful of counters and histograms kept in plain Python: the server runs in one process and one event loop, so no
locking or multiprocess registry is needed, and the project does not take on prometheus_client for it.
"""

from __future__ import annotations

import bisect
import math
import re
from collections import defaultdict
from collections.abc import Mapping

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

Labels = tuple[tuple[str, str], ...]


class Histogram:
    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.n += 1


class ServerMetrics:
    def __init__(self) -> None:
        self.http_requests: dict[Labels, int] = defaultdict(int)
        self.http_latency: dict[Labels, Histogram] = defaultdict(Histogram)
        self.in_progress = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finished: dict[Labels, int] = defaultdict(int)  # by finish reason
        self.aborted = 0  # client went away before the end
        self.ttft = Histogram()

    # --- recording ---------------------------------------------------------------------------------------------------
    def http_done(self, route: str, method: str, status: int, seconds: float) -> None:
        self.http_requests[(("route", route), ("method", method), ("status", str(status)))] += 1
        self.http_latency[(("route", route),)].observe(seconds)

    def generation_done(self, prompt_tokens: int, completion_tokens: int, finish_reasons: list[str]) -> None:
        self.prompt_tokens += prompt_tokens
        self.generation_tokens += completion_tokens
        for reason in finish_reasons:
            self.finished[(("finish_reason", reason),)] += 1

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    # --- exposition --------------------------------------------------------------------------------------------------
    def render(self, engine_stats: Mapping[str, float]) -> str:
        out: list[str] = []

        def family(name: str, kind: str, help_text: str) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")

        family("stoker_http_requests_total", "counter", "HTTP requests answered, by route, method and status.")
        for labels, value in sorted(self.http_requests.items()):
            out.append(f"stoker_http_requests_total{_labels(labels)} {value}")
        family("stoker_http_request_duration_seconds", "histogram", "Time from request to the end of the response.")
        for labels, hist in sorted(self.http_latency.items()):
            _histogram(out, "stoker_http_request_duration_seconds", labels, hist)
        family("stoker_requests_in_progress", "gauge", "HTTP requests being answered now.")
        out.append(f"stoker_requests_in_progress {self.in_progress}")
        family("stoker_prompt_tokens_total", "counter", "Prompt tokens of finished generation requests.")
        out.append(f"stoker_prompt_tokens_total {self.prompt_tokens}")
        family("stoker_generation_tokens_total", "counter", "Tokens generated for finished generation requests.")
        out.append(f"stoker_generation_tokens_total {self.generation_tokens}")
        family("stoker_request_finished_total", "counter", "Choices finished, by finish reason.")
        for labels, value in sorted(self.finished.items()):
            out.append(f"stoker_request_finished_total{_labels(labels)} {value}")
        family("stoker_request_aborted_total", "counter", "Generation requests cancelled because the client left.")
        out.append(f"stoker_request_aborted_total {self.aborted}")
        family("stoker_time_to_first_token_seconds", "histogram", "Time from request to the first generated text.")
        _histogram(out, "stoker_time_to_first_token_seconds", (), self.ttft)
        # The engine's own statistics; by Prometheus convention a name ending in _total is a counter.
        for key, value in sorted(engine_stats.items()):
            name = "stoker_engine_" + re.sub(r"[^a-zA-Z0-9_]", "_", key)
            kind = "counter" if name.endswith("_total") else "gauge"
            note = " (the queue depth)" if key == "waiting" else ""
            family(name, kind, f"Engine statistic {key!r}{note}.")
            out.append(f"{name} {_number(value)}")
        return "\n".join(out) + "\n"


def _labels(labels: Labels, extra: tuple[str, str] | None = None) -> str:
    items = list(labels) + ([extra] if extra else [])
    if not items:
        return ""
    body = ",".join(f'{k}="{_escape(v)}"' for k, v in items)
    return "{" + body + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float) and math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value) if isinstance(value, float) else str(value)


def _histogram(out: list[str], name: str, labels: Labels, hist: Histogram) -> None:
    running = 0
    for bound, count in zip((*hist.buckets, math.inf), hist.counts):
        running += count
        le = "+Inf" if math.isinf(bound) else repr(bound)
        out.append(f"{name}_bucket{_labels(labels, ('le', le))} {running}")
    out.append(f"{name}_sum{_labels(labels)} {hist.total!r}")
    out.append(f"{name}_count{_labels(labels)} {hist.n}")
