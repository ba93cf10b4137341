"""BatchNorm1d and BatchNorm3d: the same layer over (N, C) / (N, C, L) and (N, C, D, H, W) inputs, against the
float64 reference (which reduces over every axis but 1) and, when it imports, PyTorch."""

import copy
import pickle

import numpy as np
import pytest

import batchnorm

from helpers import tol
from reference import ReferenceBatchNorm2d

FAMILY = [
    (batchnorm.BatchNorm1d, [(6, 4), (5, 4, 7), (4, 4, 4)]),
    (batchnorm.BatchNorm3d, [(2, 4, 3, 5, 6), (3, 4, 1, 2, 1)]),
]
CASES = [(cls, shape) for cls, shapes in FAMILY for shape in shapes]


def as_planes(x):
    """The same values as (N, C, 1, S): the reference's statistics run over every axis but 1."""
    return x.reshape(x.shape[0], x.shape[1], 1, -1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cls,shape", CASES, ids=lambda v: getattr(v, "__name__", str(v)))
@pytest.mark.parametrize("config", [dict(), dict(momentum=None), dict(affine=False), dict(track_running_stats=False)])
def test_training_and_eval_steps_match_the_reference(rng, cls, shape, dtype, config):
    c = shape[1]
    m, ref = cls(c, dtype=dtype, **config), ReferenceBatchNorm2d(c, **config)
    if ref.weight is not None:
        ref.weight = rng.uniform(0.5, 2, c).astype(dtype).astype(np.float64)
        ref.bias = rng.standard_normal(c).astype(dtype).astype(np.float64)
        m.weight, m.bias = ref.weight.astype(dtype), ref.bias.astype(dtype)
    for step in range(3):
        training = step < 2
        m.train(training)
        ref.training = training
        x = (rng.standard_normal(shape) * (step + 1) + step).astype(dtype)
        y = m(x)
        assert y.shape == shape
        np.testing.assert_allclose(as_planes(y), ref.forward(as_planes(x)), **tol(dtype))
        dy = rng.standard_normal(shape).astype(dtype)
        dx = m.backward(dy)
        assert dx.shape == shape
        np.testing.assert_allclose(as_planes(dx), ref.backward(as_planes(dy)), **tol(dtype))
    if ref.running_mean is not None:
        np.testing.assert_allclose(m.running_var, ref.running_var, **tol(dtype))
        assert m.num_batches_tracked == ref.num_batches_tracked


@pytest.mark.parametrize(
    "cls,shape,expected",
    [
        (batchnorm.BatchNorm1d, (2, 3, 4, 5), "2D or 3D"),
        (batchnorm.BatchNorm1d, (3,), "2D or 3D"),
        (batchnorm.BatchNorm3d, (2, 3, 4, 5), "5D"),
        (batchnorm.BatchNorm3d, (1, 2, 3, 4, 5, 6), "5D"),
        (batchnorm.BatchNorm2d, (2, 3, 4, 5, 6), "4D"),
    ],
)
def test_the_wrong_rank_is_a_value_error_naming_the_expected_ranks(cls, shape, expected):
    m = cls(shape[1] if len(shape) > 1 else 3)
    before = m.state_dict()
    with pytest.raises(ValueError, match=expected) as info:
        m(np.ones(shape, np.float32))
    assert f"{len(shape)}D" in str(info.value)
    for key, value in m.state_dict().items():
        np.testing.assert_array_equal(value, before[key])


def test_one_value_per_channel_in_training_is_an_error_for_n_by_c():
    m = batchnorm.BatchNorm1d(4)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        m(np.ones((1, 4), np.float32))
    assert m.num_batches_tracked == 0
    m.eval()
    assert m(np.ones((1, 4), np.float32)).shape == (1, 4)


def test_the_classes_are_siblings_that_keep_their_class_through_copies_and_files(tmp_path, rng):
    assert not isinstance(batchnorm.BatchNorm1d(2), batchnorm.BatchNorm2d)
    assert not isinstance(batchnorm.BatchNorm3d(2), batchnorm.BatchNorm2d)
    for cls, shape in [(batchnorm.BatchNorm1d, (4, 3)), (batchnorm.BatchNorm3d, (2, 3, 2, 2, 2))]:
        m = cls(3)
        m(rng.standard_normal(shape).astype(np.float32))
        assert repr(m).startswith(f"{cls.__name__}(3, ")
        for twin in (pickle.loads(pickle.dumps(m)), copy.deepcopy(m)):
            assert type(twin) is cls
            np.testing.assert_array_equal(twin.running_mean, m.running_mean)
        m.save(tmp_path / "m.safetensors")
        assert type(cls.from_file(tmp_path / "m.safetensors")) is cls
        # The keys are PyTorch's for every class, so a state dict moves between them, as in PyTorch.
        other = batchnorm.BatchNorm2d.from_state_dict(m.state_dict())
        assert type(other) is batchnorm.BatchNorm2d
        np.testing.assert_array_equal(other.running_var, m.running_var)


def test_the_base_class_is_not_a_layer():
    with pytest.raises(TypeError, match="BatchNorm1d, BatchNorm2d or BatchNorm3d"):
        batchnorm._core._BatchNorm(3)


@pytest.mark.parametrize("cls,shape", CASES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_matches_torch(rng, cls, shape):
    torch = pytest.importorskip("torch")
    theirs = getattr(torch.nn, cls.__name__)(shape[1], dtype=torch.float64)
    ours = cls(shape[1], dtype=np.float64)
    for _ in range(2):
        x = rng.standard_normal(shape) * 2 + 1
        tx = torch.from_numpy(x).requires_grad_(True)
        ty = theirs(tx)
        np.testing.assert_allclose(ours(x), ty.detach().numpy(), rtol=1e-10, atol=1e-10)
        dy = rng.standard_normal(shape)
        ty.backward(torch.from_numpy(dy))
        np.testing.assert_allclose(ours.backward(dy), tx.grad.numpy(), rtol=1e-9, atol=1e-9)
    for key, value in theirs.state_dict().items():
        np.testing.assert_allclose(ours.state_dict()[key], value.numpy(), rtol=1e-10, atol=1e-12, err_msg=key)


def test_batchnorm3d_reads_a_5d_view_whose_dims_do_not_nest(rng):
    base = rng.standard_normal((2, 3, 8, 9, 10))
    x = base[:, :, ::2, ::3, ::2]
    m, ref = batchnorm.BatchNorm3d(3, dtype=np.float64), ReferenceBatchNorm2d(3)
    np.testing.assert_allclose(as_planes(m(x)), ref.forward(as_planes(np.ascontiguousarray(x))), **tol(np.float64))
    dy = rng.standard_normal((2, 3, 8, 9, 10))[:, :, ::2, ::3, ::2]
    np.testing.assert_allclose(
        as_planes(m.backward(dy)), ref.backward(as_planes(np.ascontiguousarray(dy))), **tol(np.float64)
    )
