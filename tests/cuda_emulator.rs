//! `src/cuda/kernels.cu` on the CPU, on every commit: the kernels compiled by the system C++
//! compiler against `tests/cuda_emulator/`, and driven by this crate's own CUDA launcher (geometry,
//! splits, workspace, argument structs) through `cuda::Device::emulator`, so a launcher bug shows
//! too. Each case runs the GPU layer and the CPU layer (itself checked against float64 references
//! elsewhere) on the same data and compares outputs, gradients and running statistics; every case
//! also runs under several block orders and with its arrays off 16-byte alignment, and must give
//! the same bits under each.
//!
//! No GPU needed. The emulator needs a C++20 compiler (`$CXX`, else `c++`); without one this test
//! fails, unless `BATCHNORM_SKIP_EMULATOR=1` says to skip it.

mod common;
#[path = "common/half_conversions.rs"]
mod half_conversions;

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, OnceLock};

use batchnorm::convert::Half;
use batchnorm::cuda::{Device, DeviceBuffer, DeviceTensor, Stream};
use batchnorm::{BatchNorm, Buffer, Config, Element, Kind, Ranks, Shape, TensorMut, TensorRef};
use half_conversions::{narrow, widen};

/// Compiles `sources` with the C++ compiler into `out`, with `flags` (`-shared -fPIC` for a library).
fn compile(source: &str, out: &str, flags: &[&str]) -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(out);
    let compiler = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    // No strict aliasing: kernels.cu type-puns loads as CUDA code does, which nvcc allows.
    let status = Command::new(&compiler)
        .args(["-std=c++20", "-O2", "-g", "-Wall", "-Wno-unknown-pragmas", "-fno-strict-aliasing"])
        .args(flags)
        .arg("-I")
        .arg(root.join("src/cuda"))
        .arg(root.join("tests/cuda_emulator").join(source))
        .arg("-o")
        .arg(&out)
        .status()
        .unwrap_or_else(|e| panic!("cannot run the C++ compiler {compiler:?} ({e}); install g++ or set CXX"));
    assert!(status.success(), "{source} did not compile ({compiler})");
    out
}

fn skipped() -> bool {
    let skip = std::env::var("BATCHNORM_SKIP_EMULATOR").is_ok_and(|v| v == "1");
    if skip {
        eprintln!("skipped: BATCHNORM_SKIP_EMULATOR=1");
    }
    skip
}

/// Set (to the library built with AddressSanitizer) in the child process that
/// `every_access_stays_inside_its_array_under_address_sanitizer` runs.
const ASAN_LIBRARY: &str = "BATCHNORM_EMULATOR_ASAN_LIBRARY";

/// The emulator library, built once per test run.
fn library() -> Option<&'static PathBuf> {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    if skipped() {
        return None;
    }
    Some(BUILT.get_or_init(|| match std::env::var_os(ASAN_LIBRARY) {
        Some(path) => PathBuf::from(path),
        None => compile("emulator.cpp", "libbatchnorm_cuda_emulator.so", &["-shared", "-fPIC"]),
    }))
}

/// Runs this test binary again with AddressSanitizer's runtime preloaded and the emulator built
/// with it, on the tests named: their kernels' every read and write is checked.
fn under_address_sanitizer(tests: &[&str]) -> std::process::Output {
    let compiler = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let runtime = Command::new(&compiler).arg("-print-file-name=libasan.so").output().expect("the C++ compiler runs");
    let runtime = PathBuf::from(String::from_utf8_lossy(&runtime.stdout).trim());
    assert!(runtime.is_absolute(), "{compiler} has no AddressSanitizer runtime (libasan); install it or set CXX");
    let flags = ["-shared", "-fPIC", "-fsanitize=address", "-fno-omit-frame-pointer"];
    let library = compile("emulator.cpp", "libbatchnorm_cuda_emulator_asan.so", &flags);
    Command::new(std::env::current_exe().expect("the test binary's path"))
        .args(["--exact", "--include-ignored", "--test-threads", "1"])
        .args(tests)
        .env(ASAN_LIBRARY, &library)
        .env("LD_PRELOAD", &runtime)
        // The Rust test harness is not instrumented; the emulator is what is checked.
        .env("ASAN_OPTIONS", "detect_leaks=0:verify_asan_link_order=0:abort_on_error=0")
        .output()
        .expect("the test binary runs again")
}

