//! State files: safetensors, the format `safetensors.torch` writes and reads.
//!
//! Parsing and validation are the `safetensors` crate's, which checks every header field (header
//! size, JSON, dtypes, shapes, offsets covering the data exactly, arithmetic overflow) before it
//! trusts an offset; this module adds bounded reading, atomic writes and the conversions to and
//! from a layer's state. Corrupt input becomes [`Error::Format`], never a panic.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;

use safetensors::tensor::{SafeTensors, TensorView};
pub use safetensors::Dtype as FileDtype;

use crate::element::Element;
use crate::error::{Error, Result};
use crate::state::{StateTensor, StateValues};

/// One tensor of a file: its dtype, shape and little-endian bytes in C order.
#[derive(Clone, Debug, PartialEq)]
pub struct RawTensor {
    pub dtype: FileDtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

/// A file's tensors, in the order of their data, and its string metadata.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TensorFile {
    pub tensors: Vec<(String, RawTensor)>,
    pub metadata: HashMap<String, String>,
}

impl TensorFile {
    /// The dtype a layer built from this file gets: the one its metadata names, else float64 when
    /// a floating tensor is F64, else float32.
    pub fn float_dtype(&self) -> &'static str {
        match self.metadata.get(crate::layer::DTYPE_KEY).map(String::as_str) {
            Some("float64") => "float64",
            Some(_) => "float32",
            None if self.tensors.iter().any(|(_, t)| t.dtype == FileDtype::F64) => "float64",
            None => "float32",
        }
    }
}

fn format_error(error: impl std::fmt::Display) -> Error {
    Error::Format(format!("not a valid safetensors file: {error}"))
}

/// The bytes of a safetensors file holding `file`.
pub fn serialize(file: &TensorFile) -> Result<Vec<u8>> {
    let mut views = Vec::with_capacity(file.tensors.len());
    for (name, tensor) in &file.tensors {
        let view = TensorView::new(tensor.dtype, tensor.shape.clone(), &tensor.data)
            .map_err(|e| Error::Format(format!("tensor {name:?}: {e}")))?;
        views.push((name.as_str(), view));
    }
    let metadata = (!file.metadata.is_empty()).then(|| file.metadata.clone());
    safetensors::serialize(views, metadata).map_err(format_error)
}

/// The tensors and metadata in the bytes of a safetensors file.
pub fn deserialize(bytes: &[u8]) -> Result<TensorFile> {
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(format_error)?;
    let parsed = SafeTensors::deserialize(bytes).map_err(format_error)?;
    let mut tensors = Vec::new();
    for name in header.offset_keys() {
        let view = parsed.tensor(&name).map_err(format_error)?;
        tensors
            .push((name, RawTensor { dtype: view.dtype(), shape: view.shape().to_vec(), data: view.data().to_vec() }));
    }
    Ok(TensorFile { tensors, metadata: header.metadata().clone().unwrap_or_default() })
}

/// Reads a whole regular file: never more than its size says, so a device such as /dev/zero
/// cannot make it read forever.
fn read_file(path: &Path) -> Result<Vec<u8>> {
    let file = File::open(path).map_err(|e| Error::io(path, &e))?;
    let info = file.metadata().map_err(|e| Error::io(path, &e))?;
    if info.is_dir() {
        let error = std::io::Error::new(std::io::ErrorKind::IsADirectory, "is a directory");
        return Err(Error::io(path, &error));
    }
    if !info.is_file() {
        return Err(Error::Format(format!("{}: not a regular file", path.display())));
    }
    let mut bytes = Vec::with_capacity(usize::try_from(info.len()).unwrap_or(0));
    file.take(info.len()).read_to_end(&mut bytes).map_err(|e| Error::io(path, &e))?;
    Ok(bytes)
}

/// Reads a safetensors file.
pub fn load(path: impl AsRef<Path>) -> Result<TensorFile> {
    let path = path.as_ref();
    deserialize(&read_file(path)?).map_err(|e| match e {
        Error::Format(message) => Error::Format(format!("{}: {message}", path.display())),
        other => other,
    })
}

