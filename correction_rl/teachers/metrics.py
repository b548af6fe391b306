"""Teacher metrics: what an LLM teacher costs and how often it fails, by reason.

One ``TeacherMetrics`` per teacher, updated from the teacher's request path (several asyncio
tasks or engine steps at once, hence the lock) and read by drivers through
``Teacher.metrics()``: the in-process loop logs it every step and the distributed
``TeacherWorker`` adds it to its own metrics. Counters are cumulative since the teacher was
built (W&B plots them as running totals); latency percentiles cover the last ``window``
requests so that they follow the endpoint's current behaviour.

Names (all under ``teacher/``, docs/teachers.md and docs/metrics.md):

* ``teacher/requests`` answered requests (retries included), ``teacher/rollouts`` rollouts
  handled, ``teacher/accepted`` rollouts with a y', ``teacher/rejected/<reason>`` rollouts
  without one (final outcome, after the retry policy);
* ``teacher/errors/<kind>`` every failed attempt (``http_429``, ``http_5xx``, ``timeout``,
  ``malformed_response`` ...), also those a retry recovered from; ``teacher/retries``;
  ``teacher/circuit_open`` times the circuit breaker opened;
* ``teacher/latency_p50_s`` / ``_p90_s`` / ``_p99_s`` / ``_mean_s`` per request;
* ``teacher/prompt_tokens``, ``teacher/completion_tokens`` (as the engine or endpoint reports);
* ``teacher/corrections_per_s`` rollouts handled per second of ``correct`` wall time;
* ``teacher/accepted_edit_distance_mean`` character Levenshtein distance y -> y' of accepted
  corrections, ``teacher/accepted_noop_rate`` share of accepted y' == y.
"""

from __future__ import annotations

import threading
from collections import Counter, deque

from correction_rl.edits import edit_distance


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated ``q``-quantile (0..1) of ``values`` (0.0 when empty), as numpy's
    default method computes it."""
    if not values:
        return 0.0
    data = sorted(values)
    pos = q * (len(data) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


class TeacherMetrics:
    """Thread-safe counters, a latency window and edit-distance sums for one teacher."""

    def __init__(self, window: int = 4096) -> None:
        self._lock = threading.Lock()
        self.latencies: deque[float] = deque(maxlen=window)
        self.counts: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.busy_s = 0.0
        self.edit_sum = 0
        self.noops = 0

    def request(self, latency_s: float, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        """One answered request (whatever its content)."""
        with self._lock:
            self.counts["requests"] += 1
            self.latencies.append(float(latency_s))
            self.prompt_tokens += int(prompt_tokens or 0)
            self.completion_tokens += int(completion_tokens or 0)

    def error(self, kind: str) -> None:
        """One failed attempt (retried or not)."""
        with self._lock:
            self.errors[kind] += 1

    def retry(self) -> None:
        with self._lock:
            self.counts["retries"] += 1

    def circuit_opened(self) -> None:
        with self._lock:
            self.counts["circuit_open"] += 1

    def outcome(self, response: str, corrected: str | None, reason: str | None) -> None:
        """The final outcome of one rollout."""
        with self._lock:
            self.counts["corrections"] += 1
            if corrected is None:
                self.rejected[reason or "unknown"] += 1
                return
            self.counts["accepted"] += 1
            self.edit_sum += edit_distance(response, corrected)
            self.noops += corrected == response

    def add_busy(self, seconds: float) -> None:
        with self._lock:
            self.busy_s += seconds

    def snapshot(self, prefix: str = "teacher/") -> dict[str, float]:
        with self._lock:
            lat = list(self.latencies)
            accepted = self.counts["accepted"]
            out = {
                f"{prefix}requests": float(self.counts["requests"]),
                f"{prefix}rollouts": float(self.counts["corrections"]),
                f"{prefix}accepted": float(accepted),
                f"{prefix}retries": float(self.counts["retries"]),
                f"{prefix}circuit_open": float(self.counts["circuit_open"]),
                f"{prefix}latency_p50_s": percentile(lat, 0.5),
                f"{prefix}latency_p90_s": percentile(lat, 0.9),
                f"{prefix}latency_p99_s": percentile(lat, 0.99),
                f"{prefix}latency_mean_s": sum(lat) / len(lat) if lat else 0.0,
                f"{prefix}prompt_tokens": float(self.prompt_tokens),
                f"{prefix}completion_tokens": float(self.completion_tokens),
                f"{prefix}corrections_per_s": self.counts["corrections"] / self.busy_s if self.busy_s > 0 else 0.0,
                f"{prefix}accepted_edit_distance_mean": self.edit_sum / accepted if accepted else 0.0,
                f"{prefix}accepted_noop_rate": self.noops / accepted if accepted else 0.0,
            }
            out.update({f"{prefix}rejected/{k}": float(v) for k, v in self.rejected.items()})
            out.update({f"{prefix}errors/{k}": float(v) for k, v in self.errors.items()})
        return out