/// Every kernel, in every configuration and both precisions, reads and writes only inside its
/// arrays, shared memory and per-thread arrays; and a read one value past an array is reported.
#[test]
fn every_access_stays_inside_its_array_under_address_sanitizer() {
    if skipped() || std::env::var_os(ASAN_LIBRARY).is_some() {
        return;
    }
    let planted = under_address_sanitizer(&["a_read_past_an_array_is_reported_under_address_sanitizer"]);
    let report = String::from_utf8_lossy(&planted.stderr);
    assert!(
        !planted.status.success() && report.contains("AddressSanitizer"),
        "the planted read past an array was not reported:\n{report}"
    );
    let checked = under_address_sanitizer(&["every_kernel_on_the_shape_classes"]);
    assert!(
        checked.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
}

/// Run by the test above, in its AddressSanitizer child: the input tensor claims 4 values more
/// than its buffer holds, so the statistics kernel reads into the poisoned guard.
#[test]
#[ignore = "run by every_access_stays_inside_its_array_under_address_sanitizer"]
fn a_read_past_an_array_is_reported_under_address_sanitizer() {
    assert!(std::env::var_os(ASAN_LIBRARY).is_some(), "meant for an AddressSanitizer child process");
    let device = emulator(8, 1).expect("the emulator loads");
    let shape = Shape::new(2, 3, 4, 4);
    let x: Vec<f32> = values(shape.numel() - 4, 1, 0.0);
    let mut layer = on_device(BatchNorm::<f32>::new(Kind::BatchNorm2d, Config::new(3)).unwrap(), &device);
    let xb = DeviceBuffer::from_host(&device, &x).unwrap();
    let yb = DeviceBuffer::<f32>::unset(&device, shape.numel()).unwrap();
    // SAFETY: not safe, on purpose: the 4 values past `xb` are its guard, which AddressSanitizer
    // stops the process on (the emulator's memory is host memory).
    let _ = unsafe {
        layer.forward_on_device(
            DeviceTensor::from_raw(xb.ptr(), shape),
            DeviceTensor::from_raw(yb.ptr(), shape),
            Stream::DEFAULT,
        )
    };
}

/// Memory nobody wrote reads as NaN on the emulator, so a kernel that reads an output or a
/// workspace value before writing it shows in the results the tests compare.
#[test]
fn memory_nobody_wrote_reads_as_nan() {
    let Some(device) = emulator(8, 1) else { return };
    let shape = Shape::new(2, 3, 4, 4);
    let mut layer = on_device(BatchNorm::<f32>::new(Kind::BatchNorm2d, Config::new(3)).unwrap(), &device);
    let (xb, yb) = (
        DeviceBuffer::<f32>::unset(&device, shape.numel()).unwrap(),
        DeviceBuffer::<f32>::unset(&device, shape.numel()).unwrap(),
    );
    assert!(xb.to_host().unwrap().iter().all(|v| v.is_nan()));
    // SAFETY: two live buffers of `numel` values.
    unsafe {
        layer.forward_on_device(
            DeviceTensor::from_raw(xb.ptr(), shape),
            DeviceTensor::from_raw(yb.ptr(), shape),
            Stream::DEFAULT,
        )
    }
    .unwrap();
    assert!(yb.to_host().unwrap().iter().all(|v| v.is_nan()));
    layer.to_host().unwrap();
    let running_mean = layer.buffer(Buffer::RunningMean).unwrap().to_vec();
    assert!(running_mean.iter().all(|v| v.is_nan()), "{running_mean:?}");
}

/// The emulator catches the bugs it is for: a barrier reached from different lines or after
/// threads exited, a full-mask shuffle after lanes exited, a deadlock; a correct reduction passes.
#[test]
fn the_emulator_catches_divergent_barriers_shuffles_after_exit_and_deadlocks() {
    if skipped() {
        return;
    }
    let program = compile("selftest.cpp", "batchnorm_cuda_emulator_selftest", &[]);
    let output = Command::new(&program).output().expect("the self-test runs");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stdout));
}

