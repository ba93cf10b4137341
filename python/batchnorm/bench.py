"""Timing helpers and the NumPy baseline batchnorm is compared against.

The baseline is what a careful NumPy user would write for a training forward; it is here only
to be timed against, never used by the package.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np


def numpy_training_forward(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """BatchNorm2d's training forward in plain NumPy (batch statistics over N, H, W)."""
    mean = x.mean(axis=(0, 2, 3), keepdims=True)
    var = x.var(axis=(0, 2, 3), keepdims=True)
    scale = weight.reshape(1, -1, 1, 1) / np.sqrt(var + eps)
    return (x - mean) * scale + bias.reshape(1, -1, 1, 1)


def median_seconds(call: Callable[[], object], repeat: int = 20, warmup: int = 2) -> float:
    """Median wall time of `call` over `repeat` runs, after `warmup` untimed runs."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return float(np.median(times))
