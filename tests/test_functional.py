"""batchnorm.functional against the reference semantics of torch.nn.functional.batch_norm."""

import numpy as np
import pytest

from batchnorm.functional import batch_norm, batch_norm_backward

from helpers import tol
from reference import ReferenceBatchNorm2d


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_updates_buffers_in_place(rng, dtype, training):
    c = 4
    x = (rng.standard_normal((3, c, 5, 5)) * 2 + 1).astype(dtype)
    rm, rv = rng.standard_normal(c).astype(dtype), rng.uniform(0.5, 2, c).astype(dtype)
    w, b = rng.standard_normal(c).astype(dtype), rng.standard_normal(c).astype(dtype)
    ref = ReferenceBatchNorm2d(c, momentum=0.25, eps=1e-4)
    ref.training = training
    ref.num_batches_tracked = 0
    ref.running_mean, ref.running_var = rm.astype(np.float64), rv.astype(np.float64)
    ref.weight, ref.bias = w.astype(np.float64), b.astype(np.float64)
    rm_id, rv_id = id(rm), id(rv)
    y = batch_norm(x, rm, rv, w, b, training=training, momentum=0.25, eps=1e-4)
    np.testing.assert_allclose(y, ref.forward(x), **tol(dtype))
    assert id(rm) == rm_id and id(rv) == rv_id
    np.testing.assert_allclose(rm, ref.running_mean, **tol(dtype))
    np.testing.assert_allclose(rv, ref.running_var, **tol(dtype))
    dy = rng.standard_normal(x.shape).astype(dtype)
    dx, dw, db = batch_norm_backward(
        dy, x, rm if not training else None, rv if not training else None, w, training=training, eps=1e-4
    )
    if not training:  # the reference normalized with the buffers as they were before
        ref.running_mean, ref.running_var = rm.astype(np.float64), rv.astype(np.float64)
        ref.forward(x)
    np.testing.assert_allclose(dx, ref.backward(dy), **tol(dtype))
    np.testing.assert_allclose(dw, ref.grad_weight, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(db, ref.grad_bias, rtol=1e-4, atol=1e-4)


def test_training_without_buffers(rng):
    x = rng.standard_normal((2, 3, 4, 4))
    y = batch_norm(x, None, None, training=True)
    np.testing.assert_allclose(y.mean(axis=(0, 2, 3)), 0, atol=1e-12)


def test_eval_needs_buffers(rng):
    with pytest.raises(ValueError, match="running_mean and running_var"):
        batch_norm(rng.standard_normal((2, 3, 4, 4)), None, None, training=False)


def test_read_only_buffer_rejected_before_anything_changes(rng):
    rm, rv = np.zeros(3), np.ones(3)
    rv.setflags(write=False)
    with pytest.raises(ValueError, match="running_var"):
        batch_norm(rng.standard_normal((2, 3, 4, 4)), rm, rv, training=True)
    np.testing.assert_array_equal(rm, np.zeros(3))


def test_parameter_shape_checked(rng):
    with pytest.raises(ValueError, match=r"weight.*\(3,\).*\(2,\)"):
        batch_norm(rng.standard_normal((2, 3, 4, 4)), np.zeros(3), np.ones(3), weight=np.ones(2))
