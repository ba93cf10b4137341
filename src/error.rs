//! The crate's one error type. Every message says what was expected and what was given;
//! `python.rs` maps each variant to a Python exception class in one `match`.

use std::fmt;

/// Everything that can go wrong in this crate.
#[derive(Debug, Clone, PartialEq)]
pub enum Error {
    /// A constructor or setter argument is out of range (e.g. `num_features` of 0).
    InvalidArgument(String),
    /// The input is neither (N, C, H, W) nor unbatched (C, H, W).
    Rank { what: &'static str, expected: &'static str, got: Vec<usize> },
    /// The input's channel dimension differs from `num_features`.
    ChannelMismatch { expected: usize, got: usize, shape: Vec<usize> },
    /// Two arrays that must have the same shape do not.
    ShapeMismatch { what: String, expected: Vec<usize>, got: Vec<usize> },
    /// A strided view would read outside its data: it reaches elements `lowest..=highest`
    /// (relative to the start of the data) of a slice of `len`.
    OutOfBounds { what: &'static str, lowest: i128, highest: i128, len: usize },
    /// A slice does not have the length its shape needs.
    Length { what: &'static str, expected: usize, got: usize },
    /// A size from the caller is too large to allocate or to address (`MemoryError` in Python).
    Memory(String),
    /// Training (batch statistics) needs at least two values per channel.
    TooFewValues { shape: Vec<usize> },
    /// An array has the wrong element type (raised by the bindings, which see dtypes).
    DType { what: String, expected: String, got: String },
    /// Something that is not an array was given where an array was expected.
    NotAnArray { what: String, got: String },
    /// An output array cannot be written (read-only, not contiguous, overlapping an input).
    BadOutput(String),
    /// `backward` was called with no forward to differentiate.
    NoForward,
    /// A state dict with missing or unexpected keys, or values of the wrong shape or kind.
    StateDict(String),
    /// A feature this build or machine does not offer (e.g. a CUDA device).
    Unsupported(String),
    /// The CUDA backend cannot run: no driver or NVRTC, no such device, or a failing CUDA call.
    Cuda(String),
    /// A state file that is not a valid safetensors file, or not a BatchNorm2d state.
    Format(String),
    /// Reading or writing a file failed; `kind` picks the Python OSError subclass.
    Io { kind: std::io::ErrorKind, message: String },
}

impl Error {
    /// The same error with the input's shape reported as `dims`, the shape the caller passed
    /// (an unbatched (C, H, W) input is computed on as (1, C, H, W)).
    pub fn with_input_dims(self, dims: &[usize]) -> Error {
        match self {
            Error::ChannelMismatch { expected, got, .. } => {
                Error::ChannelMismatch { expected, got, shape: dims.to_vec() }
            }
            Error::TooFewValues { .. } => Error::TooFewValues { shape: dims.to_vec() },
            other => other,
        }
    }

    /// A buffer of `count` values of `T` that cannot be allocated.
    pub(crate) fn allocation<T>(what: &str, count: usize) -> Error {
        let bytes = count.checked_mul(size_of::<T>()).map_or_else(|| "more than 2**64".to_string(), |b| b.to_string());
        Error::Memory(format!("cannot allocate {what}: {count} values of {} bytes ({bytes} bytes)", size_of::<T>()))
    }

    /// An I/O error on `path`, keeping its kind.
    pub(crate) fn io(path: &std::path::Path, error: &std::io::Error) -> Error {
        Error::Io { kind: error.kind(), message: format!("{}: {error}", path.display()) }
    }
}

/// Shorthand used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Formats a shape the way NumPy prints one: `(2, 3, 4)`, `(5,)`, `()`.
pub fn shape_str(shape: &[usize]) -> String {
    match shape {
        [single] => format!("({single},)"),
        _ => {
            let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
            format!("({})", dims.join(", "))
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidArgument(msg) | Error::BadOutput(msg) | Error::StateDict(msg) => f.write_str(msg),
            Error::Unsupported(msg) | Error::Format(msg) | Error::Cuda(msg) | Error::Memory(msg) => f.write_str(msg),
            Error::Io { message, .. } => f.write_str(message),
            Error::Rank { what, expected, got } => {
                write!(f, "expected {what} to be {expected}, got {}D {what} of shape {}", got.len(), shape_str(got))
            }
            Error::ChannelMismatch { expected, got, shape } => write!(
                f,
                "expected input with {expected} channels (num_features), got {got} channels in input of shape {}",
                shape_str(shape)
            ),
            Error::ShapeMismatch { what, expected, got } => {
                write!(f, "expected {what} of shape {}, got shape {}", shape_str(expected), shape_str(got))
            }
            Error::OutOfBounds { what, lowest, highest, len } if *lowest < 0 => write!(
                f,
                "{what} reaches {} elements before the start of its data (element {lowest}); its data holds {len} \
                 elements",
                -lowest,
            ),
            Error::OutOfBounds { what, highest, len, .. } => write!(
                f,
                "{what} reaches element {highest}, past the end of its data, which holds {len} elements (0..={})",
                *len as i128 - 1
            ),
            Error::Length { what, expected, got } => {
                write!(f, "expected {what} of length {expected}, got length {got}")
            }
            Error::TooFewValues { shape } => {
                write!(f, "Expected more than 1 value per channel when training, got input size {}", shape_str(shape))
            }
            Error::DType { what, expected, got } => {
                write!(f, "expected {what} of dtype {expected}, got dtype {got}")
            }
            Error::NotAnArray { what, got } => {
                write!(f, "expected {what} to be a numpy.ndarray, got {got}")
            }
            Error::NoForward => f.write_str("backward called before any forward: run the module on an input first"),
        }
    }
}

impl std::error::Error for Error {}
