//! GPU arrays for the bindings: streams, importing arrays through DLPack or
//! `__cuda_array_interface__`, and `DeviceArray`, the array type GPU results come back as, which
//! exports both protocols so CuPy, PyTorch and JAX take it without a copy.

use std::ffi::{c_void, CStr};
use std::sync::Arc;

use numpy::{dtype, PyArrayDescr, PyArrayDyn, PyArrayMethods, PyUntypedArrayMethods};
use pyo3::exceptions::{PyBufferError, PyTypeError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

use super::{array_span, out_layout, output, type_name, typed_array, Dtype, Float, PyBatchNorm, Saved};
use crate::checks::{check_disjoint, Owner, Span};
use crate::convert::Half;
use crate::cuda::{self, Device, DeviceBuffer, DeviceTensor, Event, Stream};
use crate::error::{shape_str, Error, Result};
use crate::BatchNorm;
use crate::Buffer;

/// DLPack's device type of CUDA memory.
const KDL_CUDA: i32 = 2;
/// DLPack's type codes.
const KDL_FLOAT: u8 = 2;
const KDL_BFLOAT: u8 = 4;
const DLTENSOR: &CStr = c"dltensor";

#[repr(C)]
#[derive(Clone, Copy)]
struct DLDevice {
    device_type: i32,
    device_id: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct DLDataType {
    code: u8,
    bits: u8,
    lanes: u16,
}

#[repr(C)]
struct DLTensor {
    data: *mut c_void,
    device: DLDevice,
    ndim: i32,
    dtype: DLDataType,
    shape: *mut i64,
    strides: *mut i64,
    byte_offset: u64,
}

/// DLPack's (unversioned) `DLManagedTensor`, what a capsule named "dltensor" holds.
#[repr(C)]
struct DLManagedTensor {
    dl_tensor: DLTensor,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DLManagedTensor)>,
}

/// What a GPU array holds: values of a module's dtype, or half values (which float32 modules
/// take: PyTorch's mixed precision).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Values {
    Float(Dtype),
    Half(Half),
}

impl Values {
    fn name(self) -> &'static str {
        match self {
            Values::Float(dtype) => dtype.name(),
            Values::Half(half) => half.name(),
        }
    }
    fn item_size(self) -> usize {
        match self {
            Values::Float(dtype) => dtype.item_size(),
            Values::Half(_) => 2,
        }
    }
    fn dlpack(self) -> DLDataType {
        let code = if self == Values::Half(Half::BF16) { KDL_BFLOAT } else { KDL_FLOAT };
        DLDataType { code, bits: (self.item_size() * 8) as u8, lanes: 1 }
    }
    /// NumPy's dtype for them; bfloat16's is ml_dtypes' (NumPy has none of its own).
    fn descr(self, py: Python<'_>) -> PyResult<Bound<'_, PyArrayDescr>> {
        match self {
            Values::Float(Dtype::F32) => Ok(dtype::<f32>(py)),
            Values::Float(Dtype::F64) => Ok(dtype::<f64>(py)),
            Values::Half(Half::F16) => PyArrayDescr::new(py, "float16"),
            Values::Half(Half::BF16) => {
                let bfloat16 = py.import("ml_dtypes").and_then(|m| m.getattr("bfloat16")).map_err(|_| {
                    PyTypeError::new_err(
                        "a bfloat16 array on the host needs the ml_dtypes package: pip install ml_dtypes",
                    )
                })?;
                Ok(PyArrayDescr::new(py, bfloat16)?)
            }
        }
    }
    /// The CUDA array interface's type string: bfloat16 has none (the protocol takes NumPy's).
    fn typestr(self) -> PyResult<&'static str> {
        match self {
            Values::Float(Dtype::F32) => Ok("<f4"),
            Values::Float(Dtype::F64) => Ok("<f8"),
            Values::Half(Half::F16) => Ok("<f2"),
            Values::Half(Half::BF16) => Err(PyTypeError::new_err(
                "a bfloat16 array has no __cuda_array_interface__ (it takes NumPy's types only): use DLPack",
            )),
        }
    }
}

/// The stream a call asks for (`None` when it names none; see `default_stream`): a raw handle
/// (an int) or an object with `.cuda_stream` (PyTorch) or `.ptr` (CuPy).
pub(crate) fn parse_stream(value: Option<&Bound<'_, PyAny>>) -> PyResult<Option<Stream>> {
    let Some(value) = value.filter(|v| !v.is_none()) else { return Ok(None) };
    let handle = if let Ok(handle) = value.extract::<u64>() {
        handle
    } else if let Ok(attribute) = value.getattr("cuda_stream").or_else(|_| value.getattr("ptr")) {
        attribute.extract::<u64>()?
    } else {
        return Err(PyTypeError::new_err(format!(
            "stream must be None, a stream handle (int) or an object with .cuda_stream or .ptr, got {}",
            type_name(value)
        )));
    };
    // SAFETY: the caller vouches for its stream, as with every CUDA library taking raw handles.
    Ok(Some(unsafe { Stream::from_raw(handle) }))
}

/// The stream a call that names none runs on: PyTorch's current stream on the input's device
/// for a torch.Tensor, as PyTorch's own operators do; else CUDA's legacy default stream.
fn default_stream(input: &Bound<'_, PyAny>) -> PyResult<Stream> {
    match TorchHooks::get(input.py()) {
        Some(torch) if input.is_instance(torch.tensor.bind(input.py()))? => {
            let device: i64 = input.call_method0("get_device")?.extract()?;
            match u32::try_from(device) {
                Ok(device) => torch.current_stream(input.py(), device),
                Err(_) => Ok(Stream::DEFAULT), // a CPU tensor, refused by the import that follows
            }
        }
        _ => Ok(Stream::DEFAULT),
    }
}

