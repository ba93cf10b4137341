"""PyTorch's ``BatchNorm1d``, ``BatchNorm2d`` and ``BatchNorm3d``, exactly, on NumPy arrays, computed by a
multithreaded Rust core.

>>> import numpy as np, batchnorm
>>> m = batchnorm.BatchNorm2d(3)
>>> y = m(np.ones((2, 3, 4, 4), dtype=np.float32))
"""

from batchnorm import functional
from batchnorm._core import (
    DeviceArray,
    ShapeError,
    __version__,
    _BatchNorm,
    cuda_versions,
    get_num_threads,
    load_file,
    save_file,
    set_num_threads,
    simd_level,
)


class BatchNorm1d(_BatchNorm):
    """``torch.nn.BatchNorm1d``: inputs of shape (N, C) or (N, C, L)."""

    _ranks = "1d"


class BatchNorm2d(_BatchNorm):
    """``torch.nn.BatchNorm2d``: inputs of shape (N, C, H, W), or an unbatched (C, H, W)."""

    _ranks = "2d"


class BatchNorm3d(_BatchNorm):
    """``torch.nn.BatchNorm3d``: inputs of shape (N, C, D, H, W)."""

    _ranks = "3d"


__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "DeviceArray",
    "ShapeError",
    "__version__",
    "cuda_versions",
    "functional",
    "get_num_threads",
    "load_file",
    "save_file",
    "set_num_threads",
    "simd_level",
]