/// A kernel writing past its buffer is reported by the guard bytes around every allocation.
#[test]
fn a_write_outside_an_allocation_is_an_error() {
    let Some(device) = emulator(8, 1) else { return };
    let shape = Shape::new(2, 3, 4, 4);
    let x: Vec<f32> = values(shape.numel(), 1, 0.0);
    let mut layer = on_device(BatchNorm::<f32>::new(Kind::BatchNorm2d, Config::new(3)).unwrap(), &device);
    let xb = DeviceBuffer::from_host(&device, &x).unwrap();
    let yb = DeviceBuffer::<f32>::zeroed(&device, x.len() - 4).unwrap();
    // The output tensor claims 4 values more than its buffer holds (as a wrong launcher would).
    // SAFETY: the emulator's memory is host memory, and the 4 extra values land in the guard.
    let error = unsafe {
        layer.forward_on_device(
            DeviceTensor::from_raw(xb.ptr(), shape),
            DeviceTensor::from_raw(yb.ptr(), shape),
            Stream::DEFAULT,
        )
    }
    .unwrap_err();
    assert!(error.to_string().contains("wrote outside an allocation"), "{error}");
}

fn emulator(multiprocessors: u32, seed: u64) -> Option<Arc<Device>> {
    let library = library()?;
    // SAFETY: the library is the emulator built above.
    Some(unsafe { Device::emulator(library, multiprocessors, seed) }.expect("the emulator loads"))
}

/// Values near `offset` (xorshift), a few far from it.
fn values<T: Element>(count: usize, seed: u64, offset: f64) -> Vec<T> {
    let far = |i: usize, u: f64| if i.is_multiple_of(53) { 40.0 * u } else { 2.0 * u - 1.0 };
    common::uniform(count, seed).enumerate().map(|(i, u)| T::from_f64(offset + far(i, u))).collect()
}

/// Everything one training step and one eval step produce, from the device.
#[derive(Debug, PartialEq)]
struct Step<T> {
    y: Vec<T>,
    dx: Vec<T>,
    y_eval: Vec<T>,
    dx_eval: Vec<T>,
    state: Vec<(Buffer, Vec<T>)>,
}

/// Runs two training steps (the second accumulating gradients), then eval, on the device, with
/// the input, grad_output and outputs `skip` elements into their buffers.
fn run_device<T: Element + bytemuck::Pod>(
    device: &Arc<Device>,
    host: &BatchNorm<T>,
    x: &[T],
    dy: &[T],
    shape: Shape,
    skip: usize,
) -> Step<T> {
    let mut layer = on_device(host.try_clone().unwrap(), device);
    let buffer = |values: &[T]| {
        let mut padded = vec![T::ZERO; skip];
        padded.extend_from_slice(values);
        DeviceBuffer::from_host(device, &padded).unwrap()
    };
    // The outputs start unset (NaN on the emulator): a kernel that skips a value shows.
    let output = || DeviceBuffer::<T>::unset(device, skip + x.len()).unwrap();
    let (xb, dyb, yb, dxb) = (buffer(x), buffer(dy), output(), output());
    // SAFETY: four live buffers of `skip + numel` values on the layer's device.
    let at = |b: &DeviceBuffer<T>| unsafe { DeviceTensor::from_raw(b.ptr() + (skip * size_of::<T>()) as u64, shape) };
    let read = |b: &DeviceBuffer<T>| b.to_host().unwrap()[skip..].to_vec();
    // SAFETY: as above; every call is synchronous on the emulator.
    unsafe {
        for _ in 0..2 {
            layer.forward_on_device(at(&xb), at(&yb), Stream::DEFAULT).unwrap();
            layer.backward_on_device(at(&xb), at(&dyb), at(&dxb), Stream::DEFAULT).unwrap();
        }
    }
    let (y, dx) = (read(&yb), read(&dxb));
    layer.set_training(false);
    // SAFETY: as above.
    unsafe {
        layer.forward_on_device(at(&xb), at(&yb), Stream::DEFAULT).unwrap();
        layer.backward_on_device(at(&xb), at(&dyb), at(&dxb), Stream::DEFAULT).unwrap();
    }
    layer.to_host().unwrap();
    let back = &layer;
    let state = Buffer::ALL.iter().filter_map(|&which| Some((which, back.buffer(which)?.to_vec()))).collect();
    Step { y, dx, y_eval: read(&yb), dx_eval: read(&dxb), state }
}

/// `module` moved to `device`.
fn on_device<T: Element>(mut module: BatchNorm<T>, device: &Arc<Device>) -> BatchNorm<T> {
    module.to_device(device).unwrap();
    module
}

