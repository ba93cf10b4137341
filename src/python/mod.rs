//! The Python bindings (`batchnorm._core`): converts arguments, errors and arrays, releases the
//! GIL around compute, and calls the core. No numerics live here.

use std::sync::{Mutex, MutexGuard, TryLockError};

use ndarray::ArrayView1;
use numpy::npyffi::flags::{NPY_ARRAY_ALIGNED, NPY_ARRAY_WRITEABLE};
use numpy::{
    dtype, Element as NpElement, PyArray1, PyArrayDescr, PyArrayDescrMethods, PyArrayDyn, PyArrayMethods,
    PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyMemoryError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use std::path::PathBuf;

use pyo3::types::{PyBytes, PyDict, PyFloat, PyList, PyString, PyTuple, PyType};

use crate::checks::{check_disjoint, extent, Owner, Span};
use crate::convert::Half;
use crate::error::shape_str;
use crate::functional::{self, SavedStats};
use crate::state_file::{self, FileDtype, RawTensor, TensorFile};
use crate::{
    BatchNorm, Buffer, Config, ConfigOverrides, Element, Error, Kind, Layout, Ranks, Result, Shape, StateTensor,
    StateValues, TensorMut, TensorRef,
};

/// `batchnorm.ShapeError`: a size that does not match (channels, a parameter's or buffer's length,
/// an array's shape). Both a `ValueError`, as a Python library raises it, and a `RuntimeError`, as
/// PyTorch does, so code written for either catches it.
fn shape_error(py: Python<'_>) -> PyResult<&Bound<'_, PyType>> {
    static SHAPE_ERROR: pyo3::sync::PyOnceLock<Py<PyType>> = pyo3::sync::PyOnceLock::new();
    SHAPE_ERROR
        .get_or_try_init(py, || {
            let bases = (py.get_type::<PyValueError>(), py.get_type::<PyRuntimeError>());
            let namespace = PyDict::new(py);
            namespace.set_item("__module__", "batchnorm")?;
            namespace.set_item(
                "__doc__",
                "A size or shape that does not match: a ValueError, and a RuntimeError as PyTorch raises it.",
            )?;
            let class = py.import("builtins")?.getattr("type")?.call1(("ShapeError", bases, namespace))?;
            Ok(class.cast_into::<PyType>()?.unbind())
        })
        .map(|class| class.bind(py))
}

/// The one place a core error becomes a Python exception.
impl From<Error> for PyErr {
    fn from(error: Error) -> PyErr {
        let message = error.to_string();
        match error {
            Error::Length { .. } | Error::ChannelMismatch { .. } | Error::ShapeMismatch { .. } => {
                Python::attach(|py| match shape_error(py) {
                    Ok(class) => PyErr::from_type(class.clone(), message),
                    Err(failure) => failure,
                })
            }
            Error::DType { .. } | Error::NotAnArray { .. } => PyTypeError::new_err(message),
            Error::NoForward | Error::StateDict(_) | Error::Unsupported(_) | Error::Cuda(_) => {
                PyRuntimeError::new_err(message)
            }
            // std::io::Error's conversion picks the OSError subclass (FileNotFoundError, ...).
            Error::Io { kind, .. } => std::io::Error::new(kind, message).into(),
            Error::Memory(_) => PyMemoryError::new_err(message),
            Error::InvalidArgument(_)
            | Error::Rank { .. }
            | Error::OutOfBounds { .. }
            | Error::TooFewValues { .. }
            | Error::BadOutput(_)
            | Error::Format(_) => PyValueError::new_err(message),
        }
    }
}

/// The float types a module can hold, with the numpy glue each needs.
pub(crate) trait Float: Element + NpElement {
    fn typed(module: &mut AnyModule) -> Option<&mut BatchNorm<Self>>;
    /// A half array read as a tensor of this type: float32 only (see `half_dtype`).
    fn half_view<'a>(array: &'a Bound<'_, PyUntypedArray>, half: Half, ranks: Ranks) -> Result<TensorRef<'a, Self>>;
    /// A C-contiguous GPU array of half values as a tensor of this type: float32 only.
    ///
    /// # Safety
    /// As [`crate::cuda::DeviceTensor::half`].
    #[cfg(feature = "cuda")]
    unsafe fn device_half(
        ptr: u64,
        dims: &[usize],
        ranks: Ranks,
        half: Half,
    ) -> Result<crate::cuda::DeviceTensor<Self>>;
}

impl Float for f32 {
    fn typed(module: &mut AnyModule) -> Option<&mut BatchNorm<f32>> {
        match module {
            AnyModule::F32(m) => Some(m),
            AnyModule::F64(_) => None,
        }
    }
    fn half_view<'a>(array: &'a Bound<'_, PyUntypedArray>, half: Half, ranks: Ranks) -> Result<TensorRef<'a, f32>> {
        half_view(array, half, ranks)
    }
    #[cfg(feature = "cuda")]
    unsafe fn device_half(
        ptr: u64,
        dims: &[usize],
        ranks: Ranks,
        half: Half,
    ) -> Result<crate::cuda::DeviceTensor<f32>> {
        // SAFETY: the caller's guarantee.
        unsafe { crate::cuda::DeviceTensor::half(ptr, dims, ranks, half) }
    }
}

impl Float for f64 {
    fn typed(module: &mut AnyModule) -> Option<&mut BatchNorm<f64>> {
        match module {
            AnyModule::F64(m) => Some(m),
            AnyModule::F32(_) => None,
        }
    }
    fn half_view<'a>(array: &'a Bound<'_, PyUntypedArray>, _: Half, _: Ranks) -> Result<TensorRef<'a, f64>> {
        Err(Error::DType { what: "input".into(), expected: f64::DTYPE.into(), got: dtype_name(array) })
    }
    #[cfg(feature = "cuda")]
    unsafe fn device_half(_: u64, _: &[usize], _: Ranks, half: Half) -> Result<crate::cuda::DeviceTensor<f64>> {
        Err(Error::DType { what: "input".into(), expected: f64::DTYPE.into(), got: half.name().into() })
    }
}

/// A module of either element type: the one place the binding tells the two apart.
pub(crate) enum AnyModule {
    F32(BatchNorm<f32>),
    F64(BatchNorm<f64>),
}

/// Runs `$body` with `$m` bound to the typed module and `$t` to its element type.
macro_rules! with_module {
    ($module:expr, $m:ident : $t:ident => $body:expr) => {
        match $module {
            $crate::python::AnyModule::F32($m) => {
                #[allow(dead_code)]
                type $t = f32;
                $body
            }
            $crate::python::AnyModule::F64($m) => {
                #[allow(dead_code)]
                type $t = f64;
                $body
            }
        }
    };
}

// After `with_module`, which it uses.
#[cfg(feature = "cuda")]
mod cuda;

impl AnyModule {
    fn new(kind: Kind, config: Config, dtype: Dtype) -> Result<AnyModule> {
        Ok(match dtype {
            Dtype::F32 => AnyModule::F32(BatchNorm::new(kind, config)?),
            Dtype::F64 => AnyModule::F64(BatchNorm::new(kind, config)?),
        })
    }

    /// The module of element type `T`; the bindings only ever ask for the module's own dtype.
    fn typed<T: Float>(&mut self) -> Result<&mut BatchNorm<T>> {
        T::typed(self).ok_or_else(|| Error::DType {
            what: "module".into(),
            expected: T::DTYPE.into(),
            got: "another dtype".into(),
        })
    }

    /// Copies `other`'s state into this module's own arrays (see [`BatchNorm::copy_state_from`]).
    fn copy_state_from(&mut self, other: &AnyModule) -> Result<()> {
        match (self, other) {
            (AnyModule::F32(into), AnyModule::F32(from)) => into.copy_state_from(from),
            (AnyModule::F64(into), AnyModule::F64(from)) => into.copy_state_from(from),
            (into, _) => {
                let dtype = if matches!(into, AnyModule::F32(_)) { f32::DTYPE } else { f64::DTYPE };
                Err(Error::InvalidArgument(format!(
                    "cannot load a state of another dtype into a module of dtype {dtype}"
                )))
            }
        }
    }
}

#[derive(Clone, Copy, PartialEq, Debug)]
pub(crate) enum Dtype {
    F32,
    F64,
}

/// A module's `dtype=`: anything NumPy reads as float32 or float64 ("float32", np.float64, ...).
impl<'a, 'py> FromPyObject<'a, 'py> for Dtype {
    type Error = PyErr;
    fn extract(value: Borrowed<'a, 'py, PyAny>) -> PyResult<Dtype> {
        let py = value.py();
        let unsupported =
            |got: String| Error::DType { what: "module".into(), expected: "float32 or float64".into(), got };
        let descr = PyArrayDescr::new(py, &*value).map_err(|_| unsupported(describe(&value)))?;
        let name: String = descr.getattr("name")?.extract()?;
        if descr.is_equiv_to(&dtype::<f32>(py)) {
            Ok(Dtype::F32)
        } else if descr.is_equiv_to(&dtype::<f64>(py)) {
            Ok(Dtype::F64)
        } else if matches!(name.as_str(), "float16" | "bfloat16") {
            // Refused with the way out: half inputs run on float32 modules, as PyTorch's mixed precision.
            let expected = format!(
                "float32 or float64 (a module's state cannot be {name}; a float32 module takes {name} inputs, \
                 with float32 statistics and parameters, as PyTorch's mixed precision does)"
            );
            Err(Error::DType { what: "module".into(), expected, got: name }.into())
        } else {
            Err(unsupported(name).into())
        }
    }
}

impl Dtype {
    fn of_array(array: &Bound<'_, PyUntypedArray>) -> PyResult<Dtype> {
        let py = array.py();
        let descr = array.dtype();
        if descr.is_equiv_to(&dtype::<f32>(py)) {
            Ok(Dtype::F32)
        } else if descr.is_equiv_to(&dtype::<f64>(py)) {
            Ok(Dtype::F64)
        } else {
            Err(Error::DType { what: "input".into(), expected: "float32 or float64".into(), got: dtype_name(array) }
                .into())
        }
    }
}

/// A count from Python (any object with `__index__`: int, bool, NumPy integers) from 1 to `max`.
/// Out of range is a ValueError that says so, whatever the int's size.
fn count_argument(value: &Bound<'_, PyAny>, what: &str, max: u64) -> PyResult<usize> {
    let index = value
        .call_method0("__index__")
        .map_err(|_| PyTypeError::new_err(format!("{what} must be an int, got {}", type_name(value))))?;
    if let Some(count) = index.extract::<u64>().ok().filter(|c| (1..=max).contains(c)) {
        if let Ok(count) = usize::try_from(count) {
            return Ok(count);
        }
    }
    let rule =
        if index.lt(1)? { "must be a positive integer".to_string() } else { format!("is too large: at most {max}") };
    Err(Error::InvalidArgument(format!("{what} {rule}, got {}", describe(&index))).into())
}

fn describe(value: &Bound<'_, PyAny>) -> String {
    value.repr().map_or_else(|_| "<unprintable>".to_string(), |r| r.to_string())
}

pub(crate) fn type_name(value: &Bound<'_, PyAny>) -> String {
    value.get_type().name().map_or_else(|_| "<unknown type>".to_string(), |n| n.to_string())
}

fn dtype_name(array: &Bound<'_, PyUntypedArray>) -> String {
    array.dtype().str().map_or_else(|_| "<unknown>".to_string(), |s| s.to_string())
}

/// `value` as an ndarray of element type `T`, or an error naming `what` was wrong with it.
fn typed_array<'py, T: Float>(value: &Bound<'py, PyAny>, what: &str) -> Result<Bound<'py, PyArrayDyn<T>>> {
    let untyped = value
        .cast::<PyUntypedArray>()
        .map_err(|_| Error::NotAnArray { what: what.to_string(), got: type_name(value) })?;
    let dtype_error =
        || Error::DType { what: what.to_string(), expected: T::DTYPE.to_string(), got: dtype_name(untyped) };
    if !untyped.dtype().is_equiv_to(&dtype::<T>(value.py())) {
        return Err(dtype_error());
    }
    value.cast::<PyArrayDyn<T>>().cloned().map_err(|_| dtype_error())
}

