"""Shared by the bench scripts: time a call once (compile/warm-up) and then `iters` times."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def time_calls(fn: Callable[[], Any], iters: int) -> tuple[float, float, Any]:
    """`(first call s, median of the next iters calls s, last output)`; `fn` must block until its result is ready."""
    t0 = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times), out
