"""BatchNorm2d against the float64 reference: training, eval, options, shapes, layouts, backward."""

import numpy as np
import pytest

import batchnorm

from helpers import assert_layout_of_output, layouts, pair, tol

SHAPES = [
    (4, 3, 1, 1),  # H·W = 1
    (2, 5, 7, 7),  # 7×7
    (3, 5, 11, 13),  # odd sizes
    (5, 1, 8, 8),  # C = 1
    (2, 512, 3, 3),  # C = 512
    (2, 4, 1, 1),  # n = 2 values per channel
    (1, 3, 1, 2),  # n = 2 values per channel, N = 1
    (8, 3, 64, 64),  # few channels, large: channels split across tasks
    (1, 2, 300, 300),  # one image, two channels: split within a channel
    (20, 100, 35, 45),  # the documentation's example
]


def batch(rng, shape, dtype, offset=5.0, scale=10.0):
    return (rng.standard_normal(shape) * scale + offset).astype(dtype)


def check_step(m, ref, x, dtype):
    y = m(x)
    expected = ref.forward(x)
    assert y.dtype == np.dtype(dtype) and y.shape == x.shape
    assert_layout_of_output(y, x)
    np.testing.assert_allclose(y, expected, **tol(dtype))
    for name in ("running_mean", "running_var"):
        got, want = getattr(m, name), getattr(ref, name)
        if want is None:
            assert got is None
        else:
            np.testing.assert_allclose(got, want, **tol(dtype))
    assert m.num_batches_tracked == ref.num_batches_tracked
    return y


@pytest.mark.parametrize("momentum", [0.1, 0.5, 0.0, 1.0, None])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_training_sequence_then_eval(rng, momentum, dtype):
    m, ref = pair(6, dtype, momentum=momentum)
    for step in range(4):
        check_step(m, ref, batch(rng, (3, 6, 5, 4), dtype, offset=step), dtype)
    m.eval()
    ref.training = False
    check_step(m, ref, batch(rng, (3, 6, 5, 4), dtype), dtype)
    assert m.num_batches_tracked == 4


