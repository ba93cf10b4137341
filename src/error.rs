//! The crate's one error type. Every message says what was expected and what was given;
//! `python.rs` maps each variant to a Python exception class in one `match`.

use std::fmt;

/// Everything that can go wrong in this crate.
#[derive(Debug, Clone, PartialEq)]
pub enum Error {
    /// A constructor or setter argument is out of range (e.g. `num_features` of 0).
    InvalidArgument(String),
    /// The input is neither (N, C, H, W) nor unbatched (C, H, W).
    Rank { what: &'static str, got: Vec<usize> },
    /// The input's channel dimension differs from `num_features`.
    ChannelMismatch { expected: usize, got: usize, shape: Vec<usize> },
    /// Two arrays that must have the same shape do not.
    ShapeMismatch { what: String, expected: Vec<usize>, got: Vec<usize> },
    /// A data slice is too short, or a strided view would read outside it.
    OutOfBounds { what: &'static str, needed: usize, got: usize },
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
            Error::Unsupported(msg) | Error::Format(msg) | Error::Cuda(msg) => f.write_str(msg),
            Error::Io { message, .. } => f.write_str(message),
            Error::Rank { what, got } => write!(
                f,
                "expected {what} to be 4D (N, C, H, W) or 3D unbatched (C, H, W), got {}D {what} of shape {}",
                got.len(),
                shape_str(got)
            ),
            Error::ChannelMismatch { expected, got, shape } => write!(
                f,
                "expected input with {expected} channels (num_features), got {got} channels in input of shape {}",
                shape_str(shape)
            ),
            Error::ShapeMismatch { what, expected, got } => {
                write!(f, "expected {what} of shape {}, got shape {}", shape_str(expected), shape_str(got))
            }
            Error::OutOfBounds { what, needed, got } => {
                write!(f, "{what} needs at least {needed} elements of storage, got {got}")
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
