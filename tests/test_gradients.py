"""Backward checked by central finite differences of the float64 forward itself."""

import numpy as np
import pytest

import batchnorm
from batchnorm.functional import batch_norm, batch_norm_backward


def numeric_grads(f, arrays, h=1e-6):
    """d(Σ f(arrays) · probe)/d(each array), by central differences, probe fixed by the caller."""
    grads = []
    for a in arrays:
        g = np.zeros_like(a)
        for i in np.ndindex(a.shape):
            old = a[i]
            a[i] = old + h
            up = f()
            a[i] = old - h
            down = f()
            a[i] = old
            g[i] = (up - down) / (2 * h)
        grads.append(g)
    return grads


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(2, 3, 2, 3), (1, 2, 1, 2), (3, 2, 1, 1)])
def test_functional_backward_matches_finite_differences(rng, training, shape):
    c = shape[1]
    x = rng.standard_normal(shape) * 3 + 1
    w, b = rng.standard_normal(c), rng.standard_normal(c)
    rm, rv = rng.standard_normal(c), rng.uniform(0.5, 2.0, c)
    probe = rng.standard_normal(shape)

    def loss():
        return float((batch_norm(x, rm.copy(), rv.copy(), w, b, training=training, eps=1e-3) * probe).sum())

    gx, gw, gb = numeric_grads(loss, [x, w, b])
    dx, dw, db = batch_norm_backward(probe, x, rm, rv, w, training=training, eps=1e-3)
    np.testing.assert_allclose(dx, gx, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(dw, gw, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(db, gb, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(affine=False),
        dict(bias=False),
        dict(track_running_stats=False),
    ],
)
@pytest.mark.parametrize("training", [True, False])
def test_module_backward_matches_finite_differences(rng, options, training):
    shape = (2, 3, 3, 2)
    m = batchnorm.BatchNorm2d(3, dtype=np.float64, momentum=0.0, **options).train(training)
    if m.weight is not None:
        m.weight[:] = rng.standard_normal(3)
    if m.bias is not None:
        m.bias[:] = rng.standard_normal(3)
    if m.running_mean is not None:
        m.running_mean[:], m.running_var[:] = rng.standard_normal(3), rng.uniform(0.5, 2, 3)
    x = rng.standard_normal(shape)
    probe = rng.standard_normal(shape)
    params = [p for p in (m.weight, m.bias) if p is not None]

    def loss():
        return float((m(x) * probe).sum())  # momentum 0: running statistics stay put

    numeric = numeric_grads(loss, [x, *params])
    m(x)
    dx = m.backward(probe)
    np.testing.assert_allclose(dx, numeric[0], rtol=1e-5, atol=1e-7)
    analytic = [g for g in (m.grad_weight, m.grad_bias) if g is not None]
    assert len(analytic) == len(params)
    for got, want in zip(analytic, numeric[1:], strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
