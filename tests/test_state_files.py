"""State files: safetensors save/load, PyTorch interop, pickle and deepcopy, corrupt input."""

import copy
import json
import os
import pickle
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import batchnorm

from helpers import assert_same_state, state_snapshot
from reference import read_safetensors

CONFIGS = [
    dict(),
    dict(momentum=None),
    dict(affine=False),
    dict(bias=False),
    dict(track_running_stats=False),
    dict(dtype="float64", eps=1e-3, momentum=0.25),
]


def trained(options, rng, steps=3):
    m = batchnorm.BatchNorm2d(4, **options)
    dtype = m.dtype
    for _ in range(steps):
        x = (rng.standard_normal((3, 4, 5, 5)) * 2 + 1).astype(dtype)
        m(x)
    if m.weight is not None:
        m.weight[:] = rng.uniform(0.5, 1.5, 4)
    if m.bias is not None:
        m.bias[:] = rng.standard_normal(4)
    return m


def config_of(m):
    return (m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats, m.dtype, repr(m))


def assert_equal_modules(a, b):
    assert config_of(a) == config_of(b)
    assert a.training == b.training
    assert list(a.state_dict()) == list(b.state_dict())
    for key, value in a.state_dict().items():
        np.testing.assert_array_equal(b.state_dict()[key], value, err_msg=key)
        assert b.state_dict()[key].dtype == value.dtype


@pytest.mark.parametrize("options", CONFIGS, ids=str)
def test_save_and_from_file_round_trip(tmp_path, rng, options):
    m = trained(options, rng).eval()
    path = tmp_path / "bn.safetensors"
    m.save(path)
    loaded = batchnorm.BatchNorm2d.from_file(path)
    assert_equal_modules(m, loaded)
    x = rng.standard_normal((2, 4, 3, 3)).astype(m.dtype)
    np.testing.assert_array_equal(loaded(x), m(x))


@pytest.mark.parametrize("options", CONFIGS, ids=str)
def test_file_has_pytorch_keys_dtypes_and_config_metadata(tmp_path, rng, options):
    m = trained(options, rng)
    path = tmp_path / "bn.safetensors"
    m.save(str(path))
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    metadata = header.pop("__metadata__")
    assert set(header) == set(m.state_dict())
    for key, info in header.items():
        if key == "num_batches_tracked":
            assert (info["dtype"], info["shape"]) == ("I64", [])
        else:
            assert info["dtype"] == {"float32": "F32", "float64": "F64"}[m.dtype.name]
            assert info["shape"] == [4]
    assert metadata["batchnorm.momentum"] == ("None" if m.momentum is None else repr(m.momentum))
    assert metadata["batchnorm.dtype"] == m.dtype.name
    assert read_safetensors(path).keys() == m.state_dict().keys()


def test_save_replaces_an_existing_file_and_leaves_no_temporary(tmp_path, rng):
    path = tmp_path / "bn.safetensors"
    path.write_bytes(b"old contents")
    trained({}, rng).save(path)
    assert batchnorm.BatchNorm2d.from_file(path).num_batches_tracked == 3
    assert os.listdir(tmp_path) == ["bn.safetensors"]


def test_failed_save_leaves_the_existing_file(tmp_path):
    path = tmp_path / "tensors.safetensors"
    batchnorm.save_file({"a": np.arange(3)}, path)
    before = path.read_bytes()
    with pytest.raises(TypeError):
        batchnorm.save_file({"a": np.array(["text"])}, path)
    assert path.read_bytes() == before


def test_from_file_overrides(tmp_path, rng):
    path = tmp_path / "bn.safetensors"
    trained({}, rng).save(path)
    m = batchnorm.BatchNorm2d.from_file(path, eps=1e-3, momentum=None, dtype="float64")
    assert (m.eps, m.momentum, m.dtype) == (1e-3, None, np.float64)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        batchnorm.BatchNorm2d.from_file(path, affine=False)
    with pytest.raises(TypeError, match="colour"):
        batchnorm.BatchNorm2d.from_file(path, colour="blue")


