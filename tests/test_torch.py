"""The same cases against torch.nn.BatchNorm2d itself; skipped where torch is not importable."""

import numpy as np
import pytest

import batchnorm

from helpers import layouts

torch = pytest.importorskip("torch")

TORCH_DTYPE = {np.float32: torch.float32, np.float64: torch.float64}


def torch_pair(c, dtype, **options):
    m = batchnorm.BatchNorm2d(c, dtype=dtype, **options)
    t = torch.nn.BatchNorm2d(c, dtype=TORCH_DTYPE[dtype], **options)
    return m, t


def tolerance(dtype):
    return dict(rtol=1e-4, atol=1e-4) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-10)


def step(m, t, x, dy, dtype):
    y = m(x)
    tx = torch.from_numpy(np.ascontiguousarray(x)).requires_grad_(True)
    ty = t(tx)
    np.testing.assert_allclose(y, ty.detach().numpy(), **tolerance(dtype))
    dx = m.backward(dy)
    ty.backward(torch.from_numpy(np.ascontiguousarray(dy)))
    np.testing.assert_allclose(dx, tx.grad.numpy(), **tolerance(dtype))
    state = m.state_dict()
    assert list(state) == list(t.state_dict())
    for key, value in t.state_dict().items():
        np.testing.assert_allclose(state[key], value.numpy(), **tolerance(dtype), err_msg=key)
    for ours, theirs in ((m.grad_weight, t.weight), (m.grad_bias, t.bias)):
        if theirs is None:
            assert ours is None
        else:
            np.testing.assert_allclose(ours, theirs.grad.numpy(), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(momentum=None),
        dict(momentum=0.5),
        dict(affine=False),
        dict(bias=False),
        dict(track_running_stats=False),
        dict(eps=1e-3),
    ],
    ids=str,
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_training_and_eval_against_torch(rng, options, dtype):
    m, t = torch_pair(5, dtype, **options)
    for training in (True, True, False, True, False):
        m.train(training)
        t.train(training)
        x = (rng.standard_normal((3, 5, 6, 7)) * 4 + 2).astype(dtype)
        step(m, t, x, rng.standard_normal(x.shape).astype(dtype), dtype)


@pytest.mark.parametrize(
    "shape",
    [
        (4, 3, 1, 1),
        (2, 5, 7, 7),
        (3, 5, 11, 13),
        (5, 1, 8, 8),
        (2, 512, 3, 3),
        (2, 4, 1, 1),
        (8, 3, 64, 64),
        (20, 100, 35, 45),
    ],
    ids=str,
)
def test_shapes_against_torch(rng, shape):
    m, t = torch_pair(shape[1], np.float32)
    for training in (True, False):
        m.train(training)
        t.train(training)
        x = (rng.standard_normal(shape) * 10 + 5).astype(np.float32)
        step(m, t, x, rng.standard_normal(shape).astype(np.float32), np.float32)


@pytest.mark.parametrize("layout", sorted(layouts(np.zeros((1, 1, 1, 1))).keys()))
def test_layouts_against_torch(rng, layout):
    m, t = torch_pair(4, np.float32)
    x = (rng.standard_normal((3, 4, 6, 5)) * 3).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    y = m(layouts(x)[layout])
    np.testing.assert_allclose(y, t(torch.from_numpy(x)).detach().numpy(), **tolerance(np.float32))
    assert m.backward(layouts(dy)[layout]).shape == x.shape


