"""Same values, same bits, at the benchmark's sizes (where the real size thresholds choose the plans).

Every result — outputs, grad_input, running statistics, parameter gradients, the functional API —
must be bitwise equal across repeated runs, thread counts of 1, 2, 3 and 7, and arrays placed 1–3
elements into their buffers (so they start 4–12 bytes off any alignment). `tests/reproducibility.rs`
forces every plan on small shapes; this file runs the shapes users run.
"""

import numpy as np
import pytest

import batchnorm

BENCHMARK_SHAPES = [(8, 64, 224, 224), (32, 64, 56, 56), (64, 256, 14, 14), (256, 512, 7, 7), (20, 100, 35, 45)]
ODD_SHAPES = [(8, 32, 16, 16), (3, 7, 33, 17), (2, 3, 300, 301), (1, 64, 56, 56)]


def placed(values, skip):
    """`values` copied `skip` elements into a fresh buffer: same values, another address."""
    buffer = np.empty(values.size + skip, values.dtype)
    view = buffer[skip:].reshape(values.shape)
    view[...] = values
    return view


def everything(x, dy, skip, dtype):
    """Each result of a training step, an eval step and the functional API, as raw bytes. Half inputs
    (float16, bfloat16) run on a float32 module with float32 running buffers."""
    channels = x.shape[1]
    x, dy = placed(x, skip), placed(dy, skip)
    out = placed(np.zeros(x.shape, dtype), skip)
    state_dtype = np.float32 if np.dtype(dtype).itemsize == 2 else dtype
    m = batchnorm.BatchNorm2d(channels, momentum=0.3, dtype=state_dtype)
    m.weight = np.linspace(0.5, 2.0, channels).astype(state_dtype)
    results = {}
    m(x, out=out)
    results["y"] = out.tobytes()
    m.backward(dy, out=out)
    results["grad_input"] = out.tobytes()
    for name in ("running_mean", "running_var", "grad_weight", "grad_bias"):
        results[name] = getattr(m, name).tobytes()
    m.eval()
    m(x, out=out)
    results["y eval"] = out.tobytes()
    m.backward(dy, out=out)
    results["grad_input eval"] = out.tobytes()
    mean, var = np.full(channels, 0.5, state_dtype), np.full(channels, 2.0, state_dtype)
    batchnorm.functional.batch_norm(x, mean, var, training=True, momentum=0.1, eps=1e-3, out=out)
    results["y functional"] = out.tobytes() + mean.tobytes() + var.tobytes()
    grads = batchnorm.functional.batch_norm_backward(dy, x, training=True, out=out)
    results["functional backward"] = b"".join(g.tobytes() for g in grads)
    return results


@pytest.fixture
def restore_threads():
    before = batchnorm.get_num_threads()
    yield
    batchnorm.set_num_threads(before)


def check(shape, dtype, thread_counts, skips):
    rng = np.random.default_rng(sum(shape))
    x = (rng.standard_normal(shape) * 3 + 10).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    batchnorm.set_num_threads(1)
    baseline = everything(x, dy, 0, dtype)
    assert everything(x, dy, 0, dtype) == baseline, "a second run differs"
    for threads in thread_counts:
        batchnorm.set_num_threads(threads)
        for skip in skips:
            got = everything(x, dy, skip, dtype)
            differing = [name for name in baseline if got[name] != baseline[name]]
            assert not differing, f"{differing} differ at {threads} threads, {skip} elements in, {shape}"


@pytest.mark.parametrize("shape", BENCHMARK_SHAPES + ODD_SHAPES, ids=str)
def test_float32_results_are_the_same_bits_at_every_thread_count_and_address(shape, restore_threads):
    check(shape, np.float32, [1, 2, 3, 7], [0, 1, 2, 3])


@pytest.mark.parametrize("shape", [(32, 64, 56, 56), (64, 256, 14, 14), (2, 3, 300, 301)], ids=str)
def test_float64_results_are_the_same_bits_at_every_thread_count_and_address(shape, restore_threads):
    check(shape, np.float64, [2, 7], [0, 1])


HALF = [np.float16]
try:
    import ml_dtypes

    HALF.append(ml_dtypes.bfloat16)
except ImportError:
    pass


@pytest.mark.parametrize("dtype", HALF, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", [(32, 64, 56, 56), (2, 3, 300, 301), (3, 7, 33, 17)], ids=str)
def test_half_results_are_the_same_bits_at_every_thread_count_and_address(shape, dtype, restore_threads):
    check(shape, dtype, [2, 3, 7], [0, 1, 3])


def test_the_comparison_sees_a_one_bit_difference():
    """The suite compares bytes: a result one ulp off is caught."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    results = everything(x, x, 0, np.float32)
    nudged = x.copy()
    nudged[1, 2, 3, 4] = np.nextafter(nudged[1, 2, 3, 4], np.float32(np.inf))
    assert everything(nudged, x, 0, np.float32)["y"] != results["y"]