def test_pytorch_written_file_loads_with_defaults(fixtures):
    m = batchnorm.BatchNorm2d.from_file(fixtures / "pytorch_bn8.safetensors")
    assert (m.num_features, m.eps, m.momentum, m.num_batches_tracked) == (8, 1e-5, 0.1, 4)
    assert m.training
    data = np.load(fixtures / "pytorch_bn8_eval.npz")
    np.testing.assert_allclose(m.eval()(data["x"]), data["y"], rtol=1e-5, atol=1e-5)


def test_from_state_dict_takes_a_layer_out_of_a_network_checkpoint(fixtures):
    checkpoint = batchnorm.load_file(fixtures / "pytorch_small_net.safetensors")
    first = batchnorm.BatchNorm2d.from_state_dict(checkpoint, prefix="1.")
    second = batchnorm.BatchNorm2d.from_state_dict(checkpoint, prefix="4.", momentum=None)
    assert (first.num_features, second.num_features, second.momentum) == (4, 6, None)
    np.testing.assert_array_equal(first.running_var, checkpoint["1.running_var"])
    assert second.num_batches_tracked == 3


def test_from_state_dict_infers_configuration(rng):
    weight_only = {"weight": np.ones(5, np.float32), "running_mean": np.zeros(5), "running_var": np.ones(5)}
    m = batchnorm.BatchNorm2d.from_state_dict(weight_only)
    assert (m.affine, m.bias, m.track_running_stats, m.dtype) == (True, None, True, np.float64)
    assert m.num_batches_tracked == 0  # PyTorch: a state without the counter keeps it
    with pytest.raises(ValueError, match="num_features"):
        batchnorm.BatchNorm2d.from_state_dict({"something": np.zeros(3)})


def test_load_state_dict_accepts_npz_and_safetensors_mappings(tmp_path, rng):
    m = trained({}, rng)
    np.savez(tmp_path / "state.npz", **m.state_dict())
    batchnorm.save_file(m.state_dict(), tmp_path / "state.safetensors")
    for source in (np.load(tmp_path / "state.npz"), batchnorm.load_file(tmp_path / "state.safetensors")):
        fresh = batchnorm.BatchNorm2d(4)
        assert fresh.load_state_dict(source) == ([], [])
        assert_equal_modules(m, fresh)


def test_missing_num_batches_tracked_is_not_missing(rng):
    m = trained({}, rng)
    state = m.state_dict()
    del state["num_batches_tracked"]
    fresh = batchnorm.BatchNorm2d(4)
    assert fresh.load_state_dict(state, strict=True) == ([], [])
    assert fresh.num_batches_tracked == 0
    assert m.load_state_dict(state) == ([], []) and m.num_batches_tracked == 3


@pytest.mark.parametrize("options", CONFIGS, ids=str)
def test_pickle_and_deepcopy_give_equal_independent_modules(rng, options):
    m = trained(options, rng).eval()
    for clone in (pickle.loads(pickle.dumps(m)), copy.deepcopy(m), copy.copy(m)):
        assert_equal_modules(m, clone)
        if clone.running_mean is not None:
            clone.running_mean[:] += 1
            assert not np.array_equal(clone.running_mean, m.running_mean)


def test_pickle_keeps_subclass():
    class Mine(batchnorm.BatchNorm2d):
        pass

    clone = copy.deepcopy(Mine(3))
    assert type(clone) is Mine