/// Writes a safetensors file atomically: to a temporary file in the same folder, flushed to
/// disk, then renamed over `path`, so an existing file is never left half-written.
pub fn save(path: impl AsRef<Path>, file: &TensorFile) -> Result<()> {
    let path = path.as_ref();
    let bytes = serialize(file)?;
    let folder = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut temporary = tempfile::NamedTempFile::new_in(folder).map_err(|e| Error::io(folder, &e))?;
    temporary.write_all(&bytes).map_err(|e| Error::io(temporary.path(), &e))?;
    #[cfg(unix)]
    {
        // A temporary file is private (0600); give the state file an ordinary file's mode.
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path).map_or(0o644, |m| m.permissions().mode());
        let _ = temporary.as_file().set_permissions(std::fs::Permissions::from_mode(mode));
    }
    temporary.as_file().sync_all().map_err(|e| Error::io(temporary.path(), &e))?;
    temporary.persist(path).map_err(|e| Error::io(path, &e.error))?;
    Ok(())
}

/// IEEE half precision to single, exactly.
fn f16_to_f32(bits: u16) -> f32 {
    let sign = u32::from(bits >> 15) << 31;
    let exponent = u32::from((bits >> 10) & 0x1f);
    let mantissa = u32::from(bits & 0x3ff);
    let magnitude = match (exponent, mantissa) {
        (0, 0) => 0,
        (0, _) => {
            let subnormal = mantissa as f32 * 2f32.powi(-24);
            return if sign == 0 { subnormal } else { -subnormal };
        }
        (0x1f, _) => 0xff << 23 | mantissa << 13,
        _ => (exponent + 112) << 23 | mantissa << 13,
    };
    f32::from_bits(sign | magnitude)
}

fn decode<const N: usize, V>(data: &[u8], convert: impl Fn([u8; N]) -> V) -> Vec<V> {
    data.chunks_exact(N).map(|chunk| convert(chunk.try_into().unwrap_or([0; N]))).collect()
}

impl RawTensor {
    /// The values as a state-dict entry: floating dtypes cast to `T`, integers and booleans kept
    /// as integers.
    pub fn to_state<T: Element>(&self, name: &str) -> Result<StateTensor<T>> {
        let floats = |values: Vec<f64>| StateValues::Float(values.into_iter().map(T::from_f64).collect());
        let d = &self.data;
        let values = match self.dtype {
            FileDtype::F64 => floats(decode(d, f64::from_le_bytes)),
            FileDtype::F32 => floats(decode(d, |b| f64::from(f32::from_le_bytes(b)))),
            FileDtype::F16 => floats(decode(d, |b| f64::from(f16_to_f32(u16::from_le_bytes(b))))),
            FileDtype::BF16 => floats(decode(d, |b| f64::from(f32::from_bits(u32::from(u16::from_le_bytes(b)) << 16)))),
            FileDtype::I64 => StateValues::Int(decode(d, i64::from_le_bytes)),
            FileDtype::I32 => StateValues::Int(decode(d, |b| i64::from(i32::from_le_bytes(b)))),
            FileDtype::I16 => StateValues::Int(decode(d, |b| i64::from(i16::from_le_bytes(b)))),
            FileDtype::I8 => StateValues::Int(decode(d, |b: [u8; 1]| i64::from(b[0] as i8))),
            FileDtype::U8 | FileDtype::BOOL => StateValues::Int(decode(d, |b: [u8; 1]| i64::from(b[0]))),
            FileDtype::U16 => StateValues::Int(decode(d, |b| i64::from(u16::from_le_bytes(b)))),
            FileDtype::U32 => StateValues::Int(decode(d, |b| i64::from(u32::from_le_bytes(b)))),
            other => {
                return Err(Error::Format(format!(
                    "tensor {name:?} has dtype {other:?}: expected a float (F64, F32, F16, BF16) or integer dtype"
                )))
            }
        };
        Ok(StateTensor { shape: self.shape.clone(), values })
    }

    /// A state-dict entry as a tensor: floats in `T`'s dtype, integers as I64.
    pub fn from_state<T: Element>(tensor: &StateTensor<T>) -> RawTensor {
        let (dtype, data) = match &tensor.values {
            StateValues::Float(values) if T::DTYPE == "float64" => {
                (FileDtype::F64, values.iter().flat_map(|v| v.to_f64().to_le_bytes()).collect())
            }
            StateValues::Float(values) => {
                (FileDtype::F32, values.iter().flat_map(|v| (v.to_f64() as f32).to_le_bytes()).collect())
            }
            StateValues::Int(values) => (FileDtype::I64, values.iter().flat_map(|v| v.to_le_bytes()).collect()),
        };
        RawTensor { dtype, shape: tensor.shape.clone(), data }
    }
}
