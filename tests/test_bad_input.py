"""Every bad input raises an exception naming what was expected and given, and changes nothing."""

import numpy as np
import pytest

import batchnorm

from helpers import assert_same_state, state_snapshot


@pytest.fixture
def trained(rng):
    """A module with history: running statistics, a counter and gradients."""
    m = batchnorm.BatchNorm2d(3)
    x = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    m(x)
    m.backward(np.ones_like(x))
    m(x)
    return m


X = np.zeros((2, 3, 4, 4), dtype=np.float32)

FORWARD_CASES = [
    ("2D input", np.zeros((3, 4), np.float32), ValueError, ["4D", "2D", "(3, 4)"]),
    ("5D input", np.zeros((1, 3, 2, 2, 2), np.float32), ValueError, ["4D", "5D"]),
    ("channel mismatch", np.zeros((2, 4, 3, 3), np.float32), ValueError, ["3 channels", "got 4"]),
    ("float64 into float32", X.astype(np.float64), TypeError, ["float32", "float64"]),
    ("int", X.astype(np.int32), TypeError, ["float32", "int32"]),
    ("float16, one value per channel", np.zeros((1, 3, 1, 1), np.float16), ValueError, ["more than 1 value"]),
    ("complex", X.astype(np.complex64), TypeError, ["float32", "complex64"]),
    ("object", X.astype(object), TypeError, ["float32", "object"]),
    ("big-endian", X.astype(">f4"), TypeError, ["float32", ">f4"]),
    ("list", X.tolist(), TypeError, ["numpy.ndarray", "list"]),
    ("None", None, TypeError, ["numpy.ndarray", "NoneType"]),
    ("one value per channel", np.zeros((1, 3, 1, 1), np.float32), ValueError, ["more than 1 value per channel"]),
]


@pytest.mark.parametrize("name,x,error,words", FORWARD_CASES, ids=[c[0] for c in FORWARD_CASES])
def test_forward_rejects(trained, name, x, error, words):
    before = state_snapshot(trained)
    with pytest.raises(error) as info:
        trained(x)
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    assert_same_state(before, state_snapshot(trained))
    assert trained.num_batches_tracked == 2


def test_one_value_per_channel_is_fine_in_eval(trained):
    trained.eval()
    assert trained(np.ones((1, 3, 1, 1), np.float32)).shape == (1, 3, 1, 1)


def test_one_value_per_channel_fails_in_eval_without_running_stats():
    m = batchnorm.BatchNorm2d(3, track_running_stats=False).eval()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        m(np.ones((1, 3, 1, 1), np.float32))


OUT_CASES = [
    ("wrong shape", lambda: np.empty((2, 3, 4, 5), np.float32), ValueError, ["out", "(2, 3, 4, 4)", "(2, 3, 4, 5)"]),
    ("wrong dtype", lambda: np.empty((2, 3, 4, 4), np.float64), TypeError, ["out", "float32", "float64"]),
    ("read-only", lambda: _read_only(np.empty((2, 3, 4, 4), np.float32)), ValueError, ["out", "read-only"]),
    ("not contiguous", lambda: np.empty((2, 3, 4, 8), np.float32)[..., ::2], ValueError, ["out", "contiguous"]),
    ("not an array", lambda: [0.0] * 96, TypeError, ["out", "list"]),
]


def _read_only(a):
    a.setflags(write=False)
    return a


@pytest.mark.parametrize("name,make_out,error,words", OUT_CASES, ids=[c[0] for c in OUT_CASES])
def test_bad_out(trained, rng, name, make_out, error, words):
    x = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    before = state_snapshot(trained)
    with pytest.raises(error) as info:
        trained(x, out=make_out())
    for word in words:
        assert word in str(info.value)
    assert_same_state(before, state_snapshot(trained))
    with pytest.raises(error):
        trained.backward(x, out=make_out())
    assert_same_state(before, state_snapshot(trained))


def test_out_overlapping_input(trained, rng):
    x = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    before = state_snapshot(trained)
    with pytest.raises(ValueError, match="share memory"):
        trained(x, out=x)
    assert_same_state(before, state_snapshot(trained))


def test_backward_before_forward():
    m = batchnorm.BatchNorm2d(3)
    with pytest.raises(RuntimeError, match="before any forward"):
        m.backward(X)
    assert m.grad_weight is None


@pytest.mark.parametrize(
    "grad,error,words",
    [
        (np.zeros((2, 3, 4, 5), np.float32), ValueError, ["grad_output", "(2, 3, 4, 4)", "(2, 3, 4, 5)"]),
        (np.zeros((2, 3, 4, 4), np.float64), TypeError, ["grad_output", "float32", "float64"]),
        ("nope", TypeError, ["grad_output", "str"]),
    ],
)
def test_bad_grad_output(trained, grad, error, words):
    before = state_snapshot(trained)
    with pytest.raises(error) as info:
        trained.backward(grad)
    for word in words:
        assert word in str(info.value)
    assert_same_state(before, state_snapshot(trained))


