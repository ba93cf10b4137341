"""Hostile input through the Python API: exceptions, never crashes or hangs; failed calls change nothing.
Cases that could crash the interpreter run in a subprocess."""

import copy
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import batchnorm


def run_isolated(code, timeout=60):
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_views_taken_in_new_survive_deepcopy_and_pickle():
    out = run_isolated(
        """
        import copy, pickle, batchnorm
        kept = []
        class Net(batchnorm.BatchNorm2d):
            def __new__(cls, *a, **k):
                self = super().__new__(cls, *a, **k); kept.append(self.running_var); return self
        for _ in range(200):
            m = copy.deepcopy(Net(8)); kept[-1][:] = 1e30
            assert (m.running_var == 1e30).all()
            m = pickle.loads(pickle.dumps(Net(8))); kept[-1][:] = 2.0
            assert (m.running_var == 2.0).all()
        print("ok")
        """
    )
    assert out.strip() == "ok"


@pytest.mark.parametrize("count", [10**12, 2**62, 2**63, 2**80])
def test_huge_num_features_raise(count):
    with pytest.raises((MemoryError, ValueError)) as info:
        batchnorm.BatchNorm2d(count)
    if count >= 2**63:
        assert "too large" in str(info.value)


def test_huge_num_features_in_overrides_and_files(tmp_path):
    sd = batchnorm.BatchNorm2d(3).state_dict()
    with pytest.raises((MemoryError, ValueError)):
        batchnorm.BatchNorm2d.from_state_dict(sd, num_features=10**12)
    path = tmp_path / "m.safetensors"
    batchnorm.BatchNorm2d(3).save(path)
    with pytest.raises((MemoryError, ValueError)):
        batchnorm.BatchNorm2d.from_file(path, num_features=10**12)
    for value in ["1000000000000", "18446744073709551615"]:
        tensors = {k: np.asarray(v) for k, v in sd.items()}
        batchnorm.save_file(
            tensors,
            tmp_path / "x.safetensors",
            metadata={
                "batchnorm.num_features": value,
                "batchnorm.eps": "1e-05",
                "batchnorm.momentum": "0.1",
                "batchnorm.affine": "true",
                "batchnorm.bias": "true",
                "batchnorm.track_running_stats": "true",
            },
        )
        with pytest.raises((MemoryError, ValueError)):
            batchnorm.BatchNorm2d.from_file(tmp_path / "x.safetensors")


def test_out_overlapping_a_buffer_is_refused():
    m = batchnorm.BatchNorm2d(4)
    x = np.random.default_rng(0).standard_normal((1, 4, 1, 2)).astype(np.float32)
    before = m.running_mean.copy()
    buf = np.zeros(8, np.float32)
    m2 = batchnorm.BatchNorm2d(4)
    m2(x)
    with pytest.raises(ValueError, match="running_mean"):
        m(
            np.ones((1, 4, 1, 1), np.float32) * np.arange(4, dtype=np.float32).reshape(1, 4, 1, 1) + x[:, :, :, :1],
            out=m.running_mean.reshape(1, 4, 1, 1),
        )
    np.testing.assert_array_equal(m.running_mean, before)
    m3 = batchnorm.BatchNorm2d(4).eval()
    x1 = np.ones((1, 4, 1, 1), np.float32)
    m3(x1)
    with pytest.raises(ValueError, match="weight"):
        m3.backward(x1, out=m3.weight.reshape(1, 4, 1, 1))
    np.testing.assert_array_equal(m3.weight, 1)
    with pytest.raises(ValueError, match="running_mean"):
        batchnorm.functional.batch_norm(x, buf[:4], np.ones(4, np.float32), training=True, out=buf.reshape(1, 4, 1, 2))
    np.testing.assert_array_equal(buf, 0)


def test_input_that_is_a_module_buffer_is_read_safely():
    m = batchnorm.BatchNorm2d(4)
    m.running_mean[:] = [1, 2, 3, 4]
    y = m(np.broadcast_to(m.running_mean.reshape(1, 4, 1, 1), (2, 4, 1, 1)))
    np.testing.assert_array_equal(y, 0)