/// Arrays the kernels can read in place: aligned, with strides a multiple of the item size.
/// Anything else (rare: views into packed records or raw buffers) is copied once.
fn readable<'py, T: Float>(array: Bound<'py, PyArrayDyn<T>>) -> PyResult<Bound<'py, PyArrayDyn<T>>> {
    let aligned = flags(array.as_untyped()) & NPY_ARRAY_ALIGNED != 0;
    let item = std::mem::size_of::<T>() as isize;
    if aligned && array.strides().iter().all(|s| s % item == 0) {
        return Ok(array);
    }
    Ok(array.call_method0("copy")?.cast_into::<PyArrayDyn<T>>()?)
}

fn flags(array: &Bound<'_, PyUntypedArray>) -> i32 {
    // SAFETY: reading a field of a live array object.
    unsafe { (*array.as_array_ptr()).flags }
}

fn is_writeable(array: &Bound<'_, PyUntypedArray>) -> bool {
    flags(array) & NPY_ARRAY_WRITEABLE != 0
}

/// The bytes a NumPy array occupies.
fn array_span(what: &'static str, array: &Bound<'_, PyUntypedArray>) -> Span {
    // SAFETY: reading a field of a live array object.
    let base = unsafe { (*array.as_array_ptr()).data } as usize;
    Span::strided(Owner::Argument(what), base, array.shape(), array.strides(), array.dtype().itemsize())
}

/// The memory of each of the call's arguments that is a NumPy array.
fn spans_of(arguments: &[(&'static str, Option<&Bound<'_, PyAny>>)]) -> Vec<Span> {
    let arrays =
        arguments.iter().filter_map(|(what, value)| Some((what, value.as_ref()?.cast::<PyUntypedArray>().ok()?)));
    arrays.map(|(&what, array)| array_span(what, array)).collect()
}

/// The memory of every array a module holds: no array a call writes may overlap it.
fn module_spans(module: &AnyModule) -> Vec<Span> {
    with_module!(module, m: _T => m.host_spans().collect())
}

/// `array` itself, or a copy of it when it shares memory with any of `spans` (memory the call
/// writes): the kernels then never read what they write.
fn detached<'py, T: Float>(array: Bound<'py, PyArrayDyn<T>>, spans: &[Span]) -> PyResult<Bound<'py, PyArrayDyn<T>>> {
    let span = array_span("", array.as_untyped());
    if !spans.iter().any(|s| s.overlaps(&span)) {
        return Ok(array);
    }
    Ok(array.call_method0("copy")?.cast_into::<PyArrayDyn<T>>()?)
}

/// The array's strides in elements (`readable` has checked they are whole elements).
fn element_strides<T: Float>(array: &Bound<'_, PyArrayDyn<T>>) -> Vec<isize> {
    let item = std::mem::size_of::<T>() as isize;
    array.strides().iter().map(|s| s / item).collect()
}

/// `array` as it is, or a C-contiguous copy of it where `view_of` cannot view it in place (a 5D
/// array whose spatial strides do not nest).
fn viewable<'py, T: Float>(
    array: Bound<'py, PyArrayDyn<T>>,
    what: &'static str,
    ranks: Ranks,
) -> PyResult<Bound<'py, PyArrayDyn<T>>> {
    if Shape::view_of(array.shape(), &element_strides(&array), ranks, what)?.is_some() {
        return Ok(array);
    }
    let numpy = array.py().import("numpy")?;
    Ok(numpy.call_method1("ascontiguousarray", (&array,))?.cast_into::<PyArrayDyn<T>>()?)
}

/// The view of an array that `viewable` returned, its dims read as `ranks` says (see
/// `Shape::view_of`), borrowed for as long as the array is.
fn view_of<'a, T: Float>(array: &'a Bound<'_, PyArrayDyn<T>>, ranks: Ranks) -> Result<TensorRef<'a, T>> {
    let strides = element_strides(array);
    if array.is_empty() {
        return TensorRef::new(&[], 0, array.shape(), &strides, ranks);
    }
    let (low, high) = extent(array.shape(), &strides);
    // SAFETY: `readable` guaranteed alignment and whole-element strides, so every element of the
    // array lies in [data + low, data + high]; the slice lives no longer than `array`'s borrow.
    let data = unsafe { std::slice::from_raw_parts(array.data().offset(low), (high - low + 1) as usize) };
    TensorRef::new(data, (-low) as usize, array.shape(), &strides, ranks)
}

/// A fresh array of `dims` and `dtype` laid out as `layout` says (a channels-last array is an
/// (N, spatial..., C) one with its axes moved back), through numpy.empty, so an impossible size
/// raises NumPy's MemoryError.
fn fresh<'py>(
    py: Python<'py>,
    dims: &[usize],
    dtype: &Bound<'py, PyAny>,
    layout: Layout,
) -> PyResult<Bound<'py, PyAny>> {
    let numpy = py.import("numpy")?;
    if layout == Layout::Contiguous || dims.len() < 3 {
        return numpy.call_method1("empty", (dims.to_vec(), dtype));
    }
    let last = dims.len() - 1;
    let in_memory: Vec<usize> = [dims[0]].into_iter().chain(dims[2..].iter().copied()).chain([dims[1]]).collect();
    let back: Vec<usize> = [0, last].into_iter().chain(1..last).collect();
    numpy.call_method1("empty", (in_memory, dtype))?.call_method1("transpose", (back,))
}

/// The layout of a caller's `out=` array, which must be one the kernels write: C-contiguous, or
/// channels-last for a 4D or 5D result.
fn out_layout(array: &Bound<'_, PyUntypedArray>) -> Result<Layout> {
    let item = array.dtype().itemsize() as isize;
    let strides: Vec<isize> =
        array.strides().iter().map(|&s| if s % item == 0 { s / item } else { isize::MIN }).collect();
    match Layout::of(array.shape(), &strides) {
        Some(Layout::ChannelsLast) if array.ndim() >= 4 => Ok(Layout::ChannelsLast),
        Some(Layout::Contiguous) => Ok(Layout::Contiguous),
        _ => Err(Error::BadOutput(format!(
            "out must be C-contiguous{}, got an array of shape {} with strides {:?}",
            if array.ndim() >= 4 { " or channels-last" } else { "" },
            shape_str(array.shape()),
            array.strides()
        ))),
    }
}

/// Where a result goes: a fresh array laid out as `layout` says, or the caller's `out=` after
/// checking it (in its own layout). `others` is the memory of every other array of the call,
/// which `out` must not overlap.
fn output<'py, T: Float>(
    py: Python<'py>,
    out: Option<&Bound<'py, PyAny>>,
    dims: &[usize],
    layout: Layout,
    others: &[Span],
) -> PyResult<(Bound<'py, PyArrayDyn<T>>, Layout)> {
    let Some(out) = out.filter(|o| !o.is_none()) else {
        let dtype = dtype::<T>(py).into_any();
        return Ok((fresh(py, dims, &dtype, layout)?.cast_into::<PyArrayDyn<T>>()?, layout));
    };
    let array = typed_array::<T>(out, "out")?;
    if array.shape() != dims {
        let got = array.shape().to_vec();
        return Err(Error::ShapeMismatch { what: "out".into(), expected: dims.to_vec(), got }.into());
    }
    let layout = out_layout(array.as_untyped())?;
    if !is_writeable(array.as_untyped()) {
        return Err(Error::BadOutput("out must be writeable, got a read-only array".into()).into());
    }
    check_disjoint(&array_span("out", array.as_untyped()), others)?;
    Ok((array, layout))
}

