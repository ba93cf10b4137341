"""Property-based tests: any shape, dtype, option set, mode and layout agrees with the reference."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import batchnorm

from helpers import layouts, pair
from reference import ReferenceBatchNorm2d

configs = st.fixed_dictionaries(
    {
        "momentum": st.one_of(st.none(), st.floats(0.0, 1.0)),
        "affine": st.booleans(),
        "bias": st.booleans(),
        "track_running_stats": st.booleans(),
        "eps": st.sampled_from([1e-5, 1e-3, 0.1]),
    }
)

shapes = st.tuples(st.integers(0, 4), st.integers(1, 6), st.integers(1, 6), st.integers(1, 6))


@settings(max_examples=150, deadline=None)
@given(
    shape=shapes,
    dtype=st.sampled_from([np.float32, np.float64]),
    config=configs,
    modes=st.lists(st.booleans(), min_size=1, max_size=3),
    layout=st.sampled_from(sorted(layouts(np.zeros((1, 1, 1, 1))).keys())),
    seed=st.integers(0, 2**32 - 1),
)
def test_matches_reference(shape, dtype, config, modes, layout, seed):
    rng = np.random.default_rng(seed)
    m, ref = pair(shape[1], dtype, **config)
    rtol = 1e-4 if dtype == np.float32 else 1e-9
    for training in modes:
        m.train(training)
        ref.training = training
        x = (rng.standard_normal(shape) * 3 + rng.uniform(-5, 5)).astype(dtype)
        x_view = layouts(x)[layout]
        batch_stats = training or not config["track_running_stats"]
        if batch_stats and shape[0] * shape[2] * shape[3] == 1:
            before = m.state_dict()
            try:
                m(x_view)
            except ValueError:
                pass
            else:
                raise AssertionError("one value per channel must be refused")
            for k, v in m.state_dict().items():
                np.testing.assert_array_equal(v, before[k])
            continue
        y = m(x_view)
        np.testing.assert_allclose(y, ref.forward(x), rtol=rtol, atol=rtol)
        for name in ("running_mean", "running_var"):
            if getattr(ref, name) is not None:
                np.testing.assert_allclose(getattr(m, name), getattr(ref, name), rtol=rtol, atol=rtol)
        assert m.num_batches_tracked == ref.num_batches_tracked
        dy = rng.standard_normal(shape).astype(dtype)
        np.testing.assert_allclose(m.backward(layouts(dy)[layout]), ref.backward(dy), rtol=rtol * 10, atol=rtol * 10)


@settings(max_examples=50, deadline=None)
@given(
    offset=st.sampled_from([0.0, 1e2, 1e4]),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
    shape=st.tuples(st.integers(2, 8), st.integers(1, 4), st.integers(1, 9), st.integers(1, 9)),
    seed=st.integers(0, 2**32 - 1),
)
def test_normalized_output_has_zero_mean_unit_variance(offset, scale, shape, seed):
    x = (np.random.default_rng(seed).standard_normal(shape) * scale + offset).astype(np.float64)
    y = batchnorm.BatchNorm2d(shape[1], eps=1e-300, dtype=np.float64)(x)
    # Rounding x itself costs up to ε·|x|, which normalization magnifies by 1/std of the channel: in a
    # small batch that std can be far below `scale`.
    axes = (0, 2, 3)
    tolerance = 64 * np.finfo(np.float64).eps * (1 + np.abs(x).max(axis=axes) / x.std(axis=axes))
    assert np.all(np.abs(y.mean(axis=axes)) <= tolerance), (y.mean(axis=axes), tolerance)
    assert np.all(np.abs(y.var(axis=axes) - 1) <= tolerance), (y.var(axis=axes), tolerance)


@settings(max_examples=30, deadline=None)
@given(steps=st.integers(1, 6), seed=st.integers(0, 2**32 - 1))
def test_cumulative_average_is_mean_of_batch_statistics(steps, seed):
    rng = np.random.default_rng(seed)
    m = batchnorm.BatchNorm2d(2, momentum=None, dtype=np.float64)
    ref = ReferenceBatchNorm2d(2, momentum=None)
    means = []
    for _ in range(steps):
        x = rng.standard_normal((3, 2, 2, 2)) + rng.uniform(-3, 3)
        m(x), ref.forward(x)
        means.append(x.mean(axis=(0, 2, 3)))
    np.testing.assert_allclose(m.running_mean, np.mean(means, axis=0), rtol=1e-12, atol=1e-12)


FAMILY = {2: batchnorm.BatchNorm1d, 3: batchnorm.BatchNorm1d, 4: batchnorm.BatchNorm2d, 5: batchnorm.BatchNorm3d}


@settings(max_examples=120, deadline=None)
@given(
    dims=st.integers(2, 5).flatmap(
        lambda rank: st.tuples(st.integers(2, 4), st.integers(1, 4), *[st.integers(1, 4)] * (rank - 2))
    ),
    dtype=st.sampled_from([np.float32, np.float64]),
    config=configs,
    transpose=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_every_rank_of_the_family_and_the_functional_api_matches_the_reference(dims, dtype, config, transpose, seed):
    """Ranks 2 to 5 through their class and through batchnorm.functional, in C order or as a view with
    its last two axes swapped, against the reference on the same values laid out as (N, C, 1, S)."""
    rng = np.random.default_rng(seed)
    c = dims[1]
    m, ref = FAMILY[len(dims)](c, dtype=dtype, **config), ReferenceBatchNorm2d(c, **config)
    x = (rng.standard_normal(dims) * 2 + rng.uniform(-3, 3)).astype(dtype)
    if transpose and len(dims) > 2:
        x = np.ascontiguousarray(np.swapaxes(x, -1, -2)).swapaxes(-1, -2)  # same values, other strides
    planes = (dims[0], c, 1, -1)
    rtol = 1e-4 if dtype == np.float32 else 1e-9
    y = m(x)
    np.testing.assert_allclose(y.reshape(planes), ref.forward(x.reshape(planes)), rtol=rtol, atol=rtol)
    dy = rng.standard_normal(dims).astype(dtype)
    np.testing.assert_allclose(m.backward(dy).reshape(planes), ref.backward(dy.reshape(planes)), rtol=rtol, atol=rtol)
    mean, var = np.zeros(c, dtype), np.ones(c, dtype)
    functional = batchnorm.functional.batch_norm(x, mean, var, training=True, momentum=0.1, eps=config["eps"])
    expected = ReferenceBatchNorm2d(c, eps=config["eps"], affine=False).forward(x.reshape(planes))
    np.testing.assert_allclose(functional.reshape(planes), expected, rtol=rtol, atol=rtol)
