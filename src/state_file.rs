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
        match self.metadata.get(crate::module::DTYPE_KEY).map(String::as_str) {
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

/// safetensors' own cap on the header (the crate refuses larger ones): reading a header never
/// allocates more than this.
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// Where the JSON header says the data ends: the largest end offset of any tensor.
fn data_extent(header: &[u8]) -> Result<u64> {
    let entries: HashMap<String, serde_json::Value> = serde_json::from_slice(header)
        .map_err(|e| Error::Format(format!("not a valid safetensors file: the header is not a JSON object: {e}")))?;
    let mut end = 0;
    for (name, entry) in entries.iter().filter(|(name, _)| *name != "__metadata__") {
        let tensor_end = entry.get("data_offsets").and_then(|o| o.get(1)).and_then(serde_json::Value::as_u64);
        let Some(tensor_end) = tensor_end else {
            return Err(Error::Format(format!(
                "not a valid safetensors file: tensor {name:?} has no data_offsets [begin, end] of integers"
            )));
        };
        end = end.max(tensor_end);
    }
    Ok(end)
}

/// `bytes` more bytes of `file` appended to `into`, allocated fallibly.
fn read_more(file: &mut File, into: &mut Vec<u8>, bytes: u64, path: &Path) -> Result<()> {
    let count = usize::try_from(bytes).map_err(|_| Error::allocation::<u8>("the file's contents", usize::MAX))?;
    into.try_reserve_exact(count).map_err(|_| Error::allocation::<u8>("the file's contents", count))?;
    let before = into.len();
    file.take(bytes).read_to_end(into).map_err(|e| Error::io(path, &e))?;
    if (into.len() - before) as u64 != bytes {
        return Err(Error::Format(format!("{}: the file changed size while it was read", path.display())));
    }
    Ok(())
}

/// Opens a regular file for reading without ever blocking: the path is checked with `stat`
/// before it is opened, and opened with `O_NONBLOCK`, so a FIFO (even one swapped in between the
/// two) cannot make `open` wait for a writer, and a device such as /dev/zero is never read.
fn open_regular(path: &Path) -> Result<File> {
    let not_regular = |info: &std::fs::Metadata| -> Result<()> {
        if info.is_dir() {
            let error = std::io::Error::new(std::io::ErrorKind::IsADirectory, "is a directory");
            return Err(Error::io(path, &error));
        }
        if !info.is_file() {
            return Err(Error::Format(format!(
                "{}: not a regular file ({}); state files are read from regular files only",
                path.display(),
                file_kind(info)
            )));
        }
        Ok(())
    };
    not_regular(&std::fs::metadata(path).map_err(|e| Error::io(path, &e))?)?;
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::custom_flags(&mut options, libc::O_NONBLOCK);
    let file = options.open(path).map_err(|e| Error::io(path, &e))?;
    not_regular(&file.metadata().map_err(|e| Error::io(path, &e))?)?;
    Ok(file)
}

/// What a path that is not a regular file is, for messages.
fn file_kind(info: &std::fs::Metadata) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        let kind = info.file_type();
        if kind.is_fifo() {
            return "a FIFO";
        }
        if kind.is_char_device() || kind.is_block_device() {
            return "a device";
        }
        if kind.is_socket() {
            return "a socket";
        }
    }
    if info.is_dir() {
        "a directory"
    } else {
        "not a regular file"
    }
}

/// Reads the bytes of a safetensors file, checking its header against its size before reading
/// its data: a header that claims more than the file holds is refused without allocating, and
/// nothing beyond what the header describes is read.
fn read_file(path: &Path) -> Result<Vec<u8>> {
    let mut file = open_regular(path)?;
    let length = file.metadata().map_err(|e| Error::io(path, &e))?.len();
    let invalid = |what: String| Error::Format(format!("not a valid safetensors file: {what}"));
    if length < 8 {
        return Err(invalid(format!("{length} bytes is too short for the 8-byte header length")));
    }
    let mut bytes = Vec::new();
    read_more(&mut file, &mut bytes, 8, path)?;
    let header_length = u64::from_le_bytes(bytes[..8].try_into().unwrap_or([0; 8]));
    if header_length > MAX_HEADER_BYTES {
        return Err(invalid(format!(
            "a header of {header_length} bytes is larger than the {MAX_HEADER_BYTES} allowed"
        )));
    }
    if 8 + header_length > length {
        return Err(invalid(format!("the header claims {header_length} bytes, but the file holds {length} in all")));
    }
    read_more(&mut file, &mut bytes, header_length, path)?;
    let data_length = data_extent(&bytes[8..])?;
    let described = (8 + header_length).checked_add(data_length);
    if described != Some(length) {
        let described = described.map_or_else(|| "more than 2**64".to_string(), |d| d.to_string());
        return Err(invalid(format!("the header describes {described} bytes, but the file holds {length}")));
    }
    read_more(&mut file, &mut bytes, data_length, path)?;
    Ok(bytes)
}