/// The output's memory as a slice the kernels write, in its layout.
///
/// # Safety
/// `array` must come from [`output`] (dense with non-negative strides, writeable, sharing no
/// memory with any input), and no other slice of it may be live during the call.
#[allow(clippy::mut_from_ref)] // the array is the owner; the caller upholds exclusivity
unsafe fn out_slice<'a, T: Float>(array: &'a Bound<'_, PyArrayDyn<T>>, layout: Layout) -> TensorMut<'a, T> {
    // SAFETY: a dense array of `len` elements whose strides are non-negative starts at its
    // lowest address.
    let values = unsafe { std::slice::from_raw_parts_mut(array.data(), array.len()) };
    TensorMut::values(values).with_layout(layout)
}

/// A float16 or bfloat16 array (bfloat16 as `ml_dtypes` defines it for NumPy), with its dtype:
/// float32 modules and the float32 functional API take these as PyTorch's mixed precision does,
/// normalized in float32 from the input's exact float32 values, every statistic, parameter and
/// gradient kept in float32, the output (and grad_input) rounded once to the input's dtype.
fn half_dtype<'py>(value: &Bound<'py, PyAny>) -> PyResult<Option<(Half, Bound<'py, PyArrayDescr>)>> {
    let Ok(array) = value.cast::<PyUntypedArray>() else { return Ok(None) };
    let descr = array.dtype();
    // Every call asks: float32 and float64 arrays answer from the item size, without a lookup.
    if descr.itemsize() != 2 {
        return Ok(None);
    }
    let name: String = descr.getattr("name")?.extract()?;
    Ok(match name.as_str() {
        "float16" => Some((Half::F16, descr)),
        "bfloat16" => Some((Half::BF16, descr)),
        _ => None,
    })
}

/// A half array the kernels can read in place (aligned, whole-element strides, viewable as
/// `ranks` says), or a C-contiguous copy of it.
fn half_readable<'py>(value: &Bound<'py, PyAny>, ranks: Ranks) -> PyResult<Bound<'py, PyUntypedArray>> {
    let array = half_bits_aligned(value)?;
    let strides: Vec<isize> = array.strides().iter().map(|s| s / 2).collect();
    if array.strides().iter().all(|s| s % 2 == 0) && Shape::view_of(array.shape(), &strides, ranks, "input")?.is_some()
    {
        return Ok(array);
    }
    Ok(value.py().import("numpy")?.call_method1("ascontiguousarray", (&array,))?.cast_into()?)
}

/// `value` with an aligned data pointer (copied if it is not).
fn half_bits_aligned<'py>(value: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyUntypedArray>> {
    let require = PyDict::new(value.py());
    require.set_item("requirements", ["A"])?;
    Ok(value.py().import("numpy")?.call_method("require", (value,), Some(&require))?.cast_into()?)
}

/// A half array from `half_readable` as the float32 tensor the kernels read (widening each block
/// as they read it), borrowed for as long as the array is.
fn half_view<'a>(array: &'a Bound<'_, PyUntypedArray>, half: Half, ranks: Ranks) -> Result<TensorRef<'a, f32>> {
    let strides: Vec<isize> = array.strides().iter().map(|s| s / 2).collect();
    if array.is_empty() {
        return TensorRef::half(&[], half, 0, array.shape(), &strides, ranks);
    }
    let (low, high) = extent(array.shape(), &strides);
    // SAFETY: `half_readable` made the array aligned with whole-element strides, so its elements
    // lie in [data + low, data + high]; the slice lives no longer than `array`'s borrow.
    let bits = unsafe {
        let data = (*array.as_array_ptr()).data as *const u16;
        std::slice::from_raw_parts(data.offset(low), (high - low + 1) as usize)
    };
    TensorRef::half(bits, half, (-low) as usize, array.shape(), &strides, ranks)
}

/// The aligned half array a call writes, and its layout: `target` itself when it is C-contiguous
/// or channels-last, else a fresh C-contiguous one that `finish_half` copies into `target`.
fn half_staging<'py>(target: &Bound<'py, PyAny>) -> PyResult<(Bound<'py, PyUntypedArray>, Layout)> {
    let array = target.cast::<PyUntypedArray>()?;
    if flags(array) & NPY_ARRAY_ALIGNED != 0 {
        if let Ok(layout) = out_layout(array) {
            return Ok((array.clone(), layout));
        }
    }
    let fresh = target.py().import("numpy")?.call_method1("empty", (array.shape().to_vec(), array.dtype()))?;
    Ok((fresh.cast_into()?, Layout::Contiguous))
}

/// The bits of a C-contiguous, aligned half array, to write.
///
/// # Safety
/// `array` must come from `half_staging` (dense with non-negative strides, so its memory starts at
/// its data pointer), and no other slice of it may be live during the call.
#[allow(clippy::mut_from_ref)] // the array is the owner; the caller upholds exclusivity
unsafe fn half_slice<'a>(array: &'a Bound<'_, PyUntypedArray>) -> &'a mut [u16] {
    std::slice::from_raw_parts_mut((*array.as_array_ptr()).data as *mut u16, array.len())
}

/// Copies the staged result into `target` when the call wrote a staging copy.
fn finish_half(target: &Bound<'_, PyAny>, staged: &Bound<'_, PyUntypedArray>) -> PyResult<()> {
    if !staged.is(target) {
        target.py().import("numpy")?.call_method1("copyto", (target, staged))?;
    }
    Ok(())
}

/// Where the half result of a call on `input` goes: a fresh array of its shape and dtype `half`,
/// or the caller's `out=` after checking it (that dtype and shape, writeable, sharing no memory
/// with `input`).
fn half_output<'py>(
    input: &Bound<'py, PyAny>,
    half: &Bound<'py, PyArrayDescr>,
    out: Option<&Bound<'py, PyAny>>,
    layout: Layout,
) -> PyResult<Bound<'py, PyAny>> {
    let py = input.py();
    let input = input.cast::<PyUntypedArray>()?;
    let Some(out) = out.filter(|o| !o.is_none()) else {
        return fresh(py, input.shape(), half.as_any(), layout);
    };
    let array =
        out.cast::<PyUntypedArray>().map_err(|_| Error::NotAnArray { what: "out".into(), got: type_name(out) })?;
    if !array.dtype().is_equiv_to(half) {
        let expected = half.str()?.to_string();
        return Err(Error::DType { what: "out".into(), expected, got: dtype_name(array) }.into());
    }
    if array.shape() != input.shape() {
        let (expected, got) = (input.shape().to_vec(), array.shape().to_vec());
        return Err(Error::ShapeMismatch { what: "out".into(), expected, got }.into());
    }
    if !is_writeable(array) {
        return Err(Error::BadOutput("out must be writeable, got a read-only array".into()).into());
    }
    check_disjoint(&array_span("out", array), &[array_span("the input", input)])?;
    Ok(out.clone())
}

/// Locks a module's state without holding the GIL while waiting, so a long forward on one
/// thread never stalls Python threads that merely read an attribute.
fn lock<'a, S: Send>(py: Python<'_>, mutex: &'a Mutex<S>) -> MutexGuard<'a, S> {
    loop {
        match mutex.try_lock() {
            Ok(guard) => return guard,
            // State is written only after a call has fully succeeded, so it is never torn.
            Err(TryLockError::Poisoned(poisoned)) => return poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => py.detach(|| drop(mutex.lock())),
        }
    }
}

/// The input of the most recent forward, which `backward` reads again (the module keeps the
/// statistics).
enum Saved {
    Host(Py<PyAny>),
    #[cfg(feature = "cuda")]
    Gpu(cuda::GpuArray),
}

/// The base of `batchnorm.BatchNorm1d`, `BatchNorm2d` and `BatchNorm3d` (python/batchnorm/__init__.py),
/// which differ only in the input ranks they accept: each class names its [`Kind`] in `_ranks`.
/// Every method converts its arguments and calls the core module once.
#[pyclass(name = "_BatchNorm", module = "batchnorm._core", subclass, frozen)]
pub struct PyBatchNorm {
    kind: Kind,
    config: Config,
    dtype: Dtype,
    state: Mutex<State>,
}

/// A module and what its calls keep alive.
struct State {
    module: AnyModule,
    saved: Option<Saved>,
    /// The arrays of GPU calls whose kernels may still run.
    #[cfg(feature = "cuda")]
    in_flight: Vec<cuda::InFlight>,
}

