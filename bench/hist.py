"""A log-bucketed histogram of latencies in microseconds (1 % wide buckets), cheap to
fill in a load generator and to merge across processes as JSON."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

_STEP = math.log(1.01)


class Histogram:
    __slots__ = ("buckets", "count")

    def __init__(self) -> None:
        self.buckets: dict[int, int] = {}
        self.count = 0

    def add(self, micros: float) -> None:
        index = int(math.log(micros) / _STEP) if micros > 1.0 else 0
        self.buckets[index] = self.buckets.get(index, 0) + 1
        self.count += 1

    def merge(self, other: Histogram) -> None:
        for index, n in other.buckets.items():
            self.buckets[index] = self.buckets.get(index, 0) + n
        self.count += other.count

    def percentile(self, p: float) -> float:
        """The value (µs, bucket midpoint) at percentile ``p`` (0-100); NaN when empty."""
        if not self.count:
            return float("nan")
        rank = max(1, math.ceil(self.count * p / 100.0))
        seen = 0
        for index in sorted(self.buckets):
            seen += self.buckets[index]
            if seen >= rank:
                return math.exp((index + 0.5) * _STEP) if index else 1.0
        return float("nan")

    def to_json(self) -> dict[str, int]:
        return {str(k): v for k, v in self.buckets.items()}

    @classmethod
    def from_json(cls, data: Mapping[str, int]) -> Histogram:
        hist = cls()
        for key, n in data.items():
            hist.buckets[int(key)] = int(n)
            hist.count += int(n)
        return hist

    @classmethod
    def merged(cls, parts: Iterable[Mapping[str, int]]) -> Histogram:
        hist = cls()
        for part in parts:
            hist.merge(cls.from_json(part))
        return hist

    def summary_ms(self) -> dict[str, float]:
        """count, p50, p99, p99.9 and max in milliseconds."""
        top = max(self.buckets) if self.buckets else 0
        return {
            "count": float(self.count),
            "p50_ms": round(self.percentile(50) / 1000, 3),
            "p99_ms": round(self.percentile(99) / 1000, 3),
            "p999_ms": round(self.percentile(99.9) / 1000, 3),
            "max_ms": round(math.exp((top + 1) * _STEP) / 1000, 3) if self.count else math.nan,
        }