/// The stream handle to hand to a DLPack producer or a CAI consumer: CUDA's legacy default
/// stream is 1 there (0 is disallowed as ambiguous).
fn protocol_stream(stream: Stream) -> u64 {
    match stream.raw() {
        0 => 1,
        raw => raw,
    }
}

fn same_stream(a: Stream, b: Stream) -> bool {
    protocol_stream(a) == protocol_stream(b)
}

/// Whether `value` is an array in CUDA device memory (by either protocol).
pub(crate) fn is_gpu_array(value: &Bound<'_, PyAny>) -> bool {
    if value.hasattr("__cuda_array_interface__").unwrap_or(false) {
        return true;
    }
    value
        .call_method0("__dlpack_device__")
        .and_then(|d| d.extract::<(i32, i32)>())
        .is_ok_and(|(device_type, _)| device_type == KDL_CUDA)
}

/// A GPU array read in place: where it is and what it holds. `owner` keeps the memory alive:
/// the array object itself, or the DLPack capsule (whose destructor releases the producer's
/// reference, as DLPack prescribes for a capsule that was not renamed).
pub(crate) struct GpuArray {
    pub ptr: u64,
    pub shape: Vec<usize>,
    pub dtype: std::result::Result<Values, String>,
    pub device: usize,
    pub readonly: bool,
    /// The stream its producer uses it on next, when known (PyTorch's current stream, the CUDA
    /// array interface's stream): ordered after a call's work when that ran on another stream, so
    /// the producer neither reads an output early nor overwrites an input still being read.
    pub producer: Option<Stream>,
    pub owner: Py<PyAny>,
}

impl GpuArray {
    /// The same array, holding its owner once more.
    pub(crate) fn clone_ref(&self, py: Python<'_>) -> GpuArray {
        GpuArray {
            ptr: self.ptr,
            shape: self.shape.clone(),
            dtype: self.dtype.clone(),
            device: self.device,
            readonly: self.readonly,
            producer: self.producer,
            owner: self.owner.clone_ref(py),
        }
    }

    /// The array as a tensor of a module reading its dims as `ranks` says.
    ///
    /// # Safety
    /// The array must stay alive until the work queued on the tensor has finished.
    unsafe fn tensor<T: Float>(&self, ranks: crate::Ranks) -> Result<DeviceTensor<T>> {
        // SAFETY: the caller's guarantee; `import` checked the array C-contiguous.
        unsafe {
            match self.dtype {
                Ok(Values::Half(half)) => T::device_half(self.ptr, &self.shape, ranks, half),
                _ => DeviceTensor::contiguous(self.ptr, &self.shape, ranks),
            }
        }
    }

    /// What a module of `dtype` expects of a tensor that comes with this input: its own half
    /// type when this is a half input to a float32 module, else `dtype`.
    pub(crate) fn expected_with(&self, dtype: Dtype) -> Values {
        match self.dtype {
            Ok(Values::Half(half)) if dtype == Dtype::F32 => Values::Half(half),
            _ => Values::Float(dtype),
        }
    }

    pub(crate) fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Checks that the array holds `expected` values on `device`.
    pub(crate) fn check(&self, what: &str, expected: Values, device: usize) -> Result<()> {
        match &self.dtype {
            Ok(values) if *values == expected => {}
            Ok(values) => {
                return Err(Error::DType {
                    what: what.into(),
                    expected: expected.name().into(),
                    got: values.name().into(),
                })
            }
            Err(name) => {
                return Err(Error::DType { what: what.into(), expected: expected.name().into(), got: name.clone() })
            }
        }
        if self.device != device && self.numel() > 0 {
            return Err(Error::InvalidArgument(format!(
                "expected {what} on the module's device cuda:{device}, got an array on cuda:{}",
                self.device
            )));
        }
        Ok(())
    }

    /// The device bytes of the (C-contiguous) array, for `check_disjoint`.
    pub(crate) fn span(&self, owner: &'static str, values: Values) -> Span {
        let start = self.ptr as usize;
        Span { owner: Owner::Argument(owner), start, end: start.wrapping_add(self.numel() * values.item_size()) }
    }
}

/// Strides (in elements) that only a C-contiguous array has, ignoring dims of size 1.
fn is_c_contiguous(shape: &[usize], strides: &[i64]) -> bool {
    let mut expected = 1i64;
    for (&dim, &stride) in shape.iter().zip(strides).rev() {
        if dim != 1 && stride != expected {
            return false;
        }
        expected *= dim as i64;
    }
    true
}

fn layout_error(what: &str, shape: &[usize]) -> Error {
    Error::BadOutput(format!(
        "expected {what} to be C-contiguous on the GPU, got a strided array of shape {}; make it contiguous \
         first (e.g. .contiguous() or cupy.ascontiguousarray)",
        shape_str(shape)
    ))
}

/// Reads a GPU array through DLPack or the CUDA array interface, ordering `stream` after the
/// producer's pending work on it.
pub(crate) fn import(value: &Bound<'_, PyAny>, what: &str, stream: Stream) -> PyResult<GpuArray> {
    if let Some(torch) = TorchHooks::get(value.py()) {
        if value.is_instance(torch.tensor.bind(value.py()))? {
            return torch.import(value, what, stream);
        }
    }
    let dlpack_device = value.call_method0("__dlpack_device__").and_then(|d| d.extract::<(i32, i32)>()).ok();
    match dlpack_device {
        Some((KDL_CUDA, _)) => import_dlpack(value, what, stream),
        _ if value.hasattr("__cuda_array_interface__")? => import_interface(value, what, stream),
        Some((device_type, _)) => Err(not_on_the_gpu(what, device_type).into()),
        None => Err(Error::NotAnArray { what: what.into(), got: type_name(value) }.into()),
    }
}

