"""Generation counters for /metrics: requests by finish reason, tokens, time. Thread-safe."""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field


@dataclass(frozen=True)
class MetricsSnapshot:
    requests: dict[str, int]  # by finish reason
    prompt_tokens: int
    completion_tokens: int
    generation_seconds: float
    last_tokens_per_second: float


@dataclass
class GenerationMetrics:
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _requests: Counter = field(default_factory=Counter)
    _prompt_tokens: int = 0
    _completion_tokens: int = 0
    _seconds: float = 0.0
    _last_rate: float = 0.0

    def record(self, reason: str, prompt_tokens: int, completion_tokens: int, seconds: float) -> None:
        with self._lock:
            self._requests[reason] += 1
            self._prompt_tokens += prompt_tokens
            self._completion_tokens += completion_tokens
            self._seconds += seconds
            if completion_tokens and seconds > 0:
                self._last_rate = completion_tokens / seconds

    def snapshot(self) -> MetricsSnapshot:
        with self._lock:
            return MetricsSnapshot(
                requests=dict(self._requests),
                prompt_tokens=self._prompt_tokens,
                completion_tokens=self._completion_tokens,
                generation_seconds=self._seconds,
                last_tokens_per_second=self._last_rate,
            )
