"""PyTorch's ``BatchNorm2d``, exactly, on NumPy arrays, computed by a multithreaded Rust core.

>>> import numpy as np, batchnorm
>>> m = batchnorm.BatchNorm2d(3)
>>> y = m(np.ones((2, 3, 4, 4), dtype=np.float32))
"""

from batchnorm import functional
from batchnorm._core import (
    BatchNorm2d,
    DeviceArray,
    ShapeError,
    __version__,
    get_num_threads,
    load_file,
    save_file,
    set_num_threads,
    simd_level,
)

__all__ = [
    "BatchNorm2d",
    "DeviceArray",
    "ShapeError",
    "__version__",
    "functional",
    "get_num_threads",
    "load_file",
    "save_file",
    "set_num_threads",
    "simd_level",
]