fn not_on_the_gpu(what: &str, device_type: i32) -> Error {
    Error::InvalidArgument(format!(
        "expected {what} in CUDA memory (DLPack device type {KDL_CUDA}), got DLPack device type {device_type}"
    ))
}

/// PyTorch's own C functions for what `Tensor.__dlpack__` does in Python, which costs some 15 µs
/// a call (more than a small batch norm's kernels take): a tensor's capsule, without a stream
/// handshake, and the raw handle of a device's current stream, to order our stream after it.
/// Looked up once PyTorch has been imported (by someone else: we never import it).
struct TorchHooks {
    tensor: Py<pyo3::types::PyType>,
    to_dlpack: Py<PyAny>,
    current_stream: Py<PyAny>,
}

impl TorchHooks {
    fn get(py: Python<'_>) -> Option<&'static TorchHooks> {
        static HOOKS: pyo3::sync::PyOnceLock<Option<TorchHooks>> = pyo3::sync::PyOnceLock::new();
        if let Some(hooks) = HOOKS.get(py) {
            return hooks.as_ref();
        }
        let modules = py.import("sys").and_then(|sys| sys.getattr("modules")).ok()?;
        let torch = modules.get_item("torch").ok()?;
        let hooks = || -> PyResult<TorchHooks> {
            let c = torch.getattr("_C")?;
            Ok(TorchHooks {
                tensor: torch.getattr("Tensor")?.cast_into()?.unbind(),
                to_dlpack: c.getattr("_to_dlpack")?.unbind(),
                current_stream: c.getattr("_cuda_getCurrentRawStream")?.unbind(),
            })
        };
        // A PyTorch without these (none we know of) keeps the generic path.
        HOOKS.get_or_init(py, || hooks().ok()).as_ref()
    }

    fn import(&self, tensor: &Bound<'_, PyAny>, what: &str, stream: Stream) -> PyResult<GpuArray> {
        let py = tensor.py();
        let capsule = self.to_dlpack.bind(py).call1((tensor,))?;
        let array = read_capsule(capsule, what)?;
        if array.device_type != KDL_CUDA {
            return Err(not_on_the_gpu(what, array.device_type).into());
        }
        let mut array = array.array;
        let device = u32::try_from(array.device).map_err(|_| Error::Cuda(format!("device {}", array.device)))?;
        let producer = self.current_stream(py, device)?;
        if array.numel() > 0 && !same_stream(producer, stream) {
            Event::record(&cuda::device(array.device)?, producer)?.order_before(stream)?;
        }
        array.producer = Some(producer);
        Ok(array)
    }

    fn current_stream(&self, py: Python<'_>, device: u32) -> PyResult<Stream> {
        let handle: u64 = self.current_stream.bind(py).call1((device,))?.extract()?;
        // SAFETY: PyTorch's current stream on a device is a live stream there.
        Ok(unsafe { Stream::from_raw(handle) })
    }
}

fn dtype_of(code: u8, bits: u8, lanes: u16) -> std::result::Result<Values, String> {
    match (code, bits, lanes) {
        (KDL_FLOAT, 32, 1) => Ok(Values::Float(Dtype::F32)),
        (KDL_FLOAT, 64, 1) => Ok(Values::Float(Dtype::F64)),
        (KDL_FLOAT, 16, 1) => Ok(Values::Half(Half::F16)),
        (KDL_BFLOAT, 16, 1) => Ok(Values::Half(Half::BF16)),
        (KDL_FLOAT, bits, 1) => Err(format!("float{bits}")),
        (KDL_BFLOAT, bits, 1) => Err(format!("bfloat{bits}")),
        (0, bits, 1) => Err(format!("int{bits}")),
        (1, bits, 1) => Err(format!("uint{bits}")),
        (code, bits, lanes) => Err(format!("DLPack type (code {code}, {bits} bits, {lanes} lanes)")),
    }
}

fn import_dlpack(value: &Bound<'_, PyAny>, what: &str, stream: Stream) -> PyResult<GpuArray> {
    let kwargs = PyDict::new(value.py());
    kwargs.set_item("stream", protocol_stream(stream))?;
    let capsule = value.call_method("__dlpack__", (), Some(&kwargs))?;
    Ok(read_capsule(capsule, what)?.array)
}

/// What a DLPack capsule holds, with the DLPack device type it is in.
struct Capsule {
    array: GpuArray,
    device_type: i32,
}

/// The array a DLPack capsule (named "dltensor") describes; the capsule becomes its owner.
fn read_capsule(capsule: Bound<'_, PyAny>, what: &str) -> PyResult<Capsule> {
    let py = capsule.py();
    // SAFETY: a capsule named "dltensor" holds a DLManagedTensor (DLPack's contract), alive until
    // the capsule's destructor runs, which `owner` below postpones.
    let managed = unsafe { ffi::PyCapsule_GetPointer(capsule.as_ptr(), DLTENSOR.as_ptr()) } as *const DLManagedTensor;
    if managed.is_null() {
        return Err(PyErr::take(py).unwrap_or_else(|| {
            PyTypeError::new_err(format!("{what}.__dlpack__() did not return a capsule named 'dltensor'"))
        }));
    }
    // SAFETY: as above.
    let tensor = unsafe { &(*managed).dl_tensor };
    let ndim = usize::try_from(tensor.ndim).unwrap_or(0);
    // SAFETY: DLPack guarantees `ndim` dims (and strides, when not null).
    let dims = if ndim == 0 { &[][..] } else { unsafe { std::slice::from_raw_parts(tensor.shape, ndim) } };
    let shape: Vec<usize> = dims.iter().map(|&d| d.max(0) as usize).collect();
    if !tensor.strides.is_null() && ndim > 0 {
        // SAFETY: as above.
        let strides = unsafe { std::slice::from_raw_parts(tensor.strides, ndim) };
        if !is_c_contiguous(&shape, strides) {
            return Err(layout_error(what, &shape).into());
        }
    }
    let array = GpuArray {
        ptr: tensor.data as u64 + tensor.byte_offset,
        dtype: dtype_of(tensor.dtype.code, tensor.dtype.bits, tensor.dtype.lanes),
        device: tensor.device.device_id.max(0) as usize,
        readonly: false,
        producer: None,
        shape,
        owner: capsule.unbind(),
    };
    Ok(Capsule { array, device_type: tensor.device.device_type })
}

fn import_interface(value: &Bound<'_, PyAny>, what: &str, stream: Stream) -> PyResult<GpuArray> {
    let interface = value.getattr("__cuda_array_interface__")?;
    let interface = interface
        .cast::<PyDict>()
        .map_err(|_| PyTypeError::new_err(format!("{what}.__cuda_array_interface__ is not a dict")))?;
    let field = |key: &str| -> PyResult<Bound<'_, PyAny>> {
        interface
            .get_item(key)?
            .ok_or_else(|| PyTypeError::new_err(format!("{what}.__cuda_array_interface__ has no {key:?}")))
    };
    let shape: Vec<usize> = field("shape")?.extract()?;
    let typestr: String = field("typestr")?.extract()?;
    let (ptr, readonly): (u64, bool) = field("data")?.extract()?;
    let strides: Option<Vec<i64>> = interface.get_item("strides")?.map(|s| s.extract()).transpose()?.flatten();
    let dtype = match typestr.as_str() {
        "<f4" => Ok(Values::Float(Dtype::F32)),
        "<f8" => Ok(Values::Float(Dtype::F64)),
        "<f2" => Ok(Values::Half(Half::F16)),
        other => Err(other.to_string()),
    };
    if let (Some(strides), Ok(dtype)) = (&strides, &dtype) {
        let item = dtype.item_size() as i64;
        let elements: Vec<i64> = strides.iter().map(|s| if s % item == 0 { s / item } else { i64::MIN }).collect();
        if !is_c_contiguous(&shape, &elements) {
            return Err(layout_error(what, &shape).into());
        }
    }
    let numel: usize = shape.iter().product();
    let device = if numel > 0 { cuda::device_of_pointer(ptr)? } else { 0 };
    // The producer's stream, when it names one, must finish its work on the array first.
    let producer = match interface.get_item("stream")?.filter(|s| !s.is_none()) {
        Some(producer) => parse_stream(Some(&producer))?,
        None => None,
    };
    if let Some(producer) = producer.filter(|&producer| !same_stream(producer, stream) && numel > 0) {
        Event::record(&cuda::device(device)?, producer)?.order_before(stream)?;
    }
    Ok(GpuArray { ptr, shape, dtype, device, readonly, producer, owner: value.clone().unbind() })
}

