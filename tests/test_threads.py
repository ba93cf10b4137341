"""Several Python threads on one module: no crash, no torn or lost running-statistic update."""

import threading

import numpy as np

import batchnorm


def run_threads(count, target):
    errors = []

    def guarded(i):
        try:
            target(i)
        except BaseException as e:  # noqa: BLE001 - surfaced to the test below
            errors.append(e)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_concurrent_training_forwards_lose_no_update(rng):
    threads, calls = 6, 20
    batches = [rng.standard_normal((4, 8, 32, 32)) + i for i in range(threads * calls)]
    m = batchnorm.BatchNorm2d(8, momentum=None, dtype=np.float64)

    def work(i):
        for j in range(calls):
            y = m(batches[i * calls + j])
            assert np.isfinite(y).all()

    run_threads(threads, work)
    assert m.num_batches_tracked == threads * calls
    # A cumulative average does not depend on the order the batches arrived in.
    expected = np.mean([b.mean(axis=(0, 2, 3)) for b in batches], axis=0)
    np.testing.assert_allclose(m.running_mean, expected, rtol=1e-10)


def test_concurrent_forward_backward_and_attribute_reads(rng):
    m = batchnorm.BatchNorm2d(16)
    x = rng.standard_normal((8, 16, 24, 24)).astype(np.float32)

    def work(i):
        for _ in range(15):
            if i % 3 == 0:
                m(x)
                m.backward(np.ones_like(x))
            elif i % 3 == 1:
                m.state_dict()
                assert m.running_mean.shape == (16,)
            else:
                m.eval()(x)
                m.train()

    run_threads(6, work)
    assert np.isfinite(m.running_var).all()


def test_modules_shared_across_threads_with_functional(rng):
    x = rng.standard_normal((4, 3, 40, 40))
    expected = batchnorm.functional.batch_norm(x, None, None, training=True)
    results = [None] * 8

    def work(i):
        results[i] = batchnorm.functional.batch_norm(x, None, None, training=True)

    run_threads(8, work)
    for r in results:
        np.testing.assert_array_equal(r, expected)