@pytest.mark.parametrize(
    "options",
    [
        dict(affine=False),
        dict(bias=False),
        dict(track_running_stats=False),
        dict(affine=False, track_running_stats=False),
        dict(eps=1e-3, momentum=0.3),
    ],
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_options(rng, options, dtype):
    m, ref = pair(4, dtype, **options)
    if m.weight is not None:
        m.weight = rng.standard_normal(4).astype(dtype)
        ref.weight = m.weight.astype(np.float64)
    if m.bias is not None:
        m.bias = rng.standard_normal(4).astype(dtype)
        ref.bias = m.bias.astype(np.float64)
    for training in (True, True, False, True):
        m.train(training)
        ref.training = training
        x = batch(rng, (2, 4, 3, 5), dtype)
        check_step(m, ref, x, dtype)
        dy = rng.standard_normal(x.shape).astype(dtype)
        np.testing.assert_allclose(m.backward(dy), ref.backward(dy), **tol(dtype))
        for name in ("grad_weight", "grad_bias"):
            got, want = getattr(m, name), getattr(ref, name)
            assert (got is None) == (want is None), name
            if want is not None:
                np.testing.assert_allclose(got, want, **tol(dtype))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_shapes_forward_backward(rng, shape):
    m, ref = pair(shape[1], np.float32)
    for training in (True, False):
        m.train(training)
        ref.training = training
        x = batch(rng, shape, np.float32)
        check_step(m, ref, x, np.float32)
        dy = rng.standard_normal(shape).astype(np.float32)
        np.testing.assert_allclose(m.backward(dy), ref.backward(dy), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(m.grad_weight, ref.grad_weight, rtol=1e-4, atol=1e-2)
        np.testing.assert_allclose(m.grad_bias, ref.grad_bias, rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize("layout", list(layouts(np.zeros((2, 3, 4, 5))).keys()))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_layouts(rng, layout, dtype):
    x = batch(rng, (3, 4, 6, 5), dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    m, ref = pair(4, dtype)
    xs, dys = layouts(x)[layout], layouts(dy)[layout]
    np.testing.assert_array_equal(xs, x)
    y = check_step(m, ref, xs, dtype)
    dx = m.backward(dys)
    np.testing.assert_allclose(dx, ref.backward(dy), **tol(dtype))
    assert_layout_of_output(dx, xs)
    # The same bits as the C-contiguous input gives (the README's promise).
    m2 = pair(4, dtype)[0]
    np.testing.assert_array_equal(y, m2(np.ascontiguousarray(xs)))
    np.testing.assert_array_equal(dx, m2.backward(np.ascontiguousarray(dys)))


def test_broadcast_input_with_zero_strides(rng):
    row = rng.standard_normal((1, 3, 1, 5)).astype(np.float32)
    x = np.broadcast_to(row, (4, 3, 6, 5))
    m, ref = pair(3)
    check_step(m, ref, x, np.float32)


def test_unbatched_input(rng):
    x = batch(rng, (3, 4, 5), np.float32)
    m, ref = pair(3)
    y = check_step(m, ref, x, np.float32)
    assert y.shape == (3, 4, 5)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    dx = m.backward(dy)
    assert dx.shape == (3, 4, 5)
    np.testing.assert_allclose(dx, ref.backward(dy), **tol(np.float32))


def test_empty_batch_leaves_running_stats(rng):
    m, ref = pair(3)
    check_step(m, ref, batch(rng, (2, 3, 4, 4), np.float32), np.float32)
    before = m.running_mean.copy(), m.running_var.copy()
    y = m(np.zeros((0, 3, 4, 4), dtype=np.float32))
    assert y.shape == (0, 3, 4, 4)
    np.testing.assert_array_equal(m.running_mean, before[0])
    np.testing.assert_array_equal(m.running_var, before[1])
    assert m.num_batches_tracked == 2  # PyTorch counts the (empty) batch all the same
    dx = m.backward(np.zeros((0, 3, 4, 4), dtype=np.float32))
    assert dx.shape == (0, 3, 4, 4)
    np.testing.assert_array_equal(m.grad_weight, np.zeros(3))


def test_constant_channel_normalizes_to_zero():
    x = np.full((4, 2, 3, 3), 7.25, dtype=np.float32)
    y = batchnorm.BatchNorm2d(2)(x)
    np.testing.assert_array_equal(y, np.zeros_like(y))


def test_out_is_written_and_returned(rng):
    x = batch(rng, (2, 3, 4, 4), np.float32)
    m, ref = pair(3)
    out = np.empty_like(x)
    y = m(x, out=out)
    assert y is out
    np.testing.assert_allclose(out, ref.forward(x), **tol(np.float32))
    dy = rng.standard_normal(x.shape).astype(np.float32)
    grad_out = np.empty_like(x)
    assert m.backward(dy, out=grad_out) is grad_out
    np.testing.assert_allclose(grad_out, ref.backward(dy), **tol(np.float32))


def test_input_is_read_in_place_not_copied(rng):
    x = batch(rng, (2, 3, 4, 4), np.float32)
    m = batchnorm.BatchNorm2d(3)
    m(x)
    mean, var = x.astype(np.float64).mean(axis=(0, 2, 3)), x.astype(np.float64).var(axis=(0, 2, 3))
    x[:] = 0  # backward reads the forward's input: the same memory, as autograd would
    m.backward(np.ones_like(x))
    expected = 32 * (0 - mean) / np.sqrt(var + 1e-5)
    np.testing.assert_allclose(m.grad_weight, expected, rtol=1e-5)


def test_gradients_accumulate_until_zero_grad(rng):
    m, ref = pair(3, np.float64)
    x = batch(rng, (2, 3, 4, 4), np.float64)
    for _ in range(3):
        m(x), ref.forward(x)
        dy = rng.standard_normal(x.shape)
        m.backward(dy), ref.backward(dy)
    np.testing.assert_allclose(m.grad_weight, ref.grad_weight, rtol=1e-12)
    np.testing.assert_allclose(m.grad_bias, ref.grad_bias, rtol=1e-12)
    m.zero_grad()
    assert m.grad_weight is None and m.grad_bias is None
    m(x)
    m.backward(dy)
    assert m.grad_bias is not None
    np.testing.assert_allclose(m.grad_bias, dy.sum(axis=(0, 2, 3)), rtol=1e-12)


def test_parameter_views_are_live_and_writable(rng):
    m, ref = pair(3)
    w = m.weight
    assert w.shape == (3,) and w.dtype == np.float32 and w.flags.writeable
    m.weight -= 0.5
    m.bias[:] = [1.0, 2.0, 3.0]
    ref.weight, ref.bias = np.full(3, 0.5), np.array([1.0, 2.0, 3.0])
    np.testing.assert_array_equal(w, np.full(3, 0.5, dtype=np.float32))
    check_step(m, ref, batch(rng, (2, 3, 4, 4), np.float32), np.float32)
    m.weight = np.array([2.0, 2.0, 2.0], dtype=np.float32)
    np.testing.assert_array_equal(w, np.full(3, 2.0, dtype=np.float32))  # copied into the same memory
    m.running_mean[0] = 9.0
    assert m.state_dict()["running_mean"][0] == 9.0


def test_sgd_step_through_views_changes_next_forward(rng):
    m = batchnorm.BatchNorm2d(3, dtype=np.float64)
    x = batch(rng, (4, 3, 5, 5), np.float64)
    y0 = m(x)
    m.backward(np.ones_like(y0))
    m.bias -= 0.1 * m.grad_bias
    y1 = m(x)
    np.testing.assert_allclose(y1 - y0, np.broadcast_to((-0.1 * 100.0) * np.ones((1, 3, 1, 1)), y0.shape), atol=1e-12)


def test_weight_starts_at_one_bias_at_zero():
    m = batchnorm.BatchNorm2d(5)
    np.testing.assert_array_equal(m.weight, np.ones(5))
    np.testing.assert_array_equal(m.bias, np.zeros(5))
    np.testing.assert_array_equal(m.running_mean, np.zeros(5))
    np.testing.assert_array_equal(m.running_var, np.ones(5))
    assert m.num_batches_tracked == 0 and m.training and m.grad_weight is None


def test_reset_running_stats_and_parameters(rng):
    m = batchnorm.BatchNorm2d(3)
    m(batch(rng, (2, 3, 4, 4), np.float32))
    m.weight[:] = 3
    m.reset_running_stats()
    np.testing.assert_array_equal(m.running_mean, np.zeros(3))
    np.testing.assert_array_equal(m.running_var, np.ones(3))
    assert m.num_batches_tracked == 0
    np.testing.assert_array_equal(m.weight, np.full(3, 3.0))
    m.reset_parameters()
    np.testing.assert_array_equal(m.weight, np.ones(3))


def test_train_eval_return_module():
    m = batchnorm.BatchNorm2d(2)
    assert m.eval() is m and m.training is False
    assert m.train() is m and m.training is True
    assert m.train(False) is m and not m.training
    m.training = True
    assert m.training


def test_attributes_and_repr():
    m = batchnorm.BatchNorm2d(100)
    assert repr(m) == "BatchNorm2d(100, eps=1e-05, momentum=0.1, affine=True, bias=True, track_running_stats=True)"
    m = batchnorm.BatchNorm2d(3, eps=0.001, momentum=None, affine=False, track_running_stats=False, dtype="float64")
    assert repr(m) == "BatchNorm2d(3, eps=0.001, momentum=None, affine=False, bias=False, track_running_stats=False)"
    assert (m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats) == (3, 0.001, None, False, False)
    assert m.weight is None and m.bias is None and m.running_mean is None and m.num_batches_tracked is None
    assert m.dtype == np.float64 and m.device == "cpu"
    for name in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
        with pytest.raises(AttributeError):
            setattr(m, name, 1)


@pytest.mark.parametrize(
    "dtype,expected",
    [
        (None, np.float32),
        ("float32", np.float32),
        (np.float32, np.float32),
        ("float64", np.float64),
        (np.float64, np.float64),
        (np.dtype("float64"), np.float64),
    ],
)
def test_dtype_spellings(dtype, expected):
    m = batchnorm.BatchNorm2d(2, dtype=dtype)
    assert m.dtype == expected and m.weight.dtype == expected


def test_state_dict_keys_and_dtypes():
    sd = batchnorm.BatchNorm2d(4).state_dict()
    assert list(sd) == ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    assert sd["weight"].dtype == np.float32 and sd["weight"].shape == (4,)
    assert sd["num_batches_tracked"].dtype == np.int64 and sd["num_batches_tracked"].shape == ()
    buffers = ["running_mean", "running_var", "num_batches_tracked"]
    assert list(batchnorm.BatchNorm2d(4, bias=False).state_dict()) == ["weight", *buffers]
    assert list(batchnorm.BatchNorm2d(4, affine=False).state_dict()) == buffers
    assert list(batchnorm.BatchNorm2d(4, track_running_stats=False).state_dict()) == ["weight", "bias"]
    assert batchnorm.BatchNorm2d(4, dtype=np.float64).state_dict()["running_var"].dtype == np.float64


def test_state_dict_round_trip(rng):
    a = batchnorm.BatchNorm2d(3, momentum=None)
    for _ in range(3):
        a(batch(rng, (2, 3, 4, 4), np.float32))
    a.weight[:] = [1, 2, 3]
    b = batchnorm.BatchNorm2d(3, momentum=None)
    assert b.load_state_dict(a.state_dict()) == ([], [])
    for k, v in a.state_dict().items():
        np.testing.assert_array_equal(b.state_dict()[k], v)
    x = batch(rng, (2, 3, 4, 4), np.float32)
    np.testing.assert_array_equal(a.eval()(x), b.eval()(x))


def test_load_state_dict_non_strict_and_casts():
    m = batchnorm.BatchNorm2d(2)
    missing, unexpected = m.load_state_dict(
        {"weight": np.array([2.0, 3.0]), "extra": np.zeros(1), "num_batches_tracked": np.array([7])}, strict=False
    )
    assert missing == ["bias", "running_mean", "running_var"] and unexpected == ["extra"]
    np.testing.assert_array_equal(m.weight, [2.0, 3.0])
    assert m.weight.dtype == np.float32 and m.num_batches_tracked == 7


def test_pytorch_fixture_eval_output(fixtures):
    from reference import read_safetensors

    state = read_safetensors(fixtures / "pytorch_bn8.safetensors")
    m = batchnorm.BatchNorm2d(8)
    assert m.load_state_dict(state) == ([], [])
    assert m.num_batches_tracked == 4
    data = np.load(fixtures / "pytorch_bn8_eval.npz")
    np.testing.assert_allclose(m.eval()(data["x"]), data["y"], rtol=1e-5, atol=1e-5)


def test_pytorch_network_checkpoint_layers(fixtures, rng):
    from reference import ReferenceBatchNorm2d, read_safetensors

    checkpoint = read_safetensors(fixtures / "pytorch_small_net.safetensors")
    for prefix, c, momentum in (("1.", 4, 0.1), ("4.", 6, None)):
        layer = {k[len(prefix) :]: v for k, v in checkpoint.items() if k.startswith(prefix)}
        m = batchnorm.BatchNorm2d(c, momentum=momentum)
        assert m.load_state_dict(layer) == ([], [])
        assert m.num_batches_tracked == 3
        ref = ReferenceBatchNorm2d(c)
        ref.training = False
        ref.weight, ref.bias = layer["weight"], layer["bias"]
        ref.running_mean, ref.running_var = layer["running_mean"], layer["running_var"]
        x = rng.standard_normal((2, c, 5, 5)).astype(np.float32)
        np.testing.assert_allclose(m.eval()(x), ref.forward(x), **tol(np.float32))


def test_thread_count_does_not_change_results(rng):
    x = batch(rng, (4, 3, 100, 100), np.float64)
    results = []
    original = batchnorm.get_num_threads()
    try:
        for threads in (1, 2, 3):
            batchnorm.set_num_threads(threads)
            assert batchnorm.get_num_threads() == threads
            m = batchnorm.BatchNorm2d(3, dtype=np.float64)
            results.append((m(x), m.backward(np.cos(x))))
    finally:
        batchnorm.set_num_threads(original)
    for y, dx in results[1:]:
        np.testing.assert_allclose(y, results[0][0], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(dx, results[0][1], rtol=1e-9, atol=1e-12)


def test_module_reports_version_and_simd_level():
    assert batchnorm.__version__.count(".") == 2
    assert batchnorm.simd_level() in {"scalar", "avx2", "avx512", "neon"}