/// DeviceArray: a C-contiguous float32 or float64 array in GPU memory, as batchnorm returns
/// results on the GPU. It implements DLPack (`__dlpack__`, `__dlpack_device__`) and
/// `__cuda_array_interface__`, so `cupy.from_dlpack(a)` or `torch.from_dlpack(a)` take it
/// without a copy; `numpy()` copies it to the host.
#[pyclass(name = "DeviceArray", module = "batchnorm", frozen)]
pub struct DeviceArray {
    ptr: u64,
    shape: Vec<usize>,
    dtype: Values,
    device: Arc<Device>,
    /// The stream whose work writes the array; consumers are ordered after it.
    stream: Stream,
    /// What keeps the memory alive: the array's own buffer, or the module buffer it views.
    storage: Storage,
}

/// A DeviceArray's memory.
enum Storage {
    /// Its own buffer, which knows when its writers finish (see `DeviceBuffer::written_by`).
    Own(Box<dyn WrittenBy>),
    /// Memory something else owns, kept alive by holding it.
    Borrowed { _owner: Box<dyn std::any::Any + Send + Sync> },
}

trait WrittenBy: Send + Sync {
    fn written_by(&self, event: Arc<Event>);
}

impl<T: bytemuck::Pod + Send + Sync> WrittenBy for DeviceBuffer<T> {
    fn written_by(&self, event: Arc<Event>) {
        DeviceBuffer::written_by(self, event)
    }
}

impl DeviceArray {
    /// A fresh array of `shape` for results written on `stream`.
    pub(crate) fn empty(device: &Arc<Device>, shape: &[usize], dtype: Values, stream: Stream) -> Result<DeviceArray> {
        fn own<T: bytemuck::Pod + Send + Sync>(
            device: &Arc<Device>,
            len: usize,
            stream: Stream,
        ) -> Result<(u64, Storage)> {
            let buffer = DeviceBuffer::<T>::for_output(device, len, stream)?;
            Ok((buffer.ptr(), Storage::Own(Box::new(buffer))))
        }
        let len = shape.iter().product();
        let (ptr, storage) = match dtype {
            Values::Float(Dtype::F32) => own::<f32>(device, len, stream)?,
            Values::Float(Dtype::F64) => own::<f64>(device, len, stream)?,
            Values::Half(_) => own::<u16>(device, len, stream)?,
        };
        Ok(DeviceArray { ptr, shape: shape.to_vec(), dtype, device: device.clone(), stream, storage })
    }

