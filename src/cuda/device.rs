//! One GPU: its context (the primary context, which CUDA's runtime, PyTorch and CuPy share), its
//! properties, and the kernels compiled for its architecture, once per process. Or, for tests, the
//! CPU emulator of `kernels.cu` standing in for one (`tests/cuda_emulator/`).

use std::collections::HashMap;
use std::ffi::{c_char, c_void, CStr, CString};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::CUdevice_attribute;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule};
use cudarc::nvrtc::{result as nvrtc, sys as nvrtc_sys, Ptx};

use super::library;
use crate::error::{Error, Result};

const KERNELS_SOURCE: &str = include_str!("kernels.cu");
/// Every entry point of `kernels.cu` (see its `REDUCTIONS` and `ELEMENTWISE`): the reductions
/// in every width, wide ones also for unaligned pointers; the element-wise passes; eval's
/// coefficients.
const REDUCTIONS: [&str; 2] = ["statistics", "gradient_sums"];
const REDUCTION_WIDTHS: [&str; 16] = [
    "f32x4", "f32x4u", "f32x1", "f64x2", "f64x2u", "f64x1", "f16x8", "f16x8u", "f16x4", "f16x4u", "f16x1", "bf16x8",
    "bf16x8u", "bf16x4", "bf16x4u", "bf16x1",
];
const ELEMENTWISE: [&str; 2] = ["normalize", "input_gradient"];
const WIDTHS: [&str; 10] =
    ["f32x4", "f32x1", "f64x2", "f64x1", "f16x8", "f16x4", "f16x1", "bf16x8", "bf16x4", "bf16x1"];
const EVAL_COEFFICIENTS: [&str; 2] = ["eval_coefficients_f32", "eval_coefficients_f64"];

/// A CUDA device with the batchnorm kernels loaded.
pub struct Device {
    ordinal: usize,
    name: String,
    multiprocessors: u32,
    pub(crate) backend: Backend,
}

/// What runs the kernels and holds the memory.
pub(crate) enum Backend {
    Driver { context: Arc<CudaContext>, functions: HashMap<String, CudaFunction>, _module: Arc<CudaModule> },
    Emulator(Emulator),
}

type EmulatorLaunch = unsafe extern "C" fn(*const c_char, u32, u32, u32, *const c_void, u64, *mut c_char, usize) -> i32;
type EmulatorPoison = unsafe extern "C" fn(*const c_void, usize, i32);

/// `tests/cuda_emulator/emulator.cpp`, loaded: runs each launch's blocks one after another on the
/// CPU, in an order drawn from `seed` and the launch's number. "Device memory" is host memory,
/// each allocation fenced by guard bytes that are checked after every launch (and, in a build
/// with AddressSanitizer, poisoned, so that a kernel reading them stops with a report).
pub(crate) struct Emulator {
    launch: EmulatorLaunch,
    poison: EmulatorPoison,
    seed: u64,
    launches: AtomicU64,
    /// Live allocations: address → length in bytes.
    pub(crate) allocations: Mutex<HashMap<u64, usize>>,
    _library: libloading::Library,
}

/// Bytes of guard before and after each emulator allocation; also its alignment, cuMemAlloc's.
pub(crate) const GUARD: usize = 256;
pub(crate) const GUARD_BYTE: u8 = 0xA5;

impl Emulator {
    /// Runs kernel `name` to completion; then checks that no allocation's guard bytes changed.
    pub(crate) fn launch(&self, name: &str, grid: (u32, u32), threads: u32, args: *const c_void) -> Result<()> {
        let kernel = CString::new(name).map_err(|_| Error::Cuda(format!("kernel name {name:?}")))?;
        let mut message = vec![0u8; 1024];
        let seed = self.seed ^ self.launches.fetch_add(1, Ordering::Relaxed).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        // SAFETY: the library's entry point reads `args` as the kernel's argument struct, which
        // the launcher built for this kernel, and writes at most `message.len()` bytes.
        let status = unsafe {
            (self.launch)(
                kernel.as_ptr(),
                grid.0,
                grid.1,
                threads,
                args,
                seed,
                message.as_mut_ptr().cast(),
                message.len(),
            )
        };
        if status != 0 {
            let end = message.iter().position(|&b| b == 0).unwrap_or(message.len());
            return Err(Error::Cuda(format!("emulated {}", String::from_utf8_lossy(&message[..end]))));
        }
        let allocations = self.allocations.lock().unwrap_or_else(|p| p.into_inner());
        for (&address, &len) in allocations.iter() {
            // SAFETY: every registered allocation has GUARD bytes before and after it.
            let (before, after) = unsafe {
                (
                    std::slice::from_raw_parts((address as usize - GUARD) as *const u8, GUARD),
                    std::slice::from_raw_parts((address as usize + len) as *const u8, GUARD),
                )
            };
            if before.iter().chain(after).any(|&b| b != GUARD_BYTE) {
                return Err(Error::Cuda(format!(
                    "emulated {name} wrote outside an allocation of {len} bytes at {address:#x}"
                )));
            }
        }
        Ok(())
    }
}

