"""float16 and bfloat16 inputs to float32 modules and the float32 functional API, as PyTorch 2.13's mixed
precision runs them: statistics, parameters, running buffers and gradients in float32, the output and
grad_input in the input's dtype, within one rounding of the exactly rounded result. bfloat16 is the
`ml_dtypes` NumPy dtype; its cases skip where ml_dtypes is not installed."""

import numpy as np
import pytest

import batchnorm

from helpers import HALF, assert_float32_state, assert_within_one_rounding
from reference import ReferenceBatchNorm2d

try:
    import torch
except ImportError:
    torch = None

FAMILY = [
    (batchnorm.BatchNorm1d, (8, 3)),
    (batchnorm.BatchNorm1d, (4, 3, 9)),
    (batchnorm.BatchNorm2d, (4, 3, 5, 6)),
    (batchnorm.BatchNorm3d, (2, 3, 3, 4, 5)),
]
CONFIGS = [dict(), dict(momentum=None), dict(affine=False), dict(track_running_stats=False)]


@pytest.mark.parametrize("dtype", HALF, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("cls,shape", FAMILY, ids=lambda v: getattr(v, "__name__", str(v)))
@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_half_inputs_match_the_reference_on_their_float32_values(rng, dtype, cls, shape, config):
    c = shape[1]
    m, ref = cls(c, **config), ReferenceBatchNorm2d(c, **config)
    if ref.weight is not None:
        ref.weight = rng.uniform(0.5, 2, c).astype(np.float32).astype(np.float64)
        ref.bias = rng.standard_normal(c).astype(np.float32).astype(np.float64)
        m.weight, m.bias = ref.weight.astype(np.float32), ref.bias.astype(np.float32)
    planes = (shape[0], c, 1, -1)
    for step in range(3):
        m.train(step < 2)
        ref.training = step < 2
        x = (rng.standard_normal(shape) * (step + 2) + 3 * step).astype(dtype)
        y = m(x)
        assert y.shape == shape
        assert_within_one_rounding(y.reshape(planes), ref.forward(x.astype(np.float64).reshape(planes)), dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        dx = m.backward(dy)
        assert_within_one_rounding(dx.reshape(planes), ref.backward(dy.astype(np.float64).reshape(planes)), dtype)
    assert_float32_state(m, ref)
    if ref.grad_weight is not None:
        assert m.grad_weight.dtype == np.float32


@pytest.mark.parametrize("dtype", HALF, ids=lambda d: np.dtype(d).name)
def test_the_functional_api_takes_half_inputs(rng, dtype):
    x = (rng.standard_normal((6, 4, 3, 3)) * 2 + 1).astype(dtype)
    mean, var = np.zeros(4, np.float32), np.ones(4, np.float32)
    y = batchnorm.functional.batch_norm(x, mean, var, training=True, momentum=0.5)
    ref = ReferenceBatchNorm2d(4, momentum=0.5, affine=False)
    assert_within_one_rounding(y, ref.forward(x.astype(np.float64)), dtype)
    np.testing.assert_allclose(mean, ref.running_mean, rtol=1e-6, atol=1e-6)
    dy = rng.standard_normal(x.shape).astype(dtype)
    dx, grad_weight, grad_bias = batchnorm.functional.batch_norm_backward(dy, x, training=True)
    ref.weight = np.ones(4)
    assert_within_one_rounding(dx, ref.backward(dy.astype(np.float64)), dtype)
    assert grad_weight.dtype == grad_bias.dtype == np.float32
    np.testing.assert_allclose(grad_bias, dy.astype(np.float64).sum(axis=(0, 2, 3)), rtol=1e-5, atol=1e-5)


def test_a_float16_batch_whose_squares_overflow_float16_is_normalized_correctly(rng):
    # Σ x² is far above float16's largest value (65504): it must not overflow anywhere.
    x = (rng.standard_normal((64, 2, 8, 8)) * 30 + 500).astype(np.float16)
    m = batchnorm.BatchNorm2d(2)
    y = m(x)
    assert np.all(np.isfinite(y.astype(np.float32)))
    assert_within_one_rounding(y, ReferenceBatchNorm2d(2).forward(x.astype(np.float64)), np.float16)


def test_out_must_have_the_inputs_half_dtype_and_a_failed_call_changes_nothing(rng):
    x = rng.standard_normal((4, 3, 2, 2)).astype(np.float16)
    m = batchnorm.BatchNorm2d(3)
    out = np.empty_like(x)
    assert m(x, out=out) is out
    with pytest.raises(TypeError, match="float16"):
        m(x, out=np.empty(x.shape, np.float32))
    with pytest.raises(ValueError, match="share memory"):
        m(x, out=x)
    assert m.num_batches_tracked == 1
    with pytest.raises(ValueError, match="more than 1 value"):
        m(x[:1, :, :1, :1], out=np.empty((1, 3, 1, 1), np.float16))
    assert m.num_batches_tracked == 1


@pytest.mark.parametrize("dtype", HALF, ids=lambda d: np.dtype(d).name)
def test_modules_of_half_state_are_refused_with_the_way_out(dtype):
    with pytest.raises(TypeError, match="float32 module takes"):
        batchnorm.BatchNorm2d(3, dtype=dtype)


def test_a_float64_module_refuses_half_inputs():
    with pytest.raises(TypeError, match="float64"):
        batchnorm.BatchNorm2d(3, dtype=np.float64)(np.ones((2, 3, 2, 2), np.float16))


@pytest.mark.skipif(torch is None, reason="PyTorch is not installed")
@pytest.mark.parametrize("dtype", HALF, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("cls,shape", FAMILY, ids=lambda v: getattr(v, "__name__", str(v)))
def test_half_inputs_match_torch(rng, dtype, cls, shape):
    torch_dtype = torch.float16 if dtype == np.float16 else torch.bfloat16
    c = shape[1]
    ours, theirs = cls(c), getattr(torch.nn, cls.__name__)(c)
    for step in range(3):
        ours.train(step < 2)
        theirs.train(step < 2)
        x = (rng.standard_normal(shape) * 2 + step).astype(dtype)
        tx = torch.from_numpy(x.astype(np.float32)).to(torch_dtype).requires_grad_()
        y, ty = ours(x), theirs(tx)
        np.testing.assert_allclose(y.astype(np.float32), ty.detach().float().numpy(), rtol=1e-2, atol=1e-2)
        dy = rng.standard_normal(shape).astype(dtype)
        ty.backward(torch.from_numpy(dy.astype(np.float32)).to(torch_dtype))
        dx = ours.backward(dy)
        np.testing.assert_allclose(dx.astype(np.float32), tx.grad.float().numpy(), rtol=1e-2, atol=1e-2)
    for key, value in theirs.state_dict().items():
        np.testing.assert_allclose(ours.state_dict()[key], value.numpy(), rtol=1e-5, atol=1e-5, err_msg=key)