/// The same steps on the CPU layer.
fn run_cpu<T: Element>(host: &BatchNorm<T>, x: &[T], dy: &[T], shape: Shape) -> Step<T> {
    let mut layer = host.try_clone().unwrap();
    let (xr, dyr) = (TensorRef::contiguous(x, shape).unwrap(), TensorRef::contiguous(dy, shape).unwrap());
    let (mut y, mut dx) = (vec![T::ZERO; x.len()], vec![T::ZERO; x.len()]);
    for _ in 0..2 {
        layer.forward(&xr, &mut y).unwrap();
        layer.backward(&xr, &dyr, &mut dx).unwrap();
    }
    layer.set_training(false);
    let (mut y_eval, mut dx_eval) = (vec![T::ZERO; x.len()], vec![T::ZERO; x.len()]);
    layer.forward(&xr, &mut y_eval).unwrap();
    layer.backward(&xr, &dyr, &mut dx_eval).unwrap();
    let state = Buffer::ALL.iter().filter_map(|&which| Some((which, layer.buffer(which)?.to_vec()))).collect();
    Step { y, dx, y_eval, dx_eval, state }
}

fn assert_close<T: Element>(got: &Step<T>, want: &Step<T>, tolerance: f64, context: &str) {
    let close = |name: &str, a: &[T], b: &[T]| {
        assert_eq!(a.len(), b.len(), "{name} {context}");
        let scale = b.iter().map(|v| v.to_f64().abs()).fold(1.0, f64::max);
        for (i, (a, b)) in a.iter().zip(b).enumerate() {
            let (a, b) = (a.to_f64(), b.to_f64());
            assert!(
                (a - b).abs() <= tolerance * scale || (a.is_nan() && b.is_nan()),
                "{name}[{i}]: {a} vs {b}, {context}"
            );
        }
    };
    close("y", &got.y, &want.y);
    close("grad_input", &got.dx, &want.dx);
    close("y eval", &got.y_eval, &want.y_eval);
    close("grad_input eval", &got.dx_eval, &want.dx_eval);
    assert_eq!(got.state.len(), want.state.len(), "{context}");
    for ((which, a), (_, b)) in got.state.iter().zip(&want.state) {
        close(which.name(), a, b);
    }
}

/// The configurations the launcher and kernels treat differently.
fn configs(c: usize) -> Vec<Config> {
    let base = Config::new(c);
    vec![
        base.clone(),
        Config { momentum: None, ..base.clone() },
        Config { affine: false, ..base.clone() },
        Config { bias: false, ..base.clone() },
        Config { track_running_stats: false, ..base.clone() },
        Config { affine: false, track_running_stats: false, eps: 1e-3, ..base },
    ]
}

/// Plane sizes that are and are not a multiple of the wide load, N = 1, C = 1, and shapes large
/// enough that a channel's statistics split across several blocks.
const SHAPES: [Shape; 7] = [
    Shape::new(3, 5, 7, 7),
    Shape::new(2, 4, 8, 8),
    Shape::new(1, 3, 5, 5),
    Shape::new(4, 1, 6, 6),
    Shape::new(16, 2, 32, 32),
    Shape::new(40, 3, 15, 15),
    Shape::new(2, 300, 2, 2),
];

fn check<T: Element + bytemuck::Pod>(tolerance: f64, shapes: &[Shape]) {
    let Some(device) = emulator(8, 1) else { return };
    for &shape in shapes {
        let (x, dy) = (values::<T>(shape.numel(), 1, 5.0), values::<T>(shape.numel(), 2, 0.0));
        for config in configs(shape.c) {
            let mut host = BatchNorm::<T>::new(Kind::BatchNorm2d, config.clone()).unwrap();
            if let Some(weight) = host.buffer_mut(Buffer::Weight) {
                weight.copy_from_slice(&values::<T>(shape.c, 3, 1.0));
            }
            if let Some(bias) = host.buffer_mut(Buffer::Bias) {
                bias.copy_from_slice(&values::<T>(shape.c, 4, 0.0));
            }
            let want = run_cpu(&host, &x, &dy, shape);
            let aligned = run_device(&device, &host, &x, &dy, shape, 0);
            assert_close(&aligned, &want, tolerance, &format!("{shape:?} {config:?}"));
            // One element in: pointers off 16-byte alignment take the unaligned and narrow
            // kernels, and must give the same bits.
            let unaligned = run_device(&device, &host, &x, &dy, shape, 1);
            assert!(unaligned == aligned, "{shape:?} {config:?}: an unaligned array changes the result");
        }
    }
}

