import numpy as np

import batchnorm

from reference import ReferenceBatchNorm2d

try:
    import ml_dtypes

    BFLOAT16 = [ml_dtypes.bfloat16]
except ImportError:
    BFLOAT16 = []

# The half dtypes inputs may come in (bfloat16 is ml_dtypes', where it is installed).
HALF = [np.float16, *BFLOAT16]
MANTISSA_BITS = {"float16": 10, "bfloat16": 7}

TOL = {np.float32: dict(rtol=2e-5, atol=2e-5), np.float64: dict(rtol=1e-10, atol=1e-10)}


def tol(dtype):
    return TOL[np.dtype(dtype).type]


def pair(c, dtype=np.float32, **options):
    """The module under test and the reference, with the same configuration."""
    return batchnorm.BatchNorm2d(c, dtype=dtype, **options), ReferenceBatchNorm2d(c, **options)


def layouts(x):
    """The same logical tensor in memory layouts the module must read correctly."""
    channels_last = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    padded = np.zeros((x.shape[0] * 2, x.shape[1], x.shape[2] + 2, x.shape[3] * 3), dtype=x.dtype)
    padded[::2, :, 1:-1, ::3] = x
    flipped = np.ascontiguousarray(x[:, :, ::-1, ::-1])[:, :, ::-1, ::-1]
    read_only = x.copy()
    read_only.setflags(write=False)
    raw = np.zeros(x.nbytes + 1, dtype=np.uint8)
    unaligned = np.frombuffer(raw.data, dtype=x.dtype, count=x.size, offset=1).reshape(x.shape)
    unaligned[...] = x
    return {
        "c_contiguous": x,
        "fortran": np.asfortranarray(x),
        "channels_last": channels_last,
        "strided_slice": padded[::2, :, 1:-1, ::3],
        "negative_strides": flipped,
        "read_only": read_only,
        "unaligned": unaligned,
    }


def state_snapshot(m):
    """Everything a failed call must leave untouched."""
    arrays = {k: v.copy() for k, v in m.state_dict().items()}
    grads = tuple(None if g is None else g.copy() for g in (m.grad_weight, m.grad_bias))
    return arrays, grads, m.training


def assert_same_state(before, after):
    (a_arrays, a_grads, a_training), (b_arrays, b_grads, b_training) = before, after
    assert a_arrays.keys() == b_arrays.keys()
    for k in a_arrays:
        np.testing.assert_array_equal(a_arrays[k], b_arrays[k], err_msg=k)
    for ga, gb in zip(a_grads, b_grads, strict=True):
        assert (ga is None) == (gb is None)
        if ga is not None:
            np.testing.assert_array_equal(ga, gb)
    assert a_training == b_training


def ulp(values, dtype):
    """The spacing of the half dtype's values at `values` (float64), subnormals included."""
    bits = MANTISSA_BITS[np.dtype(dtype).name]
    smallest = float(np.finfo(dtype).smallest_subnormal) if dtype == np.float16 else 2.0**-133
    _, exponent = np.frexp(np.abs(values))
    return np.maximum(np.ldexp(1.0, exponent - 1 - bits), smallest)


def assert_within_one_rounding(got, exact, dtype):
    """`got` (of the half dtype) within one unit in the last place of `exact` rounded to that dtype."""
    assert got.dtype == np.dtype(dtype)
    rounded = exact.astype(dtype).astype(np.float64)
    got = got.astype(np.float64)
    error = np.abs(got - rounded)
    allowed = np.maximum(ulp(rounded, dtype), ulp(got, dtype))
    assert np.all(error <= allowed), f"largest error {np.max(error / allowed):.2f} ulp"


def channels_last_strides(shape, itemsize):
    """The byte strides of a dense channels-last (N, spatial..., C in memory) array of `shape`."""
    strides, step = [0] * len(shape), itemsize
    for axis in [1, *range(len(shape) - 1, 1, -1), 0]:
        strides[axis] = step
        step *= shape[axis]
    return tuple(strides)


def is_channels_last(x):
    """As PyTorch's suggest_memory_format: a 4D or 5D array laid out channels-last and not also
    C-contiguous (dims of size 1 do not count)."""
    if x.ndim < 4 or x.flags.c_contiguous:
        return False
    expected = channels_last_strides(x.shape, x.itemsize)
    return all(d <= 1 or s == e for d, s, e in zip(x.shape, x.strides, expected, strict=True))


def assert_layout_of_output(y, x):
    """PyTorch's rule: the output (and grad_input) of a channels-last 4D/5D input is channels-last;
    of anything else, C-contiguous."""
    if is_channels_last(x):
        assert y.strides == channels_last_strides(y.shape, y.itemsize), (y.strides, x.strides)
    else:
        assert y.flags.c_contiguous, y.strides


def assert_float32_state(m, ref):
    """A float32 module's state after half inputs: float32 (and int64) arrays, running statistics
    and the weight's gradient as the float64 reference has them."""
    state = m.state_dict()
    assert all(v.dtype in (np.float32, np.int64) for v in state.values())
    if ref.running_var is not None:
        np.testing.assert_allclose(state["running_mean"], ref.running_mean, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(state["running_var"], ref.running_var, rtol=1e-6, atol=1e-6)
    if ref.grad_weight is not None:
        np.testing.assert_allclose(np.asarray(m.grad_weight), ref.grad_weight, rtol=1e-5, atol=1e-5)