@pytest.mark.parametrize(
    "kwargs,error,words",
    [
        (dict(num_features=0), ValueError, ["num_features", "positive", "0"]),
        (dict(num_features=-3), ValueError, ["num_features", "-3"]),
        (dict(num_features=2.5), TypeError, ["num_features", "float"]),
        (dict(num_features=3, dtype="int32"), TypeError, ["float32 or float64", "int32"]),
        (dict(num_features=3, dtype=np.float16), TypeError, ["float32 or float64", "float16"]),
        (dict(num_features=3, dtype="not-a-dtype"), TypeError, ["float32 or float64", "not-a-dtype"]),
        # No machine has a 100th GPU; "cuda" without a GPU is in test_cuda.py, and works with one.
        (dict(num_features=3, device="cuda:99"), RuntimeError, ["cuda:99"]),
        (dict(num_features=3, device="tpu"), ValueError, ["tpu", "cpu"]),
        (dict(num_features=3, device=3), TypeError, ["device", "int"]),
    ],
)
def test_bad_constructor_arguments(kwargs, error, words):
    with pytest.raises(error) as info:
        batchnorm.BatchNorm2d(**kwargs)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


@pytest.mark.parametrize(
    "name,value,error,words",
    [
        ("weight", np.ones(4, np.float32), ValueError, ["weight", "(3,)", "(4,)"]),
        ("weight", np.ones(3, np.float64), TypeError, ["weight", "float32", "float64"]),
        ("bias", [1.0, 2.0, 3.0], TypeError, ["bias", "list"]),
        ("running_var", np.ones((3, 1), np.float32), ValueError, ["running_var", "(3,)", "(3, 1)"]),
    ],
)
def test_bad_assignment(trained, name, value, error, words):
    before = state_snapshot(trained)
    with pytest.raises(error) as info:
        setattr(trained, name, value)
    for word in words:
        assert word in str(info.value)
    assert_same_state(before, state_snapshot(trained))


def test_assigning_absent_parameter():
    m = batchnorm.BatchNorm2d(3, affine=False)
    with pytest.raises(ValueError, match="affine=False"):
        m.weight = np.ones(3, np.float32)


def test_load_state_dict_strict_names_every_key(trained):
    before = state_snapshot(trained)
    state = trained.state_dict()
    del state["running_mean"], state["bias"]
    state["extra"] = np.zeros(3)
    state["weight"] = np.full(3, 5.0)  # valid, but must not be written when the load fails
    with pytest.raises(RuntimeError) as info:
        trained.load_state_dict(state)
    message = str(info.value)
    for word in ('"running_mean"', '"bias"', '"extra"', "Missing", "Unexpected"):
        assert word in message
    assert_same_state(before, state_snapshot(trained))


def test_load_state_dict_wrong_shape_names_key_and_shapes(trained):
    before = state_snapshot(trained)
    state = trained.state_dict()
    state["running_var"] = np.ones(5, np.float32)
    state["weight"] = np.full(3, 5.0)
    with pytest.raises(RuntimeError) as info:
        trained.load_state_dict(state, strict=False)
    for word in ("running_var", "(5,)", "(3,)"):
        assert word in str(info.value)
    assert_same_state(before, state_snapshot(trained))


@pytest.mark.parametrize(
    "state,error",
    [
        ("not a mapping", TypeError),
        ({"weight": np.array(["a", "b", "c"])}, TypeError),
        ({1: np.ones(3)}, TypeError),
    ],
)
def test_load_state_dict_bad_values(trained, state, error):
    before = state_snapshot(trained)
    with pytest.raises(error):
        trained.load_state_dict(state, strict=False)
    assert_same_state(before, state_snapshot(trained))


def test_set_num_threads_rejects_non_positive():
    with pytest.raises(ValueError, match="positive"):
        batchnorm.set_num_threads(0)


def test_impossible_output_size_is_a_memory_error(trained):
    before = state_snapshot(trained)
    huge = np.broadcast_to(np.float32(1), (2**34, 3, 2**12, 2**12))  # zero strides: no memory behind it
    with pytest.raises(MemoryError):
        trained(huge)
    assert_same_state(before, state_snapshot(trained))


def test_size_mismatches_are_runtime_errors_as_in_pytorch_and_value_errors_too():
    """PyTorch raises RuntimeError for these; code written for it, or for a NumPy library, catches them."""
    m = batchnorm.BatchNorm2d(3)
    calls = [
        lambda: m(np.ones((2, 4, 3, 3), np.float32)),
        lambda: batchnorm.functional.batch_norm(np.ones((2, 3, 4)), np.zeros(4), np.ones(4), training=True),
        lambda: batchnorm.functional.batch_norm(np.ones((2, 3, 4)), None, None, np.ones(2), training=True),
        lambda: batchnorm.functional.batch_norm(np.ones((2, 3, 4)), np.zeros(3), np.ones(3), bias=np.ones(2)),
    ]
    for call in calls:
        with pytest.raises(RuntimeError, match="expected|should"):
            call()
        with pytest.raises(ValueError):
            call()
        with pytest.raises(batchnorm.ShapeError):
            call()