impl Emulator {
    /// Marks the guards around the `bytes` at `base + guard` as out of bounds for the kernels
    /// (a no-op unless the emulator was built with AddressSanitizer).
    ///
    /// # Safety
    /// `base` must start an emulator allocation of `2 * guard + bytes` bytes.
    pub(crate) unsafe fn fence(&self, base: *const u8, guard: usize, bytes: usize) {
        (self.poison)(base.cast(), guard, 1);
        (self.poison)(base.add(guard + bytes).cast(), guard, 1);
    }

    /// Undoes [`Self::fence`] before the allocation is freed.
    ///
    /// # Safety
    /// As for [`Self::fence`].
    pub(crate) unsafe fn unfence(&self, base: *const u8, guard: usize, bytes: usize) {
        (self.poison)(base.cast(), guard, 0);
        (self.poison)(base.add(guard + bytes).cast(), guard, 0);
    }
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Device(cuda:{}, {})", self.ordinal, self.name)
    }
}

pub(crate) fn driver_error(what: &str, error: cudarc::driver::DriverError) -> Error {
    let name = error.error_string().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    Error::Cuda(format!("CUDA {what} failed: {:?} ({name})", error.0))
}

/// How many CUDA devices the driver sees (0 when there is none).
pub fn device_count() -> Result<usize> {
    library::driver()?;
    cudarc::driver::result::init().map_err(|e| driver_error("initialization (cuInit)", e))?;
    let count = cudarc::driver::result::device::get_count().map_err(|e| driver_error("device count", e))?;
    Ok(count.max(0) as usize)
}

/// Device `ordinal`, its kernels compiled on first use and cached for the process.
pub fn device(ordinal: usize) -> Result<Arc<Device>> {
    static DEVICES: Mutex<Vec<Option<Arc<Device>>>> = Mutex::new(Vec::new());
    let count = device_count()?;
    if ordinal >= count {
        return Err(Error::Cuda(match count {
            0 => format!("device 'cuda:{ordinal}' does not exist: the CUDA driver sees no GPU"),
            _ => format!(
                "device 'cuda:{ordinal}' does not exist: the CUDA driver sees {count} GPU(s), cuda:0 to cuda:{}",
                count - 1
            ),
        }));
    }
    // Held while compiling, so two threads asking at once compile once.
    let mut devices = DEVICES.lock().unwrap_or_else(|p| p.into_inner());
    if devices.len() <= ordinal {
        devices.resize(ordinal + 1, None);
    }
    if let Some(device) = &devices[ordinal] {
        return Ok(device.clone());
    }
    let device = Arc::new(Device::open(ordinal)?);
    devices[ordinal] = Some(device.clone());
    Ok(device)
}

