//! The CUDA backend from Rust. Without a GPU: the kernels compile with NVRTC (when NVRTC can be
//! found, e.g. from pip's nvidia-cuda-nvrtc), and asking for a device says why there is none.
//! With one: forward and backward agree with the CPU layer.

use batchnorm::cuda::{self, CudaBatchNorm2d, DeviceBuffer, DeviceTensor, Stream};
use batchnorm::{BatchNorm2d, Buffer, Config, Shape, TensorRef};

/// Lets the library look where pip installs NVRTC, as the Python bindings do.
fn add_python_search_roots() {
    let listing =
        std::process::Command::new("python3").args(["-c", "import sys; print('\\n'.join(sys.path))"]).output();
    if let Ok(listing) = listing {
        cuda::library::add_search_roots(String::from_utf8_lossy(&listing.stdout).lines().map(Into::into));
    }
}

#[test]
fn kernels_compile_to_machine_code_for_ampere_and_hopper() {
    add_python_search_roots();
    if let Err(reason) = cuda::library::nvrtc() {
        eprintln!("skipped: {reason}");
        return;
    }
    for arch in ["sm_80", "sm_90"] {
        let cubin = cuda::compile(arch).expect("kernels.cu compiles");
        assert_eq!(&cubin[..4], b"\x7fELF", "{arch}: a cubin is an ELF image");
    }
}

#[test]
fn without_a_driver_asking_for_a_device_is_an_error_that_says_so() {
    if cuda::library::driver().is_ok() {
        eprintln!("skipped: this machine has a CUDA driver");
        return;
    }
    let error = cuda::device(0).expect_err("no device without a driver");
    assert!(error.to_string().contains("no CUDA driver was found"), "{error}");
}

fn values(count: usize, seed: u64) -> Vec<f32> {
    let mut state = seed;
    (0..count)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 4.0 + 3.0
        })
        .collect()
}

/// The GPU, or `None` (skip) when there is no driver or no GPU — unless `BATCHNORM_REQUIRE_GPU=1`.
/// Any other error (NVRTC, a module that does not load) fails the test.
fn gpu() -> Option<std::sync::Arc<cuda::Device>> {
    add_python_search_roots();
    match cuda::device(0) {
        Ok(device) => Some(device),
        Err(reason) => {
            let message = reason.to_string();
            let absent = message.contains("no CUDA driver was found") || message.contains("sees no GPU");
            let required = std::env::var("BATCHNORM_REQUIRE_GPU").is_ok_and(|v| v == "1");
            assert!(absent && !required, "no usable GPU: {message}");
            eprintln!("skipped: {message}");
            None
        }
    }
}

#[test]
fn gpu_forward_and_backward_agree_with_the_cpu() {
    let Some(device) = gpu() else { return };
    for shape in [Shape::new(8, 3, 16, 16), Shape::new(5, 4, 7, 7)] {
        let (x, dy) = (values(shape.numel(), 1), values(shape.numel(), 2));
        let mut cpu = BatchNorm2d::<f32>::new(Config::new(shape.c)).unwrap();
        // Weight and bias away from 1 and 0, so a kernel ignoring them fails.
        cpu.buffer_mut(Buffer::Weight).unwrap().copy_from_slice(&values(shape.c, 3));
        cpu.buffer_mut(Buffer::Bias).unwrap().copy_from_slice(&values(shape.c, 4));
        let mut gpu = CudaBatchNorm2d::new(cpu.clone(), &device).unwrap();
        let (mut y, mut dx) = (vec![0.0; shape.numel()], vec![0.0; shape.numel()]);
        let saved = cpu.forward(&TensorRef::contiguous(&x, shape).unwrap(), &mut y).unwrap();
        cpu.backward(
            &saved,
            &TensorRef::contiguous(&x, shape).unwrap(),
            &TensorRef::contiguous(&dy, shape).unwrap(),
            &mut dx,
        )
        .unwrap();

        let x_gpu = DeviceBuffer::from_host(&device, &x).unwrap();
        let dy_gpu = DeviceBuffer::from_host(&device, &dy).unwrap();
        let (y_gpu, dx_gpu) = (
            DeviceBuffer::<f32>::zeroed(&device, x.len()).unwrap(),
            DeviceBuffer::<f32>::zeroed(&device, x.len()).unwrap(),
        );
        // SAFETY: four live buffers of `shape.numel()` values on the layer's device.
        unsafe {
            let tensor = |buffer: &DeviceBuffer<f32>| DeviceTensor::from_raw(buffer.ptr(), shape);
            gpu.forward(tensor(&x_gpu), tensor(&y_gpu), Stream::DEFAULT).unwrap();
            gpu.backward(tensor(&x_gpu), tensor(&dy_gpu), tensor(&dx_gpu), Stream::DEFAULT).unwrap();
        }
        gpu.synchronize().unwrap();
        let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(a, b)| (a - b).abs() <= 1e-4 * (1.0 + b.abs()));
        assert!(close(&y_gpu.to_host().unwrap(), &y), "forward {shape:?}");
        assert!(close(&dx_gpu.to_host().unwrap(), &dx), "backward {shape:?}");
        let back = gpu.to_host().unwrap();
        assert!(close(back.running_var().unwrap(), cpu.running_var().unwrap()));
        assert!(close(back.grad_weight().unwrap(), cpu.grad_weight().unwrap()));
    }
}