/// Reads a safetensors file.
pub fn load(path: impl AsRef<Path>) -> Result<TensorFile> {
    let path = path.as_ref();
    let with_path = |e| match e {
        Error::Format(message) => Error::Format(format!("{}: {message}", path.display())),
        other => other,
    };
    deserialize(&read_file(path).map_err(with_path)?).map_err(with_path)
}

/// The file a save to `path` replaces: symbolic links followed (a link keeps pointing at the
/// file, which is replaced), up to the kernel's own limit of 40 links.
fn resolve_links(path: &Path) -> Result<std::path::PathBuf> {
    let mut current = path.to_path_buf();
    for _ in 0..40 {
        match std::fs::symlink_metadata(&current) {
            Ok(info) if info.file_type().is_symlink() => {
                let target = std::fs::read_link(&current).map_err(|e| Error::io(&current, &e))?;
                current = match current.parent() {
                    Some(folder) if target.is_relative() => folder.join(target),
                    _ => target,
                };
            }
            _ => return Ok(current),
        }
    }
    let error = std::io::Error::other("too many levels of symbolic links");
    Err(Error::io(path, &error))
}

/// Writes a safetensors file atomically: to a temporary file in the same folder, flushed to
/// disk, then renamed over `path`, so an existing file is never left half-written. A symbolic
/// link is followed (its target is replaced); a path that exists and is not a regular file (a
/// folder, a FIFO, a device) is refused. The temporary file is named
/// `.<name>.batchnorm-tmp-XXXXXXXX` and removed on every error; only a process killed mid-save
/// leaves one behind. A new file gets the mode `open()` would give it (0666 less the umask); a
/// replaced file keeps its mode.
pub fn save(path: impl AsRef<Path>, file: &TensorFile) -> Result<()> {
    let path = resolve_links(path.as_ref())?;
    let existing = match std::fs::metadata(&path) {
        Ok(info) if info.is_dir() => {
            let error = std::io::Error::new(std::io::ErrorKind::IsADirectory, "is a directory");
            return Err(Error::io(&path, &error));
        }
        Ok(info) if !info.is_file() => {
            return Err(Error::InvalidArgument(format!(
                "{}: exists and is {}, not a regular file; refusing to replace it with a state file",
                path.display(),
                file_kind(&info)
            )))
        }
        Ok(info) => Some(info),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(Error::io(&path, &e)),
    };
    let bytes = serialize(file)?;
    let folder = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map_or_else(|| "state".into(), |n| n.to_string_lossy().into_owned());
    let prefix = format!(".{name}.batchnorm-tmp-");
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix).rand_bytes(8);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        // Created 0666 less the umask, as open() creates a file.
        builder.permissions(std::fs::Permissions::from_mode(0o666));
    }
    let mut temporary = builder.tempfile_in(folder).map_err(|e| Error::io(folder, &e))?;
    temporary.write_all(&bytes).map_err(|e| Error::io(temporary.path(), &e))?;
    if let Some(info) = existing {
        temporary.as_file().set_permissions(info.permissions()).map_err(|e| Error::io(temporary.path(), &e))?;
    }
    temporary.as_file().sync_all().map_err(|e| Error::io(temporary.path(), &e))?;
    temporary.persist(&path).map_err(|e| Error::io(&path, &e.error))?;
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
    pub fn to_state(&self, name: &str) -> Result<StateTensor> {
        let floats = StateValues::Float;
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
            FileDtype::U64 => {
                let values = decode(d, u64::from_le_bytes);
                let converted: Option<Vec<i64>> = values.iter().map(|&v| i64::try_from(v).ok()).collect();
                StateValues::Int(converted.ok_or_else(|| {
                    Error::Format(format!("tensor {name:?} (U64) holds a value above the int64 maximum"))
                })?)
            }
            other => {
                return Err(Error::Format(format!(
                    "tensor {name:?} has dtype {other:?}: expected a float (F64, F32, F16, BF16) or integer dtype"
                )))
            }
        };
        Ok(StateTensor { shape: self.shape.clone(), values })
    }

    /// A state-dict entry as a tensor: floats in `T`'s dtype, integers as I64.
    pub fn from_state<T: Element>(tensor: &StateTensor) -> RawTensor {
        let (dtype, data) = match &tensor.values {
            StateValues::Float(values) if T::DTYPE == "float64" => {
                (FileDtype::F64, values.iter().flat_map(|v| v.to_le_bytes()).collect())
            }
            StateValues::Float(values) => {
                (FileDtype::F32, values.iter().flat_map(|&v| (v as f32).to_le_bytes()).collect())
            }
            StateValues::Int(values) => (FileDtype::I64, values.iter().flat_map(|v| v.to_le_bytes()).collect()),
        };
        RawTensor { dtype, shape: tensor.shape.clone(), data }
    }
}
