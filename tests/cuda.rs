//! The CUDA backend from Rust. Without a GPU: the kernels compile with NVRTC (when NVRTC can be
//! found, e.g. from pip's nvidia-cuda-nvrtc), and asking for a device says why there is none.
//! With one: forward and backward agree with the CPU layer.

#[path = "common/half_conversions.rs"]
mod half_conversions;

use batchnorm::convert::Half::F16;
use batchnorm::cuda::{self, DeviceBuffer, DeviceTensor, Stream};
use batchnorm::{BatchNorm, Buffer, Config, Element, Kind, Shape, TensorRef};

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
            // No driver, no GPU, or no NVRTC to compile for one: the machine's setup, not a bug.
            let absent = [
                "no CUDA driver was found",
                "sees no GPU",
                "NVRTC (the CUDA run-time compiler, libnvrtc.so) was not found",
            ]
            .iter()
            .any(|reason| message.contains(reason));
            let required = std::env::var("BATCHNORM_REQUIRE_GPU").is_ok_and(|v| v == "1");
            assert!(absent && !required, "no usable GPU: {message}");
            eprintln!("skipped: {message}");
            None
        }
    }
}

#[test]
fn gpu_reports_the_driver_and_nvrtc_versions() {
    let Some(_device) = gpu() else { return };
    let versions = cuda::library::versions().expect("versions with a GPU");
    eprintln!("driver supports CUDA {:?}, NVRTC {:?}", versions.driver, versions.nvrtc);
    assert!(versions.nvrtc.0 <= versions.driver.0, "{versions:?}");
}

/// `a` within `tolerance` of `b`, relative to 1 + |b|, element by element.
fn assert_close<T: Element>(a: &[T], b: &[T], tolerance: f64, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (i, (a, b)) in a.iter().zip(b).enumerate() {
        let (a, b) = (a.to_f64(), b.to_f64());
        assert!((a - b).abs() <= tolerance * (1.0 + b.abs()), "{what}[{i}]: {a} vs {b}");
    }
}

/// Train, train, eval steps with a backward after each, on the GPU and on the CPU layer, with x,
/// y, dy and dx `offset` elements past a 256-byte boundary (so an odd offset takes the unaligned
/// kernels). Every output and buffer is compared with the CPU's.
fn agree_with_the_cpu<T: Element>(device: &std::sync::Arc<cuda::Device>, config: Config, shape: Shape, offset: usize) {
    let tolerance = if std::mem::size_of::<T>() == 4 { 2e-5 } else { 1e-11 };
    let what = format!("{} {config:?} {shape:?} offset {offset}", T::DTYPE);
    // Weight and bias away from 1 and 0, so a kernel ignoring them fails.
    let module = || {
        let mut module = BatchNorm::<T>::new(Kind::BatchNorm2d, config.clone()).unwrap();
        let weight: Vec<T> = values(shape.c, 3).iter().map(|&v| T::from_f64(f64::from(v) / 4.0)).collect();
        let bias: Vec<T> = values(shape.c, 4).iter().map(|&v| T::from_f64(f64::from(v) - 5.0)).collect();
        for (which, values) in [(Buffer::Weight, weight), (Buffer::Bias, bias)] {
            if let Some(buffer) = module.buffer_mut(which) {
                buffer.copy_from_slice(&values);
            }
        }
        module
    };
    let (mut cpu, mut gpu) = (module(), module());
    gpu.to_device(device).unwrap();
    let len = shape.numel();
    let arena = |seed: u64| -> DeviceBuffer<T> {
        let mut host = vec![T::ZERO; len + offset];
        for (slot, v) in host[offset..].iter_mut().zip(values(len, seed)) {
            *slot = T::from_f64(f64::from(v) * (seed as f64) + 100.0);
        }
        DeviceBuffer::from_host(device, &host).unwrap()
    };
    for (step, training) in [true, true, false].into_iter().enumerate() {
        cpu.set_training(training);
        gpu.set_training(training);
        let (x_buffer, dy_buffer) = (arena(10 + step as u64), arena(20 + step as u64));
        let (y_buffer, dx_buffer) = (arena(1), arena(2));
        let x = x_buffer.to_host().unwrap()[offset..].to_vec();
        let dy = dy_buffer.to_host().unwrap()[offset..].to_vec();
        let (mut y, mut dx) = (vec![T::ZERO; len], vec![T::ZERO; len]);
        cpu.forward(&TensorRef::contiguous(&x, shape).unwrap(), &mut y).unwrap();
        cpu.backward(&TensorRef::contiguous(&x, shape).unwrap(), &TensorRef::contiguous(&dy, shape).unwrap(), &mut dx)
            .unwrap();
        let at = |buffer: &DeviceBuffer<T>| buffer.ptr() + (offset * std::mem::size_of::<T>()) as u64;
        // SAFETY: four live buffers of `offset + len` values on the layer's device.
        unsafe {
            let tensor = |buffer: &DeviceBuffer<T>| DeviceTensor::from_raw(at(buffer), shape);
            gpu.forward_on_device(tensor(&x_buffer), tensor(&y_buffer), Stream::DEFAULT).unwrap();
            gpu.backward_on_device(tensor(&x_buffer), tensor(&dy_buffer), tensor(&dx_buffer), Stream::DEFAULT).unwrap();
        }
        gpu.synchronize().unwrap();
        assert_close(&y_buffer.to_host().unwrap()[offset..], &y, tolerance, &format!("y, step {step}, {what}"));
        assert_close(
            &dx_buffer.to_host().unwrap()[offset..],
            &dx,
            10.0 * tolerance,
            &format!("dx, step {step}, {what}"),
        );
    }
    gpu.to_host().unwrap();
    let back = &gpu;
    assert_eq!(back.num_batches_tracked(), cpu.num_batches_tracked(), "{what}");
    let buffers = [
        (back.running_mean(), cpu.running_mean(), "running_mean"),
        (back.running_var(), cpu.running_var(), "running_var"),
        (back.grad_weight(), cpu.grad_weight(), "grad_weight"),
        (back.grad_bias(), cpu.grad_bias(), "grad_bias"),
    ];
    for (ours, theirs, name) in buffers {
        assert_eq!(ours.is_some(), theirs.is_some(), "{name} {what}");
        if let (Some(ours), Some(theirs)) = (ours, theirs) {
            assert_close(ours, theirs, 10.0 * tolerance, &format!("{name} {what}"));
        }
    }
}

