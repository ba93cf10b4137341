"""An independent float64 NumPy implementation of torch.nn.BatchNorm2d's documented semantics.

Written from the reference documents, not from the package: the tests compare against it.
"""

from __future__ import annotations

import json
import struct

import numpy as np

AXES = (0, 2, 3)


def per_channel(v):
    return np.asarray(v, dtype=np.float64)[None, :, None, None]


class ReferenceBatchNorm2d:
    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, bias=True):
        c = num_features
        self.eps, self.momentum = eps, momentum
        self.track = track_running_stats
        self.weight = np.ones(c) if affine else None
        self.bias = np.zeros(c) if affine and bias else None
        self.running_mean = np.zeros(c) if track_running_stats else None
        self.running_var = np.ones(c) if track_running_stats else None
        self.num_batches_tracked = 0 if track_running_stats else None
        self.training = True
        self.grad_weight = self.grad_bias = None

    def forward(self, x):
        x = np.asarray(x, dtype=np.float64)
        unbatched = x.ndim == 3
        if unbatched:
            x = x[None]
        n, c, h, w = x.shape
        count = n * h * w
        self.batch_stats = self.training or not self.track
        if self.batch_stats and count == 1:
            raise ValueError("Expected more than 1 value per channel when training")
        if self.training and self.track:
            self.num_batches_tracked += 1
        if self.batch_stats:
            if x.size == 0:
                mean, var = np.zeros(c), np.ones(c)
            else:
                mean, var = x.mean(axis=AXES), x.var(axis=AXES)
            if self.training and self.track and x.size:
                f = self.momentum if self.momentum is not None else 1.0 / self.num_batches_tracked
                self.running_mean = (1 - f) * self.running_mean + f * mean
                self.running_var = (1 - f) * self.running_var + f * var * count / (count - 1)
        else:
            mean, var = self.running_mean, self.running_var
        self.x, self.count, self.unbatched = x, count, unbatched
        self.invstd = 1.0 / np.sqrt(var + self.eps)
        self.xhat = (x - per_channel(mean)) * per_channel(self.invstd)
        y = self.xhat * (per_channel(self.weight) if self.weight is not None else 1.0)
        if self.bias is not None:
            y = y + per_channel(self.bias)
        return y[0] if unbatched else y

    def backward(self, dy):
        dy = np.asarray(dy, dtype=np.float64)
        if self.unbatched:
            dy = dy[None]
        w = self.weight if self.weight is not None else np.ones(dy.shape[1])
        sum_dy = dy.sum(axis=AXES)
        sum_dy_xhat = (dy * self.xhat).sum(axis=AXES)
        scale = per_channel(w * self.invstd)
        if self.batch_stats and dy.size:
            m = self.count
            dx = scale / m * (m * dy - per_channel(sum_dy) - self.xhat * per_channel(sum_dy_xhat))
        else:
            dx = dy * scale
        if self.weight is not None:
            self.grad_weight = sum_dy_xhat if self.grad_weight is None else self.grad_weight + sum_dy_xhat
        if self.bias is not None:
            self.grad_bias = sum_dy if self.grad_bias is None else self.grad_bias + sum_dy
        return dx[0] if self.unbatched else dx


def read_safetensors(path):
    """A minimal safetensors reader (little-endian header length, JSON header, raw data)."""
    dtypes = {"F32": "<f4", "F64": "<f8", "I64": "<i8"}
    with open(path, "rb") as f:
        raw = f.read()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    header.pop("__metadata__", None)
    data = raw[8 + header_len :]
    out = {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        out[name] = np.frombuffer(data[start:end], dtype=dtypes[info["dtype"]]).reshape(info["shape"]).copy()
    return out
