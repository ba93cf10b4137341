//! One GPU: its context (the primary context, which CUDA's runtime, PyTorch and CuPy share), its
//! properties, and the kernels compiled for its architecture, once per process.

use std::collections::HashMap;
use std::ffi::{c_char, CStr, CString};
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::CUdevice_attribute;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule};
use cudarc::nvrtc::{result as nvrtc, sys as nvrtc_sys, Ptx};

use super::library;
use crate::error::{Error, Result};

const KERNELS_SOURCE: &str = include_str!("kernels.cu");
/// Every entry point of `kernels.cu`; see its `ENTRY_POINTS`.
const KERNELS: [&str; 4] = ["statistics", "normalize", "gradient_sums", "input_gradient"];
const WIDTHS: [&str; 4] = ["f32x4", "f32x1", "f64x2", "f64x1"];
const EVAL_COEFFICIENTS: [&str; 2] = ["eval_coefficients_f32", "eval_coefficients_f64"];

/// A CUDA device with the batchnorm kernels loaded.
pub struct Device {
    ordinal: usize,
    context: Arc<CudaContext>,
    name: String,
    multiprocessors: u32,
    functions: HashMap<String, CudaFunction>,
    _module: Arc<CudaModule>,
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
        library::nvrtc()?;
        let context = CudaContext::new(ordinal).map_err(|e| driver_error("context creation", e))?;
        // This crate orders its work with its own events (see `layer.rs`), on streams it borrows.
        // SAFETY: no CudaSlice of this context is ever created.
        unsafe { context.disable_event_tracking() };
        let name = context.name().map_err(|e| driver_error("device name", e))?;
        let (major, minor) = context.compute_capability().map_err(|e| driver_error("compute capability", e))?;
        let multiprocessors = context
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| driver_error("multiprocessor count", e))?;
        let image = compile(&format!("sm_{major}{minor}"))?;
        let module = context.load_module(Ptx::from_binary(image)).map_err(|e| driver_error("module load", e))?;
        let names = KERNELS
            .iter()
            .flat_map(|kernel| WIDTHS.iter().map(move |width| format!("{kernel}_{width}")))
            .chain(EVAL_COEFFICIENTS.iter().map(|name| name.to_string()));
        let mut functions = HashMap::new();
        for name in names {
            let function =
                module.load_function(&name).map_err(|e| driver_error(&format!("loading kernel {name}"), e))?;
            functions.insert(name, function);
        }
        Ok(Device {
            ordinal,
            context,
            name,
            multiprocessors: multiprocessors.max(1) as u32,
            functions,
            _module: module,
        })
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
    pub(crate) fn context(&self) -> &Arc<CudaContext> {
        &self.context
    }
    pub(crate) fn function(&self, name: &str) -> Result<&CudaFunction> {
        self.functions.get(name).ok_or_else(|| Error::Cuda(format!("kernel {name} is missing from kernels.cu")))
    }
    /// Makes this device's context current on the calling thread.
    pub(crate) fn bind(&self) -> Result<()> {
        self.context.bind_to_thread().map_err(|e| driver_error("binding the context", e))
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