    /// Records that the work up to `event` writes this array, for its own buffer's free.
    pub(crate) fn written_by(&self, event: Arc<Event>) {
        if let Storage::Own(buffer) = &self.storage {
            buffer.written_by(event);
        }
    }

    /// An array over memory `owner` keeps alive (a module's parameter buffer).
    pub(crate) fn borrowed(
        owner: Box<dyn std::any::Any + Send + Sync>,
        ptr: u64,
        shape: &[usize],
        dtype: Values,
        device: &Arc<Device>,
        stream: Stream,
    ) -> DeviceArray {
        DeviceArray {
            ptr,
            shape: shape.to_vec(),
            dtype,
            device: device.clone(),
            stream,
            storage: Storage::Borrowed { _owner: owner },
        }
    }

    pub(crate) fn ptr(&self) -> u64 {
        self.ptr
    }

    /// Blocks until the work writing the array has finished.
    fn wait(&self) -> Result<()> {
        Event::record(&self.device, self.stream)?.wait()
    }
}

/// The block a DLPack capsule of ours points to; `managed` first, so a pointer to it is one to
/// the whole.
#[repr(C)]
struct Export {
    managed: DLManagedTensor,
    shape: Vec<i64>,
    _array: Py<DeviceArray>,
}

unsafe extern "C" fn delete_export(managed: *mut DLManagedTensor) {
    // SAFETY: `managed` is the first field of an `Export` boxed in `__dlpack__`; called once.
    drop(unsafe { Box::from_raw(managed as *mut Export) });
}

/// A capsule still named "dltensor" was never consumed: its tensor is ours to release.
unsafe extern "C" fn destroy_capsule(capsule: *mut ffi::PyObject) {
    // SAFETY: called by Python with the capsule; IsValid sets no error.
    unsafe {
        if ffi::PyCapsule_IsValid(capsule, DLTENSOR.as_ptr()) == 1 {
            let managed = ffi::PyCapsule_GetPointer(capsule, DLTENSOR.as_ptr()) as *mut DLManagedTensor;
            if let Some(deleter) = (*managed).deleter {
                deleter(managed);
            }
        }
    }
}