impl PyBatchNorm {
    fn state(&self, py: Python<'_>) -> MutexGuard<'_, State> {
        lock(py, &self.state)
    }

    /// A view of one of the module's (C,) arrays: NumPy on the CPU, a DeviceArray on a GPU. The
    /// view keeps the memory alive (the module, or the device buffer).
    fn view<'py>(slf: &Bound<'py, Self>, which: Buffer) -> Option<Bound<'py, PyAny>> {
        let state = slf.get().state(slf.py());
        with_module!(&state.module, m: _T => {
            #[cfg(feature = "cuda")]
            if m.device().is_some() {
                return cuda::view(slf, m, which, slf.get().dtype);
            }
            buffer_view(slf, m.buffer(which))
        })
    }

    /// Copies `value` (a NumPy or GPU array) into one of the module's (C,) arrays, where it lives.
    fn assign(&self, py: Python<'_>, which: Buffer, value: &Bound<'_, PyAny>) -> PyResult<()> {
        #[cfg(feature = "cuda")]
        let value = &cuda::host_array(value)?;
        let mut state = self.state(py);
        with_module!(&mut state.module, m: T => {
            let array = typed_array::<T>(value, which.name())?;
            let values: Vec<T> = array.readonly().as_array().iter().copied().collect();
            if array.ndim() != 1 {
                let expected = vec![self.config.num_features];
                return Err(Error::ShapeMismatch { what: which.name().into(), expected, got: array.shape().to_vec() }.into());
            }
            Ok(m.write_buffer(which, &values)?)
        })
    }

    fn forward_typed<'py, T: Float>(
        slf: &Bound<'py, Self>,
        input: &Bound<'py, PyAny>,
        out: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyArrayDyn<T>>> {
        let py = slf.py();
        let this = slf.get();
        let ranks = this.kind.ranks();
        let buffers = module_spans(&this.state(py).module);
        let x = viewable(detached(readable(typed_array::<T>(input, "input")?)?, &buffers)?, "input", ranks)?;
        let view = view_of(&x, ranks)?;
        let others: Vec<Span> = buffers.into_iter().chain([array_span("the input", x.as_untyped())]).collect();
        let (y, layout) = output::<T>(py, out, x.shape(), view.output_layout(), &others)?;
        // SAFETY: `y` comes from `output` and nothing else refers to it yet.
        let y_data = unsafe { out_slice(&y, layout) };
        py.detach(|| {
            let mut state = this.state.lock().unwrap_or_else(|p| p.into_inner());
            state.module.typed::<T>()?.forward(&view, y_data)
        })
        .map_err(|e| e.with_input_dims(x.shape()))?;
        this.state(py).saved = Some(Saved::Host(x.into_any().unbind()));
        Ok(y)
    }

    /// A float16 or bfloat16 input to a float32 module (see `half_dtype`): the kernels widen each
    /// block of it as they read it and narrow each block of the output as they write it.
    fn forward_half<'py>(
        slf: &Bound<'py, Self>,
        input: &Bound<'py, PyAny>,
        half: Half,
        descr: &Bound<'py, PyArrayDescr>,
        out: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        let this = slf.get();
        let ranks = this.kind.ranks();
        let x = half_readable(input, ranks)?;
        let view = half_view(&x, half, ranks)?;
        let target = half_output(input, descr, out, view.output_layout())?;
        let (staged, layout) = half_staging(&target)?;
        // SAFETY: `staged` is dense, aligned, and shares no memory with the input
        // (`half_output`); nothing else refers to it during the call.
        let y = TensorMut::half(unsafe { half_slice(&staged) }, half).with_layout(layout);
        py.detach(|| {
            let mut state = this.state.lock().unwrap_or_else(|p| p.into_inner());
            state.module.typed::<f32>()?.forward(&view, y)
        })
        .map_err(|e| e.with_input_dims(x.shape()))?;
        finish_half(&target, &staged)?;
        this.state(py).saved = Some(Saved::Host(x.into_any().unbind()));
        Ok(target)
    }

    /// The backward of `forward_half`: grad_output of the forward input's half dtype.
    fn backward_half<'py>(
        slf: &Bound<'py, Self>,
        grad_output: &Bound<'py, PyAny>,
        half: Half,
        out: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        let this = slf.get();
        let ranks = this.kind.ranks();
        let input = match &this.state(py).saved {
            Some(Saved::Host(input)) => input.clone_ref(py),
            _ => return Err(Error::NoForward.into()),
        };
        let x = input.into_bound(py).cast_into::<PyUntypedArray>()?;
        let descr = x.dtype();
        if half_dtype(grad_output)?.is_none_or(|(dy_half, _)| dy_half != half) {
            let got = grad_output.cast::<PyUntypedArray>().map_or_else(|_| type_name(grad_output), dtype_name);
            return Err(Error::DType { what: "grad_output".into(), expected: descr.str()?.to_string(), got }.into());
        }
        let dy = half_readable(grad_output, ranks)?;
        let (x_view, dy_view) = (half_view(&x, half, ranks)?, half_view(&dy, half, ranks)?);
        let target = half_output(grad_output, &descr, out, x_view.output_layout())?;
        let (staged, layout) = half_staging(&target)?;
        // SAFETY: as in `forward_half`.
        let dx = TensorMut::half(unsafe { half_slice(&staged) }, half).with_layout(layout);
        py.detach(|| {
            let mut state = this.state.lock().unwrap_or_else(|p| p.into_inner());
            state.module.typed::<f32>()?.backward(&x_view, &dy_view, dx)
        })?;
        finish_half(&target, &staged)?;
        Ok(target)
    }

    fn backward_typed<'py, T: Float>(
        slf: &Bound<'py, Self>,
        grad_output: &Bound<'py, PyAny>,
        out: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyArrayDyn<T>>> {
        let py = slf.py();
        let this = slf.get();
        let ranks = this.kind.ranks();
        let (input, buffers) = {
            let state = this.state(py);
            match &state.saved {
                Some(Saved::Host(input)) => (input.clone_ref(py), module_spans(&state.module)),
                _ => return Err(Error::NoForward.into()),
            }
        };
        let x = input.into_bound(py).cast_into::<PyArrayDyn<T>>()?;
        let dy = detached(readable(typed_array::<T>(grad_output, "grad_output")?)?, &buffers)?;
        let dy = viewable(dy, "grad_output", ranks)?;
        let (x_view, dy_view) = (view_of(&x, ranks)?, view_of(&dy, ranks)?);
        let inputs = [array_span("the forward's input", x.as_untyped()), array_span("grad_output", dy.as_untyped())];
        let others: Vec<Span> = buffers.into_iter().chain(inputs).collect();
        let (dx, layout) = output::<T>(py, out, x.shape(), x_view.output_layout(), &others)?;
        // SAFETY: `dx` comes from `output` and nothing else refers to it yet.
        let dx_data = unsafe { out_slice(&dx, layout) };
        py.detach(|| {
            let mut state = this.state.lock().unwrap_or_else(|p| p.into_inner());
            state.module.typed::<T>()?.backward(&x_view, &dy_view, dx_data)
        })?;
        Ok(dx)
    }
}

/// A NumPy view of a buffer inside the module; the view keeps the module alive.
fn buffer_view<'py, T: Float>(owner: &Bound<'py, PyBatchNorm>, data: Option<&[T]>) -> Option<Bound<'py, PyAny>> {
    data.map(|data| {
        // SAFETY: the module allocates its host arrays once and never frees or moves them while
        // it lives; `owner` becomes the view's base object and so outlives it.
        let view = unsafe { ArrayView1::from_shape_ptr(data.len(), data.as_ptr()) };
        unsafe { PyArray1::borrow_from_array(&view, owner.clone().into_any()) }.into_any()
    })
}

fn py_float_repr(py: Python<'_>, value: f64) -> PyResult<String> {
    Ok(PyFloat::new(py, value).repr()?.to_string())
}

/// Constructor keywords given to `from_file` / `from_state_dict`: configuration overrides and the
/// dtype, checked as the constructor checks them.
fn parse_overrides(kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<(ConfigOverrides, Option<Dtype>, Placement)> {
    let mut overrides = ConfigOverrides::default();
    let mut dtype = None;
    let mut placement = Placement::Cpu;
    let Some(kwargs) = kwargs else { return Ok((overrides, dtype, placement)) };
    for (key, value) in kwargs.iter() {
        let key: String = key.extract()?;
        match key.as_str() {
            "num_features" => overrides.num_features = Some(count_argument(&value, "num_features", i64::MAX as u64)?),
            "eps" => overrides.eps = Some(value.extract()?),
            "momentum" => overrides.momentum = Some(value.extract()?),
            "affine" => overrides.affine = Some(value.extract()?),
            "bias" => overrides.bias = Some(value.extract()?),
            "track_running_stats" => overrides.track_running_stats = Some(value.extract()?),
            "dtype" => dtype = value.extract::<Option<Dtype>>()?,
            "device" => placement = value.extract::<Option<Placement>>()?.unwrap_or(Placement::Cpu),
            other => return Err(PyTypeError::new_err(format!("unexpected keyword argument {other:?}"))),
        }
    }
    Ok((overrides, dtype, placement))
}

impl Dtype {
    fn name(self) -> &'static str {
        match self {
            Dtype::F32 => f32::DTYPE,
            Dtype::F64 => f64::DTYPE,
        }
    }
    #[cfg(feature = "cuda")]
    fn item_size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F64 => 8,
        }
    }
}

/// Where a module's parameters and buffers live.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Placement {
    Cpu,
    Cuda(usize),
}

impl Placement {
    fn name(self) -> String {
        match self {
            Placement::Cpu => "cpu".into(),
            Placement::Cuda(ordinal) => format!("cuda:{ordinal}"),
        }
    }
}

/// A module of class `cls` (a batch norm class or a subclass) holding `module`'s state: made
/// through `__new__` with its configuration, so the constructor's checks apply, then given the
/// state.
fn instantiate<'py>(
    cls: &Bound<'py, PyType>,
    module: AnyModule,
    placement: Placement,
) -> PyResult<Bound<'py, PyBatchNorm>> {
    let py = cls.py();
    let (config, dtype) = match &module {
        AnyModule::F32(m) => (m.config().clone(), Dtype::F32),
        AnyModule::F64(m) => (m.config().clone(), Dtype::F64),
    };
    let kwargs = PyDict::new(py);
    kwargs.set_item("eps", config.eps)?;
    kwargs.set_item("momentum", config.momentum)?;
    kwargs.set_item("affine", config.affine)?;
    kwargs.set_item("track_running_stats", config.track_running_stats)?;
    kwargs.set_item("dtype", dtype.name())?;
    kwargs.set_item("bias", config.bias)?;
    let made = cls.call_method("__new__", (cls, config.num_features), Some(&kwargs))?.cast_into::<PyBatchNorm>()?;
    // A subclass's __new__ may already have handed out views of the fresh module's arrays, so
    // the state is copied into them: memory a view can reach is never freed.
    made.get().state(py).module.copy_state_from(&module)?;
    made.get().move_to(py, placement)?;
    Ok(made)
}