impl Device {
    fn open(ordinal: usize) -> Result<Device> {
        if let Some(driver) = library::driver_cuda_major() {
            library::check_versions(library::nvrtc_version()?, driver)?;
        }
        let context = CudaContext::new(ordinal).map_err(|e| driver_error("context creation", e))?;
        // This crate orders its work with its own events (see `arrays.rs`), on streams it borrows.
        // SAFETY: no CudaSlice of this context is ever created.
        unsafe { context.disable_event_tracking() };
        let name = context.name().map_err(|e| driver_error("device name", e))?;
        let (major, minor) = context.compute_capability().map_err(|e| driver_error("compute capability", e))?;
        let multiprocessors = context
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| driver_error("multiprocessor count", e))?;
        let image = compile(&format!("sm_{major}{minor}"))?;
        let module = context.load_module(Ptx::from_binary(image)).map_err(|e| driver_error("module load", e))?;
        let names = REDUCTIONS
            .iter()
            .flat_map(|kernel| REDUCTION_WIDTHS.iter().map(move |width| format!("{kernel}_{width}")))
            .chain(ELEMENTWISE.iter().flat_map(|kernel| WIDTHS.iter().map(move |width| format!("{kernel}_{width}"))))
            .chain(EVAL_COEFFICIENTS.iter().map(|name| name.to_string()));
        let mut functions = HashMap::new();
        for name in names {
            let function =
                module.load_function(&name).map_err(|e| driver_error(&format!("loading kernel {name}"), e))?;
            functions.insert(name, function);
        }
        Ok(Device {
            ordinal,
            name,
            multiprocessors: multiprocessors.max(1) as u32,
            backend: Backend::Driver { context, functions, _module: module },
        })
    }

    /// A device whose kernels run in the CPU emulator built from `tests/cuda_emulator/` (a
    /// shared library at `library`), as a GPU with `multiprocessors` multiprocessors, blocks
    /// in orders drawn from `seed`. For testing the launcher and the kernels without a GPU; its
    /// memory is host memory, so only this crate's own buffers may be used with it.
    ///
    /// # Safety
    /// `library` must be that emulator: its `batchnorm_emulator_launch` is called as such.
    pub unsafe fn emulator(library: &Path, multiprocessors: u32, seed: u64) -> Result<Arc<Device>> {
        let fail = |e: libloading::Error| Error::Cuda(format!("loading the emulator {}: {e}", library.display()));
        let library = libloading::Library::new(library).map_err(fail)?;
        let launch = *library.get::<EmulatorLaunch>(b"batchnorm_emulator_launch\0").map_err(fail)?;
        let poison = *library.get::<EmulatorPoison>(b"batchnorm_emulator_poison\0").map_err(fail)?;
        let emulator = Emulator {
            launch,
            poison,
            seed,
            launches: AtomicU64::new(0),
            allocations: Mutex::default(),
            _library: library,
        };
        Ok(Arc::new(Device {
            ordinal: 0,
            name: "the CPU emulator of kernels.cu".into(),
            multiprocessors: multiprocessors.max(1),
            backend: Backend::Emulator(emulator),
        }))
    }

    pub fn ordinal(&self) -> usize {
        self.ordinal
    }
    /// The device's name as the driver reports it (e.g. "NVIDIA H100 80GB HBM3").
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn multiprocessors(&self) -> u32 {
        self.multiprocessors
    }
    /// Makes this device's context current on the calling thread.
    pub(crate) fn bind(&self) -> Result<()> {
        match &self.backend {
            Backend::Driver { context, .. } => {
                context.bind_to_thread().map_err(|e| driver_error("binding the context", e))
            }
            Backend::Emulator(_) => Ok(()),
        }
    }
}

/// Compiles `kernels.cu` to a cubin for `arch` (e.g. "sm_90"): machine code for this device, so
/// the driver has no PTX to JIT and no PTX version to be too old for.
pub fn compile(arch: &str) -> Result<Vec<u8>> {
    library::nvrtc()?;
    let source = CString::new(KERNELS_SOURCE).map_err(|_| Error::Cuda("kernels.cu contains a NUL byte".into()))?;
    let name = c"batchnorm_kernels.cu";
    let program = nvrtc::create_program(&source, Some(name)).map_err(|e| Error::Cuda(format!("NVRTC: {e:?}")))?;
    let options = [format!("--gpu-architecture={arch}"), "-std=c++17".to_string()];
    // SAFETY: `program` is live until destroyed below; the options outlive the call.
    let compiled = unsafe { nvrtc::compile_program(program, &options) };
    let outcome = match compiled {
        // SAFETY: the program compiled, so it has a cubin of the reported size.
        Ok(()) => unsafe { cubin(program) },
        Err(error) => {
            // SAFETY: a compiled (or failed) program has a log.
            let log = unsafe { nvrtc::get_program_log(program) }
                .map(|raw| unsafe { CStr::from_ptr(raw.as_ptr()) }.to_string_lossy().into_owned())
                .unwrap_or_default();
            Err(Error::Cuda(format!("NVRTC could not compile the kernels for {arch}: {:?}\n{log}", error.0)))
        }
    };
    // SAFETY: destroyed once; nothing refers to it afterwards.
    let _ = unsafe { nvrtc::destroy_program(program) };
    outcome
}

/// # Safety
/// `program` must have compiled successfully.
unsafe fn cubin(program: nvrtc_sys::nvrtcProgram) -> Result<Vec<u8>> {
    let mut size = 0usize;
    nvrtc_sys::nvrtcGetCUBINSize(program, &mut size)
        .result()
        .map_err(|e| Error::Cuda(format!("NVRTC cubin size: {:?}", e.0)))?;
    let mut image = vec![0u8; size];
    nvrtc_sys::nvrtcGetCUBIN(program, image.as_mut_ptr() as *mut c_char)
        .result()
        .map_err(|e| Error::Cuda(format!("NVRTC cubin: {:?}", e.0)))?;
    Ok(image)
}
