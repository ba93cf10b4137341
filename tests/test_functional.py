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


@pytest.mark.parametrize("what", ["running_mean", "running_var", "weight", "bias"])
def test_parameters_are_one_dimensional_of_c_values_as_in_torch(rng, what):
    # PyTorch raises RuntimeError for both; ShapeError is a RuntimeError and a ValueError.
    x, arguments = rng.standard_normal((2, 3, 4, 4)), dict(running_mean=np.zeros(3), running_var=np.ones(3))
    for bad in [np.ones((3, 1)), np.ones(4)]:
        with pytest.raises(RuntimeError, match=what):
            batch_norm(x, **{**arguments, what: bad}, training=True)
    np.testing.assert_array_equal(arguments["running_mean"], np.zeros(3))


def test_backward_checks_grad_output_against_the_input_and_needs_buffers_in_eval(rng):
    x = rng.standard_normal((2, 3, 4, 4))
    with pytest.raises(RuntimeError, match="grad_output"):
        batch_norm_backward(rng.standard_normal((2, 3, 16)), x, training=True)
    with pytest.raises(ValueError, match="running_mean and running_var"):
        batch_norm_backward(rng.standard_normal(x.shape), x, training=False)


def as_planes(x):
    """The same values as (N, C, H, W), over which the reference computes: statistics over every axis but 1."""
    return x.reshape(x.shape[0], x.shape[1], 1, -1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "shape",
    [(6, 4), (5, 4, 7), (4, 4, 6), (2, 4, 3, 5, 6), (3, 4, 1, 5, 1), (1, 4, 9)],
    ids=str,
)
def test_every_rank_from_2_to_5_is_n_c_and_spatial_dims(rng, dtype, shape):
    """As torch.nn.functional.batch_norm: a 3D input is (N, C, L), never an unbatched (C, H, W); N == C
    included, where reading it the other way would silently normalize over the wrong axis."""
    c = shape[1]
    x = (rng.standard_normal(shape) * 2 + 1).astype(dtype)
    rm, rv = np.zeros(c, dtype), np.ones(c, dtype)
    w, b = rng.uniform(0.5, 2, c).astype(dtype), rng.standard_normal(c).astype(dtype)
    ref = ReferenceBatchNorm2d(c, momentum=0.1)
    ref.weight, ref.bias = w.astype(np.float64), b.astype(np.float64)
    y = batch_norm(x, rm, rv, w, b, training=True)
    assert y.shape == shape
    np.testing.assert_allclose(as_planes(y), ref.forward(as_planes(x)), **tol(dtype))
    np.testing.assert_allclose(rv, ref.running_var, **tol(dtype))
    dy = rng.standard_normal(shape).astype(dtype)
    dx, dw, db = batch_norm_backward(dy, x, weight=w, training=True)
    assert dx.shape == shape
    np.testing.assert_allclose(as_planes(dx), ref.backward(as_planes(dy)), **tol(dtype))
    np.testing.assert_allclose(dw, ref.grad_weight, rtol=1e-4, atol=1e-4)


def test_a_5d_view_whose_dims_do_not_nest_is_read_correctly(rng):
    base = rng.standard_normal((2, 3, 8, 9, 10))
    views = [base[:, :, ::2, ::3, ::2], base.transpose(0, 1, 4, 2, 3), np.asfortranarray(base)]
    for x in views:
        ref = ReferenceBatchNorm2d(3)
        y = batch_norm(x, None, None, training=True)
        np.testing.assert_allclose(as_planes(y), ref.forward(as_planes(np.ascontiguousarray(x))), **tol(np.float64))


@pytest.mark.parametrize("shape", [(5,), (2, 3, 4, 5, 6, 7)], ids=str)
def test_ranks_outside_2_to_5_are_value_errors_that_say_so(shape):
    with pytest.raises(ValueError, match=r"2D to 5D \(N, C, \*\)"):
        batch_norm(np.ones(shape), None, None, training=True)


def test_one_value_per_channel_in_training_is_an_error():
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        batch_norm(np.ones((1, 4)), None, None, training=True)
