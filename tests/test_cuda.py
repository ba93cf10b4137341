"""The CUDA backend: the same semantics on a GPU, arrays in and out through DLPack and the CUDA array
interface. GPU arrays come from PyTorch (or CuPy); the reference is the float64 NumPy one in
reference.py and the module's own CPU path. Without a GPU only the no-driver behaviour is checked."""

import os

import numpy as np
import pytest

import batchnorm

from helpers import HALF, assert_float32_state, assert_within_one_rounding, pair, tol
from reference import ReferenceBatchNorm2d

# Only these mean "no GPU here" (or none we can compile for: a GPU machine without NVRTC installed):
# any other error (an NVRTC compile failure, a module that does not load) must fail the GPU tests,
# not skip them.
NO_GPU = ("no CUDA driver was found", "sees no GPU", "NVRTC (the CUDA run-time compiler, libnvrtc.so) was not found")


def _gpu_reason():
    try:
        batchnorm.BatchNorm2d(1, device="cuda")
    except RuntimeError as error:
        if not any(message in str(error) for message in NO_GPU):
            return None
        if os.environ.get("BATCHNORM_REQUIRE_GPU") == "1":
            raise RuntimeError(f"BATCHNORM_REQUIRE_GPU=1, but there is no GPU: {error}") from error
        return f"no GPU: {error}"
    return None


GPU_REASON = _gpu_reason()
needs_gpu = pytest.mark.skipif(GPU_REASON is not None, reason=str(GPU_REASON))

try:
    import torch

    HAVE_TORCH_CUDA = torch.cuda.is_available()
except ImportError:
    torch = None
    HAVE_TORCH_CUDA = False

needs_torch = pytest.mark.skipif(not HAVE_TORCH_CUDA, reason="PyTorch with CUDA makes the GPU arrays here")


def on_gpu(x):
    return torch.from_dlpack(np.ascontiguousarray(x)).cuda()


def host(array):
    if torch is not None and isinstance(array, torch.Tensor):
        return array.cpu().numpy()
    return np.asarray(array)


# ---- without a GPU ---------------------------------------------------------------------------


@pytest.mark.skipif(
    GPU_REASON is None or "no CUDA driver was found" not in GPU_REASON, reason="this machine has a CUDA driver"
)
def test_without_a_driver_cuda_is_a_runtime_error_that_says_so():
    with pytest.raises(RuntimeError, match="no CUDA driver was found"):
        batchnorm.BatchNorm2d(3, device="cuda")
    m = batchnorm.BatchNorm2d(3)
    with pytest.raises(RuntimeError, match="no CUDA driver was found"):
        m.to("cuda:0")
    assert m.device == "cpu"
    y = m(np.ones((2, 3, 2, 2), np.float32))
    assert m.num_batches_tracked == 1 and y.shape == (2, 3, 2, 2)


@pytest.mark.parametrize("device", ["gpu", "cuda:", "cuda:x", "cuda:-1"])
def test_malformed_device_strings_are_value_errors(device):
    with pytest.raises(ValueError, match="unknown device"):
        batchnorm.BatchNorm2d(3, device=device)


def test_device_must_be_a_string():
    with pytest.raises(TypeError, match="device must be"):
        batchnorm.BatchNorm2d(3, device=0)


def test_a_cpu_module_names_a_stray_stream():
    with pytest.raises(ValueError, match="stream"):
        batchnorm.BatchNorm2d(3)(np.ones((2, 3, 2, 2), np.float32), stream=1)


# ---- on a GPU ----------------------------------------------------------------------------------


def randomize_parameters(m, ref, rng, dtype):
    """Weight and bias away from 1 and 0, so a kernel ignoring them fails."""
    c = m.num_features
    if ref.weight is not None:
        ref.weight = rng.uniform(0.5, 2.0, c).astype(dtype).astype(np.float64)
        m.weight = ref.weight.astype(dtype)
    if ref.bias is not None:
        ref.bias = rng.standard_normal(c).astype(dtype).astype(np.float64)
        m.bias = ref.bias.astype(dtype)


SHAPES = [(4, 3, 8, 8), (2, 5, 7, 7), (3, 2, 5, 6), (1, 4, 1, 9), (4, 3, 5)]
CONFIGS = [
    dict(),
    dict(momentum=None),
    dict(affine=False),
    dict(bias=False),
    dict(track_running_stats=False),
    dict(eps=1e-3, momentum=0.3),
]