#[pymethods]
impl DeviceArray {
    #[getter]
    fn shape<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(py, &self.shape)
    }
    #[getter]
    fn dtype<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArrayDescr>> {
        self.dtype.descr(py)
    }
    /// "cuda:N".
    #[getter]
    fn device(&self) -> String {
        format!("cuda:{}", self.device.ordinal())
    }
    #[getter]
    fn ndim(&self) -> usize {
        self.shape.len()
    }
    #[getter]
    fn size(&self) -> usize {
        self.shape.iter().product()
    }

    /// numpy(): a copy on the host, once the work writing the array has finished.
    fn numpy<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        py.detach(|| self.wait())?;
        let count = self.size();
        // SAFETY: the array holds `count` values of its dtype on its device.
        let flat = match self.dtype {
            Values::Float(Dtype::F32) => {
                numpy::PyArray1::from_vec(py, unsafe { cuda::copy_to_host::<f32>(&self.device, self.ptr, count)? })
                    .into_any()
            }
            Values::Float(Dtype::F64) => {
                numpy::PyArray1::from_vec(py, unsafe { cuda::copy_to_host::<f64>(&self.device, self.ptr, count)? })
                    .into_any()
            }
            // The bits, viewed as the half dtype.
            Values::Half(_) => {
                let bits = unsafe { cuda::copy_to_host::<u16>(&self.device, self.ptr, count)? };
                numpy::PyArray1::from_vec(py, bits).call_method1("view", (self.dtype.descr(py)?,))?
            }
        };
        flat.call_method1("reshape", (self.shape.clone(),))
    }

    /// NumPy's conversion hook: np.asarray(a) copies to the host.
    #[pyo3(signature = (dtype=None, copy=None))]
    fn __array__<'py>(
        &self,
        py: Python<'py>,
        dtype: Option<&Bound<'py, PyAny>>,
        copy: Option<bool>,
    ) -> PyResult<Bound<'py, PyAny>> {
        if copy == Some(false) {
            return Err(pyo3::exceptions::PyValueError::new_err(
                "a DeviceArray lives in GPU memory: NumPy can only have a copy of it",
            ));
        }
        let host = self.numpy(py)?;
        match dtype.filter(|d| !d.is_none()) {
            Some(dtype) => host.call_method1("astype", (dtype,)),
            None => Ok(host),
        }
    }

    fn __dlpack_device__(&self) -> (i32, i32) {
        (KDL_CUDA, self.device.ordinal() as i32)
    }

    /// __dlpack__(*, stream=None, max_version=None, dl_device=None, copy=None): a capsule of this
    /// array, shared (no copy). The consumer's `stream` is ordered after the work writing it.
    #[pyo3(signature = (*, stream=None, max_version=None, dl_device=None, copy=None))]
    fn __dlpack__<'py>(
        slf: &Bound<'py, Self>,
        stream: Option<&Bound<'py, PyAny>>,
        max_version: Option<&Bound<'py, PyAny>>,
        dl_device: Option<(i32, i32)>,
        copy: Option<bool>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let _ = max_version; // an unversioned capsule is what every consumer accepts
        let this = slf.get();
        if let Some(target) = dl_device.filter(|&d| d != this.__dlpack_device__()) {
            return Err(PyBufferError::new_err(format!(
                "this array is on DLPack device {:?}; it cannot be exported to device {target:?}",
                this.__dlpack_device__()
            )));
        }
        if copy == Some(true) {
            return Err(PyBufferError::new_err("__dlpack__(copy=True) is not supported: the export is shared"));
        }
        match stream.filter(|s| !s.is_none()).map(|s| s.extract::<i64>()).transpose()? {
            Some(-1) => {}
            Some(0) => {
                return Err(pyo3::exceptions::PyValueError::new_err(
                    "stream=0 is ambiguous for CUDA in DLPack; use 1 (legacy default) or 2 (per-thread default)",
                ))
            }
            Some(negative) if negative < 0 => {
                return Err(pyo3::exceptions::PyValueError::new_err(format!(
                    "__dlpack__ takes stream=-1 (no synchronization), None, or a stream handle; got stream={negative}"
                )))
            }
            consumer => {
                // None: the consumer works on the legacy default stream.
                // SAFETY: the consumer vouches for its stream.
                let consumer = unsafe { Stream::from_raw(consumer.unwrap_or(1) as u64) };
                if !same_stream(consumer, this.stream) {
                    Event::record(&this.device, this.stream)?.order_before(consumer)?;
                }
            }
        }
        let shape: Vec<i64> = this.shape.iter().map(|&d| d as i64).collect();
        let mut export = Box::new(Export {
            managed: DLManagedTensor {
                dl_tensor: DLTensor {
                    data: this.ptr as *mut c_void,
                    device: DLDevice { device_type: KDL_CUDA, device_id: this.device.ordinal() as i32 },
                    ndim: shape.len() as i32,
                    dtype: this.dtype.dlpack(),
                    shape: std::ptr::null_mut(),
                    strides: std::ptr::null_mut(),
                    byte_offset: 0,
                },
                manager_ctx: std::ptr::null_mut(),
                deleter: Some(delete_export),
            },
            shape,
            _array: slf.clone().unbind(),
        });
        export.managed.dl_tensor.shape = export.shape.as_mut_ptr();
        let raw = Box::into_raw(export);
        // SAFETY: `raw` stays valid until the deleter runs, by the consumer or by
        // `destroy_capsule`; PyCapsule_New copies nothing but the pointers.
        unsafe {
            let capsule = ffi::PyCapsule_New(raw.cast(), DLTENSOR.as_ptr(), Some(destroy_capsule));
            if capsule.is_null() {
                drop(Box::from_raw(raw));
                return Err(PyErr::fetch(slf.py()));
            }
            Ok(Bound::from_owned_ptr(slf.py(), capsule))
        }
    }

    /// The CUDA array interface (version 3), for Numba and older CuPy.
    #[getter]
    fn __cuda_array_interface__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let interface = PyDict::new(py);
        interface.set_item("shape", PyTuple::new(py, &self.shape)?)?;
        interface.set_item("typestr", self.dtype.typestr()?)?;
        interface.set_item("data", (self.ptr, false))?;
        interface.set_item("strides", py.None())?;
        interface.set_item("version", 3)?;
        interface.set_item("stream", protocol_stream(self.stream))?;
        Ok(interface)
    }

    fn __len__(&self) -> PyResult<usize> {
        self.shape.first().copied().ok_or_else(|| PyTypeError::new_err("len() of a 0-d array"))
    }

    fn __repr__(&self) -> String {
        format!(
            "DeviceArray(shape={}, dtype={}, device='cuda:{}')",
            shape_str(&self.shape),
            self.dtype.name(),
            self.device.ordinal()
        )
    }
}

/// `values` (a NumPy array of the module's dtype) copied to a fresh device array.
pub(crate) fn upload<'py, T: super::Float>(
    py: Python<'py>,
    device: &Arc<Device>,
    values: &Bound<'py, PyArrayDyn<T>>,
    dtype: Dtype,
) -> PyResult<Bound<'py, DeviceArray>> {
    let contiguous = py.import("numpy")?.call_method1("ascontiguousarray", (values,))?.cast_into::<PyArrayDyn<T>>()?;
    let shape = contiguous.shape().to_vec();
    let host: Vec<T> = contiguous.readonly().as_slice().map_err(|e| Error::BadOutput(e.to_string()))?.to_vec();
    let buffer = DeviceBuffer::from_host(device, &host)?;
    let array = DeviceArray {
        ptr: buffer.ptr(),
        shape,
        dtype: Values::Float(dtype),
        device: device.clone(),
        stream: Stream::DEFAULT,
        storage: Storage::Own(Box::new(buffer)),
    };
    Bound::new(py, array)
}

/// A DeviceArray over one of a GPU module's (C,) arrays. It holds that array's device buffer, not
/// the module, so it stays valid after the module moves, and frees it when it goes.
pub(crate) fn view<'py, T: Float>(
    owner: &Bound<'py, PyBatchNorm>,
    module: &BatchNorm<T>,
    which: Buffer,
    dtype: Dtype,
) -> Option<Bound<'py, PyAny>> {
    let buffer = module.device_buffer(which)?;
    let (ptr, device) = (buffer.ptr(), buffer.device().clone());
    let channels = module.config().num_features;
    // Ready in the order of the stream the module's last work went to: a consumer is ordered
    // after that work (through __dlpack__'s stream or the interface's).
    let array =
        DeviceArray::borrowed(Box::new(buffer), ptr, &[channels], Values::Float(dtype), &device, module.last_stream());
    Bound::new(owner.py(), array).ok().map(Bound::into_any)
}