@pytest.mark.parametrize(
    "dtype", ["float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "bool"]
)
def test_save_file_and_load_file_round_trip(tmp_path, dtype):
    values = (np.arange(24).reshape(2, 3, 4) % 7).astype(dtype)
    tensors = {"plain": values, "transposed": values.T, "big_endian": values.astype(values.dtype.newbyteorder(">"))}
    batchnorm.save_file(tensors, tmp_path / "t.safetensors", metadata={"who": "test"})
    loaded = batchnorm.load_file(tmp_path / "t.safetensors")
    for name, value in tensors.items():
        np.testing.assert_array_equal(loaded[name], value)
        assert loaded[name].dtype == values.dtype and loaded[name].flags.writeable


# ---- corrupt and hostile files: a clear ValueError or OSError, never a crash, hang or huge allocation


def valid_file(tmp_path, rng):
    path = tmp_path / "valid.safetensors"
    trained({}, rng).save(path)
    return path.read_bytes()


def header_file(header, data=b""):
    body = json.dumps(header).encode()
    return struct.pack("<Q", len(body)) + body + data


CORRUPT = {
    "empty": lambda valid: b"",
    "truncated header length": lambda valid: valid[:5],
    "truncated data": lambda valid: valid[:-3],
    "random bytes": lambda valid: bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)),
    "header length far beyond the file": lambda valid: struct.pack("<Q", 2**62) + valid[8:],
    "header not JSON": lambda valid: struct.pack("<Q", 9) + b"not json!",
    "offsets outside the data": lambda valid: header_file(
        {"weight": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4096]}}, b"\0" * 8
    ),
    "unknown dtype": lambda valid: header_file(
        {"weight": {"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8
    ),
    "shape not matching the data": lambda valid: header_file(
        {"weight": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8
    ),
    "huge shape": lambda valid: header_file(
        {"weight": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 8]}}, b"\0" * 8
    ),
}


@pytest.mark.parametrize("kind", list(CORRUPT))
def test_corrupt_file_is_a_value_error(tmp_path, rng, kind):
    path = tmp_path / "corrupt.safetensors"
    path.write_bytes(CORRUPT[kind](valid_file(tmp_path, rng)))
    for load in (batchnorm.BatchNorm2d.from_file, batchnorm.load_file):
        with pytest.raises(ValueError, match="safetensors|dtype|shape"):
            load(path)


def test_wrong_dtype_for_a_state_is_a_value_error(tmp_path):
    path = tmp_path / "complex.safetensors"
    path.write_bytes(header_file({"weight": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8))
    with pytest.raises(ValueError, match="C64"):
        batchnorm.BatchNorm2d.from_file(path)


def test_load_into_module_checks_before_writing(tmp_path, rng):
    m = trained({}, rng)
    before = state_snapshot(m)
    other = trained({}, rng)
    other.save(tmp_path / "ok.safetensors")
    wrong = batchnorm.load_file(tmp_path / "ok.safetensors")
    wrong["running_var"] = np.ones(5, np.float32)
    with pytest.raises(RuntimeError, match="running_var"):
        m.load_state_dict(wrong)
    assert_same_state(before, state_snapshot(m))


def test_missing_file_folder_and_directory_raise_os_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        batchnorm.BatchNorm2d.from_file(tmp_path / "absent.safetensors")
    with pytest.raises(FileNotFoundError):
        batchnorm.BatchNorm2d(3).save(tmp_path / "no" / "such" / "folder" / "bn.safetensors")
    with pytest.raises(IsADirectoryError):
        batchnorm.load_file(tmp_path)


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_endless_device_is_refused_not_read():
    with pytest.raises(ValueError, match="regular file"):
        batchnorm.load_file("/dev/zero")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=512))
def test_fuzz_random_bytes(tmp_path, data):
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(data)
    for load in (batchnorm.BatchNorm2d.from_file, batchnorm.load_file):
        try:
            load(path)
        except (ValueError, OSError, RuntimeError):
            pass


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=8),
    cut=st.integers(0, 10**6),
)
def test_fuzz_mutated_valid_files(tmp_path, flips, cut):
    path = tmp_path / "fuzz.safetensors"
    rng = np.random.default_rng(1)
    data = bytearray(valid_file(tmp_path, rng))
    for position, value in flips:
        data[position % len(data)] = value
    path.write_bytes(bytes(data[: max(cut % (len(data) + 1), 0)] if cut % 3 == 0 else data))
    for load in (batchnorm.BatchNorm2d.from_file, batchnorm.load_file):
        try:
            load(path)
        except (ValueError, OSError, RuntimeError):
            pass