/// The kind of module class `cls`, from its `_ranks` ("1d", "2d" or "3d").
fn class_kind(cls: &Bound<'_, PyType>) -> PyResult<Kind> {
    let name = cls.getattr("_ranks").ok().and_then(|r| r.extract::<String>().ok());
    match name.as_deref() {
        Some("1d") => Ok(Kind::BatchNorm1d),
        Some("2d") => Ok(Kind::BatchNorm2d),
        Some("3d") => Ok(Kind::BatchNorm3d),
        _ => Err(PyTypeError::new_err(format!(
            "{} is not a batch norm class: construct batchnorm.BatchNorm1d, BatchNorm2d or BatchNorm3d (or a subclass)",
            cls.name()?
        ))),
    }
}

fn from_tensor_file<'py>(
    cls: &Bound<'py, PyType>,
    file: &TensorFile,
    kwargs: Option<&Bound<'py, PyDict>>,
) -> PyResult<Bound<'py, PyBatchNorm>> {
    let (overrides, dtype, placement) = parse_overrides(kwargs)?;
    let kind = class_kind(cls)?;
    let module = match dtype.unwrap_or(if file.float_dtype() == "float64" { Dtype::F64 } else { Dtype::F32 }) {
        Dtype::F32 => AnyModule::F32(BatchNorm::from_tensor_file(kind, file, &overrides)?),
        Dtype::F64 => AnyModule::F64(BatchNorm::from_tensor_file(kind, file, &overrides)?),
    };
    instantiate(cls, module, placement)
}

#[pymethods]
impl PyBatchNorm {
    #[new]
    #[pyo3(signature = (num_features, eps=1e-5, momentum=Some(0.1), affine=true, track_running_stats=true, device=None, dtype=None, *, bias=true))]
    #[pyo3(
        text_signature = "(num_features, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True, device=None, dtype=None, *, bias=True)"
    )]
    #[classmethod]
    #[allow(clippy::too_many_arguments)]
    fn new(
        cls: &Bound<'_, PyType>,
        num_features: &Bound<'_, PyAny>,
        eps: f64,
        momentum: Option<f64>,
        affine: bool,
        track_running_stats: bool,
        device: Option<Placement>,
        dtype: Option<Dtype>,
        bias: bool,
    ) -> PyResult<Self> {
        let py = cls.py();
        let kind = class_kind(cls)?;
        let num_features = count_argument(num_features, "num_features", i64::MAX as u64)?;
        let (placement, dtype) = (device.unwrap_or(Placement::Cpu), dtype.unwrap_or(Dtype::F32));
        let config = Config { num_features, eps, momentum, affine, bias, track_running_stats };
        let state = State {
            module: AnyModule::new(kind, config.clone(), dtype)?,
            saved: None,
            #[cfg(feature = "cuda")]
            in_flight: Vec::new(),
        };
        let made = PyBatchNorm { kind, config, dtype, state: Mutex::new(state) };
        made.move_to(py, placement)?;
        Ok(made)
    }

    #[getter]
    fn num_features(&self) -> usize {
        self.config.num_features
    }
    #[getter]
    fn eps(&self) -> f64 {
        self.config.eps
    }
    #[getter]
    fn momentum(&self) -> Option<f64> {
        self.config.momentum
    }
    #[getter]
    fn affine(&self) -> bool {
        self.config.affine
    }
    #[getter]
    fn track_running_stats(&self) -> bool {
        self.config.track_running_stats
    }
    /// The NumPy dtype of the parameters, buffers, inputs and outputs.
    #[getter]
    fn dtype<'py>(&self, py: Python<'py>) -> Bound<'py, PyArrayDescr> {
        match self.dtype {
            Dtype::F32 => dtype::<f32>(py),
            Dtype::F64 => dtype::<f64>(py),
        }
    }
    /// Where the parameters and buffers live: "cpu" or "cuda:N".
    #[getter]
    fn device(&self, py: Python<'_>) -> String {
        self.placement(py).name()
    }

    /// to(device): moves the parameters and buffers to "cpu", "cuda" or "cuda:N"; returns the module.
    fn to<'py>(slf: Bound<'py, Self>, device: Option<Placement>) -> PyResult<Bound<'py, Self>> {
        slf.get().move_to(slf.py(), device.unwrap_or(Placement::Cpu))?;
        Ok(slf)
    }

    #[getter]
    fn training(&self, py: Python<'_>) -> bool {
        with_module!(&self.state(py).module, m: _T => m.is_training())
    }
    #[setter]
    fn set_training(&self, py: Python<'_>, mode: bool) {
        with_module!(&mut self.state(py).module, m: _T => m.set_training(mode))
    }

    #[getter]
    fn weight<'py>(slf: &Bound<'py, Self>) -> Option<Bound<'py, PyAny>> {
        Self::view(slf, Buffer::Weight)
    }
    #[setter]
    fn set_weight(&self, py: Python<'_>, value: &Bound<'_, PyAny>) -> PyResult<()> {
        self.assign(py, Buffer::Weight, value)
    }
    #[getter]
    fn bias<'py>(slf: &Bound<'py, Self>) -> Option<Bound<'py, PyAny>> {
        Self::view(slf, Buffer::Bias)
    }
    #[setter]
    fn set_bias(&self, py: Python<'_>, value: &Bound<'_, PyAny>) -> PyResult<()> {
        self.assign(py, Buffer::Bias, value)
    }
    #[getter]
    fn running_mean<'py>(slf: &Bound<'py, Self>) -> Option<Bound<'py, PyAny>> {
        Self::view(slf, Buffer::RunningMean)
    }
    #[setter]
    fn set_running_mean(&self, py: Python<'_>, value: &Bound<'_, PyAny>) -> PyResult<()> {
        self.assign(py, Buffer::RunningMean, value)
    }
    #[getter]
    fn running_var<'py>(slf: &Bound<'py, Self>) -> Option<Bound<'py, PyAny>> {
        Self::view(slf, Buffer::RunningVar)
    }
    #[setter]
    fn set_running_var(&self, py: Python<'_>, value: &Bound<'_, PyAny>) -> PyResult<()> {
        self.assign(py, Buffer::RunningVar, value)
    }
    #[getter]
    fn num_batches_tracked(&self, py: Python<'_>) -> Option<i64> {
        with_module!(&self.state(py).module, m: _T => m.num_batches_tracked())
    }
    /// Σ of weight gradients over backward calls since zero_grad(); None before any.
    #[getter]
    fn grad_weight<'py>(slf: &Bound<'py, Self>) -> Option<Bound<'py, PyAny>> {
        Self::view(slf, Buffer::GradWeight)
    }
    /// Σ of bias gradients over backward calls since zero_grad(); None before any.
    #[getter]
    fn grad_bias<'py>(slf: &Bound<'py, Self>) -> Option<Bound<'py, PyAny>> {
        Self::view(slf, Buffer::GradBias)
    }

    /// forward(input, *, out=None, stream=None): normalizes input; in training mode updates the running statistics.
    #[pyo3(signature = (input, *, out=None, stream=None))]
    fn forward<'py>(
        slf: &Bound<'py, Self>,
        input: &Bound<'py, PyAny>,
        out: Option<&Bound<'py, PyAny>>,
        stream: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let this = slf.get();
        #[cfg(feature = "cuda")]
        if this.placement(slf.py()) != Placement::Cpu {
            let stream = cuda::parse_stream(stream)?;
            return match this.dtype {
                Dtype::F32 => cuda::forward::<f32>(slf, input, out, stream),
                Dtype::F64 => cuda::forward::<f64>(slf, input, out, stream),
            };
        }
        let input = &host_input(input, "input", stream)?;
        if let (Dtype::F32, Some((half, descr))) = (this.dtype, half_dtype(input)?) {
            return Self::forward_half(slf, input, half, &descr, out);
        }
        match this.dtype {
            Dtype::F32 => Self::forward_typed::<f32>(slf, input, out).map(Bound::into_any),
            Dtype::F64 => Self::forward_typed::<f64>(slf, input, out).map(Bound::into_any),
        }
    }

    #[pyo3(signature = (input, *, out=None, stream=None))]
    fn __call__<'py>(
        slf: &Bound<'py, Self>,
        input: &Bound<'py, PyAny>,
        out: Option<&Bound<'py, PyAny>>,
        stream: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        Self::forward(slf, input, out, stream)
    }

    /// backward(grad_output, *, out=None, stream=None): grad_input for the most recent forward; adds into grad_weight and grad_bias.
    #[pyo3(signature = (grad_output, *, out=None, stream=None))]
    fn backward<'py>(
        slf: &Bound<'py, Self>,
        grad_output: &Bound<'py, PyAny>,
        out: Option<&Bound<'py, PyAny>>,
        stream: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let this = slf.get();
        #[cfg(feature = "cuda")]
        if this.placement(slf.py()) != Placement::Cpu {
            let stream = cuda::parse_stream(stream)?;
            return match this.dtype {
                Dtype::F32 => cuda::backward::<f32>(slf, grad_output, out, stream),
                Dtype::F64 => cuda::backward::<f64>(slf, grad_output, out, stream),
            };
        }
        let grad_output = &host_input(grad_output, "grad_output", stream)?;
        let saved_half = match &this.state(slf.py()).saved {
            Some(Saved::Host(x)) => half_dtype(x.bind(slf.py()))?.map(|(half, _)| half),
            _ => None,
        };
        if let Some(half) = saved_half {
            return Self::backward_half(slf, grad_output, half, out);
        }
        match this.dtype {
            Dtype::F32 => Self::backward_typed::<f32>(slf, grad_output, out).map(Bound::into_any),
            Dtype::F64 => Self::backward_typed::<f64>(slf, grad_output, out).map(Bound::into_any),
        }
    }

    /// train(mode=True): sets training mode; returns the module.
    #[pyo3(signature = (mode=true))]
    fn train(slf: Bound<'_, Self>, mode: bool) -> Bound<'_, Self> {
        slf.get().set_training(slf.py(), mode);
        slf
    }

    /// eval(): sets evaluation mode; returns the module.
    fn eval(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        Self::train(slf, false)
    }

    /// zero_grad(): forgets the accumulated gradients (grad_weight and grad_bias become None).
    fn zero_grad(&self, py: Python<'_>) {
        with_module!(&mut self.state(py).module, m: _T => m.zero_grad())
    }

    /// reset_running_stats(): running_mean 0, running_var 1, num_batches_tracked 0.
    fn reset_running_stats(&self, py: Python<'_>) -> PyResult<()> {
        Ok(with_module!(&mut self.state(py).module, m: _T => m.reset_running_stats())?)
    }

    /// reset_parameters(): reset_running_stats(), weight 1, bias 0.
    fn reset_parameters(&self, py: Python<'_>) -> PyResult<()> {
        Ok(with_module!(&mut self.state(py).module, m: _T => m.reset_parameters())?)
    }

    /// state_dict(): copies of the parameters and buffers under PyTorch's keys.
    fn state_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let dict = PyDict::new(py);
        with_module!(&self.state(py).module, m: T => {
            for (key, tensor) in m.state_dict()? {
                dict.set_item(key, state_array::<T>(py, tensor)?)?;
            }
        });
        Ok(dict)
    }

    /// load_state_dict(state_dict, strict=True) -> (missing_keys, unexpected_keys)
    #[pyo3(signature = (state_dict, strict=true))]
    fn load_state_dict<'py>(
        &self,
        py: Python<'py>,
        state_dict: &Bound<'py, PyAny>,
        strict: bool,
    ) -> PyResult<Bound<'py, PyTuple>> {
        // The mapping is read before locking: reading it runs arbitrary Python code.
        let (entries, _) = state_entries(state_dict, "")?;
        let report = with_module!(&mut self.state(py).module, m: _T => m.load_state_dict(&entries, strict))?;
        PyTuple::new(py, [PyList::new(py, report.missing_keys)?, PyList::new(py, report.unexpected_keys)?])
    }

    /// save(path): writes the state to a safetensors file that PyTorch loads, atomically, with the
    /// configuration in its metadata.
    fn save(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        let file = with_module!(&self.state(py).module, m: _T => m.to_tensor_file())?;
        Ok(py.detach(|| state_file::save(&path, &file))?)
    }

    /// from_file(path, **overrides): a module rebuilt from a state file written by save() or by
    /// PyTorch (then num_features, affine, bias and tracking come from the tensors, eps and
    /// momentum from PyTorch's defaults); constructor keywords override.
    #[classmethod]
    #[pyo3(signature = (path, **overrides))]
    fn from_file<'py>(
        cls: &Bound<'py, PyType>,
        path: PathBuf,
        overrides: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyBatchNorm>> {
        let file = cls.py().detach(|| state_file::load(&path))?;
        from_tensor_file(cls, &file, overrides)
    }

    /// from_state_dict(state_dict, prefix="", **config): a module holding the entries of any
    /// mapping whose keys start with `prefix` (e.g. "layer1.0.bn1." in a network's checkpoint).
    #[classmethod]
    #[pyo3(signature = (state_dict, prefix="", **config))]
    fn from_state_dict<'py>(
        cls: &Bound<'py, PyType>,
        state_dict: &Bound<'py, PyAny>,
        prefix: &str,
        config: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyBatchNorm>> {
        let (overrides, dtype, placement) = parse_overrides(config)?;
        let (entries, found) = state_entries(state_dict, prefix)?;
        let config = Config::infer(&entries)?.with(&overrides);
        let kind = class_kind(cls)?;
        let module = match dtype.unwrap_or(found) {
            Dtype::F32 => AnyModule::F32(BatchNorm::from_state(kind, config, &entries)?),
            Dtype::F64 => AnyModule::F64(BatchNorm::from_state(kind, config, &entries)?),
        };
        instantiate(cls, module, placement)
    }

    /// Pickling and copy.deepcopy: the state file's bytes, configuration and training flag included.
    fn __reduce__<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyTuple>> {
        let py = slf.py();
        let file = with_module!(&slf.get().state(py).module, m: _T => m.to_tensor_file())?;
        let bytes = PyBytes::new(py, &state_file::serialize(&file)?);
        let rebuild = slf.get_type().getattr("_from_bytes")?;
        PyTuple::new(py, [rebuild, PyTuple::new(py, [bytes])?.into_any()])
    }

    /// The inverse of __reduce__.
    #[classmethod]
    fn _from_bytes<'py>(cls: &Bound<'py, PyType>, data: &[u8]) -> PyResult<Bound<'py, PyBatchNorm>> {
        from_tensor_file(cls, &state_file::deserialize(data)?, None)
    }

    fn __repr__(slf: &Bound<'_, Self>) -> PyResult<String> {
        let py = slf.py();
        let this = slf.get();
        let momentum = match this.config.momentum {
            Some(m) => py_float_repr(py, m)?,
            None => "None".to_string(),
        };
        Ok(format!(
            "{}({}, eps={}, momentum={}, affine={}, bias={}, track_running_stats={})",
            slf.get_type().name()?,
            this.config.num_features,
            py_float_repr(py, this.config.eps)?,
            momentum,
            py_bool(this.config.affine),
            py_bool(this.config.affine && this.config.bias),
            py_bool(this.config.track_running_stats)
        ))
    }
}