/// The device of a module on a GPU.
fn module_device(module: &PyBatchNorm, py: Python<'_>) -> Result<Arc<Device>> {
    let state = module.state(py);
    let device = with_module!(&state.module, m: _T => m.device().cloned());
    device.ok_or_else(|| Error::Cuda("the module is not on a GPU".into()))
}

/// `value` itself, or a host copy of it when it is a GPU array (to assign a parameter from one).
pub(crate) fn host_array<'py>(value: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
    if !is_gpu_array(value) {
        return Ok(value.clone());
    }
    let array = import(value, "value", Stream::DEFAULT)?;
    let device = cuda::device(array.device)?;
    let py = value.py();
    let count = array.numel();
    py.detach(|| Event::record(&device, Stream::DEFAULT)?.wait())?;
    // SAFETY: the array holds `count` values of its dtype on `device`.
    let flat = match array.dtype {
        Ok(Values::Float(Dtype::F32)) => {
            numpy::PyArray1::from_vec(py, unsafe { cuda::copy_to_host::<f32>(&device, array.ptr, count)? }).into_any()
        }
        Ok(Values::Float(Dtype::F64)) => {
            numpy::PyArray1::from_vec(py, unsafe { cuda::copy_to_host::<f64>(&device, array.ptr, count)? }).into_any()
        }
        Ok(Values::Half(half)) => {
            let got = half.name().into();
            return Err(Error::DType { what: "value".into(), expected: "float32 or float64".into(), got }.into());
        }
        Err(got) => {
            return Err(Error::DType { what: "value".into(), expected: "float32 or float64".into(), got }.into())
        }
    };
    flat.call_method1("reshape", (array.shape.clone(),))
}

/// Where a GPU result goes: a fresh DeviceArray, or the caller's `out=` after checking it; with
/// the result's address and its producer's stream (see `GpuArray::producer`).
fn gpu_output<'py>(
    py: Python<'py>,
    out: Option<&Bound<'py, PyAny>>,
    device: &Arc<Device>,
    dtype: Values,
    shape: &[usize],
    inputs: &[(&'static str, &GpuArray)],
    stream: Stream,
) -> PyResult<(Bound<'py, PyAny>, u64, Option<Stream>)> {
    let Some(out) = out.filter(|o| !o.is_none()) else {
        let array = DeviceArray::empty(device, shape, dtype, stream)?;
        let ptr = array.ptr();
        return Ok((Bound::new(py, array)?.into_any(), ptr, None));
    };
    let target = import(out, "out", stream)?;
    target.check("out", dtype, device.ordinal())?;
    if target.shape != shape {
        return Err(
            Error::ShapeMismatch { what: "out".into(), expected: shape.to_vec(), got: target.shape.clone() }.into()
        );
    }
    if target.readonly {
        return Err(Error::BadOutput("out must be writeable, got a read-only array".into()).into());
    }
    let others: Vec<Span> = inputs.iter().map(|(owner, input)| input.span(owner, dtype)).collect();
    check_disjoint(&target.span("out", dtype), &others)?;
    Ok((out.clone(), target.ptr, target.producer))
}

/// A NumPy call on a GPU module: the array goes to the device and the result comes back (a
/// convenience, not the fast path), into `out=` when given.
fn through_device<'py, T: Float>(
    py: Python<'py>,
    device: &Arc<Device>,
    dtype: Dtype,
    value: &Bound<'py, PyAny>,
    what: &str,
    out: Option<&Bound<'py, PyAny>>,
    run: impl FnOnce(&Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    let host = typed_array::<T>(value, what)?;
    let layout = out_layout(host.as_untyped()).ok().filter(|_| host.ndim() >= 4).unwrap_or_default();
    let (target, _) = output::<T>(py, out, host.shape(), layout, &[array_span("the input", host.as_untyped())])?;
    let staged = upload(py, device, &host, dtype)?;
    let result = run(staged.as_any())?.call_method0("numpy")?;
    py.import("numpy")?.call_method1("copyto", (&target, result))?;
    Ok(target.into_any())
}

/// The arrays a GPU call reads and writes, kept until its kernels have finished: a DLPack
/// producer may free an array's memory as soon as its capsule is released, and the call returns
/// (releasing it) while its kernels may still run on `stream`.
pub(crate) struct InFlight {
    done: Arc<Event>,
    _arrays: Vec<Py<PyAny>>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        // Nobody to report a fault to; the arrays must not go before the kernels either way.
        let _ = self.done.wait();
    }
}

/// After a GPU call that ended with `done` wrote `output` and read `inputs`: a fresh DeviceArray's
/// own buffer is freed only after that work (its drop orders the free after `done`), and every
/// other array stays alive until the work is done. Earlier calls' arrays whose work has finished
/// are let go.
/// Producers' streams other than `stream` wait for the call's work, so they neither read an output
/// early nor overwrite an input still being read.
fn after_call(
    state: &mut super::State,
    done: Option<Arc<Event>>,
    stream: Stream,
    producers: &[Option<Stream>],
    output: &Bound<'_, PyAny>,
    inputs: Vec<Py<PyAny>>,
) -> Result<()> {
    // A finished forward or backward always leaves its event; without one there is nothing to wait for.
    let Some(done) = done else { return Ok(()) };
    let mut others: Vec<Stream> = Vec::new();
    for &producer in producers.iter().flatten() {
        if !same_stream(producer, stream) && !others.iter().any(|&o| same_stream(o, producer)) {
            done.order_before(producer)?;
            others.push(producer);
        }
    }
    let mut arrays = inputs;
    match output.cast::<DeviceArray>() {
        Ok(array) => array.get().written_by(done.clone()),
        Err(_) => arrays.push(output.clone().unbind()),
    }
    state.in_flight.retain(|call| !call.done.is_done().unwrap_or(true));
    state.in_flight.push(InFlight { done, _arrays: arrays });
    Ok(())
}

