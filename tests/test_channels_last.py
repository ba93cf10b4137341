"""Channels-last tensors keep their layout, as PyTorch 2.13 keeps `memory_format`: the output and
grad_input of a channels-last 4D (NHWC) or 5D (NDHWC) input are channels-last, with the bits the
C-contiguous copy of the input gives; 3D inputs and other strides give C-contiguous results (PyTorch's
`suggest_memory_format`); `out=` may be C-contiguous or channels-last."""

import numpy as np
import pytest

import batchnorm
from batchnorm.functional import batch_norm, batch_norm_backward

from helpers import HALF, assert_layout_of_output, channels_last_strides, is_channels_last

try:
    import torch
except ImportError:
    torch = None


def channels_last(x):
    """`x` (N, C, *) with the same values, laid out (N, *, C)."""
    order = [0, *range(2, x.ndim), 1]
    back = [0, x.ndim - 1, *range(1, x.ndim - 1)]
    return np.ascontiguousarray(x.transpose(order)).transpose(back)


FAMILY = [
    (batchnorm.BatchNorm2d, (3, 5, 4, 6)),
    (batchnorm.BatchNorm2d, (2, 64, 7, 7)),
    (batchnorm.BatchNorm3d, (2, 3, 4, 5, 6)),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cls,shape", FAMILY, ids=lambda v: getattr(v, "__name__", str(v)))
def test_channels_last_in_channels_last_out_with_the_contiguous_bits(rng, dtype, cls, shape):
    x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    xl, dyl = channels_last(x), channels_last(dy)
    assert is_channels_last(xl)
    ours, contiguous = cls(shape[1], dtype=dtype), cls(shape[1], dtype=dtype)
    for training in (True, False):
        ours.train(training)
        contiguous.train(training)
        y, dx = ours(xl), None
        dx = ours.backward(dyl)
        assert y.strides == dx.strides == channels_last_strides(shape, x.itemsize)
        np.testing.assert_array_equal(y, contiguous(x))
        np.testing.assert_array_equal(dx, contiguous.backward(dy))
        np.testing.assert_array_equal(ours.grad_weight, contiguous.grad_weight)


def test_three_dimensional_and_other_strides_give_contiguous_results(rng):
    m = batchnorm.BatchNorm1d(4)
    x = np.ascontiguousarray(rng.standard_normal((3, 6, 4)).astype(np.float32)).transpose(0, 2, 1)  # (N, C, L) as NLC
    assert m(x).flags.c_contiguous
    m2 = batchnorm.BatchNorm2d(3)
    odd = np.ascontiguousarray(rng.standard_normal((2, 5, 4, 3)).astype(np.float32)).transpose(0, 3, 2, 1)
    y = m2(odd)
    assert y.flags.c_contiguous
    assert_layout_of_output(m2.backward(np.ones_like(odd)), odd)


def test_out_may_be_contiguous_or_channels_last_and_nothing_else(rng):
    x = channels_last(rng.standard_normal((2, 3, 4, 5)).astype(np.float32))
    m = batchnorm.BatchNorm2d(3).eval()
    want = m(np.ascontiguousarray(x))
    for out in [np.empty((2, 3, 4, 5), np.float32), channels_last(np.empty((2, 3, 4, 5), np.float32))]:
        assert m(x, out=out) is out
        np.testing.assert_array_equal(out, want)
    strided = np.empty((2, 3, 4, 10), np.float32)[..., ::2]
    with pytest.raises(ValueError, match="C-contiguous or channels-last"):
        m(x, out=strided)


def test_the_functional_api_keeps_channels_last(rng):
    x = channels_last((rng.standard_normal((4, 3, 5, 2)) + 2).astype(np.float64))
    mean, var = np.zeros(3), np.ones(3)
    y = batch_norm(x, mean, var, training=True)
    assert y.strides == x.strides
    np.testing.assert_array_equal(y, batch_norm(np.ascontiguousarray(x), np.zeros(3), np.ones(3), training=True))
    dx, _, _ = batch_norm_backward(channels_last(np.ones(x.shape)), x, training=True)
    assert dx.strides == x.strides


@pytest.mark.parametrize("dtype", HALF, ids=lambda d: np.dtype(d).name)
def test_half_channels_last_inputs_get_channels_last_outputs(rng, dtype):
    x = channels_last(rng.standard_normal((2, 3, 4, 5)).astype(dtype))
    m, contiguous = batchnorm.BatchNorm2d(3), batchnorm.BatchNorm2d(3)
    y = m(x)
    assert y.dtype == np.dtype(dtype) and y.strides == x.strides
    np.testing.assert_array_equal(y, contiguous(np.ascontiguousarray(x)))
    dx = m.backward(channels_last(np.ones(x.shape, dtype)))
    assert dx.strides == x.strides


@pytest.mark.skipif(torch is None, reason="PyTorch is not installed")
@pytest.mark.parametrize("shape", [(3, 5, 4, 6), (2, 3, 4, 5, 6), (3, 4, 6)], ids=str)
def test_layouts_match_torch(rng, shape):
    cls = {3: batchnorm.BatchNorm1d, 4: batchnorm.BatchNorm2d, 5: batchnorm.BatchNorm3d}[len(shape)]
    x = channels_last(rng.standard_normal(shape).astype(np.float32))
    tx = torch.from_numpy(x).requires_grad_()
    theirs = getattr(torch.nn, cls.__name__)(shape[1])
    ty = theirs(tx)
    y = cls(shape[1])(x)
    assert y.strides == tuple(s * 4 for s in ty.stride())
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-5, atol=1e-5)