fn py_bool(value: bool) -> &'static str {
    if value {
        "True"
    } else {
        "False"
    }
}

/// DLPack's device types for memory the CPU reads: kDLCPU, kDLCUDAHost, kDLROCMHost, kDLCUDAManaged.
const DLPACK_HOST_DEVICES: [i64; 4] = [1, 3, 11, 13];

/// What a module on the CPU reads `value` as: a NumPy array as it is; any other array that speaks
/// DLPack from host memory (a CPU torch.Tensor, a JAX CPU array) as a NumPy view of the same
/// memory, without a copy. A GPU array or a stream is a mistake worth naming: the module has to
/// move first.
fn host_input<'py>(
    value: &Bound<'py, PyAny>,
    what: &str,
    stream: Option<&Bound<'_, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    if stream.is_some_and(|s| !s.is_none()) {
        return Err(
            Error::InvalidArgument("stream= applies to modules on a GPU; this module is on the cpu".into()).into()
        );
    }
    if value.cast::<PyUntypedArray>().is_ok() {
        return Ok(value.clone());
    }
    if value.hasattr("__dlpack_device__")? {
        let (device, _): (i64, i64) = value.call_method0("__dlpack_device__")?.extract()?;
        if DLPACK_HOST_DEVICES.contains(&device) {
            return value.py().import("numpy")?.call_method1("from_dlpack", (value,)).map_err(|e| {
                PyTypeError::new_err(format!(
                    "cannot read {what} ({}) in place through DLPack: {e}; pass a NumPy array",
                    type_name(value)
                ))
            });
        }
    }
    if value.hasattr("__cuda_array_interface__")? || value.hasattr("__dlpack_device__")? {
        return Err(Error::InvalidArgument(format!(
            "expected {what} on the module's device (cpu), got a GPU array ({}); move the module with .to('cuda') \
             or the array to the host",
            type_name(value)
        ))
        .into());
    }
    Ok(value.clone())
}

/// A `device=`: "cpu", "cuda", "cuda:N", or anything whose str() is one of those (a torch.device).
impl<'a, 'py> FromPyObject<'a, 'py> for Placement {
    type Error = PyErr;
    fn extract(device: Borrowed<'a, 'py, PyAny>) -> PyResult<Placement> {
        let name: String = match device.cast::<PyString>() {
            Ok(name) => name.to_string(),
            Err(_) if device.hasattr("type")? => device.str()?.to_string(),
            Err(_) => {
                return Err(PyTypeError::new_err(format!(
                    "device must be None or a string such as 'cpu' or 'cuda:0', got {}",
                    type_name(&device)
                )))
            }
        };
        let ordinal = match name.as_str() {
            "cpu" => return Ok(Placement::Cpu),
            "cuda" => Some(0),
            other => other.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()),
        };
        match ordinal {
            Some(ordinal) => Ok(Placement::Cuda(ordinal)),
            None => Err(Error::InvalidArgument(format!(
                "unknown device {name:?}: expected None, 'cpu', 'cuda' or 'cuda:N'"
            ))
            .into()),
        }
    }
}

impl PyBatchNorm {
    fn placement(&self, py: Python<'_>) -> Placement {
        #[cfg(feature = "cuda")]
        if let Some(device) = with_module!(&self.state(py).module, m: _T => m.device().map(|d| d.ordinal())) {
            return Placement::Cuda(device);
        }
        let _ = py;
        Placement::Cpu
    }

    /// Moves the module to `placement` (nothing to do if it is there already). Leaving a GPU, the
    /// values go back into the host arrays' own memory, which NumPy views may reach; the device
    /// buffers live on as long as DeviceArray views of them do.
    fn move_to(&self, py: Python<'_>, placement: Placement) -> PyResult<()> {
        if self.placement(py) == placement {
            return Ok(());
        }
        #[cfg(feature = "cuda")]
        {
            cuda::add_sys_path_roots(py)?;
            let device = match placement {
                Placement::Cuda(ordinal) => Some(
                    py.detach(|| crate::cuda::device(ordinal))
                        .map_err(|e| Error::Cuda(format!("cannot use device {:?}: {e}", placement.name())))?,
                ),
                Placement::Cpu => None,
            };
            let mut state = self.state(py);
            with_module!(&mut state.module, m: _T => match &device {
                Some(device) => m.to_host().and_then(|()| m.to_device(device)),
                None => m.to_host(),
            })
            .map_err(|e| Error::Cuda(format!("cannot use device {:?}: {e}", placement.name())))?;
            state.saved = None;
            Ok(())
        }
        #[cfg(not(feature = "cuda"))]
        Err(Error::Unsupported(format!(
            "device {:?} needs the CUDA backend, which this build of batchnorm does not include (the `cuda` \
             feature); use device='cpu'",
            placement.name()
        ))
        .into())
    }
}