@needs_gpu
@needs_torch
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("config", CONFIGS)
def test_training_steps_match_the_reference(rng, dtype, shape, config):
    m, ref = pair(shape[-3], dtype, **config)
    randomize_parameters(m, ref, rng, dtype)
    m.to("cuda")
    assert m.device == "cuda:0"
    for step in range(3):
        x = (rng.standard_normal(shape) * (step + 1) + step).astype(dtype)
        m.train(step < 2)
        ref.training = step < 2
        y = m(on_gpu(x))
        np.testing.assert_allclose(host(y), ref.forward(x), **tol(dtype))
        dy = rng.standard_normal(shape).astype(dtype)
        np.testing.assert_allclose(host(m.backward(on_gpu(dy))), ref.backward(dy), **tol(dtype))
    state = m.state_dict()
    assert all(isinstance(v, np.ndarray) for v in state.values())
    if ref.running_mean is not None:
        np.testing.assert_allclose(state["running_mean"], ref.running_mean, **tol(dtype))
        np.testing.assert_allclose(state["running_var"], ref.running_var, **tol(dtype))
        assert m.num_batches_tracked == ref.num_batches_tracked
    if ref.grad_weight is not None:
        np.testing.assert_allclose(host(m.grad_weight), ref.grad_weight, rtol=1e-4, atol=1e-4)
    if ref.grad_bias is not None:
        np.testing.assert_allclose(host(m.grad_bias), ref.grad_bias, rtol=1e-4, atol=1e-4)


@needs_gpu
@needs_torch
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_large_inputs_use_many_blocks_per_channel_and_agree_with_the_cpu(rng, dtype):
    shape = (16, 3, 64, 64)
    cpu = batchnorm.BatchNorm2d(3, dtype=dtype)
    cpu.weight, cpu.bias = rng.uniform(0.5, 2.0, 3).astype(dtype), rng.standard_normal(3).astype(dtype)
    gpu = batchnorm.BatchNorm2d.from_state_dict(cpu.state_dict()).to("cuda")
    x = (rng.standard_normal(shape) * 3 + 5).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    np.testing.assert_allclose(host(gpu(on_gpu(x))), cpu(x), **tol(dtype))
    np.testing.assert_allclose(host(gpu.backward(on_gpu(dy))), cpu.backward(dy), **tol(dtype))
    for key, value in cpu.state_dict().items():
        np.testing.assert_allclose(gpu.state_dict()[key], value, **tol(dtype), err_msg=key)


@needs_gpu
@needs_torch
@pytest.mark.parametrize("offset", [1e3, 1e4])
def test_float32_statistics_keep_their_digits_on_offset_data(rng, offset):
    x = (rng.standard_normal((8, 4, 32, 32)) + offset).astype(np.float32)
    m, ref = pair(4, np.float32)
    y = host(m.to("cuda")(on_gpu(x)))
    expected = ref.forward(x)
    assert np.linalg.norm(y - expected) / np.linalg.norm(expected) <= 1e-6
    np.testing.assert_allclose(m.state_dict()["running_mean"], ref.running_mean, rtol=1e-6)


@needs_gpu
@needs_torch
def test_outputs_are_shared_through_dlpack_and_the_cuda_array_interface(rng):
    m = batchnorm.BatchNorm2d(3, device="cuda")
    y = m(on_gpu(rng.standard_normal((2, 3, 4, 4)).astype(np.float32)))
    assert isinstance(y, batchnorm.DeviceArray) and y.shape == (2, 3, 4, 4) and y.device == "cuda:0"
    pointer = y.__cuda_array_interface__["data"][0]
    shared = torch.from_dlpack(y)
    assert shared.data_ptr() == pointer and shared.is_cuda
    np.testing.assert_array_equal(shared.cpu().numpy(), y.numpy())
    np.testing.assert_array_equal(np.asarray(y), y.numpy())
    try:
        import cupy
    except ImportError:
        return
    assert cupy.from_dlpack(y).data.ptr == pointer
    assert cupy.asarray(y).data.ptr == pointer