def test_set_num_threads_is_bounded():
    with pytest.raises(ValueError, match="at most"):
        batchnorm.set_num_threads(10**9)
    with pytest.raises(ValueError):
        batchnorm.set_num_threads(2**70)
    with pytest.raises(ValueError, match="positive"):
        batchnorm.set_num_threads(0)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_pool_works_after_fork():
    run_isolated(
        """
        import os, numpy as np, batchnorm
        batchnorm.set_num_threads(2)
        x = np.ones((64, 64, 32, 32), np.float32)
        batchnorm.BatchNorm2d(64)(x)
        pid = os.fork()
        if pid == 0:
            batchnorm.BatchNorm2d(64)(x); os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        """,
        timeout=60,
    )


def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    run_isolated(
        f"""
        import batchnorm
        for call in (batchnorm.load_file, batchnorm.BatchNorm2d.from_file):
            try:
                call({str(fifo)!r})
            except ValueError as e:
                assert "FIFO" in str(e), e
            else:
                raise AssertionError("accepted a FIFO")
        """,
        timeout=30,
    )
    with pytest.raises(ValueError, match="not a regular file"):
        batchnorm.BatchNorm2d(3).save(fifo)


def test_sparse_huge_file_is_refused(tmp_path):
    path = tmp_path / "huge.safetensors"
    with open(path, "wb") as f:
        f.write((64).to_bytes(8, "little") + b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'.ljust(64))
        f.truncate(1 << 40)
    with pytest.raises(ValueError, match="describes"):
        batchnorm.load_file(path)


def test_save_follows_symlinks_and_uses_umask(tmp_path):
    target = tmp_path / "real.safetensors"
    link = tmp_path / "link.safetensors"
    batchnorm.BatchNorm2d(3).save(target)
    link.symlink_to(target)
    m = batchnorm.BatchNorm2d(3)
    m.running_mean[:] = 7
    m.save(link)
    assert link.is_symlink()
    np.testing.assert_array_equal(batchnorm.load_file(target)["running_mean"], 7)
    old = os.umask(0o027)
    try:
        batchnorm.BatchNorm2d(3).save(tmp_path / "new.safetensors")
    finally:
        os.umask(old)
    assert (tmp_path / "new.safetensors").stat().st_mode & 0o777 == 0o640
    assert not [p for p in os.listdir(tmp_path) if "batchnorm-tmp" in p]


def test_save_file_keeps_zero_d_and_integer_counts(tmp_path):
    path = tmp_path / "t.safetensors"
    batchnorm.save_file({"n": np.array(5)}, path)
    assert batchnorm.load_file(path)["n"].shape == ()
    sd = batchnorm.BatchNorm2d(3).state_dict()
    sd["num_batches_tracked"] = np.array(16777217.0)
    m = batchnorm.BatchNorm2d(3)
    m.load_state_dict(sd)
    assert m.num_batches_tracked == 16777217
    sd["num_batches_tracked"] = np.array(12, dtype=np.uint64)
    batchnorm.save_file(sd, path)
    assert batchnorm.BatchNorm2d.from_file(path).num_batches_tracked == 12


def test_eps_rules_follow_pytorch():
    x = np.random.default_rng(1).standard_normal((2, 3, 2, 2)).astype(np.float32)
    m = batchnorm.BatchNorm2d(3, eps=0.0)
    with pytest.raises(ValueError, match="positive"):
        m(x)
    assert m.num_batches_tracked == 0
    m.eval()
    m(x)
    with pytest.raises(ValueError, match="non-negative"):
        batchnorm.functional.batch_norm(x, np.zeros(3, np.float32), np.ones(3, np.float32), eps=-1.0)


@pytest.mark.parametrize("n", [4, 3000])
def test_nan_reaches_running_var(n):
    x = np.arange(2 * n, dtype=np.float32).reshape(2, 1, 1, n)
    x[0, 0, 0, 1] = np.nan
    m = batchnorm.BatchNorm2d(1)
    m(x)
    assert np.isnan(m.running_var[0]) and np.isnan(m.running_mean[0])


def test_unbatched_channel_mismatch_reports_the_given_shape():
    with pytest.raises(ValueError, match=r"\(5, 3, 4\)"):
        batchnorm.BatchNorm2d(3)(np.ones((5, 3, 4), np.float32))


def test_cpu_dlpack_input_is_read():
    torch = pytest.importorskip("torch")
    t = torch.randn(4, 3, 5, 5)
    m, ref = batchnorm.BatchNorm2d(3), batchnorm.BatchNorm2d(3)
    np.testing.assert_array_equal(m(t), ref(t.numpy()))


def test_deepcopy_is_independent():
    m = batchnorm.BatchNorm2d(3)
    c = copy.deepcopy(m)
    c.weight[:] = 5
    assert (m.weight == 1).all()