/// A state-dict entry as a NumPy array: floats in the module's dtype `T`, integers as int64.
fn state_array<T: Float>(py: Python<'_>, tensor: StateTensor) -> PyResult<Bound<'_, PyAny>> {
    let shape = tensor.shape.clone();
    Ok(match tensor.values {
        StateValues::Float(values) => {
            PyArray1::from_vec(py, values.into_iter().map(T::from_f64).collect()).reshape(shape)?.into_any()
        }
        StateValues::Int(values) => PyArray1::from_vec(py, values).reshape(shape)?.into_any(),
    })
}

/// Reads any mapping of array-likes into state-dict entries, with the dtype of its float values
/// (float64 when any is, else float32): floats are kept exactly (as f64) until they are cast to
/// the module's dtype, and integer or boolean values are kept as int64, as PyTorch's `copy_` would.
fn state_entries(mapping: &Bound<'_, PyAny>, prefix: &str) -> PyResult<(Vec<(String, StateTensor)>, Dtype)> {
    let py = mapping.py();
    let numpy = py.import("numpy")?;
    let keys = mapping.call_method0("keys").map_err(|_| {
        PyTypeError::new_err(format!("state_dict must be a mapping of names to arrays, got {}", type_name(mapping)))
    })?;
    let mut entries = Vec::new();
    let mut float_dtype = Dtype::F32;
    for key in keys.try_iter()? {
        let key = key?;
        let name: String = key
            .extract()
            .map_err(|_| PyTypeError::new_err(format!("state_dict keys must be strings, got {}", type_name(&key))))?;
        let Some(name) = name.strip_prefix(prefix).map(str::to_string) else { continue };
        let value = numpy.call_method1("asarray", (mapping.get_item(&key)?,))?.cast_into::<PyUntypedArray>()?;
        let shape = value.shape().to_vec();
        let values = match value.dtype().kind() {
            b'f' => {
                if value.dtype().is_equiv_to(&dtype::<f64>(py)) {
                    float_dtype = Dtype::F64;
                }
                StateValues::Float(collect::<f64>(&value.call_method1("astype", (dtype::<f64>(py),))?)?)
            }
            b'u' if value.dtype().itemsize() == 8 => {
                let wide = collect::<u64>(&value.call_method1("astype", (dtype::<u64>(py),))?)?;
                let narrowed: Option<Vec<i64>> = wide.iter().map(|&v| i64::try_from(v).ok()).collect();
                StateValues::Int(narrowed.ok_or_else(|| {
                    Error::StateDict(format!("state_dict[{name:?}] holds a uint64 value above the int64 maximum"))
                })?)
            }
            b'i' | b'u' | b'b' => {
                StateValues::Int(collect::<i64>(&value.call_method1("astype", (dtype::<i64>(py),))?)?)
            }
            _ => {
                return Err(Error::DType {
                    what: format!("state_dict[{name:?}]"),
                    expected: "a real number dtype".into(),
                    got: dtype_name(&value),
                }
                .into())
            }
        };
        entries.push((name, StateTensor { shape, values }));
    }
    Ok((entries, float_dtype))
}

fn collect<T: NpElement + Copy>(array: &Bound<'_, PyAny>) -> PyResult<Vec<T>> {
    let array = array.cast::<PyArrayDyn<T>>()?;
    Ok(array.readonly().as_array().iter().copied().collect())
}

/// A (C,) parameter for the functional API, copied (it is O(C)) so any layout works: one
/// dimension, as PyTorch requires; its length the core checks.
fn param_vec<T: Float>(value: Option<&Bound<'_, PyAny>>, what: &str) -> PyResult<Option<Vec<T>>> {
    let Some(value) = value.filter(|v| !v.is_none()) else { return Ok(None) };
    let array = typed_array::<T>(value, what)?;
    if array.ndim() != 1 {
        let (expected, got) = (vec![array.len()], array.shape().to_vec());
        return Err(Error::ShapeMismatch { what: what.to_string(), expected, got }.into());
    }
    Ok(Some(array.readonly().as_array().iter().copied().collect()))
}

fn writeback<T: Float>(target: Option<&Bound<'_, PyAny>>, values: Option<Vec<T>>) -> PyResult<()> {
    if let (Some(target), Some(values)) = (target, values) {
        let array = typed_array::<T>(target, "running buffer")?;
        array.readwrite().as_array_mut().iter_mut().zip(values).for_each(|(slot, v)| *slot = v);
    }
    Ok(())
}

fn require_writeable(value: Option<&Bound<'_, PyAny>>, what: &str) -> PyResult<()> {
    if let Some(array) = value.and_then(|v| v.cast::<PyUntypedArray>().ok()) {
        if !is_writeable(array) {
            return Err(Error::BadOutput(format!(
                "{what} is updated in place when training, so it must be writeable; got a read-only array"
            ))
            .into());
        }
    }
    Ok(())
}

fn input_dtype(input: &Bound<'_, PyAny>) -> PyResult<Dtype> {
    let array = input
        .cast::<PyUntypedArray>()
        .map_err(|_| Error::NotAnArray { what: "input".into(), got: type_name(input) })?;
    Dtype::of_array(array)
}

/// A functional call's input ready for the kernels: an array of `T` read in place (or copied
/// where it cannot be), or a float16/bfloat16 array, which float32 calls read block by block.
fn functional_input<'py, T: Float>(
    value: &Bound<'py, PyAny>,
    what: &'static str,
) -> PyResult<(Bound<'py, PyUntypedArray>, Option<Half>)> {
    Ok(match half_dtype(value)? {
        Some((half, _)) => (half_readable(value, Ranks::Any)?, Some(half)),
        None => (viewable(readable(typed_array::<T>(value, what)?)?, what, Ranks::Any)?.as_untyped().clone(), None),
    })
}

/// The tensor the kernels read of an array from `functional_input`.
fn functional_view<'a, T: Float>(array: &'a Bound<'_, PyUntypedArray>, half: Option<Half>) -> Result<TensorRef<'a, T>> {
    match half {
        Some(half) => T::half_view(array, half, Ranks::Any),
        None => view_of(array.cast::<PyArrayDyn<T>>().map_err(|e| Error::BadOutput(e.to_string()))?, Ranks::Any),
    }
}

/// Where a functional call's result goes, and the array its kernels write (the result itself, or a
/// staging copy `finish_half` copies into it): of `T`, or of the input's half dtype.
fn functional_output<'py, T: Float>(
    input: &Bound<'py, PyUntypedArray>,
    half: Option<Half>,
    layout: Layout,
    out: Option<&Bound<'py, PyAny>>,
    others: &[Span],
) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyUntypedArray>, Layout)> {
    if half.is_none() {
        let (y, layout) = output::<T>(input.py(), out, input.shape(), layout, others)?;
        let y = y.as_untyped().clone();
        return Ok((y.clone().into_any(), y, layout));
    }
    let target = half_output(input.as_any(), &input.dtype(), out, layout)?;
    check_disjoint(&array_span("out", target.cast()?), others)?;
    let (staged, layout) = half_staging(&target)?;
    Ok((target, staged, layout))
}

/// The kernels' target over an array from `functional_output`.
///
/// # Safety
/// `staged` must come from `functional_output`, and no other slice of it may be live.
unsafe fn functional_target<'a, T: Float>(
    staged: &'a Bound<'_, PyUntypedArray>,
    half: Option<Half>,
    layout: Layout,
) -> Result<TensorMut<'a, T>> {
    Ok(match half {
        Some(half) => TensorMut::half(half_slice(staged), half).with_layout(layout),
        None => out_slice(staged.cast::<PyArrayDyn<T>>().map_err(|e| Error::BadOutput(e.to_string()))?, layout),
    })
}

#[allow(clippy::too_many_arguments)]
fn batch_norm_typed<'py, T: Float>(
    input: &Bound<'py, PyAny>,
    running_mean: Option<&Bound<'py, PyAny>>,
    running_var: Option<&Bound<'py, PyAny>>,
    weight: Option<&Bound<'py, PyAny>>,
    bias: Option<&Bound<'py, PyAny>>,
    training: bool,
    momentum: f64,
    eps: f64,
    out: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    let py = input.py();
    let (x, half) = functional_input::<T>(input, "input")?;
    let view = functional_view::<T>(&x, half)?;
    let mut mean = param_vec::<T>(running_mean, "running_mean")?;
    let mut var = param_vec::<T>(running_var, "running_var")?;
    let (w, b) = (param_vec::<T>(weight, "weight")?, param_vec::<T>(bias, "bias")?);
    if training {
        require_writeable(running_mean, "running_mean")?;
        require_writeable(running_var, "running_var")?;
    }
    let others = spans_of(&[
        ("the input", Some(x.as_any())),
        ("running_mean", running_mean),
        ("running_var", running_var),
        ("weight", weight),
        ("bias", bias),
    ]);
    let (y, staged, layout) = functional_output::<T>(&x, half, view.output_layout(), out, &others)?;
    // SAFETY: `staged` comes from `functional_output` and nothing else refers to it yet.
    let target = unsafe { functional_target::<T>(&staged, half, layout)? };
    py.detach(|| {
        functional::batch_norm(
            &view,
            target,
            mean.as_deref_mut(),
            var.as_deref_mut(),
            w.as_deref(),
            b.as_deref(),
            training,
            momentum,
            eps,
        )
    })?;
    finish_half(&y, &staged)?;
    if training {
        writeback(running_mean, mean)?;
        writeback(running_var, var)?;
    }
    Ok(y)
}

/// batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-05, *, out=None)
///
/// torch.nn.functional.batch_norm on NumPy arrays; the running buffers are updated in place when training.
#[pyfunction]
#[pyo3(signature = (input, running_mean, running_var, weight=None, bias=None, training=false, momentum=0.1, eps=1e-5, *, out=None))]
#[allow(clippy::too_many_arguments)]
fn batch_norm<'py>(
    input: &Bound<'py, PyAny>,
    running_mean: Option<&Bound<'py, PyAny>>,
    running_var: Option<&Bound<'py, PyAny>>,
    weight: Option<&Bound<'py, PyAny>>,
    bias: Option<&Bound<'py, PyAny>>,
    training: bool,
    momentum: f64,
    eps: f64,
    out: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    let running_mean = running_mean.filter(|v| !v.is_none());
    let running_var = running_var.filter(|v| !v.is_none());
    let input = &host_input(input, "input", None)?;
    if half_dtype(input)?.is_some() {
        return batch_norm_typed::<f32>(input, running_mean, running_var, weight, bias, training, momentum, eps, out);
    }
    match input_dtype(input)? {
        Dtype::F32 => {
            batch_norm_typed::<f32>(input, running_mean, running_var, weight, bias, training, momentum, eps, out)
        }
        Dtype::F64 => {
            batch_norm_typed::<f64>(input, running_mean, running_var, weight, bias, training, momentum, eps, out)
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn batch_norm_backward_typed<'py, T: Float>(
    grad_output: &Bound<'py, PyAny>,
    input: &Bound<'py, PyAny>,
    running_mean: Option<&Bound<'py, PyAny>>,
    running_var: Option<&Bound<'py, PyAny>>,
    weight: Option<&Bound<'py, PyAny>>,
    training: bool,
    eps: f64,
    out: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyTuple>> {
    let py = input.py();
    let (x, half) = functional_input::<T>(input, "input")?;
    let (dy, dy_half) = functional_input::<T>(grad_output, "grad_output")?;
    if dy_half != half {
        let expected = x.dtype().str()?.to_string();
        return Err(Error::DType { what: "grad_output".into(), expected, got: dtype_name(&dy) }.into());
    }
    let (x_view, dy_view) = (functional_view::<T>(&x, half)?, functional_view::<T>(&dy, half)?);
    let mean = param_vec::<T>(running_mean, "running_mean")?;
    let var = param_vec::<T>(running_var, "running_var")?;
    let w = param_vec::<T>(weight, "weight")?;
    let others = spans_of(&[
        ("the input", Some(x.as_any())),
        ("grad_output", Some(dy.as_any())),
        ("running_mean", running_mean),
        ("running_var", running_var),
        ("weight", weight),
    ]);
    let (dx, staged, layout) = functional_output::<T>(&x, half, x_view.output_layout(), out, &others)?;
    // SAFETY: `staged` comes from `functional_output` and nothing else refers to it yet.
    let dx_data = unsafe { functional_target::<T>(&staged, half, layout)? };
    let grads = py.detach(|| {
        let saved = SavedStats::for_backward(&x_view, mean.as_deref(), var.as_deref(), training, eps)?;
        functional::batch_norm_backward(&dy_view, &x_view, dx_data, &saved, w.as_deref())
    })?;
    finish_half(&dx, &staged)?;
    PyTuple::new(
        py,
        [dx, PyArray1::from_vec(py, grads.grad_weight).into_any(), PyArray1::from_vec(py, grads.grad_bias).into_any()],
    )
}

/// batch_norm_backward(grad_output, input, running_mean=None, running_var=None, weight=None, training=False, eps=1e-05, *, out=None)
///
/// The gradients of batch_norm: returns (grad_input, grad_weight, grad_bias).
#[pyfunction]
#[pyo3(signature = (grad_output, input, running_mean=None, running_var=None, weight=None, training=false, eps=1e-5, *, out=None))]
#[allow(clippy::too_many_arguments)]
fn batch_norm_backward<'py>(
    grad_output: &Bound<'py, PyAny>,
    input: &Bound<'py, PyAny>,
    running_mean: Option<&Bound<'py, PyAny>>,
    running_var: Option<&Bound<'py, PyAny>>,
    weight: Option<&Bound<'py, PyAny>>,
    training: bool,
    eps: f64,
    out: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyTuple>> {
    let (input, grad_output) = (&host_input(input, "input", None)?, &host_input(grad_output, "grad_output", None)?);
    if half_dtype(input)?.is_some() {
        return batch_norm_backward_typed::<f32>(
            grad_output,
            input,
            running_mean,
            running_var,
            weight,
            training,
            eps,
            out,
        );
    }
    match input_dtype(input)? {
        Dtype::F32 => {
            batch_norm_backward_typed::<f32>(grad_output, input, running_mean, running_var, weight, training, eps, out)
        }
        Dtype::F64 => {
            batch_norm_backward_typed::<f64>(grad_output, input, running_mean, running_var, weight, training, eps, out)
        }
    }
}

/// File dtypes and the little-endian NumPy dtype strings they correspond to, read both ways.
const NUMPY_DTYPES: [(FileDtype, &str); 12] = [
    (FileDtype::F16, "<f2"),
    (FileDtype::F32, "<f4"),
    (FileDtype::F64, "<f8"),
    (FileDtype::I8, "|i1"),
    (FileDtype::I16, "<i2"),
    (FileDtype::I32, "<i4"),
    (FileDtype::I64, "<i8"),
    (FileDtype::U8, "|u1"),
    (FileDtype::U16, "<u2"),
    (FileDtype::U32, "<u4"),
    (FileDtype::U64, "<u8"),
    (FileDtype::BOOL, "|b1"),
];

/// save_file(tensors, path, metadata=None): writes a dict of NumPy arrays to a safetensors file,
/// atomically, as safetensors.numpy.save_file does.
#[pyfunction]
#[pyo3(signature = (tensors, path, metadata=None))]
fn save_file(
    py: Python<'_>,
    tensors: &Bound<'_, PyAny>,
    path: PathBuf,
    metadata: Option<std::collections::HashMap<String, String>>,
) -> PyResult<()> {
    let numpy = py.import("numpy")?;
    let items = tensors.call_method0("items").map_err(|_| {
        PyTypeError::new_err(format!("tensors must be a mapping of names to arrays, got {}", type_name(tensors)))
    })?;
    let mut file = TensorFile { tensors: Vec::new(), metadata: metadata.unwrap_or_default() };
    for item in items.try_iter()? {
        let (name, value): (String, Bound<'_, PyAny>) = item?.extract()?;
        // asarray, not ascontiguousarray, which turns a 0-d array into shape (1,); tobytes()
        // below writes C order whatever the layout.
        let array = numpy.call_method1("asarray", (value,))?.cast_into::<PyUntypedArray>()?;
        let little_endian = array.dtype().call_method1("newbyteorder", ("<",))?;
        let name_of_dtype: String = little_endian.getattr("str")?.extract()?;
        let Some(&(dtype, _)) = NUMPY_DTYPES.iter().find(|(_, numpy_name)| *numpy_name == name_of_dtype) else {
            return Err(Error::DType {
                what: format!("tensor {name:?}"),
                expected: "a bool, integer or float dtype".into(),
                got: dtype_name(&array),
            }
            .into());
        };
        let data: Vec<u8> = array.call_method1("astype", (little_endian,))?.call_method0("tobytes")?.extract()?;
        file.tensors.push((name, RawTensor { dtype, shape: array.shape().to_vec(), data }));
    }
    Ok(py.detach(|| state_file::save(&path, &file))?)
}

/// load_file(path): the tensors of a safetensors file as a dict of NumPy arrays.
#[pyfunction]
fn load_file<'py>(py: Python<'py>, path: PathBuf) -> PyResult<Bound<'py, PyDict>> {
    let file = py.detach(|| state_file::load(&path))?;
    let numpy = py.import("numpy")?;
    let result = PyDict::new(py);
    for (name, tensor) in file.tensors {
        // NumPy has no bfloat16: widen to float32, exactly.
        let (file_dtype, data) = match tensor.dtype {
            FileDtype::BF16 => (FileDtype::F32, tensor.data.chunks_exact(2).flat_map(|b| [0, 0, b[0], b[1]]).collect()),
            other => (other, tensor.data),
        };
        let Some(&(_, dtype)) = NUMPY_DTYPES.iter().find(|(d, _)| *d == file_dtype) else {
            return Err(Error::Format(format!(
                "tensor {name:?} has dtype {:?}, which NumPy cannot hold",
                tensor.dtype
            ))
            .into());
        };
        let buffer = pyo3::types::PyByteArray::new(py, &data);
        let array = numpy.call_method1("frombuffer", (buffer, dtype))?.call_method1("reshape", (tensor.shape,))?;
        result.set_item(name, array)?;
    }
    Ok(result)
}

/// set_num_threads(n): how many threads the kernels use (default: every core), from 1 to
/// 1024 (or 64 per core on larger machines).
#[pyfunction]
fn set_num_threads(threads: &Bound<'_, PyAny>) -> PyResult<()> {
    // The core checks the upper bound.
    let threads = count_argument(threads, "number of threads", u64::MAX)?;
    Ok(crate::set_num_threads(threads)?)
}

/// simd_level(): the instruction set the kernels run with ("avx512", "avx2", "neon" or "scalar").
#[pyfunction]
fn simd_level() -> &'static str {
    crate::SimdLevel::active().name()
}

/// get_num_threads(): how many threads the kernels use.
#[pyfunction]
fn get_num_threads() -> usize {
    crate::get_num_threads()
}

#[pymodule]
#[pyo3(name = "_core")]
fn core_module(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyBatchNorm>()?;
    #[cfg(feature = "cuda")]
    m.add_class::<cuda::DeviceArray>()?;
    m.add_function(wrap_pyfunction!(batch_norm, m)?)?;
    m.add_function(wrap_pyfunction!(batch_norm_backward, m)?)?;
    m.add_function(wrap_pyfunction!(set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(get_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(simd_level, m)?)?;
    m.add_function(wrap_pyfunction!(save_file, m)?)?;
    m.add_function(wrap_pyfunction!(load_file, m)?)?;
    #[cfg(feature = "cuda")]
    m.add_function(wrap_pyfunction!(cuda::cuda_versions, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("ShapeError", shape_error(m.py())?)?;
    Ok(())
}