/// Run by `every_access_stays_inside_its_array_under_address_sanitizer`, where each access costs
/// a check: one shape of each class the kernels treat apart (an odd plane, N = 1, C = 1, a
/// channel split over blocks), every configuration, both precisions.
#[test]
#[ignore = "run by every_access_stays_inside_its_array_under_address_sanitizer"]
fn every_kernel_on_the_shape_classes() {
    let shapes = [SHAPES[0], SHAPES[2], SHAPES[3], SHAPES[5]];
    check::<f32>(2e-5, &shapes);
    check::<f64>(1e-12, &shapes);
}

#[test]
fn every_kernel_matches_the_cpu_layer_in_float32() {
    check::<f32>(2e-5, &SHAPES);
}

#[test]
fn every_kernel_matches_the_cpu_layer_in_float64() {
    check::<f64>(1e-12, &SHAPES);
}

/// The last block of a channel combines the partials in index order, so the order blocks run in
/// never changes a bit. Split counts follow the GPU's multiprocessor count (the launcher aims at
/// a number of blocks per multiprocessor), so results are compared per count.
#[test]
fn block_order_never_changes_a_bit() {
    let shape = Shape::new(64, 2, 32, 32);
    let (x, dy) = (values::<f32>(shape.numel(), 5, 3.0), values::<f32>(shape.numel(), 6, 0.0));
    let host = BatchNorm::<f32>::new(Kind::BatchNorm2d, Config::new(shape.c)).unwrap();
    for multiprocessors in [1, 8, 132] {
        let Some(first) = emulator(multiprocessors, 1) else { return };
        let reference = run_device(&first, &host, &x, &dy, shape, 0);
        for seed in 2..6 {
            let device = emulator(multiprocessors, seed).unwrap();
            assert!(run_device(&device, &host, &x, &dy, shape, 0) == reference, "{multiprocessors} SMs, seed {seed}");
        }
    }
}

/// Half outputs (as bits) and the module's float32 arrays after two training steps and an eval
/// step, as `run_device` does for float tensors.
#[derive(Debug, PartialEq)]
struct HalfStep {
    y: Vec<u16>,
    dx: Vec<u16>,
    y_eval: Vec<u16>,
    dx_eval: Vec<u16>,
    state: Vec<(Buffer, Vec<f32>)>,
}

fn run_device_half(
    device: &Arc<Device>,
    host: &BatchNorm<f32>,
    half: Half,
    x: &[u16],
    dy: &[u16],
    shape: Shape,
    skip: usize,
) -> HalfStep {
    let mut layer = on_device(host.try_clone().unwrap(), device);
    let dims = [shape.n, shape.c, shape.h, shape.w];
    let buffer = |values: &[u16]| {
        let mut padded = vec![0u16; skip];
        padded.extend_from_slice(values);
        DeviceBuffer::from_host(device, &padded).unwrap()
    };
    let output = || DeviceBuffer::<u16>::unset(device, skip + x.len()).unwrap();
    let (xb, dyb, yb, dxb) = (buffer(x), buffer(dy), output(), output());
    // SAFETY: four live buffers of `skip + numel` half values on the layer's device.
    let at = |b: &DeviceBuffer<u16>| unsafe {
        DeviceTensor::half(b.ptr() + 2 * skip as u64, &dims, Ranks::Planes, half).unwrap()
    };
    let read = |b: &DeviceBuffer<u16>| b.to_host().unwrap()[skip..].to_vec();
    // SAFETY: as above; every call is synchronous on the emulator.
    unsafe {
        for _ in 0..2 {
            layer.forward_on_device(at(&xb), at(&yb), Stream::DEFAULT).unwrap();
            layer.backward_on_device(at(&xb), at(&dyb), at(&dxb), Stream::DEFAULT).unwrap();
        }
    }
    let (y, dx) = (read(&yb), read(&dxb));
    layer.set_training(false);
    // SAFETY: as above.
    unsafe {
        layer.forward_on_device(at(&xb), at(&yb), Stream::DEFAULT).unwrap();
        layer.backward_on_device(at(&xb), at(&dyb), at(&dxb), Stream::DEFAULT).unwrap();
    }
    layer.to_host().unwrap();
    let back = &layer;
    let state = Buffer::ALL.iter().filter_map(|&which| Some((which, back.buffer(which)?.to_vec()))).collect();
    HalfStep { y, dx, y_eval: read(&yb), dx_eval: read(&dxb), state }
}