/// Every kernel variant: wide and single loads, aligned and not, f32 and f64, one block and many
/// per channel, every configuration that changes which pointers the kernels get.
#[test]
fn gpu_every_kernel_variant_agrees_with_the_cpu() {
    let Some(device) = gpu() else { return };
    let configs = [
        Config::new(1),
        Config { momentum: None, ..Config::new(1) },
        Config { affine: false, ..Config::new(1) },
        Config { bias: false, ..Config::new(1) },
        Config { track_running_stats: false, eps: 1e-3, ..Config::new(1) },
    ];
    let shapes = [Shape::new(4, 3, 8, 8), Shape::new(3, 5, 7, 7), Shape::new(1, 2, 1, 9), Shape::new(64, 2, 32, 33)];
    for config in &configs {
        for shape in shapes {
            let config = Config { num_features: shape.c, ..config.clone() };
            for offset in [0, 1] {
                agree_with_the_cpu::<f32>(&device, config.clone(), shape, offset);
                agree_with_the_cpu::<f64>(&device, config.clone(), shape, offset);
            }
        }
    }
}

/// The smallest case of each kernel, for compute-sanitizer's slow race and barrier checks.
#[test]
fn gpu_smallest_shapes_of_every_kernel() {
    let Some(device) = gpu() else { return };
    for shape in [Shape::new(2, 2, 2, 4), Shape::new(2, 2, 1, 3)] {
        for offset in [0, 1] {
            agree_with_the_cpu::<f32>(&device, Config::new(shape.c), shape, offset);
            agree_with_the_cpu::<f64>(&device, Config::new(shape.c), shape, offset);
        }
    }
}

/// Until the half kernels have run on a GPU, a GPU refuses half tensors unless told otherwise;
/// told, its conversion instructions give what the `half` crate gives, for every half value.
#[test]
fn gpu_every_half_value_converts_as_the_half_crate_does() {
    let Some(device) = gpu() else { return };
    std::env::remove_var(cuda::UNVERIFIED_HALF_KERNELS);
    let mut module = BatchNorm::<f32>::new(Kind::BatchNorm1d, Config::new(1)).unwrap();
    module.to_device(&device).unwrap();
    let (x, y) = (DeviceBuffer::<u16>::zeroed(&device, 4).unwrap(), DeviceBuffer::<u16>::unset(&device, 4).unwrap());
    // SAFETY: two live buffers of four half values on the module's device.
    let half = |b: &DeviceBuffer<u16>| unsafe { DeviceTensor::half(b.ptr(), &[4, 1], batchnorm::Ranks::Sequence, F16) };
    // SAFETY: as above.
    let error = unsafe { module.forward_on_device(half(&x).unwrap(), half(&y).unwrap(), Stream::DEFAULT) };
    let error = error.expect_err("half tensors are refused").to_string();
    assert!(error.contains("not yet run on a GPU") && error.contains(cuda::UNVERIFIED_HALF_KERNELS), "{error}");
    std::env::set_var(cuda::UNVERIFIED_HALF_KERNELS, "1");
    half_conversions::every_half_value_converts_as_the_half_crate_does(&device);
}