def test_functional_against_torch(rng):
    x = rng.standard_normal((3, 4, 5, 5))
    rm, rv = rng.standard_normal(4), rng.uniform(0.5, 2, 4)
    w, b = rng.standard_normal(4), rng.standard_normal(4)
    trm, trv = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
    for training in (True, False):
        y = batchnorm.functional.batch_norm(x, rm, rv, w, b, training=training, momentum=0.2, eps=1e-4)
        ty = torch.nn.functional.batch_norm(
            torch.from_numpy(x),
            trm,
            trv,
            torch.from_numpy(w),
            torch.from_numpy(b),
            training=training,
            momentum=0.2,
            eps=1e-4,
        )
        np.testing.assert_allclose(y, ty.numpy(), rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(rm, trm.numpy(), rtol=1e-12)
        np.testing.assert_allclose(rv, trv.numpy(), rtol=1e-12)


def test_empty_batch_against_torch():
    m, t = torch_pair(3, np.float32)
    y = m(np.zeros((0, 3, 4, 4), np.float32))
    ty = t(torch.zeros(0, 3, 4, 4))
    assert y.shape == tuple(ty.shape)
    assert m.num_batches_tracked == int(t.num_batches_tracked)
    np.testing.assert_array_equal(m.running_mean, t.running_mean.numpy())


def test_repr_matches_torch():
    for options in (dict(), dict(bias=False), dict(momentum=None, eps=1e-3, affine=False, track_running_stats=False)):
        assert repr(batchnorm.BatchNorm2d(7, **options)) == repr(torch.nn.BatchNorm2d(7, **options))


def test_state_dict_loads_into_torch_strictly(rng):
    m = batchnorm.BatchNorm2d(3)
    m(rng.standard_normal((2, 3, 4, 4)).astype(np.float32))
    t = torch.nn.BatchNorm2d(3)
    t.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in m.state_dict().items()}, strict=True)
    np.testing.assert_array_equal(t.running_var.numpy(), m.running_var)
    assert t.num_batches_tracked.dtype == torch.int64


@pytest.mark.parametrize(
    "options",
    [dict(), dict(momentum=None), dict(affine=False), dict(bias=False), dict(track_running_stats=False)],
    ids=str,
)
def test_state_files_move_both_ways_with_pytorch(tmp_path, rng, options):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    x = (rng.standard_normal((4, 5, 6, 6)) * 3 + 1).astype(np.float32)

    ours = batchnorm.BatchNorm2d(5, **options)
    ours(x)
    ours.save(tmp_path / "ours.safetensors")
    theirs = torch.nn.BatchNorm2d(5, **options)
    theirs.load_state_dict(safetensors_torch.load_file(tmp_path / "ours.safetensors"), strict=True)
    np.testing.assert_allclose(
        theirs.eval()(torch.from_numpy(x)).detach().numpy(), ours.eval()(x), rtol=1e-5, atol=1e-5
    )

    trained = torch.nn.BatchNorm2d(5, **options)
    trained(torch.from_numpy(x))
    safetensors_torch.save_file(trained.state_dict(), tmp_path / "theirs.safetensors")
    overrides = {"momentum": None} if "momentum" in options else {}
    loaded = batchnorm.BatchNorm2d.from_file(tmp_path / "theirs.safetensors", **overrides)
    assert repr(loaded) == repr(trained)
    np.testing.assert_allclose(
        loaded.eval()(x), trained.eval()(torch.from_numpy(x)).detach().numpy(), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("shape", [(6, 4), (5, 4, 7), (4, 4, 6), (2, 4, 3, 5, 6)], ids=str)
@pytest.mark.parametrize("training", [True, False])
def test_functional_batch_norm_matches_torch_at_every_rank(rng, shape, training):
    c = shape[1]
    x = rng.standard_normal(shape) * 2 + 1
    mean, var = rng.standard_normal(c), rng.uniform(0.5, 2, c)
    w, b = rng.uniform(0.5, 2, c), rng.standard_normal(c)
    t_mean, t_var = torch.from_numpy(mean.copy()), torch.from_numpy(var.copy())
    expected = torch.nn.functional.batch_norm(
        torch.from_numpy(x), t_mean, t_var, torch.from_numpy(w), torch.from_numpy(b), training, 0.2, 1e-4
    )
    y = batchnorm.functional.batch_norm(x, mean, var, w, b, training=training, momentum=0.2, eps=1e-4)
    np.testing.assert_allclose(y, expected.numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(mean, t_mean.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(var, t_var.numpy(), rtol=1e-12, atol=1e-12)