fn run_cpu_half(host: &BatchNorm<f32>, half: Half, x: &[u16], dy: &[u16], shape: Shape) -> HalfStep {
    let mut layer = host.try_clone().unwrap();
    let dims = [shape.n, shape.c, shape.h, shape.w];
    let strides = [(shape.c * shape.h * shape.w) as isize, (shape.h * shape.w) as isize, shape.w as isize, 1];
    let xr = TensorRef::half(x, half, 0, &dims, &strides, Ranks::Planes).unwrap();
    let dyr = TensorRef::half(dy, half, 0, &dims, &strides, Ranks::Planes).unwrap();
    let step = |layer: &mut BatchNorm<f32>| {
        let (mut y, mut dx) = (vec![0u16; x.len()], vec![0u16; x.len()]);
        layer.forward(&xr, TensorMut::half(&mut y, half)).unwrap();
        layer.backward(&xr, &dyr, TensorMut::half(&mut dx, half)).unwrap();
        (y, dx)
    };
    step(&mut layer);
    let (y, dx) = step(&mut layer);
    layer.set_training(false);
    let (y_eval, dx_eval) = step(&mut layer);
    let state = Buffer::ALL.iter().filter_map(|&which| Some((which, layer.buffer(which)?.to_vec()))).collect();
    HalfStep { y, dx, y_eval, dx_eval, state }
}

/// float16 and bfloat16 tensors on a float32 module: every half kernel (8-, 4- and 1-value packs,
/// aligned or not, one or several blocks a channel) gives the CPU's half results to within one
/// unit in the last place of the half type (both round a float32 value once, and the float32
/// values differ by float32 rounding), the float32 arrays as the float32 kernels do, and, off
/// alignment, the same bits.
#[test]
fn half_tensors_match_the_cpu_half_path() {
    let Some(device) = emulator(8, 1) else { return };
    let shapes = [Shape::new(3, 5, 7, 7), Shape::new(2, 4, 14, 14), Shape::new(2, 4, 8, 8), Shape::new(16, 2, 32, 32)];
    for half in [Half::F16, Half::BF16] {
        let ulp = if half == Half::F16 { 2f64.powi(-10) } else { 2f64.powi(-7) };
        for &shape in &shapes {
            let x: Vec<u16> = values::<f32>(shape.numel(), 1, 5.0).iter().map(|&v| narrow(half, v)).collect();
            let dy: Vec<u16> = values::<f32>(shape.numel(), 2, 0.0).iter().map(|&v| narrow(half, v)).collect();
            for config in configs(shape.c) {
                let mut host = BatchNorm::<f32>::new(Kind::BatchNorm2d, config.clone()).unwrap();
                if let Some(weight) = host.buffer_mut(Buffer::Weight) {
                    weight.copy_from_slice(&values::<f32>(shape.c, 3, 1.0));
                }
                let context = format!("{half:?} {shape:?} {config:?}");
                let want = run_cpu_half(&host, half, &x, &dy, shape);
                let got = run_device_half(&device, &host, half, &x, &dy, shape, 0);
                let halves = [("y", &got.y, &want.y), ("grad_input", &got.dx, &want.dx)];
                let evals = [("y eval", &got.y_eval, &want.y_eval), ("grad_input eval", &got.dx_eval, &want.dx_eval)];
                for (name, a, b) in halves.into_iter().chain(evals) {
                    let scale = b.iter().map(|&v| f64::from(widen(half, v)).abs()).fold(1.0, f64::max);
                    for (i, (&a, &b)) in a.iter().zip(b.iter()).enumerate() {
                        let (a, b) = (f64::from(widen(half, a)), f64::from(widen(half, b)));
                        let tolerance = ulp * b.abs() + 1e-5 * scale;
                        assert!((a - b).abs() <= tolerance, "{name}[{i}]: {a} vs {b}, {context}");
                    }
                }
                for ((which, a), (_, b)) in got.state.iter().zip(&want.state) {
                    let scale = b.iter().map(|v| v.abs()).fold(1.0, f32::max);
                    for (a, b) in a.iter().zip(b) {
                        assert!((a - b).abs() <= 2e-5 * scale, "{}: {a} vs {b}, {context}", which.name());
                    }
                }
                let unaligned = run_device_half(&device, &host, half, &x, &dy, shape, 1);
                assert!(unaligned == got, "{context}: an unaligned array changes the result");
            }
        }
    }
}

/// See `half_conversions::every_half_value_converts_as_the_half_crate_does`; on the GPU too.
#[test]
fn every_half_value_converts_as_the_half_crate_does() {
    let Some(device) = emulator(8, 1) else { return };
    half_conversions::every_half_value_converts_as_the_half_crate_does(&device);
}