@needs_gpu
@needs_torch
def test_out_is_written_in_place_and_parameters_are_device_views(rng):
    m = batchnorm.BatchNorm2d(3, device="cuda")
    x = on_gpu(rng.standard_normal((2, 3, 4, 4)).astype(np.float32))
    out = torch.empty_like(x)
    assert m(x, out=out) is out
    weight = torch.from_dlpack(m.weight)
    weight.mul_(2.0)  # an optimizer step on the device, through the view
    np.testing.assert_array_equal(m.state_dict()["weight"], np.full(3, 2.0, np.float32))
    m.weight = np.array([1.0, 2.0, 3.0], np.float32)
    m.bias = torch.tensor([0.5, 0.5, 0.5], device="cuda")
    np.testing.assert_array_equal(host(torch.from_dlpack(m.weight)), [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(m.state_dict()["bias"], [0.5, 0.5, 0.5])


@needs_gpu
@needs_torch
def test_bad_gpu_arrays_are_clear_errors_that_change_nothing(rng):
    m = batchnorm.BatchNorm2d(3, device="cuda")
    x = on_gpu(rng.standard_normal((2, 3, 4, 4)).astype(np.float32))
    m(x)
    before = (m.num_batches_tracked, m.state_dict())
    with pytest.raises(TypeError, match="float32"):
        m(x.double())
    with pytest.raises(ValueError, match="C-contiguous"):
        m(x.transpose(2, 3))
    with pytest.raises(ValueError, match="channels"):
        m(on_gpu(np.ones((2, 4, 4, 4), np.float32)))
    with pytest.raises(ValueError, match="out"):
        m(x, out=torch.empty((2, 3, 4, 5), device="cuda"))
    with pytest.raises(ValueError, match="share memory"):
        m(x, out=x)
    with pytest.raises(TypeError, match="float32"):
        m(x, out=torch.empty_like(x, dtype=torch.float64))
    cpu = batchnorm.BatchNorm2d(3)
    with pytest.raises(ValueError, match="GPU array"):
        cpu(x)
    after = (m.num_batches_tracked, m.state_dict())
    assert before[0] == after[0]
    for key in before[1]:
        np.testing.assert_array_equal(before[1][key], after[1][key])


@needs_gpu
def test_numpy_inputs_are_copied_to_the_device_and_back(rng):
    m, ref = pair(3, np.float64)
    m.to("cuda")
    x = rng.standard_normal((2, 3, 5, 5))
    y = m(x)
    assert isinstance(y, np.ndarray)
    np.testing.assert_allclose(y, ref.forward(x), **tol(np.float64))
    dy = rng.standard_normal(x.shape)
    out = np.empty_like(x)
    assert m.backward(dy, out=out) is out
    np.testing.assert_allclose(out, ref.backward(dy), **tol(np.float64))


@needs_gpu
def test_moving_between_devices_keeps_the_state(rng):
    m = batchnorm.BatchNorm2d(3)
    x = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    m(x)
    cpu_view = m.running_mean  # a NumPy view must survive the moves
    state = m.state_dict()
    assert m.to("cuda") is m and m.device == "cuda:0"
    m(x)
    m.to("cpu")
    assert m.device == "cpu" and m.num_batches_tracked == 2
    assert cpu_view.shape == (3,)
    ref = ReferenceBatchNorm2d(3)
    ref.forward(x), ref.forward(x)
    np.testing.assert_allclose(m.running_mean, ref.running_mean, **tol(np.float32))
    m.to("cuda").load_state_dict(state)
    np.testing.assert_array_equal(m.state_dict()["running_mean"], state["running_mean"])


@needs_gpu
@needs_torch
def test_work_follows_the_callers_stream(rng):
    stream = torch.cuda.Stream()
    m, ref = pair(3, np.float32)
    m.to("cuda")
    x = rng.standard_normal((64, 3, 32, 32)).astype(np.float32)
    with torch.cuda.stream(stream):
        x_gpu = on_gpu(x)
        y = m(x_gpu, stream=stream)
        result = torch.from_dlpack(y).clone()
    stream.synchronize()
    np.testing.assert_allclose(result.cpu().numpy(), ref.forward(x), **tol(np.float32))


@needs_gpu
@needs_torch
@pytest.mark.parametrize("momentum", [0.1, None])
def test_matches_torch_on_cuda(rng, momentum):
    theirs = torch.nn.BatchNorm2d(4, momentum=momentum).cuda()
    ours = batchnorm.BatchNorm2d(4, momentum=momentum, device="cuda")
    for _ in range(3):
        x = torch.randn(8, 4, 6, 6, device="cuda") * 2 + 1
        np.testing.assert_allclose(host(ours(x)), theirs(x).detach().cpu().numpy(), rtol=1e-4, atol=1e-4)
    for key, value in theirs.state_dict().items():
        np.testing.assert_allclose(ours.state_dict()[key], value.cpu().numpy(), rtol=1e-5, atol=1e-6, err_msg=key)


@needs_gpu
@needs_torch
def test_a_device_view_outlives_the_move_that_drops_its_layer(rng):
    m = batchnorm.BatchNorm2d(3, device="cuda")
    view = m.running_var
    m.to("cpu")
    m.to("cuda")
    # The first layer is gone; its buffer lives as long as the view, and writes stay inside it.
    torch.from_dlpack(view).fill_(7.0)
    np.testing.assert_array_equal(host(torch.from_dlpack(view)), np.full(3, 7.0, np.float32))
    np.testing.assert_array_equal(m.state_dict()["running_var"], np.ones(3, np.float32))


@needs_gpu
@needs_torch
def test_eps_is_checked_on_the_gpu_as_on_the_cpu(rng):
    x = on_gpu(rng.standard_normal((2, 3, 4, 4)).astype(np.float32))
    m = batchnorm.BatchNorm2d(3, eps=0.0, device="cuda")
    with pytest.raises(ValueError, match="eps"):
        m(x)
    assert m.num_batches_tracked == 0
    m.eval()
    m(x)  # eps = 0 is allowed with running statistics, as in PyTorch


@needs_gpu
def test_dlpack_refuses_a_negative_stream_other_than_minus_one():
    y = batchnorm.BatchNorm2d(3, device="cuda").running_mean
    with pytest.raises(ValueError, match="stream=-2"):
        y.__dlpack__(stream=-2)
    y.__dlpack__(stream=-1)


@needs_gpu
@needs_torch
def test_arrays_of_a_call_on_a_side_stream_may_be_dropped_before_its_kernels_finish(rng):
    """Outputs freed early are not reallocated under their kernels; inputs released by their producer
    right after the call stay alive until the kernels are done; views follow the module's stream."""
    stream = torch.cuda.Stream()
    shape = (32, 16, 64, 64)
    x = rng.standard_normal(shape).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    m, ref = pair(16, np.float32)
    m.to("cuda")
    expected_y, expected_dx = ref.forward(x), ref.backward(dy)
    with torch.cuda.stream(stream):
        for _ in range(3):
            m(on_gpu(x), stream=stream)  # the output is dropped at once
        y = m(on_gpu(x), stream=stream)
        dx = m.backward(on_gpu(dy), stream=stream)  # grad_output's tensor is released by torch at once
        kept = torch.from_dlpack(y).clone(), torch.from_dlpack(dx).clone()
    assert m.running_mean.__cuda_array_interface__["stream"] == stream.cuda_stream
    stream.synchronize()
    np.testing.assert_allclose(kept[0].cpu().numpy(), expected_y, **tol(np.float32))
    np.testing.assert_allclose(kept[1].cpu().numpy(), expected_dx, rtol=1e-4, atol=1e-4)


@needs_gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cupy_arrays_in_and_out_without_torch(rng, dtype):
    cupy = pytest.importorskip("cupy")
    m, ref = pair(3, dtype, momentum=None)
    randomize_parameters(m, ref, rng, dtype)
    m.to("cuda")
    x = (rng.standard_normal((4, 3, 6, 5)) * 2 + 3).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    y = m(cupy.asarray(x))
    np.testing.assert_allclose(cupy.asnumpy(cupy.from_dlpack(y)), ref.forward(x), **tol(dtype))
    out = cupy.empty(x.shape, dtype)
    assert m.backward(cupy.asarray(dy), out=out) is out
    np.testing.assert_allclose(cupy.asnumpy(out), ref.backward(dy), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(m.state_dict()["running_var"], ref.running_var, **tol(dtype))


@needs_gpu
def test_jax_arrays_are_read_in_place_without_torch(rng):
    jax = pytest.importorskip("jax")
    gpus = [d for d in jax.devices() if d.platform == "gpu"]
    if not gpus:
        pytest.skip("JAX sees no GPU")
    m, ref = pair(3, np.float32)
    randomize_parameters(m, ref, rng, np.float32)
    m.to("cuda")
    x = rng.standard_normal((4, 3, 6, 5)).astype(np.float32)
    y = m(jax.device_put(x, gpus[0]))
    np.testing.assert_allclose(np.asarray(jax.dlpack.from_dlpack(y)), ref.forward(x), **tol(np.float32))


@needs_gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "cls,shape",
    [
        (batchnorm.BatchNorm1d, (6, 4)),
        (batchnorm.BatchNorm1d, (5, 4, 7)),
        (batchnorm.BatchNorm3d, (2, 4, 3, 5, 6)),
        (batchnorm.BatchNorm3d, (3, 4, 1, 2, 1)),
    ],
    ids=lambda v: getattr(v, "__name__", str(v)),
)
def test_batchnorm1d_and_3d_on_the_gpu_match_the_reference(rng, cls, shape, dtype):
    c = shape[1]
    m, ref = cls(c, dtype=dtype, device="cuda"), ReferenceBatchNorm2d(c)
    ref.weight = rng.uniform(0.5, 2, c).astype(dtype).astype(np.float64)
    ref.bias = rng.standard_normal(c).astype(dtype).astype(np.float64)
    m.weight, m.bias = ref.weight.astype(dtype), ref.bias.astype(dtype)
    planes = (shape[0], c, 1, -1)
    for step in range(3):
        m.train(step < 2)
        ref.training = step < 2
        x = (rng.standard_normal(shape) * (step + 1) + step).astype(dtype)
        y = m(x)
        assert y.shape == shape
        np.testing.assert_allclose(y.reshape(planes), ref.forward(x.reshape(planes)), **tol(dtype))
        dy = rng.standard_normal(shape).astype(dtype)
        dx = m.backward(dy)
        np.testing.assert_allclose(dx.reshape(planes), ref.backward(dy.reshape(planes)), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(m.state_dict()["running_var"], ref.running_var, **tol(dtype))
    assert m.num_batches_tracked == 2


@needs_gpu
@needs_torch
def test_two_modules_on_two_streams_run_concurrently_and_stay_apart(rng):
    shape = (16, 8, 32, 32)
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    pairs = [pair(8, np.float32) for _ in streams]
    for m, _ in pairs:
        m.to("cuda")
    inputs = [[(rng.standard_normal(shape) * (k + 1) + k).astype(np.float32) for k in range(3)] for _ in streams]
    results = [[], []]
    for step in range(3):
        for which, stream in enumerate(streams):
            with torch.cuda.stream(stream):
                y = pairs[which][0](on_gpu(inputs[which][step]), stream=stream)
                results[which].append(torch.from_dlpack(y).clone())
    torch.cuda.synchronize()
    for which, (m, ref) in enumerate(pairs):
        for step in range(3):
            expected = ref.forward(inputs[which][step])
            np.testing.assert_allclose(results[which][step].cpu().numpy(), expected, **tol(np.float32))
        np.testing.assert_allclose(m.state_dict()["running_var"], ref.running_var, **tol(np.float32))


@needs_gpu
def test_a_gpu_module_saves_a_state_file_that_loads_on_the_cpu(rng, tmp_path):
    m, ref = pair(3, np.float32)
    randomize_parameters(m, ref, rng, np.float32)
    m.to("cuda")
    x = rng.standard_normal((4, 3, 5, 5)).astype(np.float32)
    m(x)
    ref.forward(x)
    m.save(tmp_path / "bn.safetensors")
    loaded = batchnorm.BatchNorm2d.from_file(tmp_path / "bn.safetensors")
    assert loaded.device == "cpu"
    np.testing.assert_allclose(loaded.running_mean, ref.running_mean, **tol(np.float32))
    np.testing.assert_allclose(loaded.running_var, ref.running_var, **tol(np.float32))
    np.testing.assert_array_equal(loaded.weight, ref.weight.astype(np.float32))
    assert loaded.num_batches_tracked == 1


def gpu_module_and_input(rng):
    """A float32 module on the GPU, its reference, and an input large enough that kernels run a while."""
    m, ref = pair(8, np.float32)
    m.to("cuda")
    return m, ref, rng.standard_normal((32, 8, 64, 64)).astype(np.float32)


@needs_gpu
@needs_torch
def test_without_stream_work_goes_to_torchs_current_stream(rng):
    m, ref, x = gpu_module_and_input(rng)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        x_gpu = on_gpu(x)
        y = torch.empty_like(x_gpu)
        m(x_gpu, out=y)
        assert m.running_mean.__cuda_array_interface__["stream"] == stream.cuda_stream
        doubled = y * 2  # torch's next op on the same stream, with no synchronization in between
    stream.synchronize()
    np.testing.assert_allclose(doubled.cpu().numpy(), 2 * ref.forward(x), **tol(np.float32))


@needs_gpu
@needs_torch
def test_an_out_array_is_ready_for_torchs_stream_after_work_on_another(rng):
    m, ref, x = gpu_module_and_input(rng)
    ours = torch.cuda.Stream()
    x_gpu = on_gpu(x)
    torch.cuda.synchronize()
    y = torch.empty_like(x_gpu)
    m(x_gpu, out=y, stream=ours)  # torch's current stream (the default) must wait for it
    doubled = y * 2
    torch.cuda.synchronize()
    np.testing.assert_allclose(doubled.cpu().numpy(), 2 * ref.forward(x), **tol(np.float32))


@needs_gpu
@needs_torch
def test_tensors_that_require_grad_are_read_in_place(rng):
    m = batchnorm.BatchNorm2d(3, device="cuda")
    x = on_gpu(rng.standard_normal((2, 3, 4, 4)).astype(np.float32)).requires_grad_()
    y = m(x)
    expected = torch.nn.functional.batch_norm(x.detach(), None, None, training=True)
    np.testing.assert_allclose(host(torch.from_dlpack(y)), host(expected), rtol=1e-5, atol=1e-5)


# ---- float16 and bfloat16 tensors on float32 modules ---------------------------------------------
# Their kernels have passed the CPU emulator (tests/cuda_emulator.rs) but not yet run on a GPU, so a
# GPU refuses them unless BATCHNORM_UNVERIFIED_HALF_KERNELS=1, which these tests set: they are what
# verifies them on the next GPU.


@pytest.fixture
def half_kernels(monkeypatch):
    monkeypatch.setenv("BATCHNORM_UNVERIFIED_HALF_KERNELS", "1")


@needs_gpu
@needs_torch
def test_half_tensors_are_refused_until_their_kernels_have_run_on_a_gpu(rng, monkeypatch):
    monkeypatch.delenv("BATCHNORM_UNVERIFIED_HALF_KERNELS", raising=False)
    m = batchnorm.BatchNorm2d(3, device="cuda")
    x, _ = half_on_gpu(rng.standard_normal((4, 3, 2, 2)), np.float16)
    with pytest.raises(RuntimeError, match="not yet run on a GPU.*BATCHNORM_UNVERIFIED_HALF_KERNELS=1"):
        m(x)
    assert m.num_batches_tracked == 0


def torch_half(dtype):
    return torch.float16 if np.dtype(dtype) == np.float16 else torch.bfloat16


def half_on_gpu(x, dtype):
    """`x` (float64) rounded to the half `dtype`, as a CUDA tensor, and its values as float64."""
    tensor = torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(torch_half(dtype)).cuda()
    return tensor, tensor.double().cpu().numpy()


def half_host(tensor, dtype):
    """A half CUDA tensor or DeviceArray as a NumPy array of the half dtype (exactly)."""
    tensor = torch.from_dlpack(tensor) if not isinstance(tensor, torch.Tensor) else tensor
    assert tensor.dtype == torch_half(dtype)
    return tensor.float().cpu().numpy().astype(dtype)


# 8-value packs (8x8), 4-value packs (14x14: 196 is not a multiple of 8), single values (7x7), and
# a channel split over several blocks.
HALF_SHAPES = [(4, 3, 8, 8), (3, 4, 14, 14), (5, 2, 7, 7), (64, 2, 32, 32), (6, 3)]


@needs_gpu
@needs_torch
@pytest.mark.parametrize("dtype", HALF, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", HALF_SHAPES, ids=str)
@pytest.mark.parametrize("config", [dict(), dict(momentum=None), dict(affine=False)], ids=str)
def test_half_tensors_match_the_reference_within_one_rounding(rng, half_kernels, dtype, shape, config):
    cls = batchnorm.BatchNorm1d if len(shape) == 2 else batchnorm.BatchNorm2d
    c = shape[1]
    m, ref = cls(c, **config), ReferenceBatchNorm2d(c, **config)
    randomize_parameters(m, ref, rng, np.float32)
    m.to("cuda")
    planes = (shape[0], c, 1, -1)
    for step in range(3):
        m.train(step < 2)
        ref.training = step < 2
        x, x64 = half_on_gpu(rng.standard_normal(shape) * (step + 2) + 3 * step, dtype)
        y = m(x)
        assert y.dtype == np.dtype(dtype) and y.shape == shape
        assert_within_one_rounding(half_host(y, dtype).reshape(planes), ref.forward(x64.reshape(planes)), dtype)
        dy, dy64 = half_on_gpu(rng.standard_normal(shape), dtype)
        dx = m.backward(dy)
        assert_within_one_rounding(half_host(dx, dtype).reshape(planes), ref.backward(dy64.reshape(planes)), dtype)
    assert_float32_state(m, ref)


@needs_gpu
@needs_torch
@pytest.mark.parametrize("dtype", HALF, ids=lambda d: np.dtype(d).name)
def test_half_tensors_on_the_gpu_match_torch(rng, half_kernels, dtype):
    shape = (16, 4, 10, 10)
    theirs = torch.nn.BatchNorm2d(4).cuda()
    ours = batchnorm.BatchNorm2d(4, device="cuda")
    for _ in range(3):
        x, _ = half_on_gpu(rng.standard_normal(shape) * 2 + 1, dtype)
        x.requires_grad_()
        ty = theirs(x)
        assert ty.dtype == x.dtype
        np.testing.assert_allclose(
            host(torch.from_dlpack(ours(x)).float()), ty.detach().float().cpu().numpy(), rtol=1e-2, atol=1e-2
        )
        dy, _ = half_on_gpu(rng.standard_normal(shape), dtype)
        ty.backward(dy)
        np.testing.assert_allclose(
            host(torch.from_dlpack(ours.backward(dy)).float()), x.grad.float().cpu().numpy(), rtol=1e-2, atol=1e-2
        )
        x.grad = None
    for key, value in theirs.state_dict().items():
        np.testing.assert_allclose(ours.state_dict()[key], value.cpu().numpy(), rtol=1e-5, atol=1e-5, err_msg=key)


@needs_gpu
@needs_torch
def test_half_outputs_and_gradients_keep_the_inputs_dtype_and_bad_ones_change_nothing(rng, half_kernels):
    m = batchnorm.BatchNorm2d(3, device="cuda")
    x, _ = half_on_gpu(rng.standard_normal((4, 3, 4, 4)), np.float16)
    before = m.state_dict()
    for out in [
        torch.empty((4, 3, 4, 4), device="cuda"),
        torch.empty((4, 3, 4, 4), device="cuda", dtype=torch.bfloat16),
    ]:
        with pytest.raises(TypeError, match="float16"):
            m(x, out=out)
    for key, value in m.state_dict().items():
        np.testing.assert_array_equal(value, before[key], err_msg=key)
    out = torch.empty((4, 3, 4, 4), device="cuda", dtype=torch.float16)
    assert m(x, out=out) is out
    with pytest.raises(TypeError, match="grad_output of dtype float16"):
        m.backward(torch.zeros((4, 3, 4, 4), device="cuda"))
    y = m(x)
    assert y.dtype == np.float16 and y.__cuda_array_interface__["typestr"] == "<f2"
    np.testing.assert_array_equal(y.numpy(), out.cpu().numpy())
    bf, _ = half_on_gpu(rng.standard_normal((4, 3, 4, 4)), HALF[-1])
    if bf.dtype == torch.bfloat16:
        z = m(bf)
        assert torch.from_dlpack(z).dtype == torch.bfloat16
        with pytest.raises(TypeError, match="DLPack"):
            _ = z.__cuda_array_interface__
    with pytest.raises(TypeError, match="float64.*float16"):
        batchnorm.BatchNorm2d(3, dtype=np.float64, device="cuda")(x)


@needs_gpu
def test_cupy_float16_arrays_in_and_out(rng, half_kernels):
    cp = pytest.importorskip("cupy")
    x = rng.standard_normal((8, 3, 6, 6)).astype(np.float16)
    m, ref = batchnorm.BatchNorm2d(3, device="cuda"), ReferenceBatchNorm2d(3)
    y = cp.asarray(m(cp.asarray(x)))
    assert y.dtype == cp.float16
    assert_within_one_rounding(cp.asnumpy(y), ref.forward(x.astype(np.float64)), np.float16)