/// The forward of a module on a GPU, on `stream` (or the `default_stream`).
pub(crate) fn forward<'py, T: Float>(
    module: &Bound<'py, PyBatchNorm>,
    input: &Bound<'py, PyAny>,
    out: Option<&Bound<'py, PyAny>>,
    stream: Option<Stream>,
) -> PyResult<Bound<'py, PyAny>> {
    let py = module.py();
    let this = module.get();
    let device = module_device(this, py)?;
    if input.cast::<numpy::PyUntypedArray>().is_ok() {
        let stream = stream.unwrap_or(Stream::DEFAULT);
        return through_device::<T>(py, &device, this.dtype, input, "input", out, |staged| {
            forward::<T>(module, staged, None, Some(stream))
        });
    }
    let stream = match stream {
        Some(stream) => stream,
        None => default_stream(input)?,
    };
    let x = import(input, "input", stream)?;
    let values = x.expected_with(this.dtype);
    x.check("input", values, device.ordinal())?;
    let (y, y_ptr, y_producer) = gpu_output(py, out, &device, values, &x.shape, &[("the input", &x)], stream)?;
    let y_array =
        GpuArray { ptr: y_ptr, readonly: false, producer: None, owner: y.clone().unbind(), ..x.clone_ref(py) };
    let mut state = this.state(py);
    let module = state.module.typed::<T>()?;
    let ranks = module.kind().ranks();
    // SAFETY: both arrays were checked to be C-contiguous, of one shape, on the module's device;
    // both stay alive until the kernels are done (`after_call`).
    unsafe { module.forward_on_device(x.tensor(ranks)?, y_array.tensor(ranks)?, stream)? };
    let done = module.last_event();
    after_call(&mut state, done, stream, &[x.producer, y_producer], &y, vec![x.owner.clone_ref(py)])?;
    state.saved = Some(Saved::Gpu(x));
    Ok(y)
}

/// The backward of a module on a GPU, on `stream` (or the `default_stream`).
pub(crate) fn backward<'py, T: Float>(
    module: &Bound<'py, PyBatchNorm>,
    grad_output: &Bound<'py, PyAny>,
    out: Option<&Bound<'py, PyAny>>,
    stream: Option<Stream>,
) -> PyResult<Bound<'py, PyAny>> {
    let py = module.py();
    let this = module.get();
    let device = module_device(this, py)?;
    let x = match &this.state(py).saved {
        Some(Saved::Gpu(x)) => x.clone_ref(py),
        _ => return Err(Error::NoForward.into()),
    };
    if grad_output.cast::<numpy::PyUntypedArray>().is_ok() {
        let stream = stream.unwrap_or(Stream::DEFAULT);
        return through_device::<T>(py, &device, this.dtype, grad_output, "grad_output", out, |staged| {
            backward::<T>(module, staged, None, Some(stream))
        });
    }
    let stream = match stream {
        Some(stream) => stream,
        None => default_stream(grad_output)?,
    };
    let dy = import(grad_output, "grad_output", stream)?;
    let values = x.expected_with(this.dtype);
    dy.check("grad_output", values, device.ordinal())?;
    let (dx, dx_ptr, dx_producer) =
        gpu_output(py, out, &device, values, &x.shape, &[("the input", &x), ("grad_output", &dy)], stream)?;
    let dx_array =
        GpuArray { ptr: dx_ptr, readonly: false, producer: None, owner: dx.clone().unbind(), ..x.clone_ref(py) };
    let mut state = this.state(py);
    let module = state.module.typed::<T>()?;
    let ranks = module.kind().ranks();
    // SAFETY: as in `forward`; `x` is the last forward's input, kept alive by `saved`.
    unsafe { module.backward_on_device(x.tensor(ranks)?, dy.tensor(ranks)?, dx_array.tensor(ranks)?, stream)? };
    let done = module.last_event();
    after_call(&mut state, done, stream, &[x.producer, dy.producer, dx_producer], &dx, vec![x.owner, dy.owner])?;
    Ok(dx)
}

/// Lets the library look for NVRTC where pip's nvidia-cuda-nvrtc wheel puts it, under sys.path.
pub(crate) fn add_sys_path_roots(py: Python<'_>) -> PyResult<()> {
    let roots: Vec<std::path::PathBuf> = py.import("sys")?.getattr("path")?.extract()?;
    cuda::library::add_search_roots(roots);
    Ok(())
}

/// cuda_versions(): {"driver": "13.0", "nvrtc": "13.0"}, the newest CUDA the driver supports and
/// the NVRTC that compiles the kernels; RuntimeError when either cannot be loaded.
#[pyfunction]
pub(crate) fn cuda_versions(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    add_sys_path_roots(py)?;
    let versions = cuda::library::versions()?;
    let report = PyDict::new(py);
    report.set_item("driver", format!("{}.{}", versions.driver.0, versions.driver.1))?;
    report.set_item("nvrtc", format!("{}.{}", versions.nvrtc.0, versions.nvrtc.1))?;
    Ok(report)
}
